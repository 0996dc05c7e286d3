"""FAOlmo: OLMo-2 with All-or-Here attention, the released AHA-OLMo2 checkpoint format.

The model is transformers' ``Olmo2ForCausalLM`` with every layer's attention
replaced by `aha.hf._routing.HFAHAAttention`. Weight names are OLMo-2's;
``model.layers.*.self_attn.q_proj.weight`` has ``Hq * D + Hq`` rows, the last Hq
being the router (gate logits). The router reads the same input as q_proj, the
layer's hidden state (OLMo-2 has no pre-attention norm), and q_norm covers the
Hq * D query rows only. Gate = 1[sigmoid(logit) > 0.5], 1 = All.

``FAOlmoModel`` is the bare model (hidden states, no LM head), as ``Olmo2Model``.
"""

from __future__ import annotations

from transformers import GenerationMixin, Olmo2ForCausalLM, Olmo2Model

from aha.hf._routing import RoutedCausalLM, RoutedModel
from aha.hf.configuration_faolmo import FAOlmoConfig

__all__ = ["FAOlmoModel", "FAOlmoForCausalLM"]


class FAOlmoModel(RoutedModel, Olmo2Model):
    """The bare OLMo-2 decoder with All-or-Here attention (model_type ``"faolmo"``)."""

    config_class = FAOlmoConfig
    routed_family = "olmo2"


class FAOlmoForCausalLM(RoutedCausalLM, Olmo2ForCausalLM, GenerationMixin):
    """OLMo-2 causal LM with All-or-Here attention (model_type ``"faolmo"``)."""

    config_class = FAOlmoConfig
    base_model_class = FAOlmoModel
