"""Registers the ``reference`` backend: slow, exact, anywhere NumPy runs.

NumPy arrays go in and come out (float64 math, q's dtype out). Torch CPU tensors
are accepted too, with gradients through the reference's explicit VJP, so the
conformance suite can treat it like any other backend.
"""

from __future__ import annotations

import numpy as np

import aha
from aha import reference
from aha.registry import Capabilities


def forward(q, k, v, gate, *, window, scale=None, cache_seqlens=None, **ragged):
    if isinstance(q, np.ndarray):
        return reference.attention(q, k, v, gate, window, scale, cache_seqlens, **ragged).astype(q.dtype)
    import torch

    from aha_reference import torch_bridge

    call = torch_bridge.traced_attention if torch.compiler.is_compiling() else torch_bridge.attention
    return call(q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, **ragged)


@aha.hookimpl
def register_backends(register):
    register(
        aha.Backend(
            name="reference",
            forward=forward,
            capabilities=Capabilities(arrays=("numpy", "torch"), devices=("cpu",), seqlens=True, leftpad=True, packed=True),
            priority=0,
            description="NumPy float64 specification; exact and slow (O(N^2) Python loop per query)",
        )
    )
