"""The All branch on the CPU: causal attention for every query, or for the All tokens only.

Dense key tiles go through torch's fused CPU flash-attention kernel, which keeps
a running max and sum in float32 and returns each row's log-sum-exp. Partial
results over disjoint key ranges are merged by their log-sum-exps
(:func:`aha.torch_ops.merge_into`), and the backward reuses the same key
ranges with the merged out and lse, so nothing is recomputed densely.

All tokens are gathered per unit (batch, kv head) into dense rows ordered by
position (:class:`_Units`): the G query heads of a kv head share rows, so K
and V are read in place, never repeated per query head. Each unit runs on its
own, a job for the worker pool (:mod:`aha_cpu.threads`), ``TILE`` rows to a
tile (:func:`aha.window.all_tiles`): the keys below a tile's first position are
cut into chunks shared by all the rows from some tile on, each one unmasked
flash call over that suffix of rows (as many rows per call as possible); the
rest of a tile's keys, up to its last position, is one flash call with an
additive mask.
"""

from __future__ import annotations

from functools import partial

import torch

from aha.torch_ops import merge_into, pad_token_rows
from aha.window import all_tiles
from aha_cpu.threads import parallel, run_jobs, workers

TILE = 64  # rows of All tokens per tile (a masked flash call each)
MASK_ELEMENTS = 1 << 20  # largest staircase mask built at once (4 MiB)
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
        if hasattr(ctx, "units"):
            q_rows, k, v, out, lse = ctx.saved_tensors
            return (*_rows_backward(dout, ctx.units, q_rows, k, v, out, lse, ctx.scale), None, None)
        q, k, v, out, lse = ctx.saved_tensors
        live = (dout != 0).any(-1)  # (B, Hq, Nq): rows that get a gradient
        if live.float().mean() > DENSE_SHARE:
            return (*dense_backward(dout, q, k, v, out, lse, ctx.scale), None, None)
        units = _Units(live, k.shape[1], k.shape[2])
        q_rows, out, lse = units.gather(q), units.gather(out), units.gather(lse)
        return (*_rows_backward(dout, units, q_rows, k, v, out, lse, ctx.scale), None, None)


def _rows_backward(dout, units, q_rows, k, v, out, lse, scale):
    """dq [B, Hq, Nq, D], dk, dv of the gathered rows of units, from their out and lse."""
    do = units.gather(dout) * units.valid.unsqueeze(-1)  # padding rows repeat a token: no gradient
    dq_rows, dk, dv = rows_backward(do, q_rows, units.pos, units.valid, k, v, out, lse, scale)
    return units.scatter(dq_rows, dq_rows.new_zeros(dout.shape)), dk, dv


class _Units:
    """Tokens of [B, Hq, Nq] gathered per (batch, kv head) and ordered by position.

    The G query heads of a kv head read the same keys, so their tokens share rows and tiles:
    the tokens of a unit lie G times denser than those of one head, and a tile's positions
    spread G times less. i, pos, valid: [B, Hkv, n] (padding rows repeat a token); ``flat``:
    each row's token as an index into [B * Hq * Nq].
    """

    def __init__(self, rows: torch.Tensor, hkv: int, nk: int):
        b, hq, nq = rows.shape
        g = hq // hkv
        by_position = rows.reshape(b, hkv, g, nq).transpose(2, 3).reshape(b, hkv, nq * g)  # index i * G + head
        idx, self.valid = pad_token_rows(by_position)  # (B, Hkv, n)
        self.i = idx // g
        h = torch.arange(hkv)[:, None] * g + idx % g  # query head
        self.flat = (torch.arange(b)[:, None, None] * hq + h) * nq + self.i  # (B, Hkv, n)
        self.pos = nk - nq + self.i

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x [B, Hq, Nq, ...] -> [B, Hkv, n, ...]."""
        flat = self.flat.flatten()
        if x.is_contiguous():
            rows = x.reshape(-1, *x.shape[3:]).index_select(0, flat)  # (B * Hkv * n, ...)
        else:  # a view (one sequence of a packed batch): gather its rows, never copy all of x
            hq, nq = x.shape[1], x.shape[2]
            rows = x[flat // (hq * nq), flat // nq % hq, flat % nq]
        return rows.view(*self.flat.shape, *x.shape[3:])

    def scatter(self, rows: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather` on the real rows: [B, Hkv, n, D] written into contiguous [B, Hq, Nq, D]."""
        into.view(-1, into.shape[-1]).index_copy_(0, self.flat[self.valid], rows[self.valid])
        return into


def all_tokens_jobs(q, k, v, scale, rows):
    """All attention of the tokens in rows [B, Hq, Nq] as jobs for :func:`aha_cpu.threads.run_jobs`.

    Returns [(cost, job)] and write(into): once the jobs have run, it writes the tokens' rows
    into ``into`` [B, Hq, Nq, D] and returns it. Float32, no autograd.
    """
    units = _Units(rows, k.shape[1], k.shape[2])
    out, _, jobs = rows_jobs(units.gather(q), units.pos, units.valid, k, v, scale)
    return jobs, lambda into: units.scatter(out, into)


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


def _jobs(pos: torch.Tensor, valid: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(b, u, r0, r1, cost): each unit's real rows, cut at tile boundaries into runs of about equal
    cost (keys read) when there are fewer units than 4 per worker."""
    counts = valid.sum(-1).tolist()  # (B, Hkv)
    units = [(b, u, n) for b, row in enumerate(counts) for u, n in enumerate(row) if n]
    runs = max(1, -(-4 * workers() // max(1, len(units))))  # per unit
    jobs = []
    for b, u, n in units:
        cost = [0] + (pos[b, u, :n] + 1).cumsum(0).tolist()  # keys read by rows [0, r)
        cuts = [0]
        for r in range(TILE, n, TILE):
            if cost[r] >= cost[n] * len(cuts) / runs:
                cuts.append(r)
        cuts.append(n)
        jobs += [(b, u, r0, r1, cost[r1] - cost[r0]) for r0, r1 in zip(cuts, cuts[1:])]
    return jobs


def rows_forward(rows, pos, valid, k, v, scale):
    """All attention of compacted tokens rows [B, Hkv, n, D] at positions pos [B, Hkv, n].

    Each unit (b, kv head) runs on its own (no rows of another unit widen its tiles), its
    real rows first in position order. Returns out [B, Hkv, n, D] and lse [B, Hkv, n],
    float32; padding rows hold 0 and -inf.
    """
    out, lse, jobs = rows_jobs(rows, pos, valid, k, v, scale)
    run_jobs(jobs)
    return out, lse


def rows_jobs(rows, pos, valid, k, v, scale):
    """:func:`rows_forward` as (out, lse, [(cost, job)]): out and lse are filled once the jobs have run."""
    out = rows.new_zeros(rows.shape)
    lse = rows.new_full(rows.shape[:3], float("-inf"))

    def job(b, u, r0, r1):
        out[b, u, r0:r1], lse[b, u, r0:r1] = _unit_forward(rows[b, u, r0:r1], pos[b, u, r0:r1], k[b, u], v[b, u], scale)

    return out, lse, [(cost, partial(job, b, u, r0, r1)) for b, u, r0, r1, cost in _jobs(pos, valid)]


def rows_backward(dout, rows, pos, valid, k, v, out, lse, scale):
    """Gradients of :func:`rows_forward` from its merged out and lse: d rows, dk, dv."""
    dq, dk, dv = torch.zeros_like(rows), torch.zeros_like(k), torch.zeros_like(v)

    def job(item, worker):
        b, u, r0, r1, _ = item
        sl = slice(r0, r1)
        grads = _unit_backward(
            dout[b, u, sl], rows[b, u, sl], pos[b, u, sl], k[b, u], v[b, u], out[b, u, sl], lse[b, u, sl], scale
        )
        dq[b, u, sl] = grads[0]
        return b, u, grads[1], grads[2]

    for b, u, dk_part, dv_part in parallel(job, _jobs(pos, valid), cost=lambda j: j[4]):
        dk[b, u, : dk_part.shape[0]] += dk_part  # in job order: the sums do not depend on timing
        dv[b, u, : dv_part.shape[0]] += dv_part
    return dq, dk, dv


def _unit_forward(q, pos, k, v, scale):
    """Rows q [R, D] at ascending positions pos [R] over keys k, v [Nk, D] -> out [R, D], lse [R]."""
    plan = all_tiles(pos.tolist(), TILE, _min_chunk(k.shape[0]))
    q, k, v, pos = q[None, None], k[None, None], v[None, None], pos[None, None]  # (1, 1, ..)
    out = q.new_zeros(q.shape)
    lse = q.new_full(q.shape[:3], float("-inf"))
    for r0, a, b in plan.chunks:  # unmasked: keys [a, b) for every row from r0 on
        merge_into(out[:, :, r0:], lse[:, :, r0:], *_flash(q[:, :, r0:], k[:, :, a:b], v[:, :, a:b], False, scale))
    for r0, r1, lo, hi in plan.tiles:  # each tile's staircase
        for a, b, mask, none in _staircases(pos[:, :, r0:r1], lo, hi, MASK_ELEMENTS // (r1 - r0)):
            o, part = _flash(q[:, :, r0:r1], k[:, :, a:b], v[:, :, a:b], False, scale, mask)
            merge_into(out[:, :, r0:r1], lse[:, :, r0:r1], o, part.masked_fill(none, float("-inf")))
    return out[0, 0], lse[0, 0]


def _unit_backward(do, q, pos, k, v, out, lse, scale):
    """Gradients of :func:`_unit_forward`: dq [R, D], and dk, dv [hi, D] of keys [0, hi)."""
    plan = all_tiles(pos.tolist(), TILE, _min_chunk(k.shape[0]))
    hi = plan.tiles[-1][3]
    do, q, out, lse, pos = do[None, None], q[None, None], out[None, None], lse[None, None], pos[None, None]
    k, v = k[None, None, :hi], v[None, None, :hi]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def add(r0, r1, a, b, mask=None):
        grads = _flash_backward(
            do[:, :, r0:r1],
            q[:, :, r0:r1],
            k[:, :, a:b],
            v[:, :, a:b],
            out[:, :, r0:r1],
            lse[:, :, r0:r1],
            False,
            scale,
            mask,
        )
        dq[:, :, r0:r1] += grads[0]
        dk[:, :, a:b] += grads[1]
        dv[:, :, a:b] += grads[2]

    for r0, a, b in plan.chunks:
        add(r0, q.shape[2], a, b)
    for r0, r1, lo, hi in plan.tiles:
        for a, b, mask, _ in _staircases(pos[:, :, r0:r1], lo, hi, MASK_ELEMENTS // (r1 - r0)):
            add(r0, r1, a, b, mask)
    return dq[0, 0], dk[0, 0], dv[0, 0]


def _min_chunk(nk: int) -> int:
    """Fewest keys per shared chunk. A chunk costs each row a merge; a coarser grain costs each row
    more masked scores in its tile's call. Measured best near sqrt(48 Nk) (~630 keys at 8k)."""
    return int((48 * nk) ** 0.5)


def _staircases(pos, lo, hi, width):
    """Key ranges [a, b) of at most ``width`` keys covering [lo, hi), with each range's additive mask.

    pos: [1, 1, R] -> mask [1, 1, R, b - a], 0 where key <= pos, else at most -1e30 (exp gives an
    exact 0; cheaper to build than -inf); and the rows that read no key of the range ([1, 1, R]
    bool), whose out and lse the caller must discard.
    """
    at = pos.unsqueeze(-1).float()  # (1, 1, R, 1)
    for a in range(lo, hi, max(1, width)):
        b = min(hi, a + max(1, width))
        behind = torch.arange(a, b, dtype=torch.float32) - at  # (1, 1, R, b - a): > 0 past the row's position
        yield a, b, behind.clamp_(min=0).mul_(-1e30), pos < a
