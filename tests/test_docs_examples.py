"""Every ```python block in README.md and docs/ runs, so the examples cannot go stale.

A block whose first line is ``# doc: no-run`` is skipped (e.g. one that needs a GPU).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for page in PAGES:
        for n, code in enumerate(BLOCK.findall(page.read_text())):
            if not code.startswith("# doc: no-run"):
                yield pytest.param(code, id=f"{page.relative_to(ROOT)}#{n}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
