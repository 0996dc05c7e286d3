"""Golden float64 vectors of AHA from an independent implementation (see vectors/README.md)."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

__all__ = ["golden_cases", "golden_router"]


def _load():
    root = resources.files("aha.testing") / "vectors"
    with (root / "aha_golden.npz").open("rb") as f:
        data = dict(np.load(f))
    cases = json.loads((root / "cases.json").read_text())
    return data, cases


def golden_cases():
    """Yield (name, dict of arrays) for each case: q, k, v, gate, window, dout, out, dq, dk, dv, dgate."""
    data, cases = _load()
    for case in cases:
        name = case["name"]
        yield name, {key.split("/", 1)[1]: val for key, val in data.items() if key.startswith(name + "/")}


def golden_router() -> dict:
    """The router's check: logits, upstream, gate, dlogits, sparsity_loss."""
    data, _ = _load()
    return {key.split("/", 1)[1]: val for key, val in data.items() if key.startswith("router/")}
