"""Our tester classes for transformers' ModelTesterMixin: tiny AHA models and their inputs.

The sizes follow transformers' own causal-LM testers (13 rows of 7 tokens, 2 layers, width 32), so
that the mixin's shape checks hold; the window (3) is shorter than the rows, so Here differs from
All. The common inputs carry a right-padded mask (row i holds i + 1 tokens), as upstream's testers
use; AHA takes it as packed sequences.
"""

from __future__ import annotations

import torch

from aha.hf import (
    AHALlamaConfig,
    AHALlamaForCausalLM,
    AHALlamaModel,
    AHAQwen2Config,
    AHAQwen2ForCausalLM,
    AHAQwen2Model,
    FAOlmoConfig,
    FAOlmoForCausalLM,
    FAOlmoModel,
)


class AHACausalLMTester:
    """What ModelTesterMixin asks of ``self.model_tester``."""

    config_class: type
    base_model_class: type
    causal_lm_class: type

    def __init__(self, parent, batch_size=13, seq_length=7, window=3):
        self.parent = parent
        self.batch_size, self.seq_length, self.window = batch_size, seq_length, window
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.intermediate_size = 37
        self.max_position_embeddings = 512
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.type_sequence_label_size = 2

    @property
    def all_model_classes(self) -> tuple:
        return self.base_model_class, self.causal_lm_class

    def get_config(self):
        return self.config_class(
            local_window_size=self.window,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_length))
        attention_mask = torch.tril(torch.ones_like(input_ids))  # right padding: row i holds i + 1 tokens
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class FAOlmoTester(AHACausalLMTester):
    config_class, base_model_class, causal_lm_class = FAOlmoConfig, FAOlmoModel, FAOlmoForCausalLM


class AHALlamaTester(AHACausalLMTester):
    config_class, base_model_class, causal_lm_class = AHALlamaConfig, AHALlamaModel, AHALlamaForCausalLM


class AHAQwen2Tester(AHACausalLMTester):
    config_class, base_model_class, causal_lm_class = AHAQwen2Config, AHAQwen2Model, AHAQwen2ForCausalLM


TESTERS = (FAOlmoTester, AHALlamaTester, AHAQwen2Tester)


def _controls() -> tuple:
    """The same testers on transformers' plain models (Olmo2, Llama, Qwen2): the control run."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaModel,
        Olmo2Config,
        Olmo2ForCausalLM,
        Olmo2Model,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2Model,
    )

    classes = {
        "Olmo2": (Olmo2Config, Olmo2Model, Olmo2ForCausalLM),
        "Llama": (LlamaConfig, LlamaModel, LlamaForCausalLM),
        "Qwen2": (Qwen2Config, Qwen2Model, Qwen2ForCausalLM),
    }
    return tuple(
        type(
            f"{name}ControlTester",
            (AHACausalLMTester,),
            dict(zip(("config_class", "base_model_class", "causal_lm_class"), trio), get_config=_plain_config),
        )
        for name, trio in classes.items()
    )


def _plain_config(self):
    config = AHACausalLMTester.get_config(self)
    del config.local_window_size  # the plain models have no window
    return config
