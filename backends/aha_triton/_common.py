"""Triton helpers shared by the forward and backward kernels.

Rows: a program works on one (batch, kv head) group ``bh`` and a block of its
rows ``row = i * G + hl`` (query position i, local query head hl). Routed calls
read the rows through ``order`` (All segment, then Here segment); dense calls
(BOTH: every token computes All and Here) read them in natural order.
Softmax state is kept in base 2: s2 = scale * log2(e) * q.k, lse2 = m + log2(l).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _segment(t, n_all, rows, BLOCK_M: tl.constexpr):
    """Query block t of a routed group: its row slots [start, end) and whether they are All.

    All blocks come first, the latest positions (the longest rows) first, so that the
    heaviest programs start early and the short ones fill the tail.
    """
    nblk_all = tl.cdiv(n_all, BLOCK_M)
    if t < nblk_all:
        start = (nblk_all - 1 - t) * BLOCK_M
        end = tl.minimum(start + BLOCK_M, n_all)
        is_all = 1
    else:
        start = n_all + (t - nblk_all) * BLOCK_M
        end = tl.minimum(start + BLOCK_M, rows)
        is_all = 0
    return start, end, is_all


@triton.jit
def _dense_block(t, rows, BLOCK_M: tl.constexpr):
    """Query block t of a BOTH call (natural row order), the latest positions first."""
    start = (tl.cdiv(rows, BLOCK_M) - 1 - t) * BLOCK_M
    return start, tl.minimum(start + BLOCK_M, rows), 0


@triton.jit
def _block_rows(ORDER_ROW, start, end, BOTH: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row ids of slots [start, end) (padding slots repeat the last row) and which slots are real."""
    slot = start + tl.arange(0, BLOCK_M)
    valid = slot < end
    slot = tl.minimum(slot, end - 1)
    if BOTH:
        row = slot
    else:
        row = tl.load(ORDER_ROW + slot)
    return row, valid


@triton.jit
def _row_coords(row, bh, NQ, NK, G: tl.constexpr):
    """Query position i, absolute position pos and flat token index (b, h, i) of each row."""
    i = row // G
    hl = row % G
    pos = NK - NQ + i
    token = (bh.to(tl.int64) * G + hl) * NQ + i  # index into [B, Hq, Nq]
    return i, hl, pos, token


@triton.jit
def _finite(x):
    """Elementwise: x is neither NaN nor +-inf."""
    return tl.abs(x) < float("inf")


@triton.jit
def _any_bad(x):
    """Scalar: some entry of x is NaN or +-inf (x * 0 is NaN exactly there)."""
    return tl.sum(tl.sum(x.to(tl.float32) * 0.0, 1), 0) != 0.0


@triton.jit
def _bad_columns(v):
    """[BLOCK_N, BLOCK_D] -> [BLOCK_N] int32: 1 where the key row holds a NaN or an inf."""
    return tl.max(tl.where(_finite(v), 0, 1), 1)
