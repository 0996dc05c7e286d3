"""AHA built on torch.nn.functional.scaled_dot_product_attention.

Two paths share one entry point:

* routed (a hard gate that needs no grad): Here only for the tokens routed Here,
  each reading exactly its ``window`` keys, and All only for the tokens routed
  All, compacted per (batch, head). The work follows the routing.
* dense (a soft gate, or a gate that needs grad): both branches for every
  token, mixed by :func:`aha.torch_ops.mix`, so dgate = sum_d dout * (All - Here).

Here tokens gather their own window of keys, so keys outside it are never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aha.torch_ops import all_mask, is_hard_gate, mix, pad_token_rows, tokens_where, window_key_positions
from aha.window import position_offset

# Elements of gathered keys (or of an All mask) built at once; bounds memory.
_CHUNK_ELEMENTS = 1 << 22


def aha_sdpa(q, k, v, gate, *, window, scale=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], gate: [B, Hq, Nq] -> [B, Hq, Nq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not gate.requires_grad and is_hard_gate(gate):
        return _routed(q, k, v, gate.bool(), window, scale)
    out_all = _all_dense(q, k, v, scale)
    out_here = _here_tokens(q, k, v, tokens_where(torch.ones_like(gate, dtype=torch.bool)), window, scale)
    return mix(gate, out_all, out_here.view_as(q))


def _routed(q, k, v, is_all, window, scale):
    """Each token computes only its selected branch."""
    here_idx = tokens_where(~is_all)
    all_idx, all_out = _all_tokens(q, k, v, is_all, scale)
    out = q.new_zeros(q.shape)
    out = out.index_put(here_idx, _here_tokens(q, k, v, here_idx, window, scale))
    return out.index_put(all_idx, all_out)


def _all_dense(q, k, v, scale):
    """Causal attention for every query, bottom-right aligned. -> [B, Hq, Nq, D]"""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = all_mask(nq, nk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


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
    """All branch for the tokens routed All, compacted per (b, h).

    Returns the (b, h, i) index of each All token and its output [M, D].
    """
    idx, valid = pad_token_rows(is_all)  # (B, Hq, n)
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    bsz, hq, n = idx.shape
    gqa = q.shape[1] != k.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, bsz * hq * nk))
    rows = []
    for s in range(0, n, step):
        ids = idx[..., s : s + step]  # (B, Hq, r)
        qa = torch.gather(q, 2, ids.unsqueeze(-1).expand(-1, -1, -1, d))  # (B, Hq, r, D)
        mask = torch.arange(nk, device=q.device) <= (position_offset(nq, nk) + ids).unsqueeze(-1)
        rows.append(F.scaled_dot_product_attention(qa, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa))
    out = torch.cat(rows, dim=2) if rows else q.new_zeros(bsz, hq, 0, d)  # (B, Hq, n, D)
    b, h, r = valid.nonzero(as_tuple=True)
    return (b, h, idx[b, h, r]), out[b, h, r]
