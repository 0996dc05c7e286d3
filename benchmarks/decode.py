"""Decode benchmark: per-step attention latency against a KV cache, and FAOlmo generate().

Part 1, attention: one new query per sequence (Nq = 1) against caches of 4k to 128k keys,
B=1, Hq=32, Hkv=8, D=64, window 256, with 0, 7 and 100% of the query heads routed All.
Every available built-in backend that serves the device (the reference aside) runs side by side with dense SDPA decode
over the same cache (no mask needed: the query sits at the last position). Figure: dense
time / backend time, the median of repeats after a warm-up, in one process.

Part 2, batched: B=8 sequences of different lengths (context * (b + 1) / 8 keys) in one cache
of ``context`` keys, passed with ``cache_seqlens``; the baseline is dense SDPA decode run on
each sequence's own keys (views, no mask), so it reads exactly the keys each sequence holds.

Part 3, model: a small random FAOlmo (hidden 512, 4 layers, 8 heads, window 256) generates
after an 8k-token prompt; decode tokens per second with 7% of the heads All against the same
model with every gate All.

    python benchmarks/decode.py [--quick] [--device cpu|cuda] [--contexts 4096 ...] [--repeats N]
                                [--out benchmarks/results/decode-cpu.json]
    python benchmarks/decode.py --docs benchmarks/results/decode-cpu.json   # re-render docs/benchmarks-decode.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import aha

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import threads  # noqa: E402

CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
BATCHED_CONTEXTS = (4096, 32768)
BATCH = 8
SHARES = (0.0, 0.07, 1.0)


def median_time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def head_gate(hq: int, share: float, device, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """[B, Hq, 1] gate with round(share * Hq) heads All in each sequence, chosen at random."""
    n_all = round(share * hq)
    gate = torch.zeros(batch, hq, 1, dtype=torch.bool)
    for b in range(batch):
        order = torch.randperm(hq, generator=torch.Generator().manual_seed(seed + b))
        gate[b, order[:n_all], 0] = True
    return gate.to(device)


def _contenders(q, k, v, gate, window, **kw):
    """Names of the available built-in backends (the reference aside) that serve these inputs."""
    names = []
    for b in aha.backends():
        if b.name == "reference" or b.status != "available" or b.distribution != "aha-attention":
            continue
        try:
            aha.select(q, k, v, gate, window=window, backend=b.name, **kw)
        except aha.BackendError:
            continue
        names.append(b.name)
    return names


def _time_backends(row, q, k, v, gate, window, repeats, sync, dense, **kw):
    """Time every contender on these inputs into row["backends"]; print the row."""
    for name in _contenders(q, k, v, gate, window, **kw):
        t = median_time(lambda name=name: aha.attention(q, k, v, gate, window=window, backend=name, **kw), repeats, sync)
        row["backends"][name] = {"ms": t * 1e3, "speedup_vs_dense": dense / t}
    print(f"context {row['context']:>6}  All {row['all_share']:>4.0%}  dense {dense * 1e3:8.2f} ms  " + "  ".join(
        f"{name} {r['ms']:8.2f} ms ({r['speedup_vs_dense']:.2f}x)" for name, r in row["backends"].items()), flush=True)


def attention_rows(contexts, device, dtype, repeats, window=256, hq=32, hkv=8, d=64):
    rows = []
    for n in contexts:
        rows += _one_context(n, device, dtype, repeats, window, hq, hkv, d)
    return rows


def _one_context(n, device, dtype, repeats, window, hq, hkv, d):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(n)
    k = torch.randn(1, hkv, n, d, device=device, dtype=dtype, generator=gen)  # the cache
    v = torch.randn(1, hkv, n, d, device=device, dtype=dtype, generator=gen)
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype, generator=gen)  # one new token
    dense = median_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats, sync)
    rows = []
    for share in SHARES:
        gate = head_gate(hq, share, device).to(dtype)
        row = {"context": n, "all_share": share, "dense_ms": dense * 1e3, "backends": {}}
        _time_backends(row, q, k, v, gate, window, repeats, sync, dense)
        rows.append(row)
    return rows


def batched_rows(contexts, device, dtype, repeats, window=256, hq=32, hkv=8, d=64, batch=BATCH):
    """B sequences of lengths context * (b + 1) / B in one cache, with cache_seqlens."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for n in contexts:
        gen = torch.Generator(device=device).manual_seed(n + 1)
        k = torch.randn(batch, hkv, n, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn(batch, hkv, n, d, device=device, dtype=dtype, generator=gen)
        q = torch.randn(batch, hq, 1, d, device=device, dtype=dtype, generator=gen)
        lens = [n * (b + 1) // batch for b in range(batch)]
        seqlens = torch.tensor(lens, device=device)

        def dense_step(q=q, k=k, v=v, lens=lens):  # each sequence over its own keys: views, no mask
            for b, m in enumerate(lens):
                F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, :m], v[b : b + 1, :, :m], enable_gqa=True)

        dense = median_time(dense_step, repeats, sync)
        for share in SHARES:
            gate = head_gate(hq, share, device, batch=batch).to(dtype)
            row = {"context": n, "lengths": lens, "all_share": share, "dense_ms": dense * 1e3, "backends": {}}
            _time_backends(row, q, k, v, gate, window, repeats, sync, dense, cache_seqlens=seqlens)
            rows.append(row)
    return rows


def _tiny_faolmo(window: int, device):
    from aha.hf import FAOlmoConfig, FAOlmoForCausalLM

    cfg = FAOlmoConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, max_position_embeddings=16384, local_window_size=window, router_bias=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return FAOlmoForCausalLM(cfg).to(device).eval()


def _force_gates(model, all_heads: int):
    """Zero the router weights and set the gate bias: the first ``all_heads`` heads of each layer All."""
    from aha.nn import aha_layers

    with torch.no_grad():
        for layer in aha_layers(model):
            layer.router_weight().zero_()
            layer.gate_bias.fill_(-10.0)
            layer.gate_bias[:all_heads] = 10.0


class _StepClock:
    """A logits processor that only notes the time: generate() calls it once per new token."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def generate_rows(prompt_len, new_tokens, device, repeats=1, window=256):
    """Decode tokens/s inside one generate() call: the time from the first new token to the last,
    so the prefill (seconds, and noisy on a shared machine) never enters the decode rate."""
    from transformers import LogitsProcessorList

    model = _tiny_faolmo(window, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    heads = model.config.num_attention_heads
    for label, all_heads in (("every gate All", heads), ("7% of heads All", max(1, round(0.07 * heads)))):
        _force_gates(model, all_heads)
        rates, prefills = [], []
        for _ in range(repeats):
            clock = _StepClock(sync)
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                               min_new_tokens=new_tokens + 1, do_sample=False, logits_processor=LogitsProcessorList([clock]))
            prefills.append(clock.times[0] - start)
            rates.append(new_tokens / (clock.times[-1] - clock.times[0]))
        tps, prefill = statistics.median(rates), statistics.median(prefills)
        out[label] = {"all_heads_per_layer": all_heads, "decode_tokens_per_s": tps, "prefill_s": prefill}
        print(f"FAOlmo generate, {prompt_len}-token prompt, {label}: {tps:.1f} tokens/s (prefill {prefill:.2f} s)", flush=True)
    out["speedup"] = out["7% of heads All"]["decode_tokens_per_s"] / out["every gate All"]["decode_tokens_per_s"]
    return out


def _table(rows) -> list[str]:
    """Markdown rows: context, All share, dense time, then each backend's speed-up and time."""
    names = sorted({n for r in rows for n in r["backends"]})
    lines = ["| context | All share | dense (ms) | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for r in rows:
        cells = [f"{r['backends'][n]['speedup_vs_dense']:.2f}x ({r['backends'][n]['ms']:.2f} ms)" if n in r["backends"] else "-" for n in names]
        lines.append(f"| {r['context']} | {r['all_share']:.0%} | {r['dense_ms']:.2f} | " + " | ".join(cells) + " |")
    return lines


def render(result: dict) -> str:
    """docs/benchmarks-decode.md from a result JSON: every number comes from the file."""
    sh = result["shape"]
    lines = [
        "## Decoding with a KV cache",
        "",
        f"Measured on {result['device']} ({result['machine']}, {threads(result['threads'])}), torch {result['torch']}, "
        f"{result['date']}, with",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"One new token per step against a cache of `context` keys; B={sh['B']}, Hq={sh['Hq']}, Hkv={sh['Hkv']}, "
        f"D={sh['D']}, window {sh['window']}, {sh['dtype']}. A share of the query heads is routed All, the rest Here. "
        "Each cell is dense SDPA decode time / the backend's time (median of repeats, side by side in one run): "
        "higher is faster. Goal: at least 5x at 32k context with 7% All.",
        "",
    ]
    lines += _table(result["attention"])
    if result.get("batched"):
        rows = result["batched"]
        lines += ["", "### A batch of sequences of different lengths", "",
                  f"B={len(rows[0]['lengths'])} sequences in one cache of `context` keys, sequence b holding "
                  "context * (b + 1) / B of them, passed as `cache_seqlens`; otherwise as above (the heads "
                  "routed All are drawn per sequence). The baseline runs dense SDPA decode on each sequence's "
                  "own keys (views, no mask).", ""]
        lines += _table(rows)
    g = result["generate"]
    lines += ["", "### FAOlmo generate()", "",
              "A small random FAOlmo (hidden 512, 4 layers, 8 heads, window 256) decodes after the prompt; "
              "gates are forced per head through the router bias.", "",
              "| gates | decode tokens/s | prefill (s) |", "|---|---|---|"]
    for label, row in g.items():
        if isinstance(row, dict):
            lines.append(f"| {label} | {row['decode_tokens_per_s']:.1f} | {row['prefill_s']:.2f} |")
    lines += ["", f"Speed-up of decoding with 7% of heads All over every gate All: {g['speedup']:.2f}x.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two contexts, short generation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help=f"cache lengths of part 1 (default {CONTEXTS})")
    p.add_argument("--batched-contexts", type=int, nargs="*", default=None,
                   help=f"cache lengths of part 2, none to skip it (default {BATCHED_CONTEXTS})")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 9, 5 with --quick)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/decode-<device>[-quick].json)")
    p.add_argument("--docs", default=None, metavar="JSON", help="only render docs/benchmarks-decode.md from this JSON")
    args = p.parse_args(argv)
    if args.docs:
        with open(args.docs) as f:
            result = json.load(f)
        _write_page(result)
        return
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    contexts = args.contexts or ((4096, 16384) if args.quick else CONTEXTS)
    batched = args.batched_contexts if args.batched_contexts is not None else ((4096,) if args.quick else BATCHED_CONTEXTS)
    repeats = args.repeats or (5 if args.quick else 9)
    command = " ".join(["python benchmarks/decode.py", *(argv if argv is not None else sys.argv[1:])])
    result = {
        "command": command,
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"B": 1, "Hq": 32, "Hkv": 8, "D": 64, "window": 256, "dtype": str(dtype).removeprefix("torch.")},
        "attention": attention_rows(contexts, args.device, dtype, repeats=repeats),
        "batched": batched_rows(batched, args.device, dtype, repeats=repeats),
        "generate": generate_rows(1024 if args.quick else 8192, 8 if args.quick else 32, args.device),
    }
    out = args.out or f"benchmarks/results/decode-{args.device}{'-quick' if args.quick else ''}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    if not args.quick:
        _write_page(result)


def _write_page(result: dict) -> None:
    """docs/benchmarks-decode.md for a CPU run; a GPU run gets its own page (add it to mkdocs.yml's nav)."""
    page = "docs/benchmarks-decode.md" if result["device"] == "cpu" else "docs/benchmarks-decode-gpu.md"
    with open(page, "w") as f:
        f.write(render(result))
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
