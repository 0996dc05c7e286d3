"""The results page (markdown), rendered from results.json; every number on it comes from there."""

from __future__ import annotations

from aha.experiments.report import PAPER, PLOTS, _label, _mean, _sweeps, fmt

__all__ = ["render"]


def _load(meta: dict) -> str:
    """The machine's load average (1 min) at the start and the end of the run, where recorded."""
    load = meta.get("load_average") or {}
    if load.get("start") is None or load.get("end") is None:
        return ""
    return (
        f" on {meta.get('cpus', '?')} CPUs, load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
    )


def _planted(pre: dict, ft: dict) -> list[str]:
    """The Setup line on the synthetic passkeys mixed into training, where there are any."""
    fractions = {pre.get("passkey_fraction", 0.0), ft.get("passkey_fraction", 0.0)}
    if fractions == {0.0}:
        return ["* **No synthetic data**: training sees the corpus only; the passkey format is new to the model."]
    share = " and ".join(sorted({f"{100 * f:g}%" for f in fractions}))
    repeats = pre.get("passkey_repeats", 1)
    again = "again at a later line start" if repeats == 1 else f"again at {repeats} later line starts"
    return [
        f"* **Synthetic passkeys in training**: {share} of the training sequences, in pretraining and fine-tuning "
        "alike, get the line `# the passkey is NNNNN` (fresh random digits) inserted at a line start in their "
        f"first half and {again}, 16 bytes to most of the sequence further on; the rest of "
        "the sequence is training-file source (`aha.experiments.corpus.plant_passkeys`). A run without them "
        "(commit addedee) left the full-attention model at or below chance on the probe. The probe below is "
        "therefore "
        "in-distribution for its format; its filler comes from held-out files only."
    ]


def _setup(result: dict) -> list[str]:
    m, c = result["meta"], result["meta"]["config"]
    corpus, model, pre, ft = m["corpus"], c["model"], c["pretrain"], c["finetune"]
    sweeps = "; ".join(
        f"{_label(result, sw['kind'])} at windows {', '.join(str(w) for w in sw['windows'])}" for sw in c["sweeps"]
    )
    return [
        "## Setup",
        "",
        f"* **Corpus**: the `.py` files of the Python {corpus['python']} standard library on this machine, byte level "
        f"(vocabulary 256), split by file (crc32 of the path): {corpus['train_files']} files "
        f"({corpus['train_bytes'] / 1e6:.1f} MB) for training, {corpus['heldout_files']} files "
        f"({corpus['heldout_bytes'] / 1e6:.2f} MB) held out. Nothing is downloaded.",
        f"* **Model**: decoder, {model['layers']} layers, width {model['width']}, {model['heads']} heads, "
        f"MLP ×{model['mlp_ratio']}, RoPE, QK-norm ({model['qk_norm']}), context {model['context']}, "
        f"{m.get('parameters', 0):,} parameters; attention is `aha.nn.AHAAttention` throughout.",
        f"* **Pretraining** with full attention (window = context): {pre['steps']} steps of "
        f"{pre['batch']}×{model['context']} bytes ({result['full']['train']['tokens'] / 1e6:.3g} M bytes), "
        f"AdamW, lr {pre['lr']:g}, cosine; {result['full']['train']['seconds'] / 60:.1f} min.",
        f"* **Fine-tuning**, from those weights, of every weight and the routers: {ft['steps']} steps of "
        f"{ft['batch']}×{model['context']} bytes, lr {ft['lr']:g} ({ft['router_lr_scale']:g}× that for the routers, "
        "which are new), loss = LM loss + λ·mean(sigmoid(router logits)). Sweeps: "
        f"{sweeps}. Routers start with every gate All (zero weight, bias +1, as `aha.hf.add_router`), so each "
        "fine-tune starts from exactly the full-attention model. Every fine-tune sees the same batches.",
        *_planted(pre, ft),
        "* **Control**: the full-attention model fine-tuned for the same steps and batches with full attention; "
        "losses below are compared with it.",
        f"* **Held-out evaluation**: {c['eval_sequences']} windows of {model['context']} bytes from held-out files "
        "(the same for every model), gates hard (threshold 0.5), no gradients.",
        f"* **Run**: `{m['command'] or 'python -m aha.experiments reproduce'}`, torch threads: {m['threads']}, backend "
        f"`{m['backend']}`, torch {m['torch']}: {m['seconds'] / 60:.1f} min wall time in all "
        f"({m['cpu_seconds'] / 60:.1f} min of CPU time){_load(m)}.",
        "",
    ]


def _loss_table(result: dict) -> list[str]:
    base = result["full_continued"]["heldout_loss"]
    rows = [
        "## Held-out loss and share of All",
        "",
        "Loss in nats per byte; Δ against the full-attention control. *All share ≥ w* counts positions ≥ window, "
        "where Here reads fewer keys than All and the choice can matter; below the window Here = All and only the "
        "sparsity term acts. *Here share* = 1 − All share ≥ w, the share of full attention replaced.",
        "",
        "| model | window | λ | held-out loss | Δ vs full | Δ with every gate Here | All share ≥ w | All share, every token | Here share ≥ w |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| full attention, pretrained | – | – | {fmt(result['full']['heldout_loss'])} | "
        f"{fmt(result['full']['heldout_loss'] - base, 4)} | – | 1 | 1 | 0 |",
        f"| full attention, control | – | – | {fmt(base)} | 0 | – | 1 | 1 | 0 |",
    ]
    for kind, runs in _sweeps(result):
        for r in runs:
            g = r["gates"]
            rows.append(
                f"| AHA, {_label(result, kind)} | {r['window']} | {r['lam']:g} | {fmt(r['heldout_loss'])} | "
                f"{fmt(r['heldout_loss'] - base, 4)} | {fmt(r['here_only_loss'] - base, 4)} | "
                f"{fmt(g['all_share_beyond_window'])} | {fmt(g['all_share'])} | {fmt(1 - g['all_share_beyond_window'])} |"
            )
    rows += [
        "",
        "Sliding window only: the pretrained weights with every gate Here, no fine-tuning, Δ against the same "
        "weights with full attention (the pretrained row above). How much this model needs context beyond each "
        "window, before any router is trained:",
        "",
    ]
    ws = result["meta"]["config"]["windows"]
    rows += ["| window | " + " | ".join(str(w) for w in ws) + " |", "| --- |" + " ---: |" * len(ws)]
    rows += [
        "| Δ loss | "
        + " | ".join(fmt(result["full"]["here_only_loss"][str(w)] - result["full"]["heldout_loss"], 4) for w in ws)
        + " |",
        "",
    ]
    rows += [f"![All share and loss by window]({{out}}/{PLOTS['curve']})", ""]
    return rows


def _heads(result: dict) -> list[str]:
    rows = ["## Per layer and head", "", f"![All share per layer and head]({{out}}/{PLOTS['heads']})", ""]
    for kind, runs in _sweeps(result):
        parts = []
        for r in runs:
            grid = r["gates"]["per_head"]
            heads = [(v, i, j) for i, line in enumerate(grid) for j, v in enumerate(line)]
            total = sum(v for v, _, _ in heads)
            mostly = sorted(((v, i, j) for v, i, j in heads if v > 0.5), reverse=True)
            share = sum(v for v, _, _ in mostly) / total if total else 0.0
            names = ", ".join(f"L{i}H{j} ({v:.2f})" for v, i, j in mostly) or "none"
            parts.append(
                f"| {r['window']} | {len(mostly)} of {len(heads)} | {names} | {fmt(share, 2)} | "
                f"{' / '.join(fmt(v, 2) for v in r['gates']['per_layer'])} |"
            )
        rows += [
            f"{_label(result, kind)}: heads that stay mostly All (All share > 0.5 at positions ≥ window)",
            "",
            "| window | heads mostly All | which (share) | their part of all All decisions | All share per layer |",
            "| ---: | ---: | --- | ---: | --- |",
            *parts,
            "",
        ]
    return rows


def _probe_table(result: dict, name: str) -> list[str]:
    rows = [
        "| model | digit accuracy | control | whole key | p(digit) | All at query | same, control | All elsewhere |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    models = [("full attention, pretrained", result["full"]), ("full attention, control", result["full_continued"])]
    for kind, runs in _sweeps(result):
        models += [(f"AHA w {r['window']}, {_label(result, kind)}", r) for r in runs]
    for label, m in models:
        p = m[name]
        keys = ("query_all_share", "query_all_share_control", "elsewhere_all_share")
        shares = [fmt(_mean(p[k])) if k in p else "–" for k in keys]
        rows.append(
            f"| {label} | {fmt(p['planted']['digit_accuracy'], 2)} | {fmt(p['control']['digit_accuracy'], 2)} | "
            f"{fmt(p['planted']['key_accuracy'], 2)} | {fmt(p['planted']['p_digit'])} | {' | '.join(shares)} |"
        )
    return rows


def _passkey(result: dict) -> list[str]:
    probes = result["meta"]["probes"]
    rows = [
        "## Passkey probe",
        "",
        f"{result['meta']['config']['passkey_sequences']} held-out windows of {result['meta']['config']['model']['context']} "
        "bytes with the line `# the passkey is NNNNN` planted in them and `# the passkey is NNNNN` again as the "
        "last line (the format of the synthetic passkeys in training, with held-out filler and fresh digits); "
        "the model reads them teacher-forced and must put each digit first (chance 0.1 a digit). The "
        "control replaces the planted line with a comment rule of the same length, so its accuracy is that of "
        "guessing. All shares: mean over layers and heads at the query positions (the byte before each digit) "
        "and at every other position ≥ window. The full-attention rows have no router at work (their window "
        "holds every key).",
        "",
    ]
    for name, title in (("passkey", "Planted early"), ("passkey_near", "Planted near")):
        if name not in probes:
            continue
        d = probes[name]["distances"]
        rows += [
            f"**{title}**: the key ends {min(d)}–{max(d)} bytes before the first query position.",
            "",
            *_probe_table(result, name),
            "",
        ]
    return rows + [f"![Passkey probe]({{out}}/{PLOTS['passkey']})", ""]


def _mostly_all(run: dict) -> set[tuple[int, int]]:
    """(layer, head) of the heads whose All share (positions >= window) is above one half."""
    return {(i, j) for i, line in enumerate(run["gates"]["per_head"]) for j, v in enumerate(line) if v > 0.5}


def _trend(shares: list[float]) -> str:
    change = shares[-1] - shares[0]
    if change > 0.05:
        return "rises as the window grows, the opposite of the paper's long tail"
    if change >= -0.05:
        return "stays about flat across windows: no long tail shows here"
    if all(a >= b for a, b in zip(shares, shares[1:])):
        return "falls at every step as the window grows"
    return "falls from the smallest to the largest window, though not at every step"


def _comparison(result: dict) -> list[str]:
    """Sentences computed from the numbers: what matches the paper and what does not."""
    base = result["full_continued"]["heldout_loss"]
    sweeps = dict(_sweeps(result))
    rows = [
        "## Compared with the paper",
        "",
        f"The paper: {PAPER['text']}; the need for All decays fast as the "
        "window grows (a long tail of context dependency); a few heads stay mostly All.",
        "",
    ]
    ws = result["meta"]["config"]["windows"]
    need = [result["full"]["here_only_loss"][str(w)] - result["full"]["heldout_loss"] for w in ws]
    ratios = [a / b for a, b in zip(need, need[1:]) if b > 0]
    shape = (
        f"each doubling of the window divides it by {min(ratios):.1f} to {max(ratios):.1f}: a long tail of "
        "context dependency, as the paper finds"
        if ratios and min(ratios) > 1
        else "it does not fall with every doubling of the window"
    )
    rows.append(
        "* **Need for context beyond the window.** Every gate forced Here on the pretrained model costs "
        + ", ".join(f"{w}: {d:+.4f}" for w, d in zip(ws, need))
        + f" nats/byte; {shape}."
    )
    for kind in ("paper", "extra"):
        runs = sweeps.get(kind)
        if not runs:
            continue
        shares = [r["gates"]["all_share_beyond_window"] for r in runs]
        last = runs[-1]
        here, delta = 1 - shares[-1], last["heldout_loss"] - base
        verdict = "matches" if here >= PAPER["here_share"] and delta <= 0.01 else "differs from"
        rows.append(
            f"* **{_label(result, kind)}.** At window {last['window']} the router sends {100 * here:.1f}% of the "
            f"decisions at positions ≥ window to Here ({100 * (1 - last['gates']['all_share']):.1f}% of every token) "
            f"at a held-out Δ loss of {delta:+.4f} nats/byte; this {verdict} the paper's "
            f"{100 * PAPER['here_share']:.0f}% with no loss. All share by window: "
            + ", ".join(f"{r['window']}: {v:.3f}" for r, v in zip(runs, shares))
            + f"; it {_trend(shares)}. Δ loss by window: "
            + ", ".join(f"{r['window']}: {r['heldout_loss'] - base:+.4f}" for r in runs)
            + "; with every gate forced Here the same models have Δ "
            + ", ".join(f"{r['window']}: {r['here_only_loss'] - base:+.4f}" for r in runs)
            + "."
        )
    if "none" in sweeps and "paper" in sweeps:
        paper = {r["window"]: r for r in sweeps["paper"]}
        for r in sweeps["none"]:
            if r["window"] in paper:
                p = paper[r["window"]]
                none, lam = r["gates"]["all_share_beyond_window"], p["gates"]["all_share_beyond_window"]
                tail = (
                    "so at this scale the paper's λ does next to nothing by itself: the move away from All comes from "
                    "the language-model gradient through the straight-through gate."
                    if abs(none - lam) < 0.05
                    else f"the sparsity term takes {none - lam:.3f} off the All share, beyond what the "
                    "language-model gradient through the straight-through gate does by itself."
                )
                rows.append(
                    f"* **What the sparsity term does.** At window {r['window']}, fine-tuning without it (λ = 0) ends "
                    f"at an All share of {none:.3f}, with the paper's λ at {lam:.3f}; {tail}"
                )
    for kind, runs in sweeps.items():
        sets = [_mostly_all(r) for r in runs]
        kept = set.intersection(*[x for x in sets if x]) if any(sets) else set()
        if kept and sum(1 for x in sets if x) > 1:
            windows = [str(r["window"]) for r, x in zip(runs, sets) if x]
            rows.append(
                f"* **The heads that stay All, {_label(result, kind)}**: "
                + ", ".join(f"L{i}H{j}" for i, j in sorted(kept))
                + f" {'is' if len(kept) == 1 else 'are'} mostly All at every window where any head is "
                f"({', '.join(windows)})."
            )
    if "paper" in sweeps:
        last = sweeps["paper"][-1]
        heads = [v for line in last["gates"]["per_head"] for v in line]
        mostly = [v for v in heads if v > 0.5]
        rows.append(
            f"* **Heads.** With the paper's λ at window {last['window']}, {len(mostly)} of {len(heads)} heads are All "
            f"for more than half of their tokens; the busiest head is All for {max(heads):.2f} of them, the median "
            f"head for {sorted(heads)[len(heads) // 2]:.2f}."
        )
    for name, title in (("passkey", "planted early"), ("passkey_near", "planted near")):
        if name not in result["full_continued"]:
            continue
        acc = result["full_continued"][name]["planted"]["digit_accuracy"]
        guess = result["full_continued"][name]["control"]["digit_accuracy"]
        if acc > max(0.3, guess + 0.2):
            verdict = "so the model retrieves it, and the probe can show where the router goes All to do so."
        elif acc >= guess + 0.05:
            verdict = (
                "so the model retrieves it only a little, above guessing but far from reliably: what the router "
                "does at the query positions is weak evidence of where All is needed for retrieval."
            )
        else:
            verdict = "so the model does not retrieve it: this probe cannot show where All is needed for retrieval."
        rows.append(
            f"* **Passkey {title}.** The full-attention control puts {acc:.2f} of the digits first ({guess:.2f} "
            f"with no key planted, chance 0.10); {verdict}"
        )
        gaps = [
            _mean(r[name]["query_all_share"]) - _mean(r[name]["query_all_share_control"])
            for runs in sweeps.values()
            for r in runs
        ]
        if gaps:
            rows.append(
                "    * With the key planted the router's All share at the query positions differs from the control's "
                f"by {min(gaps):+.3f} to {max(gaps):+.3f} across the fine-tunes"
                + (
                    ": it does not go All for the key."
                    if max(gaps) < 0.02
                    else "; a rise there means it goes All to reach the key."
                )
            )
        for kind, runs in sweeps.items():
            rows.append(
                f"    * {_label(result, kind)}: the router's All share at the query positions with the key planted / "
                "with none planted / at every other position ≥ window, by window: "
                + "; ".join(
                    f"{r['window']}: {_mean(r[name]['query_all_share']):.3f} / "
                    f"{_mean(r[name]['query_all_share_control']):.3f} / {_mean(r[name]['elsewhere_all_share']):.3f}"
                    for r in runs
                )
                + "."
            )
    return rows + [""]


_INTRO = """# Results: how much global attention does a small language model need?

A small-scale reproduction of the paper's measurements (Luo, Zhang, Yan, arXiv 2512.22562) with
`aha`: a byte-level decoder trained on Python source with full attention, then fine-tuned with an
All-or-Here router in every head at several windows. It runs on a 2-core CPU; the model is thousands of
times smaller than the paper's OLMo-2 and its context is hundreds of bytes, not thousands of tokens, so
read it as a test of the shape of the findings, not of their numbers.

This page, the plots and `{out}/results.json` (every raw number) are written by
`nox -s reproduce` (or `python -m aha.experiments reproduce`), which keeps the pretrained weights in
`{out}/pretrained.pt`; `python -m aha.experiments calibrate` (also run by `nox -s reproduce`) adds the
section "Routers without fine-tuning" from them (`{out}/calibration.json`); `python -m aha.experiments report`
redraws everything from the JSON. Do not edit them by hand.
"""


_CAVEATS = """## How this setting differs from the paper's

* **Scale.** The model and its pretraining are tiny (see the setup); the paper fine-tunes OLMo-2, with a
  billion parameters and more and trillions of tokens of pretraining. A small model probably uses less
  long-range context, and so needs All less to begin with.
* **Bytes, not tokens.** Windows here count bytes; a BPE token is about four bytes of English or code, so a
  window of 256 bytes holds about as much text as 64 tokens, and the whole context of 512 bytes about 128.
* **Fine-tuning length and router learning rate.** Each fine-tune is short, with the routers at a larger
  learning rate than the rest so that they move at all in that time (see the setup); the paper fine-tunes
  far longer. The training plot shows whether the All share had levelled off.
* **Synthetic passkeys.** A share of the training sequences carry a planted passkey (see the setup), so
  that the small model can learn retrieval at all (the probe shows how far it did); the paper trains on no
  such data and probes retrieval the model learned from natural text.
* **Router start.** The routers carry a bias that starts every gate All (as `aha.hf.add_router` does); the
  paper's released router has no bias.
"""


def render(result: dict, out: str, extra: list[str] = ()) -> str:
    """The page; ``out`` is the directory of the plots relative to the page; ``extra``: sections before the caveats."""
    parts = [
        _INTRO,
        *_setup(result),
        *_loss_table(result),
        *_heads(result),
        *_passkey(result),
        *_comparison(result),
        *extra,
        _CAVEATS,
    ]
    return "\n".join(parts).replace("{out}", out)
