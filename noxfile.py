"""Sessions: tests, conformance, lint, docs, bench, gpu. `nox -s tests` is what CI runs."""

import os
import tarfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "docs"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build of torch lies on these machines' disk; an unpinned torch pulls a CUDA build of several GB.
TORCH = os.environ.get("AHA_TORCH_SPEC", "torch==2.13.0")
# Sessions run on the Python that runs nox (any supported one: requires-python in pyproject.toml),
# never "skipped" for want of a pinned interpreter; a missing interpreter is an error, not a pass.
PY = None
nox.options.error_on_missing_interpreters = True


def _install(session, extras="testing"):
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session(python=PY)
def tests(session):
    """The whole test suite, conformance for every backend included (CI)."""
    _install(session, "testing,hf,triton,experiments")
    session.install("parameterized", "accelerate")  # imported by transformers' own test files
    session.env.setdefault("AHA_TRANSFORMERS_TESTS", _transformers_tests(session))
    session.env.setdefault("TRITON_INTERPRET", "1")
    session.run("pytest", "-q", "-ra", "--hypothesis-profile=ci", *session.posargs)


def _transformers_tests(session) -> str:
    """The tests/ folder of the installed transformers' sdist, downloaded at test time (never kept in this repo):
    tests/test_hf_upstream.py runs its model test mixins on the AHA models."""
    version = session.run("python", "-c", "import transformers; print(transformers.__version__)", silent=True).strip()
    dest = Path(session.cache_dir).resolve() / f"transformers-{version}-tests"  # absolute: the tests link to it
    top = f"transformers-{version}"
    if not (dest / top / "tests").is_dir():
        session.run("pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dest), f"transformers=={version}")
        with tarfile.open(dest / f"{top}.tar.gz") as sdist:
            keep = [m for m in sdist.getmembers() if m.name.startswith(f"{top}/tests/") or m.name == f"{top}/PKG-INFO"]
            sdist.extractall(dest, members=keep, filter="data")
    return str(dest / top / "tests")


@nox.session(python=PY)
def conformance(session):
    """The conformance suite for every registered backend, or `-- --backend NAME` for one."""
    _install(session, "testing,triton")
    session.install("--no-deps", "./tests/example_plugin")
    session.env.setdefault("TRITON_INTERPRET", "1")
    session.run("python", "-m", "aha", "conformance", "--hypothesis-profile=ci", *session.posargs)


@nox.session(python=PY)
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "src", "backends", "tests", "docs/scripts", "examples", "benchmarks", "noxfile.py")


@nox.session(python=PY)
def docs(session):
    """Build the documentation site with --strict (mkdocstrings reads the sources; no torch needed)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")


@nox.session(python=PY)
def bench(session):
    """CPU benchmarks: the cpu backend against dense SDPA, the dual approach and FlexAttention, then decode.

    `nox -s bench -- --quick` for a short run. Writes JSON under benchmarks/results/.
    """
    _install(session, "testing,hf")
    session.install("matplotlib")
    session.run("python", "benchmarks/cpu.py", *session.posargs)
    session.run("python", "benchmarks/decode.py", *session.posargs)
    session.run("python", "benchmarks/ragged.py", *session.posargs)


@nox.session(python=False)
def gpu(session):
    """On an NVIDIA GPU machine: benchmarks/gpu.py in the current environment, installing nothing.

    The script needs no network and no install (it bootstraps this checkout itself): correctness first,
    then speed, within `-- --budget-s SECONDS`; `-- --dry-run` runs the same plan on the CPU and
    `-- --aot` compiles every kernel variant for sm_90 offline. JSON: benchmarks/results/gpu.json.
    """
    session.run("python3", "benchmarks/gpu.py", *session.posargs, external=True)


@nox.session(python=PY)
def reproduce(session):
    """The small-scale reproduction of the paper (under an hour on 2 cores), then the router calibration study on
    its pretrained weights (under 30 minutes); writes docs/results*."""
    _install(session, "experiments")
    session.run("python", "-m", "aha.experiments", "reproduce", *session.posargs)
    session.run("python", "-m", "aha.experiments", "calibrate", *session.posargs)


@nox.session(python=PY)
def demo(session):
    _install(session, "testing")
    session.run("python", "-m", "aha", "demo", *session.posargs)
