"""Plots, and the results page, drawn from results.json alone (no number is typed by hand).

``write_report(result, out)`` writes out/*.png and the page out.md (out = docs/results
gives docs/results.md); ``python -m aha.experiments report --out DIR`` redraws them from
an existing DIR/results.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_report", "page_text", "PLOTS", "PAPER", "SWEEP_LABELS"]

PLOTS = {
    "curve": "all_share_by_window.png",
    "heads": "all_share_by_head.png",
    "passkey": "passkey.png",
    "training": "training.png",
}

# The paper's claims (Luo, Zhang, Yan, arXiv 2512.22562, abstract), for comparison only.
PAPER = {
    "window": 256,
    "here_share": 0.93,
    "text": "with window 256, up to 93% of full attention replaced by Here with no loss of performance",
}


SWEEP_LABELS = {"paper": "paper", "extra": "extra, larger", "none": "ablation, no sparsity term"}
_STYLE = {"paper": ("o-", "C0"), "extra": ("s--", "C3"), "none": ("^:", "C2")}


def _label(result: dict, kind: str) -> str:
    lam = next(s["lam"] for s in result["meta"]["config"]["sweeps"] if s["kind"] == kind)
    return f"λ = {lam:g} ({SWEEP_LABELS[kind]})"


def _sweeps(result: dict) -> list[tuple[str, list[dict]]]:
    """(kind, its runs by window) for each sweep that ran, paper first."""
    out = []
    for kind in SWEEP_LABELS:
        runs = sorted((r for r in result["runs"] if r["kind"] == kind), key=lambda r: r["window"])
        if runs:
            out.append((kind, runs))
    return out


def _figure(*size):
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def plot_curve(result: dict, path: Path) -> None:
    """All share against window (the long-tail curve), and held-out loss against the full model's."""
    fig = _figure(11, 4.2)
    ax, bx = fig.subplots(1, 2)
    base = result["full_continued"]["heldout_loss"]
    for kind, runs in _sweeps(result):
        style, color = _STYLE[kind]
        w = [r["window"] for r in runs]
        label = _label(result, kind)
        ax.plot(
            w,
            [r["gates"]["all_share_beyond_window"] for r in runs],
            style,
            color=color,
            label=f"{label}, positions ≥ window",
        )
        ax.plot(
            w, [r["gates"]["all_share"] for r in runs], style, color=color, alpha=0.35, label=f"{label}, every token"
        )
        bx.plot(w, [r["heldout_loss"] - base for r in runs], style, color=color, label=f"AHA, {label}")
        bx.plot(
            w,
            [r["here_only_loss"] - base for r in runs],
            style,
            color=color,
            alpha=0.35,
            label="the same model, every gate forced Here",
        )
    ws = result["meta"]["config"]["windows"]
    bx.plot(
        ws,
        [result["full"]["here_only_loss"][str(w)] - result["full"]["heldout_loss"] for w in ws],
        "x:",
        color="grey",
        label="pretrained, every gate Here (vs pretrained)",
    )
    ax.plot([PAPER["window"]], [1 - PAPER["here_share"]], "k*", ms=12, label="paper (OLMo-2), window 256")
    ax.set(
        xscale="log",
        xlabel="window (keys a Here token reads)",
        ylabel="share of All",
        ylim=(-0.02, 1.02),
        title="How much All the router keeps",
    )
    bx.axhline(0, color="k", lw=0.8)
    bx.set(
        xscale="log",
        xlabel="window",
        ylabel="held-out loss − full-attention control (nats/byte)",
        title="What it costs",
    )
    for a in (ax, bx):
        a.set_xticks(ws, [str(w) for w in ws])
        a.minorticks_off()
        a.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_heads(result: dict, path: Path) -> None:
    """Heatmaps of the All share per layer (rows) and head (columns), one per window and lambda."""
    sweeps = _sweeps(result)
    ncol = max(len(runs) for _, runs in sweeps)
    fig = _figure(2.3 * ncol + 1, 2.4 * len(sweeps) + 0.4)
    axes = fig.subplots(len(sweeps), ncol, squeeze=False)
    image = None
    for row, (kind, runs) in enumerate(sweeps):
        for col in range(ncol):
            ax = axes[row][col]
            if col >= len(runs):
                ax.axis("off")
                continue
            grid = runs[col]["gates"]["per_head"]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, line in enumerate(grid):
                for j, v in enumerate(line):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_title(f"window {runs[col]['window']}\n{_label(result, kind)}", fontsize=8)
            ax.set_xticks(range(len(grid[0])))
            ax.set_yticks(range(len(grid)))
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=axes, label="share of All (positions ≥ window)")
    fig.savefig(path, dpi=110)


PROBE_TITLES = {"passkey": "planted early", "passkey_near": "planted near"}


def _probe_positions(ax, result: dict, name: str) -> None:
    """All share by position on one probe's sequences, with where the keys are planted and asked for."""
    pk = result["meta"]["probes"][name]
    for kind, runs in _sweeps(result):
        for r in runs:
            label = f"w {r['window']}, {_label(result, kind)}"
            ax.plot(r[name]["per_position"], lw=0.9, ls=_STYLE[kind][0][1:], label=label)
    end = max(pk["plant_at"]) + pk["plant_line_bytes"]
    ax.axvspan(min(pk["plant_at"]), end, color="orange", alpha=0.25, label="planted lines")
    q = pk["query_positions"]
    ax.axvspan(min(q) - 0.5, max(q) + 0.5, color="red", alpha=0.3, label="query positions")
    d = pk["distances"]
    ax.set(
        xlabel="position",
        ylabel="share of All (layers, heads, sequences)",
        ylim=(-0.02, 1.02),
        xlim=(0, result["meta"]["config"]["model"]["context"]),
        title=f"Passkey {PROBE_TITLES[name]} ({min(d)}–{max(d)} bytes back): All by position",
    )


_MARKS = {"paper": "", "extra": "*", "none": "°"}


def _mean(xs) -> float:
    """Mean of a list, or of a list of lists (e.g. a share per layer and head)."""
    flat = [v for row in xs for v in row] if xs and isinstance(xs[0], list) else list(xs)
    return sum(flat) / len(flat)


def _query_shares(ax, result: dict, name: str) -> None:
    """Per routed model: its All share at the query positions, key planted and not, and elsewhere (>= window)."""
    runs = [(f"w{r['window']}{_MARKS[kind]}", r[name]) for kind, rs in _sweeps(result) for r in rs]
    width = 0.8 / 3
    for k, (key, label) in enumerate(
        (
            ("query_all_share", "query positions, key planted"),
            ("query_all_share_control", "query positions, none planted (control)"),
            ("elsewhere_all_share", "every other position ≥ window"),
        )
    ):
        values = [_mean(p[key]) for _, p in runs]
        ax.bar([i - 0.4 + width * (k + 0.5) for i in range(len(runs))], values, width, label=label)
    ax.set_xticks(list(range(len(runs))), [n for n, _ in runs], rotation=60, fontsize=7)
    ax.set(
        ylabel="share of All (layers, heads)",
        ylim=(0, 1.02),
        title=f"Passkey {PROBE_TITLES[name]}: where the router goes All (* larger λ, ° λ = 0)",
    )
    ax.legend(fontsize=6)


def plot_passkey(result: dict, path: Path) -> None:
    """Per probe: All share by position, and All at the query vs the control vs elsewhere; retrieval accuracy."""
    probes = [name for name in PROBE_TITLES if name in result["meta"]["probes"]]
    fig = _figure(13, 13)
    row = (probes * 2)[:2] if len(probes) < 2 else probes  # one probe spans its row
    axes = fig.subplot_mosaic([row, [f"query {name}" for name in row], ["accuracy", "accuracy"]])
    for name in probes:
        _probe_positions(axes[name], result, name)
        _query_shares(axes[f"query {name}"], result, name)
    axes[probes[0]].legend(fontsize=6, ncol=2)
    models = [("full", result["full"]), ("full+ft", result["full_continued"])]
    models += [(f"w{r['window']}{_MARKS[kind]}", r) for kind, runs in _sweeps(result) for r in runs]
    bx, width = axes["accuracy"], 0.8 / (2 * len(probes))
    for k, (name, which) in enumerate((n, w) for n in probes for w in ("planted", "control")):
        bx.bar(
            [i - 0.4 + width * (k + 0.5) for i in range(len(models))],
            [m[name][which]["digit_accuracy"] for _, m in models],
            width,
            label=f"{PROBE_TITLES[name]}: {'key planted' if which == 'planted' else 'control, none planted'}",
        )
    bx.axhline(0.1, color="k", ls=":", label="chance (1 in 10 digits)")
    bx.set_xticks(list(range(len(models))), [name for name, _ in models], rotation=60, fontsize=7)
    bx.set(ylabel="digit accuracy", ylim=(0, 1), title="Retrieval (* larger λ, ° λ = 0)")
    bx.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def plot_training(result: dict, path: Path) -> None:
    """Loss curves of pretraining and of each fine-tune, and the All share during fine-tuning."""
    fig = _figure(12, 3.8)
    ax, bx, cx = fig.subplots(1, 3)
    s, loss, _ = zip(*result["full"]["train"]["curve"])
    ax.plot(s, loss)
    ax.set(xlabel="step", ylabel="train loss (nats/byte)", title="Pretraining, full attention")
    s, loss, _ = zip(*result["full_continued"]["train"]["curve"])
    bx.plot(s, loss, "k", lw=1.5, label="full attention (control)")
    for kind, runs in _sweeps(result):
        for r in runs:
            s, loss, share = zip(*r["train"]["curve"])
            label = f"w {r['window']}, {_label(result, kind)}"
            bx.plot(s, loss, lw=0.8, ls=_STYLE[kind][0][1:], label=label)
            cx.plot(s, share, lw=0.8, ls=_STYLE[kind][0][1:], label=label)
    bx.set(xlabel="fine-tune step", ylabel="train loss", title="Fine-tuning")
    cx.set(
        xlabel="fine-tune step",
        ylabel="share of All in the batch",
        ylim=(-0.02, 1.02),
        title="Router during fine-tuning",
    )
    bx.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def write_report(result: dict, out: Path) -> Path:
    """Every plot in ``out`` and the page ``out.md``; returns the page's path."""
    out = Path(out)
    for key, fn in (
        ("curve", plot_curve),
        ("heads", plot_heads),
        ("passkey", plot_passkey),
        ("training", plot_training),
    ):
        fn(result, out / PLOTS[key])
    from aha.experiments.calibrate import CALIBRATION_JSON
    from aha.experiments.calibration_report import PLOT as CALIBRATION_PLOT
    from aha.experiments.calibration_report import plot_calibration

    if (out / CALIBRATION_JSON).is_file():  # the study of `python -m aha.experiments calibrate`
        plot_calibration(json.loads((out / CALIBRATION_JSON).read_text()), out / CALIBRATION_PLOT)
    page = out.with_suffix(".md")
    page.write_text(page_text(result, out))
    return page


def page_text(result: dict, out: Path) -> str:
    """The page for ``result`` (out/results.json), with the section of out/calibration.json when there is one."""
    from aha.experiments.calibrate import CALIBRATION_JSON
    from aha.experiments.calibration_report import section
    from aha.experiments.page import render

    out = Path(out)
    extra = []
    if (out / CALIBRATION_JSON).is_file():
        extra = section(json.loads((out / CALIBRATION_JSON).read_text()), "{out}")
    return render(result, out.name, extra)


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
