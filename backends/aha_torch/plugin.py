"""Registers the ``torch`` backend (portable; any device torch supports)."""

from __future__ import annotations

import aha
from aha.registry import Capabilities


def _available() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not installed ({exc}); pip install 'aha-attention[torch]'"
    return None


def forward(
    q, k, v, gate, *, window, scale=None, cache_seqlens=None, cache_leftpad=None, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
):  # fmt: skip
    import torch

    packed = {} if cu_seqlens_q is None else {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    if torch.compiler.is_compiling():  # one opaque op: the eager code branches on values
        from aha_torch.ops import attention
    else:
        from aha_torch.sdpa import attention
    return attention(
        q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, **packed
    )


@aha.hookimpl
def register_backends(register):
    register(
        aha.Backend(
            name="torch",
            forward=forward,
            capabilities=Capabilities(arrays=("torch",), devices=("*",), seqlens=True, leftpad=True, packed=True),
            priority=10,
            available=_available,
            description="portable PyTorch SDPA; skips the unselected branch when the gate needs no grad",
        )
    )
