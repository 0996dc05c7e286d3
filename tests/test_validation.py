"""Bad input: each error names the argument and what was seen; nothing is broadcast."""

import numpy as np
import pytest
import torch

import aha


def _ok(b=1, hq=4, hkv=2, nq=5, nk=7, d=8, dtype=torch.float32):
    return (
        torch.randn(b, hq, nq, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
        torch.ones(b, hq, nq, dtype=dtype),
    )


def _call(q, k, v, g, **kw):
    kw.setdefault("window", 3)
    return aha.attention(q, k, v, g, **kw)


def test_valid_call_works():
    assert _call(*_ok()).shape == (1, 4, 5, 8)


@pytest.mark.parametrize(
    "mutate,exc,words",
    [
        (lambda q, k, v, g: (q[0], k, v, g), ValueError, ["q must have rank 4", "(4, 5, 8)"]),
        (lambda q, k, v, g: (q, k[0], v, g), ValueError, ["k must have rank 4"]),
        (lambda q, k, v, g: (q, k, v[:, :, :3], g), ValueError, ["v must have k's shape", "(1, 2, 3, 8)"]),
        (lambda q, k, v, g: (q, torch.cat([k, k]), torch.cat([v, v]), g), ValueError, ["batch size", "(2, 2, 7, 8)"]),
        (lambda q, k, v, g: (q, k[..., :4], v[..., :4], g), ValueError, ["head dim", "(1, 2, 7, 4)"]),
        (lambda q, k, v, g: (q[:, :3], k, v, g[:, :3]), ValueError, ["Hq=3", "Hkv=2"]),
        (lambda q, k, v, g: (torch.cat([q, q], 2), k, v, torch.cat([g, g], 2)), ValueError, ["Nq=10 > Nk=7"]),
        (lambda q, k, v, g: (q, k, v, g[..., :4]), ValueError, ["gate must have shape", "(1, 4, 5)", "(1, 4, 4)"]),
        (lambda q, k, v, g: (q, k, v, g[0]), ValueError, ["gate must have shape"]),
        (lambda q, k, v, g: (q, k, v, g.long()), TypeError, ["gate must be bool or q's dtype", "int64"]),
        (lambda q, k, v, g: (q, k, v, g.double()), TypeError, ["gate", "float64"]),
        (lambda q, k, v, g: (q, k, v, g * 2), ValueError, ["gate values must lie in [0, 1]"]),
        (lambda q, k, v, g: (q, k, v, g * float("nan")), ValueError, ["gate values"]),
        (lambda q, k, v, g: (q, k.double(), v, g), TypeError, ["share one dtype", "float64"]),
        (lambda q, k, v, g: (q.long(), k.long(), v.long(), g), TypeError, ["q must be floating", "int64"]),
        (lambda q, k, v, g: (q, k.numpy(), v, g), TypeError, ["must all be numpy arrays or all torch tensors"]),
        (lambda q, k, v, g: (q, k, v, g.numpy()), TypeError, ["gate must be a torch array"]),
        (lambda q, k, v, g: (q, k, v, [[1.0]]), TypeError, ["gate must be a numpy.ndarray or torch.Tensor, got list"]),
        (lambda q, k, v, g: (q[..., :0], k[..., :0], v[..., :0], g), ValueError, ["head dim D must be >= 1", "(1, 4, 5, 0)"]),
        (lambda q, k, v, g: (q, k[:, :0], v[:, :0], g), ValueError, ["at least one kv head", "Hq=4", "Hkv=0"]),
        (lambda q, k, v, g: (q, k[:, :, :0], v[:, :, :0], g), ValueError, ["Nq=5 > Nk=0"]),
    ],
)
def test_bad_input_is_named(mutate, exc, words):
    with pytest.raises(exc) as info:
        _call(*mutate(*_ok()))
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize(
    "window,exc",
    [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("4", TypeError), (True, TypeError), (None, TypeError)],
)
def test_bad_window(window, exc):
    with pytest.raises(exc, match="window"):
        _call(*_ok(), window=window)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), "x"])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        _call(*_ok(), scale=scale)


def test_numpy_window_int_is_accepted():
    q, k, v, g = (x.double().numpy() for x in _ok())
    assert _call(q, k, v, g, window=np.int64(3)).shape == (1, 4, 5, 8)


def test_unknown_backend_lists_registered():
    with pytest.raises(ValueError, match=r"'nope' is not registered; registered backends: .*torch"):
        _call(*_ok(), backend="nope")


def test_backend_that_cannot_serve_says_why_and_who_can():
    q, k, v, g = (x.double().numpy() for x in _ok())
    with pytest.raises(aha.BackendError, match=r"takes torch arrays, got numpy.*Backends that can: reference"):
        _call(q, k, v, g, backend="torch")


def test_backend_must_be_a_name():
    with pytest.raises(TypeError, match="backend must be"):
        _call(*_ok(), backend=3)


def test_route_threshold_and_dtype_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        aha.route(torch.zeros(2), threshold=1.5)
    with pytest.raises(TypeError, match="logits must be floating"):
        aha.route(torch.zeros(2, dtype=torch.long))


def test_cache_seqlens_are_checked():
    q, k, v, g = _ok(b=2)
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \[B\] = \(2,\), got \(3,\)"):
        _call(q, k, v, g, cache_seqlens=torch.tensor([5, 6, 7]))
    with pytest.raises(TypeError, match=r"cache_seqlens must be integers \(int32 or int64\), got float32"):
        _call(q, k, v, g, cache_seqlens=torch.tensor([5.0, 6.0]))
    with pytest.raises(ValueError, match=r"lie in \[Nq, Nk\] = \[5, 7\].*\[4, 6\]"):
        _call(q, k, v, g, cache_seqlens=torch.tensor([4, 6]))
    with pytest.raises(ValueError, match=r"\[5, 8\]"):
        _call(q, k, v, g, cache_seqlens=torch.tensor([5, 8]))
    with pytest.raises(TypeError, match="cache_seqlens must be a torch array"):
        _call(q, k, v, g, cache_seqlens=np.array([5, 6]))
    assert _call(q, k, v, g, cache_seqlens=torch.tensor([5, 7])).shape == q.shape


# Ragged batches: packed sequences (cu_seqlens_q / cu_seqlens_k) and left-padded rows (cache_leftpad).


def _packed(nq=6, nk=9, dtype=torch.float64):
    """q [1, 2, nq, 4], k/v [1, 1, nk, 4] and a gate: three sequences once cu_seqlens are given."""
    q, k, v, g = _ok(b=1, hq=2, hkv=1, nq=nq, nk=nk, d=4, dtype=dtype)
    return q, k, v, g


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


GOOD_Q, GOOD_K = (0, 2, 2, 6), (0, 3, 4, 9)  # three sequences: 2/3, 0/1, 4/5 queries/keys


def test_valid_packed_call_works():
    q, k, v, g = _packed()
    out = _call(q, k, v, g, cu_seqlens_q=_cu(*GOOD_Q), cu_seqlens_k=_cu(*GOOD_K), backend="reference")
    assert out.shape == q.shape
    hinted = _call(q, k, v, g, cu_seqlens_q=_cu(*GOOD_Q), cu_seqlens_k=_cu(*GOOD_K), max_seqlen_q=4, max_seqlen_k=99, backend="reference")
    torch.testing.assert_close(hinted, out)  # a hint at least the longest sequence changes nothing


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(cu_seqlens_q=_cu(1, 2, 2, 6)), ValueError, ["cu_seqlens_q must start at 0", "cu_seqlens_q[0] = 1"]),
        (dict(cu_seqlens_k=_cu(2, 3, 4, 9)), ValueError, ["cu_seqlens_k must start at 0", "cu_seqlens_k[0] = 2"]),
        (dict(cu_seqlens_q=_cu(0, 3, 2, 6)), ValueError, ["cu_seqlens_q must be non-decreasing", "cu_seqlens_q[1] = 3 > cu_seqlens_q[2] = 2"]),
        (dict(cu_seqlens_k=_cu(0, 5, 4, 9)), ValueError, ["cu_seqlens_k must be non-decreasing", "cu_seqlens_k[1] = 5"]),
        (dict(cu_seqlens_q=_cu(0, 2, 2, 5)), ValueError, ["cu_seqlens_q must end at the packed length Nq = 6", "cu_seqlens_q[-1] = 5"]),
        (dict(cu_seqlens_k=_cu(0, 3, 4, 10)), ValueError, ["cu_seqlens_k must end at the packed length Nk = 9", "cu_seqlens_k[-1] = 10"]),
        (dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 2.0, 6.0])), TypeError, ["cu_seqlens_q must be integers", "float32"]),
        (dict(cu_seqlens_k=torch.tensor([False, True])), TypeError, ["cu_seqlens_k must be integers", "bool"]),
        (dict(cu_seqlens_q=np.array(GOOD_Q)), TypeError, ["cu_seqlens_q must be a torch array like q", "ndarray"]),
        (dict(cu_seqlens_k=list(GOOD_K)), TypeError, ["cu_seqlens_k must be a numpy.ndarray or torch.Tensor", "list"]),
        (dict(cu_seqlens_q=_cu(*GOOD_Q)[None]), ValueError, ["cu_seqlens_q must have shape [S + 1]", "(1, 4)"]),
        (dict(cu_seqlens_q=_cu(0, 6)), ValueError, ["same number of sequences", "got 1 and 3"]),
        (dict(cu_seqlens_q=_cu(0, 4, 4, 6)), ValueError, ["sequence 0 has more queries (4, cu_seqlens_q) than keys (3, cu_seqlens_k)"]),
        (dict(cu_seqlens_q=_cu(0, 1, 3, 6)), ValueError, ["sequence 1 has more queries (2, cu_seqlens_q) than keys (1, cu_seqlens_k)"]),
        (dict(cu_seqlens_k=None), ValueError, ["cu_seqlens_k is missing", "need both cu_seqlens_q and cu_seqlens_k"]),
        (dict(cu_seqlens_q=None), ValueError, ["cu_seqlens_q is missing"]),
        (dict(cache_seqlens=_cu(9)), ValueError, ["cannot be combined with cache_seqlens / cache_leftpad"]),
        (dict(cache_leftpad=_cu(0)), ValueError, ["cannot be combined with cache_seqlens / cache_leftpad"]),
        (dict(max_seqlen_q=3), ValueError, ["max_seqlen_q = 3 is shorter than the longest sequence (4)", "at least 4"]),
        (dict(max_seqlen_k=4), ValueError, ["max_seqlen_k = 4 is shorter than the longest sequence (5)"]),
        (dict(max_seqlen_q=-1), ValueError, ["max_seqlen_q must be >= 0", "-1"]),
        (dict(max_seqlen_k=4.0), TypeError, ["max_seqlen_k must be an int >= 0 or None", "4.0"]),
        (dict(max_seqlen_q=True), TypeError, ["max_seqlen_q must be an int >= 0 or None", "True"]),
        (dict(max_seqlen_k=torch.tensor(5)), TypeError, ["max_seqlen_k must be an int >= 0 or None"]),
    ],
)
def test_bad_packed_sequences_are_named(kw, exc, words):
    q, k, v, g = _packed()
    args = dict(cu_seqlens_q=_cu(*GOOD_Q), cu_seqlens_k=_cu(*GOOD_K)) | kw
    with pytest.raises(exc) as info:
        _call(q, k, v, g, **{n: x for n, x in args.items() if x is not None}, backend="reference")
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_packed_needs_batch_size_one():
    q, k, v, g = _ok(b=2, nq=6, nk=9)
    with pytest.raises(ValueError, match=r"batch size B = 1 .*got q \(2, 4, 6, 8\); use cache_seqlens / cache_leftpad"):
        _call(q, k, v, g, cu_seqlens_q=_cu(0, 6), cu_seqlens_k=_cu(0, 9))


def test_max_seqlen_hints_need_packed_sequences():
    with pytest.raises(ValueError, match="max_seqlen_q / max_seqlen_k are hints for packed sequences"):
        _call(*_packed(), max_seqlen_q=6)


def test_cu_seqlens_on_another_device_are_named():
    q, k, v, g = _packed()
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be on q's device cpu, got meta"):
        _call(q, k, v, g, cu_seqlens_q=_cu(*GOOD_Q), cu_seqlens_k=_cu(*GOOD_K).to("meta"))


def test_numpy_packed_call_is_checked_too():
    q, k, v, g = (x.numpy() for x in _packed())
    out = _call(q, k, v, g, cu_seqlens_q=np.array(GOOD_Q), cu_seqlens_k=np.array(GOOD_K, dtype=np.int64))
    assert out.shape == q.shape and isinstance(out, np.ndarray)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a numpy array like q, got Tensor"):
        _call(q, k, v, g, cu_seqlens_q=_cu(*GOOD_Q), cu_seqlens_k=np.array(GOOD_K))
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        _call(q, k, v, g, cu_seqlens_q=np.array(GOOD_Q), cu_seqlens_k=np.array([0, 3, 2, 9]))


@pytest.fixture
def plain_backend():
    """A backend named "plain" that declares no ragged feature (default Capabilities), registered in-process."""
    from aha.registry import registry

    class Plugin:
        @aha.hookimpl
        def register_backends(self, register):
            forward = lambda q, k, v, gate, *, window, scale=None: aha.attention(q, k, v, gate, window=window, backend="reference")  # noqa: E731
            register(aha.Backend("plain", forward, capabilities=aha.Capabilities(dtypes=("float64",)), priority=-100))

    registry.add_plugin(Plugin(), "plain")
    try:
        yield "plain"
    finally:
        registry.reload()


def test_backend_without_packed_or_leftpad_says_which_feature_it_lacks(plain_backend):
    q, k, v, g = _packed()
    assert _call(q, k, v, g, backend=plain_backend).shape == q.shape
    with pytest.raises(aha.BackendError, match=r"takes no packed sequences \(cu_seqlens_q / cu_seqlens_k\)"):
        _call(q, k, v, g, cu_seqlens_q=_cu(*GOOD_Q), cu_seqlens_k=_cu(*GOOD_K), backend=plain_backend)
    q, k, v, g = _ok(b=2, dtype=torch.float64)
    with pytest.raises(aha.BackendError, match=r"takes no cache_leftpad \(left-padded rows\)"):
        _call(q, k, v, g, cache_leftpad=_cu(0, 1), backend=plain_backend)


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(cache_leftpad=_cu(-1, 0)), ValueError, ["cache_leftpad[0] = -1 must lie in [0, the row's length] = [0, 7]", "Nk = 7"]),
        (dict(cache_leftpad=_cu(0, 8)), ValueError, ["cache_leftpad[1] = 8 must lie in [0, the row's length] = [0, 7]"]),
        (dict(cache_leftpad=_cu(0, 6), cache_seqlens=_cu(7, 5)), ValueError, ["cache_leftpad[1] = 6", "[0, 5] (cache_seqlens[1] = 5)"]),
        (dict(cache_leftpad=_cu(0, 0), cache_seqlens=_cu(8, 5)), ValueError, ["cache_seqlens must lie in [0, Nk] = [0, 7]", "cache_seqlens[0] = 8"]),
        (dict(cache_leftpad=_cu(0, 0), cache_seqlens=_cu(-1, 5)), ValueError, ["cache_seqlens[0] = -1"]),
        (dict(cache_leftpad=_cu(0, 1, 2)), ValueError, ["cache_leftpad must have shape [B] = (2,), got (3,)"]),
        (dict(cache_leftpad=_cu(0, 1)[None]), ValueError, ["cache_leftpad must have shape [B] = (2,), got (1, 2)"]),
        (dict(cache_leftpad=torch.tensor(1)), ValueError, ["cache_leftpad must have shape [B] = (2,), got ()"]),
        (dict(cache_leftpad=torch.tensor([0.0, 1.0])), TypeError, ["cache_leftpad must be integers (int32 or int64), got float32"]),
        (dict(cache_leftpad=torch.tensor([False, True])), TypeError, ["cache_leftpad must be integers", "bool"]),
        (dict(cache_leftpad=np.array([0, 1])), TypeError, ["cache_leftpad must be a torch array like q, got ndarray"]),
        (dict(cache_leftpad=[0, 1]), TypeError, ["cache_leftpad must be a numpy.ndarray or torch.Tensor, got list"]),
        (dict(cache_leftpad=_cu(0, 1).to("meta")), ValueError, ["cache_leftpad must be on q's device cpu, got meta"]),
        (dict(cache_leftpad=_cu(0, 1), max_seqlen_k=7), ValueError, ["max_seqlen_q / max_seqlen_k are hints for packed sequences"]),
    ],
)
def test_bad_cache_leftpad_is_named(kw, exc, words):
    q, k, v, g = _ok(b=2)
    with pytest.raises(exc) as info:
        _call(q, k, v, g, **kw, backend="reference")
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_left_padded_calls_that_are_valid():
    """Padding up to the whole row, and a row shorter than Nq (its first queries are padding), are allowed."""
    q, k, v, g = _ok(b=2, nq=5, nk=7)
    for kw in (dict(cache_leftpad=_cu(0, 7)), dict(cache_leftpad=_cu(3, 0), cache_seqlens=_cu(4, 7)), dict(cache_leftpad=_cu(0, 0), cache_seqlens=_cu(0, 2))):
        out = _call(q, k, v, g, **kw, backend="reference")
        assert out.shape == q.shape and torch.isfinite(out).all()
    out = _call(q, k, v, g, cache_leftpad=_cu(3, 0), cache_seqlens=_cu(4, 7), backend="reference")
    assert not out[0, :, :4].any() and out[0, :, 4].all()  # row 0: one real query, at key 3
