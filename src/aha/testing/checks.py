"""Comparisons against the float64 reference, with tolerances written down per dtype.

float64 and float32 are compared with fixed tolerances, relative to the size of
the reference (max(1, max|ref|)). float16 and bfloat16 follow flash-attention's
rule: the backend's error against float64 may be at most twice the error of an
eager computation of the same thing in that dtype, plus a rounding floor. For the
gradients there are two honest eager computations, and the larger error counts: torch
autograd of the dense forward, and the fused kernels' backward (`eager_fused_grads`), whose
softmax gradient takes rowsum(dout * out) from the rounded output. Where the softmax
saturates, the gradients are small and the two round very differently.

The gate's gradient ``dgate = sum_d dout * (All - Here)`` needs one more term: where
the two branches coincide (a window that covers every key), the eager baseline computes
them bit for bit alike and its dgate error vanishes, while a backend that computes each
branch on its own is as honest. The baseline's error is taken to be at least
``branch_error``: what dgate's error would be had the eager branches' errors been independent.
"""

from __future__ import annotations

import numpy as np
import torch

from aha import reference
from aha.testing.strategies import Inputs
from aha.torch_ops import all_mask, here_mask, mix

__all__ = [
    "TOLERANCE",
    "FLOOR",
    "assert_close",
    "assert_agree",
    "allowed_error",
    "reference_forward",
    "reference_grads",
    "eager_attention",
    "eager_branches",
    "eager_fused_grads",
    "branch_error",
    "to_np",
]

# Relative tolerance per dtype for (forward, gradients).
TOLERANCE = {"float64": (1e-10, 1e-9), "float32": (2e-5, 2e-4)}
# Rounding floor for the low-precision rule: a few units in the last place.
FLOOR = {"float16": 4e-3, "bfloat16": 3e-2}


def to_np(x) -> np.ndarray:
    """A tensor (any device, dtype) as a float64 NumPy array."""
    return x.detach().to("cpu", torch.float64).numpy()


def _ints(ragged: dict) -> dict:
    """Ragged-batch keywords (tensors or arrays of ints) as NumPy arrays for the reference."""
    return {n: np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in ragged.items() if x is not None}


def reference_forward(inp: Inputs, window: int, scale=None, **ragged) -> np.ndarray:
    """The reference's output for ``inp``; ``ragged``: cache_seqlens, cache_leftpad, cu_seqlens_q/k."""
    return reference.attention(to_np(inp.q), to_np(inp.k), to_np(inp.v), to_np(inp.gate), window, scale, **_ints(ragged))


def reference_grads(inp: Inputs, window: int, scale=None, **ragged) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv, dgate) of sum(dout * out), float64."""
    args = (to_np(inp.q), to_np(inp.k), to_np(inp.v), to_np(inp.gate))
    return reference.attention_vjp(*args, window, to_np(inp.dout), scale, **_ints(ragged))


def eager_branches(q, k, v, window: int, scale=None, pieces=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(All, Here), each [B, Hq, Nq, D], by dense masked attention in the inputs' own dtype.

    ``pieces`` (a ragged batch's sequences, a list of `aha.sequences.Segment`): each computed alone on its
    slices, zeros for the queries of none.
    """
    if pieces is not None:
        out_all, out_here = torch.zeros_like(q), torch.zeros_like(q)
        for p in pieces:
            b, qs, ks = slice(p.batch, p.batch + 1), slice(p.q_lo, p.q_hi), slice(p.k_lo, p.k_hi)
            out_all[b, :, qs], out_here[b, :, qs] = eager_branches(q[b, :, qs], k[b, :, ks], v[b, :, ks], window, scale)
        return out_all, out_here
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, Hq, Nk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    nq, nk = q.shape[2], k.shape[2]
    out_all = torch.softmax(s.masked_fill(~all_mask(nq, nk, q.device), float("-inf")), -1) @ v
    out_here = torch.softmax(s.masked_fill(~here_mask(nq, nk, window, q.device), float("-inf")), -1) @ v
    return out_all, out_here


def eager_attention(q, k, v, gate, window: int, scale=None, pieces=None):
    """Dense masked AHA in the inputs' own dtype: the low-precision baseline (``pieces``: see `eager_branches`)."""
    return mix(gate, *eager_branches(q, k, v, window, scale, pieces))


def eager_fused_grads(q, k, v, gate, dout, window: int, scale=None, pieces=None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dgate) in the inputs' dtype, the way fused attention kernels compute them.

    Per branch: P and O in the dtype, ``delta = rowsum(dO * O)`` from the rounded O, ``dS = P * (dP - delta)``
    rounded to the dtype before the products with K and Q (accumulated in float32 at least). ``pieces``: as in
    `eager_branches`; keys of no piece get zero gradient.
    """
    if pieces is not None:
        dq, dgate = torch.zeros_like(q), torch.zeros_like(gate)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for p in pieces:
            b, qs, ks = slice(p.batch, p.batch + 1), slice(p.q_lo, p.q_hi), slice(p.k_lo, p.k_hi)
            one = eager_fused_grads(q[b, :, qs], k[b, :, ks], v[b, :, ks], gate[b, :, qs], dout[b, :, qs], window, scale)
            dq[b, :, qs], dk[b, :, ks], dv[b, :, ks], dgate[b, :, qs] = one
        return dq, dk, dv, dgate
    q, k, v, gate, dout = (x.detach() for x in (q, k, v, gate, dout))
    dtype, (b, hk, nk, d), group = q.dtype, k.shape, q.shape[1] // k.shape[1]
    acc = torch.promote_types(dtype, torch.float32)  # accumulators
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, Hq, Nk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    nq, g = q.shape[2], gate.to(dtype)[..., None]
    dq, dk, dv, outs = 0.0, 0.0, 0.0, []
    for visible, weight in ((all_mask(nq, nk, q.device), g), (here_mask(nq, nk, window, q.device), 1 - g)):
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        out = p @ v
        outs.append(out)
        d_out = dout * weight
        dv = dv + (p.transpose(-1, -2) @ d_out).to(acc)
        delta = (d_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, Hq, Nq, 1)
        ds = (p.to(acc) * ((d_out @ v.transpose(-1, -2)).to(acc) - delta)).to(dtype)
        dq = dq + (ds @ k).to(acc) * scale
        dk = dk + (ds.transpose(-1, -2) @ q).to(acc) * scale
    dgate = (dout.to(acc) * (outs[0].to(acc) - outs[1].to(acc))).sum(-1)
    dk, dv = (x.view(b, hk, group, nk, d).sum(2) for x in (dk, dv))
    return tuple(x.to(dtype) for x in (dq, dk, dv, dgate))


def branch_error(dout, branches, exact) -> np.ndarray:
    """Per entry of dgate ([B, Hq, Nq]): its error had the errors of the two branches been independent.

    ``dgate = sum_d dout * (All - Here)``. ``branches``: (All, Here) in a low dtype (`eager_branches`);
    ``exact``: the same in float64. Each component's error is taken as that of ``branches``, or its
    rounding to the dtype (u |x|, u the unit roundoff) if larger: an output of the eager computation
    can be exact by luck (one key read: a value of v), a backend's is one rounding away.
    Returns ``sqrt(sum_d dout^2 (err_All^2 + err_Here^2))``; pass it to `assert_close` as ``rounding``
    for dgate (times s(1 - s) for the router's logits).
    """
    u = torch.finfo(branches[0].dtype).eps / 2
    d = to_np(dout)
    errs = [np.maximum(np.abs(to_np(x) - x64), u * np.abs(x64)) for x, x64 in zip(branches, (to_np(x) for x in exact))]
    return np.sqrt((d**2 * (errs[0] ** 2 + errs[1] ** 2)).sum(-1))


def _rel_err(got: torch.Tensor, ref: np.ndarray) -> tuple[float, float]:
    ref_t = torch.as_tensor(ref, dtype=torch.float64)
    if ref_t.numel() == 0:
        return 0.0, 1.0
    scale = max(1.0, float(ref_t.abs().max()))
    return float((got.detach().to("cpu", torch.float64) - ref_t).abs().max()) / scale, scale


def allowed_error(dtype: str, kind: str = "forward", ref: np.ndarray | None = None, baseline=None, rounding=None) -> float:
    """The relative error against the float64 ``ref`` that ``assert_close`` allows.

    float64/float32: ``TOLERANCE``; float16/bfloat16: 2 x the eager ``baseline``'s error + ``FLOOR``,
    the baseline's error taken as at least max(``rounding``) (see `branch_error`), relative to the same scale.
    ``baseline`` may be a tuple of eager results (e.g. autograd's and `eager_fused_grads`'): the largest error counts.
    """
    if dtype in TOLERANCE:
        return TOLERANCE[dtype][0 if kind == "forward" else 1]
    assert baseline is not None and ref is not None, f"a {dtype} comparison needs an eager baseline"
    base_err, scale = max(_rel_err(b, ref) for b in (baseline if isinstance(baseline, tuple) else (baseline,)))
    if rounding is not None and np.size(rounding):
        base_err = max(base_err, float(np.max(rounding)) / scale)
    return 2 * base_err + FLOOR[dtype]


def _same_finite(name: str, got, finite_ref: np.ndarray, what: str, ours: str = "the backend") -> None:
    """``got`` (``ours``) is finite exactly where ``finite_ref`` (``what``) is; else say which side is not,
    how often, and where first."""
    finite_got = torch.isfinite(got.detach().cpu()).numpy()
    if np.array_equal(finite_got, finite_ref):
        return
    lines = [f"{name}: {int((finite_got != finite_ref).sum())} entries differ in finiteness from {what}"]
    for bad, side, other in ((~finite_got & finite_ref, ours, what), (finite_got & ~finite_ref, what, ours)):
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            value = got.detach().cpu()[first].item() if side == ours else None
            shown = f" ({value})" if value is not None else ""
            lines.append(f"  {int(bad.sum())} non-finite in {side} where {other} is finite; first at index {first}{shown}")
    raise AssertionError("\n".join(lines))


def assert_close(name: str, got, ref: np.ndarray, dtype: str, kind: str = "forward", baseline=None, rounding=None) -> None:
    """Assert ``got`` (backend, any dtype) matches ``ref`` (float64) for ``dtype``.

    ``baseline`` (same-dtype eager result) is required for float16/bfloat16; ``rounding``
    (optional, for dgate: `branch_error`) is the least error the baseline is taken to have.
    """
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != reference {ref.shape}"
    _same_finite(name, got, np.isfinite(ref), "the reference")
    err, _ = _rel_err(got, ref)
    allowed = allowed_error(dtype, kind, ref, baseline, rounding)
    if dtype in TOLERANCE:
        assert err <= allowed, f"{name} ({dtype}): relative error {err:.3g} > tolerance {allowed:.3g}"
        return
    base_err = (allowed - FLOOR[dtype]) / 2
    assert err <= allowed, f"{name} ({dtype}): error {err:.3g} > 2 x eager {base_err:.3g} + floor {FLOOR[dtype]:.1g}"


def assert_agree(name: str, got, want, dtype: str, kind: str = "forward", ref: np.ndarray | None = None, baseline=None, rounding=None) -> None:
    """Assert two results of a backend (``got``, ``want``, same dtype) agree as two correct ones must.

    Each may be off the float64 ``ref`` by ``allowed_error``, so they may differ by twice that in
    float16/bfloat16 (``ref`` and ``baseline`` needed there, ``rounding`` as in `assert_close`);
    float64/float32 use ``TOLERANCE``.
    They must be finite in the same places. The error is relative to max(1, max |want|).
    """
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    want_np = want.detach().to("cpu", torch.float64).numpy()
    _same_finite(name, got, np.isfinite(want_np), "the run it is compared with", ours="this run of the backend")
    both = np.isfinite(want_np)
    err, _ = _rel_err(got[torch.from_numpy(both).to(got.device)], want_np[both])
    allowed = allowed_error(dtype, kind, ref, baseline, rounding) * (1 if dtype in TOLERANCE else 2)
    assert err <= allowed, f"{name} ({dtype}): relative difference {err:.3g} > {allowed:.3g}"
