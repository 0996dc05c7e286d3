"""Backward kernels: preprocessing, dk/dv per key block, dq per query block.

Per branch b in {All, Here} with weight w_b (g for All, 1 - g for Here) and
dO_b = w_b * dout, the flash backward is

    delta_b = rowsum(dO_b * O_b)                   (_aha_bwd_preprocess)
    p_b = exp2(s2 - lse2_b)   dp = dout . v
    ds = sum_b p_b * (w_b * dp - delta_b)          dv = sum_b (w_b * p_b)^T dout
    dk = scale * ds^T q       dq = scale * ds k    dgate = rowsum(dout * (O_All - O_Here))

Routed calls have one branch per token with weight 1. Terms are selected with
``where`` (never multiplied by a zero weight) so that a NaN of an unread key or
of an unselected branch stays out, as in the reference: scores q.k and dout.v use
the raw k and v (a row that reads a NaN gets NaN), while ds @ k, where rows that
do not read a key hold ds = 0, uses k with its NaN/inf entries zeroed.

dk/dv: one program per key block of one kv group, summing over the group's
query heads in a fixed order, so dk and dv are deterministic. dq: either its own
pass per query block (deterministic) or float32 atomics from the dk/dv pass
(FUSE_DQ: no second pass, but the summation order varies from run to run).

dk/dv visits, per key block, the query blocks that _index.dkdv_ranges lists (routed, and
BOTH with PACKED) or that it derives itself (BOTH): masked, whole, masked again. Rows that
read no key of the block (outside their sequence, padding queries) have p = ds = 0 there,
and padding queries load q = dout = 0, so keys outside every sequence get dk = dv = 0.

Bundles: ``src = (Q, DOUT, LSE, DELTA, GATE, q_base, stride_qh, stride_qn)``,
``dims = (bh, kvh, NQ, seq, WINDOW, TOKENS)`` with ``seq = (k0, k1, QPOS, QSTART)`` (the
program's row bounds, see _common), and the constexpr
``TILE = (HEAD_DIM, BLOCK_M|BLOCK_N, BLOCK_D, PRECISION)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from aha_triton._common import (
    _block_rows,
    _both_stages,
    _dense_block,
    _finite,
    _routed_stages,
    _row_coords,
    _segment,
    _seq_keys,
)
from aha_triton._fwd import _load_kv


@triton.jit
def _aha_bwd_preprocess(DOUT, OUT, BRANCHES, GATE, DELTA, DGATE, TOKENS,
                        HEAD_DIM: tl.constexpr, BOTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA [S, B, Hq, Nq] = delta_b per branch; DGATE [B, Hq, Nq] (BOTH only)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = r < TOKENS
    mask = rmask[:, None] & (d[None, :] < HEAD_DIM)
    ptr = r[:, None] * HEAD_DIM + d[None, :]
    do = tl.load(DOUT + ptr, mask=mask, other=0.0).to(tl.float32)
    if BOTH:
        o_a = tl.load(BRANCHES + ptr, mask=mask, other=0.0).to(tl.float32)
        o_h = tl.load(BRANCHES + (r + TOKENS)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GATE + r, mask=rmask, other=0.0)
        tl.store(DGATE + r, tl.sum(do * (o_a - o_h), 1), mask=rmask)
        tl.store(DELTA + r, tl.where(g > 0, g * tl.sum(do * o_a, 1), 0.0), mask=rmask)
        tl.store(DELTA + TOKENS + r, tl.where(g < 1, (1.0 - g) * tl.sum(do * o_h, 1), 0.0), mask=rmask)
    else:
        o = tl.load(OUT + ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + r, tl.sum(do * o, 1), mask=rmask)


@triton.jit
def _load_rows(src, dims, row, valid, G: tl.constexpr, PACKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """q and dout of a block's rows ([M, D], zero on padding slots and on queries that read no key),
    their positions, first keys and token indices."""
    Q, DOUT, LSE, DELTA, GATE, q_base, stride_qh, stride_qn = src
    i, hl, pos, start, token = _row_coords(row, dims[0], dims[2], dims[3], G, PACKED)
    d = tl.arange(0, BLOCK_D)
    mask = (valid & (pos >= start))[:, None] & (d[None, :] < HEAD_DIM)
    q_ptr = q_base + (dims[1] * G + hl)[:, None].to(tl.int64) * stride_qh + i[:, None].to(tl.int64) * stride_qn
    q = tl.load(q_ptr + d[None, :], mask=mask, other=0.0)
    do = tl.load(DOUT + token[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    return q, do, pos, start, token


@triton.jit
def _branch_p(s, lse, seen):
    """Probabilities exp2(s - lse) where seen, exactly 0 elsewhere."""
    return tl.where(seen, tl.exp2(s - lse), 0.0)


@triton.jit
def _dkdv_finish(dk, dv, dsT, wpT, q, do, k_safe, token, valid, DQ, scale, FUSE_DQ: tl.constexpr,
                 TILE: tl.constexpr):
    """dk += ds^T q, dv += (w p)^T dout, and with FUSE_DQ dq += scale * ds k by atomics
    (k_safe: k with NaN/inf zeroed, since ds = 0 for rows that do not read a key)."""
    dv = tl.dot(wpT.to(do.dtype), do, dv, input_precision=TILE[3])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=TILE[3])
    if FUSE_DQ:
        d = tl.arange(0, TILE[2])
        dq = tl.dot(tl.trans(dsT).to(k_safe.dtype), k_safe, input_precision=TILE[3]) * scale  # (M, D)
        tl.atomic_add(DQ + token[:, None] * TILE[0] + d[None, :], dq, mask=valid[:, None] & (d[None, :] < TILE[0]),
                      sem="relaxed")  # no ordering needed: dq is read after the kernel ends
    return dk, dv


@triton.jit
def _dkdv_routed(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, slot_lo, slot_hi, is_all, scale, scale_log2,
                 G: tl.constexpr, PACKED: tl.constexpr, MASKED: tl.constexpr, FUSE_DQ: tl.constexpr,
                 TILE: tl.constexpr):
    """One query block (row slots [slot_lo, slot_hi)) of one branch against the program's key block."""
    row, valid = _block_rows(ORDER_ROW, slot_lo, slot_hi, False, TILE[1])
    q, do, pos, start, token = _load_rows(src, dims, row, valid, G, PACKED, TILE[0], TILE[2])
    lse = tl.load(src[2] + token)
    delta = tl.load(src[3] + token)
    seen = valid[None, :]
    if MASKED:
        lo = tl.where(is_all == 1, start, tl.maximum(start, pos - dims[4] + 1))
        seen = seen & (j[:, None] >= lo[None, :]) & (j[:, None] <= pos[None, :])
    sT = tl.dot(k, tl.trans(q), input_precision=TILE[3]) * scale_log2  # (N, M)
    pT = _branch_p(sT, lse[None, :], seen)
    dpT = tl.dot(v, tl.trans(do), input_precision=TILE[3])  # (N, M)
    dsT = tl.where(seen, pT * (dpT - delta[None, :]), 0.0)
    return _dkdv_finish(dk, dv, dsT, pT, q, do, k_safe, token, valid, DQ, scale, FUSE_DQ, TILE)


@triton.jit
def _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, t_lo, t_hi, seg_lo, seg_hi, is_all,
                scale, scale_log2, G: tl.constexpr, PACKED: tl.constexpr, MASKED: tl.constexpr,
                FUSE_DQ: tl.constexpr, TILE: tl.constexpr):
    """Query blocks [t_lo, t_hi) of the routed segment holding row slots [seg_lo, seg_hi)."""
    for t in range(t_lo, t_hi):
        slot_lo = seg_lo + t * TILE[1]
        slot_hi = tl.minimum(slot_lo + TILE[1], seg_hi)
        dk, dv = _dkdv_routed(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, slot_lo, slot_hi, is_all,
                              scale, scale_log2, G, PACKED, MASKED, FUSE_DQ, TILE)
    return dk, dv


@triton.jit
def _dkdv_segment(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, rng, seg_lo, seg_hi, is_all,
                  scale, scale_log2, G: tl.constexpr, PACKED: tl.constexpr, TAIL: tl.constexpr,
                  FUSE_DQ: tl.constexpr, TILE: tl.constexpr):
    """The query blocks of one routed segment that touch the key block: rng = (t0, t1, t2, t3),
    [t1, t2) see the whole key block, [t0, t1) and [t2, t3) need a mask (TAIL=False: t2 = t3)."""
    dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, rng[0], rng[1], seg_lo, seg_hi, is_all,
                         scale, scale_log2, G, PACKED, True, FUSE_DQ, TILE)
    dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, rng[1], rng[2], seg_lo, seg_hi, is_all,
                         scale, scale_log2, G, PACKED, False, FUSE_DQ, TILE)
    if TAIL:
        dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, rng[2], rng[3], seg_lo, seg_hi,
                             is_all, scale, scale_log2, G, PACKED, True, FUSE_DQ, TILE)
    return dk, dv


@triton.jit
def _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t_lo, t_hi, scale, scale_log2,
               G: tl.constexpr, PACKED: tl.constexpr, HERE: tl.constexpr, FUSE_DQ: tl.constexpr,
               TILE: tl.constexpr):
    """Query blocks [t_lo, t_hi), both branches mixed by the gate. HERE=False: the key block lies
    wholly inside every row's All range and outside every window (All only, no mask)."""
    Q, DOUT, LSE, DELTA, GATE, q_base, stride_qh, stride_qn = src
    WINDOW, TOKENS = dims[4], dims[5]
    rows = G * dims[2]
    for t in range(t_lo, t_hi):
        slot_lo = t * TILE[1]
        row, valid = _block_rows(Q, slot_lo, tl.minimum(slot_lo + TILE[1], rows), True, TILE[1])  # ORDER unused
        q, do, pos, start, token = _load_rows(src, dims, row, valid, G, PACKED, TILE[0], TILE[2])
        g = tl.load(GATE + token)[None, :]
        sT = tl.dot(k, tl.trans(q), input_precision=TILE[3]) * scale_log2  # (N, M)
        dpT = tl.dot(v, tl.trans(do), input_precision=TILE[3])  # (N, M)
        seen_a = valid[None, :] & (g > 0)
        if HERE:
            reads = (j[:, None] >= start[None, :]) & (j[:, None] <= pos[None, :])  # inside the All range
            seen_a = seen_a & reads
        p_a = _branch_p(sT, tl.load(LSE + token)[None, :], seen_a)
        dsT = tl.where(seen_a, p_a * (g * dpT - tl.load(DELTA + token)[None, :]), 0.0)
        wpT = g * p_a
        if HERE:
            seen_h = valid[None, :] & (g < 1) & reads & (j[:, None] > pos[None, :] - WINDOW)
            p_h = _branch_p(sT, tl.load(LSE + TOKENS + token)[None, :], seen_h)
            dsT += tl.where(seen_h, p_h * ((1.0 - g) * dpT - tl.load(DELTA + TOKENS + token)[None, :]), 0.0)
            wpT += (1.0 - g) * p_h
        dk, dv = _dkdv_finish(dk, dv, dsT, wpT, q, do, k_safe, token, valid, DQ, scale, FUSE_DQ, TILE)
    return dk, dv


@triton.jit
def _both_key_block_visits(kb, k0, off, NK, WINDOW, rows, G: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """The dense query blocks (natural row order, queries at off + i, keys from k0) that touch key
    block kb: masked [t0, t1), whole and All only [t1, t2), t2 = t3 = the last block + 1."""
    kb_first = kb * BLOCK_N
    # the block's last key slot (not clamped to the row's length: a block that reaches past it stays masked)
    kb_last = tl.minimum(kb_first + BLOCK_N, NK) - 1
    nblk = tl.cdiv(rows, BLOCK_M)
    t0 = tl.minimum((tl.maximum(kb_first - off, 0) * G) // BLOCK_M, nblk)  # first block reaching kb
    t1 = tl.cdiv(tl.maximum(kb_last + WINDOW - off, 0) * G, BLOCK_M)  # first block whose windows all start later
    t1 = tl.minimum(tl.maximum(t1, t0), nblk)
    t0 = tl.where(kb_last < k0, nblk, t0)  # the key block is all left padding: nobody reads it
    t1 = tl.where(kb_first < k0, nblk, t1)  # it straddles the row's first key: every block is masked
    return t0, tl.maximum(t1, t0), nblk, nblk


@triton.jit
def _aha_bwd_dkdv(
    Q, K, V, DOUT, GATE, LSE, DELTA, ORDER, NALL, RANGES, DK, DV, DQ, SEQLENS, PADS, QPOS, QSTART,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HKV, NQ, NK, WINDOW, TOKENS, scale, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BOTH: tl.constexpr, FUSE_DQ: tl.constexpr,
    VARLEN: tl.constexpr, LEFTPAD: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """DK, DV [B, Hkv, Nk, D]. Grid: (key blocks, B * Hkv). RANGES [B * Hkv, key blocks, 8]
    (routed, and BOTH under PACKED; see _index.dkdv_ranges). Keys past a row's length (VARLEN)
    load as 0; keys that no query reads (before cache_leftpad, sequences without queries) get dk = dv = 0."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)
    rows = G * NQ
    k0, nk = _seq_keys(SEQLENS, PADS, b, NK, VARLEN, LEFTPAD)
    kv = (K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, nk)
    k, v, j = _load_kv(kv, kb, True, (HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION))
    k_safe = tl.where(_finite(k), k, 0.0)  # for ds @ k: 0 * NaN must not reach rows that do not read a key
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    src = (Q, DOUT, LSE, DELTA, GATE, Q + b * stride_qb, stride_qh, stride_qn)
    dims = (bh, kvh, NQ, (k0, nk, QPOS, QSTART), WINDOW, TOKENS)
    TILE: tl.constexpr = (HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
    rng = RANGES + (bh.to(tl.int64) * tl.num_programs(0) + kb) * 8
    if BOTH:
        if PACKED:
            t0, t1, t2, t3 = tl.load(rng), tl.load(rng + 1), tl.load(rng + 2), tl.load(rng + 3)
        else:
            t0, t1, t2, t3 = _both_key_block_visits(kb, k0, nk - NQ, NK, WINDOW, rows, G, BLOCK_M, BLOCK_N)
        # [t1, t2): the key block lies inside every row's All range and below every window
        dk, dv = _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t0, t1, scale, scale_log2, G, PACKED, True,
                            FUSE_DQ, TILE)
        dk, dv = _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t1, t2, scale, scale_log2, G, PACKED, False,
                            FUSE_DQ, TILE)
        if PACKED:  # else t2 = t3
            dk, dv = _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t2, t3, scale, scale_log2, G, PACKED, True,
                                FUSE_DQ, TILE)
    else:
        order_row = ORDER + bh.to(tl.int64) * rows
        n_all = tl.load(NALL + bh)
        a_rng = (tl.load(rng), tl.load(rng + 1), tl.load(rng + 2), tl.load(rng + 3))
        h_rng = (tl.load(rng + 4), tl.load(rng + 5), tl.load(rng + 6), tl.load(rng + 7))
        # All rows that start at key 0 see every key block up to their positions: no masked tail
        dk, dv = _dkdv_segment(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, a_rng, 0, n_all, 1,
                               scale, scale_log2, G, PACKED, LEFTPAD or PACKED, FUSE_DQ, TILE)
        dk, dv = _dkdv_segment(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, h_rng, n_all, rows, 0,
                               scale, scale_log2, G, PACKED, True, FUSE_DQ, TILE)
    d = tl.arange(0, BLOCK_D)
    mask = (j[:, None] < NK) & (d[None, :] < HEAD_DIM)
    out = (b * HKV + kvh) * NK * HEAD_DIM + j[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_stage(dq, q, do, stats, kv, kb_lo, kb_hi, lo, pos, WINDOW, scale_log2,
              MASKED: tl.constexpr, BOTH: tl.constexpr, HERE: tl.constexpr, TILE: tl.constexpr):
    """dq over key blocks [kb_lo, kb_hi). stats = (lse, delta, g, lse_h, delta_h).
    Routed: one branch, rows read lo <= j <= pos. BOTH: All (lo = the row's first key) weighted
    by g, plus Here when HERE."""
    lse, delta, g, lse_h, delta_h = stats
    for kb in range(kb_lo, kb_hi):
        k, v, j = _load_kv(kv, kb, MASKED, TILE)
        s = tl.dot(q, tl.trans(k), input_precision=TILE[3]) * scale_log2  # (M, N)
        dp = tl.dot(do, tl.trans(v), input_precision=TILE[3])  # (M, N)
        reads = (j[None, :] >= lo[:, None]) & (j[None, :] <= pos[:, None])
        if BOTH:
            seen = g > 0
            if MASKED:
                seen = seen & reads
            ds = tl.where(seen, _branch_p(s, lse[:, None], seen) * (g * dp - delta[:, None]), 0.0)
            if HERE:
                seen_h = (g < 1) & reads & (j[None, :] > pos[:, None] - WINDOW)
                ds += tl.where(seen_h, _branch_p(s, lse_h[:, None], seen_h) * ((1.0 - g) * dp - delta_h[:, None]), 0.0)
        elif MASKED:
            seen = reads
            ds = tl.where(seen, _branch_p(s, lse[:, None], seen) * (dp - delta[:, None]), 0.0)
        else:
            ds = tl.exp2(s - lse[:, None]) * (dp - delta[:, None])
        if MASKED or BOTH:  # some rows do not read some keys: their ds is 0, and 0 * NaN must stay out
            k = tl.where(_finite(k), k, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=TILE[3])
    return dq


@triton.jit
def _aha_bwd_dq(
    Q, K, V, DOUT, GATE, LSE, DELTA, ORDER, NALL, DQ, SEQLENS, PADS, QPOS, QSTART,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HKV, NQ, NK, WINDOW, TOKENS, scale, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BOTH: tl.constexpr,
    VARLEN: tl.constexpr, LEFTPAD: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """DQ [B, Hq, Nq, D]: one program per query block, visiting the key blocks as the forward does."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)
    rows = G * NQ
    if BOTH:
        start, end, is_all = _dense_block(t, rows, BLOCK_M)
    else:
        start, end, is_all = _segment(t, tl.load(NALL + bh), rows, BLOCK_M)
    if start >= end:
        return
    row, valid = _block_rows(ORDER + bh.to(tl.int64) * rows, start, end, BOTH, BLOCK_M)
    src = (Q, DOUT, LSE, DELTA, GATE, Q + b * stride_qb, stride_qh, stride_qn)
    k0, nk = _seq_keys(SEQLENS, PADS, b, NK, VARLEN, LEFTPAD)
    dims = (bh, kvh, NQ, (k0, nk, QPOS, QSTART), WINDOW, TOKENS)
    q, do, pos, start, token = _load_rows(src, dims, row, valid, G, PACKED, HEAD_DIM, BLOCK_D)
    kv = (K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, nk)
    TILE: tl.constexpr = (HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    lse = tl.load(LSE + token)
    delta = tl.load(DELTA + token)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BOTH:
        stats = (lse, delta, tl.load(GATE + token)[:, None], tl.load(LSE + TOKENS + token),
                 tl.load(DELTA + TOKENS + token))
        kb_lo, b1, b2, kb_hi = _both_stages(start, pos, WINDOW, BLOCK_N)
        if LEFTPAD or PACKED:  # [kb_lo, b1) is empty when every row starts at key 0
            dq = _dq_stage(dq, q, do, stats, kv, kb_lo, b1, start, pos, WINDOW, scale_log2, True, True, True, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, b1, b2, start, pos, WINDOW, scale_log2, False, True, False, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, b2, kb_hi, start, pos, WINDOW, scale_log2, True, True, True, TILE)
    else:
        stats = (lse, delta, lse, lse, delta)  # the last three are unused
        lo = tl.where(is_all == 1, start, tl.maximum(start, pos - WINDOW + 1))
        kb_lo, b1, b2, kb_hi = _routed_stages(lo, pos, BLOCK_N)
        dq = _dq_stage(dq, q, do, stats, kv, kb_lo, b1, lo, pos, WINDOW, scale_log2, True, False, False, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, b1, b2, lo, pos, WINDOW, scale_log2, False, False, False, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, b2, kb_hi, lo, pos, WINDOW, scale_log2, True, False, False, TILE)
    d = tl.arange(0, BLOCK_D)
    tl.store(DQ + token[:, None] * HEAD_DIM + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=valid[:, None] & (d[None, :] < HEAD_DIM))
