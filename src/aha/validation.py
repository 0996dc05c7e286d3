"""Validation of ``aha.attention`` inputs, done once before dispatch.

Backends may assume that what reaches them passed `validate_attention`.
Every error names the argument, what was expected and what was seen.
Nothing is broadcast: shapes must match exactly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["Problem", "validate_attention", "validate_window", "array_kind", "dtype_name", "is_compiling"]

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know about a call to decide whether it can serve it."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    window: int
    dtype: str  # "float32", ...
    device: str  # "cpu", "cuda", ...
    array: str  # "numpy" or "torch"
    requires_grad: bool  # any of q, k, v, gate
    gate_requires_grad: bool
    seqlens: bool = False  # per-sequence cache lengths were given


def array_kind(x, name: str = "input") -> str:
    """'numpy' or 'torch'; anything else is a TypeError naming the argument."""
    mod = type(x).__module__.split(".")[0]
    if mod == "numpy":
        return "numpy"
    if mod == "torch":
        return "torch"
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def dtype_name(x) -> str:
    """Dtype of an array as a plain name: 'float32', 'bool', 'bfloat16', ..."""
    return str(x.dtype).removeprefix("torch.")


def _device(x) -> str:
    return x.device.type if hasattr(x, "device") and hasattr(x.device, "type") else "cpu"


def validate_window(window) -> int:
    """A window is an int >= 1 (bool is not an int here)."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int >= 1, got {window!r} ({type(window).__name__})")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the number of keys a Here token reads, itself included), got {window}")
    return int(window)


def _validate_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")


def _validate_arrays(q, k, v) -> tuple[str, str, str]:
    """Ranks, kinds, dtypes and devices of q, k, v; returns (array, dtype, device)."""
    kinds = {name: array_kind(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(kinds.values())) != 1:
        raise TypeError(f"q, k, v must all be numpy arrays or all torch tensors, got {kinds}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            want = "[B, Hq, Nq, D]" if name == "q" else "[B, Hkv, Nk, D]"
            raise ValueError(f"{name} must have rank 4 {want}, got shape {tuple(x.shape)}")
    dtypes = {name: dtype_name(x) for name, x in (("q", q), ("k", k), ("v", v))}
    if dtypes["q"] not in FLOAT_DTYPES:
        raise TypeError(f"q must be floating ({', '.join(FLOAT_DTYPES)}), got {dtypes['q']}")
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {dtypes}")
    devices = {name: str(getattr(x, "device", "cpu")) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(devices.values())) != 1:
        raise ValueError(f"q, k, v must be on one device, got {devices}")
    return kinds["q"], dtypes["q"], _device(q)


def _validate_shapes(q, k, v) -> tuple[int, ...]:
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)} [B, Hkv, Nk, D], got {tuple(v.shape)}")
    if bk != b:
        raise ValueError(f"k and q must have the same batch size B, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if dk != d:
        raise ValueError(f"k and q must have the same head dim D, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if min(b, hq, nq, d, hkv, nk) < 1:
        raise ValueError(f"every dimension must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if hq % hkv:
        raise ValueError(f"the query heads Hq={hq} must be a multiple of the kv heads Hkv={hkv} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if nq > nk:
        raise ValueError(f"q may not have more positions than k (Nq={nq} > Nk={nk}); queries align bottom-right with the keys")
    return b, hq, hkv, nq, nk, d


def _validate_gate(gate, q, kind: str, dtype: str) -> None:
    if array_kind(gate, "gate") != kind:
        raise TypeError(f"gate must be a {kind} array like q, got {type(gate).__name__}")
    want = tuple(q.shape[:3])
    if tuple(gate.shape) != want:
        raise ValueError(f"gate must have shape [B, Hq, Nq] = {want}, got {tuple(gate.shape)}")
    gdt = dtype_name(gate)
    if gdt not in ("bool", dtype):
        raise TypeError(f"gate must be bool or q's dtype {dtype}, got {gdt}; convert it with gate.to(q.dtype)")
    if str(getattr(gate, "device", "cpu")) != str(getattr(q, "device", "cpu")):
        raise ValueError(f"gate must be on q's device {q.device}, got {gate.device}")
    if gdt != "bool" and not is_compiling():
        bad = (gate < 0) | (gate > 1) | (gate != gate)
        if bool(bad.any()):
            raise ValueError("gate values must lie in [0, 1] (1 = All, 0 = Here); found values outside it or NaN")


def is_compiling() -> bool:
    """True while torch.compile traces the caller (False without torch): value checks wait for eager calls."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.compiler.is_compiling())


def _validate_seqlens(cache_seqlens, q, kind: str, nk: int) -> None:
    """cache_seqlens: [B] ints with Nq <= cache_seqlens[b] <= Nk."""
    if array_kind(cache_seqlens, "cache_seqlens") != kind:
        raise TypeError(f"cache_seqlens must be a {kind} array like q, got {type(cache_seqlens).__name__}")
    b, nq = q.shape[0], q.shape[2]
    if tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"cache_seqlens must have shape [B] = ({b},), got {tuple(cache_seqlens.shape)}")
    if not dtype_name(cache_seqlens).startswith(("int", "uint")):
        raise TypeError(f"cache_seqlens must be integers, got {dtype_name(cache_seqlens)}")
    if str(getattr(cache_seqlens, "device", "cpu")) != str(getattr(q, "device", "cpu")):
        raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    if is_compiling():  # reading the values would break the graph; checked in eager calls
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < nq or hi > nk:
        raise ValueError(f"cache_seqlens must lie in [Nq, Nk] = [{nq}, {nk}] (each sequence holds its Nq new tokens), got values in [{lo}, {hi}]")


def validate_attention(q, k, v, gate, window, scale, cache_seqlens=None) -> Problem:
    """Check every argument of ``aha.attention`` and describe the problem."""
    kind, dtype, device = _validate_arrays(q, k, v)
    b, hq, hkv, nq, nk, d = _validate_shapes(q, k, v)
    _validate_gate(gate, q, kind, dtype)
    window = validate_window(window)
    _validate_scale(scale)
    if cache_seqlens is not None:
        _validate_seqlens(cache_seqlens, q, kind, nk)
    grads = [bool(getattr(x, "requires_grad", False)) for x in (q, k, v, gate)]
    return Problem(b, hq, hkv, nq, nk, d, window, dtype, device, kind, any(grads), grads[3], cache_seqlens is not None)
