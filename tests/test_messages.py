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
