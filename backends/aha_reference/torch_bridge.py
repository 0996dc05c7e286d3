"""Torch tensors through the NumPy reference, gradients by its explicit VJP."""

from __future__ import annotations

import torch

from aha import reference
from aha.torch_ops import opaque_attention


def _np(x: torch.Tensor):
    return x.detach().to(torch.float64).numpy()


class ReferenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, window, scale, ragged):
        """ragged: the ragged-batch keywords (cache_seqlens, cache_leftpad, cu_seqlens_q, ...), None when absent."""
        ctx.save_for_backward(q, k, v, gate)
        ctx.window, ctx.scale = window, scale
        ctx.ragged = {n: x.cpu().numpy() if isinstance(x, torch.Tensor) else x for n, x in ragged.items() if x is not None}
        out = reference.attention(_np(q), _np(k), _np(v), _np(gate), window, scale, **ctx.ragged)
        return torch.from_numpy(out).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gate = ctx.saved_tensors
        grads = reference.attention_vjp(
            _np(q), _np(k), _np(v), _np(gate), ctx.window, _np(dout), ctx.scale, **ctx.ragged
        )
        dq, dk, dv, dgate = (torch.from_numpy(g) for g in grads)
        dgate = dgate.to(gate.dtype) if gate.is_floating_point() else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgate, None, None, None


def attention(q, k, v, gate, *, window, scale=None, **ragged):
    """The reference on torch tensors, differentiable (ragged: the ragged-batch keywords)."""
    return ReferenceFunction.apply(q, k, v, gate, window, scale, ragged)


# For torch.compile / torch.export: one opaque op (the reference reads values through NumPy).
traced_attention = opaque_attention("aha_reference", attention)
