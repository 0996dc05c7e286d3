"""The capability table of docs/backends.md, generated from the registry.

    python docs/scripts/backends_table.py          # print the table of the built-in backends
    python docs/scripts/backends_table.py --write  # rewrite it in docs/backends.md

Run as a script it sets TRITON_INTERPRET=1 (unless set), as tests/conftest.py does.

tests/test_docs_site.py fails when the committed table and the registry disagree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "backends.md"
START, END = "<!-- backends-table:start -->", "<!-- backends-table:end -->"
BUILTIN = "aha-attention"  # the distribution that ships the built-in backends


def builtin_rows():
    """Rows of aha.backends() that come from aha itself (third-party plugins left out)."""
    import aha

    return [r for r in aha.backends() if r.distribution == BUILTIN]


def table(rows) -> str:
    """Markdown table, one line per backend in the registry's order (highest priority first), then what each is."""
    lines = [
        "| backend | priority | arrays | devices | dtypes | features | ragged batches | head dim D |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if r.backend is None:
            raise RuntimeError(f"built-in plugin {r.name!r} is broken: {r.reason}")
        c = r.backend.capabilities
        devices = "any" if "*" in c.devices else ", ".join(c.devices)
        cells = [
            f"`{r.name}`",
            str(r.backend.priority),
            ", ".join(c.arrays),
            devices,
            ", ".join(c.dtypes),
            ", ".join(f for f, on in (("grad", c.grad), ("Nq < Nk", c.cross)) if on) or "—",
            ", ".join(f for f, on in (("cache_seqlens", c.seqlens), ("cache_leftpad", c.leftpad), ("cu_seqlens", c.packed)) if on) or "—",
            f"{c.head_dims[0]}–{c.head_dims[1]}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        notes.append(f"- `{r.name}`: {r.backend.description}")
    return "\n".join(lines + [""] + notes)


def committed(text: str) -> str:
    """The table between the markers of a page."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write(page: Path = PAGE) -> None:
    before, rest = page.read_text().split(START, 1)
    after = rest.split(END, 1)[1]
    page.write_text(f"{before}{START}\n{table(builtin_rows())}\n\n{END}{after}")


if __name__ == "__main__":
    # The table as the test suite sees the backends: triton then runs on the CPU through its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if sys.argv[1:] == ["--write"]:
        write()
    print(table(builtin_rows()))
