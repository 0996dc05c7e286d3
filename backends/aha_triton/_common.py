"""Triton helpers shared by the forward and backward kernels.

Rows: a program works on one (batch, kv head) group ``bh`` and a block of its
rows ``row = i * G + hl`` (query position i, local query head hl). Routed calls
read the rows through ``order`` (All segment, then Here segment); dense calls
(BOTH: every token computes All and Here) read them in natural order.
Softmax state is kept in base 2: s2 = scale * log2(e) * q.k, lse2 = m + log2(l).

Ragged batches (constexpr switches, so that plain calls compile as before). A row reads
keys ``start <= j <= pos`` (All) or ``max(start, pos - window + 1) <= j <= pos`` (Here):

    VARLEN   batch row b holds keys [0, L_b), L_b = SEQLENS[b] (cache_seqlens): its queries
             sit at pos = L_b - Nq + i and keys from L_b on are never loaded
    LEFTPAD  row b's keys start at PADS[b] (cache_leftpad); a query with pos < start
             reads no key: its output is 0 (l == 0 is guarded) and it gets no gradient
    PACKED   B = 1, sequences packed along N (cu_seqlens): query i sits at QPOS[i] and its
             sequence's keys start at QSTART[i] (see _launch.packed_positions)

A program reads its row's bounds once (:func:`_seq_keys`), and each row's pos and start
come from :func:`_row_coords`. Query blocks may hold rows of several packed sequences:
the key blocks they visit cover the union of their rows' ranges, and masks do the rest.
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
def _seq_keys(SEQLENS, PADS, b, NK, VARLEN: tl.constexpr, LEFTPAD: tl.constexpr):
    """Keys [k0, k1) of batch row b: cache_leftpad[b] (LEFTPAD) to cache_seqlens[b] (VARLEN), else [0, NK)."""
    k0 = 0
    k1 = NK
    if LEFTPAD:
        k0 = tl.load(PADS + b)
    if VARLEN:
        k1 = tl.load(SEQLENS + b)
    return k0, k1


@triton.jit
def _row_coords(row, bh, NQ, seq, G: tl.constexpr, PACKED: tl.constexpr):
    """Query position i, absolute position pos, first key start and flat token index (b, h, i) of each row.

    seq = (k0, k1, QPOS, QSTART): the program's row bounds (:func:`_seq_keys`); queries sit
    bottom-right (pos = k1 - NQ + i) and start at k0, or under PACKED at QPOS[i], QSTART[i]."""
    i = row // G
    hl = row % G
    if PACKED:
        pos = tl.load(seq[2] + i)
        start = tl.load(seq[3] + i)
    else:
        pos = seq[1] - NQ + i
        start = tl.zeros_like(pos) + seq[0]
    token = (bh.to(tl.int64) * G + hl) * NQ + i  # index into [B, Hq, Nq]
    return i, hl, pos, start, token


@triton.jit
def _routed_stages(lo, pos, BLOCK_N: tl.constexpr):
    """Key blocks of rows that read keys lo <= j <= pos (lo >= 0):
    masked [kb_lo, b1), whole for every row [b1, b2), masked [b2, kb_hi)."""
    kb_lo = tl.min(lo, 0) // BLOCK_N
    kb_hi = tl.cdiv(tl.maximum(tl.max(pos, 0) + 1, 0), BLOCK_N)
    b1 = tl.minimum(tl.maximum(tl.cdiv(tl.max(lo, 0), BLOCK_N), kb_lo), kb_hi)
    b2 = tl.minimum(tl.maximum(tl.maximum(tl.min(pos, 0) + 1, 0) // BLOCK_N, b1), kb_hi)
    return kb_lo, b1, b2, kb_hi


@triton.jit
def _both_stages(start, pos, WINDOW, BLOCK_N: tl.constexpr):
    """Key blocks of rows that read All keys start <= j <= pos and Here the last WINDOW of them:
    both masked [kb_lo, b1), All only and whole for every row [b1, b2), both masked [b2, kb_hi)."""
    kb_lo, b1, _, kb_hi = _routed_stages(start, pos, BLOCK_N)
    b2 = tl.minimum(tl.maximum(tl.maximum(tl.min(pos, 0) - WINDOW + 1, 0) // BLOCK_N, b1), kb_hi)
    return kb_lo, b1, b2, kb_hi


@triton.jit
def _finite(x):
    """Elementwise: x is neither NaN nor +-inf."""
    return tl.abs(x) < float("inf")


@triton.jit
def _aha_bad_keys(V, BAD, stride_vb, stride_vh, stride_vn, HKV, NK, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """BAD [B * Hkv, NK] int8: 1 where the value row of a key holds a NaN or an inf, else 0.

    Computed once per forward, so that the attention loop never inspects values: a masked key
    block loads its flags, reads flagged value rows as 0 (0 * NaN would reach rows that do not
    read them) and marks the rows that do read one (their output is NaN, as in the reference).
    Grid: (cdiv(NK, BLOCK_R), B * Hkv)."""
    bh = tl.program_id(1)
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    base = V + (bh // HKV).to(tl.int64) * stride_vb + (bh % HKV).to(tl.int64) * stride_vh
    v = tl.load(base + j[:, None].to(tl.int64) * stride_vn + d[None, :], mask=(j[:, None] < NK) & (d[None, :] < HEAD_DIM),
                other=0.0)
    bad = tl.max(tl.where(_finite(v), 0, 1), 1)
    tl.store(BAD + bh.to(tl.int64) * NK + j, bad.to(tl.int8), mask=j < NK)
