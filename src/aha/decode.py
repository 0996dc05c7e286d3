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
``L_b - Nq + i``; the Here part needs no loop over sequences.

Importing this module needs torch; ``import aha`` does not import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aha.torch_ops import all_attention, all_mask, is_hard_gate, pad_token_rows, window_key_positions

__all__ = ["MAX_QUERIES", "handles", "routed_decode", "here_windows", "all_groups"]

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
    q, k, v, gate, *, window: int, scale: float | None = None, cache_seqlens=None, run=None
) -> torch.Tensor:
    """AHA for a hard gate: Here tokens over their window, All tokens over their whole prefix.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; gate: [B, Hq, Nq] bool or exactly 0/1;
    cache_seqlens: [B] ints or None (every sequence holds Nk keys). Returns [B, Hq, Nq, D]
    in q's dtype. Meant for small Nq (see `handles`); correct for any Nq. Unless every token
    is All, Here runs for every token (O(window) each) and the All rows then overwrite theirs.

    The work is a list of independent jobs (one per All group, then Here); ``run(jobs)``
    returns their results in order, e.g. from a thread pool. By default they run in turn.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    nq, nk = q.shape[2], k.shape[2]
    lens = torch.full((q.shape[0],), nk, device=q.device) if cache_seqlens is None else cache_seqlens.long()
    pos = lens[:, None] - nq + torch.arange(nq, device=q.device)  # (B, Nq)
    is_all = gate.bool()
    every_all = bool(is_all.all())
    if every_all and cache_seqlens is None:  # plain causal attention: one fused call, as dense decoding is
        return all_attention(q, k, v, scale)
    jobs = all_groups(q, k, v, is_all, lens, scale)
    if not every_all:
        jobs.append(lambda: here_windows(q, k, v, pos, window, scale))
    results = run(jobs) if run is not None else [job() for job in jobs]
    out = q.new_empty(q.shape) if every_all else results.pop()  # contiguous, whatever q's strides
    for at, rows in results:
        out[at] = rows  # All rows overwrite their Here rows
    return out


def here_windows(q, k, v, pos, window: int, scale: float) -> torch.Tensor:
    """Here attention of every query over exactly its window, in float32 (or float64).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; pos: [B, Nq] each query's position.
    Returns [B, Hq, Nq, D] in q's dtype. Works in chunks of sequences that bound memory.
    """
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    w = min(window, int(pos.max()) + 1)  # a longer window reads no more keys than the longest prefix
    step = max(1, _GATHER_ELEMENTS // (hkv * nq * w * d))
    parts = [
        _here_chunk(q[s : s + step], k[s : s + step], v[s : s + step], pos[s : s + step], w, scale)
        for s in range(0, bsz, step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _here_chunk(q, k, v, pos, w: int, scale: float) -> torch.Tensor:
    """`here_windows` for one chunk of sequences, windows of w keys."""
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    kpos, valid = (x.view(bsz, nq, w) for x in window_key_positions(pos.reshape(-1), w))  # (B, Nq, w), oldest first
    kg, vg = _gather_windows(k, kpos).to(ct), _gather_windows(v, kpos).to(ct)
    qg = q.reshape(bsz, hkv, hq // hkv, nq, d).transpose(2, 3).to(ct)  # (B, Hkv, Nq, G, D)
    clipped = not bool(valid.all())  # windows reaching before key 0
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


def all_groups(q, k, v, is_all, lens, scale: float) -> list:
    """All attention of the tokens in is_all [B, Hq, Nq]: one job per group that holds one.

    The All tokens of the G query heads sharing a kv head are compacted into one group of
    rows; each group is one SDPA call against the view ``k[b, h, :L_b]`` (lens: [B]), with
    no mask when Nq == 1 (every query sits at L_b - 1). A job returns ((b, query heads,
    positions), rows [n, D]): where its n rows go in a [B, Hq, Nq, D] output.
    """
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    idx, valid = pad_token_rows(is_all.reshape(bsz, hkv, g * nq))  # (B, Hkv, n): row = hl * Nq + i
    count = valid.sum(-1)  # (B, Hkv)
    n_of, len_of = count.tolist(), lens.tolist()
    qf = q.reshape(bsz, hkv, g * nq, d)

    def group(b: int, h: int):
        rows = idx[b, h, : n_of[b][h]]  # (n,)
        length = len_of[b]
        mask = None if nq == 1 else all_mask(nq, length, q.device)[rows % nq]  # (n, L_b): keys up to L_b - Nq + i
        kr, vr = k[b, h, :length][None, None], v[b, h, :length][None, None]  # (1, 1, L_b, D), views
        o = F.scaled_dot_product_attention(qf[b, h, rows][None, None], kr, vr, attn_mask=mask, scale=scale)
        return (b, h * g + rows // nq, rows % nq), o[0, 0]  # (n, D)

    return [lambda b=b, h=h: group(b, h) for b, h in count.nonzero().tolist()]
