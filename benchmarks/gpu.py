"""GPU check of the triton backend in one command: CUDA tests, then the benchmark, figures to JSON.

    python benchmarks/gpu.py --out gpu-results.json            # everything (tens of minutes on an H200)
    python benchmarks/gpu.py --out quick.json --quick          # N = 4k and 32k only
    python benchmarks/gpu.py --out bench.json --skip-tests     # benchmark only
    python benchmarks/gpu.py --render gpu-results.json         # Markdown for docs/benchmarks.md

Installs nothing: run it in an environment with aha-attention[triton,testing] installed, on a machine
with an NVIDIA GPU. Steps:

1. ``pytest tests/test_triton_backend.py`` and ``python -m aha conformance --backend triton``
   on CUDA (TRITON_INTERPRET=0), recording their outcome.
2. The benchmark of issue #4: B=1, Hq=32, Hkv=8, D=128, bfloat16, window 256, All shares
   0, 7, 12, 100 % (scattered at random), N from 4k to 128k. AHA (routed: hard gate without grad)
   against torch SDPA (flash) dense causal and against FlexAttention with the equivalent mask_mod,
   forward and forward+backward (q, k, v grads). TFLOP/s count useful work only: 4 * D FLOPs per
   (query, key read) forward, 3.5 times that for forward+backward.
3. The goals, judged from the figures: >= 5x dense flash at N=32k, 7 % All (forward); >= half of
   dense flash's TFLOP/s on the useful work; within 1.25x of dense flash at 100 % All.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B, HQ, HKV, D, WINDOW = 1, 32, 8, 128, 256
DEVICE = "cuda"
SHARES = (0.0, 0.07, 0.12, 1.0)
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
FWD_BWD = 3.5  # forward + backward FLOPs over forward FLOPs (backward: 5 matmuls to the forward's 2)


def run_tests() -> list[dict]:
    """The CUDA tests: the backend's own tests and the conformance suite, each in a subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="0", HYPOTHESIS_PROFILE=os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    commands = {
        "tests/test_triton_backend.py": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                         str(ROOT / "tests" / "test_triton_backend.py")],
        "conformance --backend triton": [sys.executable, "-m", "aha", "conformance", "--backend", "triton", "-q"],
    }
    results = []
    for name, cmd in commands.items():
        start = time.time()
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [ln for ln in run.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        results.append({"name": name, "returncode": run.returncode, "summary": lines[-1] if lines else "",
                        "seconds": round(time.time() - start, 1), "tail": (run.stdout + run.stderr)[-4000:]})
        print(f"[tests] {name}: rc={run.returncode} {results[-1]['summary']}", flush=True)
    return results


def _bench(fn, grads=()):
    """Median milliseconds of fn (triton.testing.do_bench: L2 flushed, grads reset between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=list(grads), return_mode="median")


def _useful_flops(gate, n: int) -> float:
    """Forward FLOPs of the keys each token reads: 4 * D per (query, key)."""
    import torch

    keys_all = torch.arange(1, n + 1, device=gate.device, dtype=torch.float64)  # pos + 1
    keys_here = keys_all.clamp(max=WINDOW)
    g = gate.double()
    return float(4 * D * (g * keys_all + (1 - g) * keys_here).sum())


def _inputs(n: int, share: float, seed: int = 0):
    import torch

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, HQ, n, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, HKV, n, D, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    gate = torch.rand(B, HQ, n, device=DEVICE, generator=gen) < share  # scattered All tokens
    return q, k, v, gate


def _dense(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flex(gate, n: int):
    """FlexAttention with AHA's mask: causal and (All, or within the window). Returns (fn, mask seconds)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (gate[b, h, q_idx] | (q_idx - kv_idx < WINDOW))

    start = time.time()
    block_mask = create_block_mask(mask_mod, B, HQ, n, n, device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    compiled = torch.compile(flex_attention)
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)), seconds


def _fwd_bwd(attend, q, k, v, dout):
    def step():
        attend(q, k, v).backward(dout)

    return step


def bench_point(n: int, share: float, dense_ms: dict, sanity: bool) -> dict:
    """One (N, All share) point: AHA and FlexAttention, forward and forward+backward."""
    import torch

    import aha

    q, k, v, gate = _inputs(n, share)
    dout = torch.randn_like(q)
    useful = _useful_flops(gate, n)

    def aha_attend(q, k, v):
        return aha.attention(q, k, v, gate, window=WINDOW, backend="triton")

    flex_attend, mask_s = _flex(gate, n)
    row = {"N": n, "all_share": share, "useful_gflop_fwd": useful / 1e9, "flex_block_mask_s": round(mask_s, 3)}
    row["aha_fwd_ms"] = _bench(lambda: aha_attend(q, k, v))
    row["flex_fwd_ms"] = _bench(lambda: flex_attend(q, k, v))
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    row["aha_fwd_bwd_ms"] = _bench(_fwd_bwd(aha_attend, q, k, v, dout), leaves)
    row["flex_fwd_bwd_ms"] = _bench(_fwd_bwd(flex_attend, q, k, v, dout), leaves)
    if share == 0.07 and n in (4096, 32768):  # the variants worth a look: dq pass, and training the router
        from aha_triton.ops import attention as aha_direct

        row["aha_fwd_bwd_deterministic_ms"] = _bench(
            lambda: aha_direct(q, k, v, gate, window=WINDOW, deterministic=True).backward(dout), leaves)
        g = gate.to(q.dtype).requires_grad_(True)
        row["aha_fwd_bwd_gate_grad_ms"] = _bench(
            lambda: aha.attention(q, k, v, g, window=WINDOW, backend="triton").backward(dout), leaves + [g])
    if sanity:
        with torch.no_grad():
            row["max_abs_diff_vs_flex"] = float((aha_attend(q, k, v) - flex_attend(q, k, v)).abs().max())
    for name, ms in (("aha", row["aha_fwd_ms"]), ("flex", row["flex_fwd_ms"])):
        row[f"{name}_fwd_tflops"] = useful / ms / 1e9
        row[f"{name}_fwd_speedup_vs_dense"] = dense_ms["fwd"] / ms
    for name, ms in (("aha", row["aha_fwd_bwd_ms"]), ("flex", row["flex_fwd_bwd_ms"])):
        row[f"{name}_fwd_bwd_tflops"] = FWD_BWD * useful / ms / 1e9
        row[f"{name}_fwd_bwd_speedup_vs_dense"] = dense_ms["fwd_bwd"] / ms
    for kind in ("fwd", "fwd_bwd"):
        row[f"aha_{kind}_tflops_over_dense"] = row[f"aha_{kind}_tflops"] / dense_ms[f"{kind}_tflops"]
    return row


def bench_dense(n: int) -> dict:
    import torch

    q, k, v, _ = _inputs(n, 0.0)
    dout = torch.randn_like(q)
    flops = 4 * D * n * (n + 1) / 2 * B * HQ
    out = {"N": n, "fwd": _bench(lambda: _dense(q, k, v))}
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    out["fwd_bwd"] = _bench(_fwd_bwd(_dense, q, k, v, dout), leaves)
    out["fwd_tflops"] = flops / out["fwd"] / 1e9
    out["fwd_bwd_tflops"] = FWD_BWD * flops / out["fwd_bwd"] / 1e9
    return out


def sweep_tiles(n: int = 32768, share: float = 0.07) -> list[dict]:
    """Forward and backward times at one point for a few tile sizes (the defaults were not tuned on a GPU)."""
    import torch

    import aha
    from aha_triton._launch import Tiles, tiles

    q, k, v, gate = _inputs(n, share)
    dout = torch.randn_like(q)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    rows = []
    for fwd in (Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 3), Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 3)):
        with tiles(fwd=fwd):
            ms = _bench(lambda: aha.attention(q, k, v, gate, window=WINDOW, backend="triton"))
        rows.append({"kernel": "fwd", "tiles": list(fwd.__dict__.values()), "ms": ms})
    for bwd in (Tiles(64, 64, 8, 2), Tiles(32, 128, 8, 2), Tiles(64, 128, 8, 2), Tiles(32, 64, 4, 3)):
        with tiles(dkdv=bwd, dq=Tiles(bwd.n, bwd.m, bwd.warps, bwd.stages)):
            ms = _bench(_fwd_bwd(lambda q, k, v: aha.attention(q, k, v, gate, window=WINDOW, backend="triton"),
                                 q, k, v, dout), leaves)
        rows.append({"kernel": "fwd+bwd (dkdv tiles; dq transposed)", "tiles": list(bwd.__dict__.values()), "ms": ms})
    for r in rows:
        print(f"[sweep] N={n} share={share} {r['kernel']:<38} tiles={r['tiles']} {r['ms']:.3f} ms", flush=True)
    return rows


def goals(points: list[dict]) -> dict:
    """The three goals of the issue, judged on the measured points."""
    at = {(p["N"], p["all_share"]): p for p in points}
    out = {}
    p = at.get((32768, 0.07))
    if p:
        out["fwd_5x_dense_at_32k_7pct"] = {"speedup": p["aha_fwd_speedup_vs_dense"],
                                           "met": p["aha_fwd_speedup_vs_dense"] >= 5}
    worst = min(points, key=lambda r: r["aha_fwd_tflops_over_dense"])
    out["half_dense_tflops_useful"] = {
        "worst_fwd": worst["aha_fwd_tflops_over_dense"], "at": [worst["N"], worst["all_share"]],
        "worst_fwd_bwd": min(r["aha_fwd_bwd_tflops_over_dense"] for r in points),
        "met": all(min(r["aha_fwd_tflops_over_dense"], r["aha_fwd_bwd_tflops_over_dense"]) >= 0.5 for r in points)}
    full = [r for r in points if r["all_share"] == 1.0]
    if full:
        slow = max(max(1 / r["aha_fwd_speedup_vs_dense"], 1 / r["aha_fwd_bwd_speedup_vs_dense"]) for r in full)
        out["all_within_1.25x_dense"] = {"worst_time_ratio": slow, "met": slow <= 1.25}
    return out


def _print_table(dense: dict, points: list[dict]) -> None:
    print(f"\n{'N':>7} {'All':>5} | {'AHA fwd ms':>10} {'TF/s':>6} {'x dense':>7} {'flex x':>7} | "
          f"{'AHA f+b ms':>10} {'TF/s':>6} {'x dense':>7} {'flex x':>7} | dense fwd TF/s, f+b TF/s")
    for p in points:
        d = dense[p["N"]]
        print(f"{p['N']:>7} {p['all_share']:>5.0%} | {p['aha_fwd_ms']:>10.3f} {p['aha_fwd_tflops']:>6.0f} "
              f"{p['aha_fwd_speedup_vs_dense']:>7.2f} {p['flex_fwd_speedup_vs_dense']:>7.2f} | "
              f"{p['aha_fwd_bwd_ms']:>10.3f} {p['aha_fwd_bwd_tflops']:>6.0f} {p['aha_fwd_bwd_speedup_vs_dense']:>7.2f} "
              f"{p['flex_fwd_bwd_speedup_vs_dense']:>7.2f} | {d['fwd_tflops']:.0f}, {d['fwd_bwd_tflops']:.0f}")


def render(result: dict) -> str:
    """Markdown for docs/benchmarks.md from a result file: date, GPU, tests, figures, goals."""
    env = result["environment"]
    out = [f"Measured on **{env['gpu']}** on {env['date'][:10]} (torch {env['torch']}, triton {env['triton']}, "
           f"CUDA {env['cuda']}) with `{env['command']}`.", ""]
    for t in result.get("tests", []):
        out.append(f"- `{t['name']}` on CUDA: {t['summary'] or 'rc=' + str(t['returncode'])}")
    dense = {d["N"]: d for d in result.get("dense", [])}
    if result.get("points"):
        out += ["", "| N | All | AHA fwd ms | TFLOP/s | × dense | Flex × dense | AHA fwd+bwd ms | TFLOP/s | × dense "
                "| Flex × dense | dense TFLOP/s fwd, f+b |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in result["points"]:
            d = dense[p["N"]]
            out.append(f"| {p['N']} | {p['all_share']:.0%} | {p['aha_fwd_ms']:.3f} | {p['aha_fwd_tflops']:.0f} | "
                       f"{p['aha_fwd_speedup_vs_dense']:.2f} | {p['flex_fwd_speedup_vs_dense']:.2f} | "
                       f"{p['aha_fwd_bwd_ms']:.3f} | {p['aha_fwd_bwd_tflops']:.0f} | "
                       f"{p['aha_fwd_bwd_speedup_vs_dense']:.2f} | {p['flex_fwd_bwd_speedup_vs_dense']:.2f} | "
                       f"{d['fwd_tflops']:.0f}, {d['fwd_bwd_tflops']:.0f} |")
    for name, goal in result.get("goals", {}).items():
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in goal.items() if k != "met")
        out.append(f"- goal `{name}`: {'met' if goal['met'] else '**not met**'} ({figures})")
    return "\n".join(out)


def environment() -> dict:
    import torch
    import triton

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "command": " ".join(sys.argv)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CUDA tests and benchmark of the triton backend; figures to JSON")
    parser.add_argument("--out", help="JSON file to write (required unless --render)")
    parser.add_argument("--render", metavar="JSON", help="print the Markdown of a result file for the docs, and exit")
    parser.add_argument("--quick", action="store_true", help="N = 4k and 32k only, no tile sweep")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="*", help=f"sequence lengths (default {LENGTHS})")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if not args.out:
        parser.error("--out is required")

    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real kernels
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    result = {"environment": environment(), "config": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "window": WINDOW,
                                                        "dtype": "bfloat16", "fwd_bwd_flop_factor": FWD_BWD}}
    if not args.skip_tests:
        result["tests"] = run_tests()
    if not args.skip_bench:
        lengths = args.lengths or ((4096, 32768) if args.quick else LENGTHS)
        dense, points = {}, []
        for n in lengths:
            dense[n] = bench_dense(n)
            print(f"[dense] N={n} fwd {dense[n]['fwd']:.3f} ms ({dense[n]['fwd_tflops']:.0f} TF/s), "
                  f"fwd+bwd {dense[n]['fwd_bwd']:.3f} ms ({dense[n]['fwd_bwd_tflops']:.0f} TF/s)", flush=True)
            for share in SHARES:
                points.append(bench_point(n, share, dense[n], sanity=n == lengths[0]))
                p = points[-1]
                print(f"[aha] N={n} All={share:.0%} fwd {p['aha_fwd_ms']:.3f} ms "
                      f"({p['aha_fwd_speedup_vs_dense']:.2f}x dense, flex {p['flex_fwd_speedup_vs_dense']:.2f}x), "
                      f"fwd+bwd {p['aha_fwd_bwd_ms']:.3f} ms ({p['aha_fwd_bwd_speedup_vs_dense']:.2f}x)", flush=True)
            torch.cuda.empty_cache()
        result["dense"] = list(dense.values())
        result["points"] = points
        result["goals"] = goals(points)
        if not args.quick:
            result["tile_sweep"] = sweep_tiles()
        _print_table(dense, points)
        print("\ngoals:", json.dumps(result["goals"], indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    failed = [t["name"] for t in result.get("tests", []) if t["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
