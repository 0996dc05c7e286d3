"""The index pass: compact the routed tokens of each kv group into dense query blocks.

The kernels work per (batch, kv head) on the G = Hq // Hkv query heads that share
it, whose G * Nq tokens form "rows" numbered ``row = i * G + hl`` (position-major,
local head ``hl``). A routed call reorders the rows of each group by a stable
partition (aha.torch_ops.route_order): the All rows first, then the Here rows, each in
position order::

    order[bh] = [All rows, ascending i] + [Here rows, ascending i]    (G * Nq)
    n_all[bh] = number of All rows

Query block t of the forward (and of dq) reads rows ``order[bh, start:end]`` of one
segment only, so a block of Here rows visits about window / BLOCK_N + 1 key blocks
and a block of All rows every key block of its rows' sequences up to their positions.

The dk/dv kernel goes the other way, key block by key block; :func:`dkdv_ranges`
tells each key block which query blocks touch it, and which of those see the whole
key block (no mask needed). Query i of group bh sits at ``pos[bh, i]`` and reads keys
from ``start[bh, i]`` on (:func:`query_bounds`: bottom-right, cache_seqlens, cache_leftpad,
packed sequences); both grow with i within a segment, so the blocks that touch a key
block, and those that see all of it, are contiguous runs found by binary search.
"""

from __future__ import annotations

import torch

from aha.window import num_blocks

# Larger than any position: marks query blocks that do not exist.
_FAR = 1 << 30


def query_bounds(bsz, hkv, nq, nk, device, seqlens=None, leftpad=None, qpos=None, qstart=None):
    """Position and first key of every query of every kv group: pos, start [B * Hkv, Nq] int64.

    seqlens, leftpad: None or [B] (cache_seqlens, cache_leftpad): row b's queries sit at
    seqlens[b] - nq + i and read keys from leftpad[b] on. qpos, qstart: None or [Nq]
    (packed sequences, B = 1): query i sits at qpos[i] and reads keys from qstart[i] on.
    """
    if qpos is not None:
        return qpos.long()[None].expand(bsz * hkv, nq), qstart.long()[None].expand(bsz * hkv, nq)
    end = torch.full((bsz,), nk, device=device) if seqlens is None else seqlens.long()
    first = torch.zeros((bsz,), dtype=torch.long, device=device) if leftpad is None else leftpad.long()
    pos = (end[:, None] - nq + torch.arange(nq, device=device)).repeat_interleave(hkv, dim=0)
    return pos, first.repeat_interleave(hkv)[:, None].expand(bsz * hkv, nq)


def _block_queries(order, seg_lo, seg_hi, rows, g, block_m):
    """Query index of the first and last row of each query block of a segment, and whether it exists.

    order: [BH, rows] row ids, or None for the natural row order; seg_lo, seg_hi: [BH] row slots
    where the segment starts and ends. Returns first, last [BH, T] int64, exists [BH, T] bool.
    """
    t = torch.arange(num_blocks(rows, block_m), device=seg_lo.device)
    first = seg_lo[:, None] + t * block_m  # (BH, T)
    last = torch.minimum(first + block_m, seg_hi[:, None]) - 1
    exists = first <= last
    first, last = first.clamp(0, rows - 1), last.clamp(0, rows - 1)
    if order is not None:
        first, last = order.gather(1, first).long(), order.gather(1, last).long()
    return first // g, last // g, exists


def _visits(first, last, exists, pos, lo, kb_first, kb_last, whole_from):
    """Query blocks that touch each key block: [r0, r3), of which [r1, r2) see all of it.

    first, last, exists: the blocks' first and last queries (_block_queries); pos, lo: [BH, Nq]
    each query's position and first key (both non-decreasing along the segment's rows).
    kb_first, kb_last: [BH, NKB] each key block's first and last key. A block sees the whole
    key block when its first row sits at or after whole_from [BH, NKB] and its last row's
    first key is at or before kb_first. Returns [BH, NKB, 4] int64.
    """

    def at(x, i):
        return torch.where(exists, x.gather(1, i), _FAR).contiguous()

    def count_below(seq, values, right=False):
        return torch.searchsorted(seq, values.contiguous(), right=right)

    first_pos, last_pos, first_lo, last_lo = at(pos, first), at(pos, last), at(lo, first), at(lo, last)
    r0 = count_below(last_pos, kb_first)  # blocks whose last query comes before the key block
    r3 = torch.maximum(count_below(first_lo, kb_last, right=True), r0)  # ... whose first range starts by its end
    r1 = count_below(first_pos, whole_from).clamp(r0, r3)
    r2 = torch.maximum(count_below(last_lo, kb_first, right=True), r1).clamp(max=r3)
    return torch.stack([r0, r1, r2, r3], dim=-1)


def dkdv_ranges(routed, pos, start, nk, g, window, block_m, block_n) -> torch.Tensor:
    """Query block ranges for each key block of the dk/dv kernel.

    routed: route_order's (order, n_all), or None for a BOTH call (every row runs both branches,
    natural row order). pos, start: [BH, Nq] from :func:`query_bounds`.

    Returns [BH, num_blocks(nk, block_n), 8] int32, per key block, of each segment (routed: All
    then Here; BOTH: one, then four zeros) the query blocks (t0, t1, t2, t3): [t0, t1) and
    [t2, t3) need a mask, [t1, t2) see the whole key block (BOTH: through All only, every
    window lies past the key block). Block t of a segment holds its rows t * block_m ...
    (t + 1) * block_m - 1.
    """
    bh, nq = pos.shape
    rows = g * nq
    dev = pos.device
    kb_first = (torch.arange(num_blocks(nk, block_n), device=dev) * block_n)[None].expand(bh, -1)  # (BH, NKB)
    kb_last = (kb_first + block_n).clamp(max=nk) - 1
    here_lo = torch.maximum(start, pos - window + 1)
    zero, full = torch.zeros(bh, dtype=torch.long, device=dev), torch.full((bh,), rows, device=dev)
    if routed is None:
        blocks = _block_queries(None, zero, full, rows, g, block_m)
        # All only and unmasked: every row's window starts after the key block's end
        both = _visits(*blocks, pos, start, kb_first, kb_last, kb_last + window)
        ranges = torch.cat([both, torch.zeros_like(both)], dim=-1)
    else:
        order, n_all = routed[0], routed[1].long()
        all_ = _visits(*_block_queries(order, zero, n_all, rows, g, block_m), pos, start, kb_first, kb_last, kb_last)
        here = _visits(*_block_queries(order, n_all, full, rows, g, block_m), pos, here_lo, kb_first, kb_last,
                       kb_last)
        ranges = torch.cat([all_, here], dim=-1)
    return ranges.to(torch.int32).contiguous()
