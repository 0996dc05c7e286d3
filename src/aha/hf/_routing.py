"""What the routed transformers models share: the attention adapter, the model surgery and the mixins.

A routed model is the base model (OLMo-2, Llama, Qwen2) with each layer's
``self_attn`` replaced by `HFAHAAttention`, an `aha.nn.AHAAttention`
with the base attention's parameter names and call convention. Everything
else (embeddings, norms, MLPs, rotary embedding, cache handling, generate) is
transformers' own code, so state dicts match the base model's except for the
router: ``q_proj`` carries Hq extra rows (the gate logits) and, with
``router_bias``, ``self_attn.gate_bias`` [Hq].

The bare model (`RoutedModel` + e.g. ``Olmo2Model``) reads the batch's padding and packing once per
forward pass (`describe_batch`) and hands the resulting `aha.masks.Sequences` to every layer; the
causal LM (`RoutedCausalLM` + e.g. ``Olmo2ForCausalLM``) holds a routed bare model.

``attn_implementation``: ``"sdpa"`` (the default) runs ``aha.attention`` on the backend the
registry picks; ``"eager"`` runs the plain path (`aha.nn.plain_attention`), which also returns the
attention weights. Any other value (flash-attention, flex-attention, hub kernels) is refused.
"""

import inspect

import torch
from torch import nn

from aha import masks
from aha.nn import AHAAttention, cache_layout

try:  # the annotation transformers' tests read to see that a forward takes output_attentions
    from transformers.processing_utils import Unpack
    from transformers.utils import TransformersKwargs

    _Kwargs = Unpack[TransformersKwargs]
except ImportError:  # pragma: no cover - older transformers
    _Kwargs = object

__all__ = [
    "HFAHAAttention",
    "RoutedModel",
    "RoutedCausalLM",
    "route_attention",
    "describe_batch",
    "SEQUENCES",
    "ATTN_IMPLEMENTATIONS",
]

SEQUENCES = "aha_sequences"  # the keyword under which the layers receive the batch's aha.masks.Sequences
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class HFAHAAttention(AHAAttention):
    """AHAAttention called the way transformers' decoder layers call their attention.

    Takes the rotary ``position_embeddings`` and the cache (``cache`` or, in older
    transformers, ``past_key_values``) from the decoder layer, and the batch's padding or
    packing as an `aha.masks.Sequences` that `describe_batch` built once for every layer
    (keyword ``aha_sequences``); called without it, it reads its own ``attention_mask``.
    Returns ``(output, weights)``: weights [B, Hq, N, keys] from the plain path when the model's
    ``attn_implementation`` is ``"eager"`` or the call asks for ``output_attentions``, else None.
    """

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config  # the model's: attn_implementation is read at each call

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.get("past_key_values")
        eager = getattr(self.config, "_attn_implementation", None) == "eager"
        weights = eager or bool(kwargs.get("output_attentions"))
        if SEQUENCES in kwargs:
            sequences = kwargs[SEQUENCES]
        else:  # a layer called without the model's forward: read its own arguments
            b, n = hidden_states.shape[:2]
            _, len_k, used = cache_layout(cache, self.layer_idx, n)
            sequences = _sequences(b, n, len_k, used, attention_mask, kwargs, hidden_states.device)
        out = super().forward(
            hidden_states,
            position_embeddings=position_embeddings,
            cache=cache,
            sequences=sequences,
            return_weights=weights,
        )
        return out if weights else (out, None)


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
    """Replace the attention of every decoder layer of a freshly built bare model (``model.layers``).

    Call it in ``__init__`` after the base class built the model and before
    ``post_init()``, which then initialises only the new modules.
    """
    kw = _attention_kwargs(model.config, family)
    ref = model.layers[0].self_attn.q_proj.weight if len(model.layers) else None
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    for i, layer in enumerate(model.layers):
        layer.self_attn = HFAHAAttention(**kw, layer_idx=i, config=model.config, **factory)


def _sequences(b: int, n: int, len_k: int, used, mask, kwargs: dict, device) -> masks.Sequences | None:
    """The batch's sequences from transformers' arguments: the padding mask (2-D over past and current
    tokens, or 4-D causal plus padding), the position ids, and the flash-attention keywords
    ``cu_seq_lens_q/_k``, ``max_length_q/_k``."""
    return masks.sequences(
        b, n, len_k,
        attention_mask=mask,
        position_ids=kwargs.get("position_ids"),
        cu_seqlens_q=kwargs.get("cu_seq_lens_q"),
        cu_seqlens_k=kwargs.get("cu_seq_lens_k"),
        max_seqlen_q=kwargs.get("max_length_q"),
        max_seqlen_k=kwargs.get("max_length_k"),
        used=used,
        device=device,
    )  # fmt: skip


def describe_batch(x: torch.Tensor, cache, kwargs: dict) -> dict:
    """Read the batch's padding and packing once, for every layer: returns the base forward's new keywords.

    ``x``: the input ids or embeddings [B, N, ...]. Accepts a 2-D ``attention_mask`` over past and
    current tokens (left padding as ``generate()`` makes it, right padding, both; with or without a
    cache; a 0 between 1s is refused), a 4-D mask that is a causal mask plus padding, ``position_ids``
    that restart for each packed sequence (``DataCollatorWithFlattening``) and the flash-attention
    keywords ``cu_seq_lens_q/_k``, ``max_length_q/_k``. A fixed-size cache (``StaticCache``) is read
    up to its filled slots. The layers get the result as ``aha_sequences`` (None for a batch of whole
    rows); transformers' mask builder gets a 4-D placeholder (an expanded view, no memory) so that
    no [B, 1, N, keys] mask is built for layers that would not read it.
    """
    b, n = x.shape[:2]
    _, len_k, used = cache_layout(cache, 0, n)
    kwargs[SEQUENCES] = _sequences(b, n, len_k, used, kwargs.get("attention_mask"), kwargs, x.device)
    kwargs["attention_mask"] = torch.ones((), dtype=torch.bool, device=x.device).expand(b, 1, n, len_k)
    return kwargs


def _refuse_attn_implementation(cls, requested) -> str:
    """``None`` -> ``"sdpa"``; ``"sdpa"`` and ``"eager"`` as they are; anything else a ValueError."""
    if requested is None:
        return "sdpa"
    if isinstance(requested, str) and requested in ATTN_IMPLEMENTATIONS:
        return requested
    raise ValueError(
        f'Specified `attn_implementation="{requested}"` is not supported by {cls.__name__}: AHA layers compute '
        "attention with aha.attention; use 'sdpa' (the default: the fastest aha backend for the inputs, see aha.backends(); pick "
        "one with aha.nn.set_backend(model, name)) or 'eager' (a plain PyTorch path that also returns the "
        "attention weights). Flash-attention, flex-attention and hub kernels compute plain causal attention, "
        "not All-or-Here"
    )


class _Routed:
    """What the routed bare models and causal LMs share: attention implementations, recorded outputs,
    weight init of the router."""

    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # fullgraph compiles need a backend that traces whole (triton) or attn_implementation="eager": aha's
    # default CPU backends branch on values, where dynamo breaks the graph (tests/test_hf_generation.py)
    _can_compile_fullgraph = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        record = dict(getattr(cls, "_can_record_outputs", None) or {})
        if "attentions" in record:  # the base's attention class no longer appears in the model
            cls._can_record_outputs = {**record, "attentions": HFAHAAttention}

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        return _refuse_attn_implementation(type(self), attn_implementation)

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        return _refuse_attn_implementation(type(self), requested_attention)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # the layers read config._attn_implementation at every call

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AHAAttention) and module.gate_bias is not None:
            nn.init.zeros_(module.gate_bias)  # the one parameter transformers does not know


def _cache_arg() -> str:
    """The name transformers' bare models give their cache argument: ``cache`` (5.2x) or ``past_key_values``."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_arg()


def _renames_past_key_values(forward):
    """transformers >= 5.2x renamed ``past_key_values`` to ``cache``: take the old name with its warning."""
    if _CACHE_ARG != "cache":
        return forward
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)  # as the base models' forward


class RoutedModel(_Routed):
    """Mixin placed before a transformers bare model (``Olmo2Model``, ...): builds it, then routes its
    attention; its forward describes the batch once for every layer (`describe_batch`).

    Subclasses set ``config_class`` and ``routed_family`` ("olmo2", "llama" or "qwen2").
    """

    routed_family: str

    def __init__(self, config):
        super().__init__(config)
        route_attention(self, self.routed_family)
        self.post_init()  # initialises only the new modules: the others are marked initialised

    @_renames_past_key_values
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs: _Kwargs,
    ):
        x = input_ids if input_ids is not None else inputs_embeds
        if x is not None:
            if cache is None:
                cache = kwargs.pop("past_key_values", None)
            kwargs.update(attention_mask=attention_mask, position_ids=position_ids)
            kwargs = describe_batch(x, cache, kwargs)
            kwargs[_CACHE_ARG] = cache
        else:  # transformers names the missing input
            kwargs.update(attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


class RoutedCausalLM(_Routed):
    """Mixin placed before a transformers ``*ForCausalLM``: the same model around a routed bare model.

    Subclasses set ``config_class`` and ``base_model_class`` (a `RoutedModel`).
    """

    base_model_class: type

    def __init__(self, config):
        # The base *ForCausalLM's __init__ would build its own bare model first; this is its body with ours.
        super(self._base_causal_lm(), self).__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _base_causal_lm(cls) -> type:
        """The transformers ``*ForCausalLM`` this class extends."""
        return next(c for c in cls.__mro__[1:] if c.__name__.endswith("ForCausalLM") and not issubclass(c, _Routed))

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        """generate()'s mask for a fixed-size cache (it compiles the forward): none when no row is
        padded (the layers read ``cache_seqlens`` alone), else transformers' 4-D causal-plus-padding
        mask, of one shape at every step, which the model turns into ``cache_leftpad``."""
        from transformers.masking_utils import create_masks_for_generate

        if attention_mask is None or (attention_mask.ndim == 2 and bool(attention_mask.all())):
            return None
        return create_masks_for_generate(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, **kwargs,
        )  # fmt: skip
