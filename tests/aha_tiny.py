"""A tiny decoder-only LM built from aha.nn, shared by the training and DDP tests (no transformers needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aha.nn import AHAAttention, RMSNorm


class Block(nn.Module):
    def __init__(self, width: int, heads: int, window: int, layer_idx: int, **attn):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.attn = AHAAttention(width, heads, window=window, layer_idx=layer_idx, **attn)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding, pre-norm AHA blocks, tied head. forward(ids [B, N]) -> logits [B, N, V]."""

    def __init__(self, vocab=64, width=32, heads=4, layers=2, window=4, **attn):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads, window, i, **attn) for i in range(layers))
        self.norm = RMSNorm(width)
        nn.init.normal_(self.embed.weight, std=width**-0.5)

    def forward(self, ids, cache=None):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cache=cache)
        return self.norm(x) @ self.embed.weight.T


def lm_loss(model, ids):
    """Next-token cross entropy of ``model`` on ``ids`` [B, N]."""
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def copy_task(batch: int, length: int, vocab: int = 64, generator=None) -> torch.Tensor:
    """Sequences whose second half repeats the first: the second half is learnable only by looking far back."""
    half = torch.randint(2, vocab, (batch, length // 2), generator=generator)
    return torch.cat([half, half], dim=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
