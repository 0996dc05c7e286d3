"""The public functions: ``attention``, ``route``, ``sparsity_loss``, ``backends``."""

from __future__ import annotations

from aha.registry import BackendInfo, registry, select_backend
from aha.validation import array_kind, validate_attention

__all__ = ["attention", "route", "sparsity_loss", "backends", "select"]


def attention(
    q,
    k,
    v,
    gate,
    *,
    window,
    scale=None,
    cache_seqlens=None,
    cache_leftpad=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    backend=None,
):
    """All-or-Here attention: per token and head, full causal attention (All) or a sliding window (Here).

    Args:
        q (Tensor | ndarray): [B, Hq, Nq, D] queries, a ``torch.Tensor`` or a ``numpy.ndarray``.
        k (Tensor | ndarray): [B, Hkv, Nk, D] keys, same kind, dtype and device as q. ``Hq % Hkv == 0``:
            query head h reads kv head ``h // (Hq // Hkv)``. ``Nq <= Nk``.
        v (Tensor | ndarray): [B, Hkv, Nk, D] values, k's shape.
        gate (Tensor | ndarray): [B, Hq, Nq], bool or q's floating dtype, values in [0, 1].
            1 = All (every key up to the token), 0 = Here (the last ``window``
            keys, the token's own included). Usually ``aha.route(logits)``.
            A float gate's values are checked once per call (one host sync on
            CUDA); a bool gate, or a call under ``torch.compile``, skips that check.
        window (int): the number of keys a Here token reads, at least 1.
            ``window >= Nk`` makes Here equal to All.
        scale (float | None): softmax scale, ``1/sqrt(D)`` by default.
        cache_seqlens (Tensor | ndarray | None): optional [B] ints, for a batch of
            sequences of different lengths in one KV cache: sequence b's keys are
            ``k[b, :, :cache_seqlens[b]]`` and its queries sit at
            ``cache_seqlens[b] - Nq + i``. Keys past that are never read. Needs a
            backend whose capabilities declare ``seqlens``.
        cache_leftpad (Tensor | ndarray | None): optional [B] ints, for a left-padded batch: row b's
            keys ``k[b, :, :cache_leftpad[b]]`` are padding and never read; its sequence starts at key
            ``cache_leftpad[b]`` (and ends at ``cache_seqlens[b]``, or Nk). A query that sits before
            it (a padding query) reads no key: its output is 0 and it gets no gradient. Needs a
            backend that declares ``leftpad``.
        cu_seqlens_q (Tensor | ndarray | None): packed sequences (B = 1): [S + 1] ints from 0 to Nq,
            non-decreasing; sequence s owns queries ``[cu_seqlens_q[s], cu_seqlens_q[s + 1])``.
        cu_seqlens_k (Tensor | ndarray | None): [S + 1] ints from 0 to Nk; sequence s owns keys
            ``[cu_seqlens_k[s], cu_seqlens_k[s + 1])``, at least as many as its queries, which align
            bottom-right with them. No token reads a key of another sequence. Pass both or neither
            (the same tensor twice for self-attention); needs a backend that declares ``packed``.
        max_seqlen_q (int | None): optional hint, the longest query sequence (checked, never trusted).
        max_seqlen_k (int | None): optional hint, the longest key sequence.
        backend (str | None): a registered backend name, or None for the highest-priority
            available backend whose capabilities accept these inputs.

    B, Hq and Nq may be 0 (Nk too, with Nq = 0; Hkv too, with Hq = 0), as SDPA allows: such a call
    returns an output with no entry, after choosing the backend as for any call but without
    running it; no key is read, so k and v get zero gradients.

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
    problem = validate_attention(
        q, k, v, gate, window, scale, cache_seqlens,
        cache_leftpad=cache_leftpad, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    chosen = select_backend(problem, backend)
    if problem.empty:  # no query: the one result there is, whichever backend (they never see such a call)
        return _empty_output(q, k, v, gate, problem.array)
    return chosen.forward(q, k, v, gate, window=problem.window, scale=scale, **problem.ragged.kwargs())


def _empty_output(q, k, v, gate, array: str):
    """Zeros of q's shape (no entry), dtype and device; differentiable, with zero gradients for k and v."""
    if array == "numpy":
        import numpy as np

        return np.zeros(q.shape, dtype=q.dtype)
    from aha.torch_ops import EmptyAttention

    return EmptyAttention.apply(q, k, v, gate)


def select(q, k, v, gate, *, window, scale=None, backend=None, **ragged) -> str:
    """The name of the backend that ``attention`` would use for these inputs.

    Takes the same arguments as ``attention`` (the ragged-batch ones as keywords), validates
    them the same way, and raises the same errors; it computes nothing.
    """
    return select_backend(validate_attention(q, k, v, gate, window, scale, **ragged), backend).name


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
