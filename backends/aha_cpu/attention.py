"""AHA on the CPU: the Here and All branches, routed or mixed by the gate.

Two paths share one entry point:

* routed (a hard gate that needs no grad): Here only on the query tiles that
  hold Here tokens, All only for the All tokens, compacted per (batch, kv head).
  The work follows the routing; q, k and v may still need gradients. Without
  gradients the All rows are written straight into the Here output.
* mixed (a soft gate, or a gate that needs grad): both branches for every
  token, mixed by :func:`aha.torch_ops.mix`, so dgate = sum_d dout * (All - Here)
  comes from the two saved outputs. The backward of each branch skips the rows
  whose gradient is zero (dAll = gate * dout, dHere = (1 - gate) * dout).

Everything runs in float32; the output has q's dtype. Keys or values that are
not finite reach only the rows that read them (see :mod:`aha_cpu.finite`).
"""

from __future__ import annotations

import torch

from aha.torch_ops import is_hard_gate, mix
from aha_cpu.causal import AllBranch, all_tokens_into
from aha_cpu.finite import repair, split_finite
from aha_cpu.here import HereBranch

DENSE_SHARE = 0.6  # routed: above this share of All tokens, All runs for every query at once


def attention(q, k, v, gate, *, window, scale=None, cache_seqlens=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], gate: [B, Hq, Nq] -> [B, Hq, Nq, D].

    cache_seqlens [B]: sequence b reads k[b, :, :cache_seqlens[b]] only; one call per sequence.
    """
    if cache_seqlens is not None:
        parts = [
            attention(
                q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], gate[b : b + 1], window=window, scale=scale
            )
            for b, n in enumerate(cache_seqlens.tolist())
        ]
        return torch.cat(parts)
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = q.float(), k.float(), v.float()
    window = min(window, k.shape[2])  # a window over every key is All
    k_fin, v_fin, bad = split_finite(k, v)
    if not gate.requires_grad and is_hard_gate(gate):
        is_all = gate.bool()
        out = _routed(q, k_fin, v_fin, is_all, window, scale)
        if bad is not None:
            out = repair(out, q, k, v, bad, None, scale, among=is_all)
            out = repair(out, q, k, v, bad, window, scale, among=~is_all)
        return out.to(dtype)
    out_all = AllBranch.apply(q, k_fin, v_fin, scale, None)
    out_here = HereBranch.apply(q, k_fin, v_fin, window, scale, None) if window < k.shape[2] else out_all
    if bad is not None:
        out_all = repair(out_all, q, k, v, bad, None, scale)
        out_here = repair(out_here, q, k, v, bad, window, scale)
    g = gate if gate.dtype == torch.bool else gate.float()
    return mix(g, out_all, out_here).to(dtype)


def _routed(q, k, v, is_all, window, scale):
    """Each token computes only its selected branch (float32)."""
    n_all, n = int(is_all.sum()), is_all.numel()
    if n_all == n or window >= k.shape[2]:
        return AllBranch.apply(q, k, v, scale, None)
    here = HereBranch.apply(q, k, v, window, scale, ~is_all)
    if n_all == 0:
        return here
    if n_all > DENSE_SHARE * n:
        return torch.where(is_all.unsqueeze(-1), AllBranch.apply(q, k, v, scale, None), here)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return torch.where(is_all.unsqueeze(-1), AllBranch.apply(q, k, v, scale, is_all), here)
    all_tokens_into(here, q, k, v, scale, is_all)  # inference: the All rows overwrite their Here rows
    return here
