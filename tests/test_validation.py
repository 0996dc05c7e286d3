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
        (lambda q, k, v, g: (q[:, :, :0], k, v, g[:, :, :0]), ValueError, ["every dimension must be >= 1"]),
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
