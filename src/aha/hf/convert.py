"""Add a router to a Llama, Qwen2 or OLMo-2 checkpoint, ready to be fine-tuned into an AHA model.

The converted model computes exactly what the original did: each layer's q_proj
gets Hq gate rows of zeros and the router a bias of ``init_logit`` > 0, so every
gate starts All (sigmoid(init_logit) > 0.5) whatever the input. Fine-tuning with
the sparsity term (docs/training.md) then teaches the routers where Here suffices.

    python -m aha.hf.convert SRC DST --window 256
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

__all__ = ["add_router", "convert_checkpoint", "FAMILIES"]

# base model_type -> (family, routed config class name, routed model class name)
FAMILIES = {
    "olmo2": ("olmo2", "FAOlmoConfig", "FAOlmoForCausalLM"),
    "llama": ("llama", "AHALlamaConfig", "AHALlamaForCausalLM"),
    "qwen2": ("qwen2", "AHAQwen2Config", "AHAQwen2ForCausalLM"),
}
_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map")
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "generation_config.json",
)


def _routed_classes(model_type: str):
    import aha.hf as hf

    if model_type not in FAMILIES:
        raise ValueError(f"model: add_router converts {', '.join(FAMILIES)} models, got model_type {model_type!r}")
    _, config_name, model_name = FAMILIES[model_type]
    return getattr(hf, config_name), getattr(hf, model_name)


def remade(model, config_cls, model_cls, **changes):
    """A new, untrained ``model_cls`` on ``model``'s device and dtype, with ``model``'s config fields and ``changes``."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_COPIED}
    ref = next(model.parameters())
    return model_cls(config_cls(**{**fields, **changes})).to(device=ref.device, dtype=ref.dtype)


def add_router(model, *, window: int, init_logit: float = 1.0):
    """A routed copy of ``model`` (an Olmo2, Llama or Qwen2 ``*ForCausalLM``) with the same logits.

    Args:
        model: the transformers model to convert; it is not modified.
        window: ``local_window_size`` of the new model (keys a Here token reads).
        init_logit: the router bias at the start, > 0 so that every gate is All.
            About 1 keeps the straight-through gradient s(1 - s) near its peak.

    Returns:
        a FAOlmoForCausalLM, AHALlamaForCausalLM or AHAQwen2ForCausalLM on model's device and dtype,
        with ``router_bias=True``.
    """
    if not init_logit > 0:
        raise ValueError(f"init_logit must be > 0 so that every gate starts All, got {init_logit!r}")
    config_cls, model_cls = _routed_classes(getattr(model.config, "model_type", None))
    routed = remade(model, config_cls, model_cls, local_window_size=window, router_bias=True)

    state = dict(model.state_dict())
    heads = routed.config.num_attention_heads
    for i, layer in enumerate(routed.model.layers):
        prefix = f"model.layers.{i}.self_attn."
        w = state[prefix + "q_proj.weight"]
        state[prefix + "q_proj.weight"] = torch.cat([w, w.new_zeros(heads, w.shape[1])])  # gate rows: 0
        if prefix + "q_proj.bias" in state:
            b = state[prefix + "q_proj.bias"]
            state[prefix + "q_proj.bias"] = torch.cat([b, b.new_zeros(heads)])
        state[prefix + "gate_bias"] = torch.full_like(layer.self_attn.gate_bias, float(init_logit))
    routed.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        routed.generation_config = model.generation_config
    return routed.train(model.training)


def convert_checkpoint(src, dst, *, window: int, init_logit: float = 1.0, dtype=None):
    """Load the checkpoint at ``src``, add a router, save it to ``dst`` (with the tokenizer files)."""
    from transformers import AutoModelForCausalLM

    import aha.hf  # noqa: F401  (registers the routed types)

    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    routed = add_router(model, window=window, init_logit=init_logit)
    routed.save_pretrained(dst)
    copy_tokenizer_files(src, dst)
    return routed


def copy_tokenizer_files(src, dst) -> None:
    """Copy the tokenizer files of the checkpoint directory ``src`` into ``dst``, keeping those ``dst`` has."""
    if not Path(src).is_dir():
        return
    for pattern in _TOKENIZER_FILES:
        for f in Path(src).glob(pattern):
            if not (Path(dst) / f.name).exists():
                shutil.copy2(f, Path(dst) / f.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m aha.hf.convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory (or hub id) of an Olmo2, Llama or Qwen2 causal LM")
    p.add_argument("dst", help="output directory")
    p.add_argument("--window", type=int, required=True, help="local_window_size: keys a Here token reads")
    p.add_argument("--init-logit", type=float, default=1.0, help="initial router bias (> 0: every gate All)")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be >= 1 (the keys a Here token reads), got {args.window}")
    try:
        convert_checkpoint(args.src, args.dst, window=args.window, init_logit=args.init_logit)
    except OSError as exc:
        if Path(args.src).exists():
            raise
        p.error(
            f"src {args.src!r}: no such checkpoint directory, and it could not be loaded as a model id "
            f"({str(exc).splitlines()[0]})"
        )
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
