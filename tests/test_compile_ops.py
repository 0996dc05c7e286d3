"""The default CPU backends under torch.compile: each traces as one opaque custom op (aha_torch::attention,
aha_cpu::attention, aha_reference::attention; see aha.torch_ops.opaque_attention), so a fullgraph compile
holds the whole call and gives eager's output and gradients; torch.library.opcheck checks the ops."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import aha  # noqa: E402
from aha_tiny import one_thread  # noqa: E402, F401

BACKENDS = ["torch", "cpu", "reference"]


def problem(gate_kind: str, ragged: str, seed: int = 0):
    """q, k, v (needing grad), gate and ragged keywords: a plain, a cache_seqlens or a packed batch."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, nq, nk, d = 2, 4, 2, 5, 9, 8
    kw = {}
    if ragged == "cache_seqlens":
        kw["cache_seqlens"] = torch.tensor([9, 6], dtype=torch.int32)
    elif ragged == "cu_seqlens":
        b, nq, nk = 1, 7, 11
        kw["cu_seqlens_q"] = torch.tensor([0, 3, 7], dtype=torch.int32)
        kw["cu_seqlens_k"] = torch.tensor([0, 5, 11], dtype=torch.int32)
    q = torch.randn(b, hq, nq, d, generator=g).requires_grad_()
    k = torch.randn(b, hkv, nk, d, generator=g).requires_grad_()
    v = torch.randn(b, hkv, nk, d, generator=g).requires_grad_()
    u = torch.rand(b, hq, nq, generator=g)
    gate = {"bool": u > 0.5, "hard": (u > 0.5).float(), "soft": u.requires_grad_()}[gate_kind]
    return q, k, v, gate, kw


def out_and_grads(fn, q, k, v, gate, kw):
    out = fn(q, k, v, gate, **kw)
    inputs = [x for x in (q, k, v, gate) if x.requires_grad]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("ragged", ["plain", "cache_seqlens", "cu_seqlens"])
@pytest.mark.parametrize("gate_kind", ["bool", "hard", "soft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fullgraph_compile_gives_the_eager_output_and_gradients(backend, gate_kind, ragged):
    aha.backends()  # loaded before tracing

    def call(q, k, v, gate, **kw):
        return aha.attention(q, k, v, gate, window=3, backend=backend, **kw)

    args = problem(gate_kind, ragged)
    want, want_grads = out_and_grads(call, *args)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")  # fake tensors and the backward op too
    got, got_grads = out_and_grads(compiled, *args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert len(got_grads) == len(want_grads) == (4 if gate_kind == "soft" else 3)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ragged", ["plain", "cache_seqlens", "cu_seqlens"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_passes_on_the_backend_ops(backend, ragged):
    aha.backends()
    import aha_cpu.ops  # noqa: F401 (registers the ops)
    import aha_reference.torch_bridge  # noqa: F401
    import aha_torch.ops  # noqa: F401

    q, k, v, gate, kw = problem("soft", ragged)
    names = ("cache_seqlens", "cache_leftpad", "cu_seqlens_q", "cu_seqlens_k")
    op = getattr(torch.ops, f"aha_{backend}").attention.default
    torch.library.opcheck(op, (q, k, v, gate, 3, None, *(kw.get(n) for n in names)))
    backward = getattr(torch.ops, f"aha_{backend}").attention_backward.default
    dout = torch.randn(q.shape)
    args = (dout, q.detach(), k.detach(), v.detach(), gate.detach(), [True, False, True, True], 3, 0.5)
    torch.library.opcheck(backward, (*args, *(kw.get(n) for n in names)))


def test_the_backward_op_gives_zeros_for_an_input_not_asked_for_and_the_vjp_for_the_others():
    aha.backends()
    from aha_torch.ops import attention

    q, k, v, gate, _ = problem("soft", "plain")
    dout = torch.randn(q.shape)
    dq, dk, dv, dgate = attention.backward(dout, q, k, v, gate, [True, False, True, True], 3, None)
    out = aha.attention(q, k, v, gate, window=3, backend="torch")
    want = torch.autograd.grad(out, (q, v, gate), dout)
    assert torch.equal(dk, torch.zeros_like(k))
    for a, b in zip((dq, dv, dgate), want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
