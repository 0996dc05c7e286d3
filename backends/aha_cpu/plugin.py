"""Registers the ``cpu`` backend (CPU tensors; preferred over ``torch`` there)."""

from __future__ import annotations

import aha
from aha.registry import Capabilities


def _available() -> str | None:
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc}); pip install 'aha-attention[torch]'"
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return f"torch {torch.__version__} lacks the CPU flash-attention kernel (aten::_scaled_dot_product_flash_attention_for_cpu); need torch >= 2.5"
    return None


def forward(
    q, k, v, gate, *, window, scale=None, cache_seqlens=None, cache_leftpad=None, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
):  # fmt: skip
    import torch

    if torch.compiler.is_compiling():  # one opaque op: the eager code branches on values
        from aha_cpu.ops import attention
    else:
        from aha_cpu.attention import attention
    packed = {} if cu_seqlens_q is None else {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    return attention(
        q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, **packed
    )


@aha.hookimpl
def register_backends(register):
    register(
        aha.Backend(
            name="cpu",
            forward=forward,
            capabilities=Capabilities(
                arrays=("torch",),
                devices=("cpu",),
                dtypes=("float32", "bfloat16"),
                grad=True,
                cross=True,
                seqlens=True,
                leftpad=True,
                packed=True,
            ),
            priority=50,
            available=_available,
            description="blocked AHA for CPU tensors: Here costs O(window), All O(context), memory O(N*D)",
        )
    )
