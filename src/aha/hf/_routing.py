"""What the routed transformers models share: the attention adapter and the model surgery.

A routed model is the base model (OLMo-2, Llama, Qwen2) with each layer's
``self_attn`` replaced by `HFAHAAttention`, an `aha.nn.AHAAttention`
with the base attention's parameter names and call convention. Everything
else (embeddings, norms, MLPs, rotary embedding, cache handling, generate) is
transformers' own code, so state dicts match the base model's except for the
router: ``q_proj`` carries Hq extra rows (the gate logits) and, with
``router_bias``, ``self_attn.gate_bias`` [Hq].
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from aha import masks
from aha.nn import AHAAttention

__all__ = ["HFAHAAttention", "RoutedCausalLM", "route_attention", "describe_batch", "SEQUENCES"]

SEQUENCES = "aha_sequences"  # the keyword under which the layers receive the batch's aha.masks.Sequences


class HFAHAAttention(AHAAttention):
    """AHAAttention called the way transformers' decoder layers call their attention.

    Takes the rotary ``position_embeddings`` and the cache (``cache`` or, in older
    transformers, ``past_key_values``) from the decoder layer, and the batch's padding or
    packing as an `aha.masks.Sequences` that `describe_batch` built once for every layer
    (keyword ``aha_sequences``). transformers' own mask is never read. Returns
    ``(output, None)``: no attention weights.
    """

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.get("past_key_values")
        if SEQUENCES in kwargs:
            sequences = kwargs[SEQUENCES]
        else:  # a layer called without the model's pre-hook: read its own arguments
            b, n = hidden_states.shape[:2]
            offset = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            sequences = _sequences(b, n, offset, attention_mask, kwargs, hidden_states.device)
        out = super().forward(hidden_states, position_embeddings=position_embeddings, cache=cache, sequences=sequences)
        return out, None


def _attention_kwargs(config, family: str) -> dict:
    """AHAAttention arguments that reproduce the base attention of ``family``."""
    heads = config.num_attention_heads
    kw = {
        "hidden_size": config.hidden_size,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "window": config.local_window_size,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": None,  # the model's rotary embedding passes cos, sin
        "fused_router": True,
        "router_bias": bool(getattr(config, "router_bias", False)),
    }
    if family == "olmo2":  # q/k norm over the whole projection; one bias flag for q, k, v, o
        kw.update(qkv_bias=config.attention_bias, out_bias=config.attention_bias, qk_norm="full")
    elif family == "llama":
        kw.update(qkv_bias=config.attention_bias, out_bias=config.attention_bias)
    elif family == "qwen2":  # q, k, v biased, o not
        kw.update(qkv_bias=True, out_bias=False)
    else:
        raise ValueError(f"family must be 'olmo2', 'llama' or 'qwen2', got {family!r}")
    return kw


def route_attention(model: nn.Module, family: str) -> None:
    """Replace the attention of every decoder layer of a freshly built ``*ForCausalLM``.

    Call it in ``__init__`` after the base class built the model and before
    ``post_init()``, which then initialises only the new modules.
    """
    kw = _attention_kwargs(model.config, family)
    ref = model.model.layers[0].self_attn.q_proj.weight if len(model.model.layers) else None
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = HFAHAAttention(**kw, layer_idx=i, **factory)
    model.model.register_forward_pre_hook(describe_batch, with_kwargs=True)


def _sequences(b: int, n: int, offset: int, mask, kwargs: dict, device) -> masks.Sequences | None:
    """The batch's sequences from transformers' arguments: the 2-D padding mask over past and current
    tokens, the position ids, and the flash-attention keywords ``cu_seq_lens_q/_k``, ``max_length_q/_k``."""
    return masks.sequences(
        b, n, offset + n,
        attention_mask=mask,
        position_ids=kwargs.get("position_ids"),
        cu_seqlens_q=kwargs.get("cu_seq_lens_q"),
        cu_seqlens_k=kwargs.get("cu_seq_lens_k"),
        max_seqlen_q=kwargs.get("max_length_q"),
        max_seqlen_k=kwargs.get("max_length_k"),
        device=device,
    )  # fmt: skip


def describe_batch(module, args, kwargs):
    """Forward pre-hook of the base model: read the batch's padding and packing once, for every layer.

    Accepts a 2-D ``attention_mask`` over past and current tokens (left padding as ``generate()``
    makes it, right padding, both; with or without a cache; a 0 between 1s is refused), ``position_ids``
    that restart for each packed sequence (``DataCollatorWithFlattening``) and the flash-attention
    keywords ``cu_seq_lens_q/_k``, ``max_length_q/_k``. The layers get the result as ``aha_sequences``
    (None for a batch of whole rows). transformers' mask builder gets a 4-D placeholder in place of
    the mask (an expanded view, no memory), so that no [B, 1, N, N] mask is built for layers that
    would not read it.
    """
    names = list(inspect.signature(module.forward).parameters)
    kwargs = {**dict(zip(names, args)), **kwargs}
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    if x is None:
        return None  # transformers names the missing input
    b, n = x.shape[:2]
    cache = kwargs.get("cache")
    cache = kwargs.get("past_key_values") if cache is None else cache
    offset = cache.get_seq_length() if cache is not None else 0
    kwargs[SEQUENCES] = _sequences(b, n, offset, kwargs.get("attention_mask"), kwargs, x.device)
    kwargs["attention_mask"] = torch.ones((), dtype=torch.bool, device=x.device).expand(b, 1, n, offset + n)
    return (), kwargs


class RoutedCausalLM:
    """Mixin placed before a transformers ``*ForCausalLM``: builds it, then routes its attention.

    Subclasses set ``config_class`` and ``routed_family`` ("olmo2", "llama" or "qwen2").
    """

    routed_family: str

    def __init__(self, config):
        super().__init__(config)
        route_attention(self, self.routed_family)
        self.post_init()  # initialises only the new modules: the others are marked initialised

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AHAAttention) and module.gate_bias is not None:
            nn.init.zeros_(module.gate_bias)  # the one parameter transformers does not know
