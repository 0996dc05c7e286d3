"""``python -m aha demo``: one routed input through every available backend.

A random router (a linear map of a random layer input, biased so that about
``all_share`` of the token-head decisions go All) feeds aha.attention on each
backend. The demo checks that every backend agrees with the float64 reference
on a slice of the heads, and times each against dense causal SDPA.
"""

from __future__ import annotations

import math
import statistics
import time


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _routed_problem(n: int, all_share: float, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    b, h, d, model = 1, 8, 64, 256
    x = torch.randn(b, n, model, generator=gen)  # (B, N, C) layer input
    w_router = torch.randn(model, h, generator=gen) / math.sqrt(model)
    bias = statistics.NormalDist().inv_cdf(all_share)  # logits ~ N(bias, 1): P(logit > 0) = all_share
    logits = (x @ w_router + bias).transpose(1, 2)  # (B, H, N)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    return q, k, v, logits


def run_demo(n: int = 2048, window: int = 128, all_share: float = 0.1) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import aha
    from aha import reference

    q, k, v, logits = _routed_problem(n, all_share)
    gate = aha.route(logits)  # (B, H, N), 1 = All
    print(f"AHA demo: B=1 H=8 N={n} D=64 window={window}")
    print(f"router: {100 * float(gate.mean()):.1f}% of token-head decisions go All, the rest Here")
    heads = slice(0, 1)  # the float64 reference checks one head (it loops in Python)
    ref = reference.attention(*(t[:, heads].double().numpy() for t in (q, k, v, gate)), window)
    dense = _median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"{'backend':<11} {'status':<12} {'max |err| vs reference':>24} {'time':>10} {'dense/time':>14}")
    print("(dense/time: dense causal SDPA's time over the backend's; higher is faster)")
    print(f"{'dense SDPA':<11} {'(baseline)':<12} {'-':>24} {dense * 1e3:>8.1f}ms {'1.00x':>14}")
    ok = True
    for row in aha.backends():
        if row.status != "available" or "torch" not in row.backend.capabilities.arrays:
            print(f"{row.name:<11} {row.status:<12} {row.reason or ''}")
            continue
        try:
            run = _demo_inputs(row, q, k, v, gate, heads)
        except aha.BackendError as exc:
            print(f"{row.name:<11} {'skipped':<12} {exc}")
            continue
        out = aha.attention(*run, window=window, backend=row.name)
        err = float(np.abs(out[:, heads].double().cpu().numpy() - ref).max())
        good = err < (1e-4 if out.dtype == torch.float32 else 5e-2)
        ok &= good
        if row.name == "reference":  # one head, in a Python loop: not timed; it is what the others are checked against
            print(f"{row.name:<11} {'ok' if good else 'MISMATCH':<12} {'(the reference)':>24} {'-':>10} {'(not timed)':>14}")
            continue
        t = _median_time(lambda run=run, name=row.name: aha.attention(*run, window=window, backend=name))
        print(f"{row.name:<11} {'ok' if good else 'MISMATCH':<12} {err:>24.2e} {t * 1e3:>8.1f}ms {dense / t:>13.2f}x")
    print("all backends agree with the reference" if ok else "some backend disagrees with the reference")
    return 0 if ok else 1


def _demo_inputs(row, q, k, v, gate, heads):
    """The inputs a backend gets in the demo: the reference only sees the checked heads."""
    import torch

    caps = row.backend.capabilities
    device = "cuda" if ("cuda" in caps.devices or "*" in caps.devices) and torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if "float32" in caps.dtypes else torch.bfloat16
    tensors = [t[:, heads] if row.name == "reference" else t for t in (q, k, v, gate)]
    tensors = [t.to(device, dtype) for t in tensors]
    import aha

    aha.select(*tensors, window=1, backend=row.name)  # raises BackendError if it cannot serve these
    return tensors
