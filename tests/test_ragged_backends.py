"""Ragged batches on the cpu and torch backends: packed sequences (cu_seqlens_q / cu_seqlens_k) and
left-padded rows (cache_leftpad, with or without cache_seqlens), against the float64 reference.

Each sequence of a ragged call is computed alone (aha.sequences.segments): these tests compare
forward and gradients (q, k, v, gate) with `aha.reference`, check that padding queries output
exactly 0 and get exactly zero gradient, that keys no sequence reads get zero gradient, and that a
NaN or inf in padding slots or in another sequence's keys reaches no token.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import aha  # noqa: E402
import aha.decode as decode  # noqa: E402
from aha import reference  # noqa: E402

BACKENDS = ["cpu", "torch"]
GATES = ["hard", "soft", "hard_grad", "soft_grad"]  # values 0/1 or in (0, 1); with or without a gradient


def _np(x):
    return None if x is None else x.detach().double().numpy()


def _tensors(b, hq, hkv, nq, nk, d, gate, seed, grad=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k, v = (torch.randn(b, hkv, nk, d, generator=gen) for _ in range(2))
    u = torch.rand(b, hq, nq, generator=gen)
    g = (u < 0.3).float() if gate.startswith("hard") else u
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    if gate.endswith("grad"):
        g.requires_grad_()
    return q, k, v, g


def _check(backend, q, k, v, g, window, *, nan_k=None, nan_v=None, **ragged):
    """Forward and gradients against the reference; k, v may be replaced by poisoned copies
    (nan_k, nan_v) that the backend gets and the reference never needs (their bad slots are unread)."""
    kb = k if nan_k is None else nan_k
    vb = v if nan_v is None else nan_v
    out = aha.attention(q, kb, vb, g, window=window, backend=backend, **ragged)
    ref_kw = {name: (x.numpy() if hasattr(x, "numpy") else x) for name, x in ragged.items()}
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), window, **ref_kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(_np(out), want, atol=3e-6, rtol=1e-5)
    inputs = [x for x in (q, k, v, g) if x.requires_grad]
    if not inputs:
        return out, None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    grads = torch.autograd.grad(out, [q, kb, vb] + ([g] if g.requires_grad else []), dout, allow_unused=True)
    wants = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), window, dout.double().numpy(), **ref_kw)
    for name, got, w in zip("q k v gate".split(), grads, wants):
        got = torch.zeros(w.shape) if got is None else got
        assert torch.isfinite(got).all(), name
        np.testing.assert_allclose(_np(got), w, atol=3e-5, rtol=1e-4, err_msg=f"d{name}")
    return out, grads


# Packed layouts (cu_seqlens_q, cu_seqlens_k): an empty sequence (no queries, some keys), one with
# neither, a single-token one, sequences with fewer queries than keys, self-attention (q = k).
PACKED = {
    "cross": ([0, 3, 3, 10, 17], [0, 5, 9, 20, 27]),
    "self": ([0, 7, 7, 20, 21, 30], [0, 7, 7, 20, 21, 30]),
    "one": ([0, 13], [0, 19]),
    "empty_ends": ([0, 0, 5, 5], [0, 4, 11, 14]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("layout", sorted(PACKED))
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_packed_matches_reference(backend, gate, layout, heads):
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in PACKED[layout])
    q, k, v, g = _tensors(1, heads[0], heads[1], int(cq[-1]), int(ck[-1]), 8, gate, seed=len(layout))
    for window in (3, 40):  # 40: longer than every sequence, Here = All
        _check(backend, q, k, v, g, window, cu_seqlens_q=cq, cu_seqlens_k=ck)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_packed_bfloat16(backend, gate):
    cq, ck = (torch.tensor(c) for c in PACKED["cross"])
    q, k, v, g = (x.bfloat16() for x in _tensors(1, 4, 2, 17, 27, 16, gate, seed=7, grad=False))
    out = aha.attention(q, k, v, g, window=3, backend=backend, cu_seqlens_q=cq, cu_seqlens_k=ck)
    want = reference.attention(*(_np(x) for x in (q, k, v, g)), 3, cu_seqlens_q=cq.numpy(), cu_seqlens_k=ck.numpy())
    assert out.dtype == torch.bfloat16
    np.testing.assert_allclose(_np(out), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["hard", "soft_grad"])
def test_packed_equals_each_sequence_alone_and_ignores_poison_elsewhere(backend, gate):
    """NaN / inf in one sequence's keys (and in a 0-query sequence's keys) reach no other sequence;
    each sequence's output is its own call's output."""
    cq, ck = [0, 4, 4, 12, 20], [0, 6, 10, 22, 30]
    q, k, v, g = _tensors(1, 4, 2, 20, 30, 8, gate, seed=5, grad=False)
    clean = [
        aha.attention(q[:, :, a:b], k[:, :, c:e], v[:, :, c:e], g[:, :, a:b], window=4, backend=backend)
        for a, b, c, e in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])
        if b > a
    ]
    pk, pv = k.clone(), v.clone()
    pk[:, :, 6:10], pv[:, :, 6:10] = float("nan"), float("inf")  # the 0-query sequence: never read
    pk[:, :, 0], pv[:, :, 1] = float("nan"), float("-inf")  # sequence 0's keys
    out = aha.attention(
        q, pk, pv, g, window=4, backend=backend, cu_seqlens_q=torch.tensor(cq), cu_seqlens_k=torch.tensor(ck)
    )
    assert torch.isnan(out[:, :, :4]).any()  # sequence 0 reads its own NaN (its All tokens at least)
    assert torch.isfinite(out[:, :, 4:]).all()
    torch.testing.assert_close(out[:, :, 4:], torch.cat(clean[1:], 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("nq", [1, 5, 12])
@pytest.mark.parametrize("seqlens", [False, True])
def test_leftpad_matches_reference(backend, gate, nq, seqlens):
    """Rows starting at keys 0, 3, 9 and 12 (the last one all padding without seqlens); NaN and inf in
    every padding slot and past each row's end. Padding queries: 0 out, 0 grad; unread keys: 0 grad."""
    nk = 12
    lp = torch.tensor([0, 3, 9, 12 if not seqlens else 4])
    lens = torch.tensor([12, 10, 12, 6]) if seqlens else None
    q, k, v, g = _tensors(4, 4, 2, nq, nk, 8, gate, seed=nq)
    ends = [nk] * 4 if lens is None else lens.tolist()
    nan_k, nan_v = k.detach().clone(), v.detach().clone()
    for b, (s, e) in enumerate(zip(lp.tolist(), ends)):
        nan_k[b, :, :s], nan_v[b, :, :s] = float("nan"), float("inf")
        nan_k[b, :, e:], nan_v[b, :, e:] = float("inf"), float("nan")
    nan_k.requires_grad_(), nan_v.requires_grad_()
    ragged = {"cache_leftpad": lp} | ({} if lens is None else {"cache_seqlens": lens})
    out, grads = _check(backend, q, k, v, g, 3, nan_k=nan_k, nan_v=nan_v, **ragged)
    for b, (s, e) in enumerate(zip(lp.tolist(), ends)):
        pad = e - nq + torch.arange(nq) < s  # padding queries of row b
        assert torch.equal(out[b][:, pad], torch.zeros_like(out[b][:, pad]))
        assert torch.equal(grads[0][b][:, pad], torch.zeros_like(grads[0][b][:, pad]))
        if g.requires_grad:
            assert torch.equal(grads[3][b][:, pad], torch.zeros_like(grads[3][b][:, pad]))
        for dk in grads[1:3]:
            assert not dk[b, :, :s].any() and not dk[b, :, e:].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", list(range(1, decode.MAX_QUERIES + 1)))
@pytest.mark.parametrize("seqlens", [False, True])
def test_decode_with_leftpad_is_one_batched_call(monkeypatch, backend, nq, seqlens):
    """Decoding (hard gate, no grad) a left-padded batch: every row in one Here call, padding slots
    poisoned, padding queries exactly 0, All groups over views starting at the row's first key."""
    nk = 40
    lp = torch.tensor([0, 5, 30, 38])
    lens = torch.tensor([40, 33, 36, 39]) if seqlens else None
    q, k, v, g = _tensors(4, 6, 2, nq, nk, 8, "hard", seed=nq, grad=False)
    g[:, 0, -1], g[:, 5, -1] = 1.0, 0.0  # every row's last query: All in head 0, Here in head 5
    k0, v0 = k.clone(), v.clone()
    ends = [nk] * 4 if lens is None else lens.tolist()
    for b, (s, e) in enumerate(zip(lp.tolist(), ends)):
        k[b, :, :s], v[b, :, :s], k[b, :, e:], v[b, :, e:] = float("nan"), float("inf"), float("nan"), float("nan")
    calls, reads = [], []
    real_here, real_rows = decode.here_windows, decode.attend_rows
    monkeypatch.setattr(decode, "here_windows", lambda *a: calls.append(a[0].shape[0]) or real_here(*a))

    def spy(qs, ks, *a):  # All groups: views of the cache, never a copy
        assert ks.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        reads.append(ks.shape[0])
        return real_rows(qs, ks, *a)

    monkeypatch.setattr(decode, "attend_rows", spy)
    ragged = {"cache_leftpad": lp} | ({} if lens is None else {"cache_seqlens": lens})
    out = aha.attention(q, k, v, g, window=6, backend=backend, **ragged)
    ref_kw = {name: x.numpy() for name, x in ragged.items()}
    want = reference.attention(_np(q), _np(k0), _np(v0), _np(g), 6, **ref_kw)
    assert calls == [4]
    assert sorted(set(reads)) == sorted({e - s for s, e in zip(lp.tolist(), ends) if e - s > 0})
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(_np(out), want, atol=3e-6, rtol=1e-5)
    for b, (s, e) in enumerate(zip(lp.tolist(), ends)):
        pad = e - nq + torch.arange(nq) < s
        assert torch.equal(out[b][:, pad], torch.zeros_like(out[b][:, pad]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_leftpad_every_gate_all_and_bfloat16(backend):
    """Every token All with left padding is not plain causal attention: the groups start at the pad."""
    q, k, v, g = _tensors(3, 4, 1, 2, 25, 16, "hard", seed=3, grad=False)
    lp, g = torch.tensor([0, 7, 24]), torch.ones_like(g)
    for dtype, tol in ((torch.float32, 3e-6), (torch.bfloat16, 2e-2)):
        args = [x.to(dtype) for x in (q, k, v, g)]
        out = aha.attention(*args, window=4, cache_leftpad=lp, backend=backend)
        want = reference.attention(*(_np(x) for x in args), 4, cache_leftpad=lp.numpy())
        assert out.dtype == dtype
        np.testing.assert_allclose(_np(out), want, atol=tol, rtol=tol)


_MEMORY_PROBE = r"""
import resource, sys, torch, aha
backend = sys.argv[1]
torch.manual_seed(0)
n, d, parts = 1 << 15, 8, [1 << 14, 9000, 7384]  # 32k packed tokens, the longest sequence 16k
cu = torch.tensor([0, parts[0], parts[0] + parts[1], n], dtype=torch.int32)
q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
gate = torch.rand(1, 2, n) < 0.07
small = slice(0, 2048)
aha.attention(q[:, :, small], k[:, :, small], v[:, :, small], gate[:, :, small], window=64, backend=backend)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = aha.attention(q, k, v, gate, window=64, backend=backend, cu_seqlens_q=cu, cu_seqlens_k=cu)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
assert torch.isfinite(out).all()
print(grown * 1024 if sys.platform != "darwin" else grown)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="peak memory through resource.getrusage")
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_32k_tokens_builds_no_pair_sized_tensor(backend):
    """32k packed tokens (longest sequence 16k, no grad): the peak memory grows far less than one
    [16k, 16k] bool mask (256 MiB), let alone an [N, N] one (1 GiB); what remains are buffers of
    bounded size (about 10 MiB on cpu, 60 MiB on torch, whose masks come in chunks of a fixed
    number of elements). Run in a fresh process so that the peak is this call's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, "-c", _MEMORY_PROBE, backend]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.split()[-1])
    assert grown < 128 << 20, f"peak memory grew by {grown / 2**20:.0f} MiB"
