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
and a block of All rows every causal one (see aha.window.key_block_range).

The dk/dv kernel goes the other way, key block by key block; :func:`dkdv_ranges`
tells each key block which All and Here query blocks touch it, and which of
those see the whole key block (no mask needed).
"""

from __future__ import annotations

import torch

from aha.window import num_blocks, position_offset

# Larger than any position: marks query blocks that do not exist.
_FAR = 1 << 30


def _segment_positions(order, n_all, seg_lo, seg_hi, nq, nk, g, block_m):
    """First and last position of each query block of one segment; _FAR past its end.

    seg_lo, seg_hi: [BH] row slots where the segment starts and ends.
    Returns first, last: [BH, T] int64 with T = the most blocks any segment can have.
    """
    rows = order.shape[1]
    t = torch.arange(num_blocks(rows, block_m), device=order.device)
    start = seg_lo[:, None] + t * block_m  # (BH, T)
    end = torch.minimum(start + block_m, seg_hi[:, None])
    exists = start < end
    off = position_offset(nq, nk)
    first = off + order.gather(1, start.clamp(max=rows - 1)).long() // g
    last = off + order.gather(1, (end - 1).clamp(0, rows - 1)).long() // g
    return torch.where(exists, first, _FAR), torch.where(exists, last, _FAR)


def dkdv_ranges(order, n_all, nq, nk, g, window, block_m, block_n) -> torch.Tensor:
    """Query block ranges for each key block of the dk/dv kernel.

    Returns [BH, num_blocks(nk, block_n), 8] int32, per key block:
    a0, a1   All blocks [a0, a1) need a mask, [a1, n_all_blocks) see the whole key block;
    h0..h3   Here blocks [h0, h1) and [h2, h3) need a mask, [h1, h2) see the whole key block.
    Block t of a segment holds its rows t * block_m ... (t + 1) * block_m - 1.
    """
    rows = order.shape[1]
    n_all = n_all.long()
    kb_first = torch.arange(num_blocks(nk, block_n), device=order.device) * block_n  # (NKB,)
    kb_last = (kb_first + block_n).clamp(max=nk) - 1
    bh = order.shape[0]
    kb_first, kb_last = kb_first.expand(bh, -1).contiguous(), kb_last.expand(bh, -1).contiguous()

    def count_below(seq, values, right=False):
        return torch.searchsorted(seq.contiguous(), values, right=right)

    first, last = _segment_positions(order, n_all, torch.zeros_like(n_all), n_all, nq, nk, g, block_m)
    a0 = count_below(last, kb_first)  # All blocks whose last query comes before the key block
    a1 = count_below(first, kb_last)  # ... whose first query comes before the key block's end
    seg_hi = torch.full_like(n_all, rows)
    first, last = _segment_positions(order, n_all, n_all, seg_hi, nq, nk, g, block_m)
    lo_first, lo_last = first - window + 1, last - window + 1  # window starts (unclamped)
    h0 = count_below(last, kb_first)
    h3 = torch.maximum(count_below(lo_first, kb_last, right=True), h0)  # windows starting by the block's end
    h1 = count_below(first, kb_last).clamp(h0, h3)
    h2 = torch.maximum(count_below(lo_last, kb_first, right=True), h1).clamp(max=h3)
    ranges = torch.stack([a0, a1, h0, h1, h2, h3, torch.zeros_like(a0), torch.zeros_like(a0)], dim=-1)
    return ranges.to(torch.int32).contiguous()
