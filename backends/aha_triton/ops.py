"""AHA as torch.library custom ops, so that torch.compile keeps it in one graph.

``aha_triton::forward`` and ``aha_triton::backward`` are opaque to the compiler
(fake implementations give their shapes); ``register_autograd`` ties them together.

Which kernels run:
* ``both`` (the gate needs grad): every token computes All and Here, the forward
  keeps both outputs and lse, and the backward also returns dgate.
* otherwise, a 0/1 gate: each token computes only its selected branch.
* otherwise (a soft gate that needs no grad): both branches, mixed in the kernel;
  a backward for q, k or v recomputes them.

Ragged batches: the last arguments of both ops, none differentiable, all optional:
``seqlens`` and ``leftpad`` (int32 [B]: cache_seqlens, cache_leftpad) or ``cu_seqlens_q`` and
``cu_seqlens_k`` ([S + 1] ints: packed sequences, B = 1). Every sequence runs in the same
launches as a plain call (see aha_triton._common).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aha.torch_ops import is_hard_gate
from aha_triton import _launch


def _routable(gate: Tensor) -> bool:
    return is_hard_gate(gate)


@torch.library.custom_op("aha_triton::forward", mutates_args=())
def aha_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    window: int,
    scale: float,
    both: bool,
    deterministic: bool,
    seqlens: Optional[Tensor] = None,  # noqa: UP045 (torch.library infers the schema from typing.Optional)
    leftpad: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_q: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_k: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor]:
    """out [B, Hq, Nq, D], lse2 [S, B, Hq, Nq] float32 (S = 2 if both else 1), branches ([2, B, Hq, Nq, D] or empty).

    ``deterministic`` is only recorded for the backward.
    """
    rag = {"seqlens": seqlens, "leftpad": leftpad, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    if not both and not _routable(gate):
        out, _, _ = _launch.forward(q, k, v, gate, window, scale, both=True, store_branches=False, **rag)
        lse = torch.empty((1, *gate.shape), dtype=torch.float32, device=q.device)
        return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)
    return _launch.forward(q, k, v, gate, window, scale, both=both, store_branches=both, **rag)


@aha_forward.register_fake
def _forward_fake(q, k, v, gate, window, scale, both, deterministic, seqlens=None, leftpad=None, cu_seqlens_q=None,
                  cu_seqlens_k=None):
    b, hq, nq, d = q.shape
    lse = q.new_empty((2 if both else 1, b, hq, nq), dtype=torch.float32)
    branches = q.new_empty((2, b, hq, nq, d) if both else (0,))
    return q.new_empty(q.shape), lse, branches


@torch.library.custom_op("aha_triton::backward", mutates_args=())
def aha_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    out: Tensor,
    lse: Tensor,
    branches: Tensor,
    window: int,
    scale: float,
    both: bool,
    deterministic: bool,
    seqlens: Optional[Tensor] = None,  # noqa: UP045
    leftpad: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_q: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_k: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and dgate ([B, Hq, Nq] float32 if both, else empty)."""
    rag = {"seqlens": seqlens, "leftpad": leftpad, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    if not both and not _routable(gate):  # the forward mixed a soft gate and kept no branches
        out, lse, branches = _launch.forward(q, k, v, gate, window, scale, both=True, store_branches=True, **rag)
        dq, dk, dv, _ = _launch.backward(dout, q, k, v, gate, out, lse, branches, window, scale, True, deterministic,
                                         **rag)
        return dq, dk, dv, torch.empty((0,), dtype=torch.float32, device=q.device)
    return _launch.backward(dout, q, k, v, gate, out, lse, branches, window, scale, both, deterministic, **rag)


@aha_backward.register_fake
def _backward_fake(dout, q, k, v, gate, out, lse, branches, window, scale, both, deterministic, seqlens=None,
                   leftpad=None, cu_seqlens_q=None, cu_seqlens_k=None):
    dgate = q.new_empty(gate.shape if both else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _setup_context(ctx, inputs, output):
    q, k, v, gate, window, scale, both, deterministic, *ragged = inputs
    out, lse, branches = output
    ctx.save_for_backward(q, k, v, gate, out, lse, branches, *ragged)
    ctx.window, ctx.scale, ctx.both, ctx.deterministic = window, scale, both, deterministic
    ctx.mark_non_differentiable(lse, branches)


def _backward(ctx, dout, _dlse, _dbranches):
    q, k, v, gate, out, lse, branches, *ragged = ctx.saved_tensors
    dq, dk, dv, dgate = aha_backward(
        dout, q, k, v, gate, out, lse, branches, ctx.window, ctx.scale, ctx.both, ctx.deterministic, *ragged
    )
    dgate = dgate.to(gate.dtype) if ctx.both and gate.is_floating_point() else None
    return dq, dk, dv, dgate, None, None, None, None, *(None for _ in ragged)


aha_forward.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q,
    k,
    v,
    gate,
    *,
    window: int,
    scale: float | None = None,
    deterministic: bool | None = None,
    cache_seqlens: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
):
    """AHA on the Triton kernels. q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D], gate [B, Hq, Nq] -> [B, Hq, Nq, D].

    Ragged batches (see aha.sequences), [B] or [S + 1] ints on q's device:
    ``cache_seqlens`` / ``cache_leftpad``: row b reads only k[b, :, lp_b:L_b] (L_b defaults to Nk,
    lp_b to 0), its queries sit at L_b - Nq + i, a query before lp_b outputs 0, and keys outside
    [lp_b, L_b) get zero gradient. ``cu_seqlens_q`` / ``cu_seqlens_k``: packed sequences (B = 1),
    each query reads only its own sequence's keys. ``max_seqlen_q`` / ``max_seqlen_k`` are
    accepted for flash-attn's signature and not needed: every sequence runs in one launch.

    Inputs are assumed valid (see aha.validation). ``deterministic`` (default: follows
    torch.are_deterministic_algorithms_enabled()) runs dq as its own pass instead of
    float32 atomics, so that two backward passes give bitwise-identical gradients.
    """
    del max_seqlen_q, max_seqlen_k  # the grids depend on the packed lengths only
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    both = bool(torch.is_grad_enabled() and gate.requires_grad)
    window = min(int(window), k.shape[2])  # a window of Nk keys already reads every causal key

    def index(x):
        return None if x is None else x.to(device=q.device, dtype=torch.int32).contiguous()

    ragged = (index(cache_seqlens), index(cache_leftpad), index(cu_seqlens_q), index(cu_seqlens_k))
    out, _, _ = aha_forward(q, k, v, gate, window, scale, both, bool(deterministic), *ragged)
    return out
