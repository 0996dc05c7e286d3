"""Fit the routers of a transformers checkpoint to its own attention, without training it.

    python -m aha.hf.calibrate SRC DST --window 256 --share 0.1 --data calibration.txt

SRC is an OLMo-2, Llama or Qwen2 checkpoint (a router is added first, as `aha.hf.convert` does)
or a routed one (FAOlmo / AHA-OLMo2, AHA-Llama, AHA-Qwen2; given a router bias if it has none).
`aha.calibration.calibrate_routers` measures each token's need for All on the calibration data with
full attention, fits each head's router by logistic regression, layer by layer on the inputs it gets
with the layers before it routed, and sets the biases for a share of All (``--share``) or an error
budget (``--budget``). DST is a routed checkpoint with
``local_window_size = --window``, loadable as any AHA checkpoint (``import aha.hf`` and
``AutoModelForCausalLM.from_pretrained(DST)``), with SRC's tokenizer files and the calibration
report (``aha_calibration.json``).

``--data``: a text file (tokenized with SRC's tokenizer), or token ids in a ``.pt`` (a torch
tensor) or ``.npy`` file, 1-D or 2-D; the ids are joined and cut into sequences of ``--length``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

__all__ = ["load_tokens", "routed_model", "calibrate_checkpoint", "REPORT"]

REPORT = "aha_calibration.json"
ROUTED_TYPES = ("faolmo", "aha_llama", "aha_qwen2")


def load_tokens(path, *, length: int, sequences: int | None = None, tokenizer_src=None) -> torch.Tensor:
    """Calibration ids [S, length] from ``path`` (text, ``.pt`` or ``.npy``), at most ``sequences`` of them."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: {path} is not a file")
    if path.suffix == ".pt":
        ids = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True))
    elif path.suffix == ".npy":
        import numpy as np

        ids = torch.as_tensor(np.load(path))
    else:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"--data: {path} is empty; give calibration text (or token ids as .pt / .npy)")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"--data: {path} is text, but no tokenizer could be loaded from {tokenizer_src} "
                f"({str(exc).splitlines()[0]}); give token ids in a .pt or .npy file instead"
            ) from exc
        ids = torch.tensor(tokenizer(text)["input_ids"])
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"--data: {path} holds {ids.dtype} values, not integer token ids")
    ids = ids.flatten().long()
    if ids.numel() == 0:
        raise ValueError(f"--data: {path} holds no tokens; give calibration text or token ids")
    count = ids.numel() // length
    if count == 0:
        raise ValueError(
            f"--data: {path} holds {ids.numel()} tokens, fewer than one sequence of --length {length}; "
            "give more data or a smaller --length"
        )
    if sequences is not None:
        count = min(count, sequences)
    return ids[: count * length].view(count, length)


def routed_model(model, *, window: int):
    """A routed model with a router bias at ``window``: converted from a base model, or the routed one as it is
    (rebuilt with ``router_bias=True`` when it has no bias)."""
    from aha.hf.convert import add_router, remade

    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROUTED_TYPES:
        return add_router(model, window=window)
    if not model.config.router_bias:
        rebuilt = remade(model, type(model.config), type(model), local_window_size=window, router_bias=True)
        missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.endswith("gate_bias") for k in missing):
            raise ValueError(
                f"SRC: the weights do not fit the routed model (missing {missing}, unexpected {unexpected})"
            )
        with torch.no_grad():
            for layer in rebuilt.model.layers:
                layer.self_attn.gate_bias.zero_()
        model = rebuilt
    model.config.local_window_size = window
    return model


def calibrate_checkpoint(
    src,
    dst,
    *,
    window: int,
    data,
    share: float | None = None,
    budget: float | None = None,
    length: int | None = None,
    sequences: int = 32,
    batch: int = 4,
    measure: str = "output",
    dtype=None,
    sequential: bool = True,
) -> dict:
    """Load ``src``, calibrate its routers on ``data`` for ``window``, save to ``dst``; returns the report."""
    from transformers import AutoModelForCausalLM

    import aha.hf  # noqa: F401  (registers the routed types)
    from aha.calibration import calibrate_routers

    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs).eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    if length is None:
        length = 4 * window if limit is None else min(limit, 4 * window)
    if length <= window:
        raise ValueError(
            f"--window: {window} keys hold every token of a calibration sequence of --length {length}, so Here = All "
            f"everywhere; use a window below {length}"
        )
    ids = load_tokens(data, length=length, sequences=sequences, tokenizer_src=src)
    model = routed_model(model, window=window)
    device = next(model.parameters()).device
    batches = [ids[i : i + batch].to(device) for i in range(0, ids.shape[0], batch)]
    report = calibrate_routers(
        model, batches, window=window, share=share, budget=budget, measure=measure, sequential=sequential
    )
    report = {**report, "source": str(src), "data": str(data), "sequences": ids.shape[0], "length": length}
    Path(dst).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    (Path(dst) / REPORT).write_text(json.dumps(report, indent=1))
    from aha.hf.convert import copy_tokenizer_files

    copy_tokenizer_files(src, dst)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m aha.hf.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory: OLMo-2, Llama or Qwen2, plain or routed")
    p.add_argument("dst", help="output directory")
    p.add_argument("--window", type=int, required=True, help="local_window_size: keys a Here token reads")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--share", type=float, help="share of All at positions >= window, in (0, 1)")
    target.add_argument("--budget", type=float, help="largest part of the measured need left to Here, in (0, 1)")
    p.add_argument("--data", required=True, help="calibration text, or token ids in a .pt / .npy file")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default 4 * window, capped)")
    p.add_argument("--sequences", type=int, default=32, help="at most this many sequences (default 32)")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--measure", choices=("output", "mass"), default="output",
                   help="what the routers predict: relative output change (default) or attention mass outside the window")  # fmt: skip
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="fit layer by layer, each on the input it gets with the layers before it routed (default; one "
                        "more pass per layer); --no-sequential fits every layer on full-attention inputs in one pass, "
                        "and the later layers then route fewer tokens All than asked")  # fmt: skip
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be >= 1 (the keys a Here token reads), got {args.window}")
    for name in ("share", "budget"):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1:
            p.error(f"--{name} must lie strictly between 0 and 1, got {value}")
    for name in ("length", "sequences", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if not Path(args.src).is_dir():
        p.error(f"src {args.src!r}: no such checkpoint directory")
    try:
        report = calibrate_checkpoint(
            args.src, args.dst, window=args.window, data=args.data, share=args.share, budget=args.budget,
            length=args.length, sequences=args.sequences, batch=args.batch, measure=args.measure,
            sequential=args.sequential,
        )  # fmt: skip
    except ValueError as exc:
        if str(exc).startswith(("--", "SRC", "model")):
            p.error(str(exc))
        raise
    print(
        f"wrote {args.dst}: All share {report['router']['all_share']:.3f} on the calibration data "
        f"(oracle {report['oracle']['all_share']:.3f}), need covered {report['router']['need_covered']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
