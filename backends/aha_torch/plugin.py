"""Registers the ``torch`` backend (portable; any device torch supports)."""

from __future__ import annotations

import aha
from aha.registry import Capabilities


def _available() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not installed ({exc}); pip install 'aha[torch]'"
    return None


def forward(q, k, v, gate, *, window, scale=None, cache_seqlens=None):
    from aha_torch.sdpa import aha_sdpa, aha_sdpa_seqlens

    if cache_seqlens is None:
        return aha_sdpa(q, k, v, gate, window=window, scale=scale)
    return aha_sdpa_seqlens(q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens)


@aha.hookimpl
def register_backends(register):
    register(
        aha.Backend(
            name="torch",
            forward=forward,
            capabilities=Capabilities(arrays=("torch",), devices=("*",), seqlens=True),
            priority=10,
            available=_available,
            description="portable PyTorch SDPA; skips the unselected branch when the gate needs no grad",
        )
    )
