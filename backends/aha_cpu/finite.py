"""Keys that are not finite: keep them out of every row that does not read them.

The tiled kernels read whole tiles, and a masked score next to a NaN value
still gives 0 * NaN = NaN in p @ V. So keys and values are checked once
(O(N*D)); when some key or value row is not finite, the tiles run on a copy in
which those rows are zero, and only the rows whose own key range holds such
a key are computed again, exactly, from the raw keys (:func:`exact_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aha.torch_ops import tokens_where

_ELEMENTS_PER_CHUNK = 1 << 22  # gathered key elements per chunk of exact rows


def split_finite(k: torch.Tensor, v: torch.Tensor):
    """(k, v, None) when every key and value is finite, else zeroed copies and bad [B, Hkv, Nk]."""
    if torch.isfinite(k.sum() + v.sum()):  # one cheap pass; a NaN or inf anywhere makes the sum non-finite
        return k, v, None
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, Nk)
    if not bool(bad.any()):
        return k, v, None
    keep = ~bad.unsqueeze(-1)
    return torch.where(keep, k, 0.0), torch.where(keep, v, 0.0), bad


def _key_ranges(nq: int, nk: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """First key and position [Nq] of each query's branch: All (window None) or Here."""
    pos = nk - nq + torch.arange(nq)
    lo = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp_min(0)
    return lo, pos


def reads_bad(bad: torch.Tensor, nq: int, hq: int, window: int | None) -> torch.Tensor:
    """[B, Hq, Nq] bool: the query's branch (All if window is None, else Here) reads a bad key."""
    before = F.pad(bad.cumsum(-1), (1, 0))  # (B, Hkv, Nk + 1): bad keys before each position
    lo, pos = _key_ranges(nq, bad.shape[-1], window)
    hit = before[..., pos + 1] > before[..., lo]  # (B, Hkv, Nq)
    return hit.repeat_interleave(hq // bad.shape[1], dim=1)


def repair(out, q, k, v, bad, window, scale, among=None):
    """Recompute exactly the rows of ``out`` [B, Hq, Nq, D] (those in ``among``) that read a bad key."""
    hit = reads_bad(bad, q.shape[2], q.shape[1], window)
    if among is not None:
        hit &= among
    if not bool(hit.any()):
        return out
    idx = tokens_where(hit)
    return out.index_put(idx, ExactRows.apply(q, k, v, window, scale, *idx))


class ExactRows(torch.autograd.Function):
    """:func:`exact_rows` whose backward skips rows with a zero gradient.

    Autograd through a row that read a NaN key gives NaN * 0 = NaN even when
    the row's gradient is 0 (a token routed the other way), so only rows with
    a gradient are differentiated.
    """

    @staticmethod
    def forward(ctx, q, k, v, window, scale, b, h, i):
        ctx.save_for_backward(q, k, v, b, h, i)
        ctx.window, ctx.scale = window, scale
        return exact_rows(q, k, v, (b, h, i), window, scale)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, b, h, i = ctx.saved_tensors
        live = dout.ne(0).any(-1)  # (M,)
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        if bool(live.any()):
            with torch.enable_grad():
                inputs = [x.detach().requires_grad_() for x in (q, k, v)]
                out = exact_rows(*inputs, (b[live], h[live], i[live]), ctx.window, ctx.scale)
                grads = torch.autograd.grad(out, inputs, dout[live])
        return (*grads, None, None, None, None, None)


def exact_rows(q, k, v, idx, window, scale):
    """One branch for the queries (b, h, i) in idx, each over exactly its own keys. -> [M, D]

    Keys are gathered per query, so a non-finite key reaches only the rows that
    read it, as in the reference; slots past a row's range hold 0, not a key.
    """
    b, h, i = idx
    hk = h // (q.shape[1] // k.shape[1])
    lo, pos = (x[i] for x in _key_ranges(q.shape[2], k.shape[2], window))
    width = int((pos - lo).max()) + 1
    step = max(1, _ELEMENTS_PER_CHUNK // (width * q.shape[-1]))
    outs = []
    for s in range(0, b.numel(), step):
        c = slice(s, s + step)
        keys = lo[c, None] + torch.arange(width)  # (m, width)
        read = keys <= pos[c, None]
        keys = torch.minimum(keys, pos[c, None])
        at = (b[c, None], hk[c, None], keys)
        kg = torch.where(read.unsqueeze(-1), k[at], 0.0)  # (m, width, D)
        vg = torch.where(read.unsqueeze(-1), v[at], 0.0)
        scores = torch.einsum("md,mwd->mw", q[b[c], h[c], i[c]], kg) * scale
        p = torch.softmax(torch.where(read, scores, float("-inf")), -1)
        outs.append(torch.einsum("mw,mwd->md", p, vg))
    return torch.cat(outs)
