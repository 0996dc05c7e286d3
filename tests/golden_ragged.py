"""Golden float64 vectors for ragged batches, from an implementation that shares nothing with aha.

    python tests/golden_ragged.py     # rewrite src/aha/testing/vectors/ragged_golden.npz and ragged_cases.json

Each case is computed densely: for every query, a mask over all Nk keys of what each branch
reads, written from the spec's words (docs/spec.md, "Ragged batches"); a float64 softmax over
the masked scores; the gate's mix; and gradients by torch autograd. Nothing of aha is imported,
so the reference (a loop over queries and slices, per sequence) is checked against a second,
independent reading of the spec. tests/test_reference.py checks the reference against the
stored vectors and that this script still makes them.

The rules it encodes:
- packed (cu_seqlens_q, cu_seqlens_k; B = 1): query i of sequence s (of lq queries and lk keys)
  sits at position lk - lq + i of its sequence; All reads the sequence's keys 0..pos, Here the
  last `window` of those; no key of another sequence.
- padded (cache_leftpad lp, cache_seqlens L, default Nk): row b's query i sits at key index
  L[b] - Nq + i; All reads keys lp[b]..that index, Here the last `window` of those; a query
  whose index is below lp[b] reads nothing: output 0, no gradient.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "src" / "aha" / "testing" / "vectors"
NPZ, JSON = "ragged_golden.npz", "ragged_cases.json"

CASES = [
    # packed: lens_q[s] queries and lens_k[s] keys per sequence
    dict(name="packed_self", Hq=2, Hkv=1, D=16, window=3, gate="random", lens_q=[5, 1, 7], lens_k=[5, 1, 7], seed=1),
    dict(name="packed_cross_gqa", Hq=4, Hkv=2, D=16, window=2, gate="soft", lens_q=[2, 0, 3, 1], lens_k=[6, 4, 3, 5], seed=2),
    dict(name="packed_empty_wide_window", Hq=2, Hkv=2, D=16, window=16, gate="random", lens_q=[4, 0, 9], lens_k=[4, 0, 9], seed=3),
    dict(name="packed_one_sequence", Hq=3, Hkv=1, D=16, window=4, gate="here", lens_q=[11], lens_k=[11], seed=4),
    dict(name="packed_window_one", Hq=2, Hkv=1, D=16, window=1, gate="soft", lens_q=[3, 2, 1, 4], lens_k=[3, 2, 1, 4], seed=5),
    dict(name="packed_all", Hq=2, Hkv=1, D=16, window=2, gate="all", lens_q=[1, 6, 3], lens_k=[4, 6, 8], seed=6),
    # padded: B rows, Nq queries, Nk keys; cache_leftpad and maybe cache_seqlens
    dict(name="leftpad", B=3, Hq=2, Hkv=1, Nq=7, Nk=7, D=16, window=3, gate="random", leftpad=[0, 3, 7], seed=7),
    dict(name="leftpad_wide_window", B=2, Hq=2, Hkv=1, Nq=9, Nk=9, D=16, window=20, gate="random", leftpad=[4, 1], seed=8),
    dict(name="leftpad_seqlens_gqa", B=3, Hq=4, Hkv=2, Nq=4, Nk=10, D=16, window=3, gate="soft", leftpad=[2, 0, 5], seqlens=[9, 10, 7], seed=9),
    dict(name="leftpad_decode", B=2, Hq=2, Hkv=1, Nq=1, Nk=12, D=16, window=4, gate="random", leftpad=[3, 0], seqlens=[12, 8], seed=10),
    dict(name="leftpad_short_rows", B=2, Hq=2, Hkv=2, Nq=4, Nk=6, D=16, window=2, gate="soft", leftpad=[0, 1], seqlens=[2, 3], seed=11),
]


def _cumsum(lens) -> list[int]:
    return [0] + np.cumsum(lens).tolist()


def shapes(c: dict) -> tuple[int, int, int]:
    """(B, Nq, Nk) of a case."""
    if "lens_q" in c:
        return 1, sum(c["lens_q"]), sum(c["lens_k"])
    return c["B"], c["Nq"], c["Nk"]


def masks(c: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([B, Nq, Nk] keys All reads, [B, Nq, Nk] keys Here reads, [B, Nq] the query reads any key)."""
    b, nq, nk = shapes(c)
    w = c["window"]
    read_all, read_here = np.zeros((b, nq, nk), bool), np.zeros((b, nq, nk), bool)
    if "lens_q" in c:
        cq, ck = _cumsum(c["lens_q"]), _cumsum(c["lens_k"])
        for s, (lq, lk) in enumerate(zip(c["lens_q"], c["lens_k"])):
            for i in range(lq):
                pos = lk - lq + i  # within the sequence
                for j in range(lk):
                    read_all[0, cq[s] + i, ck[s] + j] = j <= pos
                    read_here[0, cq[s] + i, ck[s] + j] = pos - w < j <= pos
    else:
        seqlens = c.get("seqlens", [nk] * b)
        for r in range(b):
            for i in range(nq):
                at = seqlens[r] - nq + i  # key index of the query
                for j in range(nk):
                    read_all[r, i, j] = c["leftpad"][r] <= j <= at
                    read_here[r, i, j] = c["leftpad"][r] <= j <= at and at - w < j
    return read_all, read_here, read_all.any(-1)


def inputs(c: dict) -> dict:
    b, nq, nk = shapes(c)
    rng = np.random.default_rng(c["seed"])
    q = rng.standard_normal((b, c["Hq"], nq, c["D"]))
    k, v = rng.standard_normal((b, c["Hkv"], nk, c["D"])), rng.standard_normal((b, c["Hkv"], nk, c["D"]))
    dout = rng.standard_normal((b, c["Hq"], nq, c["D"]))
    u = rng.uniform(size=(b, c["Hq"], nq))
    gate = {"all": np.ones_like(u), "here": np.zeros_like(u), "random": (u < 0.4).astype(float), "soft": u}[c["gate"]]
    return dict(q=q, k=k, v=v, gate=gate, dout=dout)


def compute(c: dict) -> dict:
    """Inputs, ragged arguments, out and (dq, dk, dv, dgate) of sum(dout * out), all float64."""
    x = inputs(c)
    read_all, read_here, real = (torch.from_numpy(m) for m in masks(c))
    q, k, v, g = (torch.from_numpy(x[n]).requires_grad_(True) for n in ("q", "k", "v", "gate"))
    group = c["Hq"] // c["Hkv"]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, Hq, Nk, D)
    scores = (q @ kk.transpose(-1, -2)) / c["D"] ** 0.5  # (B, Hq, Nq, Nk)
    first = torch.arange(scores.shape[-1]) == 0
    dummy = ~real[..., None] & first  # a padding query's row needs one key for a finite softmax; its output is dropped

    def branch(read):
        p = torch.softmax(scores.masked_fill(~(read | dummy)[:, None], float("-inf")), dim=-1)
        return p @ vv

    mixed = g[..., None] * branch(read_all) + (1 - g[..., None]) * branch(read_here)
    out = torch.where(real[:, None, :, None], mixed, torch.zeros((), dtype=torch.float64))
    grads = torch.autograd.grad(out, (q, k, v, g), torch.from_numpy(x["dout"]))
    res = dict(x, window=np.array(c["window"]), out=out.detach().numpy())
    res.update({n: d.numpy() for n, d in zip(("dq", "dk", "dv", "dgate"), grads)})
    if "lens_q" in c:
        res["cu_seqlens_q"] = np.array(_cumsum(c["lens_q"]), np.int32)
        res["cu_seqlens_k"] = np.array(_cumsum(c["lens_k"]), np.int32)
    else:
        res["cache_leftpad"] = np.array(c["leftpad"], np.int32)
        if "seqlens" in c:
            res["cache_seqlens"] = np.array(c["seqlens"], np.int32)
    return res


def describe(c: dict) -> dict:
    b, nq, nk = shapes(c)
    return dict(c, B=b, Nq=nq, Nk=nk, kind="packed" if "lens_q" in c else "padded")


def write(out: Path = OUT) -> None:
    arrays = {f"{c['name']}/{key}": val for c in CASES for key, val in compute(c).items()}
    np.savez_compressed(out / NPZ, **arrays)
    (out / JSON).write_text(json.dumps([describe(c) for c in CASES], indent=1) + "\n")


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if sys.argv[1:] else OUT
    write(folder)
    print(f"wrote {len(CASES)} cases to {folder / NPZ} and {folder / JSON}")
