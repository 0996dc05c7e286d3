"""A small byte-level decoder whose attention is aha.nn.AHAAttention, with the router it carries.

Pretraining uses window = context: a Here token then reads every key, the gate
cannot change anything and AHAAttention runs plain causal attention. Fine-tuning
sets a smaller window and starts every router at All (zero weight, bias > 0, as
aha.hf.add_router does), so the fine-tune starts from exactly the full model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from aha.nn import AHAAttention, RMSNorm, aha_layers

__all__ = ["ModelConfig", "ByteLM", "lm_loss", "set_window", "init_routers", "GateRecorder"]


@dataclass(frozen=True)
class ModelConfig:
    context: int = 512
    layers: int = 4
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    vocab: int = 256
    qk_norm: str | None = "head"

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        w = cfg.width
        self.norm1, self.norm2 = RMSNorm(w), RMSNorm(w)
        # router_bias: a bias-free linear router cannot start All for every input (see aha.hf.convert)
        self.attn = AHAAttention(
            w, cfg.heads, window=cfg.context, qk_norm=cfg.qk_norm, router_bias=True, layer_idx=layer_idx
        )
        self.mlp = nn.Sequential(nn.Linear(w, cfg.mlp_ratio * w), nn.GELU(), nn.Linear(cfg.mlp_ratio * w, w))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Byte embedding, ``layers`` AHA blocks, tied output head. forward(ids [B, N]) -> logits [B, N, 256]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.width)
        nn.init.normal_(self.embed.weight, std=cfg.width**-0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.cfg.context:
            raise ValueError(f"ids: {ids.shape[-1]} tokens exceed the context of {self.cfg.context}")
        x = self.embed(ids)  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # (B, N, V)


def lm_loss(model: nn.Module, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-byte cross entropy (nats) of ``model`` on ids [B, N]; reduction="none" gives [B, N-1]."""
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction=reduction)
    return loss.view(ids.shape[0], -1) if reduction == "none" else loss


def set_window(model: nn.Module, window: int) -> None:
    """The Here window of every AHA layer."""
    for layer in aha_layers(model):
        layer.window = window


@torch.no_grad()
def init_routers(model: nn.Module, logit: float) -> None:
    """Every router: zero weight, bias ``logit``; logit > 0 makes every gate All, < 0 every gate Here."""
    for layer in aha_layers(model):
        layer.router.weight.zero_()
        layer.router.bias.fill_(logit)


class GateRecorder:
    """Keeps the bool gate [B, Hq, N] of every AHA layer from each forward pass while attached.

    ``gates()`` stacks them: [L, B_total, Hq, N] over every pass (all of the same length).
    aha.training.GateStats counts shares per position; the probe needs each token's gate.
    """

    def __init__(self, model: nn.Module):
        self.layers = aha_layers(model)
        self._seen: list[list[torch.Tensor]] = [[] for _ in self.layers]
        index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._handles = [
            layer.observe(lambda m, logits, gate, offset: self._seen[index[id(m)]].append(gate.detach().bool().cpu()))
            for layer in self.layers
        ]

    def gates(self) -> torch.Tensor:
        return torch.stack([torch.cat(g) for g in self._seen])  # (L, B, Hq, N)

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
