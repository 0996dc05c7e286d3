"""AHA as torch.library custom ops, so that torch.compile keeps it in one graph.

``aha_triton::forward`` and ``aha_triton::backward`` are opaque to the compiler
(fake implementations give their shapes); ``register_autograd`` ties them together.

Which kernels run:
* ``both`` (the gate needs grad): every token computes All and Here, the forward
  keeps both outputs and lse, and the backward also returns dgate.
* otherwise each token computes only its selected branch (routed). A float gate is not
  checked on the host (no sync): the kv groups that hold a value strictly between 0 and 1
  are computed again with both branches, mixed, by a second launch whose other programs
  return at once. A backward for q, k or v after a float gate checks it (one sync) and,
  for a soft one, recomputes both branches.

The forward computes the routing (order, n_all) and, when a backward follows, the dk/dv
pass's key-block ranges once; they are saved for the backward (non-differentiable outputs).

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
    needs_backward: bool,
    dkdv: list[int],
    seqlens: Optional[Tensor] = None,  # noqa: UP045 (torch.library infers the schema from typing.Optional)
    leftpad: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_q: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_k: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """out [B, Hq, Nq, D], lse2 [S, B, Hq, Nq] float32 (S = 2 if both else 1), branches ([2, B, Hq, Nq, D] or
    empty), and the backward's index: order, n_all, ranges (see _launch.Index; ranges empty unless
    ``needs_backward``). ``deterministic`` is only recorded for the backward.
    """
    rag = {"seqlens": seqlens, "leftpad": leftpad, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    out, lse, branches, index = _launch.forward(q, k, v, gate, window, scale, both=both, store_branches=both,
                                                needs_backward=needs_backward, **rag)
    return out, lse, branches, index.order, index.n_all, index.ranges


@aha_forward.register_fake
def _forward_fake(q, k, v, gate, window, scale, both, deterministic, needs_backward, dkdv, seqlens=None, leftpad=None,
                  cu_seqlens_q=None, cu_seqlens_k=None):
    b, hq, nq, d = q.shape
    lse = q.new_empty((2 if both else 1, b, hq, nq), dtype=torch.float32)
    branches = q.new_empty((2, b, hq, nq, d) if both else (0,))
    shapes = _launch.index_shapes(q.shape, k.shape, both, cu_seqlens_q is not None, needs_backward, dkdv[1])
    return (q.new_empty(q.shape), lse, branches, *(q.new_empty(shape, dtype=torch.int32) for shape in shapes))


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
    order: Tensor,
    n_all: Tensor,
    ranges: Tensor,
    window: int,
    scale: float,
    both: bool,
    deterministic: bool,
    dkdv: list[int],
    seqlens: Optional[Tensor] = None,  # noqa: UP045
    leftpad: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_q: Optional[Tensor] = None,  # noqa: UP045
    cu_seqlens_k: Optional[Tensor] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and dgate ([B, Hq, Nq] float32 if both, else empty)."""
    rag = {"seqlens": seqlens, "leftpad": leftpad, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    if not both and not _routable(gate):  # a soft gate: the forward kept no branches; recompute both
        out, lse, branches, index = _launch.forward(q, k, v, gate, window, scale, both=True, store_branches=True,
                                                    needs_backward=True, **rag)  # both: its own dk/dv tiles
        dq, dk, dv, _ = _launch.backward(dout, q, k, v, gate, out, lse, branches, window, scale, True, deterministic,
                                         index=index, **rag)
        return dq, dk, dv, torch.empty((0,), dtype=torch.float32, device=q.device)
    index = _launch.Index(order, n_all, ranges)
    return _launch.backward(dout, q, k, v, gate, out, lse, branches, window, scale, both, deterministic, index=index,
                            dkdv=_launch.Tiles(*dkdv), **rag)


@aha_backward.register_fake
def _backward_fake(dout, q, k, v, gate, out, lse, branches, order, n_all, ranges, window, scale, both, deterministic,
                   dkdv, seqlens=None, leftpad=None, cu_seqlens_q=None, cu_seqlens_k=None):
    dgate = q.new_empty(gate.shape if both else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _setup_context(ctx, inputs, output):
    q, k, v, gate, window, scale, both, deterministic, _needs_backward, dkdv, *ragged = inputs
    ctx.save_for_backward(q, k, v, gate, *output, *ragged)
    ctx.window, ctx.scale, ctx.both, ctx.deterministic, ctx.dkdv = window, scale, both, deterministic, dkdv
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dout, *_grads_of_saved):
    q, k, v, gate, out, lse, branches, order, n_all, ranges, *ragged = ctx.saved_tensors
    dq, dk, dv, dgate = aha_backward(dout, q, k, v, gate, out, lse, branches, order, n_all, ranges, ctx.window,
                                     ctx.scale, ctx.both, ctx.deterministic, ctx.dkdv, *ragged)
    dgate = dgate.to(gate.dtype) if ctx.both and gate.is_floating_point() else None
    return dq, dk, dv, dgate, None, None, None, None, None, None, *(None for _ in ragged)


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
    needs_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, gate))
    t = _launch.dkdv_tiles(q.dtype, q.shape[-1], both)  # fixed here: the forward computes ranges for them
    dkdv = [t.m, t.n, t.warps, t.stages]
    out, *_ = aha_forward(q, k, v, gate, window, scale, both, bool(deterministic), needs_backward, dkdv, *ragged)
    return out
