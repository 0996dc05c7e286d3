"""Benchmark of the ``cpu`` backend: AHA on the CPU against dense attention and the alternatives.

Every figure is a ratio of two times measured side by side in this one process:
each contender runs once to warm up, then the contenders take turns, and each
time is the median of its repeats. Big sizes run once after the warm-up.

    python benchmarks/cpu.py            # full run: benchmarks/results/cpu.json, docs/img/cpu_*.png,
                                        # docs/benchmarks-cpu.md
    python benchmarks/cpu.py --quick    # small sizes, a minute: benchmarks/results/cpu-quick.json
    python benchmarks/cpu.py --docs     # only re-render docs/benchmarks-cpu.md from the JSON

A benchmark is not a test: CI checks correctness, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import aha

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
DOC = ROOT / "docs" / "benchmarks-cpu.md"
COMMAND = "python benchmarks/cpu.py"

D, WINDOW, SHARE = 64, 256, 0.07
FULL = {
    "inference": [(8192, 8, 8), (8192, 32, 8), (32768, 8, 8), (32768, 32, 8)],
    "one_thread": [(8192, 8, 8), (32768, 8, 8)],
    "training": [4096, 8192],
    "scaling_n": [2048, 4096, 8192, 16384, 32768, 65536],
    "scaling_share": (16384, [0.0, 0.01, 0.07, 0.25, 1.0]),
    "memory": 32768,
    "dual_max_n": 16384,  # the dual approach builds an N x N window mask (4 GiB as float at 32k)
    "budget_s": 20.0,  # time per contender and size, warm-up excluded
    "max_repeats": 7,
}
QUICK = {
    "inference": [(2048, 8, 8), (2048, 32, 8)],
    "one_thread": [(2048, 8, 8)],
    "training": [1024, 2048],
    "scaling_n": [1024, 2048, 4096],
    "scaling_share": (2048, [0.0, 0.07, 1.0]),
    "memory": 4096,
    "dual_max_n": 4096,
    "budget_s": 2.0,
    "max_repeats": 3,
}


# ---------------------------------------------------------------- inputs and contenders


def make_inputs(n, hq, hkv, share, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, D, generator=gen)
    k = torch.randn(1, hkv, n, D, generator=gen)
    v = torch.randn(1, hkv, n, D, generator=gen)
    gate = (torch.rand(1, hq, n, generator=gen) < share).float()  # uniformly random All tokens
    if grad:
        q, k, v, gate = (x.requires_grad_() for x in (q, k, v, gate))
    return q, k, v, gate


def dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def window_mask(n):
    i = torch.arange(n)
    return (i[None] <= i[:, None]) & (i[None] > i[:, None] - WINDOW)  # (N, N) bool


def dual(q, k, v, gate, mask):
    """Both branches densely (causal SDPA and windowed SDPA), blended by the gate: the vLLM port's way."""
    gqa = q.shape[1] != k.shape[1]
    out_all = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out_here = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    g = gate.unsqueeze(-1)
    return g * out_all + (1 - g) * out_here


def flex_contenders(q, k, v, gate):
    """FlexAttention compiled on the CPU with the AHA mask_mod and with a sliding window alone."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, hq = q.shape[2], q.shape[1]
    is_all = gate.bool()

    def aha_mod(b, h, qi, ki):
        return (ki <= qi) & (is_all[b, h, qi] | (qi - ki < WINDOW))

    def window_mod(b, h, qi, ki):
        return (ki <= qi) & (qi - ki < WINDOW)

    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = hq != k.shape[1]
    block_mask = torch.compile(create_block_mask)  # eager create_block_mask builds all N x N x H of the mask
    masks = {
        "flex_aha": block_mask(aha_mod, 1, hq, n, n, device="cpu"),
        "flex_window": block_mask(window_mod, None, None, n, n, device="cpu"),
    }
    return {name: (lambda m=m: compiled(q, k, v, block_mask=m, enable_gqa=gqa)) for name, m in masks.items()}


def basic_contenders(q, k, v, gate, floor=True) -> dict:
    """The cpu backend, dense causal SDPA, and (floor) the cpu backend with every token Here."""
    out = {
        "cpu": partial(aha.attention, q, k, v, gate, window=WINDOW, backend="cpu"),
        "dense": partial(dense, q, k, v),
    }
    if floor:
        out["window_only"] = partial(aha.attention, q, k, v, torch.zeros_like(gate), window=WINDOW, backend="cpu")
    return out


def training_contenders(q, k, v, gate, dout) -> dict:
    def cpu_step():
        torch.autograd.grad(aha.attention(q, k, v, gate, window=WINDOW, backend="cpu"), (q, k, v, gate), dout)

    def dense_step():
        torch.autograd.grad(dense(q, k, v), (q, k, v), dout)

    return {"cpu": cpu_step, "dense": dense_step}


# ---------------------------------------------------------------- timing


def measure(contenders: dict, budget_s: float, max_repeats: int) -> dict:
    """Median seconds per contender: one warm-up each, then turns.

    Each contender repeats as often as its budget allows (1 to max_repeats), so a slow baseline
    does not cut the fast ones to one sample; round i runs every contender with more than i
    repeats, in the same order, so the samples of all contenders interleave in time.
    """
    warm = {}
    for name, fn in contenders.items():
        t = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t
    repeats = {n: max(1, min(max_repeats, int(budget_s / w))) for n, w in warm.items()}
    times = {name: [] for name in contenders}
    for i in range(max(repeats.values())):
        for name, fn in contenders.items():
            if i < repeats[name]:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {"median_s": {n: statistics.median(ts) for n, ts in times.items()}, "repeats": repeats}


def ratios(median_s: dict, base: str = "cpu") -> dict:
    return {f"{name}/{base}": t / median_s[base] for name, t in median_s.items() if name != base}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- sections


def bench_inference(cfg) -> list:
    rows = []
    for n, hq, hkv in cfg["inference"]:
        q, k, v, gate = make_inputs(n, hq, hkv, SHARE)
        contenders = basic_contenders(q, k, v, gate)
        notes = {}
        if n <= cfg["dual_max_n"]:
            contenders["dual"] = partial(dual, q, k, v, gate, window_mask(n))
        else:
            notes["dual"] = (
                f"dual skipped at N={n}: its N x N window mask is {n * n / 2**30:.0f} GiB as bool and "
                f"{4 * n * n / 2**30:.0f} GiB as the float mask SDPA makes of it"
            )
        try:
            with torch.no_grad():
                contenders.update(flex_contenders(q, k, v, gate))
        except Exception as exc:  # record why FlexAttention could not run here
            notes["flex"] = f"failed to build/compile: {type(exc).__name__}: {str(exc)[:300]}"
        with torch.no_grad():
            check = _agreement(contenders, q, k, v, gate)
            res = measure(contenders, cfg["budget_s"], cfg["max_repeats"])
        row = {"N": n, "Hq": hq, "Hkv": hkv, **res, "ratios": ratios(res["median_s"]), "max_abs_diff": check}
        row["notes"] = notes
        rows.append(row)
        log(f"inference N={n} Hq={hq} Hkv={hkv}: " + _fmt(row))
    return rows


def bench_one_thread(cfg) -> list:
    """cpu backend and dense SDPA with one torch thread: the work each does, less exposed to other jobs."""
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n, hq, hkv in cfg["one_thread"]:
            contenders = basic_contenders(*make_inputs(n, hq, hkv, SHARE), floor=False)
            with torch.no_grad():
                res = measure(contenders, cfg["budget_s"], cfg["max_repeats"])
            rows.append({"N": n, "Hq": hq, "Hkv": hkv, **res, "ratios": ratios(res["median_s"])})
            log(f"one thread N={n} Hq={hq} Hkv={hkv}: " + _fmt(rows[-1]))
    finally:
        torch.set_num_threads(threads)
    return rows


def _agreement(contenders, q, k, v, gate) -> dict:
    """Largest |out - cpu| of the contenders that compute AHA itself (a sanity check, not a test)."""
    ours = contenders["cpu"]()
    out = {}
    for name in ("dual", "flex_aha"):
        if name in contenders:
            out[name] = float((contenders[name]() - ours).abs().max())
    return out


def bench_training(cfg) -> list:
    rows = []
    for n in cfg["training"]:
        q, k, v, gate = make_inputs(n, 8, 8, SHARE, grad=True)
        contenders = training_contenders(q, k, v, gate, torch.randn_like(q))
        res = measure(contenders, cfg["budget_s"], cfg["max_repeats"])
        row = {"N": n, "Hq": 8, "Hkv": 8, **res, "ratios": ratios(res["median_s"])}
        row["cpu_over_dense"] = res["median_s"]["cpu"] / res["median_s"]["dense"]
        rows.append(row)
        log(f"training N={n}: " + _fmt(row))
    return rows


def bench_scaling_n(cfg) -> list:
    rows = []
    for n in cfg["scaling_n"]:
        contenders = basic_contenders(*make_inputs(n, 8, 8, SHARE))
        with torch.no_grad():
            res = measure(contenders, cfg["budget_s"], cfg["max_repeats"])
        rows.append({"N": n, **res, "ratios": ratios(res["median_s"])})
        log(f"scaling N={n}: " + _fmt(rows[-1]))
    return rows


def bench_scaling_share(cfg) -> list:
    n, shares = cfg["scaling_share"]
    rows = []
    for share in shares:
        contenders = basic_contenders(*make_inputs(n, 8, 8, share), floor=False)
        with torch.no_grad():
            res = measure(contenders, cfg["budget_s"], cfg["max_repeats"])
        row = {"N": n, "share": share, **res, "ratios": ratios(res["median_s"])}
        row["cpu_over_dense"] = res["median_s"]["cpu"] / res["median_s"]["dense"]
        rows.append(row)
        log(f"share {share:.0%} N={n}: " + _fmt(row))
    return rows


_PROBE = """
import sys, torch
sys.path.insert(0, {bench!r})
from cpu import make_inputs, dense, peak_since, WINDOW
import aha
def run(q, k, v, gate):
    return aha.attention(q, k, v, gate, window=WINDOW, backend="cpu") if {which!r} == "cpu" else dense(q, k, v)
with torch.no_grad():
    run(*make_inputs(1024, 8, 8, 0.07))  # first use outside the block: plugin imports, thread pool
q, k, v, gate = make_inputs({n}, 8, 8, 0.07)
with torch.no_grad(), peak_since() as grown:
    out = run(q, k, v, gate)
print(grown())
"""


class peak_since:
    """Peak resident memory (bytes) added inside the block, beyond what was resident at its start.

    Resets the kernel's high-water mark (/proc/self/clear_refs) where Linux allows it; elsewhere
    falls back to the growth of ru_maxrss, which misses peaks below an earlier one.
    """

    def __enter__(self):
        self.base = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset, self.base = False, _maxrss()
        self.peak = None
        return lambda: self.peak

    def __exit__(self, *exc):
        self.peak = (_status("VmHWM") if self.reset else _maxrss()) - self.base


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_memory(cfg) -> dict:
    """Peak resident memory added by one forward, each in a fresh process after a small warm-up call
    (inputs, plugin imports and the thread pool excluded)."""
    n = cfg["memory"]
    out = {"N": n, "Hq": 8, "Hkv": 8, "inputs_bytes": 4 * 3 * 8 * n * D, "output_bytes": 4 * 8 * n * D}
    for which in ("cpu", "dense"):
        code = _PROBE.format(bench=str(Path(__file__).parent), n=n, which=which)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[f"{which}_peak_bytes"] = int(res.stdout.split()[-1])
    out["n_by_n_float32_bytes_per_head"] = 4 * n * n
    log(f"memory N={n}: cpu {out['cpu_peak_bytes'] / 2**20:.0f} MiB, dense {out['dense_peak_bytes'] / 2**20:.0f} MiB")
    return out


def _fmt(row) -> str:
    times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in row["median_s"].items())
    rat = ", ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items())
    reps = "/".join(str(r) for r in row["repeats"].values())
    return f"{times} (repeats {reps}); {rat}"


def machine() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- plots and docs


def plot(results: dict, img: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    rows = results["scaling_n"]
    ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (
        ("dense", "dense SDPA (causal)"),
        ("cpu", "cpu backend, 7% All"),
        ("window_only", "cpu backend, 0% All (floor)"),
    ):
        ax.plot(ns, [r["median_s"][name] for r in rows], marker="o", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="N (tokens; dense time / cpu time above each cpu point)",
        ylabel="seconds",
        title="Time against N (B=1, H=8, D=64, window 256)",
    )
    for r in rows:  # the speed-up over dense, above each cpu point
        ax.annotate(
            f"{r['median_s']['dense'] / r['median_s']['cpu']:.1f}x",
            (r["N"], r["median_s"]["cpu"]),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ns, [f"{n // 1024}k" for n in ns])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "cpu_scaling_n.png", dpi=120)
    plt.close(fig)

    rows = results["scaling_share"]
    at = range(len(rows))  # evenly spaced: the shares run from 0 to 100% unevenly
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(at, [r["median_s"]["cpu"] for r in rows], marker="o", label="cpu backend")
    ax.plot(at, [r["median_s"]["dense"] for r in rows], marker="s", label="dense SDPA (causal)")
    for x, r in zip(at, rows, strict=True):
        ax.annotate(
            f"{r['cpu_over_dense']:.2f}x",
            (x, r["median_s"]["cpu"]),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(list(at), [f"{100 * r['share']:g}%" for r in rows])
    ax.set(
        xlabel="share of All tokens (cpu time / dense time above each point)",
        ylabel="seconds",
        title=f"Time against the All share (N={rows[0]['N']})",
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "cpu_scaling_share.png", dpi=120)
    plt.close(fig)


def goals(results: dict) -> list:
    """Each goal of the issue with the measured figure and whether it is met."""
    out = []
    for row in results["inference"]:
        want = {8192: 5.0, 32768: 8.0}.get(row["N"])
        if want:
            got = row["ratios"]["dense/cpu"]
            out.append(
                {
                    "goal": f"inference N={row['N']} Hq={row['Hq']} Hkv={row['Hkv']}: dense SDPA / cpu >= {want:g}x",
                    "measured": f"{got:.2f}x",
                    "met": got >= want,
                }
            )
    for row in results["training"]:
        got = row["cpu_over_dense"]
        out.append(
            {
                "goal": f"training N={row['N']}: cpu fwd+bwd <= 1.5x dense fwd+bwd",
                "measured": f"{got:.2f}x",
                "met": got <= 1.5,
            }
        )
    for row in results["scaling_share"]:
        if row["share"] == 1.0:
            got = row["cpu_over_dense"]
            out.append(
                {"goal": f"100% All at N={row['N']}: cpu <= 1.3x dense", "measured": f"{got:.2f}x", "met": got <= 1.3}
            )
    return out


def render_docs(results: dict) -> str:
    """docs/benchmarks-cpu.md from the JSON: every number on the page comes from it."""
    m = results["machine"]
    lines = [
        "## The `cpu` backend",
        "",
        f"Measured on {m['cpu']} ({m['cores']} cores, {threads(m['torch_threads'])}), torch {m['torch']},",
        f"Python {m['python']}, with",
        "",
        "```",
        f"{results['command']}",
        "```",
        "",
        "which writes `benchmarks/results/cpu.json` (every figure below comes from it), the two plots and",
        "this section (`python benchmarks/cpu.py --docs` renders it again from the JSON).",
        "Each ratio is of two medians measured side by side in one process, after a warm-up; the contenders",
        "take turns. B=1, D=64, window 256, float32; the All tokens are drawn uniformly at random.",
        "",
    ]
    lines += _runs_lines(results)
    lines += [
        "",
        "### Goals",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |" for g in results["goals"]]
    if results.get("one_thread"):
        alone = ", ".join(f"N={r['N']} Hq={r['Hq']}: {r['ratios']['dense/cpu']:.2f}x" for r in results["one_thread"])
        lines += [
            "",
            f"With one torch thread each, dense SDPA / cpu is {alone}: the ratio of the work the two do,",
            "which the two-thread figures above scatter around as the other jobs' load comes and goes.",
        ]
    lines += _inference_tables(results) + _training_table(results) + _scaling_tables(results) + _memory_lines(results)
    lines += HOW.splitlines()
    return "\n".join(lines) + "\n"


def _runs_lines(results) -> list:
    """When and on which code each section ran, and the machine's load average (1, 5, 15 min) then."""
    m, runs = results["machine"], results.get("runs")
    if not runs:  # older JSON: one load figure for the whole run
        return [
            f"Load average {_load(m['load_average'])} when the run began, {_load(results.get('load_after', []))}",
            f"when it ended, on {m['cores']} cores.",
        ]
    lines = [
        f"Sections can be rerun alone (`--only`); each ran on the code and machine load below ({m['cores']} cores;",
        "the load average counts the benchmark's own threads, so a section that follows another starts near 2).",
        "A two-thread op on a loaded machine often runs on one core for a while, and how much each contender",
        "loses to that varies from run to run; the one-thread table measures the work each does with less of",
        "that noise.",
        "",
        "| section | commit | finished | load average before | after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['commit']} | {r['date']} | {_load(r['load'])} | {_load(r['load_after'])} |")
    return lines


def _inference_tables(results) -> list:
    lines = [
        "",
        "### Inference (7% All, no gradient)",
        "",
        "Time of each contender divided by the cpu backend's: higher means the cpu backend is faster.",
        "",
        "| N | Hq/Hkv | cpu (ms) | dense SDPA | dual | Flex, AHA mask | Flex, window only | cpu, 0% All | repeats cpu/dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["inference"]:
        rt = r["ratios"]
        cells = [_x(rt.get(f"{c}/cpu")) for c in ("dense", "dual", "flex_aha", "flex_window", "window_only")]
        lines.append(
            f"| {r['N']} | {r['Hq']}/{r['Hkv']} | {r['median_s']['cpu'] * 1e3:.0f} | "
            + " | ".join(cells)
            + f" | {_reps(r)} |"
        )
    lines += [
        "",
        "- dense SDPA: `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, the fused CPU flash kernel.",
        "- dual: dense causal SDPA and dense windowed SDPA (an N x N mask), blended by the gate: what the",
        "  public vLLM port of AHA does.",
        "- Flex: `torch.nn.attention.flex_attention` compiled on the CPU with a block mask from the AHA",
        "  `mask_mod` (causal and (All or in the window)), or from the sliding window alone.",
        "- cpu, 0% All: the cpu backend with every token Here, the floor AHA's routing can reach.",
    ]
    lines += [f"- {n}" for n in sorted({note for r in results["inference"] for note in r["notes"].values()})]
    diffs = [
        f"N={r['N']} Hq={r['Hq']}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items())
        for r in results["inference"]
    ]
    lines += ["", "Largest |out - cpu| of the contenders that compute AHA (a sanity check): " + "; ".join(diffs) + "."]
    if results.get("one_thread"):
        lines += [
            "",
            "With one torch thread (the work each does):",
            "",
            "| N | Hq/Hkv | cpu (ms) | dense (ms) | dense / cpu |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in results["one_thread"]:
            t = r["median_s"]
            lines.append(
                f"| {r['N']} | {r['Hq']}/{r['Hkv']} | {t['cpu'] * 1e3:.0f} | {t['dense'] * 1e3:.0f} | {t['dense'] / t['cpu']:.2f}x |"
            )
    return lines


def _training_table(results) -> list:
    lines = [
        "",
        "### Training (forward and backward with gate gradients, Hq=Hkv=8)",
        "",
        "| N | cpu (ms) | dense SDPA fwd+bwd (ms) | cpu / dense |",
        "| --- | --- | --- | --- |",
    ]
    for r in results["training"]:
        lines.append(
            f"| {r['N']} | {r['median_s']['cpu'] * 1e3:.0f} | {r['median_s']['dense'] * 1e3:.0f} | {r['cpu_over_dense']:.2f}x |"
        )
    return lines


def _scaling_tables(results) -> list:
    lines = [
        "",
        "### Scaling",
        "",
        "![time against N](img/cpu_scaling_n.png)",
        "",
        "| N | cpu (ms) | dense (ms) | dense / cpu | cpu, 0% All (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["scaling_n"]:
        t = r["median_s"]
        lines.append(
            f"| {r['N']} | {t['cpu'] * 1e3:.0f} | {t['dense'] * 1e3:.0f} | {t['dense'] / t['cpu']:.2f}x | {t['window_only'] * 1e3:.0f} |"
        )
    lines += [
        "",
        "![time against the All share](img/cpu_scaling_share.png)",
        "",
        "| All share | cpu (ms) | dense (ms) | cpu / dense |",
        "| --- | --- | --- | --- |",
    ]
    for r in results["scaling_share"]:
        t = r["median_s"]
        lines.append(
            f"| {r['share']:.0%} | {t['cpu'] * 1e3:.0f} | {t['dense'] * 1e3:.0f} | {r['cpu_over_dense']:.2f}x |"
        )
    return lines


def _memory_lines(results) -> list:
    mem = results["memory"]
    return [
        "",
        "### Peak memory",
        "",
        f"One forward at N={mem['N']}, Hq=Hkv=8, each in a fresh process after a small warm-up call (plugin imports",
        "and the worker pool are not counted); the peak resident memory it adds to the",
        f"{mem['inputs_bytes'] / 2**20:.0f} MiB of q, k and v (the output alone is {mem['output_bytes'] / 2**20:.0f} MiB):",
        f"cpu backend **{mem['cpu_peak_bytes'] / 2**20:.0f} MiB**, dense SDPA {mem['dense_peak_bytes'] / 2**20:.0f} MiB.",
        f"One N x N float32 matrix would take {mem['n_by_n_float32_bytes_per_head'] / 2**30:.0f} GiB per head.",
    ]


HOW = """
### How the cpu backend spends its time

- Here: queries in tiles of 32; a tile reads one band of `window + 31` keys (rounded up to whole tiles),
  a strided view of K and V (the G query heads of a kv head share the band). Scores with the band mask
  (`baddbmm`), softmax, `p @ V`, in chunks of tiles that fit the L2 cache, spread over the cores by a
  pool of single-threaded workers. Per score this is close to the fused kernel's cost; the band's keys
  past the windows (12% at window 256) are the waste.
- All: the All tokens of the query heads of each kv head are gathered into rows ordered by position,
  each (batch, kv head) a job for the workers, 64 rows to a tile. In inference the All jobs and the
  Here chunks go to the pool in one call, costliest first, so no worker waits between the branches;
  each worker runs its ops on one intra-op thread. The keys below a tile's first
  position go through torch's fused CPU flash kernel in chunks shared by every row from some tile on
  (one unmasked call per chunk, over all those rows); the rest of the tile's keys, up to its last
  position, is one call with a mask. Partial results merge by their log-sum-exps.
- Training with gate gradients needs both branches for every token (dgate = dout . (All - Here)), so
  the forward runs dense causal attention plus Here; the backward runs Here for the Here tokens and All
  only for the rows whose gradient is not zero.
- What keeps the cpu backend from the work ratio: the masked calls (they compute the whole rectangle
  of a tile's last keys, about half of it past the rows' positions), the band's extra keys, the
  merges, and Python's cost per chunk and call.
"""


def _reps(row) -> str:
    """Repeats of the cpu backend and of dense SDPA (one number for both in older JSON)."""
    reps = row["repeats"]
    return f"{reps['cpu']}/{reps['dense']}" if isinstance(reps, dict) else str(reps)


def threads(n: int) -> str:
    """'1 torch thread', '2 torch threads'."""
    return f"{n} torch thread{'' if n == 1 else 's'}"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _commit(script: str = "benchmarks/cpu.py") -> str:
    """The checkout's commit, marked +changes when the library's or the benchmark script's code differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "backends", script], cwd=root)
    except OSError:
        return "?"
    return (rev.stdout.strip() or "?") + ("" if clean.returncode == 0 else "+changes")


def _load(avg) -> str:
    return " ".join(f"{a:.1f}" for a in avg) if avg else "?"


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check that the benchmark runs")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/cpu.json, or cpu-quick.json)")
    ap.add_argument(
        "--docs", action="store_true", help="only render the plots and docs/benchmarks-cpu.md from the JSON"
    )
    ap.add_argument(
        "--only", nargs="*", help="sections to run (inference one_thread training scaling_n scaling_share memory)"
    )
    args = ap.parse_args(argv)
    out = args.out or RESULTS / ("cpu-quick.json" if args.quick else "cpu.json")
    if args.docs:
        results = json.loads(out.read_text())
        plot(results, IMG)
        DOC.write_text(render_docs(results))
        return
    cfg = QUICK if args.quick else FULL
    sections = {
        "inference": bench_inference,
        "one_thread": bench_one_thread,
        "training": bench_training,
        "scaling_n": bench_scaling_n,
        "scaling_share": bench_scaling_share,
        "memory": bench_memory,
    }
    results = json.loads(out.read_text()) if args.only and out.exists() else {}
    results.update({"command": COMMAND + (" --quick" if args.quick else ""), "machine": machine()})
    runs = results.setdefault("runs", {})  # per section: the code and the load it ran with
    for name, fn in sections.items():
        if not args.only or name in args.only:
            before = list(os.getloadavg())
            results[name] = fn(cfg)
            runs[name] = {"commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "load": before}
            runs[name]["load_after"] = list(os.getloadavg())
    results["load_after"] = list(os.getloadavg())
    results["goals"] = goals(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log(f"wrote {out}")
    if not args.quick:
        plot(results, IMG)
        DOC.write_text(render_docs(results))
        log(f"wrote {IMG}/cpu_scaling_*.png and {DOC}")
    for g in results["goals"]:
        log(f"{'met    ' if g['met'] else 'NOT MET'}  {g['goal']}: {g['measured']}")


if __name__ == "__main__":
    main()
