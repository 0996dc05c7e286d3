"""Split-KV decode (flash-decoding) for a few queries against a long cache, forward only.

One program = one split of the keys of one (batch, kv head) group and a block of its
rows ``row = i * G + hl`` (all G query heads of the kv head: each key block is loaded once
for all of them). The keys a group reads are the union of its rows' ranges: All rows read
``start <= j <= pos``, Here rows only their window ``max(start, pos - window + 1) <= j <= pos``,
so a group whose rows are all Here reads about ``window`` keys and a group with an All row its
whole cache. That range is cut into SPLITS contiguous runs of key blocks, one per program.

Each program keeps two online-softmax states (All and Here; a soft gate value needs both) and
writes per row and branch its partial output and log-sum-exp (base 2); _aha_decode_merge
combines the splits (out = sum_s 2^(lse_s - lse) out_s) and mixes the branches by the gate.
A row that reads no key (a padding query, or a split outside its range) has lse -inf and
weighs nothing. Values with a NaN or an inf are zeroed before p @ V and the rows that read
them come out NaN (as in the reference); registers are plentiful here, so the check stays in
the loop and no pass over the whole cache is needed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from aha_triton._common import _finite, _row_coords, _seq_keys


@triton.jit
def _decode_step(state, s, seen, v, col_bad, PRECISION: tl.constexpr):
    """Fold one key block into a branch's online softmax (scores s [M, N] base 2; seen [M, N])."""
    acc, m, lsum, bad = state
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    bad = tl.maximum(bad, tl.max((seen & col_bad[None, :]).to(tl.int32), 1))
    return acc, m_new, lsum, bad


@triton.jit
def _decode_store(state, PART_O, PART_L, slot, valid, BLOCK_D: tl.constexpr):
    """A branch's partial result: out = acc / l (NaN where a read value was NaN/inf), lse2 (-inf: read nothing)."""
    acc, m, lsum, bad = state
    read = lsum != 0.0  # NaN (a NaN score) counts as read
    out = tl.where(bad[:, None] > 0, float("nan"), acc / tl.where(read, lsum, 1.0)[:, None])
    d = tl.arange(0, BLOCK_D)
    tl.store(PART_O + slot[:, None] * BLOCK_D + d[None, :], out, mask=valid[:, None])
    tl.store(PART_L + slot, tl.where(read, m + tl.log2(tl.where(read, lsum, 1.0)), float("-inf")), mask=valid)


@triton.jit
def _aha_decode_split(
    Q, K, V, GATE, PART_O, PART_L, SEQLENS, PADS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HKV, NQ, NK, WINDOW, SPLITS, PARTS, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, LEFTPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """PART_O [2, SPLITS, B * Hkv * G * Nq, BLOCK_D] float32 and PART_L [2, SPLITS, B * Hkv * G * Nq]:
    each split's All (0) and Here (1) partial outputs and lse2 (PARTS = B * Hkv * G * Nq).
    GATE [B, Hq, Nq] float32. Ragged: SEQLENS, PADS [B] int32 (VARLEN, LEFTPAD; see _common).
    Grid: (SPLITS, B * Hkv, row blocks)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)
    rows = G * NQ
    row = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = row < rows
    row = tl.minimum(row, rows - 1)
    k0, k1 = _seq_keys(SEQLENS, PADS, b, NK, VARLEN, LEFTPAD)
    i, hl, pos, start, token = _row_coords(row, bh, NQ, (k0, k1, SEQLENS, PADS), G, False)
    g = tl.load(GATE + token)
    reads = valid & (pos >= start)
    need_a = reads & (g > 0)
    need_h = reads & (g < 1)
    here_lo = tl.maximum(start, pos - WINDOW + 1)
    # the group's key blocks: the union of its rows' ranges, cut into SPLITS runs
    lo = tl.min(tl.where(need_a, start, tl.where(need_h, here_lo, NK)), 0)
    hi = tl.max(tl.where(need_a | need_h, pos + 1, 0), 0)
    kb_first = lo // BLOCK_N
    per_split = tl.cdiv(tl.maximum(tl.cdiv(hi, BLOCK_N) - kb_first, 0), SPLITS)
    kb_lo = kb_first + split * per_split
    kb_hi = tl.minimum(kb_lo + per_split, tl.cdiv(hi, BLOCK_N))
    here_from = tl.min(tl.where(need_h, here_lo, NK), 0)  # no Here row reads a key before this one
    any_a = tl.max(need_a.to(tl.int32), 0) > 0
    d = tl.arange(0, BLOCK_D)
    dmask = d[None, :] < HEAD_DIM
    q_ptr = Q + b * stride_qb + (kvh * G + hl)[:, None] * stride_qh + i[:, None].to(tl.int64) * stride_qn
    q = tl.load(q_ptr + d[None, :], mask=dmask, other=0.0)  # (M, D)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    state_a = (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
               tl.zeros([BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.int32))
    state_h = state_a
    for kb in range(kb_lo, kb_hi):
        j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = dmask & (j[:, None] < k1)
        k = tl.load(k_base + j[:, None].to(tl.int64) * stride_kn + d[None, :], mask=mask, other=0.0)
        v = tl.load(v_base + j[:, None].to(tl.int64) * stride_vn + d[None, :], mask=mask, other=0.0)
        col_bad = tl.max(tl.where(_finite(v), 0, 1), 1) > 0
        v = tl.where(col_bad[:, None], 0.0, v)  # 0 * NaN must not reach the rows that do not read it
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (M, N)
        inside = (j[None, :] >= start[:, None]) & (j[None, :] <= pos[:, None])
        if any_a:
            state_a = _decode_step(state_a, s, inside & need_a[:, None], v, col_bad, PRECISION)
        if kb * BLOCK_N + BLOCK_N > here_from:
            state_h = _decode_step(state_h, s, inside & need_h[:, None] & (j[None, :] >= here_lo[:, None]), v,
                                   col_bad, PRECISION)
    slot = split * PARTS + bh.to(tl.int64) * rows + row
    _decode_store(state_a, PART_O, PART_L, slot, valid, BLOCK_D)
    _decode_store(state_h, PART_O, PART_L, slot + SPLITS * PARTS, valid, BLOCK_D)


@triton.jit
def _merge_splits(PART_O, PART_L, r, first, SPLITS, PARTS, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One branch of rows r: its SPLITS partial results (slots first + split * PARTS + r) merged by lse2."""
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for split in range(SPLITS):
        slot = first + split * PARTS + r
        lse = tl.load(PART_L + slot)
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse - m_use)
        part = tl.load(PART_O + slot[:, None] * BLOCK_D + d[None, :])
        acc = acc * alpha[:, None] + w[:, None] * tl.where(lse[:, None] == float("-inf"), 0.0, part)
        lsum = lsum * alpha + w
        m = m_new
    return acc / tl.where(lsum != 0.0, lsum, 1.0)[:, None]


@triton.jit
def _aha_decode_merge(PART_O, PART_L, GATE, OUT, SPLITS, PARTS, NQ, G: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT [B, Hq, Nq, D]: the splits of each branch merged by their lse2, then mixed by the gate
    (selected where it is 0 or 1). Grid: (cdiv(PARTS, BLOCK_R),)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = r < PARTS
    r = tl.minimum(r, PARTS - 1).to(tl.int64)
    rows = G * NQ
    bh, row = r // rows, r % rows
    token = (bh * G + row % G) * NQ + row // G  # (b, h, i) of row i * G + hl
    out_a = _merge_splits(PART_O, PART_L, r, 0, SPLITS, PARTS, BLOCK_R, BLOCK_D)
    out_h = _merge_splits(PART_O, PART_L, r, SPLITS * PARTS, SPLITS, PARTS, BLOCK_R, BLOCK_D)
    g = tl.load(GATE + token)[:, None]
    out = tl.where(g == 1.0, out_a, tl.where(g == 0.0, out_h, g * out_a + (1.0 - g) * out_h))
    d = tl.arange(0, BLOCK_D)
    tl.store(OUT + token[:, None] * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
             mask=valid[:, None] & (d[None, :] < HEAD_DIM))
