"""Golden float64 vectors of AHA from an independent implementation (see vectors/README.md)."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

__all__ = ["golden_cases", "golden_router", "golden_ragged_cases"]


def _load(npz: str = "aha_golden.npz", cases: str = "cases.json"):
    root = resources.files("aha.testing") / "vectors"
    with (root / npz).open("rb") as f:
        data = dict(np.load(f))
    return data, json.loads((root / cases).read_text())


def _by_name(data: dict, name: str) -> dict:
    return {key.split("/", 1)[1]: val for key, val in data.items() if key.startswith(name + "/")}


def golden_cases():
    """Yield (name, dict of arrays) for each case: q, k, v, gate, window, dout, out, dq, dk, dv, dgate."""
    data, cases = _load()
    for case in cases:
        yield case["name"], _by_name(data, case["name"])


def golden_router() -> dict:
    """The router's check: logits, upstream, gate, dlogits, sparsity_loss."""
    data, _ = _load()
    return _by_name(data, "router")


def golden_ragged_cases():
    """Yield (name, dict of arrays) for each ragged case (vectors/ragged_golden.npz, ragged_cases.json).

    As `golden_cases`, plus the ragged-batch arguments the case takes: ``cu_seqlens_q`` and
    ``cu_seqlens_k`` (packed, B = 1), or ``cache_leftpad`` and maybe ``cache_seqlens`` (int32).
    """
    data, cases = _load("ragged_golden.npz", "ragged_cases.json")
    for case in cases:
        yield case["name"], _by_name(data, case["name"])
