"""Routed decoding (aha.decode): few queries, a hard gate, a KV cache, cache_seqlens; cpu and torch backends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import aha  # noqa: E402
import aha.decode as decode  # noqa: E402
from aha import reference  # noqa: E402

BACKENDS = ["cpu", "torch"]


def _np(x):
    return x.detach().double().numpy()


def _problem(b, hq, hkv, nq, nk, d=16, gate="mixed", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    u = torch.rand(b, hq, nq, generator=gen)
    g = {"here": u < 0, "all": u >= 0, "mixed": u < 0.3}[gate]
    return q, k, v, g


def _lens(b, nq, nk, seed=0):
    """Different cache lengths in [nq, nk], the longest one nk."""
    lens = torch.randint(nq, nk + 1, (b,), generator=torch.Generator().manual_seed(seed))
    lens[0] = nk
    return lens


def _poison_past(k, v, lens):
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
    return k, v


def _spy_here(monkeypatch):
    calls = []
    real = decode.here_windows
    monkeypatch.setattr(decode, "here_windows", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["here", "all", "mixed"])
@pytest.mark.parametrize("nq", range(1, decode.MAX_QUERIES + 1))
def test_batch_with_cache_seqlens_matches_reference(monkeypatch, backend, gate, nq):
    """B=3 sequences of different lengths, GQA 3:1, NaN / inf past each L_b; one batched Here pass."""
    q, k, v, g = _problem(3, 6, 2, nq, 40, gate=gate, seed=nq)
    lens = _lens(3, nq, 40, seed=nq)
    k, v = _poison_past(k, v, lens)
    calls = _spy_here(monkeypatch)
    out = aha.attention(q, k, v, g, window=5, cache_seqlens=lens, backend=backend)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 5, cache_seqlens=lens.tolist())
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)
    assert calls == ([] if gate == "all" else [3])  # every sequence in one call, no loop over b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 7, 39, 40, 300])
def test_windows_up_to_and_past_the_cache(backend, window):
    """Windows reaching before key 0 (zeroed slots) and windows longer than every cache."""
    q, k, v, g = _problem(2, 4, 1, 3, 40, seed=window)
    for lens in (None, torch.tensor([40, 5])):
        out = aha.attention(q, k, v, g, window=window, cache_seqlens=lens, backend=backend)
        want = reference.attention(
            _np(q), _np(k), _np(v), _np(g), window, cache_seqlens=None if lens is None else lens.tolist()
        )
        np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 4])
def test_non_finite_keys_outside_every_here_window(backend, nq):
    """NaN keys below every Here window: Here tokens stay finite and exact, All tokens read the NaN."""
    q, k, v, g = _problem(2, 4, 2, nq, 60, seed=3)
    g[:, :2] = False
    lens = torch.tensor([60, 45])
    k, v = _poison_past(k, v, lens)
    k[:, :, 10], v[:, :, 20] = float("nan"), float("nan")  # every window here starts after key 30
    out = aha.attention(q, k, v, g, window=8, cache_seqlens=lens, backend=backend)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 8, cache_seqlens=lens.tolist())
    assert torch.isfinite(out[~g]).all()
    assert torch.isnan(out[g]).all()
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)  # NaN where the reference has NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_cache_seqlens_and_with_a_float_gate(backend):
    q, k, v, g = _problem(2, 8, 2, 2, 70, seed=4)
    out = aha.attention(q, k, v, g.float(), window=16, scale=0.3, backend=backend)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 16, scale=0.3)
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    q, k, v, g = _problem(3, 4, 2, 1, 90, dtype=torch.bfloat16, seed=5)
    lens = torch.tensor([90, 33, 61])
    out = aha.attention(q, k, v, g, window=20, cache_seqlens=lens, backend=backend)
    assert out.dtype == torch.bfloat16
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 20, cache_seqlens=lens.tolist())
    np.testing.assert_allclose(_np(out), want, atol=2e-2, rtol=2e-2)


def test_layout_of_a_model():
    """q, k, v as a model may make them ([B, N, H, D] transposed: not contiguous) give the same result."""
    q, k, v, g = _problem(2, 4, 2, 3, 30, seed=6)
    lens = torch.tensor([30, 9])
    want = decode.routed_decode(q, k, v, g, window=4, cache_seqlens=lens)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not any(x.is_contiguous() for x in strided)
    torch.testing.assert_close(decode.routed_decode(*strided, g, window=4, cache_seqlens=lens), want)


def test_all_reads_views_of_the_cache(monkeypatch):
    """Only the (b, kv head) groups holding an All token run, each against a view of its cache."""
    q, k, v, g = _problem(2, 4, 2, 1, 1 << 16, d=8, gate="here", seed=7)
    g[1, 3, 0] = g[0, 0, 0] = g[0, 1, 0] = True  # groups (1, 1) and (0, 0)
    lens = torch.tensor([1 << 16, 1000])
    seen = []
    real = decode.attend_rows

    def spy(qs, ks, vs, nq, i, scale):
        assert ks.data_ptr() >= k.data_ptr() and ks.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert vs.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        seen.append((qs.shape[0], ks.shape[0], i))
        return real(qs, ks, vs, nq, i, scale)

    monkeypatch.setattr(decode, "attend_rows", spy)
    out = aha.attention(q, k, v, g, window=16, cache_seqlens=lens, backend="cpu")
    assert sorted(seen, key=lambda s: s[1]) == [(1, 1000, None), (2, 1 << 16, None)]  # Nq = 1: no mask
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 16, cache_seqlens=lens.tolist())
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)


def test_handles_only_hard_gates_without_grad_and_few_queries():
    q, k, v, g = _problem(1, 2, 1, decode.MAX_QUERIES, 30)
    assert decode.handles(q, k, v, g) and decode.handles(q, k, v, g.float())
    assert not decode.handles(q, k, v, torch.full(g.shape, 0.5))
    assert not decode.handles(q, k, v, g.float().requires_grad_())
    assert not decode.handles(q.requires_grad_(), k, v, g)
    with torch.no_grad():
        assert decode.handles(q, k, v, g)
    q, k, v, g = _problem(1, 2, 1, decode.MAX_QUERIES + 1, 30)
    assert not decode.handles(q, k, v, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_gate_with_cache_seqlens_keeps_the_loop(monkeypatch, backend):
    """A soft gate is not routed: one call per sequence, and the result still matches."""
    q, k, v, _ = _problem(2, 2, 1, 2, 30, seed=8)
    g = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(9))
    calls = _spy_here(monkeypatch)
    lens = torch.tensor([30, 12])
    out = aha.attention(q, k, v, g, window=4, cache_seqlens=lens, backend=backend)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 4, cache_seqlens=lens.tolist())
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)
    assert calls == []


def test_cpu_decode_on_the_worker_pool_matches_one_thread():
    """With two workers the cpu backend runs the Here job and each All group on its pool:
    two calls agree bitwise, and one thread agrees closely."""
    q, k, v, g = _problem(3, 8, 2, 2, 300, seed=10)
    lens = torch.tensor([300, 120, 7])
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            outs.append(aha.attention(q, k, v, g, window=16, cache_seqlens=lens, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-6)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 16, cache_seqlens=lens.tolist())
    np.testing.assert_allclose(_np(outs[0]), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 3])
def test_every_gate_all_is_one_causal_call(monkeypatch, backend, nq):
    """Every token All, one cache length: plain causal attention in one call, no per-group loop."""
    q, k, v, g = _problem(2, 6, 2, nq, 33, gate="all", seed=7)
    monkeypatch.setattr(decode, "all_groups", lambda *a: pytest.fail("every token All needs no groups"))
    out = aha.attention(q, k, v, g, window=4, backend=backend)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 4)
    assert out.dtype == q.dtype
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_of_a_chunk_never_read_later_keys(backend):
    """Nq = 3, every head All: a NaN in the last key reaches only the last query of each row."""
    q, k, v, g = _problem(2, 4, 2, 3, 20, gate="all", seed=11)
    lens = torch.tensor([20, 14])
    k, v = _poison_past(k, v, lens)
    k[0, :, 19], v[1, :, 13] = float("nan"), float("nan")
    out = aha.attention(q, k, v, g, window=4, cache_seqlens=lens, backend=backend)
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 4, cache_seqlens=lens.tolist())
    assert torch.isfinite(out[:, :, :2]).all() and torch.isnan(out[:, :, 2]).all()
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)
