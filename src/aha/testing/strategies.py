"""Hypothesis strategies for AHA problems, and the inputs they describe.

A ``Case`` is a small, printable description of a problem (shapes, window,
gate kind, dtype, seed); ``make_inputs`` turns it into tensors. Drawing a
seed instead of every float keeps shrinking fast and failures reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import strategies as st

from aha.registry import Capabilities

__all__ = ["Case", "Inputs", "aha_cases", "make_inputs", "edge_cases", "GATE_KINDS", "TEST_DTYPES"]

GATE_KINDS = ("all", "here", "random", "soft")
TEST_DTYPES = ("float64", "float32", "float16", "bfloat16")
LENGTHS = (1, 2, 3, 5, 8, 16, 17, 31, 33, 64, 97, 128, 257)
HEAD_DIMS = (16, 40, 64, 128)


@dataclass(frozen=True)
class Case:
    """One AHA problem: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], gate [B, Hq, Nq]."""

    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    window: int
    gate: str  # one of GATE_KINDS
    dtype: str
    seed: int = 0
    all_share: float = 0.3  # probability of All for gate="random"


@dataclass
class Inputs:
    q: object
    k: object
    v: object
    gate: object  # float tensor in q's dtype (0/1 or soft)
    dout: object


def _fits(caps: Capabilities, dtype: str, d: int) -> bool:
    lo, hi = caps.head_dims
    return dtype in caps.dtypes and lo <= d <= hi


@st.composite
def aha_cases(draw, caps: Capabilities, max_len: int = 257, dtypes=TEST_DTYPES, gates=GATE_KINDS):
    """Whole AHA problems that a backend with ``caps`` declares it can serve."""
    hkv = draw(st.sampled_from((1, 2)))
    hq = hkv * draw(st.sampled_from((1, 2, 3)))  # GQA ratios 1, 2, 3
    b = draw(st.integers(1, 2))
    lengths = [n for n in LENGTHS if n <= max_len] or [max_len]
    nk = draw(st.one_of(st.sampled_from(lengths), st.integers(1, max_len)))
    nq = draw(st.integers(1, nk)) if caps.cross and draw(st.booleans()) else nk
    dims = [d for d in HEAD_DIMS if caps.head_dims[0] <= d <= caps.head_dims[1]] or [caps.head_dims[0]]
    d = draw(st.sampled_from(dims))
    window = draw(st.one_of(st.just(1), st.integers(1, max(1, nk - 1)), st.integers(nk, nk + 8)))
    usable = [t for t in dtypes if t in caps.dtypes]
    dtype = draw(st.sampled_from(usable))
    gate = draw(st.sampled_from(gates))
    seed = draw(st.integers(0, 2**31 - 1))
    share = draw(st.sampled_from((0.07, 0.3, 0.7)))
    return Case(b, hq, hkv, nq, nk, d, window, gate, dtype, seed, share)


def edge_cases(caps: Capabilities, dtype: str | None = None) -> list[Case]:
    """Pinned edge cases (N=1, window=1, window>=N, all-All, all-Here, Nq=1), kept forever."""
    dtype = dtype or next(t for t in TEST_DTYPES if t in caps.dtypes)
    d = max(caps.head_dims[0], min(16, caps.head_dims[1]))
    base = Case(1, 2, 1, 17, 17, d, 4, "random", dtype, seed=7)
    cases = [
        replace(base, Nq=1, Nk=1, window=1),
        replace(base, window=1),
        replace(base, window=17),
        replace(base, window=40),
        replace(base, gate="all"),
        replace(base, gate="here"),
        replace(base, gate="soft"),
        replace(base, B=2, Hq=6, Hkv=2, Nq=33, Nk=33, window=8),
    ]
    if caps.cross:
        cases += [replace(base, Nq=1, Nk=33, window=5), replace(base, Nq=5, Nk=23, window=6)]
    return cases


def make_inputs(case: Case, device="cpu", requires_grad: bool = False) -> Inputs:
    """Deterministic tensors for ``case`` (standard normal q, k, v, dout; gate by kind)."""
    import torch

    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    q = normal(case.B, case.Hq, case.Nq, case.D)
    k = normal(case.B, case.Hkv, case.Nk, case.D)
    v = normal(case.B, case.Hkv, case.Nk, case.D)
    dout = normal(case.B, case.Hq, case.Nq, case.D)
    shape = (case.B, case.Hq, case.Nq)
    u = torch.rand(*shape, generator=gen, dtype=torch.float64)
    gate = {
        "all": torch.ones(shape, dtype=torch.float64),
        "here": torch.zeros(shape, dtype=torch.float64),
        "random": (u < case.all_share).double(),
        "soft": u,
    }[case.gate].to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v, gate):
            t.requires_grad_(True)
    return Inputs(q, k, v, gate, dout)
