"""Llama and Qwen2 with All-or-Here attention: the models `aha.hf.convert.add_router` makes.

Same construction as `aha.hf.modeling_faolmo`: the base model with every
layer's attention replaced, q_proj extended by Hq gate rows. The router reads
the attention's input (after the layer's ``input_layernorm``).
"""

from __future__ import annotations

from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from aha.hf._routing import RoutedCausalLM
from aha.hf.configuration_faolmo import AHALlamaConfig, AHAQwen2Config

__all__ = ["AHALlamaForCausalLM", "AHAQwen2ForCausalLM"]


class AHALlamaForCausalLM(RoutedCausalLM, LlamaForCausalLM):
    """Llama causal LM with All-or-Here attention (model_type ``"aha_llama"``)."""

    config_class = AHALlamaConfig
    routed_family = "llama"


class AHAQwen2ForCausalLM(RoutedCausalLM, Qwen2ForCausalLM):
    """Qwen2 causal LM with All-or-Here attention (model_type ``"aha_qwen2"``); no Qwen2 sliding window."""

    config_class = AHAQwen2Config
    routed_family = "qwen2"

    def __init__(self, config: AHAQwen2Config):
        if getattr(config, "use_sliding_window", False):
            raise ValueError("config.use_sliding_window: Qwen2's sliding-window layers are not supported with AHA")
        super().__init__(config)
