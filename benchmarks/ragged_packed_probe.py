"""Probe (temporary): packed prefill against the same documents one at a time, and against dense SDPA.

8 documents of lengths drawn in [512, 8192] (about 32k tokens), packed along N with
cu_seqlens (B = 1), 7% of the tokens All at random, window 256, no grad. Figures, side by side in
one process: packed aha / the sum of the documents run one at a time through aha (each its own
contiguous tensors; goal <= 1.1), and dense SDPA (the faster of one padded masked batch and one
causal call per document) / packed aha beside the work bound (query-key pairs dense reads / pairs
AHA reads).

    python benchmarks/ragged_packed_probe.py [--hq 8 --hkv 8] [--backends cpu torch] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from ragged_decode_probe import timed  # benchmarks/ is sys.path[0] when run as a script

import aha


def lengths(count: int, lo: int, hi: int, total: int, gen) -> list[int]:
    """count lengths in [lo, hi] summing to about total."""
    x = torch.rand(count, generator=gen)
    n = (lo + x / x.sum() * (total - count * lo)).round().long().clamp(lo, hi)
    return n.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--total", type=int, default=1 << 15)
    ap.add_argument("--hq", type=int, default=8)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--share", type=float, default=0.07)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--min", action="store_true", help="the fastest repeat instead of the median (a loaded machine)")
    ap.add_argument("--backends", nargs="+", default=["cpu"])
    ap.add_argument("--dense", action="store_true", help="also time dense SDPA (slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    lens = lengths(args.docs, 512, 8192, args.total, gen)
    n, hq, hkv, d, w = sum(lens), args.hq, args.hkv, args.d, args.window
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    q = torch.randn(1, hq, n, d, generator=gen)
    k, v = (torch.randn(1, hkv, n, d, generator=gen) for _ in range(2))
    gate = torch.rand(1, hq, n, generator=gen) < args.share
    docs = [[x[:, :, a:b].contiguous() for x in (q, k, v, gate)] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    pos = torch.cat([torch.arange(m) for m in lens])  # position of each token in its document
    dense_pairs = sum(m * (m + 1) // 2 for m in lens) * hq
    aha_pairs = int(torch.where(gate[0], pos + 1, (pos + 1).clamp(max=w)).sum())
    bound = dense_pairs / aha_pairs
    print(f"threads {torch.get_num_threads()}  docs {lens} (N {n})  Hq {hq} Hkv {hkv} D {d} window {w}")
    print(f"All share {float(gate.float().mean()):.3f}  work bound (pairs dense / AHA) {bound:.2f}x", flush=True)

    fns = {}
    for name in args.backends:
        kw = {"window": w, "backend": name}
        fns[f"{name} packed"] = lambda kw=kw: aha.attention(q, k, v, gate, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
        fns[f"{name} one by one"] = lambda kw=kw: [aha.attention(*doc, **kw) for doc in docs]
    if args.dense:
        mx = max(lens)
        qp, kp, vp = (torch.zeros(len(lens), x.shape[1], mx, d) for x in (q, k, v))
        for i, doc in enumerate(docs):
            for x, y in zip((qp, kp, vp), doc):
                x[i, :, : y.shape[2]] = y
        causal = torch.ones(mx, mx, dtype=torch.bool).tril()  # pad on the right: real rows never read padding
        fns["dense padded"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal, enable_gqa=hq != hkv)
        fns["dense each"] = lambda: [
            F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=hq != hkv) for a, b, c, _ in docs
        ]
    with torch.no_grad():
        for name in args.backends:  # packed equals one by one
            want = torch.cat([aha.attention(*doc, window=w, backend=name) for doc in docs], 2)
            got = aha.attention(q, k, v, gate, window=w, backend=name, cu_seqlens_q=cu, cu_seqlens_k=cu)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        t = timed(fns, args.repeats, min if args.min else statistics.median)
    line = "  ".join(f"{name} {s * 1e3:.1f} ms" for name, s in t.items())
    print(line)
    for name in args.backends:
        ratio = t[f"{name} packed"] / t[f"{name} one by one"]
        extra = ""
        if args.dense:
            dense = min(t["dense padded"], t["dense each"])
            extra = f"; dense / packed {dense / t[f'{name} packed']:.2f}x beside the work bound {bound:.2f}x"
        print(f"{name}: packed / one by one = {ratio:.3f} (goal <= 1.1){extra}", flush=True)


if __name__ == "__main__":
    main()
