"""Probe (temporary): batched decode of a ragged cache against dense SDPA, beside the memory bound.

B sequences of lengths drawn in [16k, 32k] in one cache of 32k rows, Hq=32, Hkv=8, one query
each, window 256, round(7% * Hq) query heads All per sequence at random. Two layouts: keys at
the start of each row (cache_seqlens) and at its end (cache_leftpad). Dense SDPA: the faster of
one masked padded batch and one call per sequence over its own keys (views, no mask). The bound
of the routing: dense bytes read / AHA bytes read, where a (sequence, kv head) reads its whole
cache when any of its query heads is All, else ``window`` keys.

    python benchmarks/ragged_decode_probe.py [--d 64] [--repeats 15] [--backends cpu torch]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import aha


def timed(fns: dict, repeats: int, stat=statistics.median) -> dict:
    """Median (or ``stat``) seconds of each fn, the fns interleaved round by round after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: stat(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache", type=int, default=1 << 15)
    ap.add_argument("--shortest", type=int, default=1 << 14)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--share", type=float, default=0.07)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--min", action="store_true", help="the fastest repeat instead of the median (a loaded machine)")
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b, n, hq, hkv, d, w = args.batch, args.cache, args.hq, args.hkv, args.d, args.window
    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.shortest, n + 1, (b,), generator=gen)
    k, v = (torch.randn(b, hkv, n, d, generator=gen) for _ in range(2))
    q = torch.randn(b, hq, 1, d, generator=gen)
    gate = torch.zeros(b, hq, 1, dtype=torch.bool)
    for row in range(b):
        gate[row, torch.randperm(hq, generator=gen)[: round(args.share * hq)], 0] = True
    full = gate.view(b, hkv, hq // hkv).any(-1)  # (B, Hkv): kv heads read in full
    per = lens[:, None].expand(b, hkv)
    dense_keys = int(per.sum())
    aha_keys = int(torch.where(full, per, per.clamp(max=w)).sum())
    bound = dense_keys / aha_keys
    print(f"threads {torch.get_num_threads()}  B {b}  lengths {lens.tolist()}  Hq {hq} Hkv {hkv} D {d} window {w}")
    print(f"kv heads read in full: {int(full.sum())} of {full.numel()}  memory bound {bound:.2f}x", flush=True)

    for layout in ("seqlens", "leftpad"):
        if layout == "seqlens":
            lo, hi = torch.zeros_like(lens), lens
            kw = {"cache_seqlens": lens}
        else:
            lo, hi = n - lens, torch.full_like(lens, n)
            kw = {"cache_leftpad": lo}
        spans = list(zip(lo.tolist(), hi.tolist()))
        mask = (torch.arange(n) >= lo[:, None]) & (torch.arange(n) < hi[:, None])  # (B, Nk)
        mask = mask[:, None, None, :]  # (B, 1, 1, Nk)

        def padded(mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        def each(spans=spans):
            for row, (a, e) in enumerate(spans):
                F.scaled_dot_product_attention(
                    q[row : row + 1], k[row : row + 1, :, a:e], v[row : row + 1, :, a:e], enable_gqa=True
                )

        fns = {"dense padded": padded, "dense each": each}
        for name in args.backends:
            fns[name] = lambda name=name, kw=kw: aha.attention(q, k, v, gate, window=w, backend=name, **kw)
        outs = [aha.attention(q, k, v, gate, window=w, backend=name, **kw) for name in args.backends]
        for out in outs[1:]:  # the backends agree
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
        t = timed(fns, args.repeats, min if args.min else statistics.median)
        dense = min(t["dense padded"], t["dense each"])
        line = f"{layout:8s} dense padded {t['dense padded'] * 1e3:7.2f} ms  dense each {t['dense each'] * 1e3:7.2f} ms"
        for name in args.backends:
            ratio = dense / t[name]
            line += f"  | {name} {t[name] * 1e3:6.2f} ms {ratio:.2f}x = {ratio / bound:.2f} of bound"
        print(line, flush=True)


if __name__ == "__main__":
    main()
