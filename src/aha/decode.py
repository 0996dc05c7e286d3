"""Routed decoding: a few new queries with a hard gate against a KV cache, without autograd.

A decode step (or a short chunk of prefill) has ``Nq`` of at most `MAX_QUERIES` new
queries per sequence and a cache of ``Nk`` keys. Each token computes only its branch:

* Here: every query gathers exactly its own window of keys (positions
  ``pos - window + 1 .. pos``, those below 0 zeroed and masked), all sequences at
  once, the G query heads sharing a kv head as rows of one product. Cost
  O(window) a token, whatever the context, and a key outside a Here token's
  window (a NaN, a key past ``cache_seqlens[b]``) never reaches it.
* All: only the (batch, kv head) groups that hold an All token, each over a view
  ``k[b, h, :L_b]`` of the cache (never copied, never repeated per query head),
  with no mask when the queries all sit at the last position (``Nq == 1``).

With ``cache_seqlens`` sequence b reads ``k[b, :, :L_b]`` only and its queries sit at
``L_b - Nq + i``; with ``cache_leftpad`` its keys start at ``s_b`` instead of 0: Here windows
clamp at ``s_b`` (the slots before it zeroed and masked), All groups read the view
``k[b, h, s_b:L_b]``, and a query before ``s_b`` (a padding query) outputs 0. Neither needs a
loop over sequences in the Here part.

Importing this module needs torch; ``import aha`` does not import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aha.torch_ops import all_attention, all_mask, is_hard_gate, pad_token_rows, window_key_positions
from aha.window import position_offset

__all__ = ["MAX_QUERIES", "handles", "routed_decode", "here_windows", "all_groups", "attend_rows"]

# Largest Nq the routed decode serves. Above it the tiled kernels win: every Here query
# gathers its own window (Nq * window keys per kv head instead of Nq + window), and the
# All rows of a group read every key with a mask. At 32k keys (Hq 32, Hkv 8, D 64, window
# 256, one thread) against the cpu backend's tiled path, 7% / 30% of tokens All:
# Nq 2: 1.99x / 1.72x faster, 4: 1.33x / 1.19x, 8: 1.08x / 1.09x, 16: 0.96x / 0.83x.
MAX_QUERIES = 8
_GATHER_ELEMENTS = 1 << 23  # gathered window elements per chunk of sequences (32 MiB in float32)


def handles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> bool:
    """True when `routed_decode` serves these inputs: Nq <= MAX_QUERIES and a hard gate, no grad."""
    if q.shape[2] > MAX_QUERIES:
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, gate)):
        return False
    return is_hard_gate(gate)


def routed_decode(
    q, k, v, gate, *, window: int, scale: float | None = None, cache_seqlens=None, cache_leftpad=None, run=None
) -> torch.Tensor:
    """AHA for a hard gate: Here tokens over their window, All tokens over their whole prefix.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; gate: [B, Hq, Nq] bool or exactly 0/1;
    cache_seqlens: [B] ints or None (every sequence holds Nk keys); cache_leftpad: [B] ints or
    None (row b's keys before cache_leftpad[b] are padding). Returns [B, Hq, Nq, D] in q's
    dtype; a padding query (before its row's first key) outputs 0. Meant for small Nq (see
    `handles`); correct for any Nq. Unless every token is All, Here runs for every token
    (O(window) each) and the All rows then overwrite theirs.

    The work is a list of independent jobs (one per All group, then Here); ``run(jobs)``
    returns their results in order, e.g. from a thread pool. By default they run in turn.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    nq, nk = q.shape[2], k.shape[2]
    lens = torch.full((q.shape[0],), nk, device=q.device) if cache_seqlens is None else cache_seqlens.long()
    starts = None if cache_leftpad is None else cache_leftpad.long()
    pos = lens[:, None] - nq + torch.arange(nq, device=q.device)  # (B, Nq)
    is_all = gate.bool()
    pad = None if starts is None else pos < starts[:, None]  # (B, Nq): padding queries
    if pad is not None:
        is_all = is_all & ~pad[:, None]  # they read nothing: no All group
    every_all = bool(is_all.all())
    if every_all and cache_seqlens is None and starts is None:  # plain causal attention: one fused call
        return all_attention(q, k, v, scale)
    jobs = all_groups(q, k, v, is_all, lens, scale, starts)
    if not every_all:
        jobs.append(lambda: here_windows(q, k, v, pos, window, scale, starts))
    results = run(jobs) if run is not None else [job() for job in jobs]
    out = q.new_empty(q.shape) if every_all else results.pop()  # contiguous, whatever q's strides
    for at, rows in results:
        out[at] = rows  # All rows overwrite their Here rows
    if pad is not None:
        out.masked_fill_(pad[:, None, :, None], 0.0)  # their Here rows read only masked slots (NaN)
    return out


def here_windows(q, k, v, pos, window: int, scale: float, starts=None) -> torch.Tensor:
    """Here attention of every query over exactly its window, in float32 (or float64).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; pos: [B, Nq] each query's position; starts: [B]
    each row's first key, or None (0). Returns [B, Hq, Nq, D] in q's dtype; a query with no key
    in its window (pos < start) gets NaN. Works in chunks of sequences that bound memory.
    """
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    starts = torch.zeros(bsz, dtype=torch.long, device=q.device) if starts is None else starts
    w = max(1, min(window, int((pos - starts[:, None]).max()) + 1))  # no more keys than the longest prefix
    step = max(1, _GATHER_ELEMENTS // (hkv * nq * w * d))
    parts = [
        _here_chunk(
            q[s : s + step], k[s : s + step], v[s : s + step], pos[s : s + step], w, scale, starts[s : s + step]
        )
        for s in range(0, bsz, step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _here_chunk(q, k, v, pos, w: int, scale: float, starts) -> torch.Tensor:
    """`here_windows` for one chunk of sequences, windows of w keys; starts: [B] each row's first key."""
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    first = starts[:, None].expand(bsz, nq).reshape(-1)  # each query's row start
    kpos, valid = (x.view(bsz, nq, w) for x in window_key_positions(pos.reshape(-1), w, first))  # (B, Nq, w)
    kg, vg = _gather_windows(k, kpos).to(ct), _gather_windows(v, kpos).to(ct)
    qg = q.reshape(bsz, hkv, hq // hkv, nq, d).transpose(2, 3).to(ct)  # (B, Hkv, Nq, G, D)
    clipped = not bool(valid.all())  # windows reaching before the row's first key
    if clipped:  # zero those slots: a masked key still enters p @ V as 0 * v, and 0 * NaN is NaN
        keep = valid[:, None, :, :, None]  # (B, 1, Nq, w, 1)
        kg, vg = torch.where(keep, kg, 0.0), torch.where(keep, vg, 0.0)
    scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale)  # (B, Hkv, Nq, G, w)
    if clipped:
        scores.masked_fill_(~valid[:, None, :, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1), vg)  # (B, Hkv, Nq, G, D)
    return out.transpose(2, 3).reshape(bsz, hq, nq, d).to(q.dtype)


def _gather_windows(x, kpos) -> torch.Tensor:
    """Rows kpos [B, Nq, w] of x [B, Hkv, Nk, D], for every kv head -> [B, Hkv, Nq, w, D] (a copy)."""
    bsz, hkv, nk, d = x.shape
    b = torch.arange(bsz, device=x.device)[:, None, None, None]
    h = torch.arange(hkv, device=x.device)[None, :, None, None]
    if not x.is_contiguous():
        return x[b, h, kpos[:, None]]
    at = (b * hkv + h) * nk + kpos[:, None]  # (B, Hkv, Nq, w): rows of x.view(-1, D)
    return x.view(-1, d).index_select(0, at.reshape(-1)).view(*at.shape, d)  # whole rows: faster than x[b, h, kpos]


def all_groups(q, k, v, is_all, lens, scale: float, starts=None) -> list:
    """All attention of the tokens in is_all [B, Hq, Nq]: one job per group that holds one.

    The All tokens of the G query heads sharing a kv head are compacted into one group of
    rows; each group reads the view ``k[b, h, s_b:L_b]`` (lens: [B]; starts: [B] or None,
    s_b = 0) through `attend_rows`, with no mask when Nq == 1 (every query sits at L_b - 1). A
    job returns ((b, query heads, positions), rows [n, D]): where its n rows go in a
    [B, Hq, Nq, D] output. Every token in is_all must sit at or after its row's start.
    """
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    idx, valid = pad_token_rows(is_all.reshape(bsz, hkv, g * nq))  # (B, Hkv, n): row = hl * Nq + i
    count = valid.sum(-1)  # (B, Hkv)
    n_of, len_of = count.tolist(), lens.tolist()
    start_of = [0] * bsz if starts is None else starts.tolist()
    qf = q.reshape(bsz, hkv, g * nq, d)

    def group(b: int, h: int):
        rows = idx[b, h, : n_of[b][h]]  # (n,)
        lo, hi = start_of[b], len_of[b]
        i = None if nq == 1 else rows % nq  # query index of each row: reads keys up to L_b - Nq + i
        o = attend_rows(qf[b, h, rows], k[b, h, lo:hi], v[b, h, lo:hi], nq, i, scale)  # keys: views
        return (b, h * g + rows // nq, rows % nq), o  # (n, D)

    return [lambda b=b, h=h: group(b, h) for b, h in count.nonzero().tolist()]


def attend_rows(q, k, v, nq: int, i, scale: float) -> torch.Tensor:
    """All attention of rows q [n, D] over keys k, v [L, D] (views of a cache), row r being
    query i[r] of Nq aligned bottom-right (i: [n], or None: every row reads every key).
    -> [n, D] in q's dtype.

    In float32 / float64 it is two matrix products around a softmax: BLAS (or cuBLAS) spreads
    the L keys over every thread, as flash-decoding splits them, where SDPA on one kv head runs
    on one thread (one block); the [n, L] scores are small, n being a few rows. A key past a
    row's position never reaches it, even a NaN (0 * NaN is NaN, so those values are selected
    away, not multiplied by 0). Other dtypes go through SDPA, whose scores stay in float32; there
    a NaN value among the last Nq - 1 keys reaches the rows that mask it too.
    """
    nk = k.shape[0]
    mask = None if i is None else all_mask(nq, nk, q.device)[i]  # (n, L)
    if q.dtype not in (torch.float32, torch.float64):
        return F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], attn_mask=mask, scale=scale)[
            0, 0
        ]
    scores = torch.mm(q * scale, k.T)  # (n, L); scaling q is cheaper than scaling the scores
    if mask is None:
        return torch.mm(torch.softmax(scores, -1), v)
    head = max(0, position_offset(nq, nk) + int(i.min()) + 1)  # keys [0, head) are read by every row
    read = mask[:, head:]  # (n, L - head): at most the last Nq - 1 keys
    scores[:, head:].masked_fill_(~read, float("-inf"))
    p = torch.softmax(scores, -1)
    out = torch.mm(p[:, :head], v[:head])
    if head < nk:  # each row's own tail, its unread values selected away
        out += torch.einsum("nt,ntd->nd", p[:, head:], torch.where(read[..., None], v[head:], 0.0))
    return out
