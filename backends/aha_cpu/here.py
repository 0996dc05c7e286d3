"""The Here branch on the CPU: each tile of queries against its band of keys.

Queries are cut into tiles of ``block`` positions (see :func:`aha.window.here_bands`).
Tile ``t`` reads one band of ``halo + block`` consecutive keys, a strided view
of the keys, never a copy; the G query heads that share a kv head are stacked
into the tile's rows. The band holds every key of every window in the tile, so
one exact softmax per row (no running max needed) gives the branch, and the
cost is ``block + halo ~ block + window`` keys per query whatever N is.

Work goes in chunks of tiles whose scores fit in the L2 cache, three batched
ops per chunk: scores with the band mask as a bias (baddbmm), softmax, p @ V.
The backward recomputes p the same way and folds the band gradients of k and
v back onto the keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aha.window import HereBands, here_bands

BLOCK = 64  # queries per tile
SCORES_PER_CHUNK = 1 << 18  # float32 scores computed at once (1 MiB): stays in L2


class HereBranch(torch.autograd.Function):
    """Here attention of every query tile that ``rows`` asks for (float32 in and out).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; rows: [B, Hq, Nq] bool or None (all).
    Returns [B, Hq, Nq, D]; tiles without a requested row are left 0.
    """

    @staticmethod
    def forward(ctx, q, k, v, window, scale, rows):
        bands = here_bands(q.shape[2], k.shape[2], window, BLOCK)
        qt = _tiles(q, bands, k.shape[1]) * scale  # (BH, T, G*block, D)
        kp, vp = _padded_keys(k, bands), _padded_keys(v, bands)  # (BH, Lp, D)
        todo = _tiles_with(rows, bands, k.shape[1]) if rows is not None else None
        out = torch.zeros_like(qt) if todo is not None else torch.empty_like(qt)
        mask = _Mask(bands, window, qt.shape[2])
        for bh, t0, t1 in _chunks(qt, bands, todo):
            kb, vb = _band(kp[bh], bands, t0, t1), _band(vp[bh], bands, t0, t1)  # (c, span, D)
            s = torch.baddbmm(mask(t0, t1), qt[bh, t0:t1], kb.transpose(1, 2))  # (c, G*block, span)
            torch.bmm(torch.softmax(s, -1), vb, out=out[bh, t0:t1])
        ctx.save_for_backward(q, k, v, out)
        ctx.window, ctx.scale = window, scale
        return _untiles(out, q.shape)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        window, scale = ctx.window, ctx.scale
        bands = here_bands(q.shape[2], k.shape[2], window, BLOCK)
        hkv = k.shape[1]
        qt = _tiles(q, bands, hkv) * scale
        dot = _tiles(dout.float(), bands, hkv)  # (BH, T, G*block, D)
        delta = (dot * out).sum(-1, keepdim=True)  # (BH, T, G*block, 1)
        kp, vp = _padded_keys(k, bands), _padded_keys(v, bands)
        dq, dkp, dvp = torch.zeros_like(qt), torch.zeros_like(kp), torch.zeros_like(vp)
        todo = (dot != 0).flatten(2).any(-1)  # (BH, T): tiles whose rows get a gradient
        mask = _Mask(bands, window, qt.shape[2])
        for bh, t0, t1 in _chunks(qt, bands, todo):
            kb, vb = _band(kp[bh], bands, t0, t1), _band(vp[bh], bands, t0, t1)
            s = torch.baddbmm(mask(t0, t1), qt[bh, t0:t1], kb.transpose(1, 2))
            p = torch.softmax(s, -1)  # (c, G*block, span)
            do = dot[bh, t0:t1]
            ds = torch.bmm(do, vb.transpose(1, 2)).sub_(delta[bh, t0:t1]).mul_(p)
            torch.bmm(ds, kb, out=dq[bh, t0:t1])
            keys = _band_rows(bands, t0, t1)
            dkp[bh].index_add_(0, keys, torch.bmm(ds.transpose(1, 2), qt[bh, t0:t1]).flatten(0, 1))
            dvp[bh].index_add_(0, keys, torch.bmm(p.transpose(1, 2), do).flatten(0, 1))
        dq = _untiles(dq * scale, q.shape)
        return dq, _unpad_keys(dkp, bands, k.shape), _unpad_keys(dvp, bands, k.shape), None, None, None


def _tiles(x: torch.Tensor, bands: HereBands, hkv: int) -> torch.Tensor:
    """[B, Hq, Nq, D] -> [B*Hkv, T, G*block, D]: query tiles, the G heads of a kv head stacked."""
    b, hq, nq, d = x.shape
    x = F.pad(x, (0, 0, 0, bands.pad_right))  # (B, Hq, T*block, D)
    x = x.view(b, hkv, hq // hkv, bands.tiles, bands.block, d).transpose(2, 3)  # (B, Hkv, T, G, block, D)
    return x.reshape(b * hkv, bands.tiles, (hq // hkv) * bands.block, d)


def _untiles(x: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`_tiles`: [B*Hkv, T, G*block, D] -> [B, Hq, Nq, D]."""
    b, hq, nq, d = shape
    hkv = x.shape[0] // b
    x = x.view(b, hkv, x.shape[1], hq // hkv, -1, d).transpose(2, 3)  # (B, Hkv, G, T, block, D)
    return x.reshape(b, hq, -1, d)[:, :, :nq]


def _padded_keys(x: torch.Tensor, bands: HereBands) -> torch.Tensor:
    """[B, Hkv, Nk, D] -> [B*Hkv, Lp, D]: the keys the bands read, zero-padded at both ends."""
    x = x[:, :, max(0, bands.key_start) :]
    return F.pad(x, (0, 0, bands.pad_left, bands.pad_right)).flatten(0, 1)


def _unpad_keys(xp: torch.Tensor, bands: HereBands, shape) -> torch.Tensor:
    """Inverse of :func:`_padded_keys` for gradients: [B*Hkv, Lp, D] -> [B, Hkv, Nk, D]."""
    b, hkv, nk, d = shape
    x = xp[:, bands.pad_left : xp.shape[1] - bands.pad_right].view(b, hkv, -1, d)
    return F.pad(x, (0, 0, nk - x.shape[2], 0))  # keys before the first band get no gradient


def _band(xp: torch.Tensor, bands: HereBands, t0: int, t1: int) -> torch.Tensor:
    """Bands of tiles [t0, t1) as a strided view of padded keys [Lp, D] -> [t1 - t0, span, D]."""
    d = xp.shape[-1]
    return xp.as_strided((t1 - t0, bands.span, d), (bands.block * d, d, 1), xp.storage_offset() + t0 * bands.block * d)


def _band_rows(bands: HereBands, t0: int, t1: int) -> torch.Tensor:
    """Padded key row of every band entry of tiles [t0, t1), flattened: [(t1 - t0) * span]."""
    return (torch.arange(t0, t1)[:, None] * bands.block + torch.arange(bands.span)).flatten()


class _Mask:
    """Additive band mask, 0 where a row reads a key and -inf elsewhere: [rows, span] per band."""

    def __init__(self, bands: HereBands, window: int, rows: int):
        r = torch.arange(bands.block).repeat(rows // bands.block)[:, None]  # row within its head's tile
        self.col = torch.arange(bands.span)
        d = r + bands.halo - self.col  # (rows, span): how far each key lies behind the query
        self.read = (d >= 0) & (d < window)
        self.bias = _additive(self.read)
        self.bands = bands

    def __call__(self, t0: int, t1: int) -> torch.Tensor:
        """[rows, span], or [t1 - t0, rows, span] for bands that start before key 0."""
        if t0 >= self.bands.edge_tiles:
            return self.bias
        edge = torch.tensor([self.bands.edge(t) for t in range(t0, t1)])
        return _additive(self.read & (self.col >= edge[:, None, None]))


def _additive(read: torch.Tensor) -> torch.Tensor:
    return torch.zeros(read.shape).masked_fill_(~read, float("-inf"))


def _tiles_with(rows: torch.Tensor, bands: HereBands, hkv: int) -> torch.Tensor:
    """[B, Hq, Nq] bool -> [B*Hkv, T] bool: tiles holding at least one requested row."""
    t = _tiles(rows.unsqueeze(-1), bands, hkv)  # (BH, T, G*block, 1)
    return t.flatten(2).any(-1)


def _chunks(qt: torch.Tensor, bands: HereBands, todo: torch.Tensor | None):
    """(bh, t0, t1): runs of consecutive tiles, one (batch, kv head) at a time, sized for the cache."""
    per = max(1, SCORES_PER_CHUNK // (qt.shape[2] * bands.span))
    for bh in range(qt.shape[0]):
        want = None if todo is None else todo[bh].tolist()
        for t0 in range(0, bands.tiles, per):
            t1 = min(bands.tiles, t0 + per)
            if want is None or any(want[t0:t1]):
                yield bh, t0, t1
