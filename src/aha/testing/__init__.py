"""Testing tools for AHA backends: strategies, checks and the conformance suite.

Third-party backend authors run the same suite as the built-in backends:

    python -m aha conformance --backend mybackend

or reuse the pieces: ``aha_cases`` and ``make_inputs`` draw problems (``edge_cases`` and
``long_cases`` pin some, ``scale_factors`` draws softmax scales),
``assert_close`` compares with the float64 reference under the documented
per-dtype tolerances.
"""

from aha.testing.strategies import Case, Inputs, aha_cases, edge_cases, long_cases, make_inputs, scale_factors

__all__ = ["Case", "Inputs", "aha_cases", "edge_cases", "long_cases", "make_inputs", "scale_factors", "run_conformance"]


def run_conformance(backends=(), extra_args=()) -> int:
    """Run the conformance suite with pytest in a fresh interpreter; returns pytest's exit code."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "pytest", "--pyargs", "aha.testing.conformance", "-p", "no:cacheprovider"]
    if not any(a.startswith("--hypothesis-profile") for a in extra_args) and "HYPOTHESIS_PROFILE" not in os.environ:
        args.append("--hypothesis-profile=dev")
    for name in backends:
        args += ["--aha-backend", name]
    return subprocess.call(args + list(extra_args))
