"""pytest plugin of ``aha.testing``: the ``aha_backend`` fixture and Hypothesis profiles.

Loaded automatically (entry point ``pytest11``) wherever aha is installed.
Options:
    --aha-backend NAME   run the conformance suite for NAME (repeatable; default: every registered backend)
    --aha-max-len N      largest sequence length the strategies draw (default 257)
Hypothesis profiles: ``dev`` (quick), ``ci`` (derandomized, no deadline, no database)
and ``thorough``; pick one with ``--hypothesis-profile NAME`` or HYPOTHESIS_PROFILE=NAME.
Nothing is loaded unless asked for, so other projects' Hypothesis settings are left alone;
``python -m aha conformance`` and this repository's pytest configuration ask for ``dev``.
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

if settings is not None:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("dev", max_examples=10, **_common)  # a quick look while developing
    settings.register_profile("ci", max_examples=20, derandomize=True, database=None, print_blob=True, **_common)
    settings.register_profile("thorough", max_examples=300, **_common)


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


@pytest.fixture(scope="session")
def aha_backend(request) -> BackendUnderTest:
    from aha.registry import registry

    row = registry.get(request.param)
    if row is None:
        known = ", ".join(r.name for r in _rows())
        raise pytest.UsageError(f"--aha-backend {request.param!r} is not registered; registered: {known}")
    if row.status != "available":
        pytest.skip(f"backend {row.name!r} is unavailable here: {row.reason}")
    caps = row.backend.capabilities
    if "torch" not in caps.arrays:
        pytest.skip(f"backend {row.name!r} takes no torch tensors; the suite drives backends with torch")
    device = _device(caps)
    if device is None:
        pytest.skip(f"backend {row.name!r} runs on {caps.devices}, none of which is here")
    return BackendUnderTest(row.name, caps, device, request.config.getoption("aha_max_len"))
