"""Calls without queries (B, Hq or Nq is 0), as serving code meets them: ``aha.attention`` returns what
SDPA returns, an output with no entry and zero gradients for k and v, on every backend, ragged ones
included; backends never see such a call (the API returns it itself)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import aha  # noqa: E402
from aha import reference  # noqa: E402
from aha.registry import registry  # noqa: E402

BACKENDS = ["reference", "torch", "cpu", "triton"]
D = 16  # the triton backend's smallest head dim
# (B, Hq, Hkv, Nq, Nk)
SHAPES = {
    "B=0": (0, 4, 2, 5, 7),
    "Nq=0": (2, 4, 2, 0, 7),
    "Nq=Nk=0": (2, 4, 2, 0, 0),
    "Hq=0": (2, 0, 2, 5, 7),
    "Hq=Hkv=0": (2, 0, 0, 5, 7),
}


def _available(name: str) -> None:
    row = registry.get(name)
    if row is None or row.status != "available":
        pytest.skip(f"backend {name} is not available here: {row and row.reason}")


def _inputs(shape, gate_kind="soft", dtype=torch.float32):
    b, hq, hkv, nq, nk = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(n, h, length, D, generator=g, dtype=dtype)
        for n, h, length in ((b, hq, nq), (b, hkv, nk), (b, hkv, nk))
    )
    u = torch.rand(b, hq, nq, generator=g)
    gate = u > 0.5 if gate_kind == "bool" else u.to(dtype)
    return [x.requires_grad_(x.is_floating_point()) for x in (q, k, v, gate)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_without_queries_gives_what_sdpa_gives(backend, shape):
    """Output [B, Hq, Nq, D] with no entry, in q's dtype and device; dk, dv as SDPA's (zero), dq and dgate empty."""
    _available(backend)
    q, k, v, gate = _inputs(shape)
    out = aha.attention(q, k, v, gate, window=3, backend=backend)
    want = _sdpa(q, k, v)
    assert out.shape == want.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    dout = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, k, v, gate), dout)
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], torch.autograd.grad(want, (q, k, v), dout), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name
    assert got[3].shape == gate.shape and got[3].dtype == gate.dtype


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_bool_gate_in_bfloat16(backend):
    q, k, v, gate = _inputs(SHAPES["Nq=0"], gate_kind="bool", dtype=torch.bfloat16)
    out = aha.attention(q, k, v, gate, window=3, backend=backend)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, dtype=torch.bfloat16))
    assert dq.shape == q.shape and dk.dtype == torch.bfloat16 and not dk.any() and not dv.any()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_numpy_and_the_reference_itself(shape):
    q, k, v, gate = (x.detach().double().numpy() for x in _inputs(shape))
    out = aha.attention(
        q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), gate.astype(np.float32), window=3
    )
    assert isinstance(out, np.ndarray) and out.shape == q.shape and out.dtype == np.float32
    assert reference.attention(q, k, v, gate, 3).shape == q.shape
    qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(_sdpa(qt, kt, vt), (qt, kt, vt), torch.ones(q.shape, dtype=torch.float64))
    got = reference.attention_vjp(q, k, v, gate, 3, np.ones(q.shape))
    for a, b in zip(got, (*want, torch.zeros(gate.shape)), strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def _ragged(name):
    """(shape, ragged keywords) of a ragged call without queries."""
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return {
        "cache_seqlens of no row": ((0, 4, 2, 3, 7), {"cache_seqlens": i32()}),
        "cache_leftpad of no row": ((0, 4, 2, 3, 7), {"cache_seqlens": i32(), "cache_leftpad": i32()}),
        "rows without queries": ((2, 4, 2, 0, 7), {"cache_seqlens": i32(3, 7), "cache_leftpad": i32(1, 0)}),
        "no sequence": ((1, 4, 2, 0, 0), {"cu_seqlens_q": i32(0), "cu_seqlens_k": i32(0)}),
        "sequences without queries": ((1, 4, 2, 0, 7), {"cu_seqlens_q": i32(0, 0, 0), "cu_seqlens_k": i32(0, 3, 7)}),
    }[name]


RAGGED = [
    "cache_seqlens of no row",
    "cache_leftpad of no row",
    "rows without queries",
    "no sequence",
    "sequences without queries",
]


@pytest.mark.parametrize("name", RAGGED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_calls_without_queries(backend, name):
    """cache_seqlens / cache_leftpad of shape [0] for B = 0, cu_seqlens of no sequence or of sequences
    holding keys only: the empty output, and no key read (dk = dv = 0)."""
    _available(backend)
    shape, kw = _ragged(name)
    q, k, v, gate = _inputs(shape)
    out = aha.attention(q, k, v, gate, window=3, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    dq, dk, dv, dgate = torch.autograd.grad(out, (q, k, v, gate), torch.randn(out.shape))
    assert dq.shape == q.shape and dgate.shape == gate.shape
    assert dk.shape == k.shape and not dk.any() and not dv.any()
    np_kw = {n: x.numpy() for n, x in kw.items()}
    grads = reference.attention_vjp(
        *(x.detach().double().numpy() for x in (q, k, v, gate)), 3, np.ones(q.shape), **np_kw
    )
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, gate.shape] and not any(g.any() for g in grads)


def test_ragged_arguments_of_an_empty_batch_are_still_checked():
    q, k, v, gate = _inputs(SHAPES["B=0"])
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \[B\] = \(0,\), got \(1,\)"):
        aha.attention(q, k, v, gate, window=3, cache_seqlens=torch.tensor([7]))
    with pytest.raises(ValueError, match=r"batch size B = 1"):
        aha.attention(q, k, v, gate, window=3, cu_seqlens_q=torch.tensor([0]), cu_seqlens_k=torch.tensor([0]))
    q, k, v, gate = _inputs(SHAPES["Nq=0"])
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[Nq, Nk\] = \[0, 7\]"):
        aha.attention(q, k, v, gate, window=3, cache_seqlens=torch.tensor([3, 8]))


def test_the_backend_is_chosen_but_never_called():
    """A backend need not serve calls without queries (aha.attention answers them), but the choice
    of backend is made as for any call: one that cannot serve the inputs is still refused."""

    def forward(q, k, v, gate, *, window, scale=None):
        raise AssertionError("a backend got a call without queries")

    class Plugin:
        @aha.hookimpl
        def register_backends(self, register):
            register(aha.Backend(name="no_empty", forward=forward, capabilities=aha.Capabilities(grad=True)))

    try:
        registry.add_plugin(Plugin(), "no_empty")
        q, k, v, gate = _inputs(SHAPES["B=0"])
        assert aha.attention(q, k, v, gate, window=3, backend="no_empty").shape == q.shape
        q, k, v, gate = _inputs((1, 4, 2, 5, 7))
        with pytest.raises(AssertionError, match="without queries"):  # only because this call has queries
            aha.attention(q, k, v, gate, window=3, backend="no_empty")
    finally:
        registry.reload()
    q, k, v, gate = (x.detach().numpy() for x in _inputs(SHAPES["B=0"]))
    with pytest.raises(aha.BackendError, match="takes torch arrays, got numpy"):
        aha.attention(q, k, v, gate, window=3, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_under_a_fullgraph_compile(backend):
    aha.backends()  # loaded before tracing

    def call(q, k, v, gate):
        return aha.attention(q, k, v, gate, window=3, backend=backend)

    q, k, v, gate = _inputs(SHAPES["Nq=0"])
    torch._dynamo.reset()
    out = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k, v, gate)
    assert out.shape == q.shape
    dq, dk, dv, dgate = torch.autograd.grad(out, (q, k, v, gate), torch.randn(out.shape))
    assert dq.shape == q.shape and dgate.shape == gate.shape and dk.shape == k.shape and not dk.any() and not dv.any()
    torch._dynamo.reset()


@pytest.mark.parametrize("x_shape", [(0, 5, 16), (2, 0, 16)], ids=["B=0", "N=0"])
@pytest.mark.parametrize("how", ["plain", "attention_mask", "return_weights"])
def test_an_aha_layer_on_an_empty_batch(x_shape, how):
    from aha.nn import AHAAttention, KVCache

    torch.manual_seed(0)
    layer = AHAAttention(16, 4, num_kv_heads=2, window=2)
    x = torch.randn(x_shape, requires_grad=True)
    kw = {"attention_mask": torch.ones(x_shape[:2], dtype=torch.long)} if how == "attention_mask" else {}
    out = layer(x, return_weights=how == "return_weights", **kw)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and not layer.k_proj.weight.grad.any()
    cache = KVCache()
    with torch.no_grad():
        layer(torch.randn(2, 5, 16), cache=cache)
        assert layer(torch.randn(2, 0, 16), cache=cache).shape == (2, 0, 16)  # a step of no new token
