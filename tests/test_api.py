"""The public functions beyond the conformance suite: route, sparsity_loss, numpy in/out, torch backend paths."""

import shutil

import numpy as np
import pytest
import torch

import aha
from aha import reference
from aha.testing.golden import golden_router


def test_route_torch_matches_golden_forward_and_straight_through_gradient():
    r = golden_router()
    logits = torch.from_numpy(r["logits"]).requires_grad_(True)
    gate = aha.route(logits)
    assert gate.dtype == torch.float64
    np.testing.assert_array_equal(gate.detach().numpy(), r["gate"])
    (dlogits,) = torch.autograd.grad(gate, [logits], torch.from_numpy(r["upstream"]))
    np.testing.assert_allclose(dlogits.numpy(), r["dlogits"], atol=1e-14)


def test_route_numpy_and_threshold():
    logits = np.array([-1.0, 0.0, 0.1, 2.0])
    np.testing.assert_array_equal(aha.route(logits), [0, 0, 1, 1])
    np.testing.assert_array_equal(aha.route(logits, threshold=0.8), [0, 0, 0, 1])


def test_sparsity_loss_torch_and_numpy_agree_with_golden():
    r = golden_router()
    expected = float(r["sparsity_loss"])
    assert aha.sparsity_loss(r["logits"]) == pytest.approx(expected, abs=1e-14)
    logits = torch.from_numpy(r["logits"]).float().requires_grad_(True)
    loss = aha.sparsity_loss(logits)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(logits.grad.numpy(), reference.sparsity_loss_vjp(r["logits"]), rtol=0, atol=1e-8)


def test_numpy_inputs_go_to_the_reference_and_keep_dtype():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 2, 5, 4)).astype(np.float32)
    k, v = q.copy(), q.copy()
    gate = np.array([[[1, 0, 1, 0, 0]] * 2], dtype=bool)
    out = aha.attention(q, k, v, gate, window=2)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference.attention(q, k, v, gate, 2), rtol=1e-6)
    assert aha.select(q, k, v, gate, window=2) == "reference"


def _problem(n=40, hq=4, hkv=2, d=16, share=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, n, d, generator=g)
    k, v = torch.randn(2, hkv, n, d, generator=g), torch.randn(2, hkv, n, d, generator=g)
    return q, k, v, torch.rand(2, hq, n, generator=g) < share


def test_torch_routed_path_skips_dense_all(monkeypatch):
    """A hard gate that needs no grad never runs the dense All branch."""
    import aha_torch.sdpa as sdpa

    q, k, v, gate = _problem()
    expected = aha.attention(q, k, v, gate.float().requires_grad_(True), window=5, backend="torch")
    monkeypatch.setattr(sdpa, "all_attention", lambda *a: pytest.fail("dense All branch ran for a routed gate"))
    out = aha.attention(q, k, v, gate, window=5, backend="torch")
    torch.testing.assert_close(out, expected.detach())


def test_torch_all_tokens_are_compacted():
    """Only the All tokens' queries reach the All branch."""
    import aha_torch.sdpa as sdpa

    q, k, v, gate = _problem(share=0.1)
    (b, h, i), rows = sdpa._all_tokens(q, k, v, gate, q.shape[-1] ** -0.5)
    assert rows.shape == (int(gate.sum()), q.shape[-1])
    assert gate[b, h, i].all()


def test_torch_here_exact_path_used_when_keys_are_not_finite():
    q, k, v, gate = _problem(n=70)
    v[:, :, 3] = float("nan")
    out = aha.attention(q, k, v, torch.zeros_like(gate), window=4, backend="torch")
    assert torch.isnan(out[:, :, 3:7]).all()  # the tokens whose window holds key 3
    assert torch.isfinite(out[:, :, :3]).all() and torch.isfinite(out[:, :, 7:]).all()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on the CPU")
def test_torch_backend_under_torch_compile_with_inductor():
    """torch.compile (inductor, graph breaks allowed) of the torch backend agrees with the reference;
    its Here slabs once compiled to a wrong matmul (an unfold + permute view)."""
    aha.backends()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (40, 48, 48))
    gate = (torch.rand(1, 2, 40, generator=gen) < 0.3).float()
    step = torch.compile(lambda q, k, v, g: aha.attention(q, k, v, g, window=8, backend="torch"))
    try:
        out = step(q, k, v, gate)
    finally:
        torch._dynamo.reset()
    want = reference.attention(*(x.double().numpy() for x in (q, k, v, gate)), 8)
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-5, atol=1e-6)
