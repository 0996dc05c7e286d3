"""Validation of ``aha.attention`` inputs, done once before dispatch.

Backends may assume that what reaches them passed `validate_attention`.
Every error names the argument, what was expected and what was seen.
Nothing is broadcast: shapes must match exactly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

__all__ = ["Problem", "Ragged", "validate_attention", "validate_ragged", "validate_window", "array_kind", "dtype_name", "is_compiling"]

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
    seqlens: bool = False  # per-sequence cache lengths were given (cache_seqlens)
    leftpad: bool = False  # padding slots at the start of each row were given (cache_leftpad)
    packed: bool = False  # packed sequences were given (cu_seqlens_q, cu_seqlens_k)
    ragged: Ragged | None = field(default=None, compare=False, repr=False)  # the checked ragged arguments

    @property
    def empty(self) -> bool:
        """No query at all (B, Hq or Nq is 0): the output has no entry, and no key is read."""
        return self.batch * self.heads_q * self.len_q == 0


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
    if d < 1:
        raise ValueError(f"the head dim D must be >= 1 (the default scale is 1/sqrt(D)), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if hkv == 0 and hq > 0:
        raise ValueError(f"k must have at least one kv head for Hq={hq} query heads, got Hkv=0 (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if hkv and hq % hkv:
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
        how = "gate.astype(q.dtype)" if kind == "numpy" else "gate.to(q.dtype)"
        raise TypeError(f"gate must be bool or q's dtype {dtype}, got {gdt}; convert it with {how}")
    if str(getattr(gate, "device", "cpu")) != str(getattr(q, "device", "cpu")):
        raise ValueError(f"gate must be on q's device {q.device}, got {gate.device}")
    if gdt != "bool" and not _values_hidden(q):
        # a float gate's values are read once per call: one host sync on CUDA (none for a bool gate,
        # none while torch.compile traces); aha.attention's docstring says so
        bad = (gate < 0) | (gate > 1) | (gate != gate)
        if bool(bad.any()):
            raise ValueError(
                "gate values must lie in [0, 1] (1 = All, 0 = Here); found values outside it or NaN. "
                "A router's raw logits become a gate with aha.route(logits)"
            )


def _values_hidden(x) -> bool:
    """True when values cannot be read: while torch.compile traces, or on the meta device (shapes only)."""
    return is_compiling() or _device(x) == "meta"


def is_compiling() -> bool:
    """True while torch.compile traces the caller (False without torch): value checks wait for eager calls."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.compiler.is_compiling())


def _validate_index_array(x, name: str, q, kind: str, shape: tuple, what: str):
    """An integer array of ``shape`` on q's device, of q's kind; returns it."""
    if array_kind(x, name) != kind:
        raise TypeError(f"{name} must be a {kind} array like q, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(x.shape)}")
    if not dtype_name(x).startswith(("int", "uint")):
        raise TypeError(f"{name} must be integers (int32 or int64), got {dtype_name(x)}")
    if str(getattr(x, "device", "cpu")) != str(getattr(q, "device", "cpu")):
        raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    return x


def _validate_seqlens(cache_seqlens, cache_leftpad, q, kind: str, nk: int) -> None:
    """cache_seqlens: [B] ints in [Nq, Nk] (in [cache_leftpad[b], Nk] with cache_leftpad);
    cache_leftpad: [B] ints in [0, the row's length]."""
    b, nq = q.shape[0], q.shape[2]
    for name, x in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)):
        if x is not None:
            _validate_index_array(x, name, q, kind, (b,), "[B]")
    if _values_hidden(q):  # reading the values would break the graph; checked in eager calls
        return
    if b == 0:  # no row, no length to check
        return
    lens = [nk] * b if cache_seqlens is None else [int(n) for n in cache_seqlens.tolist()]
    if cache_leftpad is None:
        lo, hi = min(lens), max(lens)
        if lo < nq or hi > nk:
            raise ValueError(
                f"cache_seqlens must lie in [Nq, Nk] = [{nq}, {nk}] (each sequence holds its Nq new tokens), "
                f"got values in [{lo}, {hi}]; a row whose first keys are padding takes cache_leftpad too"
            )
        return
    for row, (pad, n) in enumerate(zip(cache_leftpad.tolist(), lens)):
        if n < 0 or n > nk:
            raise ValueError(f"cache_seqlens must lie in [0, Nk] = [0, {nk}], got cache_seqlens[{row}] = {n}")
        if pad < 0 or pad > n:
            length = f"cache_seqlens[{row}] = {n}" if cache_seqlens is not None else f"Nk = {nk}"
            raise ValueError(
                f"cache_leftpad[{row}] = {pad} must lie in [0, the row's length] = [0, {n}] ({length}): "
                "it counts the padding slots at the start of the row"
            )


def _validate_packed(cu_q, cu_k, max_q, max_k, q, k, kind: str) -> tuple[int | None, int | None]:
    """cu_seqlens_q / _k: [S + 1] ints from 0 to the packed lengths, non-decreasing, each sequence
    with no more queries than keys. Returns the longest query and key sequences (None under compile)."""
    if (cu_q is None) != (cu_k is None):
        missing, given = ("cu_seqlens_k", "cu_seqlens_q") if cu_k is None else ("cu_seqlens_q", "cu_seqlens_k")
        raise ValueError(
            f"{missing} is missing: packed sequences need both cu_seqlens_q and cu_seqlens_k "
            f"(pass the same tensor as {given} when queries and keys are packed alike)"
        )
    if q.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens_q / cu_seqlens_k, q, k and v must have batch size B = 1 (the sequences packed along N), "
            f"got q {tuple(q.shape)}; use cache_seqlens / cache_leftpad for a padded batch"
        )
    for name, x in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if array_kind(x, name) != kind:
            raise TypeError(f"{name} must be a {kind} array like q, got {type(x).__name__}")
        if x.ndim != 1 or x.shape[0] < 1:
            raise ValueError(f"{name} must have shape [S + 1] (S sequences), got {tuple(x.shape)}")
        _validate_index_array(x, name, q, kind, tuple(x.shape), "[S + 1]")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {cu_q.shape[0] - 1} and {cu_k.shape[0] - 1} (shapes {tuple(cu_q.shape)} and {tuple(cu_k.shape)})"
        )
    for name, hint in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if hint is None:
            continue
        if isinstance(hint, bool) or not isinstance(hint, numbers.Integral):
            raise TypeError(f"{name} must be an int >= 0 or None (a hint: the longest sequence), got {hint!r}")
        if hint < 0:
            raise ValueError(f"{name} must be >= 0 (a hint: the longest sequence), got {hint}")
    if _values_hidden(q):
        return max_q, max_k
    cq, ck = ([int(i) for i in x.tolist()] for x in (cu_q, cu_k))
    for name, c, total in (("cu_seqlens_q", cq, q.shape[2]), ("cu_seqlens_k", ck, k.shape[2])):
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0, got {name}[0] = {c[0]}")
        for s in range(len(c) - 1):
            if c[s + 1] < c[s]:
                raise ValueError(f"{name} must be non-decreasing, got {name}[{s}] = {c[s]} > {name}[{s + 1}] = {c[s + 1]}")
        if c[-1] != total:
            axis = "Nq" if name.endswith("q") else "Nk"
            raise ValueError(f"{name} must end at the packed length {axis} = {total}, got {name}[-1] = {c[-1]}")
    for s in range(len(cq) - 1):
        if cq[s + 1] - cq[s] > ck[s + 1] - ck[s]:
            raise ValueError(
                f"sequence {s} has more queries ({cq[s + 1] - cq[s]}, cu_seqlens_q) than keys ({ck[s + 1] - ck[s]}, "
                "cu_seqlens_k); queries align bottom-right with their sequence's keys"
            )
    longest_q = max((b - a for a, b in zip(cq[:-1], cq[1:])), default=0)
    longest_k = max((b - a for a, b in zip(ck[:-1], ck[1:])), default=0)
    for name, hint, real in (("max_seqlen_q", max_q, longest_q), ("max_seqlen_k", max_k, longest_k)):
        if hint is not None and hint < real:
            raise ValueError(f"{name} = {hint} is shorter than the longest sequence ({real}); pass None or at least {real}")
    return longest_q, longest_k


@dataclass(frozen=True)
class Ragged:
    """The ragged-batch arguments of a call, as the backend's ``forward`` receives them (only those given)."""

    cache_seqlens: object = None
    cache_leftpad: object = None
    cu_seqlens_q: object = None
    cu_seqlens_k: object = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None

    def kwargs(self) -> dict:
        kw = {}
        if self.cache_seqlens is not None:
            kw["cache_seqlens"] = self.cache_seqlens
        if self.cache_leftpad is not None:
            kw["cache_leftpad"] = self.cache_leftpad
        if self.cu_seqlens_q is not None:
            kw.update(
                cu_seqlens_q=self.cu_seqlens_q,
                cu_seqlens_k=self.cu_seqlens_k,
                max_seqlen_q=self.max_seqlen_q,
                max_seqlen_k=self.max_seqlen_k,
            )
        return kw


def validate_ragged(
    q, k, kind: str, *, cache_seqlens=None, cache_leftpad=None, cu_seqlens_q=None, cu_seqlens_k=None,
    max_seqlen_q=None, max_seqlen_k=None,
) -> Ragged:
    """Check the ragged-batch arguments of ``aha.attention`` (see `aha.sequences`)."""
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed and (cache_seqlens is not None or cache_leftpad is not None):
        raise ValueError(
            "cu_seqlens_q / cu_seqlens_k (packed sequences) cannot be combined with cache_seqlens / cache_leftpad "
            "(a padded batch): describe the sequences one way"
        )
    if not packed and (max_seqlen_q is not None or max_seqlen_k is not None):
        raise ValueError("max_seqlen_q / max_seqlen_k are hints for packed sequences: pass them with cu_seqlens_q / cu_seqlens_k")
    if packed:
        max_q, max_k = _validate_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k, kind)
        return Ragged(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    if cache_seqlens is not None or cache_leftpad is not None:
        _validate_seqlens(cache_seqlens, cache_leftpad, q, kind, k.shape[2])
    return Ragged(cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad)


def validate_attention(q, k, v, gate, window, scale, cache_seqlens=None, **ragged) -> Problem:
    """Check every argument of ``aha.attention`` and describe the problem.

    ``ragged``: cache_leftpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k (see
    `validate_ragged`); the checked values are in the returned problem's ``ragged``.
    """
    kind, dtype, device = _validate_arrays(q, k, v)
    b, hq, hkv, nq, nk, d = _validate_shapes(q, k, v)
    _validate_gate(gate, q, kind, dtype)
    window = validate_window(window)
    _validate_scale(scale)
    rag = validate_ragged(q, k, kind, cache_seqlens=cache_seqlens, **ragged)
    grads = [bool(getattr(x, "requires_grad", False)) for x in (q, k, v, gate)]
    return Problem(
        b, hq, hkv, nq, nk, d, window, dtype, device, kind, any(grads), grads[3],
        seqlens=rag.cache_seqlens is not None,
        leftpad=rag.cache_leftpad is not None,
        packed=rag.cu_seqlens_q is not None,
        ragged=rag,
    )
