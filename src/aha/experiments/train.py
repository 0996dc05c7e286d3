"""Pretraining with full attention, fine-tuning with routers, and held-out evaluation."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from aha.experiments.corpus import plant_passkeys, sample_batch
from aha.experiments.model import GateRecorder, init_routers, lm_loss, set_window
from aha.nn import aha_layers
from aha.training import RouterSparsity

__all__ = ["TrainConfig", "train", "finetune", "evaluate", "gate_shares", "forced_gates"]

INIT_LOGIT = 1.0  # router bias at the start of fine-tuning: every gate All, s(1 - s) near its peak (aha.hf.add_router)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_lr_scale: float = 1.0
    seed: int = 0
    passkey_fraction: float = 0.0  # share of training sequences given a planted passkey (corpus.plant_passkeys)
    passkey_repeats: int = 1  # how often the planted passkey line comes again later in its sequence

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine down to min_lr_ratio * lr."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; decay on matrices only and never on the routers (the sparsity term is their only pull to Here).

    The routers get ``router_lr_scale`` times the learning rate: they are new and start from zero.
    """
    routers = {id(p) for layer in aha_layers(model) for p in layer.router.parameters()}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in routers]
    rest = [p for p in model.parameters() if p.ndim < 2 and id(p) not in routers]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "scale": 1.0},
        {"params": rest, "weight_decay": 0.0, "scale": 1.0},
        {
            "params": [p for p in model.parameters() if id(p) in routers],
            "weight_decay": 0.0,
            "scale": cfg.router_lr_scale,
        },
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def train(
    model: nn.Module, data: torch.Tensor, cfg: TrainConfig, *, lam: float | None = None, tick=None, log_every: int = 10
) -> dict:
    """Train ``model`` on random windows of ``data``: LM loss, plus ``lam * mean(sigmoid(logits))`` if lam is set.

    A ``cfg.passkey_fraction`` of the windows get a synthetic passkey line, repeated ``cfg.passkey_repeats``
    times further on (``plant_passkeys``).

    ``tick(loss)`` is called after every step (progress). Returns the curve
    [[steps done, mean lm loss since the last entry, share of All in that step's batch or None], ...]
    after the first step and every ``log_every``, tokens, wall and CPU seconds.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    sparsity = RouterSparsity(model, lam) if lam is not None else None
    context = model.cfg.context
    curve, recent, start, cpu = [], [], time.perf_counter(), time.process_time()
    model.train()
    try:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step) * group["scale"]
            ids = sample_batch(data, cfg.batch, context + 1, gen)  # (B, context + 1)
            if cfg.passkey_fraction > 0:
                ids = plant_passkeys(ids, cfg.passkey_fraction, gen, cfg.passkey_repeats)
            lm = lm_loss(model, ids)
            loss = lm if sparsity is None else lm + sparsity()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            recent.append(float(lm.detach()))
            if step == 0 or (step + 1) % log_every == 0 or step == cfg.steps - 1:
                share = None
                if sparsity is not None:
                    share = float(torch.cat([x.detach().flatten() for x in sparsity.logits()]).gt(0).float().mean())
                curve.append([step + 1, sum(recent) / len(recent), share])
                recent = []
            if tick is not None:
                tick(recent[-1] if recent else curve[-1][1])
    finally:
        if sparsity is not None:
            sparsity.close()
    model.eval()
    return {
        "curve": curve,
        "tokens": cfg.steps * cfg.batch * context,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


def finetune(pretrained: nn.Module, data, cfg: TrainConfig, *, window: int, lam: float, tick=None):
    """A copy of ``pretrained`` at ``window`` with every router reset to All, fine-tuned with ``lam``."""
    model = copy.deepcopy(pretrained)
    set_window(model, window)
    init_routers(model, INIT_LOGIT)
    return model, train(model, data, cfg, lam=lam, tick=tick)


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor, batch: int = 16) -> tuple[float, torch.Tensor]:
    """Mean next-byte loss (nats) on ids [S, N] and the gates [L, S, Hq, N-1] of every token (bool, 1 = All)."""
    model.eval()
    total = 0.0
    with GateRecorder(model) as rec:
        for s in range(0, ids.shape[0], batch):
            total += float(lm_loss(model, ids[s : s + batch], reduction="sum"))
        gates = rec.gates()
    return total / (ids.shape[0] * (ids.shape[1] - 1)), gates


def gate_shares(gates: torch.Tensor, window: int) -> dict:
    """Shares of All from gates [L, S, Hq, N].

    ``all_share`` counts every token; the others only positions >= window, where
    Here reads fewer keys than All and the choice can matter (below the window
    Here == All, and the sparsity term alone decides).
    """
    g = gates.float()
    beyond = g[..., window:]  # (L, S, Hq, N - window)
    return {
        "all_share": float(g.mean()),
        "all_share_beyond_window": float(beyond.mean()) if beyond.numel() else None,
        "per_layer": beyond.mean((1, 2, 3)).tolist(),
        "per_head": beyond.mean((1, 3)).tolist(),  # [L][Hq]
        "per_position": g.mean((0, 1, 2)).tolist(),  # [N]
    }


class forced_gates:
    """Within the block every router of ``model`` gives All (``all_=True``) or Here, whatever its input."""

    def __init__(self, model: nn.Module, all_: bool):
        self.model, self.logit = model, INIT_LOGIT if all_ else -INIT_LOGIT

    def __enter__(self):
        self.saved = [copy.deepcopy(layer.router.state_dict()) for layer in aha_layers(self.model)]
        init_routers(self.model, self.logit)
        return self.model

    def __exit__(self, *exc):
        for layer, state in zip(aha_layers(self.model), self.saved):
            layer.router.load_state_dict(state)
