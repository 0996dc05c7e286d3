"""AHA on the CPU: the Here and All branches, routed or mixed by the gate.

Two paths share one entry point:

* routed (a hard gate that needs no grad): Here only on the query tiles that
  hold Here tokens, All only for the All tokens, compacted per (batch, kv head).
  The work follows the routing; q, k and v may still need gradients. Without
  gradients both branches' jobs go to the worker pool in one call (no barrier
  between them) and the All rows are written straight into the Here output.
* mixed (a soft gate, or a gate that needs grad): both branches for every
  token, mixed by :func:`aha.torch_ops.mix`, so dgate = sum_d dout * (All - Here)
  comes from the two saved outputs. The backward of each branch skips the rows
  whose gradient is zero (dAll = gate * dout, dHere = (1 - gate) * dout).

A decode step or short chunk (at most :data:`aha.decode.MAX_QUERIES` queries, a hard gate,
no grad) goes to :func:`aha.decode.routed_decode` instead, with ``cache_seqlens`` and
``cache_leftpad`` if given:
each Here token over its gathered window, each (batch, kv head) holding an All token over
a view of its cache; the cache is never copied or converted. Its jobs (Here, and each All
group) run on the worker pool of :mod:`aha_cpu.threads`, one intra-op thread each.
Other ragged batches (packed sequences; cache_seqlens or cache_leftpad with a soft gate, grad
or more queries) run one sequence at a time on views of its own slices
(:func:`aha.torch_ops.each_sequence`).

Everything else runs in float32; the output has q's dtype. Keys or values that are
not finite reach only the rows that read them (see :mod:`aha_cpu.finite`).
"""

from __future__ import annotations

import torch

from aha.decode import handles, routed_decode
from aha.torch_ops import each_sequence, is_hard_gate, mix
from aha_cpu.causal import AllBranch, all_tokens_jobs
from aha_cpu.finite import repair, split_finite
from aha_cpu.here import HereBranch, here_jobs
from aha_cpu.threads import run_jobs

DENSE_SHARE = 0.6  # routed: above this share of All tokens, All runs for every query at once


def attention(q, k, v, gate, *, window, scale=None, cache_seqlens=None, cache_leftpad=None, **packed):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], gate: [B, Hq, Nq] -> [B, Hq, Nq, D].

    Ragged batches (see :mod:`aha.sequences`): cache_seqlens [B], cache_leftpad [B]: sequence b
    reads k[b, :, cache_leftpad[b]:cache_seqlens[b]] only; packed sequences ``cu_seqlens_q``,
    ``cu_seqlens_k`` [S + 1] (B = 1). Decoding a padded batch (see :func:`aha.decode.handles`)
    serves it at once; otherwise (packed, a soft gate, grad, more queries) there is one call per
    sequence.
    """
    ragged = cache_seqlens is not None or cache_leftpad is not None
    if not packed and handles(q, k, v, gate):
        return routed_decode(
            q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
            run=_in_pool,
        )  # fmt: skip
    if ragged or packed:
        return each_sequence(
            attention, q, k, v, gate, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, **packed,
            window=window, scale=scale,
        )  # fmt: skip
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


def _in_pool(jobs) -> list:
    """Run the decode jobs on the worker pool: groups in parallel, and no barrier per small op."""
    return run_jobs([(1, job) for job in jobs])  # equal costs: taken in order


def _routed(q, k, v, is_all, window, scale):
    """Each token computes only its selected branch (float32)."""
    n_all, n = int(is_all.sum()), is_all.numel()
    if n_all == n or window >= k.shape[2]:
        return AllBranch.apply(q, k, v, scale, None)
    if n_all == 0:
        return HereBranch.apply(q, k, v, window, scale, ~is_all)
    if n_all > DENSE_SHARE * n:
        every = AllBranch.apply(q, k, v, scale, None)
        return torch.where(is_all.unsqueeze(-1), every, HereBranch.apply(q, k, v, window, scale, ~is_all))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        some = AllBranch.apply(q, k, v, scale, is_all)
        return torch.where(is_all.unsqueeze(-1), some, HereBranch.apply(q, k, v, window, scale, ~is_all))
    return _both_in_one_pass(q, k, v, is_all, window, scale)


def _both_in_one_pass(q, k, v, is_all, window, scale):
    """Inference: the Here tiles and the All tokens' jobs in one pool call, costliest first
    (no barrier between the branches); then the All rows overwrite their Here rows."""
    out, here = here_jobs(q, k, v, window, scale, ~is_all)
    every, write_all = all_tokens_jobs(q, k, v, scale, is_all)
    run_jobs(every + here)
    return write_all(out.contiguous())
