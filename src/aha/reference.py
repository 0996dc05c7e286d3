"""The AHA semantics in executable form: NumPy, float64, forward and VJP.

This module is the specification that every backend is checked against. It is
written to be read, not to be fast: one loop over query positions, and for
each query an explicit slice of the keys that its branch reads. Keys outside
that slice are never touched, so a NaN there cannot leak into the output.

Shapes:

    q: [B, Hq, Nq, D]   k, v: [B, Hkv, Nk, D]   gate: [B, Hq, Nq]
    query head h reads kv head h // (Hq // Hkv)
    query i sits at pos(i) = Nk - Nq + i
    ragged batches (cache_seqlens, cache_leftpad, cu_seqlens_q/k): each sequence alone (aha.sequences)

    out = gate * All + (1 - gate) * Here        (selection where gate is 0 or 1)
"""

from __future__ import annotations

import numpy as np

from aha.sequences import segments
from aha.window import key_range, position_offset

__all__ = [
    "attention",
    "attention_vjp",
    "branch_forward",
    "branch_vjp",
    "mix",
    "route",
    "route_vjp",
    "sparsity_loss",
    "sparsity_loss_vjp",
]


def _expand_kv(x: np.ndarray, hq: int) -> np.ndarray:
    """[B, Hkv, Nk, D] -> [B, Hq, Nk, D]: each query head's own kv head."""
    return np.repeat(x, hq // x.shape[1], axis=1)


def _fold_kv(dx: np.ndarray, hkv: int) -> np.ndarray:
    """[B, Hq, Nk, D] -> [B, Hkv, Nk, D]: sum the query heads sharing a kv head."""
    b, hq, n, d = dx.shape
    return dx.reshape(b, hkv, hq // hkv, n, d).sum(axis=2)


def _softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _branch_probs(q_i, k, pos, window, is_all, scale):
    """Attention weights of query row ``q_i`` ([B, Hq, D]) over its key slice."""
    lo, hi = key_range(pos, window, is_all)
    s = scale * np.einsum("bhd,bhjd->bhj", q_i, k[:, :, lo:hi])  # (B, Hq, L)
    return _softmax(s), lo, hi


def branch_forward(q, k, v, window, is_all, scale):
    """One branch for every query: All (``is_all``) or Here. k, v per query head.

    q: [B, Hq, Nq, D], k, v: [B, Hq, Nk, D] -> [B, Hq, Nq, D]
    """
    nq, nk = q.shape[2], k.shape[2]
    out = np.zeros(q.shape)
    for i in range(nq):
        pos = position_offset(nq, nk) + i
        p, lo, hi = _branch_probs(q[:, :, i], k, pos, window, is_all, scale)
        out[:, :, i] = np.einsum("bhj,bhjd->bhd", p, v[:, :, lo:hi])
    return out


def branch_vjp(q, k, v, dout, window, is_all, scale):
    """Gradients of ``sum(dout * branch_forward(...))`` w.r.t. q, k, v (per query head).

    For each query row: dp = dout . v, ds = p * (dp - sum(p * dp)),
    dq = scale * ds k, dk += scale * ds q, dv += p dout.
    A (batch, head, query) whose ``dout`` row is exactly zero contributes nothing, even
    where its slice holds a NaN or inf (a Here token's All slice does, when the gate
    selects Here and a non-finite key lies outside its window): selected away, not multiplied by 0.
    """
    nq, nk = q.shape[2], k.shape[2]
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for i in range(nq):
        do = dout[:, :, i]  # (B, Hq, D)
        live = np.any(do != 0, axis=-1, keepdims=True)  # (B, Hq, 1)
        if not np.any(live):
            continue
        pos = position_offset(nq, nk) + i
        p, lo, hi = _branch_probs(q[:, :, i], k, pos, window, is_all, scale)
        p = np.where(live, p, 0.0)  # (B, Hq, L)
        dp = np.einsum("bhd,bhjd->bhj", do, v[:, :, lo:hi])
        ds = np.where(live, p * (dp - np.sum(p * dp, axis=-1, keepdims=True)), 0.0)
        dq[:, :, i] = np.where(live, scale * np.einsum("bhj,bhjd->bhd", ds, k[:, :, lo:hi]), 0.0)
        dk[:, :, lo:hi] += scale * np.einsum("bhj,bhd->bhjd", ds, q[:, :, i])
        dv[:, :, lo:hi] += np.einsum("bhj,bhd->bhjd", p, do)
    return dq, dk, dv


def _prepare(q, k, v, gate, scale):
    """Upcast to float64, expand kv heads, and default the scale."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    g = np.asarray(gate, dtype=np.float64)[..., None]  # (B, Hq, Nq, 1)
    hq = q.shape[1]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    return q, _expand_kv(k, hq), _expand_kv(v, hq), g, scale


def mix(g, out_all, out_here):
    """gate * All + (1 - gate) * Here, selecting (not blending) where g is 0 or 1."""
    blend = g * out_all + (1.0 - g) * out_here
    return np.where(g == 1.0, out_all, np.where(g == 0.0, out_here, blend))


# NaN and inf inputs are part of the spec (a non-finite key outside a window must not reach the token):
# the NumPy warnings they raise on the way are expected, not news for the caller.
_quiet = np.errstate(invalid="ignore", over="ignore", divide="ignore")


@_quiet
def attention(q, k, v, gate, window, scale=None, cache_seqlens=None, **ragged):
    """AHA forward in float64. Returns [B, Hq, Nq, D] float64.

    With ``cache_seqlens`` ([B] ints), sequence b's keys are ``k[b, :, :cache_seqlens[b]]``
    and its queries sit at positions cache_seqlens[b] - Nq + i; later keys are never read.
    ``ragged`` takes the other ragged-batch arguments: ``cache_leftpad`` ([B] ints: row b's
    sequence starts at key cache_leftpad[b]; a query before it reads nothing and outputs 0),
    or packed sequences ``cu_seqlens_q``, ``cu_seqlens_k`` ([S + 1] ints, B = 1); see
    `aha.sequences`. Each sequence is computed alone, on its own slices of q, k, v.
    """
    is_ragged = cache_seqlens is not None or _given(ragged)
    if _no_query(q):  # B, Hq or Nq is 0: an output with no entry
        return np.zeros(np.shape(q))
    if is_ragged:
        return _each_segment(attention, (q, k, v, gate), window, scale, cache_seqlens, ragged)[0]
    q, k, v, g, scale = _prepare(q, k, v, gate, scale)
    out_all = branch_forward(q, k, v, window, True, scale)
    out_here = branch_forward(q, k, v, window, False, scale)
    return mix(g, out_all, out_here)


@_quiet
def attention_vjp(q, k, v, gate, window, dout, scale=None, cache_seqlens=None, **ragged):
    """Explicit VJP of ``attention``: returns (dq, dk, dv, dgate) in float64.

    dAll = gate * dout, dHere = (1 - gate) * dout, and
    dgate[b, h, i] = sum_d dout[b, h, i, d] * (All - Here)[b, h, i, d].
    With ragged batches (``cache_seqlens``, ``ragged`` as in `attention`), keys no sequence
    reads (past ``cache_seqlens[b]``, before ``cache_leftpad[b]``) and padding queries get zero gradient.
    """
    is_ragged = cache_seqlens is not None or _given(ragged)
    if _no_query(q):  # no key is read: zero gradients for k and v, empty ones for q and gate
        return np.zeros(np.shape(q)), np.zeros(np.shape(k)), np.zeros(np.shape(v)), np.zeros(np.shape(q)[:3])
    if is_ragged:

        def one_sequence(q, k, v, gate, dout, window, scale):
            return attention_vjp(q, k, v, gate, window, dout, scale)

        return _each_segment(one_sequence, (q, k, v, gate, dout), window, scale, cache_seqlens, ragged)
    hkv = np.shape(k)[1]
    q, k, v, g, scale = _prepare(q, k, v, gate, scale)
    dout = np.asarray(dout, dtype=np.float64)
    out_all = branch_forward(q, k, v, window, True, scale)
    out_here = branch_forward(q, k, v, window, False, scale)
    grads_all = branch_vjp(q, k, v, g * dout, window, True, scale)
    grads_here = branch_vjp(q, k, v, (1.0 - g) * dout, window, False, scale)
    dq, dk, dv = (a + h for a, h in zip(grads_all, grads_here))
    dgate = np.sum(dout * (out_all - out_here), axis=-1)  # (B, Hq, Nq)
    return dq, _fold_kv(dk, hkv), _fold_kv(dv, hkv), dgate


def _no_query(q) -> bool:
    """True for a call without queries (B, Hq or Nq is 0; Hkv may be 0 with Hq = 0)."""
    return 0 in np.shape(q)[:3]


_RAGGED = ("cache_leftpad", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _given(ragged: dict) -> bool:
    unknown = set(ragged) - set(_RAGGED)
    if unknown:
        raise TypeError(f"unexpected ragged-batch arguments {sorted(unknown)}; known: {', '.join(_RAGGED)}")
    return any(ragged.get(name) is not None for name in _RAGGED[:3])


def _each_segment(fn, arrays, window, scale, cache_seqlens, ragged):
    """Run ``fn`` on each sequence alone (its slices of q, k, v, gate[, dout]); zeros elsewhere.

    fn returns one array (the forward) or (dq, dk, dv, dgate); a padding query's output and
    every gradient outside the sequences' slices stay 0.
    """
    q, k = (np.asarray(x) for x in arrays[:2])
    np_ = lambda x: None if x is None else np.asarray(x)  # noqa: E731
    parts = segments(
        q.shape[0], q.shape[2], k.shape[2],
        cu_seqlens_q=np_(ragged.get("cu_seqlens_q")), cu_seqlens_k=np_(ragged.get("cu_seqlens_k")),
        cache_seqlens=np_(cache_seqlens), cache_leftpad=np_(ragged.get("cache_leftpad")),
    )  # fmt: skip
    n_out = 4 if len(arrays) == 5 else 1
    shapes = [q.shape, k.shape, k.shape, q.shape[:3]][:n_out]
    results = tuple(np.zeros(sh) for sh in shapes)
    for sg in parts:
        qs, ks = slice(sg.q_lo, sg.q_hi), slice(sg.k_lo, sg.k_hi)
        b = slice(sg.batch, sg.batch + 1)
        one = [np.asarray(x)[b, :, qs] for x in arrays]  # q, gate, dout: the segment's queries
        one[1], one[2] = np.asarray(arrays[1])[b, :, ks], np.asarray(arrays[2])[b, :, ks]  # (1, Hkv, n_k, D)
        res = fn(*one, window, scale)
        res = res if isinstance(res, tuple) else (res,)
        for i, (full, part) in enumerate(zip(results, res)):
            full[b, :, ks if i in (1, 2) else qs] += part  # dk, dv over keys; out, dq, dgate over queries
    return results


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def route(logits, threshold=0.5):
    """Hard gate 1[sigmoid(logits) > threshold] as float64 (1 = All, 0 = Here)."""
    return (_sigmoid(np.asarray(logits, dtype=np.float64)) > threshold).astype(np.float64)


def route_vjp(logits, dgate):
    """Straight-through gradient: dlogits = dgate * s * (1 - s), s = sigmoid(logits)."""
    s = _sigmoid(np.asarray(logits, dtype=np.float64))
    return np.asarray(dgate, dtype=np.float64) * s * (1.0 - s)


def sparsity_loss(logits) -> float:
    """The paper's L1 regulariser: mean(sigmoid(logits))."""
    return float(np.mean(_sigmoid(np.asarray(logits, dtype=np.float64))))


def sparsity_loss_vjp(logits, dloss=1.0):
    """Gradient of ``sparsity_loss``: dloss * s * (1 - s) / logits.size."""
    s = _sigmoid(np.asarray(logits, dtype=np.float64))
    return dloss * s * (1.0 - s) / s.size
