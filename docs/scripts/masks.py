"""Draw the All and Here masks for the docs: docs/img/masks.png and docs/img/masks_cache.png.

    python docs/scripts/masks.py            # rewrites both PNGs (needs matplotlib)

The masks come from aha's own index math (aha.window.key_range); tests/test_docs_site.py
checks that they are the keys the float64 reference actually reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from aha.window import key_range, query_position

IMG = Path(__file__).resolve().parents[1] / "img"
ALL, HERE = "#3f51b5", "#ef8a17"  # material indigo for All, orange for Here
ROUTED_GATE = (1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0)  # an example router decision per token


def visible(nq: int, nk: int, window: int, gate) -> np.ndarray:
    """[Nq, Nk] bool: the keys each query reads, All where gate[i] == 1, Here where 0."""
    mask = np.zeros((nq, nk), dtype=bool)
    for i, g in enumerate(gate):
        lo, hi = key_range(query_position(i, nq, nk), window, bool(g))
        mask[i, lo:hi] = True
    return mask


def _panel(ax, gate, nk: int, window: int, title: str) -> None:
    """One mask: a cell per (query, key), coloured by the query's branch."""
    from matplotlib.colors import to_rgb

    nq = len(gate)
    mask = visible(nq, nk, window, gate)
    rgb = np.ones((nq, nk, 3))
    for i, g in enumerate(gate):
        rgb[i, mask[i]] = to_rgb(ALL if g else HERE)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, nk), minor=True)
    ax.set_yticks(np.arange(-0.5, nq), minor=True)
    ax.grid(which="minor", color="#d0d0d0", linewidth=0.6)
    ax.tick_params(which="both", length=0)
    ax.set_xticks([0, nk - 1], [0, nk - 1])
    rows = [f"{query_position(i, nq, nk)} {'A' if g else 'H'}" for i, g in enumerate(gate)]
    if nq < nk:  # name the query index too: i sits at position Nk - Nq + i
        rows = [f"i={i}, pos {row}" for i, row in enumerate(rows)]
    ax.set_yticks(range(nq), rows, fontsize=7)
    ax.set_xlabel("key position j")
    ax.set_title(title, fontsize=10)


def draw(out_dir: Path = IMG) -> list[Path]:
    """Write masks.png (All, Here, routed) and masks_cache.png (Nq < Nk) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    n, w = len(ROUTED_GATE), 4
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.7))
    _panel(axes[0], [1] * n, n, w, "All (gate = 1): every key j ≤ i")
    _panel(axes[1], [0] * n, n, w, f"Here (gate = 0): window = {w}")
    _panel(axes[2], ROUTED_GATE, n, w, "AHA: the router picks per token")
    axes[0].set_ylabel("query position i, branch")
    fig.tight_layout()
    paths = [out_dir / "masks.png", out_dir / "masks_cache.png"]
    fig.savefig(paths[0], dpi=110, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 2.4))
    _panel(ax, (0, 1, 0, 0), 12, 3, "KV cache: Nq = 4 queries, Nk = 12 keys, window = 3")
    ax.set_ylabel("query, branch")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110, metadata={"Software": None})
    plt.close(fig)
    return paths


if __name__ == "__main__":
    for path in draw(Path(sys.argv[1]) if len(sys.argv) > 1 else IMG):
        print(path)
