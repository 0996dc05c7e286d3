"""AHA as torch.library custom ops, so that torch.compile keeps it in one graph.

``aha_triton::forward`` and ``aha_triton::backward`` are opaque to the compiler
(fake implementations give their shapes); ``register_autograd`` ties them together.

Which kernels run:
* ``both`` (the gate needs grad): every token computes All and Here, the forward
  keeps both outputs and lse, and the backward also returns dgate.
* otherwise, a 0/1 gate: each token computes only its selected branch.
* otherwise (a soft gate that needs no grad): both branches, mixed in the kernel;
  a backward for q, k or v recomputes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aha.torch_ops import is_hard_gate
from aha_triton import _launch


def _routable(gate: Tensor) -> bool:
    return is_hard_gate(gate)


@torch.library.custom_op("aha_triton::forward", mutates_args=())
def aha_forward(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, window: int, scale: float, both: bool, deterministic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """out [B, Hq, Nq, D], lse2 [S, B, Hq, Nq] float32 (S = 2 if both else 1), branches ([2, B, Hq, Nq, D] or empty).

    ``deterministic`` is only recorded for the backward.
    """
    if not both and not _routable(gate):
        out, _, _ = _launch.forward(q, k, v, gate, window, scale, both=True, store_branches=False)
        lse = torch.empty((1, *gate.shape), dtype=torch.float32, device=q.device)
        return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)
    return _launch.forward(q, k, v, gate, window, scale, both=both, store_branches=both)


@aha_forward.register_fake
def _forward_fake(q, k, v, gate, window, scale, both, deterministic):
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and dgate ([B, Hq, Nq] float32 if both, else empty)."""
    if not both and not _routable(gate):  # the forward mixed a soft gate and kept no branches
        out, lse, branches = _launch.forward(q, k, v, gate, window, scale, both=True, store_branches=True)
        dq, dk, dv, _ = _launch.backward(dout, q, k, v, gate, out, lse, branches, window, scale, True, deterministic)
        return dq, dk, dv, torch.empty((0,), dtype=torch.float32, device=q.device)
    return _launch.backward(dout, q, k, v, gate, out, lse, branches, window, scale, both, deterministic)


@aha_backward.register_fake
def _backward_fake(dout, q, k, v, gate, out, lse, branches, window, scale, both, deterministic):
    dgate = q.new_empty(gate.shape if both else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _setup_context(ctx, inputs, output):
    q, k, v, gate, window, scale, both, deterministic = inputs
    out, lse, branches = output
    ctx.save_for_backward(q, k, v, gate, out, lse, branches)
    ctx.window, ctx.scale, ctx.both, ctx.deterministic = window, scale, both, deterministic
    ctx.mark_non_differentiable(lse, branches)


def _backward(ctx, dout, _dlse, _dbranches):
    q, k, v, gate, out, lse, branches = ctx.saved_tensors
    dq, dk, dv, dgate = aha_backward(
        dout, q, k, v, gate, out, lse, branches, ctx.window, ctx.scale, ctx.both, ctx.deterministic
    )
    dgate = dgate.to(gate.dtype) if ctx.both and gate.is_floating_point() else None
    return dq, dk, dv, dgate, None, None, None, None


aha_forward.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, gate, *, window: int, scale: float | None = None, deterministic: bool | None = None):
    """AHA on the Triton kernels. q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D], gate [B, Hq, Nq] -> [B, Hq, Nq, D].

    Inputs are assumed valid (see aha.validation). ``deterministic`` (default: follows
    torch.are_deterministic_algorithms_enabled()) runs dq as its own pass instead of
    float32 atomics, so that two backward passes give bitwise-identical gradients.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    both = bool(torch.is_grad_enabled() and gate.requires_grad)
    window = min(int(window), k.shape[2])  # a window of Nk keys already reads every causal key
    out, _, _ = aha_forward(q, k, v, gate, window, scale, both, bool(deterministic))
    return out
