"""AHA built on torch.nn.functional.scaled_dot_product_attention.

Three paths share one entry point:

* decode (at most :data:`aha.decode.MAX_QUERIES` queries, a hard gate, no grad):
  :func:`aha.decode.routed_decode`, also for a batch with ``cache_seqlens`` and
  ``cache_leftpad``.
* routed (a hard gate that needs no grad): All only for the tokens routed All,
  compacted per (batch, head), and the Here branch, whose cost is O(window) a
  token. The work follows the routing.
* dense (a soft gate, or a gate that needs grad): both branches for every
  token, mixed by :func:`aha.torch_ops.mix`, so dgate = sum_d dout * (All - Here).

The Here branch runs over query blocks of ``c`` tokens, each against the slab of
``c + window - 1`` keys that covers its windows, with a band mask. A masked key
still enters p @ V as 0 * v, so when k or v holds a non-finite value the Here
branch instead gathers each token's own window (exact, slower): a NaN outside a
Here token's window never reaches it.

Ragged batches that decoding does not serve (packed sequences; cache_seqlens or
cache_leftpad with a soft gate, grad or more queries) run one sequence at a time on
views of its own slices (:func:`aha.torch_ops.each_sequence`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aha.decode import handles, routed_decode
from aha.torch_ops import (
    all_attention,
    each_sequence,
    is_hard_gate,
    mix,
    pad_token_rows,
    tokens_where,
    window_key_positions,
)
from aha.window import position_offset

# Elements of gathered keys (or of an All mask) built at once; bounds memory.
_CHUNK_ELEMENTS = 1 << 22


def aha_sdpa(q, k, v, gate, *, window, scale=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], gate: [B, Hq, Nq] -> [B, Hq, Nq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not gate.requires_grad and bool((gate == 1).all()):
        return all_attention(q, k, v, scale)  # every token All (as AHAAttention passes when the window holds every key)
    if handles(q, k, v, gate):
        return routed_decode(q, k, v, gate, window=window, scale=scale)
    out_here = _here(q, k, v, window, scale)
    if not gate.requires_grad and is_hard_gate(gate):
        all_idx, all_out = _all_tokens(q, k, v, gate.bool(), scale)
        return out_here.index_put(all_idx, all_out)  # All tokens overwrite their Here rows
    return mix(gate, all_attention(q, k, v, scale), out_here)


def attention(q, k, v, gate, *, window, scale=None, cache_seqlens=None, cache_leftpad=None, **packed):
    """The backend's entry: `aha_sdpa`, or `aha_sdpa_ragged` for a ragged batch (packed: cu_seqlens_q, cu_seqlens_k)."""
    if cache_seqlens is None and cache_leftpad is None and not packed:
        return aha_sdpa(q, k, v, gate, window=window, scale=scale)
    return aha_sdpa_ragged(
        q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, **packed
    )


def aha_sdpa_ragged(q, k, v, gate, *, window, scale=None, cache_seqlens=None, cache_leftpad=None, **packed):
    """A ragged batch (see :mod:`aha.sequences`): each sequence reads its own keys only.

    Decoding with cache_seqlens / cache_leftpad (see :func:`aha.decode.handles`) serves the whole
    batch at once; otherwise (packed sequences ``cu_seqlens_q``, ``cu_seqlens_k``; a soft gate,
    grad, more queries) there is one call per sequence.
    """
    if not packed and handles(q, k, v, gate):
        return routed_decode(
            q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad
        )
    return each_sequence(
        aha_sdpa, q, k, v, gate, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, **packed,
        window=window, scale=scale,
    )  # fmt: skip


def _here(q, k, v, window, scale):
    """Here branch for every query. -> [B, Hq, Nq, D]"""
    first = max(0, position_offset(q.shape[2], k.shape[2]) - window + 1)  # oldest key any Here token reads
    if bool(torch.isfinite(k[:, :, first:]).all() and torch.isfinite(v[:, :, first:]).all()):
        return _here_blocked(q, k, v, window, scale)
    every = tokens_where(torch.ones(q.shape[:3], dtype=torch.bool, device=q.device))
    return _here_tokens(q, k, v, every, window, scale).view_as(q)


def _here_blocked(q, k, v, window, scale):
    """Blocks of c queries against slabs of c + w - 1 keys, band-masked. -> [B, Hq, Nq, D]"""
    bsz, hq, nq, d = q.shape
    nk = k.shape[2]
    w = min(window, nk)
    c = min(nq, max(16, min(w, 128)))  # a decode step (Nq = 1) reads exactly its window
    nb, off = -(-nq // c), position_offset(nq, nk)
    span = c + w - 1
    qb = F.pad(q, (0, 0, 0, nb * c - nq)).view(bsz, hq, nb, c, d).transpose(1, 2)  # (B, nb, Hq, c, D)
    start = off - w + 1  # position of the first key of slab 0; may be < 0
    pad = (0, 0, max(0, -start), nb * c - nq)  # zero keys before position 0, the query padding behind

    def slabs(x):  # (B, Hkv, Nk, D) -> (B, nb, Hkv, c + w - 1, D); only the keys Here reads are copied
        xp = F.pad(x[:, :, max(0, start) :], pad)  # (B, Hkv, (nb - 1) * c + span, D), a new tensor
        assert xp.shape[2] == (nb - 1) * c + span
        sb, sh, sn, sd = xp.stride()  # the overlapping slabs as one view (inductor miscompiled unfold + permute)
        return xp.as_strided((bsz, nb, xp.shape[1], span, d), (sb, c * sn, sh, sn, sd))

    r = torch.arange(c, device=q.device)[:, None]
    s = torch.arange(span, device=q.device)
    kpos = off - w + 1 + c * torch.arange(nb, device=q.device)[:, None, None] + s  # (nb, 1, span)
    mask = (s >= r) & (s <= r + w - 1) & (kpos >= 0)  # (nb, c, span)
    o = F.scaled_dot_product_attention(
        qb, slabs(k), slabs(v), attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=hq != k.shape[1]
    )
    return o.transpose(1, 2).reshape(bsz, hq, nb * c, d)[:, :, :nq]


def _here_tokens(q, k, v, idx, window, scale):
    """Here branch for the tokens (b, h, i) in ``idx``, each over its own window. -> [M, D]"""
    b, h, i = idx
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    w = min(window, nk)
    pos = position_offset(nq, nk) + i
    step = max(1, _CHUNK_ELEMENTS // (w * d))
    outs = []
    for s in range(0, b.numel(), step):
        bs, hs = b[s : s + step, None], h[s : s + step, None] // group
        kpos, valid = window_key_positions(pos[s : s + step], w)  # (c, w)
        qs = q[b[s : s + step], h[s : s + step], i[s : s + step]].unsqueeze(1)  # (c, 1, D)
        kw, vw = k[bs, hs, kpos], v[bs, hs, kpos]  # (c, w, D)
        o = F.scaled_dot_product_attention(qs, kw, vw, attn_mask=valid.unsqueeze(1), scale=scale)
        outs.append(o.squeeze(1))  # (c, D)
    return torch.cat(outs) if outs else q.new_zeros(0, d)


def _all_tokens(q, k, v, is_all, scale):
    """All branch for the tokens routed All, compacted per (b, kv head).

    The All tokens of the query heads sharing a kv head are gathered to the front of
    one row; only rows holding an All token run, each against a view of its own kv
    head. A decode step whose heads are mostly Here thus reads few full caches.
    Returns the (b, h, i) index of each All token and its output [M, D].
    """
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    idx, valid = pad_token_rows(is_all.reshape(bsz, hkv, group * nq))  # (B, Hkv, n): index g * Nq + i
    gb, gh = valid.any(-1).nonzero(as_tuple=True)  # rows with work: R of them
    idx, valid = idx[gb, gh], valid[gb, gh]  # (R, n)
    qg = q.reshape(bsz, hkv, group * nq, d)[gb, gh]  # (R, G * Nq, D)
    qa = torch.gather(qg, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # (R, n, D)
    pos = position_offset(nq, nk) + idx % nq  # (R, n)
    step = max(1, _CHUNK_ELEMENTS // nk)
    outs = []
    for r, (b, h) in enumerate(zip(gb.tolist(), gh.tolist())):
        kr, vr = (
            k[b, h][None, None],
            v[b, h][None, None],
        )  # (1, 1, Nk, D), views; 4-D lets SDPA use its fused CPU kernel
        chunks = []
        for s in range(0, idx.shape[1], step):
            # A decode step's queries all sit at the last position: nothing to mask.
            mask = None if nq == 1 else torch.arange(nk, device=q.device) <= pos[r, s : s + step, None]  # (r, Nk)
            chunks.append(
                F.scaled_dot_product_attention(qa[None, r : r + 1, s : s + step], kr, vr, attn_mask=mask, scale=scale)[
                    0
                ]
            )
        outs.append(torch.cat(chunks, dim=1))  # (1, n, D)
    out = torch.cat(outs) if outs else q.new_zeros(0, idx.shape[1], d)  # (R, n, D)
    r, c = valid.nonzero(as_tuple=True)
    tok = idx[r, c]
    return (gb[r], gh[r] * group + tok // nq, tok % nq), out[r, c]
