"""Hypothesis strategies for AHA problems, and the inputs they describe.

A ``Case`` is a small, printable description of a problem (shapes, window,
gate kind, dtype, seed); ``make_inputs`` turns it into tensors. Drawing a
seed instead of every float keeps shrinking fast and failures reproducible.

Ragged batches wrap a ``Case`` (the tensors' shapes) with the sequences it holds:
``PackedCase`` (``cu_seqlens_q`` / ``cu_seqlens_k``, B = 1), ``PaddedCase`` (``cache_leftpad``
and ``cache_seqlens``) and ``DecodeCase`` (a prefill, then decode steps, on a left-padded
cache). Each says, by its own arithmetic, which queries and keys every sequence owns
(``pieces``), so that a test can run each sequence alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import strategies as st

from aha.registry import Capabilities
from aha.sequences import Segment

__all__ = [
    "Case",
    "Inputs",
    "aha_cases",
    "make_inputs",
    "edge_cases",
    "long_cases",
    "LongCase",
    "scale_factors",
    "GATE_KINDS",
    "TEST_DTYPES",
    "PackedCase",
    "PaddedCase",
    "DecodeCase",
    "packed_cases",
    "padded_cases",
    "decode_cases",
    "ragged_edge_cases",
    "RAGGED_MAX_LEN",
]

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


@dataclass(frozen=True)
class LongCase:
    """A pinned long problem: ``case``, and ``seqlens`` (cache_seqlens per row) or None."""

    case: Case
    seqlens: tuple[int, ...] | None = None


def long_cases(caps: Capabilities, dtype: str | None = None) -> list[LongCase]:
    """Pinned problems of 1000+ keys at small H and D, run whatever the drawn maximum length.

    A kernel that goes wrong only past its first tiles (256 keys, say) fails here even when
    ``--aha-max-len`` keeps every drawn problem short: a hard and a soft gate, windows well
    below the length, fewer queries than keys (if ``cross``), and a decode step against caches
    of different lengths (if ``seqlens`` and ``cross``).
    """
    dtype = dtype or next(t for t in TEST_DTYPES if t in caps.dtypes)
    d = max(caps.head_dims[0], min(16, caps.head_dims[1]))
    base = Case(1, 1, 1, 1031, 1031, d, 37, "random", dtype, seed=21, all_share=0.3)
    cases = [LongCase(base)]
    if caps.cross:
        cases.append(LongCase(replace(base, Hq=2, Nq=24, Nk=1100, window=300, gate="soft", seed=22)))
        if caps.seqlens:
            decode = replace(base, B=2, Hq=2, Nq=2, Nk=1060, window=29, seed=23, all_share=0.5)
            cases.append(LongCase(decode, (1060, 611)))
    else:
        cases.append(LongCase(replace(base, Hq=2, Nq=1100, Nk=1100, window=300, gate="soft", seed=22)))
    return cases


def scale_factors():
    """Softmax scales as multiples of the default 1/sqrt(D), 0.1 to 4: a backend must use the caller's ``scale``.

    (Far beyond 4x the softmax saturates, and float16/bfloat16 gradients become rounding noise.)
    """
    return st.one_of(st.sampled_from((0.1, 0.5, 2.0, 4.0)), st.floats(0.1, 4.0))


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


# Ragged batches: packed sequences and left-padded rows.

RAGGED_MAX_LEN = 64  # keys per call the ragged strategies draw at most (or max_len, if smaller)


def _window(draw, longest: int) -> int:
    """A window below, at and beyond the longest sequence (>= 1)."""
    longest = max(1, longest)
    return draw(st.one_of(st.just(1), st.integers(1, max(1, longest - 1)), st.integers(longest, longest + 8)))


def _cumsum(lens) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _index(values, dtype: str, device):
    import torch

    return torch.tensor(list(values), dtype=getattr(torch, dtype), device=device)


@dataclass(frozen=True)
class PackedCase:
    """Packed sequences along N (B = 1): sequence s has ``lens_q[s]`` queries and ``lens_k[s]`` keys.

    ``case`` describes the packed tensors: B = 1, Nq = sum(lens_q), Nk = sum(lens_k). A sequence
    may be empty, or hold keys and no queries; within one, queries align bottom-right with its keys.
    """

    case: Case
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    index_dtype: str = "int32"

    def __post_init__(self):
        c = self.case
        if (c.B, c.Nq, c.Nk) != (1, sum(self.lens_q), sum(self.lens_k)) or len(self.lens_q) != len(self.lens_k):
            raise ValueError(f"a packed case needs B = 1, Nq = sum(lens_q), Nk = sum(lens_k); got {self!r}")

    def cu_seqlens(self) -> tuple[list[int], list[int]]:
        """(cu_seqlens_q, cu_seqlens_k) as lists of ints."""
        return _cumsum(self.lens_q), _cumsum(self.lens_k)

    def pieces(self) -> list[Segment]:
        """The sequences that own a query, in order."""
        cq, ck = self.cu_seqlens()
        return [Segment(0, cq[s], cq[s + 1], ck[s], ck[s + 1]) for s, n in enumerate(self.lens_q) if n]

    def ragged(self, device="cpu") -> dict:
        """The keywords of ``aha.attention`` for this batch (torch tensors on ``device``)."""
        cq, ck = self.cu_seqlens()
        return {"cu_seqlens_q": _index(cq, self.index_dtype, device), "cu_seqlens_k": _index(ck, self.index_dtype, device)}


@dataclass(frozen=True)
class PaddedCase:
    """A padded batch: row b's sequence owns keys ``[leftpad[b], seqlens[b])`` (``seqlens`` None: Nk).

    Row b's Nq queries sit at ``seqlens[b] - Nq + i``; those before ``leftpad[b]`` are padding queries.
    """

    case: Case
    leftpad: tuple[int, ...]
    seqlens: tuple[int, ...] | None = None
    index_dtype: str = "int32"

    def __post_init__(self):
        rows = [self.leftpad] + ([self.seqlens] if self.seqlens is not None else [])
        if any(len(r) != self.case.B for r in rows) or not all(0 <= p <= e <= self.case.Nk for p, e in zip(self.leftpad, self.ends())):
            raise ValueError(f"a padded case needs B entries with 0 <= leftpad <= seqlens <= Nk; got {self!r}")

    def ends(self) -> list[int]:
        return list(self.seqlens) if self.seqlens is not None else [self.case.Nk] * self.case.B

    def pieces(self) -> list[Segment]:
        """Per row that owns a query: its real queries (the last ones) and its keys."""
        nq = self.case.Nq
        out = []
        for b, (pad, end) in enumerate(zip(self.leftpad, self.ends())):
            real = min(nq, end - pad)
            if real > 0:
                out.append(Segment(b, nq - real, nq, pad, end))
        return out

    def ragged(self, device="cpu") -> dict:
        kw = {"cache_leftpad": _index(self.leftpad, self.index_dtype, device)}
        if self.seqlens is not None:
            kw["cache_seqlens"] = _index(self.seqlens, self.index_dtype, device)
        return kw


@dataclass(frozen=True)
class DecodeCase:
    """A prefill, then decode steps, on a cache of Nk slots whose rows are left-padded and ragged.

    Row b's sequence starts at slot ``leftpad[b]``; the prefill fills the row up to ``prefill[b]``
    (its cache_seqlens then) and step t appends ``steps[t]`` tokens to every row. ``case`` holds
    one token per slot and position (Nq = Nk = max(prefill) + sum(steps)): q, gate and dout
    [B, Hq, Nk], k and v [B, Hkv, Nk].
    """

    case: Case
    leftpad: tuple[int, ...]
    prefill: tuple[int, ...]
    steps: tuple[int, ...]
    index_dtype: str = "int32"

    def calls(self) -> list[tuple[list[int], int]]:
        """(cache_seqlens, Nq) of the prefill and of each step: the calls of a generation."""
        out = [(list(self.prefill), max(self.prefill))]
        ends = list(self.prefill)
        for n in self.steps:
            ends = [e + n for e in ends]
            out.append((ends, n))
        return out

    def final(self) -> list[int]:
        """Each row's length at the end: cache_seqlens of the one full pass."""
        return [p + sum(self.steps) for p in self.prefill]


@st.composite
def packed_cases(draw, caps: Capabilities, max_len: int = 257, dtypes=TEST_DTYPES, gates=GATE_KINDS, max_seqs: int = 4):
    """Packed batches a backend with ``caps`` declares it can serve (draw only if ``caps.packed``).

    One to ``max_seqs`` sequences, empty ones among them; fewer queries than keys within a
    sequence if ``caps.cross``; windows below, at and beyond the longest sequence.
    """
    base = draw(aha_cases(caps, max_len=max_len, dtypes=dtypes, gates=gates))
    limit = max(1, min(max_len, RAGGED_MAX_LEN))
    seqs = draw(st.integers(1, max_seqs))
    cap = max(1, limit // seqs)
    lens_k = [draw(st.one_of(st.just(0), st.integers(1, cap)), label=f"keys{s}") for s in range(seqs)]
    if not any(lens_k):
        lens_k[-1] = 1
    cross = caps.cross and draw(st.booleans(), label="fewer queries than keys")
    lens_q = [draw(st.integers(0, n), label=f"queries{s}") if cross else n for s, n in enumerate(lens_k)]
    if not any(lens_q):  # aha.attention answers a call without queries itself: the last non-empty sequence keeps one
        last = max(s for s, n in enumerate(lens_k) if n)
        lens_q[last] = 1
    window = _window(draw, max(lens_k))
    case = replace(base, B=1, Nq=sum(lens_q), Nk=sum(lens_k), window=window)
    return PackedCase(case, tuple(lens_q), tuple(lens_k), draw(st.sampled_from(("int32", "int64"))))


@st.composite
def padded_cases(draw, caps: Capabilities, max_len: int = 257, dtypes=TEST_DTYPES, gates=GATE_KINDS, batch=(1, 4)):
    """Left-padded batches (``cache_leftpad``; ``cache_seqlens`` too if ``caps.seqlens`` and ``caps.cross``).

    Rows of no padding, some, and only padding; with ``cache_seqlens``, rows shorter than Nq
    (their first queries are padding queries).
    """
    base = draw(aha_cases(caps, max_len=max_len, dtypes=dtypes, gates=gates))
    limit = max(1, min(max_len, RAGGED_MAX_LEN))
    b = draw(st.integers(*batch), label="B")
    nk = draw(st.integers(1, limit), label="Nk")
    nq = draw(st.integers(1, nk), label="Nq") if caps.cross and draw(st.booleans()) else nk
    seqlens = None
    if caps.seqlens and caps.cross and draw(st.booleans(), label="cache_seqlens"):
        seqlens = tuple(draw(st.integers(0, nk), label=f"len{r}") for r in range(b))
    ends = seqlens or (nk,) * b
    leftpad = tuple(draw(st.one_of(st.just(0), st.integers(0, e), st.just(e)), label=f"pad{r}") for r, e in enumerate(ends))
    window = _window(draw, max(e - p for e, p in zip(ends, leftpad)))
    case = replace(base, B=b, Nq=nq, Nk=nk, window=window)
    return PaddedCase(case, leftpad, seqlens, draw(st.sampled_from(("int32", "int64"))))


@st.composite
def decode_cases(draw, caps: Capabilities, max_len: int = 257, dtypes=TEST_DTYPES, gates=("here", "random", "all")):
    """Generations on a left-padded, ragged cache: B 2..4 rows, a prefill, then 1..3 steps of 1..8 tokens.

    Rows end their prefill together (as ``generate`` pads) or apart (as continuous batching does).
    """
    base = draw(aha_cases(caps, max_len=max_len, dtypes=dtypes, gates=gates))
    limit = max(2, min(max_len, RAGGED_MAX_LEN))
    b = draw(st.integers(2, 4), label="B")
    steps = []
    for _ in range(draw(st.integers(1, 3), label="steps")):
        if sum(steps) < limit - 1:
            steps.append(draw(st.integers(1, min(8, limit - 1 - sum(steps))), label="Nq"))
    longest = draw(st.integers(1, limit - sum(steps)), label="prefill")
    if draw(st.booleans(), label="rows end together"):
        prefill = [longest] * b
    else:
        prefill = [draw(st.integers(0, longest), label=f"prefill{r}") for r in range(b)]
        prefill[draw(st.integers(0, b - 1), label="longest row")] = longest
    leftpad = tuple(draw(st.integers(0, p), label=f"pad{r}") for r, p in enumerate(prefill))
    nk = longest + sum(steps)
    window = _window(draw, max(p + sum(steps) - lp for p, lp in zip(prefill, leftpad)))
    case = replace(base, B=b, Nq=nk, Nk=nk, window=window)
    return DecodeCase(case, leftpad, tuple(prefill), tuple(steps), draw(st.sampled_from(("int32", "int64"))))


def ragged_edge_cases(caps: Capabilities, dtype: str | None = None) -> list[PackedCase | PaddedCase]:
    """Pinned ragged batches for what ``caps`` declares: one-token and empty sequences, a sequence
    with keys and no queries, fully padded rows, rows shorter than Nq, window 1 and beyond every length."""
    dtype = dtype or next(t for t in TEST_DTYPES if t in caps.dtypes)
    d = max(caps.head_dims[0], min(16, caps.head_dims[1]))
    cases: list[PackedCase | PaddedCase] = []
    if caps.packed:
        one = Case(1, 2, 1, 1, 1, d, 1, "random", dtype, seed=11)
        base = Case(1, 2, 1, 13, 13, d, 3, "random", dtype, seed=12)
        cases += [
            PackedCase(one, (1,), (1,)),
            PackedCase(base, (5, 0, 1, 7), (5, 0, 1, 7)),
            PackedCase(replace(base, window=1, gate="soft"), (5, 0, 1, 7), (5, 0, 1, 7), "int64"),
            PackedCase(replace(base, window=40, gate="all"), (7, 6), (7, 6)),
            PackedCase(replace(base, gate="here"), (6, 7), (6, 7)),
        ]
        if caps.cross:
            cross = Case(1, 6, 2, 6, 18, d, 2, "soft", dtype, seed=13)
            cases += [
                PackedCase(cross, (2, 0, 3, 1), (6, 4, 3, 5)),
                PackedCase(replace(cross, gate="random", Nq=3, Nk=9, window=9), (1, 1, 1), (3, 1, 5)),
            ]
    if caps.leftpad:
        base = Case(3, 2, 1, 9, 9, d, 3, "random", dtype, seed=14)
        cases += [
            PaddedCase(base, (0, 4, 9)),
            PaddedCase(replace(base, gate="soft", window=1), (8, 0, 3), None, "int64"),
            PaddedCase(replace(base, B=1, gate="all", window=20), (2,)),
        ]
        if caps.cross and caps.seqlens:
            cross = Case(3, 4, 2, 4, 10, d, 3, "soft", dtype, seed=15)
            cases += [
                PaddedCase(cross, (2, 0, 5), (9, 10, 7)),
                PaddedCase(replace(cross, B=2, gate="random"), (0, 1), (2, 3)),  # rows shorter than Nq
                PaddedCase(replace(cross, B=2, Nq=1, Nk=12, window=4, gate="random"), (3, 0), (12, 8)),
                PaddedCase(replace(cross, B=2, gate="here"), (4, 10), (4, 10)),  # rows of padding only
            ]
    return cases
