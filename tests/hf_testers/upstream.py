"""transformers' own test files, from the sdist of the installed version, as an importable package.

``nox -s tests`` downloads the sdist and sets ``AHA_TRANSFORMERS_TESTS`` to its ``tests/`` folder.
`load` links the top-level test files we run into a temporary package (``hf_upstream``) beside our
shims for the modules they import that the sdist does not ship, and imports them.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "AHA_TRANSFORMERS_TESTS"
PACKAGE = "hf_upstream"
FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_tensor_parallel_mixin.py",
    "test_fsdp_mixin.py",
)
SHIMS = {  # module path in the package -> our file standing for it
    "generation/test_utils.py": "shim_generation.py",
    "exporters/test_export.py": "shim_export.py",
    "distributed_testing_utils.py": "shim_distributed.py",
}
MISSING = (
    f"transformers' test mixins come from the sdist of the installed transformers: `nox -s tests` downloads it; "
    f"to run these tests by hand, unpack `pip download --no-deps --no-binary :all: transformers==VERSION` and set "
    f"{ENV} to its tests/ folder (the mixins also need the packages parameterized and accelerate)"
)


def sdist_tests() -> Path | None:
    """The sdist's tests/ folder named by the environment, or None."""
    path = os.environ.get(ENV)
    return Path(path).resolve() if path and (Path(path) / FILES[0]).is_file() else None  # links need it absolute


def _check_version(tests: Path) -> None:
    import transformers

    info = tests.parent / "PKG-INFO"
    version = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("Version:")), None) if info.is_file() else None  # fmt: skip
    if version != transformers.__version__:
        raise RuntimeError(
            f"{ENV}={tests} holds the tests of transformers {version}, but transformers {transformers.__version__} "
            "is installed: the mixins must come from the installed version's sdist"
        )


def load() -> str:
    """Build and import the ``hf_upstream`` package; returns its name (its modules import as
    ``hf_upstream.test_modeling_common`` and so on)."""
    if PACKAGE in sys.modules:
        return PACKAGE
    tests = sdist_tests()
    if tests is None:
        raise FileNotFoundError(MISSING)
    _check_version(tests)
    root = Path(tempfile.mkdtemp(prefix="aha-hf-upstream-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = root / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text('"""transformers\' test files (linked from its sdist) and our shims."""\n')
    for name in FILES:
        (package / name).symlink_to(tests / name)
    here = Path(__file__).resolve().parent
    for target, shim in SHIMS.items():
        path = package / target
        for parent in reversed(path.relative_to(package).parents[:-1]):
            (package / parent).mkdir(exist_ok=True)
            (package / parent / "__init__.py").touch()
        path.symlink_to(here / shim)
    sys.path.insert(0, str(root))
    importlib.import_module(PACKAGE)
    return PACKAGE
