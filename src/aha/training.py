"""Training helpers for AHA models: the sparsity term and gate statistics.

Both attach to the `aha.nn.AHAAttention` layers of a model as observers;
nothing is global and nothing runs unless a helper is attached::

    sparsity = RouterSparsity(model)           # lambda = LAMBDA = 3e-4
    out = model(input_ids, labels=labels)
    loss = out.loss + sparsity()               # lambda * mean(sigmoid(router logits))

    with GateStats(model) as stats:            # off by default: only while attached
        model.generate(...)
    stats.per_layer()                          # share of All per layer

See docs/training.md for the recipe. Routers can also be fitted to a trained model without
training it, from its own attention: `calibrate_routers` (from `aha.calibration`)::

    report = calibrate_routers(model, batches, window=256, share=0.1)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from aha.calibration import calibrate_routers
from aha.nn import AHAAttention, aha_layers

__all__ = ["LAMBDA", "sparsity_term", "RouterSparsity", "GateStats", "calibrate_routers"]

LAMBDA = 3e-4  # the paper's weight of the L1 term on the router probabilities


def sparsity_term(logits: torch.Tensor | Iterable[torch.Tensor], lam: float = LAMBDA) -> torch.Tensor:
    """lam * mean(sigmoid(logits)), the mean taken over every element of every tensor given.

    Pushes routers towards Here (gate 0); float32 whatever the logits' dtype.
    """
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    flat = [x.float().reshape(-1) for x in logits]
    if not flat:
        raise ValueError("logits: no router logits given (has the model run a forward pass?)")
    return lam * torch.sigmoid(torch.cat(flat)).mean()


class _Attached:
    """Observes every AHA layer of a model until ``close()`` (or the end of a ``with`` block)."""

    def __init__(self, model: nn.Module):
        self.layers = aha_layers(model)
        if not self.layers:
            raise ValueError(f"model: {type(model).__name__} has no aha.nn.AHAAttention layer to observe")
        self._handles = [layer.observe(self._observe) for layer in self.layers]

    def _observe(self, layer: AHAAttention, logits, gate, offset: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RouterSparsity(_Attached):
    """The sparsity term of the latest forward pass of ``model``: ``lam * mean(sigmoid(logits))``.

    Each layer's logits are kept until its next forward pass (so a re-run of the
    layer, as in activation checkpointing, replaces rather than adds). Call the
    object after the forward pass and add the result to the loss.
    """

    def __init__(self, model: nn.Module, lam: float = LAMBDA):
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam = lam
        self._logits: dict[int, torch.Tensor] = {}
        super().__init__(model)

    def _observe(self, layer, logits, gate, offset):
        self._logits[id(layer)] = logits

    def logits(self) -> list[torch.Tensor]:
        """The latest router logits [B, Hq, N] of each layer, in layer order."""
        missing = [i for i, layer in enumerate(self.layers) if id(layer) not in self._logits]
        if missing:
            raise RuntimeError(f"no forward pass has reached AHA layers {missing} since RouterSparsity was attached")
        return [self._logits[id(layer)] for layer in self.layers]

    def __call__(self) -> torch.Tensor:
        logits = self.logits()
        trainable = any(p.requires_grad for layer in self.layers for p in layer.parameters())
        if torch.is_grad_enabled() and trainable and not any(x.requires_grad for x in logits):
            raise RuntimeError(
                "RouterSparsity: the router logits of the last forward pass carry no gradient; was the model run "
                "under torch.no_grad(), or with reentrant activation checkpointing (use use_reentrant=False)?"
            )
        return sparsity_term(logits, self.lam)

    def clear(self) -> None:
        """Forget the logits (and the graph they hold)."""
        self._logits.clear()


class GateStats(_Attached):
    """Counts the tokens routed All, per layer, head and absolute position, while attached.

    The counting is a sum over the batch added into a device tensor: no sync,
    no copy to the host until a share is asked for. Each forward pass of a layer
    counts once; under activation checkpointing the recomputed pass counts again,
    so collect statistics in evaluation.
    """

    def __init__(self, model: nn.Module):
        self._all: list[torch.Tensor | None] = []  # per layer: [Hq, P] int64, tokens routed All
        self._seen: list[torch.Tensor | None] = []  # per layer: [P] int64, tokens seen at each position
        self._index: dict[int, int] = {}
        super().__init__(model)
        self.reset()

    def reset(self) -> None:
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._all = [None] * len(self.layers)
        self._seen = [None] * len(self.layers)

    @torch.no_grad()
    def _observe(self, layer, logits, gate, offset):
        i = self._index[id(layer)]
        b, h, n = gate.shape
        end = offset + n
        acc, seen = self._all[i], self._seen[i]
        if acc is None or acc.shape[-1] < end:
            grown = torch.zeros(h, end, dtype=torch.int64, device=gate.device)
            grown_seen = torch.zeros(end, dtype=torch.int64, device=gate.device)
            if acc is not None:
                grown[:, : acc.shape[-1]] = acc
                grown_seen[: seen.shape[-1]] = seen
            acc, seen = grown, grown_seen
        acc[:, offset:end] += gate.detach().sum(0).to(torch.int64)  # (Hq, N)
        seen[offset:end] += b
        self._all[i], self._seen[i] = acc, seen

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All counts [L, Hq, P] and tokens seen [L, P], padded to the longest position seen."""
        if any(a is None for a in self._all):
            raise RuntimeError("no forward pass has reached every AHA layer since GateStats was attached or reset")
        p = max(a.shape[-1] for a in self._all)
        acc = torch.stack([nn.functional.pad(a, (0, p - a.shape[-1])).cpu() for a in self._all])
        seen = torch.stack([nn.functional.pad(s, (0, p - s.shape[-1])).cpu() for s in self._seen])
        return acc, seen

    def all_share(self) -> float:
        """Share of (token, head, layer) routes that picked All."""
        acc, seen = self._counts()
        return float(acc.sum()) / float(seen.sum() * acc.shape[1])

    def per_layer(self) -> torch.Tensor:
        """[L] share of All of each layer."""
        acc, seen = self._counts()
        return acc.sum((1, 2)).double() / (seen.sum(1).double() * acc.shape[1])

    def per_head(self) -> torch.Tensor:
        """[L, Hq] share of All of each head."""
        acc, seen = self._counts()
        return acc.sum(2).double() / seen.sum(1, keepdim=True).double()

    def per_position(self) -> torch.Tensor:
        """[P] share of All at each absolute position (over layers and heads); NaN where no token was seen."""
        acc, seen = self._counts()
        return acc.sum((0, 1)).double() / (seen.sum(0).double() * acc.shape[1])

    def summary(self) -> str:
        """One line per layer: its All share and that of each head."""
        lines = [f"All share {self.all_share():.3f}"]
        for i, (layer, heads) in enumerate(zip(self.per_layer().tolist(), self.per_head().tolist(), strict=True)):
            lines.append(f"layer {i}: {layer:.3f}  heads " + " ".join(f"{h:.2f}" for h in heads))
        return "\n".join(lines)
