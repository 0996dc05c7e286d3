"""The All branch on the CPU: causal attention for every query, or for the All tokens only.

Dense key tiles go through torch's fused CPU flash-attention kernel, which keeps
a running max and sum in float32 and returns each row's log-sum-exp. Partial
results over disjoint key ranges are merged by their log-sum-exps
(:func:`aha.torch_ops.merge_into`), and the backward reuses the same key
ranges with the merged out and lse, so nothing is recomputed densely.

All tokens are gathered per (batch, kv head) into dense rows ordered by
position (:class:`_Units`; the G query heads of a kv head share rows, so K and
V are read in place, never repeated per query head), ``TILE`` rows to a tile.
A tile's rows all read every key below its smallest position ``lo`` and a
staircase of keys in [lo, hi). The keys below ``lo`` are cut into chunks at the
tiles' ``lo``: chunk t is read whole by every row from tile t on, so it is one
unmasked flash call over a suffix of the rows, with as many rows as possible
per call. The staircases are flash calls with an additive mask.
"""

from __future__ import annotations

import torch

from aha.torch_ops import merge_into, pad_token_rows, token_tile_spans

TILE = 32  # compacted All tokens per tile
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
    """All attention in float32 of the tokens in ``rows`` [B, Hq, Nq] bool (None: every token).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]. Returns [B, Hq, Nq, D]; tokens not in rows hold
    garbage (select them away, as ``torch.where(rows, out, ...)`` does).
    The backward runs only the rows whose gradient is not zero.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, rows):
        ctx.scale = scale
        if rows is None:
            out, lse = dense_forward(q, k, v, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            return out
        units = _Units(rows, k.shape[1], k.shape[2])
        q_rows = units.gather(q)  # (B, Hkv, n, D)
        out, lse = rows_forward(q_rows, units.pos, units.valid, k, v, scale)
        ctx.save_for_backward(q_rows, k, v, out, lse)
        ctx.units = units
        return units.scatter(out, q.new_empty(q.shape))

    @staticmethod
    def backward(ctx, dout):
        dout = dout.float()
        if not hasattr(ctx, "units"):
            q, k, v, out, lse = ctx.saved_tensors
            live = (dout != 0).any(-1)  # (B, Hq, Nq): rows that get a gradient
            if live.float().mean() > DENSE_SHARE:
                return (*dense_backward(dout, q, k, v, out, lse, ctx.scale), None, None)
            units = _Units(live, k.shape[1], k.shape[2])
            q_rows, out, lse = units.gather(q), units.gather(out), units.gather(lse)
            q_shape = q.shape
        else:
            q_rows, k, v, out, lse = ctx.saved_tensors
            units = ctx.units
            q_shape = dout.shape
        do = units.gather(dout) * units.valid.unsqueeze(-1)  # padding rows repeat a token: no gradient
        dq_rows, dk, dv = rows_backward(do, q_rows, units.pos, units.valid, k, v, out, lse, ctx.scale)
        return units.scatter(dq_rows, dq_rows.new_zeros(q_shape)), dk, dv, None, None


class _Units:
    """Tokens of [B, Hq, Nq] gathered per (batch, kv head) and ordered by position.

    The G query heads of a kv head read the same keys, so their tokens share rows and tiles:
    the tokens of a unit lie G times denser than those of one head, and a tile's positions
    spread G times less. b, h, i, pos, valid: [B, Hkv, n] (padding rows repeat a token).
    """

    def __init__(self, rows: torch.Tensor, hkv: int, nk: int):
        b, hq, nq = rows.shape
        g = hq // hkv
        by_position = rows.reshape(b, hkv, g, nq).transpose(2, 3).reshape(b, hkv, nq * g)  # index i * G + head
        idx, self.valid = pad_token_rows(by_position)  # (B, Hkv, n)
        self.i = idx // g
        self.h = torch.arange(hkv)[:, None] * g + idx % g  # query head
        self.b = torch.arange(b)[:, None, None].expand_as(idx)
        self.pos = nk - nq + self.i

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x [B, Hq, Nq, ...] -> [B, Hkv, n, ...]."""
        return x[self.b, self.h, self.i]

    def scatter(self, rows: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather` on the real rows: [B, Hkv, n, D] written into [B, Hq, Nq, D]."""
        v = self.valid
        return into.index_put_((self.b[v], self.h[v], self.i[v]), rows[v])


def all_tokens_into(out, q, k, v, scale, rows):
    """Without autograd: All attention of the tokens in rows [B, Hq, Nq] written into out [B, Hq, Nq, D]."""
    units = _Units(rows, k.shape[1], k.shape[2])
    units.scatter(rows_forward(units.gather(q), units.pos, units.valid, k, v, scale)[0], out)


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
