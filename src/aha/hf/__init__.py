"""transformers integration (the ``hf`` extra): routed models and the converter.

Importing this package registers the model types with the Auto classes, so a
checkpoint in the released AHA-OLMo2 layout (model_type ``"faolmo"``) loads with
``AutoModelForCausalLM.from_pretrained`` and no ``trust_remote_code``::

    import aha.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/aha-olmo2")

Registered: ``faolmo`` (OLMo-2), ``aha_llama``, ``aha_qwen2``, each with ``AutoModelForCausalLM``
and its bare model with ``AutoModel``.
"""

from __future__ import annotations

try:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"aha.hf needs transformers ({exc}); pip install 'aha-attention[hf]'") from exc

from aha.hf.configuration_faolmo import AHALlamaConfig, AHAQwen2Config, FAOlmoConfig
from aha.hf.modeling_aha import AHALlamaForCausalLM, AHALlamaModel, AHAQwen2ForCausalLM, AHAQwen2Model
from aha.hf.modeling_faolmo import FAOlmoForCausalLM, FAOlmoModel


def __getattr__(name: str):
    """``add_router`` and ``convert_checkpoint`` load ``aha.hf.convert`` on first use, so that
    ``python -m aha.hf.convert`` runs that module once, as ``__main__``, without a runpy warning."""
    if name in ("add_router", "convert_checkpoint"):
        from aha.hf import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'aha.hf' has no attribute {name!r}")


__all__ = [
    "FAOlmoConfig",
    "FAOlmoModel",
    "FAOlmoForCausalLM",
    "AHALlamaConfig",
    "AHALlamaModel",
    "AHALlamaForCausalLM",
    "AHAQwen2Config",
    "AHAQwen2Model",
    "AHAQwen2ForCausalLM",
    "add_router",
    "convert_checkpoint",
]

for _config, _bare, _lm in (
    (FAOlmoConfig, FAOlmoModel, FAOlmoForCausalLM),
    (AHALlamaConfig, AHALlamaModel, AHALlamaForCausalLM),
    (AHAQwen2Config, AHAQwen2Model, AHAQwen2ForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _bare, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
