"""Forward kernel: flash attention (online softmax in float32, exp2) with the routing fused in.

One program = one query block of one (batch, kv head) group. Its rows all take
one branch (routed) or both (BOTH), and it visits only the key blocks that the
union of its rows' key ranges touches, in up to three stages (_common._routed_stages):

    masked  [kb_lo, b1)   some row's range (window, sequence) starts inside these blocks
    full    [b1, b2)      every row sees every key: no mask, no NaN guard
    masked  [b2, kb_hi)   the causal edge

BOTH (_common._both_stages): both branches, masked, on [kb_lo, b1) and [b2, kb_hi);
All alone on [b1, b2), below every row's window. A row that reads no key (a padding
query of a left-padded row) ends with l = 0: its output is 0 and its lse2 +inf.

NaN safety: value rows that hold a NaN or an inf are flagged once per call
(_common._aha_bad_keys: BAD per key, BADCOUNT its prefix sums), never inspected in the
loop. In masked blocks, scores outside a row's range become -inf and flagged value rows
load as 0 (0 * NaN would leak into rows that do not read them); in full blocks every row
reads every key. A row whose key range holds a flagged key (two loads of BADCOUNT per row)
comes out NaN, as in the reference.

Bundles passed to the helpers: ``kv = (k_base, v_base, stride_kn, stride_vn, NK, bad_base)``
(NK: the keys of this program's batch row, L_b under VARLEN; masked loads stop there; its row of BAD),
``TILE = (HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)`` (constexpr) and the softmax
state ``(acc, m, lsum)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from aha_triton._common import (
    _block_rows,
    _both_stages,
    _dense_block,
    _routed_stages,
    _row_coords,
    _segment,
    _seq_keys,
)


@triton.jit
def _load_kv(kv, kb, MASKED: tl.constexpr, TILE: tl.constexpr, ZERO_BAD: tl.constexpr = False):
    """Key block kb: k [N, D], v [N, D] and key positions j [N]. With ZERO_BAD (the forward's masked
    blocks) the value rows of keys flagged in BAD (a NaN or an inf, see _common._aha_bad_keys) load as 0;
    kv[5] is then the program's row of BAD (kv holds 5 entries otherwise)."""
    k_base, v_base, stride_kn, stride_vn, NK = kv[0], kv[1], kv[2], kv[3], kv[4]
    j = kb * TILE[1] + tl.arange(0, TILE[1])
    d = tl.arange(0, TILE[2])
    mask = d[None, :] < TILE[0]
    if MASKED:
        mask = mask & (j[:, None] < NK)
    k = tl.load(k_base + j[:, None].to(tl.int64) * stride_kn + d[None, :], mask=mask, other=0.0)
    if MASKED and ZERO_BAD:
        mask = mask & (tl.load(kv[5] + j, mask=j < NK, other=0) == 0)[:, None]
    v = tl.load(v_base + j[:, None].to(tl.int64) * stride_vn + d[None, :], mask=mask, other=0.0)
    return k, v, j


@triton.jit
def _softmax_step(state, s, v, PRECISION: tl.constexpr):
    """Fold one key block (scores s [M, N] in base 2, -inf = unseen) into the online softmax."""
    acc, m, lsum = state
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, lsum


@triton.jit
def _reads_bad(count_base, lo, pos, NK):
    """[M] bool: the row reads (keys lo <= j <= pos) a key whose value holds a NaN or an inf.
    count_base: the program's row of BADCOUNT, the number of such keys before each key (NK + 1)."""
    hi = tl.minimum(tl.maximum(pos + 1, 0), NK)
    first = tl.minimum(tl.maximum(lo, 0), hi)
    return tl.load(count_base + hi) > tl.load(count_base + first)


@triton.jit
def _init_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    return acc, m, tl.zeros([BLOCK_M], dtype=tl.float32)


@triton.jit
def _fwd_stage(state, q, kv, kb_lo, kb_hi, lo, pos, scale_log2, MASKED: tl.constexpr, TILE: tl.constexpr):
    """One branch over key blocks [kb_lo, kb_hi); rows read keys lo <= j <= pos."""
    for kb in range(kb_lo, kb_hi):
        k, v, j = _load_kv(kv, kb, MASKED, TILE, True)
        s = tl.dot(q, tl.trans(k), input_precision=TILE[3]) * scale_log2  # (M, N)
        if MASKED:
            s = tl.where((j[None, :] >= lo[:, None]) & (j[None, :] <= pos[:, None]), s, float("-inf"))
        state = _softmax_step(state, s, v, TILE[3])
    return state


@triton.jit
def _fwd_stage_both(state_a, state_h, q, kv, kb_lo, kb_hi, start, pos, WINDOW, scale_log2, TILE: tl.constexpr):
    """All and Here together over key blocks [kb_lo, kb_hi), masked: one q.k for both branches."""
    for kb in range(kb_lo, kb_hi):
        k, v, j = _load_kv(kv, kb, True, TILE, True)
        s = tl.dot(q, tl.trans(k), input_precision=TILE[3]) * scale_log2  # (M, N)
        seen_a = (j[None, :] >= start[:, None]) & (j[None, :] <= pos[:, None])
        state_a = _softmax_step(state_a, tl.where(seen_a, s, float("-inf")), v, TILE[3])
        seen_h = seen_a & (j[None, :] > pos[:, None] - WINDOW)
        state_h = _softmax_step(state_h, tl.where(seen_h, s, float("-inf")), v, TILE[3])
    return state_a, state_h


@triton.jit
def _finish(state, bad):
    """Normalised branch output [M, D] (NaN where the row read a NaN/inf value: ``bad``) and its lse2 [M].

    A row that read no key (l = 0, acc = 0) gets 0 and lse2 = +inf, so that exp2(s - lse2) = 0."""
    acc, m, lsum = state
    read = lsum != 0.0  # NaN (a row that read a NaN score) counts as read: its lse2 is NaN, as its gradients
    lsafe = tl.where(read, lsum, 1.0)
    out = tl.where(bad[:, None], float("nan"), acc / lsafe[:, None])
    return out, tl.where(read, m + tl.log2(lsafe), float("inf"))


@triton.jit
def _aha_fwd(
    Q, K, V, BAD, BADCOUNT, GATE, ORDER, NALL, OUT, LSE, BRANCHES, SEQLENS, PADS, QPOS, QSTART,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HKV, NQ, NK, WINDOW, TOKENS, scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BOTH: tl.constexpr, STORE_BRANCHES: tl.constexpr, SKIP: tl.constexpr,
    VARLEN: tl.constexpr, LEFTPAD: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT [B, Hq, Nq, D]; LSE [S, B, Hq, Nq] base 2 (S = 1 routed: the selected branch;
    S = 2 BOTH: All, Here); BRANCHES [2, B, Hq, Nq, D] = All, Here when STORE_BRANCHES.
    Routed: ORDER [B * Hkv, G * Nq], NALL [B * Hkv] int32 (see _index). BOTH with SKIP: NALL [B * Hkv]
    says which groups to compute (not 0), the others return at once.
    TOKENS = B * Hq * Nq. GATE [B, Hq, Nq] float32 (BOTH only). BAD [B * Hkv, NK] int8 and
    BADCOUNT [B * Hkv, NK + 1] int32: the keys whose values hold a NaN/inf, and their prefix counts. Ragged (see _common): SEQLENS [B]
    int32 (VARLEN), PADS [B] int32 (LEFTPAD), QPOS, QSTART [Nq] int32 (PACKED). Grid: (query blocks, B * Hkv)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = (bh % HKV).to(tl.int64)
    rows = G * NQ
    if BOTH:
        start, end, is_all = _dense_block(t, rows, BLOCK_M)
        if SKIP:  # a second launch after a routed one: only the groups that hold a soft gate value
            end = tl.where(tl.load(NALL + bh) != 0, end, start)
    else:
        start, end, is_all = _segment(t, tl.load(NALL + bh), rows, BLOCK_M)
    if start >= end:
        return
    row, valid = _block_rows(ORDER + bh.to(tl.int64) * rows, start, end, BOTH, BLOCK_M)
    k0, nk = _seq_keys(SEQLENS, PADS, b, NK, VARLEN, LEFTPAD)
    i, hl, pos, start, token = _row_coords(row, bh, NQ, (k0, nk, QPOS, QSTART), G, PACKED)
    d = tl.arange(0, BLOCK_D)
    dmask = d[None, :] < HEAD_DIM
    q_ptr = Q + b * stride_qb + (kvh * G + hl)[:, None] * stride_qh + i[:, None].to(tl.int64) * stride_qn
    q = tl.load(q_ptr + d[None, :], mask=dmask, other=0.0)  # (M, D)
    count_base = BADCOUNT + bh.to(tl.int64) * (NK + 1)
    kv = (K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, nk,
          BAD + bh.to(tl.int64) * NK)
    TILE: tl.constexpr = (HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    out_ptr = token[:, None] * HEAD_DIM + d[None, :]
    store_mask = valid[:, None] & dmask
    if BOTH:
        kb_lo, b1, b2, kb_hi = _both_stages(start, pos, WINDOW, BLOCK_N)
        state_a, state_h = _init_state(BLOCK_M, BLOCK_D), _init_state(BLOCK_M, BLOCK_D)
        if LEFTPAD or PACKED:  # [kb_lo, b1) is empty when every row starts at key 0
            state_a, state_h = _fwd_stage_both(state_a, state_h, q, kv, kb_lo, b1, start, pos, WINDOW, scale_log2, TILE)
        state_a = _fwd_stage(state_a, q, kv, b1, b2, start, pos, scale_log2, False, TILE)
        state_a, state_h = _fwd_stage_both(state_a, state_h, q, kv, b2, kb_hi, start, pos, WINDOW, scale_log2, TILE)
        out_a, lse_a = _finish(state_a, _reads_bad(count_base, start, pos, NK))
        out_h, lse_h = _finish(state_h, _reads_bad(count_base, tl.maximum(start, pos - WINDOW + 1), pos, NK))
        g = tl.load(GATE + token)[:, None]
        out = tl.where(g == 1.0, out_a, tl.where(g == 0.0, out_h, g * out_a + (1.0 - g) * out_h))
        tl.store(OUT + out_ptr, out.to(OUT.dtype.element_ty), mask=store_mask)
        if STORE_BRANCHES:
            tl.store(BRANCHES + out_ptr, out_a.to(BRANCHES.dtype.element_ty), mask=store_mask)
            here_ptr = (token + TOKENS)[:, None] * HEAD_DIM + d[None, :]
            tl.store(BRANCHES + here_ptr, out_h.to(BRANCHES.dtype.element_ty), mask=store_mask)
            tl.store(LSE + token, lse_a, mask=valid)
            tl.store(LSE + TOKENS + token, lse_h, mask=valid)
    else:
        lo = tl.where(is_all == 1, start, tl.maximum(start, pos - WINDOW + 1))  # first key of each row
        kb_lo, b1, b2, kb_hi = _routed_stages(lo, pos, BLOCK_N)
        state = _fwd_stage(_init_state(BLOCK_M, BLOCK_D), q, kv, kb_lo, b1, lo, pos, scale_log2, True, TILE)
        state = _fwd_stage(state, q, kv, b1, b2, lo, pos, scale_log2, False, TILE)
        state = _fwd_stage(state, q, kv, b2, kb_hi, lo, pos, scale_log2, True, TILE)
        out, lse = _finish(state, _reads_bad(count_base, lo, pos, NK))
        tl.store(OUT + out_ptr, out.to(OUT.dtype.element_ty), mask=store_mask)
        tl.store(LSE + token, lse, mask=valid)
