"""The public functions: ``attention``, ``route``, ``sparsity_loss``, ``backends``."""

from __future__ import annotations

from aha.registry import BackendInfo, registry, select_backend
from aha.validation import array_kind, validate_attention

__all__ = ["attention", "route", "sparsity_loss", "backends", "select"]


def attention(q, k, v, gate, *, window, scale=None, cache_seqlens=None, backend=None):
    """All-or-Here attention: per token and head, full causal attention (All) or a sliding window (Here).

    Args:
        q (Tensor | ndarray): [B, Hq, Nq, D] queries, a ``torch.Tensor`` or a ``numpy.ndarray``.
        k (Tensor | ndarray): [B, Hkv, Nk, D] keys, same kind, dtype and device as q. ``Hq % Hkv == 0``:
            query head h reads kv head ``h // (Hq // Hkv)``. ``Nq <= Nk``.
        v (Tensor | ndarray): [B, Hkv, Nk, D] values, k's shape.
        gate (Tensor | ndarray): [B, Hq, Nq], bool or q's floating dtype, values in [0, 1].
            1 = All (every key up to the token), 0 = Here (the last ``window``
            keys, the token's own included). Usually ``aha.route(logits)``.
        window (int): the number of keys a Here token reads, at least 1.
            ``window >= Nk`` makes Here equal to All.
        scale (float | None): softmax scale, ``1/sqrt(D)`` by default.
        cache_seqlens (Tensor | ndarray | None): optional [B] ints, for a batch of
            sequences of different lengths in one KV cache: sequence b's keys are
            ``k[b, :, :cache_seqlens[b]]`` and its queries sit at
            ``cache_seqlens[b] - Nq + i``. Keys past that are never read. Needs a
            backend whose capabilities declare ``seqlens``.
        backend (str | None): a registered backend name, or None for the highest-priority
            available backend whose capabilities accept these inputs.

    Returns:
        out (Tensor | ndarray): [B, Hq, Nq, D] in q's dtype: ``gate * All + (1 - gate) * Here``,
            selecting (never blending) where the gate is exactly 0 or 1, so a
            NaN outside a Here token's window cannot reach it. Differentiable
            w.r.t. q, k, v and gate on backends that declare ``grad``.

    Raises:
        TypeError: an argument of the wrong kind or dtype; the message names it.
        ValueError: a bad shape, window, scale or gate value; the message names
            the argument. Also an unknown ``backend`` name.
        BackendError: no available backend (or not the named one) can serve the
            inputs; the message says why.

    Query i sits at position ``Nk - Nq + i`` (bottom-right alignment). For
    ``Nq = Nk = 6``, ``window = 3``, a Here row and an All row look like this
    (x = key read):

        Here, i = 4:  . . x x x .        All, i = 4:  x x x x x .
    """
    problem = validate_attention(q, k, v, gate, window, scale, cache_seqlens)
    chosen = select_backend(problem, backend)
    if cache_seqlens is None:
        return chosen.forward(q, k, v, gate, window=problem.window, scale=scale)
    return chosen.forward(q, k, v, gate, window=problem.window, scale=scale, cache_seqlens=cache_seqlens)


def select(q, k, v, gate, *, window, scale=None, cache_seqlens=None, backend=None) -> str:
    """The name of the backend that ``attention`` would use for these inputs.

    Takes the same arguments as ``attention``, validates them the same way,
    and raises the same errors; it computes nothing.
    """
    return select_backend(validate_attention(q, k, v, gate, window, scale, cache_seqlens), backend).name


def route(logits, threshold: float = 0.5):
    """The router's hard gate ``1[sigmoid(logits) > threshold]`` (1 = All, 0 = Here).

    The forward pass is binary; the backward pass is the straight-through
    estimate ``dlogits = dgate * s * (1 - s)`` with ``s = sigmoid(logits)``.

    Args:
        logits (Tensor | ndarray): [B, Hq, N] (any shape works), a floating ``torch.Tensor`` or a
            ``numpy.ndarray``, one logit per query head and token.
        threshold: in (0, 1); 0.5 in the paper.

    Returns:
        gate (Tensor | ndarray): logits' shape and floating dtype, values 0.0 or 1.0, so that
            gradients can flow back to the logits (torch).

    Raises:
        ValueError: threshold outside (0, 1).
        TypeError: logits is neither a numpy array nor a floating torch tensor.
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
    """The paper's L1 regulariser ``mean(sigmoid(logits))``.

    Add ``lambda * sparsity_loss(logits)`` to the training loss (lambda = 3e-4 in
    the paper) to push decisions towards Here.

    Args:
        logits (Tensor | ndarray): the router's logits.

    Returns:
        loss (Tensor | float): a float32 scalar tensor (torch) or a Python float (numpy).
    """
    if array_kind(logits, "logits") == "numpy":
        from aha import reference

        return reference.sparsity_loss(logits)
    import torch

    return torch.sigmoid(logits.float()).mean()


def backends() -> list[BackendInfo]:
    """Every registered backend, highest priority first, then the plugins that broke.

    Each row says whether the backend is ``"available"`` here, ``"unavailable"``
    (with the reason its ``available()`` gave) or ``"broken"`` (a plugin that
    failed to load; ``backend`` is None). ``python -m aha backends`` prints it.
    """
    return registry.rows()
