"""Every plugin hook is documented and tested (as datasette's tests do for its hooks).

Adding a hookspec to aha.hookspecs without a docstring that names its arguments, a section in
docs/plugins.md or docs/writing-a-backend.md (a heading naming the hook), or a test that
implements it (``def <hook>(`` in a tests/test_*.py other than this file) fails here.
"""

import inspect
import re
import types
from pathlib import Path

import pytest

from aha import hookspecs
from aha.registry import registry

ROOT = Path(__file__).resolve().parents[1]
DOC_PAGES = ("docs/plugins.md", "docs/writing-a-backend.md")


def hookspec_names(module=hookspecs) -> list[str]:
    """Functions of ``module`` marked with ``@hookspec``."""
    return sorted(name for name, obj in vars(module).items() if callable(obj) and hasattr(obj, "aha_spec"))


def _docs() -> str:
    return "\n".join((ROOT / page).read_text() for page in DOC_PAGES)


def _tests() -> str:
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    return "\n".join(p.read_text() for p in files)


def missing(name: str, spec, docs: str, tests: str) -> list[str]:
    """What hook ``name`` lacks: docstring, its arguments in it, a doc section, a test implementing it."""
    problems = []
    doc = inspect.getdoc(spec) or ""
    if not doc.strip():
        problems.append("no docstring")
    problems += [
        f"docstring does not mention argument {arg!r}"
        for arg in inspect.signature(spec).parameters
        if not re.search(rf"\b{arg}\b", doc)
    ]
    if not re.search(rf"^#+ .*\b{name}\b", docs, re.M):
        problems.append(f"no section (a heading naming it) in {' or '.join(DOC_PAGES)}")
    if not re.search(rf"\bdef {name}\(", tests):
        problems.append(f"no test implements it (no 'def {name}(' in tests/test_*.py)")
    return problems


def test_hookspecs_are_the_hooks_the_registry_knows():
    assert hookspec_names(), "aha.hookspecs defines no hook"
    assert hookspec_names() == sorted(vars(registry.pm.hook)), "a hook is declared outside aha.hookspecs"


@pytest.mark.parametrize("name", hookspec_names())
def test_hook_is_documented_and_tested(name):
    problems = missing(name, getattr(hookspecs, name), _docs(), _tests())
    assert not problems, f"hook {name!r}: " + "; ".join(problems)


def test_a_new_hook_without_docs_or_tests_is_caught():
    """The check itself: a fresh hookspec (not added to aha.hookspecs) fails on every count."""

    @hookspecs.hookspec
    def on_brand_new_event(payload):
        pass

    module = types.ModuleType("new_hookspecs")
    module.on_brand_new_event = on_brand_new_event
    assert hookspec_names(module) == ["on_brand_new_event"]
    problems = missing("on_brand_new_event", on_brand_new_event, _docs(), _tests())
    assert len(problems) == 4, problems
