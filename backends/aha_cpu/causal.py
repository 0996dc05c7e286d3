"""The All branch on the CPU: causal attention for every query, or for compacted All tokens.

Dense key tiles go through torch's fused CPU flash-attention kernel, which keeps
a running max and sum in float32 and returns each row's log-sum-exp. Partial
results over disjoint key ranges are merged by their log-sum-exps
(:func:`aha.torch_ops.merge_partials`), and the backward reuses the same key
ranges with the merged out and lse, so nothing is recomputed densely.

All tokens are gathered per (batch, head) into dense rows, ``TILE`` rows to a
tile (:func:`aha.torch_ops.pad_token_rows`). A tile's rows all read every key
below its smallest position ``lo`` (one unmasked flash call on keys [0, lo)) and
a staircase of keys in [lo, hi) (:func:`_masked_forward`, by matmul with a
mask). The G query heads of a kv head read it in place: K and V are never
repeated per query head.
"""

from __future__ import annotations

import torch

from aha.torch_ops import merge_partials, pad_token_rows, token_tile_spans

TILE = 64  # compacted All tokens per tile
DENSE_SHARE = 0.5  # backward: above this share of rows with a gradient, run every row densely


def _flash(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


class AllBranch(torch.autograd.Function):
    """All attention in float32, for every query (idx=None) or for compacted tokens.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; idx, valid: [B, Hq, n] from
    :func:`aha.torch_ops.pad_token_rows`. Returns [B, Hq, Nq, D], or
    [B, Hq, n, D] for compacted tokens (padding rows hold garbage).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, idx, valid):
        ctx.scale, ctx.q_shape = scale, q.shape
        if idx is None:
            out, lse = dense_forward(q, k, v, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            return out
        rows = _gather_rows(q, idx)  # (B, Hq, n, D)
        pos = k.shape[2] - q.shape[2] + idx
        out, lse = rows_forward(rows, pos, valid, k, v, scale)
        ctx.save_for_backward(rows, k, v, out, lse, idx, valid)
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout.float()
        if len(ctx.saved_tensors) == 5:
            q, k, v, out, lse = ctx.saved_tensors
            live = (dout != 0).any(-1)  # (B, Hq, Nq): rows that get a gradient
            if live.float().mean() > DENSE_SHARE:
                return (*dense_backward(dout, q, k, v, out, lse, ctx.scale), None, None, None)
            idx, valid = pad_token_rows(live)
            rows, out, lse, dout = (_gather_rows(x, idx) for x in (q, out, lse, dout))
        else:
            rows, k, v, out, lse, idx, valid = ctx.saved_tensors
        dout = dout * valid.unsqueeze(-1)  # padding rows repeat index 0: no gradient through them
        pos = k.shape[2] - ctx.q_shape[2] + idx
        dq_rows, dk, dv = rows_backward(dout, rows, pos, valid, k, v, out, lse, ctx.scale)
        dq_rows = dq_rows * valid.unsqueeze(-1)  # padding rows repeat index 0
        dq = dq_rows.new_zeros(ctx.q_shape).scatter_add_(2, idx.unsqueeze(-1).expand_as(dq_rows), dq_rows)
        return dq, dk, dv, None, None, None


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, H, n] of x [B, H, N, ...] -> [B, H, n, ...]."""
    if x.dim() == 3:
        return torch.gather(x, 2, idx)
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def dense_forward(q, k, v, scale):
    """Causal attention of every query (bottom-right aligned) -> out [B, Hq, Nq, D], lse [B, Hq, Nq]."""
    offset = k.shape[2] - q.shape[2]
    parts = [_flash(q, k[:, :, offset:], v[:, :, offset:], True, scale)]  # square, top-left causal
    if offset:
        parts.insert(0, _flash(q, k[:, :, :offset], v[:, :, :offset], False, scale))  # keys before query 0
    return merge_partials(parts)


def dense_backward(dout, q, k, v, out, lse, scale):
    """Gradients of :func:`dense_forward` from its merged out and lse."""
    offset = k.shape[2] - q.shape[2]
    dq, dk, dv = _flash_backward(dout, q, k[:, :, offset:], v[:, :, offset:], out, lse, True, scale)
    if offset:
        dq0, dk0, dv0 = _flash_backward(dout, q, k[:, :, :offset], v[:, :, :offset], out, lse, False, scale)
        dq, dk, dv = dq + dq0, torch.cat([dk0, dk], 2), torch.cat([dv0, dv], 2)
    return dq, dk, dv


def _tiles(pos, valid):
    """(r0, r1, lo, hi) per tile of compacted rows, and pos with padding rows set to their tile's lo."""
    spans = token_tile_spans(pos, valid, TILE)
    lo_of_row = torch.tensor([lo for lo, _ in spans]).repeat_interleave(TILE)[: pos.shape[-1]]
    pos = torch.where(valid, pos, lo_of_row)  # padding rows read [0, lo]: inside the tile's ranges
    tiles = [(t * TILE, min(pos.shape[-1], (t + 1) * TILE), lo, hi) for t, (lo, hi) in enumerate(spans)]
    return tiles, pos


def rows_forward(rows, pos, valid, k, v, scale):
    """All attention of compacted tokens rows [B, Hq, n, D] at positions pos [B, Hq, n].

    Returns out [B, Hq, n, D] and lse [B, Hq, n], float32.
    """
    tiles, pos = _tiles(pos, valid)
    out = rows.new_empty(rows.shape)
    lse = rows.new_empty(rows.shape[:3])
    for r0, r1, lo, hi in tiles:
        qt = rows[:, :, r0:r1]
        parts = [_flash(qt, k[:, :, :lo], v[:, :, :lo], False, scale)] if lo else []
        parts.append(_masked_forward(qt, pos[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], lo, scale))
        out[:, :, r0:r1], lse[:, :, r0:r1] = merge_partials(parts)
    return out, lse


def rows_backward(dout, rows, pos, valid, k, v, out, lse, scale):
    """Gradients of :func:`rows_forward`: d rows [B, Hq, n, D], dk, dv [B, Hkv, Nk, D]."""
    tiles, pos = _tiles(pos, valid)
    dq, dk, dv = torch.empty_like(rows), torch.zeros_like(k), torch.zeros_like(v)
    for r0, r1, lo, hi in tiles:
        qt, do, ot, lt = rows[:, :, r0:r1], dout[:, :, r0:r1], out[:, :, r0:r1], lse[:, :, r0:r1]
        dq_t, dk_t, dv_t = _masked_backward(do, qt, pos[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], lo, ot, lt, scale)
        dk[:, :, lo:hi] += dk_t
        dv[:, :, lo:hi] += dv_t
        if lo:
            dq0, dk0, dv0 = _flash_backward(do, qt, k[:, :, :lo], v[:, :, :lo], ot, lt, False, scale)
            dq_t += dq0
            dk[:, :, :lo] += dk0
            dv[:, :, :lo] += dv0
        dq[:, :, r0:r1] = dq_t
    return dq, dk, dv


def _staircase_scores(qt, pt, ks, lo, scale):
    """Scores of rows qt [B, Hq, R, D] over keys ks [B, Hkv, L, D] at lo.., -inf past each row's position."""
    b, hq, r, d = qt.shape
    hkv, n = ks.shape[1], ks.shape[2]
    s = torch.matmul((qt * scale).reshape(b, hkv, -1, d), ks.transpose(-1, -2))  # (B, Hkv, G*R, L)
    past = lo + torch.arange(n) > pt.unsqueeze(-1)  # (B, Hq, R, L)
    return s.view(b, hq, r, n).masked_fill_(past, float("-inf"))


def _masked_forward(qt, pt, ks, vs, lo, scale):
    """Rows qt [B, Hq, R, D] at positions pt over keys [lo, lo + L) -> out [B, Hq, R, D], lse [B, Hq, R]."""
    b, hq, r, d = qt.shape
    s = _staircase_scores(qt, pt, ks, lo, scale)
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)  # (B, Hq, R, 1)
    out = torch.matmul(p.view(b, ks.shape[1], -1, ks.shape[2]), vs).view(b, hq, r, d) / total
    return out, (m + total.log()).squeeze(-1)


def _masked_backward(do, qt, pt, ks, vs, lo, out, lse, scale):
    """Gradients of the staircase part given the merged out and lse: dq [B, Hq, R, D], dk, dv [B, Hkv, L, D]."""
    b, hq, r, d = qt.shape
    hkv, n = ks.shape[1], ks.shape[2]
    p = _staircase_scores(qt, pt, ks, lo, scale).sub_(lse.unsqueeze(-1)).exp_()  # (B, Hq, R, L)
    dog = do.reshape(b, hkv, -1, d)  # (B, Hkv, G*R, D)
    delta = (do * out).sum(-1, keepdim=True)  # (B, Hq, R, 1)
    ds = torch.matmul(dog, vs.transpose(-1, -2)).view(b, hq, r, n).sub_(delta).mul_(p).view(b, hkv, -1, n)
    dq = torch.matmul(ds, ks).view(b, hq, r, d) * scale
    dk = torch.matmul(ds.transpose(-1, -2), (qt * scale).reshape(b, hkv, -1, d))
    dv = torch.matmul(p.view(b, hkv, -1, n).transpose(-1, -2), dog)
    return dq, dk, dv
