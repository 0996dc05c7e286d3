"""Torch modules for AHA models: the router, the attention layer and its KV cache.

``AHAAttention`` is a causal self-attention layer whose every query head routes
each token to All (full causal attention) or Here (the last ``window`` keys).
The gate comes from a `Router`, a linear map of the layer input, or from
extra rows of the query projection (``fused_router=True``, the layout of the
released AHA-OLMo2 checkpoint: ``q_proj`` has ``Hq * D + Hq`` output rows, the
last ``Hq`` being the gate logits).

Padded and packed batches: ``AHAAttention`` takes transformers' 2-D ``attention_mask``
(left or right padding, with or without a cache), a 4-D mask that is a causal mask plus
padding, or flash-attn's ``cu_seqlens_q/_k``, and computes every sequence as if it were alone
(`aha.masks` turns them into ragged calls). Caches: `KVCache`, transformers' ``DynamicCache``,
or a fixed-size ``StaticCache``, read up to its filled slots (`cache_layout`).

`plain_attention` computes AHA by plain tensor ops and returns the attention weights too
(``AHAAttention(..., return_weights=True)``): for ``output_attentions`` and for tracing
(torch.compile with ``fullgraph=True``, torch.export) where a backend cannot.

Observers see the router of every forward pass; `aha.training` builds the
sparsity term and gate statistics on them. Importing this module needs torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import aha
from aha import masks
from aha.masks import Sequences
from aha.validation import validate_window

__all__ = [
    "Router",
    "AHAAttention",
    "KVCache",
    "RMSNorm",
    "hard_gate",
    "aha_layers",
    "set_backend",
    "rotary_embedding",
    "apply_rotary",
    "plain_attention",
    "cache_layout",
]

# observer(module, logits [B, Hq, N], gate [B, Hq, N] (bool or float), offset: position of token 0)
Observer = Callable[["AHAAttention", torch.Tensor, torch.Tensor, int], None]


class Router(nn.Linear):
    """One gate logit per query head from the layer input; no bias by default (as in the paper).

    ``forward(x)``: x [B, N, C] -> logits [B, Hq, N]. ``gate(logits)``: 1 = All, the
    straight-through `aha.route` when gradients flow, a bool gate otherwise.
    """

    def __init__(self, hidden_size: int, num_heads: int, bias: bool = False, threshold: float = 0.5, **factory):
        super().__init__(hidden_size, num_heads, bias=bias, **factory)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).transpose(1, 2)  # (B, Hq, N)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        return hard_gate(logits, self.threshold)


def hard_gate(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1[sigmoid(logits) > threshold]: straight-through float gate under autograd, else bool."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return aha.route(logits, threshold)
    return torch.sigmoid(logits.float()) > threshold


class RMSNorm(nn.Module):
    """RMS norm computed in float32, weight applied before casting back (OLMo-2 / Llama style)."""

    def __init__(self, size: int, eps: float = 1e-6, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rotary_embedding(positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype=torch.float32):
    """cos, sin [..., N, D] for integer positions [..., N] (halves layout, as in Llama/OLMo)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (..., N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., N, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, N, D] by cos, sin [B or 1, N, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, N, D)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class KVCache:
    """Keys and values of past tokens, one entry per layer; grows by concatenation.

    It follows the protocol of transformers' ``DynamicCache`` (``update`` and
    ``get_seq_length``), so AHAAttention accepts either.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append k, v [B, Hkv, N, D] to layer ``layer_idx``; return all of its keys and values."""
        if layer_idx > len(self.keys):
            raise ValueError(f"layer_idx {layer_idx} skips layers: the cache holds {len(self.keys)} layers")
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]


def cache_layout(cache, layer_idx: int, n: int):
    """``(offset, len_k, used)`` of a call adding ``n`` tokens to ``cache`` (None: no cache).

    offset: tokens cached before the call (an int, or a 0-d tensor for a ``StaticCache``);
    len_k: the keys the cache returns after the update; used: for a fixed-size cache (one
    transformers marks ``is_compileable``), the filled slots after the update (offset + n, the
    ``cache_seqlens`` of the call), else None: every returned key is filled.
    """
    if cache is None:
        return 0, n, None
    offset = cache.get_seq_length(layer_idx)
    if not getattr(cache, "is_compileable", False):
        return offset, offset + n, None
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    slots = getattr(layer, "max_cache_len", None)
    if slots is None or getattr(layer, "is_sliding", False):
        raise ValueError(
            f"cache: AHA layers need every past key, which this fixed-size cache ({type(cache).__name__}, "
            f"layer {layer_idx}: {type(layer).__name__}) does not keep; use a StaticCache without sliding "
            "layers, a DynamicCache or aha.nn.KVCache"
        )
    return offset, slots, offset + n


def plain_attention(q, k, v, gate, *, window: int, scale=None, first=None, own=None):
    """AHA by plain tensor ops, with its weights: (out [B, Hq, Nq, D], weights [B, Hq, Nq, Nk]).

    Each query's weights are All's causal softmax over keys [first, own] or Here's softmax over the
    last ``window`` of them, as its gate chose (a float gate blends the two, as the straight-through
    router's 0/1 does exactly); ``first``, ``own`` [B, Nq]: the key slots where its sequence starts
    and where it sits (`aha.masks.Sequences.spans`), by default 0 and Nk - Nq + i. A query with no
    key (a padding query, ``first > own``) gets weights and output 0. Memory O(Nq * Nk): for
    inspection (``output_attentions``) and tracing, not for long sequences.
    """
    bsz, hq, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if own is None:
        own = (nk - nq + torch.arange(nq, device=q.device)).expand(bsz, nq)
        first = torch.zeros_like(own)
    cols = torch.arange(nk, device=q.device)
    reads = (cols >= first[..., None]) & (cols <= own[..., None])  # (B, Nq, Nk): All's keys
    here = reads & (cols > own[..., None] - window)  # Here's keys
    k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)  # (B, Hq, Nk, D)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, Hq, Nq, Nk)

    def softmax(allowed):  # (B, Nq, Nk) -> (B, Hq, Nq, Nk), rows without a key all 0
        p = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        return torch.where(allowed[:, None], p, 0.0)

    g = gate[..., None]  # (B, Hq, Nq, 1)
    p_all, p_here = softmax(reads), softmax(here)
    weights = torch.where(g, p_all, p_here) if gate.dtype == torch.bool else g * p_all + (1 - g) * p_here
    weights = weights.to(q.dtype)
    return weights @ v, weights


class AHAAttention(nn.Module):
    """Causal self-attention in which every query head routes each token to All or Here.

    Args:
        hidden_size: C, the width of the input and output.
        num_heads: Hq, the query heads.
        window: keys a Here token reads, its own included (>= 1).
        num_kv_heads: Hkv (GQA), Hq by default; Hq % Hkv == 0.
        head_dim: D, C // Hq by default.
        qkv_bias: biases of the q, k and v projections.
        out_bias: bias of the o projection.
        qk_norm: None; ``"full"`` an RMS norm over the whole q and k projections (OLMo-2);
            ``"head"`` one over each head's D (Qwen3 style). It never covers the gate rows.
        norm_eps: epsilon of the qk norms.
        rope_theta: apply RoPE with this base when the caller passes no ``position_embeddings``;
            None for no position encoding of its own.
        fused_router: the gate logits are the last Hq rows of ``q_proj`` (released layout);
            otherwise a separate `Router` ``self.router``.
        router_bias: give the router a bias (``self.gate_bias`` when fused); the paper uses none.
        threshold: the gate is 1[sigmoid(logit) > threshold], 1 = All.
        backend: the ``aha.attention`` backend, None for the best available.
        layer_idx: this layer's slot in a KV cache.

    Parameter names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm) are those of
    transformers' Llama/OLMo-2 attention, so state dicts carry over.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        window: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        rope_theta: float | None = 10000.0,
        fused_router: bool = False,
        router_bias: bool = False,
        threshold: float = 0.5,
        backend: str | None = None,
        layer_idx: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if qk_norm not in (None, "full", "head"):
            raise ValueError(f"qk_norm must be None, 'full' or 'head', got {qk_norm!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold!r}")
        f = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window = validate_window(window)
        self.rope_theta, self.fused_router, self.threshold = rope_theta, fused_router, threshold
        self.qk_norm, self.backend, self.layer_idx = qk_norm, backend, layer_idx
        q_rows = num_heads * head_dim + (num_heads if fused_router else 0)
        self.q_proj = nn.Linear(hidden_size, q_rows, bias=qkv_bias, **f)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **f)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **f)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias, **f)
        if qk_norm is not None:
            width = head_dim if qk_norm == "head" else None
            self.q_norm = RMSNorm(width or num_heads * head_dim, norm_eps, **f)
            self.k_norm = RMSNorm(width or num_kv_heads * head_dim, norm_eps, **f)
        self.router = None if fused_router else Router(hidden_size, num_heads, router_bias, threshold, **f)
        self.gate_bias = nn.Parameter(torch.zeros(num_heads, **f)) if fused_router and router_bias else None
        self._observers: OrderedDict[int, Observer] = OrderedDict()  # weak-referenceable, for RemovableHandle

    def observe(self, fn: Observer) -> RemovableHandle:
        """Call ``fn(module, logits, gate, offset)`` in every forward pass; returns a handle to remove it."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def router_weight(self) -> torch.Tensor:
        """The router's [Hq, C] weight: the gate rows of q_proj when fused (a view)."""
        return self.q_proj.weight[-self.num_heads :] if self.fused_router else self.router.weight

    def project_query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, C] -> queries [B, N, Hq * D] and gate logits [B, Hq, N]."""
        if not self.fused_router:
            return self.q_proj(x), self.router(x)
        qg = self.q_proj(x)  # (B, N, Hq*D + Hq)
        q, logits = qg.split([self.num_heads * self.head_dim, self.num_heads], dim=-1)
        if self.gate_bias is not None:
            logits = logits + self.gate_bias
        return q, logits.transpose(1, 2)  # (B, Hq, N)

    def _project(self, x):
        """x [B, N, C] -> q [B, Hq, N, D], k, v [B, Hkv, N, D] (qk-normed), logits [B, Hq, N]."""
        b, n, _ = x.shape
        q, logits = self.project_query(x)
        k, v = self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, N, D)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, D)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, logits

    def rotate(self, q, k, position_embeddings=None, position_ids=None):
        """q [B, Hq, N, D], k [B, Hkv, N, D] turned by the caller's rotary embedding (cos, sin), else by the
        layer's RoPE at ``position_ids`` [B or 1, N] when rope_theta is set; unchanged when neither applies."""
        if position_embeddings is None and self.rope_theta is not None:
            position_embeddings = rotary_embedding(position_ids, self.head_dim, self.rope_theta, q.dtype)
        if position_embeddings is None:
            return q, k
        cos, sin = position_embeddings
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def forward(
        self,
        x,
        *,
        position_embeddings=None,
        position_ids=None,
        cache=None,
        attention_mask=None,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        sequences: Sequences | None = None,
        return_weights: bool = False,
    ):
        """x [B, N, C] -> [B, N, C]; with ``return_weights``, (out, weights [B, Hq, N, keys]).

        position_embeddings: (cos, sin) [B or 1, N, D] from the caller's rotary embedding;
        else RoPE at ``position_ids`` [B or 1, N] when rope_theta is set (default: after the cached
        tokens, or each token's place in its own sequence for padded and packed batches).
        cache: a `KVCache`, a transformers ``DynamicCache`` or a fixed-size ``StaticCache`` (its
        filled slots are read: ``cache_seqlens``); the new queries align bottom-right against the
        cached keys.
        attention_mask: [B, past + N] of 1 (token) and 0 (padding), as transformers makes it:
            left padding (generate()), right padding, or both, with or without a cache; never a 0
            between 1s. Or a 4-D [B, 1, N, keys] mask that is a causal mask plus padding (what
            transformers builds from the 2-D one); any other 4-D mask is refused. The outputs at
            padding positions are 0.
        cu_seqlens_q, cu_seqlens_k: [S + 1] ints, sequences packed along the flattened B * N tokens
            (flash-attn's names; the same offsets twice); needs an empty cache.
        max_seqlen_q, max_seqlen_k: optional hints, the longest packed sequence.
        sequences: an `aha.masks.Sequences` built once for every layer of a model (instead of the
            mask or cu_seqlens).
        return_weights: compute the attention by the plain path (`plain_attention`) and return its
            weights as well: each query's row is All's causal softmax or Here's windowed softmax, as
            the router chose; 0 for padding queries.
        Every sequence is computed as if it were alone in the batch.
        """
        b, n, _ = x.shape
        offset, len_k, used = cache_layout(cache, self.layer_idx, n)
        if sequences is None:
            sequences = masks.sequences(
                b, n, len_k, attention_mask=attention_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, used=used, device=x.device,
            )  # fmt: skip
        elif attention_mask is not None or cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("sequences already describes the batch: pass it or attention_mask / cu_seqlens, not both")
        else:
            sequences.check(b, n, len_k)
        q, k, v, logits = self._project(x)
        if position_embeddings is None and self.rope_theta is not None and position_ids is None:
            position_ids = (
                torch.arange(n, device=x.device)[None] + offset if sequences is None else sequences.positions
            )  # (B or 1, N)
        q, k = self.rotate(q, k, position_embeddings, position_ids)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, len_k, D)
            if k.shape[-2] != len_k:
                raise ValueError(
                    f"cache: AHAAttention needs a cache that returns every past key (got {k.shape[-2]} keys for "
                    f"{offset} cached + {n} new tokens); use aha.nn.KVCache or transformers' DynamicCache "
                    "or StaticCache"
                )
        gate = hard_gate(logits, self.threshold)  # (B, Hq, N), 1 = All
        for fn in tuple(self._observers.values()):
            fn(self, logits, gate, offset)
        if self.window >= k.shape[-2]:
            # Here == All when the window holds every key: the gate cannot change the output
            # (and dgate = sum dout * (All - Here) = 0), so let the backend run plain causal attention.
            gate = torch.ones(gate.shape, dtype=torch.bool, device=gate.device)
        elif gate.dtype != torch.bool:
            gate = gate.to(q.dtype)
        weights = None
        if return_weights:
            first, own = (None, None) if sequences is None else sequences.spans()
            out, weights = plain_attention(q, k, v, gate, window=self.window, first=first, own=own)
        elif sequences is None:
            out = aha.attention(q, k, v, gate, window=self.window, backend=self.backend)  # (B, Hq, N, D)
        else:  # padded, packed or a fixed-size cache: 0 at padding queries
            out = sequences.attention(q, k, v, gate, window=self.window, backend=self.backend)
        out = self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return (out, weights) if return_weights else out

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, window={self.window}, "
            f"fused_router={self.fused_router}, qk_norm={self.qk_norm}, backend={self.backend}"
        )


def aha_layers(model: nn.Module) -> list[AHAAttention]:
    """Every AHAAttention inside ``model``, in module order (a DDP wrapper is looked through)."""
    return [m for m in model.modules() if isinstance(m, AHAAttention)]


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Make every AHA layer of ``model`` call ``aha.attention`` with this backend (None = auto)."""
    for layer in aha_layers(model):
        layer.backend = backend
