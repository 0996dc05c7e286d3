"""The ``triton`` backend: fused AHA kernels (forward and backward) for NVIDIA GPUs.

Runs on CUDA devices, or on the CPU through Triton's interpreter when
TRITON_INTERPRET=1 is set before triton is imported (slow; for tests).
Importing this package imports neither torch nor triton; ``aha_triton.ops`` does.
"""


def attention(q, k, v, gate, *, window, scale=None, deterministic=None, **ragged):
    """See :func:`aha_triton.ops.attention` (inputs unchecked; prefer aha.attention(..., backend="triton")).

    ``ragged``: cache_seqlens, cache_leftpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k."""
    from aha_triton.ops import attention as _attention

    return _attention(q, k, v, gate, window=window, scale=scale, deterministic=deterministic, **ragged)
