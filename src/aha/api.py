"""The public functions: ``attention``, ``route``, ``sparsity_loss``, ``backends``."""

from __future__ import annotations

from aha.registry import BackendInfo, registry, select_backend
from aha.validation import array_kind, validate_attention

__all__ = ["attention", "route", "sparsity_loss", "backends", "select"]


def attention(q, k, v, gate, *, window, scale=None, backend=None):
    """All-or-Here attention.

    Args:
        q: [B, Hq, Nq, D] queries.
        k, v: [B, Hkv, Nk, D] keys and values, Hq % Hkv == 0 (query head h
            reads kv head h // (Hq // Hkv)); Nq <= Nk.
        gate: [B, Hq, Nq], bool or q's floating dtype, in [0, 1].
            1 = All (every key up to the token), 0 = Here (the last ``window``
            keys, the token's own included).
        window: int >= 1, the number of keys a Here token reads.
        scale: softmax scale, 1/sqrt(D) by default.
        backend: a registered backend name, or None for the best available.

    Returns:
        out: [B, Hq, Nq, D] in q's dtype: gate * All + (1 - gate) * Here.

    Query i sits at position Nk - Nq + i (bottom-right alignment). For Nq = Nk = 6,
    window = 3, a Here row and an All row look like this (x = read)::

        Here, i = 4:  . . x x x .        All, i = 4:  x x x x x .
    """
    problem = validate_attention(q, k, v, gate, window, scale)
    chosen = select_backend(problem, backend)
    return chosen.forward(q, k, v, gate, window=problem.window, scale=scale)


def select(q, k, v, gate, *, window, scale=None, backend=None) -> str:
    """The name of the backend that ``attention`` would use for these inputs."""
    return select_backend(validate_attention(q, k, v, gate, window, scale), backend).name


def route(logits, threshold: float = 0.5):
    """The router: hard gate 1[sigmoid(logits) > threshold], 1 = All.

    logits: [B, Hq, N] (or any shape). The forward pass is binary; the backward
    pass is the straight-through estimate dlogits = dgate * s * (1 - s), with
    s = sigmoid(logits). Returns logits' dtype (float) so gradients can flow.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold!r}")
    if array_kind(logits, "logits") == "numpy":
        from aha import reference

        return reference.route(logits, threshold).astype(logits.dtype if logits.dtype.kind == "f" else "float64")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating, got {logits.dtype}")
    from aha.torch_ops import RouteSTE

    return RouteSTE.apply(logits, float(threshold))


def sparsity_loss(logits):
    """The paper's L1 regulariser mean(sigmoid(logits)); multiply by lambda (3e-4)."""
    if array_kind(logits, "logits") == "numpy":
        from aha import reference

        return reference.sparsity_loss(logits)
    import torch

    return torch.sigmoid(logits.float()).mean()


def backends() -> list[BackendInfo]:
    """Every registered backend with its capabilities and status, then broken plugins."""
    return registry.rows()
