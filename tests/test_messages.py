"""Messages that say what to do: the fix is named in the syntax of the caller's array library."""

import numpy as np
import pytest
import torch

import aha


def test_numpy_integer_gate_is_told_to_use_astype():
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(TypeError, match=r"convert it with gate\.astype\(q\.dtype\)"):
        aha.attention(q, q, q, np.ones((1, 2, 3), dtype=np.int64), window=2)


def test_torch_integer_gate_is_told_to_use_to():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(TypeError, match=r"convert it with gate\.to\(q\.dtype\)"):
        aha.attention(q, q, q, torch.ones(1, 2, 3, dtype=torch.int64), window=2)


def test_raw_logits_as_gate_point_to_route():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"aha\.route\(logits\)"):
        aha.attention(q, q, q, torch.full((1, 2, 3), -2.5), window=2)


def test_meta_tensors_are_validated_by_shape_only():
    q = torch.empty(1, 2, 3, 4, device="meta")
    gate = torch.empty(1, 2, 3, device="meta")
    assert aha.select(q, q, q, gate, window=2, backend="torch") == "torch"
    with pytest.raises(ValueError, match="gate must have shape"):
        aha.select(q, q, q, gate[..., :2], window=2)


def test_reference_is_silent_on_non_finite_inputs():
    """NaN and inf keys are part of the spec: the reference computes with them and warns about nothing."""
    import warnings

    from aha import reference

    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 2, 6, 4))
    k, v = q.copy(), q.copy()
    k[0, 0, 0], v[0, 1, 1] = np.nan, np.inf
    gate = np.array([[[0, 0, 1, 0, 0.5, 0], [0, 1, 0, 0, 0, 0]]], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = reference.attention(q, k, v, gate, 2)
        reference.attention_vjp(q, k, v, gate, 2, np.ones_like(q))
    assert np.isfinite(out[0, 0, [3, 5]]).all()  # Here rows whose window misses key 0 stay finite
    assert np.isnan(out[0, 0, [2, 4]]).all()  # the All row and the soft row read it
