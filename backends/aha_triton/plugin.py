"""Registers the ``triton`` backend (NVIDIA GPUs; the CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import aha
from aha.registry import Capabilities


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _available() -> str | None:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        return f"torch and triton are needed ({exc}); pip install 'aha-attention[triton]'"
    if _interpreting() or torch.cuda.is_available():
        return None
    return (
        "needs an NVIDIA GPU (torch.cuda.is_available() is False); "
        "set TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter (slow)"
    )


def forward(q, k, v, gate, *, window, scale=None, cache_seqlens=None, **ragged):
    """``ragged``: cache_leftpad, or cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k (see aha.sequences)."""
    from aha_triton.ops import attention

    return attention(q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, **ragged)


@aha.hookimpl
def register_backends(register):
    register(
        aha.Backend(
            name="triton",
            forward=forward,
            capabilities=Capabilities(
                arrays=("torch",),
                devices=("cuda", "cpu") if _interpreting() else ("cuda",),
                dtypes=("float32", "float16", "bfloat16"),
                head_dims=(16, 256),
                seqlens=True,
                leftpad=True,
                packed=True,
                deterministic=False,  # dq by float32 atomics unless torch.use_deterministic_algorithms(True)
            ),
            # Under the interpreter (tests) the kernels are far slower than the torch backend: serve
            # only calls that name this backend, never backend=None.
            priority=-1 if _interpreting() else 100,
            available=_available,
            description=(
                "fused Triton kernels for NVIDIA GPUs (on the CPU only under TRITON_INTERPRET=1); "
                "routed tokens compacted into dense query blocks per kv group"
            ),
        )
    )
