"""Testing tools for AHA backends: strategies, checks and the conformance suite.

Third-party backend authors run the same suite as the built-in backends::

    python -m aha conformance --backend mybackend

or reuse the pieces: :func:`aha_cases` and :func:`make_inputs` draw problems,
:func:`assert_close` compares with the float64 reference under the documented
per-dtype tolerances.
"""

from aha.testing.strategies import Case, Inputs, aha_cases, edge_cases, make_inputs

__all__ = ["Case", "Inputs", "aha_cases", "edge_cases", "make_inputs", "run_conformance"]


def run_conformance(backends=(), extra_args=()) -> int:
    """Run the conformance suite with pytest in a fresh interpreter; returns pytest's exit code."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "pytest", "--pyargs", "aha.testing.conformance", "-p", "no:cacheprovider"]
    for name in backends:
        args += ["--aha-backend", name]
    return subprocess.call(args + list(extra_args))
