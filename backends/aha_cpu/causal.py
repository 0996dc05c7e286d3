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

from aha.torch_ops import merge_into, pad_token_rows, token_tile_spans

TILE = 64  # compacted All tokens per tile
MASK_ELEMENTS = 1 << 22  # largest staircase mask built at once (16 MiB)
DENSE_SHARE = 0.5  # backward: above this share of rows with a gradient, run every row densely


def _flash(q, k, v, causal, scale, mask=None):
    """(out, lse) of softmax attention; mask: additive float, broadcast to [B, Hq, Nq, Nk]."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _flash_backward(dout, q, k, v, out, lse, causal, scale, mask=None):
    """(dq, dk, dv) of :func:`_flash` given the out and lse of the whole attention the call is part of."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
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
    out, lse = _flash(q, k[:, :, offset:], v[:, :, offset:], True, scale)  # square, top-left causal
    if offset:  # keys before query 0, read by every query
        out, lse = out.contiguous(), lse.contiguous()
        merge_into(out, lse, *_flash(q, k[:, :, :offset], v[:, :, :offset], False, scale))
    return out, lse


def dense_backward(dout, q, k, v, out, lse, scale):
    """Gradients of :func:`dense_forward` from its merged out and lse."""
    offset = k.shape[2] - q.shape[2]
    dq, dk, dv = _flash_backward(dout, q, k[:, :, offset:], v[:, :, offset:], out, lse, True, scale)
    if offset:
        dq0, dk0, dv0 = _flash_backward(dout, q, k[:, :, :offset], v[:, :, :offset], out, lse, False, scale)
        dq, dk, dv = dq + dq0, torch.cat([dk0, dk], 2), torch.cat([dv0, dv], 2)
    return dq, dk, dv


def _plan(pos, valid):
    """How the compacted rows read their keys: the key chunks shared by row suffixes, and the tiles.

    Tile t (rows [t*TILE, (t+1)*TILE)) reads every key below lo_t and a staircase [lo_t, hi_t).
    Key chunk t = [lo_{t-1}, lo_t) (lo_{-1} = 0) is read whole by every row from tile t on, so
    each chunk is one unmasked flash call over a suffix of the rows. Padding rows get
    position lo_t: they read [0, lo_t], inside their tile's ranges.
    """
    spans = token_tile_spans(pos, valid, TILE)
    lo_of_row = torch.tensor([lo for lo, _ in spans]).repeat_interleave(TILE)[: pos.shape[-1]]
    pos = torch.where(valid, pos, lo_of_row)
    bounds = [0] + [lo for lo, _ in spans]
    chunks = [(t * TILE, bounds[t], bounds[t + 1]) for t in range(len(spans)) if bounds[t + 1] > bounds[t]]
    tiles = [(t * TILE, min(pos.shape[-1], (t + 1) * TILE), lo, hi) for t, (lo, hi) in enumerate(spans)]
    return chunks, tiles, pos


def _staircases(pos, lo, hi, width):
    """Key ranges [a, b) of at most ``width`` keys covering [lo, hi), with each range's additive mask.

    pos: [B, Hq, R] -> mask [B, Hq, R, b - a], 0 where key <= pos, else -inf; and the rows that
    read no key of the range ([B, Hq, R] bool), whose lse must be set to -inf.
    """
    for a in range(lo, hi, width):
        b = min(hi, a + width)
        read = torch.arange(a, b) <= pos.unsqueeze(-1)  # (B, Hq, R, b - a)
        yield a, b, torch.where(read, 0.0, float("-inf")), pos < a


def _stair_width(rows, tile_rows):
    return max(TILE, MASK_ELEMENTS // max(1, rows.shape[0] * rows.shape[1] * tile_rows))


def rows_forward(rows, pos, valid, k, v, scale):
    """All attention of compacted tokens rows [B, Hq, n, D] at positions pos [B, Hq, n].

    Returns out [B, Hq, n, D] and lse [B, Hq, n], float32.
    """
    chunks, tiles, pos = _plan(pos, valid)
    out = rows.new_zeros(rows.shape)
    lse = rows.new_full(rows.shape[:3], float("-inf"))
    for r0, a, b in chunks:  # unmasked: keys [a, b) for every row from r0 on
        merge_into(out[:, :, r0:], lse[:, :, r0:], *_flash(rows[:, :, r0:], k[:, :, a:b], v[:, :, a:b], False, scale))
    for r0, r1, lo, hi in tiles:  # the staircase of each tile
        qt, pt = rows[:, :, r0:r1], pos[:, :, r0:r1]
        for a, b, mask, none in _staircases(pt, lo, hi, _stair_width(rows, r1 - r0)):
            o, part_lse = _flash(qt, k[:, :, a:b], v[:, :, a:b], False, scale, mask)
            merge_into(out[:, :, r0:r1], lse[:, :, r0:r1], o, part_lse.masked_fill(none, float("-inf")))
    return out, lse


def rows_backward(dout, rows, pos, valid, k, v, out, lse, scale):
    """Gradients of :func:`rows_forward` from its merged out and lse: d rows, dk, dv."""
    chunks, tiles, pos = _plan(pos, valid)
    dq, dk, dv = torch.zeros_like(rows), torch.zeros_like(k), torch.zeros_like(v)

    def add(r0, r1, a, b, grads):
        dq[:, :, r0:r1] += grads[0]
        dk[:, :, a:b] += grads[1]
        dv[:, :, a:b] += grads[2]

    n = rows.shape[2]
    for r0, a, b in chunks:
        sl = slice(r0, n)
        add(
            r0,
            n,
            a,
            b,
            _flash_backward(
                dout[:, :, sl], rows[:, :, sl], k[:, :, a:b], v[:, :, a:b], out[:, :, sl], lse[:, :, sl], False, scale
            ),
        )
    for r0, r1, lo, hi in tiles:
        sl = slice(r0, r1)
        for a, b, mask, _ in _staircases(pos[:, :, sl], lo, hi, _stair_width(rows, r1 - r0)):
            grads = _flash_backward(
                dout[:, :, sl],
                rows[:, :, sl],
                k[:, :, a:b],
                v[:, :, a:b],
                out[:, :, sl],
                lse[:, :, sl],
                False,
                scale,
                mask,
            )
            add(r0, r1, a, b, grads)
    return dq, dk, dv
