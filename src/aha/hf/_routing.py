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

import torch
from torch import nn

from aha.nn import AHAAttention

__all__ = ["HFAHAAttention", "RoutedCausalLM", "route_attention", "reject_padding"]


class HFAHAAttention(AHAAttention):
    """AHAAttention called the way transformers' decoder layers call their attention.

    Takes the rotary ``position_embeddings`` and the cache (``cache`` or, in older
    transformers, ``past_key_values``) from the decoder layer; ignores the 4-D mask
    (AHA attention is causal by construction; padding is refused at the model's
    input by `reject_padding`). Returns ``(output, None)``: no attention weights.
    """

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.get("past_key_values")
        out = super().forward(hidden_states, position_embeddings=position_embeddings, cache=cache)
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
    model.model.register_forward_pre_hook(reject_padding, with_kwargs=True)


def reject_padding(module, args, kwargs) -> None:
    """Forward pre-hook of the base model: only unpadded batches (a mask of ones, or none)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError(
            "attention_mask: AHA models take a 2-D [batch, length] mask of ones or None "
            f"(got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))})"
        )
    if not bool(mask.bool().all()):
        raise ValueError(
            "attention_mask: AHA models do not support padding yet; pass batches whose sequences all have the "
            "same length (attention_mask all ones, or None), or run the sequences one at a time"
        )


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
