"""Configurations of routed (AHA) transformers models.

``FAOlmoConfig`` (model_type ``"faolmo"``) is an OLMo-2 configuration with
``local_window_size``: the released AHA-OLMo2 format. ``AHALlamaConfig`` and
``AHAQwen2Config`` do the same for the Llama and Qwen2 checkpoints that
`aha.hf.convert.add_router` produces.

Tensor parallelism (``tp_plan="auto"``): q_proj carries each head's query rows and, after all of
them, one gate row per head, so an even split of its rows would cut heads and gates apart. The
routed configs therefore gather the q, k and v projections' outputs (each rank computes every head's
attention) and split o_proj's input, as OLMo-2's own plan does for its q/k norms; the MLPs, the
embeddings and the LM head are sharded as in the base model.

Fields beside the base model's:
    local_window_size: keys a Here token reads, its own included (``window`` of aha.attention).
    router_bias: the router has a bias (``self_attn.gate_bias``); false in the released
        checkpoints, true in converted ones (a bias-free router cannot start with every gate All).
"""

from __future__ import annotations

from transformers import LlamaConfig, Olmo2Config, Qwen2Config

__all__ = ["FAOlmoConfig", "AHALlamaConfig", "AHAQwen2Config", "ROUTED_FIELDS"]

ROUTED_FIELDS = ("local_window_size", "router_bias")
DEFAULT_WINDOW = 256


def _routed_tp_plan(base: dict) -> dict:
    """The base model's TP plan with the attention gathered: no split cuts the gate rows from their heads."""
    plan = dict(base)
    for proj in ("q_proj", "k_proj", "v_proj"):
        plan[f"layers.*.self_attn.{proj}"] = "colwise_gather_output"
    plan["layers.*.self_attn.o_proj"] = "rowwise_split_input"
    return plan


def _set_routed_fields(config, local_window_size, router_bias) -> None:
    if isinstance(local_window_size, bool) or not isinstance(local_window_size, int) or local_window_size < 1:
        raise ValueError(f"local_window_size must be an int >= 1, got {local_window_size!r}")
    config.local_window_size = local_window_size
    config.router_bias = bool(router_bias)


def _with_routed_fields(config, diff: dict) -> dict:
    # Always written, even when equal to the default: readers of config.json rely on it.
    diff["local_window_size"] = config.local_window_size
    return diff


class FAOlmoConfig(Olmo2Config):
    """OLMo-2 with All-or-Here attention (AHA-OLMo2); see the module docstring for the new fields."""

    model_type = "faolmo"
    base_model_tp_plan = _routed_tp_plan(Olmo2Config.base_model_tp_plan)

    def __init__(self, local_window_size: int = DEFAULT_WINDOW, router_bias: bool = False, **kwargs):
        _set_routed_fields(self, local_window_size, router_bias)
        super().__init__(**kwargs)

    def to_diff_dict(self):
        return _with_routed_fields(self, super().to_diff_dict())


class AHALlamaConfig(LlamaConfig):
    """Llama with All-or-Here attention."""

    model_type = "aha_llama"
    base_model_tp_plan = _routed_tp_plan(LlamaConfig.base_model_tp_plan)

    def __init__(self, local_window_size: int = DEFAULT_WINDOW, router_bias: bool = False, **kwargs):
        _set_routed_fields(self, local_window_size, router_bias)
        super().__init__(**kwargs)

    def to_diff_dict(self):
        return _with_routed_fields(self, super().to_diff_dict())


class AHAQwen2Config(Qwen2Config):
    """Qwen2 with All-or-Here attention (full attention in every layer: no Qwen2 sliding window)."""

    model_type = "aha_qwen2"
    base_model_tp_plan = _routed_tp_plan(Qwen2Config.base_model_tp_plan)

    def __init__(self, local_window_size: int = DEFAULT_WINDOW, router_bias: bool = False, **kwargs):
        _set_routed_fields(self, local_window_size, router_bias)
        super().__init__(**kwargs)

    def to_diff_dict(self):
        return _with_routed_fields(self, super().to_diff_dict())
