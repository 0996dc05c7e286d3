"""The ``cpu`` backend against the NumPy reference, and the properties its tiling must keep."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import aha  # noqa: E402
from aha import reference  # noqa: E402
from aha_cpu import attention as cpu_attention  # noqa: E402
from aha_cpu import causal, here, threads  # noqa: E402


def _np(x):
    return x.detach().double().numpy()


def _inputs(b, hq, hkv, nq, nk, d, gate, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    u = torch.rand(b, hq, nq, generator=gen)
    g = {"bool": u < 0.3, "hard": (u < 0.3).to(dtype), "soft": u.to(dtype), "all": torch.ones_like(u, dtype=dtype)}
    g["here"] = torch.zeros_like(u, dtype=dtype)
    return q, k, v, g[gate]


# Sizes around the tiles (64 queries per Here tile, 64 All tokens per All tile) and the windows' edges.
SHAPES = [
    # B, Hq, Hkv, Nq, Nk, D, window
    (1, 1, 1, 1, 1, 4, 1),
    (1, 2, 1, 17, 17, 4, 5),
    (2, 4, 2, 63, 63, 8, 64),
    (1, 2, 2, 64, 64, 8, 63),
    (1, 2, 1, 65, 65, 8, 65),
    (1, 1, 1, 129, 129, 3, 1),
    (1, 3, 1, 128, 200, 16, 66),
    (2, 2, 1, 70, 100, 8, 7),
    (1, 1, 1, 1, 90, 4, 30),  # decode: one query at the end of the keys
    (1, 2, 1, 100, 100, 8, 100),  # window == N: Here is All
    (1, 2, 1, 50, 50, 8, 500),
    (1, 4, 1, 300, 300, 1, 130),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gate", ["bool", "hard", "soft"])
def test_forward_matches_reference(shape, gate):
    b, hq, hkv, nq, nk, d, window = shape
    q, k, v, g = _inputs(b, hq, hkv, nq, nk, d, gate)
    out = aha.attention(q, k, v, g, window=window, backend="cpu")
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), window)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[1:9], ids=str)
@pytest.mark.parametrize("gate", ["bool", "hard", "soft", "all", "here"])
def test_grads_match_reference_vjp(shape, gate):
    b, hq, hkv, nq, nk, d, window = shape
    q, k, v, g = _inputs(b, hq, hkv, nq, nk, d, gate, seed=1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    gl = g if g.dtype == torch.bool else g.clone().requires_grad_()
    out = aha.attention(*leaves, gl, window=window, scale=0.3, backend="cpu")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(dout)
    want = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), window, _np(dout), 0.3)
    got = [x.grad for x in leaves] + ([] if g.dtype == torch.bool else [gl.grad])
    for name, a, w in zip("q k v gate".split(), got, want, strict=False):
        np.testing.assert_allclose(_np(a), w, atol=5e-6, rtol=1e-4, err_msg=f"d{name}")


def test_grads_of_qkv_with_a_gate_that_needs_none():
    """The routed path (each token only its branch) still differentiates q, k and v."""
    q, k, v, g = _inputs(1, 4, 2, 150, 150, 8, "hard", seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = aha.attention(*leaves, g, window=20, backend="cpu")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    out.backward(dout)
    want = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), 20, _np(dout))
    for a, w in zip(leaves, want[:3], strict=True):
        np.testing.assert_allclose(_np(a.grad), w, atol=5e-6, rtol=1e-4)


@pytest.mark.parametrize("gate", ["bool", "soft"])
def test_bfloat16(gate):
    q, k, v, g = _inputs(1, 4, 2, 130, 160, 16, gate, dtype=torch.bfloat16, seed=5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = aha.attention(*leaves, g, window=40, backend="cpu")
    assert out.dtype == torch.bfloat16
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 40)
    np.testing.assert_allclose(_np(out), want, atol=2e-2, rtol=2e-2)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    out.backward(dout)
    want = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), 40, _np(dout))
    for a, w in zip(leaves, want[:3], strict=True):
        assert a.grad.dtype == torch.bfloat16
        np.testing.assert_allclose(_np(a.grad), w, atol=5e-2, rtol=5e-2)


def test_is_the_default_backend_for_cpu_float32_and_bfloat16():
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, g = _inputs(1, 2, 1, 8, 8, 4, "bool", dtype=dtype)
        assert aha.select(q, k, v, g, window=2) == "cpu"
    q, k, v, g = _inputs(1, 2, 1, 8, 8, 4, "bool", dtype=torch.float64)
    assert aha.select(q, k, v, g, window=2) != "cpu"
    with pytest.raises(aha.BackendError, match="cpu"):
        aha.attention(q, k, v, g, window=2, backend="cpu")


def _poisoned(k, v):
    """k, v with NaN / inf at three key positions, and those positions."""
    k, v = k.clone(), v.clone()
    k[:, :, 40] = float("nan")
    v[:, :, 41, 2] = float("inf")
    v[:, :, 150] = float("nan")
    return k, v, (40, 41, 150)


@pytest.mark.parametrize("gate", ["bool", "soft"])
def test_non_finite_keys_reach_only_the_rows_that_read_them(gate):
    q, k, v, g = _inputs(1, 4, 2, 200, 200, 8, gate, seed=7)
    window = 16
    clean = aha.attention(q, k, v, g, window=window, backend="cpu")
    kp, vp, bad = _poisoned(k, v)
    out = aha.attention(q, kp, vp, g, window=window, backend="cpu")
    want = reference.attention(_np(q), _np(kp), _np(vp), _np(g), window)
    np.testing.assert_array_equal(np.isnan(_np(out)), np.isnan(want))
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)  # NaN where the reference is
    pos = torch.arange(200)
    near = torch.zeros(200, dtype=torch.bool)
    for j in bad:
        near |= (pos >= j) & (pos < j + window)
    untouched = (pos < min(bad)).expand_as(g)  # no branch reads a key past the token
    if gate == "bool":
        untouched = untouched | (~g & ~near)  # Here tokens whose window misses every bad key
    assert int(untouched.sum()) >= 160
    assert torch.equal(out[untouched], clean[untouched])


def test_non_finite_keys_in_the_gradients():
    """A Here token's gradient ignores a NaN key it does not read, even in the All branch it did not take."""
    q, k, v, g = _inputs(1, 2, 1, 200, 200, 8, "bool", seed=8)
    kp, vp, _ = _poisoned(k, v)
    leaves = [x.clone().requires_grad_() for x in (q, kp, vp)]
    out = aha.attention(*leaves, g, window=16, backend="cpu")
    out.backward(torch.ones_like(out))
    dq = leaves[0].grad
    far_here = ~g[0, :, 60:140]  # Here tokens whose window holds no bad key (All tokens there read key 40)
    assert torch.isfinite(dq[0, :, 60:140][far_here]).all()
    assert torch.isnan(dq[0, :, 60:140][~far_here]).all()


class _Calls:
    """Records the rows that the cpu backend hands to each branch (None: every token)."""

    def __init__(self, monkeypatch):
        self.all, self.here = [], []
        for name, log, at in (("AllBranch", self.all, 4), ("HereBranch", self.here, 5)):
            real = getattr(cpu_attention, name)
            spy = type(
                name, (), {"apply": staticmethod(lambda *a, r=real, log=log, at=at: log.append(a[at]) or r.apply(*a))}
            )
            monkeypatch.setattr(cpu_attention, name, spy)
        for name, log, at in (("all_tokens_jobs", self.all, 4), ("here_jobs", self.here, 5)):  # inference
            real = getattr(cpu_attention, name)
            monkeypatch.setattr(cpu_attention, name, lambda *a, r=real, log=log, at=at: log.append(a[at]) or r(*a))


def test_a_gate_without_grad_skips_the_unselected_branch(monkeypatch):
    calls = _Calls(monkeypatch)
    q, k, v, _ = _inputs(1, 2, 1, 300, 300, 8, "bool")
    aha.attention(q, k, v, torch.zeros(1, 2, 300, dtype=torch.bool), window=16, backend="cpu")
    assert calls.all == [] and len(calls.here) == 1
    aha.attention(q, k, v, torch.ones(1, 2, 300), window=16, backend="cpu")
    assert calls.all == [None] and len(calls.here) == 1
    g = torch.zeros(1, 2, 300, dtype=torch.bool)
    g[0, 0, 7] = g[0, 1, 250] = True
    for grad in (False, True):  # inference, and q, k, v needing grads
        aha.attention(q.requires_grad_(grad), k, v, g, window=16, backend="cpu")
        assert torch.equal(calls.all[-1], g)  # All for the All tokens only
        assert torch.equal(calls.here[-1], ~g)  # Here for the Here tokens' tiles


def test_a_gate_with_grad_runs_both_branches(monkeypatch):
    calls = _Calls(monkeypatch)
    q, k, v, _ = _inputs(1, 2, 1, 40, 40, 8, "bool")
    aha.attention(q, k, v, torch.zeros(1, 2, 40, requires_grad=True), window=16, backend="cpu")
    assert calls.all == [None] and calls.here == [None]  # every token, both branches


def test_here_tiles_without_here_tokens_are_not_computed(monkeypatch):
    chunks = []
    real = here._Scores.probs
    monkeypatch.setattr(here._Scores, "probs", lambda self, *c: chunks.append(c) or real(self, *c))
    q, k, v, _ = _inputs(1, 1, 1, 64 * 40, 64 * 40, 4, "bool")
    g = torch.ones(1, 1, 64 * 40, dtype=torch.bool)
    g[0, 0, 5] = False  # a single Here token, in tile 0
    out = aha.attention(q, k, v, g, window=8, backend="cpu")
    assert {t0 for _, t0, _ in chunks} == {0}
    want = reference.attention(_np(q[:, :, :64]), _np(k[:, :, :64]), _np(v[:, :, :64]), _np(g[:, :, :64]), 8)
    np.testing.assert_allclose(_np(out[:, :, :64]), want, atol=2e-6, rtol=1e-5)


def test_all_backward_compacts_the_rows_with_a_gradient(monkeypatch):
    seen = []
    real = causal.rows_backward
    monkeypatch.setattr(causal, "rows_backward", lambda *a: seen.append(a[1].shape) or real(*a))
    q, k, v, g = _inputs(1, 2, 1, 300, 300, 8, "hard", seed=9)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    gl = g.clone().requires_grad_()
    out = aha.attention(*leaves, gl, window=10, backend="cpu")
    out.backward(torch.ones_like(out))
    assert len(seen) == 1 and seen[0][2] == int(g.sum())  # the All tokens only, both heads of the kv head


_MEMORY_PROBE = """
import resource, torch, aha
from pathlib import Path
torch.manual_seed(0)
n, d = {n}, 16
q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
gate = (torch.rand(1, 1, n) < 0.07)
soft = gate.float().requires_grad_()
leaves = [x.clone().requires_grad_() for x in (q, k, v)]

aha.backends()  # load the plugins (the triton one imports triton) before measuring
small = [x[:, :, :300] for x in (q, k, v)]
aha.attention(*small, gate[:, :, :300], window=256, backend="cpu")  # and the thread pool


def status(key):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))

try:  # reset the high-water mark, so that the peak is that of the calls below
    Path("/proc/self/clear_refs").write_text("5")
    base, peak = status("VmRSS"), lambda: status("VmHWM")
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
aha.attention(q, k, v, gate, window=256, backend="cpu")
aha.attention(*leaves, soft, window=256, backend="cpu").sum().backward()
print(peak() - base)
"""


def test_no_n_by_n_matrix():
    """At N = 32768 an N x N bool mask is 1 GiB (float32: 4 GiB); forward and backward stay far below it.

    The bound leaves room for allocator arenas and lazily loaded libraries, which vary by machine.
    """
    n = 32768
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE.format(n=n)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.split()[-1])
    assert grown < n * n // 4, f"peak memory grew by {grown / 2**20:.0f} MiB"


def test_all_tokens_far_apart_across_heads(monkeypatch):
    """Heads whose All tokens lie far apart give wide staircases, split into many masked key ranges."""
    monkeypatch.setattr(causal, "MASK_ELEMENTS", 64 * 64)
    q, k, v, _ = _inputs(1, 2, 1, 300, 300, 8, "bool", seed=10)
    g = torch.zeros(1, 2, 300, dtype=torch.bool)
    g[0, 0, :70] = True
    g[0, 1, 230:] = True
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = aha.attention(*leaves, g, window=16, backend="cpu")
    np.testing.assert_allclose(_np(out), reference.attention(_np(q), _np(k), _np(v), _np(g), 16), atol=2e-6, rtol=1e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    out.backward(dout)
    want = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), 16, _np(dout))
    for a, w in zip(leaves, want[:3], strict=True):
        np.testing.assert_allclose(_np(a.grad), w, atol=5e-6, rtol=1e-4)


def test_cache_seqlens_with_gradients():
    """Each sequence reads its own keys only (NaN past them is never read), and gradients flow."""
    q, k, v, g = _inputs(3, 4, 2, 5, 90, 8, "soft", seed=12)
    lens = [5, 90, 41]
    for b, n in enumerate(lens):
        k[b, :, n:] = v[b, :, n:] = float("nan")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    out = aha.attention(*leaves, window=7, cache_seqlens=torch.tensor(lens), backend="cpu")
    want = reference.attention(_np(q), _np(k), _np(v), _np(g), 7, cache_seqlens=lens)
    np.testing.assert_allclose(_np(out), want, atol=2e-6, rtol=1e-5)
    out.backward(torch.ones_like(out))
    for b, n in enumerate(lens):
        assert torch.isfinite(leaves[1].grad[b, :, :n]).all() and not leaves[1].grad[b, :, n:].any()


def test_deterministic_and_independent_of_the_thread_count():
    """Two identical calls agree bitwise (the backend declares determinism); one thread agrees closely."""
    q, k, v, g = _inputs(1, 4, 2, 300, 300, 8, "hard", seed=13)

    def run():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        out = aha.attention(*leaves, window=40, backend="cpu")
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_workers_run_on_one_intra_op_thread(two_threads):
    """Each worker runs its ops on one thread, also after the caller has its own count back
    (torch gives a thread the global count on its first parallel op unless it has one)."""
    counts = threads.parallel(lambda item, worker: torch.get_num_threads(), range(8))
    assert counts == [1] * 8
    assert torch.get_num_threads() == 2


def test_run_jobs_returns_the_results_in_order(two_threads):
    ran = []
    jobs = [(cost, lambda cost=cost: ran.append(cost) or cost * 10) for cost in (1, 5, 3, 9, 2, 7)]
    assert threads.run_jobs(jobs) == [10, 50, 30, 90, 20, 70]
    assert sorted(ran) == [1, 2, 3, 5, 7, 9]


def test_all_tokens_of_a_unit_split_into_several_jobs(monkeypatch):
    """With more workers than units, a unit's All rows are cut into runs; forward and grads stay exact."""
    monkeypatch.setattr(causal, "workers", lambda: 16)
    q, k, v, g = _inputs(1, 2, 1, 400, 400, 8, "hard", seed=14)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = aha.attention(*leaves, g, window=9, backend="cpu")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(15))
    out.backward(dout)
    np.testing.assert_allclose(_np(out), reference.attention(_np(q), _np(k), _np(v), _np(g), 9), atol=2e-6, rtol=1e-5)
    want = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), 9, _np(dout))
    for a, w in zip(leaves, want[:3], strict=True):
        np.testing.assert_allclose(_np(a.grad), w, atol=5e-6, rtol=1e-4)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_the_worker_pool_survives_fork():
    """A forked child (a DataLoader worker, say) gets its own pool instead of waiting on the parent's."""
    import multiprocessing

    q, k, v, g = _inputs(1, 2, 1, 300, 300, 8, "bool", seed=16)
    want = aha.attention(q, k, v, g, window=16, backend="cpu")  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_attend_cpu, (q, k, v, g)).get(timeout=120)
    assert torch.equal(got, want)


def _attend_cpu(q, k, v, g):
    return aha.attention(q, k, v, g, window=16, backend="cpu")


@pytest.mark.parametrize("shape", [(1, 8, 300), (2, 3, 1), (2, 3, 0), (1, 2, 64)])
def test_pad_token_rows_compacts_each_row_in_order(shape):
    """The selected tokens of each row first, in order; padding is index 0 and not valid."""
    from aha.torch_ops import pad_token_rows

    selected = torch.rand(shape, generator=torch.Generator().manual_seed(16)) < 0.3
    if shape == (1, 2, 64):
        selected[0, 0] = True  # one full row beside a sparse one
    idx, valid = pad_token_rows(selected)
    n_max = int(selected.sum(-1).max()) if selected.numel() else 0
    assert idx.shape == valid.shape == (*shape[:-1], n_max)
    for b in range(shape[0]):
        for h in range(shape[1]):
            want = selected[b, h].nonzero().squeeze(1)
            assert torch.equal(idx[b, h, : len(want)], want)
            assert valid[b, h].tolist() == [True] * len(want) + [False] * (n_max - len(want))
            assert not idx[b, h, len(want) :].any()
