"""The Here branch on the CPU: each tile of queries against its band of keys.

Queries are cut into tiles of ``block`` positions (see :func:`aha.window.here_bands`).
Tile ``t`` reads one band of ``halo + block`` consecutive keys, a strided view
of the keys in place (only the few bands that reach past either end of the keys
read a small zero-padded copy); the G query heads that share a kv head are
stacked into the tile's rows, so K and V are never repeated. The band holds
every key of every window in the tile, so one exact softmax per row (no running
max needed) gives the branch, and the cost is ``block + halo ~ block + window``
keys per query whatever N is.

Work goes in chunks of tiles whose scores fit in the L2 cache, three batched
ops per chunk: scores with the band mask as a bias (baddbmm), softmax, p @ V.
The backward recomputes p the same way and folds the band gradients of k and
v back onto the keys.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from aha.window import HereBands, here_bands
from aha_cpu.threads import parallel, run_jobs, workers

BLOCK = 32  # queries per tile
SCORES_PER_CHUNK = 1 << 18  # float32 scores computed at once (1 MiB): stays in L2


class HereBranch(torch.autograd.Function):
    """Here attention of every query tile that ``rows`` asks for (float32 in and out).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; rows: [B, Hq, Nq] bool or None (all).
    Returns [B, Hq, Nq, D]; tiles without a requested row are left 0.
    """

    @staticmethod
    def forward(ctx, q, k, v, window, scale, rows):
        out, jobs = here_jobs(q, k, v, window, scale, rows)
        run_jobs(jobs)
        out = out.contiguous()  # a copy only where queries were padded to whole tiles
        ctx.save_for_backward(q, k, v, out)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        bands = here_bands(q.shape[2], k.shape[2], ctx.window, BLOCK)
        dout = dout.float()
        qt, dot = _QueryTiles(q, bands, k.shape[1]), _QueryTiles(dout, bands, k.shape[1])
        delta = _QueryTiles((dout * out).sum(-1, keepdim=True), bands, k.shape[1])  # tiles [c, G*block, 1]
        scores = _Scores(bands, ctx.window, qt, k, v, ctx.scale)
        dq = qt.zeros()  # (BH, G, T, block, D)
        dk = q.new_zeros(k.shape[0] * k.shape[1], bands.tiles * bands.block + bands.halo, k.shape[3])
        dv = torch.zeros_like(dk)  # (BH, band rows, D): row r is key key_start + r

        def segment(item, worker):
            """Chunks of one (batch, kv head) and run of tiles; dk, dv of their band rows."""
            chunks = item[1]
            r0 = chunks[0][1] * bands.block  # band rows [r0, r1) of these tiles
            r1 = chunks[-1][2] * bands.block + bands.halo
            dk_seg, dv_seg = dk.new_zeros(r1 - r0, dk.shape[2]), dv.new_zeros(r1 - r0, dv.shape[2])
            for bh, t0, t1 in chunks:
                p = scores.probs(bh, t0, t1)  # (c, G*block, span)
                do = dot(bh, t0, t1)
                ds = torch.bmm(do, scores.vb(bh, t0, t1).transpose(1, 2)).sub_(delta(bh, t0, t1)).mul_(p)
                qt.put(dq, bh, t0, t1, torch.bmm(ds, scores.kb(bh, t0, t1)))
                keys = _band_rows(bands, t0, t1) - r0
                dk_seg.index_add_(0, keys, torch.bmm(ds.transpose(1, 2), qt(bh, t0, t1)).flatten(0, 1), alpha=ctx.scale)
                dv_seg.index_add_(0, keys, torch.bmm(p.transpose(1, 2), do).flatten(0, 1))
            return item[0], r0, dk_seg, dv_seg

        todo = qt.any((dout != 0).any(-1))  # (BH, T): tiles whose rows get a gradient
        for bh, r0, dk_seg, dv_seg in parallel(segment, _segments(scores.chunks(todo), workers())):
            dk[bh, r0 : r0 + dk_seg.shape[0]] += dk_seg  # neighbouring segments share their halo rows
            dv[bh, r0 : r0 + dv_seg.shape[0]] += dv_seg
        dq = qt.whole(dq.mul_(ctx.scale))
        return dq, _unpad_keys(dk, bands, k.shape), _unpad_keys(dv, bands, k.shape), None, None, None


def here_jobs(q, k, v, window, scale, rows):
    """The Here branch of :class:`HereBranch` as jobs for :func:`aha_cpu.threads.run_jobs`.

    Returns out [B, Hq, Nq, D], filled once every job has run (tiles without a requested row
    hold 0), and [(cost, job)], the cost in query-key pairs. Float32, no autograd.
    """
    bands = here_bands(q.shape[2], k.shape[2], window, BLOCK)
    qt = _QueryTiles(q, bands, k.shape[1])
    todo = None if rows is None else qt.any(rows)  # (BH, T)
    out = qt.empty()  # (BH, G, T, block, D)
    if todo is not None and not bool(todo.all()):
        out.masked_fill_(~todo[:, None, :, None, None], 0.0)
    scores = _Scores(bands, window, qt, k, v, scale)

    def chunk(bh, t0, t1):
        p, vb = scores.probs(bh, t0, t1), scores.vb(bh, t0, t1)
        if qt.g == 1:
            torch.bmm(p, vb, out=out[bh, 0, t0:t1])
        else:  # one product for the G heads, then each head's rows to its place in the output
            qt.put(out, bh, t0, t1, torch.bmm(p, vb))

    pairs = qt.rows * bands.span  # per tile
    jobs = [((t1 - t0) * pairs, partial(chunk, bh, t0, t1)) for bh, t0, t1 in scores.chunks(todo)]
    return qt.whole(out), jobs


class _QueryTiles:
    """Query tiles of x [B, Hq, Nq, E]: the G query heads of a kv head stacked in each tile's rows.

    ``qt(bh, t0, t1)`` -> [t1 - t0, G*block, E] is a view when G = 1, else a copy of just
    those tiles (made by the worker that needs them, never of all of x). Per-tile results live
    in [B*Hkv, G, T, block, E] (:meth:`empty`, :meth:`put`), which is x's own layout.
    """

    def __init__(self, x: torch.Tensor, bands: HereBands, hkv: int):
        b, hq, self.nq, e = x.shape
        self.bands, self.g, self.rows = bands, hq // hkv, (hq // hkv) * bands.block
        if bands.pad_right:
            x = F.pad(x, (0, 0, 0, bands.pad_right))  # (B, Hq, T*block, E)
        self.x = x.reshape(b * hkv, self.g, bands.tiles, bands.block, e)  # a view if x is contiguous
        self.count, self.heads = b * hkv, (b, hq)

    def __call__(self, bh: int, t0: int, t1: int) -> torch.Tensor:
        x = self.x[bh, :, t0:t1]  # (G, c, block, E)
        return x.transpose(0, 1).reshape(t1 - t0, self.rows, x.shape[-1])  # (c, G*block, E)

    def put(self, into: torch.Tensor, bh: int, t0: int, t1: int, y: torch.Tensor) -> None:
        """Write tiles y [t1 - t0, G*block, E] into their place in into [B*Hkv, G, T, block, E]."""
        into[bh, :, t0:t1] = y.view(t1 - t0, self.g, self.bands.block, -1).transpose(0, 1)

    def empty(self) -> torch.Tensor:
        return self.x.new_empty(self.x.shape)

    def zeros(self) -> torch.Tensor:
        return self.x.new_zeros(self.x.shape)

    def whole(self, y: torch.Tensor) -> torch.Tensor:
        """[B*Hkv, G, T, block, E] -> [B, Hq, Nq, E] (a view)."""
        return y.view(*self.heads, -1, y.shape[-1])[:, :, : self.nq]

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, Hq, Nq] bool -> [B*Hkv, T]: tiles holding a True row."""
        if self.bands.pad_right:
            mask = F.pad(mask, (0, self.bands.pad_right))
        return mask.reshape(self.count, self.g, self.bands.tiles, self.bands.block).any(-1).any(1)


class _Scores:
    """Bands of K and V for the tiles of qt, the band mask, and the softmax of a chunk of tiles."""

    def __init__(self, bands: HereBands, window: int, qt, k, v, scale: float):
        self.bands, self.qt, self.scale = bands, qt, scale
        self.kb, self.vb = _KeyBands(k, bands), _KeyBands(v, bands)
        rows = qt.rows
        r = torch.arange(bands.block).repeat(rows // bands.block)[:, None]  # row within its head's tile
        self.col = torch.arange(bands.span)
        d = r + bands.halo - self.col  # (rows, span): how far each key lies behind the query
        self.read = (d >= 0) & (d < window)
        self.bias = _additive(self.read)
        self.edge_bias = {}

    def mask(self, t0: int, t1: int) -> torch.Tensor:
        """Additive mask [rows, span], or [t1 - t0, rows, span] for bands that start before key 0."""
        if t0 >= self.bands.edge_tiles:
            return self.bias
        if (t0, t1) not in self.edge_bias:
            edge = torch.tensor([self.bands.edge(t) for t in range(t0, t1)])
            self.edge_bias[t0, t1] = _additive(self.read & (self.col >= edge[:, None, None]))
        return self.edge_bias[t0, t1]

    def probs(self, bh: int, t0: int, t1: int) -> torch.Tensor:
        """Softmax over the band of each row of tiles [t0, t1): [t1 - t0, G*block, span]."""
        kb = self.kb(bh, t0, t1)
        return torch.softmax(
            torch.baddbmm(self.mask(t0, t1), self.qt(bh, t0, t1), kb.transpose(1, 2), alpha=self.scale), -1
        )

    def chunks(self, todo: torch.Tensor | None):
        """(bh, t0, t1): runs of tiles, one (batch, kv head) at a time, that fit the cache and
        one source of bands; runs without a tile in ``todo`` [BH, T] are skipped."""
        per = max(1, SCORES_PER_CHUNK // (self.qt.rows * self.bands.span))
        for bh in range(self.qt.count):
            want = None if todo is None else todo[bh].tolist()
            for lo, hi in self.kb.regions:
                for t0 in range(lo, hi, per):
                    t1 = min(hi, t0 + per)
                    if want is None or any(want[t0:t1]):
                        yield bh, t0, t1


class _KeyBands:
    """Band views of keys [B, Hkv, Nk, D]: bands(bh, t0, t1) -> [t1 - t0, span, D], never copied.

    Bands inside [0, Nk) read the keys in place; the leading bands that start before key 0 and
    a trailing band that runs past Nk (queries padded to whole tiles) read zero-padded copies.
    """

    def __init__(self, x: torch.Tensor, bands: HereBands):
        self.bands = bands
        if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
            x = x.contiguous()  # bands are strided views over whole rows of D
        x = x.flatten(0, 1)  # (BH, Nk, D); a view for a slice of packed keys (B = 1)
        first = bands.edge_tiles
        last = bands.tiles - (1 if bands.pad_right else 0)
        if first >= last:  # few tiles: every band from one padded copy
            first = last = bands.tiles
        self.regions = [(lo, hi) for lo, hi in ((0, first), (first, last), (last, bands.tiles)) if hi > lo]
        self.sources = {lo: self._source(x, lo, hi) for lo, hi in self.regions}

    def _source(self, x: torch.Tensor, t0: int, t1: int) -> tuple[torch.Tensor, int]:
        """Keys [BH, L, D] holding the bands of tiles [t0, t1), and the absolute position of row 0."""
        b, n = self.bands, x.shape[1]
        start, stop = b.key_start + t0 * b.block, b.key_start + (t1 - 1) * b.block + b.span
        if start >= 0 and stop <= n:
            return x, 0
        part = F.pad(x[:, max(0, start) : min(n, stop)], (0, 0, max(0, -start), max(0, stop - n)))
        return part, start

    def __call__(self, bh: int, t0: int, t1: int) -> torch.Tensor:
        src, base = self.sources[max(lo for lo, _ in self.regions if lo <= t0)]
        b, s = self.bands, src[bh]
        d = s.shape[-1]
        first = b.key_start + t0 * b.block - base
        return s.as_strided((t1 - t0, b.span, d), (b.block * d, d, 1), s.storage_offset() + first * d)


def _segments(chunks, n_workers: int) -> list:
    """Group chunks (bh, t0, t1) into runs of one bh, about 4 per worker over all: [(bh, [chunks])]."""
    by_bh: dict[int, list] = {}
    for c in chunks:
        by_bh.setdefault(c[0], []).append(c)
    per_bh = max(1, -(-4 * n_workers // max(1, len(by_bh))))  # runs per bh
    out = []
    for bh, cs in by_bh.items():
        step = max(1, -(-len(cs) // per_bh))
        out += [(bh, cs[i : i + step]) for i in range(0, len(cs), step)]
    return out


def _additive(read: torch.Tensor) -> torch.Tensor:
    return torch.where(read, 0.0, float("-inf"))


def _unpad_keys(xp: torch.Tensor, bands: HereBands, shape) -> torch.Tensor:
    """Band gradients on band rows [B*Hkv, T * block + halo, D] -> [B, Hkv, Nk, D].

    Row t * block + c is band t's column c, key key_start + t * block + c; keys before
    key_start are in no band and get no gradient.
    """
    b, hkv, nk, d = shape
    lo = max(0, bands.key_start)
    x = xp[:, lo - bands.key_start : nk - bands.key_start].reshape(b, hkv, nk - lo, d)
    return F.pad(x, (0, 0, lo, 0))


def _band_rows(bands: HereBands, t0: int, t1: int) -> torch.Tensor:
    """Band row (see :func:`_unpad_keys`) of every band entry of tiles [t0, t1), flattened: [(t1 - t0) * span]."""
    return (torch.arange(t0, t1)[:, None] * bands.block + torch.arange(bands.span)).flatten()
