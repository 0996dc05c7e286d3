"""The conformance suite of aha.testing, run for every registered backend.

Pick one backend with ``pytest tests/test_conformance.py --aha-backend torch``.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from aha.testing.checks import eager_fused_grads, reference_grads
from aha.testing.conformance import *  # noqa: F401,F403
from aha.testing.strategies import Case, PackedCase, make_inputs

TESTS = Path(__file__).resolve().parent

# What each backend of tests/planted_backends.py must do under the suite: the properties that must
# fail it (every other one it runs must pass). planted_ok16 runs the whole suite.
PLANTED = {
    "planted_ok16": (None, set()),
    "planted_scale": ("test_scale_is_the_callers", {"test_scale_is_the_callers"}),
    "planted_seqlens_grad": (
        "cache_seqlens",
        {"test_cache_seqlens_read_only_each_sequence_s_keys", "test_decode_steps_with_cache_seqlens"},
    ),
    # the drawn forward and gradient properties pass it at --max-len 64: only the pinned long cases catch it
    "planted_long": ("test_long_sequences or _match_reference", {"test_long_sequences"}),
}


def _outcomes(junit: Path) -> dict[tuple[str, str], str]:
    """{(property, backend): "passed" | "failed" | "skipped"} from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        prop, backend = case.get("name").rstrip("]").split("[")
        failed = case.find("failure") is not None or case.find("error") is not None
        out[prop, backend] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    return out


def test_the_suite_fails_planted_bugs_and_passes_a_correct_fp16_backend(tmp_path):
    """``python -m aha conformance`` on the backends of tests/planted_backends.py, at ``--max-len 64``.

    Runs (one subprocess, about 20 s): the whole suite for planted_ok16 (a correct backend that
    declares only float16 and bfloat16, golden vectors included, not skipped), the scale property for
    planted_scale, the two cache_seqlens properties for planted_seqlens_grad, and the long cases
    and the drawn forward and gradient properties for planted_long; Hypothesis profile ``planted``
    (5 derandomized examples, no shrinking).
    """
    select = " or ".join(name if props is None else f"({name} and ({props}))" for name, (props, _) in PLANTED.items())
    backends = [arg for name in PLANTED for arg in ("--backend", name)]
    junit = tmp_path / "planted.xml"
    cmd = [sys.executable, "-m", "aha", "conformance", "-p", "planted_backends", *backends, "--max-len", "64",
           "--hypothesis-profile=planted", "-q", "-k", select, f"--junitxml={junit}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert junit.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    outcomes = _outcomes(junit)
    for name, (_, must_fail) in PLANTED.items():
        ran = {prop: outcome for (prop, backend), outcome in outcomes.items() if backend == name}
        failed = {prop for prop, outcome in ran.items() if outcome == "failed"}
        assert ran and failed == must_fail, f"{name}: failed {sorted(failed)}, expected {sorted(must_fail)}\n{res.stdout[-4000:]}"
    ok16 = {prop: outcome for (prop, backend), outcome in outcomes.items() if backend == "planted_ok16"}
    assert ok16["test_golden_vectors"] == "passed" and "skipped" not in ok16.values(), ok16
    assert len(ok16) == sum(name.startswith("test_") for name in dir(sys.modules["aha.testing.conformance"]))
    # each failure says what is wrong
    assert "a key past cache_seqlens[b] got a nonzero gradient" in res.stdout
    assert "reproduce: check_long_case(backend_under_test('planted_long'), LongCase(case=Case(" in res.stdout
    assert res.returncode == 1


@pytest.mark.parametrize(
    "case, lens, scale",
    [
        (Case(2, 6, 2, 13, 37, 16, 5, "soft", "float64", seed=1), None, None),
        (Case(1, 2, 1, 20, 20, 8, 3, "random", "float64", seed=2), None, 0.9),
        (Case(1, 4, 2, 6, 18, 8, 2, "soft", "float64", seed=3), ((2, 0, 3, 1), (6, 4, 3, 5)), 0.3),
    ],
)
def test_eager_fused_grads_are_the_reference_gradients_in_float64(case, lens, scale):
    """The fused-kernel baseline of the low-precision rule computes the true gradients (GQA, Nq < Nk, packed)."""
    inp = make_inputs(case)
    ragged, pieces = {}, None
    if lens is not None:
        pc = PackedCase(case, *lens)
        ragged, pieces = pc.ragged(), pc.pieces()
    got = eager_fused_grads(inp.q, inp.k, inp.v, inp.gate, inp.dout, case.window, scale, pieces)
    for name, g, r in zip(("dq", "dk", "dv", "dgate"), got, reference_grads(inp, case.window, scale, **ragged)):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-12, rtol=1e-10, err_msg=name)
