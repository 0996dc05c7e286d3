"""Every ```python block in README.md and docs/ runs, so the examples cannot go stale.

A block right after an HTML comment ``<!-- doc: no-run (why) -->`` is skipped (e.g. one that needs
a GPU or a checkpoint); the comment does not show on the rendered page.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- doc: no-run[^\n]*-->\n)?^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for page in PAGES:
        for n, (skip, code) in enumerate(BLOCK.findall(page.read_text())):
            if not skip:
                yield pytest.param(code, id=f"{page.relative_to(ROOT)}#{n}")


def test_no_run_markers_stay_off_the_rendered_code():
    """The old in-code marker would show on the page; blocks to skip take the HTML comment."""
    for page in PAGES:
        assert "# doc: no-run" not in page.read_text(), page


@pytest.mark.parametrize("code", list(_blocks()))
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
