"""Llama and Qwen2 with All-or-Here attention: the models `aha.hf.convert.add_router` makes.

Same construction as `aha.hf.modeling_faolmo`: the base model with every
layer's attention replaced, q_proj extended by Hq gate rows. The router reads
the attention's input (after the layer's ``input_layernorm``). ``AHALlamaModel``
and ``AHAQwen2Model`` are the bare models.
"""

from __future__ import annotations

from transformers import GenerationMixin, LlamaForCausalLM, LlamaModel, Qwen2ForCausalLM, Qwen2Model

from aha.hf._routing import RoutedCausalLM, RoutedModel
from aha.hf.configuration_faolmo import AHALlamaConfig, AHAQwen2Config

__all__ = ["AHALlamaModel", "AHALlamaForCausalLM", "AHAQwen2Model", "AHAQwen2ForCausalLM"]


def _no_sliding_window(config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ValueError("config.use_sliding_window: Qwen2's sliding-window layers are not supported with AHA")


class AHALlamaModel(RoutedModel, LlamaModel):
    """The bare Llama decoder with All-or-Here attention (model_type ``"aha_llama"``)."""

    config_class = AHALlamaConfig
    routed_family = "llama"


class AHALlamaForCausalLM(RoutedCausalLM, LlamaForCausalLM, GenerationMixin):
    """Llama causal LM with All-or-Here attention (model_type ``"aha_llama"``)."""

    config_class = AHALlamaConfig
    base_model_class = AHALlamaModel


class AHAQwen2Model(RoutedModel, Qwen2Model):
    """The bare Qwen2 decoder with All-or-Here attention (model_type ``"aha_qwen2"``); no Qwen2 sliding window."""

    config_class = AHAQwen2Config
    routed_family = "qwen2"

    def __init__(self, config: AHAQwen2Config):
        _no_sliding_window(config)
        super().__init__(config)


class AHAQwen2ForCausalLM(RoutedCausalLM, Qwen2ForCausalLM, GenerationMixin):
    """Qwen2 causal LM with All-or-Here attention (model_type ``"aha_qwen2"``); no Qwen2 sliding window."""

    config_class = AHAQwen2Config
    base_model_class = AHAQwen2Model

    def __init__(self, config: AHAQwen2Config):
        _no_sliding_window(config)
        super().__init__(config)
