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

Bundles: ``src = (Q, DOUT, LSE, DELTA, GATE, q_base, stride_qh, stride_qn)``,
``dims = (bh, kvh, NQ, NK, WINDOW, TOKENS)``, and the constexpr
``TILE = (HEAD_DIM, BLOCK_M|BLOCK_N, BLOCK_D, PRECISION)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from aha_triton._common import _block_rows, _dense_block, _finite, _row_coords, _segment
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
def _load_rows(src, dims, row, valid, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """q and dout of a block's rows ([M, D], zero on padding slots), their positions and token indices."""
    Q, DOUT, LSE, DELTA, GATE, q_base, stride_qh, stride_qn = src
    bh, kvh, NQ, NK, WINDOW, TOKENS = dims
    i, hl, pos, token = _row_coords(row, bh, NQ, NK, G)
    d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d[None, :] < HEAD_DIM)
    q_ptr = q_base + (kvh * G + hl)[:, None].to(tl.int64) * stride_qh + i[:, None].to(tl.int64) * stride_qn
    q = tl.load(q_ptr + d[None, :], mask=mask, other=0.0)
    do = tl.load(DOUT + token[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    return q, do, pos, token


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
        tl.atomic_add(DQ + token[:, None] * TILE[0] + d[None, :], dq, mask=valid[:, None] & (d[None, :] < TILE[0]))
    return dk, dv


@triton.jit
def _dkdv_routed(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, start, end, is_all, scale, scale_log2,
                 G: tl.constexpr, MASKED: tl.constexpr, FUSE_DQ: tl.constexpr, TILE: tl.constexpr):
    """One query block of one branch against the program's key block."""
    row, valid = _block_rows(ORDER_ROW, start, end, False, TILE[1])
    q, do, pos, token = _load_rows(src, dims, row, valid, G, TILE[0], TILE[2])
    lse = tl.load(src[2] + token)
    delta = tl.load(src[3] + token)
    seen = valid[None, :]
    if MASKED:
        lo = tl.where(is_all == 1, 0, pos - dims[4] + 1)
        seen = seen & (j[:, None] >= lo[None, :]) & (j[:, None] <= pos[None, :])
    sT = tl.dot(k, tl.trans(q), input_precision=TILE[3]) * scale_log2  # (N, M)
    pT = _branch_p(sT, lse[None, :], seen)
    dpT = tl.dot(v, tl.trans(do), input_precision=TILE[3])  # (N, M)
    dsT = tl.where(seen, pT * (dpT - delta[None, :]), 0.0)
    return _dkdv_finish(dk, dv, dsT, pT, q, do, k_safe, token, valid, DQ, scale, FUSE_DQ, TILE)


@triton.jit
def _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, t_lo, t_hi, seg_lo, seg_hi, is_all,
                scale, scale_log2, G: tl.constexpr, MASKED: tl.constexpr, FUSE_DQ: tl.constexpr, TILE: tl.constexpr):
    """Query blocks [t_lo, t_hi) of the routed segment holding row slots [seg_lo, seg_hi)."""
    for t in range(t_lo, t_hi):
        start = seg_lo + t * TILE[1]
        end = tl.minimum(start + TILE[1], seg_hi)
        dk, dv = _dkdv_routed(dk, dv, k, v, k_safe, j, src, dims, ORDER_ROW, DQ, start, end, is_all,
                              scale, scale_log2, G, MASKED, FUSE_DQ, TILE)
    return dk, dv


@triton.jit
def _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t_lo, t_hi, scale, scale_log2,
               G: tl.constexpr, HERE: tl.constexpr, FUSE_DQ: tl.constexpr, TILE: tl.constexpr):
    """Query blocks [t_lo, t_hi), both branches mixed by the gate. HERE=False: the key block lies
    wholly inside every row's causal range and outside every window (All only, no mask)."""
    Q, DOUT, LSE, DELTA, GATE, q_base, stride_qh, stride_qn = src
    WINDOW, TOKENS = dims[4], dims[5]
    rows = G * dims[2]
    for t in range(t_lo, t_hi):
        start = t * TILE[1]
        row, valid = _block_rows(Q, start, tl.minimum(start + TILE[1], rows), True, TILE[1])  # ORDER unused
        q, do, pos, token = _load_rows(src, dims, row, valid, G, TILE[0], TILE[2])
        g = tl.load(GATE + token)[None, :]
        sT = tl.dot(k, tl.trans(q), input_precision=TILE[3]) * scale_log2  # (N, M)
        dpT = tl.dot(v, tl.trans(do), input_precision=TILE[3])  # (N, M)
        seen_a = valid[None, :] & (g > 0)
        if HERE:
            causal = j[:, None] <= pos[None, :]
            seen_a = seen_a & causal
        p_a = _branch_p(sT, tl.load(LSE + token)[None, :], seen_a)
        dsT = tl.where(seen_a, p_a * (g * dpT - tl.load(DELTA + token)[None, :]), 0.0)
        wpT = g * p_a
        if HERE:
            seen_h = valid[None, :] & (g < 1) & causal & (j[:, None] > pos[None, :] - WINDOW)
            p_h = _branch_p(sT, tl.load(LSE + TOKENS + token)[None, :], seen_h)
            dsT += tl.where(seen_h, p_h * ((1.0 - g) * dpT - tl.load(DELTA + TOKENS + token)[None, :]), 0.0)
            wpT += (1.0 - g) * p_h
        dk, dv = _dkdv_finish(dk, dv, dsT, wpT, q, do, k_safe, token, valid, DQ, scale, FUSE_DQ, TILE)
    return dk, dv


@triton.jit
def _aha_bwd_dkdv(
    Q, K, V, DOUT, GATE, LSE, DELTA, ORDER, NALL, RANGES, DK, DV, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HKV, NQ, NK, WINDOW, TOKENS, scale, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BOTH: tl.constexpr, FUSE_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """DK, DV [B, Hkv, Nk, D]. Grid: (key blocks, B * Hkv). RANGES [B * Hkv, key blocks, 8] (routed)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)
    rows = G * NQ
    kv = (K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, NK)
    k, v, j = _load_kv(kv, kb, True, (HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION))
    k_safe = tl.where(_finite(k), k, 0.0)  # for ds @ k: 0 * NaN must not reach rows that do not read a key
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    src = (Q, DOUT, LSE, DELTA, GATE, Q + b * stride_qb, stride_qh, stride_qn)
    dims = (bh, kvh, NQ, NK, WINDOW, TOKENS)
    TILE: tl.constexpr = (HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
    if BOTH:
        off = NK - NQ
        kb_last = tl.minimum(kb * BLOCK_N + BLOCK_N, NK) - 1
        nblk = tl.cdiv(rows, BLOCK_M)
        t0 = tl.minimum((tl.maximum(kb * BLOCK_N - off, 0) * G) // BLOCK_M, nblk)  # first block reaching kb
        t_h = tl.cdiv(tl.maximum(kb_last + WINDOW - off, 0) * G, BLOCK_M)  # first block whose windows all start later
        t_h = tl.minimum(tl.maximum(t_h, t0), nblk)
        dk, dv = _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t0, t_h, scale, scale_log2, G, True,
                            FUSE_DQ, TILE)
        dk, dv = _dkdv_both(dk, dv, k, v, k_safe, j, src, dims, DQ, t_h, nblk, scale, scale_log2, G, False,
                            FUSE_DQ, TILE)
    else:
        order_row = ORDER + bh.to(tl.int64) * rows
        n_all = tl.load(NALL + bh)
        rng = RANGES + (bh.to(tl.int64) * tl.num_programs(0) + kb) * 8
        a0, a1 = tl.load(rng), tl.load(rng + 1)
        h0, h1, h2, h3 = tl.load(rng + 2), tl.load(rng + 3), tl.load(rng + 4), tl.load(rng + 5)
        # All blocks: [a0, a1) straddle the causal edge, [a1, end) see the whole key block
        dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, a0, a1, 0, n_all, 1,
                             scale, scale_log2, G, True, FUSE_DQ, TILE)
        dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, a1, tl.cdiv(n_all, BLOCK_M), 0,
                             n_all, 1, scale, scale_log2, G, False, FUSE_DQ, TILE)
        # Here blocks: [h1, h2) see the whole key block, the others straddle a window edge
        dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, h0, h1, n_all, rows, 0,
                             scale, scale_log2, G, True, FUSE_DQ, TILE)
        dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, h1, h2, n_all, rows, 0,
                             scale, scale_log2, G, False, FUSE_DQ, TILE)
        dk, dv = _dkdv_stage(dk, dv, k, v, k_safe, j, src, dims, order_row, DQ, h2, h3, n_all, rows, 0,
                             scale, scale_log2, G, True, FUSE_DQ, TILE)
    d = tl.arange(0, BLOCK_D)
    mask = (j[:, None] < NK) & (d[None, :] < HEAD_DIM)
    out = (b * HKV + kvh) * NK * HEAD_DIM + j[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_stage(dq, q, do, stats, kv, kb_lo, kb_hi, lo, pos, WINDOW, scale_log2,
              MASKED: tl.constexpr, BOTH: tl.constexpr, HERE: tl.constexpr, TILE: tl.constexpr):
    """dq over key blocks [kb_lo, kb_hi). stats = (lse, delta, g, lse_h, delta_h).
    Routed: one branch, rows read lo <= j <= pos. BOTH: All weighted by g, plus Here when HERE."""
    lse, delta, g, lse_h, delta_h = stats
    for kb in range(kb_lo, kb_hi):
        k, v, j = _load_kv(kv, kb, MASKED, TILE)
        s = tl.dot(q, tl.trans(k), input_precision=TILE[3]) * scale_log2  # (M, N)
        dp = tl.dot(do, tl.trans(v), input_precision=TILE[3])  # (M, N)
        causal = j[None, :] <= pos[:, None]
        if BOTH:
            seen = g > 0
            if MASKED:
                seen = seen & causal
            ds = tl.where(seen, _branch_p(s, lse[:, None], seen) * (g * dp - delta[:, None]), 0.0)
            if HERE:
                seen_h = (g < 1) & causal & (j[None, :] > pos[:, None] - WINDOW)
                ds += tl.where(seen_h, _branch_p(s, lse_h[:, None], seen_h) * ((1.0 - g) * dp - delta_h[:, None]), 0.0)
        elif MASKED:
            seen = causal & (j[None, :] >= lo[:, None])
            ds = tl.where(seen, _branch_p(s, lse[:, None], seen) * (dp - delta[:, None]), 0.0)
        else:
            ds = tl.exp2(s - lse[:, None]) * (dp - delta[:, None])
        if MASKED or BOTH:  # some rows do not read some keys: their ds is 0, and 0 * NaN must stay out
            k = tl.where(_finite(k), k, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=TILE[3])
    return dq


@triton.jit
def _aha_bwd_dq(
    Q, K, V, DOUT, GATE, LSE, DELTA, ORDER, NALL, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HKV, NQ, NK, WINDOW, TOKENS, scale, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BOTH: tl.constexpr,
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
    q, do, pos, token = _load_rows(src, (bh, kvh, NQ, NK, WINDOW, TOKENS), row, valid, G, HEAD_DIM, BLOCK_D)
    kv = (K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, NK)
    TILE: tl.constexpr = (HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    lse = tl.load(LSE + token)
    delta = tl.load(DELTA + token)
    pos_first = tl.min(pos, 0)
    kb_hi = tl.cdiv(tl.max(pos, 0) + 1, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BOTH:
        stats = (lse, delta, tl.load(GATE + token)[:, None], tl.load(LSE + TOKENS + token),
                 tl.load(DELTA + TOKENS + token))
        kb_h = tl.maximum(pos_first - WINDOW + 1, 0) // BLOCK_N
        dq = _dq_stage(dq, q, do, stats, kv, 0, kb_h, pos, pos, WINDOW, scale_log2, False, True, False, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, kb_h, kb_hi, pos, pos, WINDOW, scale_log2, True, True, True, TILE)
    else:
        stats = (lse, delta, lse, lse, delta)  # the last three are unused
        lo = tl.where(is_all == 1, 0, pos - WINDOW + 1)
        kb_lo = tl.maximum(tl.min(lo, 0), 0) // BLOCK_N
        b1 = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(tl.max(lo, 0), 0), BLOCK_N), kb_lo), kb_hi)
        b2 = tl.minimum(tl.maximum((pos_first + 1) // BLOCK_N, b1), kb_hi)
        dq = _dq_stage(dq, q, do, stats, kv, kb_lo, b1, lo, pos, WINDOW, scale_log2, True, False, False, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, b1, b2, lo, pos, WINDOW, scale_log2, False, False, False, TILE)
        dq = _dq_stage(dq, q, do, stats, kv, b2, kb_hi, lo, pos, WINDOW, scale_log2, True, False, False, TILE)
    d = tl.arange(0, BLOCK_D)
    tl.store(DQ + token[:, None] * HEAD_DIM + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=valid[:, None] & (d[None, :] < HEAD_DIM))
