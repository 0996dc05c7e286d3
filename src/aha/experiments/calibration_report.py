"""The section "Routers without fine-tuning" and its Pareto plot, from calibration.json alone.

``write_calibration(result, out)`` draws out/calibration.png and rewrites the page out.md: the whole
results page when out/results.json is there (`aha.experiments.report.write_report` adds the section),
else the section alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from aha.experiments.report import fmt

__all__ = ["write_calibration", "plot_calibration", "section", "LABELS"]

PLOT = "calibration.png"
LABELS = {
    "calibrated": "calibrated (output change)",
    "calibrated_one_pass": "calibrated in one pass (output change)",
    "calibrated_mass": "calibrated (attention mass)",
    "per_head": "per-head static (DuoAttention-style)",
    "random": "random per token, same per-head shares",
    "oracle": "oracle per token (its own measured need)",
}
_STYLE = {
    "calibrated": ("o-", "C0"),
    "calibrated_one_pass": ("v:", "C4"),
    "calibrated_mass": ("o:", "C9"),
    "per_head": ("s--", "C1"),
    "random": ("x-.", "C7"),
    "oracle": ("^-", "C2"),
}


def _by(result: dict, method: str, window: int) -> list[dict]:
    return sorted(
        (p for p in result["points"] if p["method"] == method and p["window"] == window),
        key=lambda p: p["target_share"],
    )


def _windows(result: dict) -> list[int]:
    return sorted({p["window"] for p in result["points"]})


def _control(result: dict) -> float | None:
    return result.get("control_loss")


def plot_calibration(result: dict, path: Path) -> None:
    """Δ held-out loss against the share of All, one panel per window (the Pareto view)."""
    from matplotlib.figure import Figure

    windows = _windows(result)
    fig = Figure(figsize=(max(7.0, 3.0 * len(windows)), 4.4), layout="constrained")
    axes = fig.subplots(1, len(windows), sharey=True, squeeze=False)[0]
    control = _control(result)
    repro = (result.get("reproduction") or {}).get("runs", [])
    for ax, w in zip(axes, windows):
        for method, (style, color) in _STYLE.items():
            pts = _by(result, method, w)
            if pts:
                ax.plot([p["all_share"] for p in pts], [p["delta_loss"] for p in pts], style, color=color,
                        ms=4, label=LABELS[method])  # fmt: skip
        here = _by(result, "here", w)
        if here:
            ax.axhline(here[0]["delta_loss"], color="k", lw=0.6, ls=":", label="every gate Here")
        if control is not None:
            fts = [p for p in result["finetuned"] if p["window"] == w]
            if fts:
                ax.plot([p["all_share"] for p in fts], [p["heldout_loss"] - control for p in fts], "*", color="C3",
                        ms=9, label="calibrated, then fine-tuned (Δ vs control)")  # fmt: skip
            runs = [r for r in repro if r["window"] == w and r["kind"] != "none"]
            if runs:
                ax.plot([r["all_share"] for r in runs], [r["heldout_loss"] - control for r in runs], "P", color="C4",
                        ms=8, label="reproduction's fine-tuned AHA (Δ vs control)")  # fmt: skip
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set(title=f"window {w}", xlabel="share of All (positions ≥ window)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ held-out loss (nats/byte)")
    handles = {}
    for ax in axes:  # every label once, whichever panel has it
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=3, fontsize=7)
    fig.savefig(path, dpi=110)


def _wins(result: dict, a: str, b: str) -> tuple[int, int, list[str]]:
    """How often method a has the lower Δ loss than b at the same window and target share; where it does not."""
    wins, total, losses = 0, 0, []
    for w in _windows(result):
        for pa, pb in zip(_by(result, a, w), _by(result, b, w)):
            total += 1
            if pa["delta_loss"] < pb["delta_loss"]:
                wins += 1
            else:
                losses.append(f"window {w}, share {pa['target_share']:.3f}")
    return wins, total, losses


def _curve_at(result: dict, method: str, window: int, share: float) -> float | None:
    """Δ loss of ``method`` at ``share``, linear between its points and every-gate-Here at share 0."""
    pts = [(0.0, p["delta_loss"]) for p in _by(result, "here", window)]
    pts += [(p["all_share"], p["delta_loss"]) for p in _by(result, method, window)]
    pts.sort()
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= share <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (share - x0) / (x1 - x0)
    return None


def _wins_at_share(result: dict, a: str, b: str) -> tuple[int, int, list[str]]:
    """Like _wins, but b read off its curve at the share a reached on the held-out data."""
    wins, total, losses = 0, 0, []
    for w in _windows(result):
        for pa in _by(result, a, w):
            yb = _curve_at(result, b, w, pa["all_share"])
            if yb is None:
                continue
            total += 1
            if pa["delta_loss"] < yb:
                wins += 1
            else:
                losses.append(f"window {w}, share {pa['all_share']:.3f}")
    return wins, total, losses


def _table(result: dict) -> list[str]:
    methods = [m for m in LABELS if any(p["method"] == m for p in result["points"])]
    head = "| window | share of All | " + " | ".join(LABELS[m] for m in methods) + " |"
    lines = [head, "| ---: | ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for w in _windows(result):
        rows = {m: _by(result, m, w) for m in methods}
        for i, ref in enumerate(rows[methods[0]]):
            cells = []
            for m in methods:
                p = rows[m][i]
                cells.append(f"{fmt(p['delta_loss'], 4)} ({p['all_share']:.3f})")
            lines.append(f"| {w} | {ref['target_share']:.4f} | " + " | ".join(cells) + " |")
    return lines


def _finetune_table(result: dict) -> list[str]:
    control = _control(result)
    repro = (result.get("reproduction") or {}).get("runs", [])
    if control is None or not (result["finetuned"] or repro):
        return []
    lines = [
        "| routers | window | λ | share of All | Δ vs full control (fine-tuned) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in sorted(result["finetuned"], key=lambda p: (p["window"], p["lam"])):
        lines.append(
            f"| calibrated at {p['target_share']:.4f}, then fine-tuned | {p['window']} | {p['lam']:g} | "
            f"{p['all_share']:.3f} | {fmt(p['heldout_loss'] - control, 4)} |"
        )
    for r in sorted(repro, key=lambda r: (r["window"], r["lam"])):
        lines.append(
            f"| reproduction: from All, fine-tuned ({r['kind']}) | {r['window']} | {r['lam']:g} | "
            f"{r['all_share']:.3f} | {fmt(r['heldout_loss'] - control, 4)} |"
        )
    return lines


def _sentence(a: str, b: str, wins: int, total: int, losses: list[str], how: str) -> str:
    tail = f" It does not at: {'; '.join(losses)}." if losses and len(losses) <= 6 else ""
    if len(losses) > 6:
        tail = f" It does not at {len(losses)} of them."
    return f"* **{LABELS[a]}** has a lower Δ loss than **{LABELS[b]}** at {wins} of {total} points {how}.{tail}"


def _findings(result: dict) -> list[str]:
    out = []
    same = "(same window and target share)"
    for a, b, how in (
        ("oracle", "per_head", "(same window and share)"),
        ("calibrated", "random", "(same window and per-head shares)"),
        ("calibrated", "calibrated_one_pass", same),
        ("calibrated", "calibrated_mass", same),
        ("oracle", "calibrated", same),
        ("calibrated", "per_head", same),
    ):
        wins, total, losses = _wins(result, a, b)
        if total:
            out.append(_sentence(a, b, wins, total, losses, how))
    wins, total, losses = _wins_at_share(result, "calibrated", "per_head")
    if total:
        how = ("at the share of All the calibrated routers reached on the held-out data (the per-head split read "
               "off its curve, linear between its points and every gate Here at 0)")  # fmt: skip
        out.append(_sentence("calibrated", "per_head", wins, total, losses, how))
    gaps = []
    for w in _windows(result):
        cal, orc, here = _by(result, "calibrated", w), _by(result, "oracle", w), _by(result, "here", w)
        if cal and orc and here and here[0]["delta_loss"] > 0:
            closed = [1 - c["delta_loss"] / here[0]["delta_loss"] for c in cal]
            gaps.append(f"{w}: {min(closed):.0%} to {max(closed):.0%}")
    if gaps:
        out.append("* Share of the sliding window's loss (every gate Here) that calibrated routers win back, "
                   "by window over the shares: " + "; ".join(gaps) + ".")  # fmt: skip
    return out


def _plain(wins: int, total: int) -> str:
    if wins == total:
        return f"at every one of the {total} points"
    if wins == 0:
        return f"at none of the {total} points"
    return f"at {wins} of {total} points"


def _summary(result: dict) -> list[str]:
    """The answer in words, every count computed from the points."""
    out = []
    w_or, t_or, _ = _wins(result, "oracle", "per_head")
    w_cal, t_cal, _ = _wins_at_share(result, "calibrated", "per_head")
    w_rnd, t_rnd, _ = _wins(result, "calibrated", "random")
    if t_or:
        out.append(
            f"**Per-token routing can beat per-head routing**: All where each token's own measured need is highest "
            f"(the oracle) has a lower Δ loss than the per-head split at the same share {_plain(w_or, t_or)}."
        )
    if t_cal:
        cal = [p for p in result["points"] if p["method"] == "calibrated"]
        agree = [p["calibration"]["agreement"] for p in cal]
        here = [1 - p["calibration"]["router_share"] for p in cal]
        out.append(
            f"**Linear routers calibrated on the layer input beat the per-head split {_plain(w_cal, t_cal)}** (at "
            f"the share they reach on held-out data), and random routing with their own per-head shares "
            f"{_plain(w_rnd, t_rnd)}. On the calibration tokens they agree with the oracle's choice for "
            f"{min(agree):.1%} to {max(agree):.1%} of the (layer, head, token) routes; routing every one of them "
            f"Here would agree for {min(here):.1%} to {max(here):.1%}."
        )
    control = _control(result)
    repro = {(r["window"], r["lam"]): r for r in (result.get("reproduction") or {}).get("runs", [])}
    pairs = [(p, repro.get((p["window"], p["lam"]))) for p in result["finetuned"]]
    pairs = [(p, r) for p, r in pairs if r is not None]
    if control is not None and pairs:
        better = sum(p["heldout_loss"] < r["heldout_loss"] for p, r in pairs)
        fewer = sum(p["all_share"] < r["all_share"] for p, r in pairs)
        out.append(
            f"**Calibration as the start of fine-tuning**: against the reproduction's fine-tunes from All (same "
            f"window, λ, steps and batches), starting from calibrated routers gives the lower held-out loss "
            f"{_plain(better, len(pairs))} and the smaller share of All {_plain(fewer, len(pairs))}."
        )
    return out


def _finetune_findings(result: dict) -> list[str]:
    """Calibrated-then-fine-tuned against the reproduction's fine-tunes from All, and calibration alone against them."""
    control = _control(result)
    repro = (result.get("reproduction") or {}).get("runs", [])
    if control is None:
        return []
    out = []
    for p in sorted(result["finetuned"], key=lambda p: (p["window"], p["lam"])):
        same = [r for r in repro if r["window"] == p["window"] and r["lam"] == p["lam"]]
        text = (
            f"* Window {p['window']}, λ = {p['lam']:g}: calibrated at {p['target_share']:.2%} All and fine-tuned, the "
            f"routers end at {p['all_share']:.1%} All with Δ {fmt(p['heldout_loss'] - control, 4)} against the control"
        )
        if same:
            r = same[0]
            text += (
                f"; fine-tuned from All (the reproduction) they end at {r['all_share']:.1%} All with Δ "
                f"{fmt(r['heldout_loss'] - control, 4)}"
            )
        out.append(text + ".")
    for r in sorted(repro, key=lambda r: (r["window"], r["lam"])):
        cal = _by(result, "calibrated", r["window"])
        if r["kind"] == "none" or not cal:
            continue
        near = min(cal, key=lambda c: abs(c["all_share"] - r["all_share"]))
        out.append(
            f"* Window {r['window']}: the reproduction's router (λ = {r['lam']:g}) keeps {r['all_share']:.1%} All, "
            f"Δ {fmt(r['heldout_loss'] - control, 4)} against the control; calibrated routers without any training at "
            f"{near['all_share']:.1%} All: Δ {fmt(near['delta_loss'], 4)} against the pretrained model."
        )
    return out


def section(result: dict, out: str) -> list[str]:
    """The page section, from calibration.json; ``out`` is the directory of the plot relative to the page."""
    meta, cfg = result["meta"], result["meta"]["config"]
    model = cfg["experiment"]["model"]
    heads = model["layers"] * model["heads"]
    shares = ", ".join(f"{s:.2%} ({k} of {heads} heads)" for s, k in zip(cfg["shares"], cfg["heads_all"]))
    repro = result.get("reproduction")
    pre = meta.get("pretrained", {})
    lines = [
        "## Routers without fine-tuning",
        "",
        "Can routers be fitted to the pretrained model without training it, and what does per-token routing buy "
        "over per-head and random routing at the same share of All? `aha.calibration.calibrate_routers` runs the "
        "pretrained full-attention model above on calibration text and measures, for every layer, head and token, "
        "how much the token needs All: the relative change of the layer's attention output when this head alone "
        "reads Here instead of All (*output change*), and the head's attention weight outside the window "
        "(*attention mass*). It labels as All the tokens above one global threshold, fits each head's linear router "
        "on the layer input by logistic regression, and sets each head's bias so that it routes the same share of "
        "its calibration tokens All as the threshold does. It goes layer by layer: each layer's need is measured "
        "again, and its routers fitted, on the input it gets when the layers before it route by their new routers, "
        "as the model will run (*in one pass*: every layer fitted on its full-attention input, what the first "
        "version did). No weight of the model changes. For a transformers "
        "checkpoint: `python -m aha.hf.calibrate SRC DST --window 256 --share 0.1 --data calibration.txt`.",
        "",
        f"* **Model**: the reproduction's pretrained weights (`{Path(pre.get('path', '')).name}`, "
        + ("loaded" if pre.get("loaded") else f"pretrained again, {pre.get('seconds', 0) / 60:.1f} min")
        + f"), held-out loss {result['full_loss']:.4f}"
        + (
            f", equal to the reproduction's ({repro['full_loss']:.4f})."
            if repro
            else " (no reproduction run from these weights in the same folder: its rows are left out)."
        ),
        f"* **Calibration data**: {cfg['calibration_sequences']} windows of {model['context']} bytes from the "
        f"*training* files (seed {meta['seeds']['calibration_windows']}), {meta['calibration_bytes']:,} bytes.",
        f"* **Evaluation**: the reproduction's {meta['eval_bytes'] // model['context']} held-out windows "
        f"(seed {meta['seeds']['heldout_windows']}); Δ loss against the pretrained full-attention model, "
        "except the fine-tuned rows, compared with the full-attention control fine-tuned for the same steps.",
        f"* **Matched shares of All** (positions ≥ window, every layer and head): {shares}, multiples of one "
        "head so that the per-head split meets them exactly. The shares given in brackets are measured on the "
        "held-out data.",
        "* **Per-head static**: the heads of highest mean output change on the calibration data All for every "
        "token, the rest Here (DuoAttention's form, without its attention sink). **Random**: each held-out token "
        "All with its head's share under the calibrated routers "
        f"(seed {meta['seeds']['random_routing']}). **Oracle**: All where the held-out token's own measured output "
        "change is above the global threshold for the share: what a router that predicted the measure perfectly "
        "would do (no router sees the token's own attention beforehand; the measure is a proxy of the loss, so "
        "this is no bound on it).",
        "* **Calibrated, then fine-tuned**: the calibrated routers at "
        f"{cfg['shares'][cfg['heads_all'].index(cfg['finetune_heads_all'])]:.2%} All, then the reproduction's "
        f"fine-tune ({cfg['experiment']['finetune']['steps']} steps, the same batches, λ = "
        + ", ".join(f"{x:g}" for x in cfg["finetune_lams"])
        + "), at windows "
        + ", ".join(str(x) for x in cfg["finetune_windows"])
        + ".",
        f"* **Run**: `{meta['command']}`, torch threads {meta['threads']}: {meta['seconds'] / 60:.1f} min wall, "
        f"{meta['cpu_seconds'] / 60:.1f} min CPU, load average {fmt(meta['load_average'].get('start'), 1)} at the "
        f"start, {fmt(meta['load_average'].get('end'), 1)} at the end.",
        "",
        f"![Δ loss against share of All]({out}/{PLOT})",
        "",
        "Δ held-out loss (nats/byte) against the full-attention model, and the share of All measured on the "
        "held-out data in brackets:",
        "",
        *_table(result),
        "",
        "Every gate Here (the sliding window alone), for reference: "
        + ", ".join(
            f"window {w}: {fmt(_by(result, 'here', w)[0]['delta_loss'], 4)}"
            for w in _windows(result)
            if _by(result, "here", w)
        )  # fmt: skip
        + ".",
        "",
        "### What it shows",
        "",
        *[x for line in _summary(result) for x in (line, "")],
        *_findings(result),
        "",
    ]
    ft = _finetune_table(result)
    if ft:
        lines += [
            "### Calibration and fine-tuning",
            "",
            "Δ held-out loss against the full-attention control (the pretrained model fine-tuned with full "
            "attention for the same steps and batches); the reproduction's rows are read from results.json.",
            "",
            *ft,
            "",
            *_finetune_findings(result),
            "",
        ]
    return lines


def write_calibration(result: dict, out: Path) -> Path:
    """The plot, then the page: the whole results page when out/results.json exists, else this section alone."""
    from aha.experiments.pipeline import RESULTS_JSON
    from aha.experiments.report import write_report

    out = Path(out)
    if (out / RESULTS_JSON).is_file():  # the whole page, this plot with the others
        return write_report(json.loads((out / RESULTS_JSON).read_text()), out)
    plot_calibration(result, out / PLOT)
    page = out.with_suffix(".md")
    page.write_text("\n".join(["# Results", "", *section(result, out.name)]).replace("{out}", out.name))
    return page
