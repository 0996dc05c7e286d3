"""The documentation site cannot drift from the code: tables, drawings and included files are checked."""

import dataclasses
import importlib.util
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import aha
from aha.testing import checks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _script(name):
    """A module of docs/scripts/, imported from its path."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec_function(name):
    """A function defined by a ```python block of docs/spec.md (the block runs in full)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "spec.md").read_text(), re.S | re.M)
    code = next(b for b in blocks if f"def {name}(" in b)
    scope = {"__name__": "__spec_block__"}
    exec(compile(code, "<docs/spec.md>", "exec"), scope)
    return scope[name]


def test_backends_table_matches_the_registry():
    script = _script("backends_table")
    committed = script.committed((DOCS / "backends.md").read_text())
    expected = script.table(script.builtin_rows())
    assert committed == expected, (
        "docs/backends.md disagrees with the registry; run `python docs/scripts/backends_table.py --write`. "
        f"Expected:\n{expected}"
    )


def test_every_builtin_entry_point_is_loaded():
    """The table covers every backend pyproject.toml declares (a stale install would hide one)."""
    tomllib = pytest.importorskip("tomllib")
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["aha"])
    loaded = {r.plugin for r in _script("backends_table").builtin_rows()}
    assert declared == loaded, "reinstall aha (pip install -e .) so that its entry points are current"


@pytest.mark.parametrize(
    "nq, nk, window, gate",
    [
        (12, 12, 4, (1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0)),
        (4, 12, 3, (0, 1, 0, 0)),
        (5, 5, 1, (0, 0, 1, 0, 0)),
        (3, 7, 9, (0, 0, 0)),
    ],
)
def test_mask_pictures_are_what_the_reference_reads(nq, nk, window, gate):
    keys_read = _spec_function("keys_read")
    np.testing.assert_array_equal(_script("masks").visible(nq, nk, window, gate), keys_read(nq, nk, window, gate))


def test_mask_pictures_are_committed_and_redrawable(tmp_path):
    for png in ("masks.png", "masks_cache.png"):
        assert (DOCS / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pytest.importorskip("matplotlib")
    paths = _script("masks").draw(tmp_path)
    assert [p.name for p in paths] == ["masks.png", "masks_cache.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def _ascii_masks(text):
    """Rows of x/. groups of the ```text drawings in spec.md, one list of rows per drawing column."""
    rows = []
    for block in re.findall(r"^```text\n(.*?)^```", text, re.S | re.M):
        lines = [line for line in block.splitlines() if line.lstrip().startswith("i=")]
        rows.append([re.findall(r"[x.](?: [x.])+", line) for line in lines])
    return rows


def test_spec_drawings_are_what_the_reference_reads():
    keys_read = _spec_function("keys_read")
    square, cache = _ascii_masks((DOCS / "spec.md").read_text())

    def draw(mask):
        return [" ".join("x" if r else "." for r in row) for row in mask]

    assert [row[0] for row in square] == draw(keys_read(8, 8, 3, [1] * 8))  # All
    assert [row[1] for row in square] == draw(keys_read(8, 8, 3, [0] * 8))  # Here, window 3
    assert [row[0] for row in cache] == draw(keys_read(2, 6, 2, [0, 1]))


def test_spec_tolerance_table_matches_the_suite():
    text = (DOCS / "spec.md").read_text()
    rows = {
        m[0]: (float(m[1]), float(m[2]))
        for m in re.findall(r"^\| (float\d+) \| ([\d.e-]+) \| ([\d.e-]+) \|$", text, re.M)
    }
    assert rows == checks.TOLERANCE
    low = next(line for line in text.splitlines() if line.startswith("| float16, bfloat16 |"))
    floors = re.search(r"\+ ([\d.e-]+) \(fp16\) / ([\d.e-]+) \(bf16\)", low)
    assert floors and (float(floors[1]), float(floors[2])) == (checks.FLOOR["float16"], checks.FLOOR["bfloat16"])


def test_flex_attention_convention():
    """FlexAttention's sliding window w (q_idx - kv_idx <= w) is AHA's window w + 1, as spec.md says."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    w, n = 5, 48

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)

    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs unfused without torch.compile
        out = flex.flex_attention(q, k, v, block_mask=flex.create_block_mask(sliding, None, None, n, n, device="cpu"))
    here = aha.attention(q, k, v, torch.zeros(1, 2, n), window=w + 1)
    torch.testing.assert_close(out, here, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, aha.attention(q, k, v, torch.zeros(1, 2, n), window=w), atol=1e-3)


def test_writing_a_backend_includes_every_file_of_the_example():
    page = (DOCS / "writing-a-backend.md").read_text()
    included = set(re.findall(r'^--8<-- "([^"]+)"$', page, re.M))
    example = ROOT / "tests" / "example_plugin"
    files = {
        str(p.relative_to(ROOT))
        for p in example.rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".toml")
        and "__pycache__" not in p.parts
        and not any(part.endswith((".egg-info", "build")) for part in p.parts)
    }
    assert files and included == files
    assert all((ROOT / path).is_file() for path in included)


@pytest.mark.parametrize("cls", [aha.Capabilities, aha.Backend])
def test_writing_a_backend_documents_every_field(cls):
    page = (DOCS / "writing-a-backend.md").read_text()
    absent = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in page and f"`{f.name}(" not in page]
    assert not absent, f"docs/writing-a-backend.md does not document {cls.__name__} fields {absent}"


def test_nav_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text()
    block = re.search(r"^nav:\n((?:[ \t]+.*\n)+)", config, re.M)[1]  # the indented lines under nav:
    nav = set(re.findall(r"([\w./-]+\.md)\s*$", block, re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert nav <= pages, f"mkdocs.yml lists missing pages {sorted(nav - pages)}"
    assert pages <= nav, f"add {sorted(pages - nav)} to the nav of mkdocs.yml"
