"""pytest plugin of ``aha.testing``: the ``aha_backend`` fixture and Hypothesis profiles.

Loaded automatically (entry point ``pytest11``) wherever aha is installed.
Options:
    --aha-backend NAME   run the conformance suite for NAME (repeatable; default: every registered backend)
    --aha-max-len N      largest sequence length the strategies draw (default 257)
Hypothesis profiles (pick one with ``--hypothesis-profile NAME`` or HYPOTHESIS_PROFILE=NAME):

    dev        10 examples a property, derandomized, no example database (the suite's default)
    ci         20 examples, derandomized, no database, prints Hypothesis' reproduce blob
    thorough   300 examples, derandomized, no database
    explore    100 examples, randomized: new problems every run (replay one with --hypothesis-seed)

Derandomized, a run draws the same problems every time, so a failure fails again when the same
command runs again, and no failure of an earlier run is replayed from a database in the current
directory. Nothing is loaded unless asked for, so other projects' Hypothesis settings are left alone;
the conformance suite itself runs as ``dev`` does when no profile is chosen, and
``python -m aha conformance`` and this repository's pytest configuration ask for ``dev``.
On a CI machine (CI, GITHUB_ACTIONS, ... set), Hypothesis itself loads its ``ci`` profile when none
is chosen; the ``ci`` above replaces Hypothesis' own, so such a run is derandomized too, and its
report says to replay it with ``--hypothesis-profile=ci``.

A failing conformance test gets a report section saying how to replay it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from aha.registry import Capabilities

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fixture still works; profiles need hypothesis
    settings = None

PROFILES = ("dev", "ci", "thorough", "explore")

if settings is not None:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    _fixed = dict(derandomize=True, database=None, **_common)
    settings.register_profile("dev", max_examples=10, **_fixed)  # a quick look while developing
    settings.register_profile("ci", max_examples=20, print_blob=True, **_fixed)
    settings.register_profile("thorough", max_examples=300, **_fixed)
    settings.register_profile("explore", max_examples=100, derandomize=False, database=None, print_blob=True, **_common)


@dataclass(frozen=True)
class BackendUnderTest:
    """What a property needs: the backend's name, its capabilities, a device and size limit."""

    name: str
    caps: Capabilities
    device: str
    max_len: int


def pytest_addoption(parser):
    group = parser.getgroup("aha", "aha conformance suite")
    group.addoption("--aha-backend", action="append", default=[], help="backend(s) to check (default: all registered)")
    group.addoption("--aha-max-len", type=int, default=257, help="largest sequence length drawn (default 257)")


def pytest_configure(config):
    wanted = os.environ.get("HYPOTHESIS_PROFILE")
    if settings is not None and wanted and not config.getoption("hypothesis_profile", None):
        settings.load_profile(wanted)


def pytest_generate_tests(metafunc):
    if "aha_backend" in metafunc.fixturenames:
        names = metafunc.config.getoption("aha_backend") or [r.name for r in _rows() if r.backend is not None]
        metafunc.parametrize("aha_backend", names, indirect=True, scope="session")


def _rows():
    import aha

    return aha.backends()


def _device(caps: Capabilities) -> str | None:
    import torch

    if ("cuda" in caps.devices or "*" in caps.devices) and torch.cuda.is_available():
        return "cuda"
    if "cpu" in caps.devices or "*" in caps.devices:
        return "cpu"
    return None


def _lookup(name: str, max_len: int) -> tuple[BackendUnderTest | None, str]:
    """(the backend to test, "") or (None, why it cannot be tested here)."""
    from aha.registry import registry

    row = registry.get(name)
    if row is None:
        known = ", ".join(r.name for r in _rows())
        raise LookupError(f"backend {name!r} is not registered; registered: {known}")
    if row.status != "available":
        return None, f"backend {row.name!r} is unavailable here: {row.reason}"
    caps = row.backend.capabilities
    if "torch" not in caps.arrays:
        return None, f"backend {row.name!r} takes no torch tensors; the suite drives backends with torch"
    device = _device(caps)
    if device is None:
        return None, f"backend {row.name!r} runs on {caps.devices}, none of which is here"
    return BackendUnderTest(row.name, caps, device, max_len), ""


def backend_under_test(name: str, max_len: int = 257) -> BackendUnderTest:
    """The registered backend ``name`` as the conformance checks take it (what ``reproduce:`` lines call).

    Raises LookupError if it is not registered, RuntimeError if it cannot run here.
    """
    be, why = _lookup(name, max_len)
    if be is None:
        raise RuntimeError(why)
    return be


@pytest.fixture(scope="session")
def aha_backend(request) -> BackendUnderTest:
    try:
        be, why = _lookup(request.param, request.config.getoption("aha_max_len"))
    except LookupError as e:
        raise pytest.UsageError(f"--aha-backend: {e}") from None
    if be is None:
        pytest.skip(why)
    return be


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "aha_backend" in getattr(item, "fixturenames", ()):
        report.sections.append(("aha conformance: how to replay this failure", replay_text(item)))


def _profile() -> str:
    """The Hypothesis profile the suite runs under: ``dev`` when none was chosen (see `aha.testing.conformance.given`)."""
    name = settings.get_current_profile_name()
    return "dev" if name == "default" else name


def replay_text(item) -> str:
    """How to run a failed conformance test ``item`` again: the command, and what it will draw."""
    backend = item.callspec.params.get("aha_backend", "NAME") if hasattr(item, "callspec") else "NAME"
    config = item.config
    test = getattr(item, "originalname", item.name)
    cmd = f"python -m aha conformance --backend {backend} --max-len {config.getoption('aha_max_len')} -k {test}"
    given = getattr(item.obj, "_hypothesis_internal_use_settings", None)
    seed = config.getoption("hypothesis_seed", None)
    lines = []
    if given is None:
        lines.append(f"{test} draws nothing: it fails the same way every run. Run it alone:")
        lines.append(f"    {cmd}")
    elif given.derandomize:
        profile = _profile()
        lines.append(f"Derandomized (Hypothesis profile {profile!r}): the same command draws the same problems again:")
        lines.append(f"    {cmd} --hypothesis-profile={profile}")
    elif seed is not None:
        profile = _profile()
        lines.append(f"Randomized with seed {seed}: the same seed draws the same problems and fails again:")
        lines.append(f"    {cmd} --hypothesis-profile={profile} --hypothesis-seed={seed}")
    else:
        lines.append("Randomized and unseeded: only the reproduce: line replays it. Seed a randomized run with")
        lines.append("--hypothesis-seed=N to replay it whole (python -m aha conformance does so itself).")
    lines.append("Or rerun only the check that failed, in Python: the reproduce: line above is a call to run after")
    lines.append("    from aha.testing.conformance import *")
    return "\n".join(lines)
