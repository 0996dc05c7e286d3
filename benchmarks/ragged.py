"""Ragged batches: packed prefill, batched decode over a ragged cache, batched generate().

Every figure is a ratio of two times measured side by side in this one process (one warm-up
each, then the contenders take turns; medians), printed beside the bound the routing allows.

Part 1, packed prefill: 8 documents of 512 to 8192 tokens (32,256 in all) packed along N with
``cu_seqlens_q/k``, 7% of token-head decisions All at random, window 256, no grad. Against the
same documents run one at a time through aha (goal: packed <= 1.1x their sum), and against
dense causal SDPA over the same documents, the faster of one call per document and one
masked padded batch. The work bound is the ratio of query-key pairs: dense reads
sum n(n+1)/2 per head, AHA reads pos + 1 keys for an All token and min(pos + 1, window) for a
Here token.

Part 2, batched decode: 8 sequences of 16k to 32k keys in one cache of 32k rows, one new query
each, 32 query heads, 8 kv heads, 7% of the query heads All at random per sequence, window 256.
Two layouts: the sequences start at row 0 (``cache_seqlens``) or end at the last row
(left padding, ``cache_leftpad``). Against dense SDPA decode, the faster of a masked padded
batch and one call per sequence. Memory bound: a kv head's whole sequence is read when any of
its query heads is All, only ``window`` keys otherwise; bound = keys dense reads / keys AHA
reads. Goal: at least 0.8 of it.

Part 3, transformers: a small random FAOlmo generates greedily for 4 prompts of different
lengths, batched with left padding, against the same prompts one at a time; tokens per second.

    python benchmarks/ragged.py [--quick] [--threads N] [--only packed decode generate] [--out JSON]
    python benchmarks/ragged.py --docs      # re-render docs/benchmarks-ragged.md from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import _commit, machine, measure, threads  # noqa: E402
from decode import _force_gates, _tiny_faolmo, head_gate  # noqa: E402

import aha  # noqa: E402
from aha.window import keys_read  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks-ragged.md"
COMMAND = "python benchmarks/ragged.py"
WINDOW, SHARE, D = 256, 0.07, 64

FULL = {
    "packed": {"lengths": [512, 1024, 2048, 3072, 4096, 5632, 7680, 8192], "heads": [(8, 8), (32, 8)]},
    "decode": {"lengths": [16384, 18432, 20480, 22528, 24576, 27648, 30720, 32768], "heads": (32, 8)},
    "generate": {"prompts": [96, 160, 224, 288], "new_tokens": 32, "window": 64},
    "budget_s": 15.0,
    "max_repeats": 7,
}
QUICK = {
    "packed": {"lengths": [64, 128, 256, 384, 512, 704, 960, 1024], "heads": [(8, 8)]},
    "decode": {"lengths": [2048, 2304, 2560, 2816, 3072, 3456, 3840, 4096], "heads": (32, 8)},
    "generate": {"prompts": [24, 40, 56, 72], "new_tokens": 8, "window": 16},
    "budget_s": 1.0,
    "max_repeats": 3,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _contenders(q, k, v, gate, **ragged) -> list[str]:
    """The available built-in backends (the reference aside) that serve these inputs."""
    names = []
    for b in aha.backends():
        if b.name == "reference" or b.status != "available" or b.distribution != "aha-attention":
            continue
        try:
            aha.select(q, k, v, gate, window=WINDOW, backend=b.name, **ragged)
        except aha.BackendError:
            continue
        names.append(b.name)
    return names


# ---------------------------------------------------------------- part 1: packed prefill


def pair_bound(lengths, gate: torch.Tensor, window: int) -> float:
    """Query-key pairs dense causal attention reads / pairs AHA reads, over every head.

    gate: [1, Hq, total] bool, the documents packed in order."""
    dense = aha_pairs = 0
    at = 0
    for n in lengths:
        pos = torch.arange(n, dtype=torch.float64)  # (n,) position within the document
        g = gate[0, :, at : at + n].to(torch.float64)  # (Hq, n)
        dense += g.shape[0] * n * (n + 1) / 2
        aha_pairs += float(keys_read(pos, g, window).sum())
        at += n
    return dense / aha_pairs


def bench_packed(cfg) -> list:
    return [_packed_row(cfg, cfg["packed"]["lengths"], hq, hkv) for hq, hkv in cfg["packed"]["heads"]]


def _packed_row(cfg, lengths, hq: int, hkv: int) -> dict:
    total, longest = sum(lengths), max(lengths)
    cu = _cu(lengths)
    gen = torch.Generator().manual_seed(hq)
    q = torch.randn(1, hq, total, D, generator=gen)
    k = torch.randn(1, hkv, total, D, generator=gen)
    v = torch.randn(1, hkv, total, D, generator=gen)
    gate = (torch.rand(1, hq, total, generator=gen) < SHARE).float()
    docs = list(zip(cu[:-1].tolist(), lengths))
    gqa = hq != hkv

    def dense_each():
        for s, n in docs:
            sl = slice(s, s + n)
            F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, enable_gqa=gqa)

    def dense_padded():  # every document padded to the longest, one masked call
        qp = q.new_zeros(len(docs), hq, longest, D)
        kp, vp = q.new_zeros(len(docs), hkv, longest, D), q.new_zeros(len(docs), hkv, longest, D)
        mask = torch.zeros(len(docs), 1, longest, longest, dtype=torch.bool)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        for b, (s, n) in enumerate(docs):
            qp[b, :, :n], kp[b, :, :n], vp[b, :, :n] = q[0, :, s : s + n], k[0, :, s : s + n], v[0, :, s : s + n]
            mask[b, 0, :, :n] = causal[:, :n]
            mask[b, 0, n:, 0] = True  # padding rows read key 0 only: no empty softmax
        F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)

    def packed(name):
        aha.attention(q, k, v, gate, window=WINDOW, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=name)

    def each(name):
        for s, n in docs:
            sl = slice(s, s + n)
            aha.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], gate[:, :, sl], window=WINDOW, backend=name)

    row = {"heads": [hq, hkv], "lengths": lengths, "total": total, "bound": pair_bound(lengths, gate.bool(), WINDOW),
           "backends": {}}
    base = measure({"dense": dense_each}, cfg["budget_s"], cfg["max_repeats"])
    row["dense_each_s"] = base["median_s"]["dense"]
    row["dense_padded_s"] = None
    if len(docs) * longest**2 <= 1 << 29:  # the padded batch's mask: B x L x L bools (512 MiB at most)
        row["dense_padded_s"] = measure({"dense": dense_padded}, cfg["budget_s"], 1)["median_s"]["dense"]
    dense = min(t for t in (row["dense_each_s"], row["dense_padded_s"]) if t is not None)
    row["dense_s"] = dense
    for name in _contenders(q, k, v, gate, cu_seqlens_q=cu, cu_seqlens_k=cu):
        m = measure({"packed": partial(packed, name), "alone": partial(each, name)}, cfg["budget_s"], cfg["max_repeats"])
        t_packed, t_each = m["median_s"]["packed"], m["median_s"]["alone"]
        row["backends"][name] = {
            "packed_s": t_packed, "each_s": t_each, "packed_over_each": t_packed / t_each,
            "speedup_vs_dense": dense / t_packed, "fraction_of_bound": dense / t_packed / row["bound"],
            "repeats": m["repeats"],
        }
        log(f"packed {total} tokens Hq={hq} Hkv={hkv} {name}: packed {t_packed * 1e3:.0f} ms, one at a time "
            f"{t_each * 1e3:.0f} ms ({t_packed / t_each:.2f}x), dense {dense * 1e3:.0f} ms -> "
            f"{dense / t_packed:.2f}x of bound {row['bound']:.2f}x")
    return row


# ---------------------------------------------------------------- part 2: batched decode


def key_bound(lengths, gate: torch.Tensor, hkv: int, window: int) -> float:
    """Keys dense decode reads / keys AHA decode reads: a kv head reads its whole sequence when
    any of its query heads is All, ``window`` keys otherwise. gate: [B, Hq, 1] bool."""
    bsz, hq = gate.shape[:2]
    any_all = gate[:, :, 0].reshape(bsz, hkv, hq // hkv).any(-1)  # (B, Hkv)
    dense = sum(n * hkv for n in lengths)
    aha_keys = sum(n if bool(a) else min(n, window) for b, n in enumerate(lengths) for a in any_all[b])
    return dense / aha_keys


def bench_decode(cfg) -> list:
    lengths = cfg["decode"]["lengths"]
    hq, hkv = cfg["decode"]["heads"]
    bsz, nk = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(bsz, hkv, nk, D, generator=gen)
    v = torch.randn(bsz, hkv, nk, D, generator=gen)
    q = torch.randn(bsz, hq, 1, D, generator=gen)
    gate = head_gate(hq, SHARE, "cpu", batch=bsz).float()
    bound = key_bound(lengths, gate.bool(), hkv, WINDOW)
    layouts = {
        "cache_seqlens": ({"cache_seqlens": torch.tensor(lengths)}, [(0, n) for n in lengths]),
        "cache_leftpad": ({"cache_leftpad": torch.tensor([nk - n for n in lengths])}, [(nk - n, nk) for n in lengths]),
    }
    return [_decode_row(cfg, q, k, v, gate, bound, layout, ragged, spans) for layout, (ragged, spans) in layouts.items()]


def _decode_row(cfg, q, k, v, gate, bound: float, layout: str, ragged: dict, spans) -> dict:
    mask = torch.zeros(k.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
    for b, (lo, hi) in enumerate(spans):
        mask[b, 0, 0, lo:hi] = True

    def dense_masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def dense_each():
        for b, (lo, hi) in enumerate(spans):
            F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi], enable_gqa=True)

    def routed(name):
        aha.attention(q, k, v, gate, window=WINDOW, backend=name, **ragged)

    contenders = {"dense masked batch": dense_masked, "dense one call per sequence": dense_each}
    names = _contenders(q, k, v, gate, **ragged)
    contenders.update({name: partial(routed, name) for name in names})
    m = measure(contenders, cfg["budget_s"], cfg["max_repeats"] * 3)
    t = m["median_s"]
    dense = min(t["dense masked batch"], t["dense one call per sequence"])
    row = {"layout": layout, "lengths": [hi - lo for lo, hi in spans], "heads": [q.shape[1], k.shape[1]], "bound": bound,
           "dense_s": dense, "dense_masked_s": t["dense masked batch"], "dense_each_s": t["dense one call per sequence"],
           "backends": {}}
    for name in names:
        row["backends"][name] = {"s": t[name], "speedup_vs_dense": dense / t[name],
                                 "fraction_of_bound": dense / t[name] / bound, "repeats": m["repeats"][name]}
        log(f"decode {layout} {name}: {t[name] * 1e3:.2f} ms, dense {dense * 1e3:.2f} ms -> {dense / t[name]:.2f}x "
            f"of bound {bound:.2f}x ({dense / t[name] / bound:.2f} of it)")
    return row


# ---------------------------------------------------------------- part 3: generate()


def bench_generate(cfg) -> dict:
    g = cfg["generate"]
    model = _tiny_faolmo(g["window"], "cpu")
    heads = model.config.num_attention_heads
    _force_gates(model, max(1, round(SHARE * heads)))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (n,), generator=gen) for n in g["prompts"]]
    longest = max(g["prompts"])
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as generate() wants it
        ids[b, longest - len(p) :], mask[b, longest - len(p) :] = p, 1
    new = g["new_tokens"]
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}

    def batched():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, **kw)

    def alone():
        with torch.no_grad():
            return [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw) for p in prompts]

    out_b, out_a = batched(), alone()
    same = all(torch.equal(out_b[b, longest:], o[0, len(p) :]) for b, (p, o) in enumerate(zip(prompts, out_a)))
    m = measure({"batched": batched, "one at a time": alone}, cfg["budget_s"] * 2, cfg["max_repeats"])
    t = m["median_s"]
    tokens = new * len(prompts)
    res = {"prompts": g["prompts"], "new_tokens": new, "window": g["window"], "same_tokens": same,
           "batched_tokens_per_s": tokens / t["batched"], "alone_tokens_per_s": tokens / t["one at a time"],
           "speedup": t["one at a time"] / t["batched"], "repeats": m["repeats"]}
    log(f"generate {len(prompts)} prompts {g['prompts']}: batched {res['batched_tokens_per_s']:.1f} tokens/s, one at a "
        f"time {res['alone_tokens_per_s']:.1f} tokens/s ({res['speedup']:.2f}x); same tokens: {same}")
    return res


# ---------------------------------------------------------------- page


def _run_line(results: dict, part: str) -> list[str]:
    r = results.get("runs", {}).get(part)
    if r is None:
        return []
    return ["", f"Measured with `{r['command']}` at commit {r['commit']} on {r['date']}, {threads(r['threads'])}, "
                f"load average {r['load'][0]:.1f} before and {r['load_after'][0]:.1f} after.", ""]


def goals(results: dict) -> list:
    out = []
    for row in results.get("packed", []):
        for name, r in row["backends"].items():
            if name == "cpu":
                out.append({"goal": f"packed prefill on cpu (Hq={row['heads'][0]}, Hkv={row['heads'][1]}) <= 1.1x the "
                                    "documents one at a time", "measured": f"{r['packed_over_each']:.2f}x",
                            "met": r["packed_over_each"] <= 1.1})
    for row in results.get("decode", []):
        for name, r in row["backends"].items():
            if name in ("cpu", "torch"):
                out.append({"goal": f"batched decode ({row['layout']}) on {name} >= 0.8 of the memory bound",
                            "measured": f"{r['fraction_of_bound']:.2f} ({r['speedup_vs_dense']:.2f}x of {row['bound']:.2f}x)",
                            "met": r["fraction_of_bound"] >= 0.8})
    return out


def render(results: dict) -> str:
    mc = results["machine"]
    lines = [
        "# Ragged batches",
        "",
        f"Measured on {mc['cpu']} ({mc['cores']} cores), torch {mc['torch']}, Python {mc['python']}. Each part "
        "below says the command that measured it, the commit, the torch threads and the load average before and "
        "after (the machine is shared: at a load above its 2 cores, timings of multi-threaded code suffer most). "
        "Every ratio compares two times measured side by side in that run (medians after a warm-up). The bound is "
        "what the routing allows: the ratio of the work dense attention does to the work AHA does.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |" for g in results["goals"]]
    if results.get("packed"):
        lines += ["", "## Packed prefill", "",
                  "Documents packed along N with `cu_seqlens_q = cu_seqlens_k`, 7% of token-head decisions All at "
                  f"random, window {WINDOW}, D = {D}, float32, no grad. *Packed / alone*: the packed call's time over "
                  "the same documents run one call each through aha (goal <= 1.1x). *vs dense*: dense causal SDPA over the "
                  "same documents (the faster of one call per document and a masked padded batch) / the packed call: "
                  "higher is faster. *Bound*: query-key pairs dense reads / pairs AHA reads.", *_run_line(results, "packed"),
                  "| lengths | Hq / Hkv | backend | packed (ms) | alone (ms) | packed / alone | dense (ms) | vs dense | bound | of bound |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["packed"]:
            for name, r in row["backends"].items():
                lines.append(f"| {' '.join(map(str, row['lengths']))} | {row['heads'][0]} / {row['heads'][1]} | {name} | "
                             f"{r['packed_s'] * 1e3:.0f} | {r['each_s'] * 1e3:.0f} | {r['packed_over_each']:.2f}x | "
                             f"{row['dense_s'] * 1e3:.0f} | {r['speedup_vs_dense']:.2f}x | {row['bound']:.2f}x | "
                             f"{r['fraction_of_bound']:.2f} |")
        padded = [f"{row['dense_padded_s'] * 1e3:.0f} ms" for row in results["packed"] if row.get("dense_padded_s")]
        each = [f"{row['dense_each_s'] * 1e3:.0f} ms" for row in results["packed"]]
        lines += ["", f"Dense, one call per document: {', '.join(each)}; masked padded batch: {', '.join(padded) or 'not run'}."]
    if results.get("decode"):
        row0 = results["decode"][0]
        lines += ["", "## Batched decode", "",
                  f"B = {len(row0['lengths'])} sequences of {min(row0['lengths'])} to {max(row0['lengths'])} keys in one "
                  f"cache, one new query each, Hq = {row0['heads'][0]}, Hkv = {row0['heads'][1]}, D = {D}, window {WINDOW}, "
                  "7% of the query heads All at random per sequence, float32. *cache_seqlens*: the sequences start at "
                  "row 0; *cache_leftpad*: they end at the last row (left padding). Dense: the faster of a masked padded "
                  "batch and one call per sequence. *Bound*: keys dense reads / keys AHA must read (a kv head reads its "
                  "whole sequence when any of its query heads is All, `window` keys otherwise).", *_run_line(results, "decode"),
                  "| layout | backend | time (ms) | dense (ms) | vs dense | bound | of bound |", "|---|---|---|---|---|---|---|"]
        for row in results["decode"]:
            for name, r in row["backends"].items():
                lines.append(f"| {row['layout']} | {name} | {r['s'] * 1e3:.2f} | {row['dense_s'] * 1e3:.2f} | "
                             f"{r['speedup_vs_dense']:.2f}x | {row['bound']:.2f}x | {r['fraction_of_bound']:.2f} |")
    g = results.get("generate")
    if g:
        lines += ["", "## Batched generate()", "",
                  f"A small random FAOlmo (hidden 512, 4 layers, 8 heads, window {g['window']}, one head per layer "
                  f"forced All) generates {g['new_tokens']} tokens greedily for {len(g['prompts'])} prompts of "
                  f"{', '.join(map(str, g['prompts']))} tokens: one batched call with left padding against one call per "
                  f"prompt. Same tokens as one at a time: {'yes' if g['same_tokens'] else '**no**'}.", *_run_line(results, "generate"),
                  "| | tokens/s |", "|---|---|",
                  f"| batched | {g['batched_tokens_per_s']:.1f} |", f"| one at a time | {g['alone_tokens_per_s']:.1f} |",
                  "", f"Batched is {g['speedup']:.2f}x faster."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check that the benchmark runs")
    ap.add_argument("--only", nargs="*", choices=["packed", "decode", "generate"], help="parts to run")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/ragged-cpu.json, or -quick)")
    ap.add_argument("--docs", action="store_true", help="only render docs/benchmarks-ragged.md from the JSON")
    args = ap.parse_args(argv)
    out = args.out or RESULTS / ("ragged-cpu-quick.json" if args.quick else "ragged-cpu.json")
    if args.docs:
        DOC.write_text(render(json.loads(out.read_text())))
        return
    cfg = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(out.read_text()) if args.only and out.exists() else {}
    flags = (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else "")
    results["machine"] = machine()
    runs = results.setdefault("runs", {})  # per part: the command, code, threads and load it ran with
    parts = {"packed": bench_packed, "decode": bench_decode, "generate": bench_generate}
    for name, fn in parts.items():
        if not args.only or name in args.only:
            run = {"command": COMMAND + flags + (f" --only {' '.join(args.only)}" if args.only else ""),
                   "commit": _commit("benchmarks/ragged.py"), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "threads": torch.get_num_threads(), "load": list(os.getloadavg())}
            results[name] = fn(cfg)
            runs[name] = {**run, "load_after": list(os.getloadavg())}
    results["goals"] = goals(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log(f"wrote {out}")
    if not args.quick:
        DOC.write_text(render(results))
        log(f"wrote {DOC}")
    for gl in results["goals"]:
        log(f"{'met    ' if gl['met'] else 'NOT MET'}  {gl['goal']}: {gl['measured']}")


if __name__ == "__main__":
    main()
