"""aha.training: the sparsity term, RouterSparsity, GateStats, and a few training steps."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aha.nn import KVCache  # noqa: E402
from aha.training import LAMBDA, GateStats, RouterSparsity, sparsity_term  # noqa: E402
from aha_tiny import TinyLM, copy_task, lm_loss, one_thread  # noqa: E402, F401


def test_sparsity_term_is_lambda_times_the_mean_router_probability():
    assert LAMBDA == 3e-4
    a, b = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    want = 3e-4 * np.mean(1 / (1 + np.exp(-np.concatenate([a.numpy().ravel(), b.numpy().ravel()]))))
    assert sparsity_term([a, b]).item() == pytest.approx(want, rel=1e-6)
    assert sparsity_term(a, lam=2.0).item() == pytest.approx(2.0 * torch.sigmoid(a).mean().item(), rel=1e-6)
    assert sparsity_term(a.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="logits"):
        sparsity_term([])


def test_router_sparsity_sees_the_latest_pass_of_every_layer_and_grads_reach_the_router():
    torch.manual_seed(0)
    model = TinyLM(layers=2)
    sparsity = RouterSparsity(model, lam=1.0)
    with pytest.raises(RuntimeError, match="forward"):
        sparsity()
    ids = copy_task(2, 8)
    model(ids)
    model(ids[:, :5])  # a second pass replaces the first one's logits
    logits = sparsity.logits()
    assert [tuple(x.shape) for x in logits] == [(2, 4, 5), (2, 4, 5)]
    want = [torch.sigmoid(b.attn.router(b.norm1(x))) for b, x in _block_inputs(model, ids[:, :5])]
    assert sparsity().item() == pytest.approx(torch.cat([w.reshape(-1) for w in want]).mean().item(), rel=1e-5)
    sparsity().backward()
    for block in model.blocks:
        assert block.attn.router.weight.grad.abs().sum() > 0
    sparsity.close()
    sparsity.clear()
    model(ids)
    with pytest.raises(RuntimeError, match="forward"):
        sparsity()  # detached: nothing recorded any more


def _block_inputs(model, ids):
    """(block, its input) for each block of a TinyLM."""
    x, out = model.embed(ids), []
    for block in model.blocks:
        out.append((block, x))
        x = block(x)
    return out


def test_gate_stats_count_the_gates_the_routers_pick():
    torch.manual_seed(1)
    model = TinyLM(layers=2).eval()
    ids = copy_task(3, 10)
    with torch.no_grad(), GateStats(model) as stats:
        model(ids)
        gates = [torch.sigmoid(b.attn.router(b.norm1(x))) > 0.5 for b, x in _block_inputs(model, ids)]
    g = torch.stack(gates).double()  # (L, B, Hq, N)
    torch.testing.assert_close(stats.per_layer(), g.mean((1, 2, 3)))
    torch.testing.assert_close(stats.per_head(), g.mean((1, 3)))
    torch.testing.assert_close(stats.per_position(), g.mean((0, 1, 2)))
    assert stats.all_share() == pytest.approx(g.mean().item())
    assert stats.summary().startswith("All share")
    model(ids)  # closed: no longer counted
    torch.testing.assert_close(stats.per_layer(), g.mean((1, 2, 3)))


def test_gate_stats_place_cached_tokens_at_their_absolute_positions():
    torch.manual_seed(2)
    model = TinyLM(layers=1, window=2).eval()
    ids = copy_task(2, 8)
    with torch.no_grad():
        with GateStats(model) as full:
            model(ids)
        with GateStats(model) as stepped:
            cache = KVCache()
            model(ids[:, :3], cache=cache)
            for i in range(3, 8):
                model(ids[:, i : i + 1], cache=cache)
    torch.testing.assert_close(stepped.per_position(), full.per_position())
    torch.testing.assert_close(stepped.per_head(), full.per_head())


def test_gate_stats_are_off_unless_attached():
    model = TinyLM(layers=1)
    assert all(not b.attn._observers for b in model.blocks)
    with GateStats(model):
        assert all(len(b.attn._observers) == 1 for b in model.blocks)
    assert all(not b.attn._observers for b in model.blocks)
    with pytest.raises(ValueError, match="AHAAttention"):
        GateStats(torch.nn.Linear(2, 2))


def _train(lam: float, steps: int = 30):
    """Loss before and after, All share before and after, on a fixed copy-task batch."""
    torch.manual_seed(0)
    model = TinyLM(window=2)
    ids = copy_task(8, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sparsity = RouterSparsity(model, lam=lam)

    def all_share():
        with torch.no_grad(), GateStats(model) as stats:
            model(ids)
        return stats.all_share()

    share0, losses = all_share(), []
    for _ in range(steps):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        (loss + sparsity()).backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1], share0, all_share()


def test_a_few_steps_lower_the_loss_and_the_regulariser_pushes_gates_to_here():
    loss0, loss1, share0, share_free = _train(lam=0.0)
    _, loss1_reg, share0_reg, share_reg = _train(lam=3.0)
    assert share0_reg == share0  # same start
    assert loss1 < 0.5 * loss0 and loss1_reg < 0.5 * loss0
    assert share_reg < share_free - 0.1  # the term moves routes from All to Here
    assert share_reg < share0
