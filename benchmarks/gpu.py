"""The first GPU run of the triton backend in one offline command: correctness first, then speed.

    python3 benchmarks/gpu.py                       # the plan, most important first, within --budget-s (480 s)
    python3 benchmarks/gpu.py --dry-run             # the same plan on the CPU (TRITON_INTERPRET=1), tiny sizes
    python3 benchmarks/gpu.py --aot                 # compile every kernel variant for sm_90 offline: resources
    python3 benchmarks/gpu.py --render RESULT.json  # the Markdown of a result for docs/benchmarks-gpu.md

Needs a checkout of this repository and torch, triton, numpy, pluggy (pytest and hypothesis for the
test steps): nothing is installed, nothing is downloaded, no build backend is needed. The script puts
the checkout's src/ and backends/ first on sys.path and writes the distribution's metadata (its entry
points, read from pyproject.toml) to a temporary folder on the path, so that the registry finds the
built-in backends and pytest the aha plugin exactly as after ``pip install``; subprocesses get the
same PYTHONPATH. It runs on Python 3.10 to 3.13.

The plan (``plan``), most important first; a step starts only while budget is left:
1. CUDA correctness, forward and backward (routed and with gate grads) against the float64 reference
   for float16, bfloat16 and float32 at small sizes: float16/bfloat16 may be off by at most twice the
   error of an eager computation in the same dtype plus a rounding floor (aha.testing.checks).
2. Forward at N=32k, 7 % All, against dense causal flash SDPA (bf16, D=128; Hq=Hkv=16 as AHA-OLMo2,
   and Hq=32/Hkv=8); then forward+backward, with gate grads too; 100 % All; N=4k and 16k.
3. Decode (Nq=1 against a 32k cache): correctness, then speed as a fraction of the memory bound.
4. The rest: ragged batches, other All shares and lengths, the deterministic backward,
   FlexAttention, a tile sweep, tests/test_triton_backend.py and the conformance suite on CUDA.
The JSON is written after every step; a step that fails (out of memory, compile error, wrong
result) is recorded with its error and the plan goes on. Each figure is printed as measured.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FWD_BWD = 3.5  # forward + backward FLOPs over forward FLOPs (backward: 5 matmuls to the forward's 2)
SMEM_LIMIT = 232_448  # bytes of shared memory per block on H100/H200 (227 KiB)


# ---------------------------------------------------------------------------------------------
# Offline bootstrap: this checkout's package and entry points, without installing anything


def pyproject_metadata(text: str) -> tuple[str, str, dict[str, dict[str, str]]]:
    """Name, version and entry points (group -> name -> target) of a pyproject.toml's [project] table.

    A small reader of the few keys needed (tomllib is not in Python 3.10): ``[project]`` name and
    version, ``[project.scripts]`` (as console_scripts) and ``[project.entry-points.GROUP]``.
    """
    name = version = ""
    groups: dict[str, dict[str, str]] = {}
    table = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith('"') else line.strip()
        if not line:
            continue
        header = re.fullmatch(r"\[([^\[\]]+)\]", line)
        if header:
            table = header.group(1).strip()
            if table == "project.scripts":
                table = "project.entry-points.console_scripts"
            continue
        pair = re.fullmatch(r'"?([\w.\-]+)"?\s*=\s*"([^"]*)"', line)
        if not pair:
            continue
        key, value = pair.groups()
        if table == "project" and key in ("name", "version"):
            name, version = (value, version) if key == "name" else (name, value)
        elif table and table.startswith("project.entry-points."):
            groups.setdefault(table.removeprefix("project.entry-points.").strip('"'), {})[key] = value
    return name, version, groups


def bootstrap(root: Path = ROOT) -> dict:
    """Make this checkout's ``aha`` and its built-in backends importable as if installed.

    Puts a folder with the distribution's metadata (``<name>-<version>.dist-info``: METADATA and
    entry_points.txt), then src/ and backends/, first on sys.path. importlib.metadata yields one
    distribution per name, the first on the path, so this checkout's entry points win over any
    installed copy. Returns the environment for subprocesses (the same folders first on PYTHONPATH).
    """
    name, version, groups = pyproject_metadata((root / "pyproject.toml").read_text())
    meta = Path(tempfile.mkdtemp(prefix="aha-offline-"))
    atexit.register(shutil.rmtree, meta, True)
    info = meta / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items())
    )
    paths = [str(meta), str(root / "src"), str(root / "backends")]
    sys.path[:0] = paths
    import importlib

    importlib.invalidate_caches()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ---------------------------------------------------------------------------------------------
# Sizes: the GPU run and the dry run share the plan, not the sizes


@dataclass(frozen=True)
class Sizes:
    device: str
    dry: bool
    d: int  # head dim of the speed steps
    window: int
    heads: tuple  # (Hq, Hkv) configurations of the speed steps: AHA-OLMo2 and a GQA model
    long: int  # "32k"
    short: tuple  # "4k", "16k"
    longer: tuple  # "64k", "128k"
    decode_len: int
    decode_batch: int
    small: tuple  # correctness problem: B, Hq, Hkv, N, D, window
    sweep_len: int


GPU = Sizes("cuda", False, 128, 256, ((16, 16), (32, 8)), 32768, (4096, 16384), (65536, 131072), 32768, 8,
            (2, 4, 2, 300, 128, 64), 32768)
# the dry run: every step of the plan (the same count, in the same order) at sizes the interpreter runs in seconds
DRY = Sizes("cpu", True, 16, 8, ((2, 2), (4, 2)), 96, (48, 64), (112, 128), 80, 2, (1, 4, 2, 40, 16, 8), 64)


class Wrong(AssertionError):
    """A result off the reference: the figures measured so far, and what was wrong."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


class Skip(Exception):
    """A step that does not apply here (recorded as skipped, with the reason)."""


# ---------------------------------------------------------------------------------------------
# Timing and inputs


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, s: Sizes, grads=()) -> float:
    """Median milliseconds of fn: triton.testing.do_bench on CUDA (L2 flushed, grads reset between
    runs); in a dry run one call (the figure only shows that the step ran: interpreted kernels)."""
    if not s.dry:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads) or None, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _inputs(s: Sizes, b, hq, hkv, nq, nk, d, dtype, share, seed=0, float_gate=False):
    """q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D], gate [B, Hq, Nq] (All at random with probability share), dout."""
    import torch

    gen = torch.Generator(device=s.device).manual_seed(seed)
    q = torch.randn(b, hq, nq, d, device=s.device, dtype=dtype, generator=gen)
    k, v = (torch.randn(b, hkv, nk, d, device=s.device, dtype=dtype, generator=gen) for _ in range(2))
    gate = torch.rand(b, hq, nq, device=s.device, generator=gen) < share
    dout = torch.randn(b, hq, nq, d, device=s.device, dtype=dtype, generator=gen)
    return q, k, v, (gate.to(dtype) if float_gate else gate), dout


def _keys_read(gate, nq: int, nk: int, window: int):
    """[B, Hq, Nq] float64: the keys each query reads (All: every causal key, Here: its window)."""
    import torch

    from aha.window import keys_read

    pos = torch.arange(nk - nq, nk, device=gate.device, dtype=torch.float64)
    return keys_read(pos, gate.double(), window)


_DENSE_NEEDS_EXPAND = {}


def dense_attention(q, k, v, causal=True):
    """Dense SDPA, the flash backend on CUDA (GQA through enable_gqa, else k/v expanded)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(q, k, v, gqa):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cuda":
        return call(q, k, v, gqa)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if gqa and not _DENSE_NEEDS_EXPAND.get("flash"):
            try:
                return call(q, k, v, True)
            except RuntimeError:
                _DENSE_NEEDS_EXPAND["flash"] = True
        if gqa:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return call(q, k, v, False)


def _aha(q, k, v, gate, window, **kw):
    import aha

    return aha.attention(q, k, v, gate, window=window, backend="triton", **kw)


def _fwd_bwd(attend, q, k, v, dout, extra=()):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)] + list(extra)

    def step():
        attend(*leaves[:3]).backward(dout)

    return step, leaves


# ---------------------------------------------------------------------------------------------
# Steps: each returns a dict of figures, raises Wrong (with figures) or Skip


def correctness(s: Sizes, dtype_name: str, mode: str, ragged: str | None = None) -> dict:
    """Forward and backward against the float64 reference; float16/bfloat16 by the same-dtype baseline rule.

    mode: routed (a 0/1 gate without grad: one branch per token) or gate-grad (both branches, dgate).
    ragged: None, "leftpad" (cache_seqlens and cache_leftpad) or "packed" (cu_seqlens_q/_k).
    """
    import numpy as np
    import torch

    from aha import reference
    from aha.sequences import segments
    from aha.testing import checks

    dtype = getattr(torch, dtype_name)
    b, hq, hkv, n, d, window = s.small
    rag, nq = {}, n
    if ragged == "leftpad":
        b, nq = 3, max(4, n // 4)
        rag = {"cache_seqlens": [n, n - 3, n // 2], "cache_leftpad": [0, n // 3, n // 2 - nq + 2]}
    elif ragged == "packed":
        b, cut = 1, [0, n // 3, n // 3 + 1, n]
        rag = {"cu_seqlens_q": cut, "cu_seqlens_k": cut}
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype_name} {mode} {ragged}".encode()))
    q = torch.randn(b, hq, nq, d, generator=gen)
    k, v = (torch.randn(b, hkv, n, d, generator=gen) for _ in range(2))
    dout = torch.randn(b, hq, nq, d, generator=gen)
    gate = (torch.rand(b, hq, nq, generator=gen) < 0.3).double()
    q, k, v, gate, dout = (x.to(s.device, dtype) for x in (q, k, v, gate, dout))
    rag_t = {key: torch.tensor(val, dtype=torch.int32, device=s.device) for key, val in rag.items()}
    rag_np = {key: np.asarray(val) for key, val in rag.items()}
    pieces = segments(b, nq, n, **rag) if rag else None

    def grads_of(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        g = gate.detach().clone().requires_grad_(mode == "gate-grad")
        out = fn(*leaves, g)
        return (out, *torch.autograd.grad(out, leaves + ([g] if mode == "gate-grad" else []), dout))

    got = grads_of(lambda q, k, v, g: _aha(q, k, v, g, window, **rag_t))
    args = [checks.to_np(x) for x in (q, k, v, gate)]
    want = (reference.attention(*args, window, **rag_np), *reference.attention_vjp(*args, window, checks.to_np(dout), **rag_np))
    low = dtype_name in checks.FLOOR
    base = grads_of(lambda q, k, v, g: checks.eager_attention(q, k, v, g, window, pieces=pieces)) if low else [None] * 5
    figures, wrong = {"dtype": dtype_name, "mode": mode, "ragged": ragged, "shape_q": list(q.shape),
                      "shape_k": list(k.shape), "window": window}, []
    for name, got_x, want_x, base_x in zip(("out", "dq", "dk", "dv", "dgate"), got, want, base):
        kind = "forward" if name == "out" else "gradient"
        scale = max(1.0, float(np.abs(want_x).max()))
        err = float(np.abs(checks.to_np(got_x) - want_x).max()) / scale
        allowed = checks.allowed_error(dtype_name, kind, want_x, base_x)
        figures[f"{name}_err"], figures[f"{name}_allowed"] = err, allowed
        if not np.array_equal(np.isfinite(checks.to_np(got_x)), np.isfinite(want_x)) or not err <= allowed:
            wrong.append(f"{name} error {err:.3g} > allowed {allowed:.3g}")
    if wrong:
        raise Wrong(f"{dtype_name} {mode} {ragged or ''}: " + "; ".join(wrong), figures)
    return figures


def decode_correctness(s: Sizes, dtype_name: str) -> dict:
    """Decode steps (Nq = 1 and a 4-token chunk) against the reference, with cache_seqlens and cache_leftpad."""
    import numpy as np
    import torch

    from aha import reference
    from aha.sequences import segments
    from aha.testing import checks

    dtype = getattr(torch, dtype_name)
    _, hq, hkv, n, d, window = s.small
    figures, wrong = {"dtype": dtype_name}, []
    for nq in (1, 4):
        for gate_kind in ("hard", "soft"):
            b = 3
            rag = {"cache_seqlens": [n, n - 5, window + 2], "cache_leftpad": [0, 3, 1]}
            gen = torch.Generator().manual_seed(nq)
            q = torch.randn(b, hq, nq, d, generator=gen)
            k, v = (torch.randn(b, hkv, n, d, generator=gen) for _ in range(2))
            u = torch.rand(b, hq, nq, generator=gen)
            gate = (u < 0.3).double() if gate_kind == "hard" else u.double()
            q, k, v, gate = (x.to(s.device, dtype) for x in (q, k, v, gate))
            rag_t = {key: torch.tensor(val, dtype=torch.int32, device=s.device) for key, val in rag.items()}
            out = _aha(q, k, v, gate, window, **rag_t)
            want = reference.attention(*(checks.to_np(x) for x in (q, k, v, gate)), window,
                                       **{key: np.asarray(val) for key, val in rag.items()})
            base = None
            if dtype_name in checks.FLOOR:
                base = checks.eager_attention(q, k, v, gate, window, pieces=segments(b, nq, n, **rag))
            err = float(np.abs(checks.to_np(out) - want).max()) / max(1.0, float(np.abs(want).max()))
            allowed = checks.allowed_error(dtype_name, "forward", want, base)
            figures[f"nq{nq}_{gate_kind}_err"], figures[f"nq{nq}_{gate_kind}_allowed"] = err, allowed
            if not err <= allowed:
                wrong.append(f"Nq={nq} {gate_kind} gate: error {err:.3g} > allowed {allowed:.3g}")
    if wrong:
        raise Wrong("; ".join(wrong), figures)
    return figures


_DENSE_CACHE: dict = {}


def _dense_ms(s: Sizes, hq: int, hkv: int, n: int, kind: str) -> float:
    """Dense causal flash SDPA at (Hq, Hkv, N): forward or forward+backward ms (measured once per run)."""
    import torch

    key = (hq, hkv, n, kind)
    if key not in _DENSE_CACHE:
        q, k, v, _, dout = _inputs(s, 1, hq, hkv, n, n, s.d, torch.bfloat16, 0.0)
        if kind == "fwd":
            _DENSE_CACHE[key] = timed_ms(lambda: dense_attention(q, k, v), s)
        else:
            step, leaves = _fwd_bwd(dense_attention, q, k, v, dout)
            _DENSE_CACHE[key] = timed_ms(step, s, leaves)
        del q, k, v, dout
    return _DENSE_CACHE[key]


def speed(s: Sizes, n: int, share: float, hq: int, hkv: int, kind: str) -> dict:
    """AHA against dense causal flash SDPA at one point: kind fwd, fwd_bwd (routed: q, k, v grads),
    fwd_bwd_gate (gate grads too) or fwd_bwd_deterministic (the dq pass instead of atomics).
    TFLOP/s count the query-key pairs each method reads: 4 D FLOPs each forward, FWD_BWD times that."""
    import torch

    q, k, v, gate, dout = _inputs(s, 1, hq, hkv, n, n, s.d, torch.bfloat16, share, float_gate=kind == "fwd_bwd_gate")
    useful = float(4 * s.d * _keys_read(gate, n, n, s.window).sum())
    dense_flops = 4 * s.d * n * (n + 1) / 2 * hq
    figures = {"N": n, "all_share": share, "Hq": hq, "Hkv": hkv, "D": s.d, "window": s.window,
               "measured_all_share": float(gate.double().mean())}
    if kind == "fwd":
        with torch.no_grad():
            ms = timed_ms(lambda: _aha(q, k, v, gate, s.window), s)
    elif kind == "fwd_bwd_deterministic":
        from aha_triton.ops import attention as direct

        step, leaves = _fwd_bwd(lambda q, k, v: direct(q, k, v, gate, window=s.window, deterministic=True), q, k, v, dout)
        ms = timed_ms(step, s, leaves)
    else:
        g = gate.requires_grad_(True) if kind == "fwd_bwd_gate" else gate
        step, leaves = _fwd_bwd(lambda q, k, v: _aha(q, k, v, g, s.window), q, k, v, dout, [g] if g.requires_grad else [])
        ms = timed_ms(step, s, leaves)
    base = "fwd" if kind == "fwd" else "fwd_bwd"
    dense = _dense_ms(s, hq, hkv, n, base)
    factor = 1.0 if kind == "fwd" else FWD_BWD
    figures.update({"aha_ms": ms, "dense_ms": dense, "speedup_vs_dense": dense / ms,
                    "ideal_speedup": dense_flops / useful, "aha_tflops_useful": factor * useful / ms / 1e9,
                    "dense_tflops": factor * dense_flops / dense / 1e9})
    figures["tflops_over_dense"] = figures["aha_tflops_useful"] / figures["dense_tflops"]
    return figures


def decode_speed(s: Sizes, share: float, hq: int, hkv: int) -> dict:
    """One decode step (Nq = 1, bool gate) against a full cache of decode_len keys, against dense SDPA
    decode. The memory bound of the routing: a kv head's whole cache is read when any of its query heads
    is All, its last ``window`` keys otherwise; bytes over dense SDPA's achieved bandwidth."""
    import torch

    b, n = s.decode_batch, s.decode_len
    q, k, v, gate, _ = _inputs(s, b, hq, hkv, 1, n, s.d, torch.bfloat16, share, seed=1)
    with torch.no_grad():
        ms = timed_ms(lambda: _aha(q, k, v, gate, s.window), s)
        dense = timed_ms(lambda: dense_attention(q, k, v, causal=False), s)
    full = gate.view(b, hkv, hq // hkv).any(-1)  # (B, Hkv): kv heads read whole
    per_key = 2 * s.d * k.element_size()  # k and v
    bytes_aha = float((full * n + ~full * min(s.window, n)).sum()) * per_key
    bytes_dense = b * hkv * n * per_key
    bandwidth = bytes_dense / (dense / 1e3)  # bytes/s that dense SDPA achieves
    bound_ms = bytes_aha / bandwidth * 1e3
    return {"batch": b, "cache_len": n, "all_share": share, "Hq": hq, "Hkv": hkv, "D": s.d,
            "kv_heads_read_whole": float(full.double().mean()), "aha_ms": ms, "dense_ms": dense,
            "speedup_vs_dense": dense / ms, "ideal_speedup": bytes_dense / bytes_aha,
            "dense_gbps": bandwidth / 1e9, "aha_gbps": bytes_aha / (ms / 1e3) / 1e9,
            "fraction_of_bound": bound_ms / ms}


FLEX_BLOCK = 128  # FlexAttention's block size (create_block_mask's default)


def flex_bytes(n: int, hq: int, hkv: int, d: int, compiled: bool, backward: bool) -> int:
    """Bytes a FlexAttention step needs at N beyond what it frees: bf16 q, k, v, out (and dout, grads) and the
    block mask. An eager create_block_mask holds the whole [1, Hq, N, N] bool mask twice (padded to whole
    blocks) and the mask_mod's [N, N] temporaries (q_idx - kv_idx in int64); a compiled one only the
    block-level tensors (kv and q indices, full and partial, int32)."""
    blocks = -(-n // FLEX_BLOCK)
    tensors = 2 * n * d * (2 * hq + 2 * hkv) * (2 if backward else 1)
    block_mask = 4 * 4 * hq * blocks * (blocks + 1)
    mask = 0 if compiled else 2 * hq * n * n + 16 * n * n
    return tensors + block_mask + mask


def free_bytes(device: str) -> int | None:
    """Memory free for a step on ``device`` (None: unknown)."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def flex(s: Sizes, n: int, share: float, hq: int, hkv: int, kind: str) -> dict:
    """FlexAttention with AHA's mask (causal and (All or within the window)), its block mask built by a
    compiled create_block_mask on CUDA (no [N, N] mask in memory; eager on tiny dry-run sizes). Recorded as
    skipped, before anything is allocated, where its estimated memory (flex_bytes) exceeds what is free, and
    where it runs out of memory all the same."""
    import torch

    need, free = flex_bytes(n, hq, hkv, s.d, not s.dry, kind != "fwd"), free_bytes(s.device)
    if free is not None and need > 0.9 * free:
        raise Skip(f"FlexAttention does not fit at N={n}: needs about {need / 2**30:.1f} GiB, "
                   f"{free / 2**30:.1f} GiB free")
    try:
        return _flex(s, n, share, hq, hkv, kind)
    except torch.OutOfMemoryError as exc:
        reason = f"FlexAttention ran out of memory at N={n}: {str(exc)[:300]}"
    release()  # out of the except block: the traceback no longer holds the step's tensors
    raise Skip(reason)


def _flex(s: Sizes, n: int, share: float, hq: int, hkv: int, kind: str) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, gate, dout = _inputs(s, 1, hq, hkv, n, n, s.d, torch.bfloat16, share)
    window = s.window

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (gate[b, h, q_idx] | (q_idx - kv_idx < window))

    start = time.perf_counter()
    make_mask = create_block_mask if s.dry else torch.compile(create_block_mask)
    block_mask = make_mask(mask_mod, 1, hq, n, n, device=s.device, BLOCK_SIZE=FLEX_BLOCK)
    _sync()
    mask_s = time.perf_counter() - start
    if s.dry:  # eager (unfused) on tiny sizes: compiling would only add minutes
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    attend = flex_attention if s.dry else torch.compile(flex_attention)

    def run(q, k, v):
        return attend(q, k, v, block_mask=block_mask, enable_gqa=hq != hkv)

    figures = {"N": n, "all_share": share, "Hq": hq, "Hkv": hkv, "block_mask_s": mask_s}
    if kind == "fwd":
        with torch.no_grad():
            figures["flex_ms"] = timed_ms(lambda: run(q, k, v), s)
            diff = (run(q, k, v).float() - _aha(q, k, v, gate, window).float()).abs().max()
        figures["max_abs_diff_vs_aha"] = float(diff)
    elif s.dry:
        raise Skip("FlexAttention has no backward on the CPU")
    else:
        step, leaves = _fwd_bwd(run, q, k, v, dout)
        figures["flex_ms"] = timed_ms(step, s, leaves)
    figures["dense_ms"] = _dense_ms(s, hq, hkv, n, "fwd" if kind == "fwd" else "fwd_bwd")
    figures["speedup_vs_dense"] = figures["dense_ms"] / figures["flex_ms"]
    return figures


def tile_sweep(s: Sizes, kernel: str) -> dict:
    """The autotune set of one kernel (fwd, dkdv or decode; bf16 at the speed steps' D) timed at the long
    point, 7 % All, Hq=32/Hkv=8 (decode: one step against the decode cache): ms per candidate, the default
    first."""
    import torch

    from aha_triton import _launch

    hq, hkv = s.heads[-1]
    if kernel == "decode":
        n, nq, b = s.decode_len, 1, s.decode_batch
    else:
        n, nq, b = s.sweep_len, s.sweep_len, 1
    q, k, v, gate, dout = _inputs(s, b, hq, hkv, nq, n, s.d, torch.bfloat16, 0.07)
    rows = {}
    for t in _launch.tile_candidates(kernel, torch.bfloat16, s.d):
        label = f"{t.m}x{t.n} w{t.warps} s{t.stages}"
        try:
            with _launch.tiles(**{kernel: t}):
                if kernel == "dkdv":
                    step, leaves = _fwd_bwd(lambda q, k, v: _aha(q, k, v, gate, s.window), q, k, v, dout)
                    rows[label] = timed_ms(step, s, leaves)
                else:
                    with torch.no_grad():
                        rows[label] = timed_ms(lambda: _aha(q, k, v, gate, s.window), s)
        except Exception as exc:  # a candidate that does not launch is a figure too
            rows[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"    {kernel} {label}: {rows[label]}", flush=True)
    figures = {"N": n, "Nq": nq, "batch": b, "Hq": hq, "Hkv": hkv, "kernel": kernel, "ms": rows}
    if not any(isinstance(ms, float) for ms in rows.values()):
        raise Wrong(f"no {kernel} tile of the autotune set launched", figures)
    return figures


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run this backend's kernels here (None: it can), from one tiny call.

    Triton 3.6.0's interpreter turns a scalar computed in a kernel (a loop bound) into a Python int with
    int() of a 1-element array, which numpy 2.4 refuses: every kernel with a loop over key blocks fails
    (numpy 2.4.6; with numpy 2.3.5 the whole dry run passes, and triton 3.9.0's interpreter runs it with
    either). Compiled kernels are not affected."""
    import numpy as np
    import torch
    import triton

    q, k, v = (torch.randn(1, 1, 2, 16) for _ in range(3))
    try:
        _aha(q, k, v, torch.tensor([[[True, False]]]), 1)
    except Exception as exc:  # the interpreter wraps the kernel's error
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        hint = ""
        if "only 0-dimensional arrays" in str(cause):
            hint = (" (a Triton interpreter bug with numpy >= 2.4): use numpy < 2.4 with this Triton, or Triton 3.9; "
                    "a GPU run compiles the kernels and is not affected")
        return (f"Triton {triton.__version__}'s interpreter cannot run the triton backend's kernels with numpy "
                f"{np.__version__}: {type(cause).__name__}: {cause}{hint}")
    return None


# a dry run checks that pytest and its aha plugin start offline, on a quick test or two
_DRY_SELECTION = {"tests": "test_packed_positions_follow_the_sequences or test_capabilities_and_availability",
                  "conformance": "test_golden_vectors"}


def pytest_step(s: Sizes, what: str, budget_left: float) -> dict:
    """tests/test_triton_backend.py or the conformance suite for the triton backend on CUDA, in a subprocess.

    The repository's pytest addopts (which name the aha plugin's Hypothesis profile) are replaced; the
    plugin itself loads from the metadata that ``bootstrap`` wrote. A dry run selects a quick test or two.
    """
    env = dict(os.environ, TRITON_INTERPRET="1" if s.dry else "0", HYPOTHESIS_PROFILE="ci")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--hypothesis-profile=ci"]
    cmd += ([str(ROOT / "tests" / "test_triton_backend.py")] if what == "tests"
            else ["--pyargs", "aha.testing.conformance", "--aha-backend", "triton"])
    if s.dry:
        cmd += ["-k", _DRY_SELECTION[what]]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30.0, budget_left))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise Wrong(f"timed out after {exc.timeout:.0f} s", {"tail": out[-3000:]}) from exc
    lines = [ln for ln in run.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    figures = {"returncode": run.returncode, "summary": lines[-1] if lines else "",
               "tail": (run.stdout + run.stderr)[-3000:]}
    if run.returncode:
        raise Wrong(f"pytest rc={run.returncode}: {figures['summary']}", figures)
    return figures


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Step:
    name: str
    group: str
    fn: Callable[..., dict]
    args: tuple = ()
    wants_budget: bool = field(default=False)


def plan(s: Sizes) -> list[Step]:
    """Every step, most important first."""
    steps = []
    for dtype in ("bfloat16", "float16", "float32"):
        for mode in ("routed", "gate-grad"):
            steps.append(Step(f"correct {dtype} {mode}", "correctness", correctness, (s, dtype, mode)))
    (hq_olmo, hkv_olmo), (hq_gqa, hkv_gqa) = s.heads
    n = s.long
    for hq, hkv in s.heads:
        steps.append(Step(f"fwd N={n} 7% Hq={hq} Hkv={hkv}", "speed", speed, (s, n, 0.07, hq, hkv, "fwd")))
    for hq, hkv in s.heads:
        steps.append(Step(f"fwd+bwd N={n} 7% Hq={hq} Hkv={hkv}", "speed", speed, (s, n, 0.07, hq, hkv, "fwd_bwd")))
    steps.append(Step(f"fwd+bwd gate-grad N={n} 7% Hq={hq_olmo} Hkv={hkv_olmo}", "speed", speed,
                      (s, n, 0.07, hq_olmo, hkv_olmo, "fwd_bwd_gate")))
    for kind in ("fwd", "fwd_bwd", "fwd_bwd_gate"):
        steps.append(Step(f"{kind.replace('_', '+', 1).replace('_', ' ')} N={n} 100% Hq={hq_gqa} Hkv={hkv_gqa}", "speed",
                          speed, (s, n, 1.0, hq_gqa, hkv_gqa, kind)))
    for short in s.short:
        for share in (0.07, 1.0):
            for kind in ("fwd", "fwd_bwd"):
                steps.append(Step(f"{kind.replace('_', '+')} N={short} {share:.0%} Hq={hq_gqa} Hkv={hkv_gqa}", "speed",
                                  speed, (s, short, share, hq_gqa, hkv_gqa, kind)))
    for dtype in ("bfloat16", "float32"):
        steps.append(Step(f"decode correct {dtype}", "correctness", decode_correctness, (s, dtype)))
    for hq, hkv in s.heads:
        steps.append(Step(f"decode L={s.decode_len} 7% Hq={hq} Hkv={hkv}", "decode", decode_speed, (s, 0.07, hq, hkv)))
    # the rest
    for ragged in ("leftpad", "packed"):
        for dtype, mode in (("bfloat16", "routed"), ("float32", "gate-grad")):
            steps.append(Step(f"correct {dtype} {mode} {ragged}", "correctness", correctness, (s, dtype, mode, ragged)))
    steps.append(Step(f"fwd+bwd deterministic N={n} 7% Hq={hq_gqa} Hkv={hkv_gqa}", "speed", speed,
                      (s, n, 0.07, hq_gqa, hkv_gqa, "fwd_bwd_deterministic")))
    for share in (0.0, 0.12):
        steps.append(Step(f"fwd N={n} {share:.0%} Hq={hq_gqa} Hkv={hkv_gqa}", "speed", speed,
                          (s, n, share, hq_gqa, hkv_gqa, "fwd")))
    steps.append(Step(f"decode L={s.decode_len} 100% Hq={hq_gqa} Hkv={hkv_gqa}", "decode", decode_speed,
                      (s, 1.0, hq_gqa, hkv_gqa)))
    for kind in ("fwd", "fwd_bwd"):
        steps.append(Step(f"flex {kind.replace('_', '+')} N={n} 7% Hq={hq_gqa} Hkv={hkv_gqa}", "flex", flex,
                          (s, n, 0.07, hq_gqa, hkv_gqa, kind)))
    for kernel in ("fwd", "dkdv", "decode"):
        steps.append(Step(f"tile sweep {kernel}", "sweep", tile_sweep, (s, kernel)))
    for longer in s.longer:
        for kind in ("fwd", "fwd_bwd"):
            steps.append(Step(f"{kind.replace('_', '+')} N={longer} 7% Hq={hq_gqa} Hkv={hkv_gqa}", "speed", speed,
                              (s, longer, 0.07, hq_gqa, hkv_gqa, kind)))
        steps.append(Step(f"flex fwd N={longer} 7% Hq={hq_gqa} Hkv={hkv_gqa}", "flex", flex,
                          (s, longer, 0.07, hq_gqa, hkv_gqa, "fwd")))
    steps.append(Step("tests/test_triton_backend.py", "tests", pytest_step, (s, "tests"), wants_budget=True))
    steps.append(Step("conformance --backend triton", "tests", pytest_step, (s, "conformance"), wants_budget=True))
    return steps


def goals(points: list[dict], s: Sizes) -> dict:
    """The issue's goals, judged on the points measured (absent when their points were not). A dry run
    fills in the same figures and judges nothing (``met`` is None): its timings mean nothing."""
    out = _goals(points, s)
    if s.dry:
        for goal in out.values():
            goal["met"] = None
    return out


def _met(goal: dict) -> str:
    return {True: "met", False: "NOT MET", None: "not judged (dry run)"}[goal["met"]]


def _goals(points: list[dict], s: Sizes) -> dict:
    ok = [p for p in points if p["status"] == "ok"]

    def at(group, **want):
        return [p for p in ok if p["group"] == group and all(p.get(k) == v for k, v in want.items())]

    out = {}
    fwd7 = [p for p in at("speed", N=s.long, all_share=0.07) if p["name"].startswith("fwd ")]
    if fwd7:
        worst = min(p["speedup_vs_dense"] for p in fwd7)
        out["fwd_5x_dense_at_32k_7pct"] = {"worst_speedup": worst, "met": worst >= 5}
    fwd = [p for p in ok if p["group"] == "speed" and p["name"].startswith("fwd ")]
    if fwd:
        worst = min(fwd, key=lambda p: p["tflops_over_dense"])
        out["half_dense_tflops_useful_fwd"] = {"worst": worst["tflops_over_dense"], "at": worst["name"],
                                               "met": worst["tflops_over_dense"] >= 0.5}
    full = [p for p in at("speed", all_share=1.0) if p["name"].startswith("fwd ")]
    if full:
        slow = max(1 / p["speedup_vs_dense"] for p in full)
        out["all_within_1.25x_dense_fwd"] = {"worst_time_ratio": slow, "met": slow <= 1.25}
    gate = [p for p in ok if p["group"] == "speed" and "gate" in p["name"]]
    if gate:
        slow = max(1 / p["speedup_vs_dense"] for p in gate)
        out["gate_grad_fwd_bwd_within_2.5x_dense"] = {"worst_time_ratio": slow, "met": slow <= 2.5}
    dec = at("decode", all_share=0.07)
    if dec:
        worst = min(p["fraction_of_bound"] for p in dec)
        out["decode_0.8_of_memory_bound"] = {"worst_fraction": worst, "met": worst >= 0.8}
    return out


# ---------------------------------------------------------------------------------------------
# Running and recording


def _short(figures: dict) -> str:
    parts = []
    for key, val in figures.items():
        if key in ("tail", "shape_q", "shape_k") or isinstance(val, dict):
            continue
        parts.append(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}")
    return " ".join(parts)


def release() -> None:
    """Free what a finished step held: its tensors, and the allocator's cached blocks (an out-of-memory
    step leaves them behind, and FlexAttention's memory check counts them as used)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a CUDA error broke the context: the next steps record it themselves
            pass


def run_plan(steps: list[Step], s: Sizes, result: dict, out: Path, budget_s: float, only: str | None = None) -> None:
    """Run the steps in order while budget is left, writing ``result`` to ``out`` after each one."""
    start = time.perf_counter()
    result["points"] = points = []
    result["goals"] = {}
    _write(out, result)  # the plan and environment, before any step can take the process down
    for step in steps:
        left = budget_s - (time.perf_counter() - start)
        row = {"name": step.name, "group": step.group}
        if only and not re.search(only, step.name):
            row.update(status="skipped", reason=f"not selected by --only {only!r}")
        elif left <= 0:
            row.update(status="skipped", reason=f"budget of {budget_s:.0f} s spent")
        else:
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - start:6.1f}s] {step.name} ...", flush=True)
            try:
                args = step.args + ((left,) if step.wants_budget else ())
                row.update(step.fn(*args))
                row["status"] = "ok"
            except Skip as exc:
                row.update(status="skipped", reason=str(exc)[:2000])
            except Wrong as exc:
                row.update(exc.figures)
                row.update(status="failed", error=str(exc)[:2000])
            except Exception as exc:  # out of memory, compile errors, launch failures: record and go on
                row.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:2000]}",
                           traceback=traceback.format_exc()[-3000:])
            row["seconds"] = round(time.perf_counter() - t0, 2)
            release()  # out of the except block: what a failed step held goes too
        points.append(row)
        result["goals"] = goals(points, s)
        _write(out, result)
        if row["status"] == "ok":
            print(f"    ok ({row['seconds']} s): {_short({k: v for k, v in row.items() if k not in ('name', 'group', 'status', 'seconds')})}", flush=True)
        elif row["status"] == "failed":
            print(f"    FAILED ({row['seconds']} s): {row['error'][:500]}", flush=True)
        elif not only:
            print(f"    skipped {step.name}: {row['reason'][:200]}", flush=True)


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)


def environment(s: Sizes, argv: list[str]) -> dict:
    import torch
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "command": " ".join(["benchmarks/gpu.py", *argv]),
           "dry_run": s.dry, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
           "checkout": str(ROOT), "aha_from": _module_file("aha"), "aha_triton_from": _module_file("aha_triton")}
    if not s.dry:
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()))
    return env


def _module_file(name: str) -> str:
    """Where a module is imported from (the bootstrap makes it this checkout's)."""
    import importlib

    return str(Path(importlib.import_module(name).__file__).resolve())


def render(result: dict) -> str:
    """Markdown of a result file for docs/benchmarks-gpu.md: environment, every step, goals."""
    env = result["environment"]
    where = env.get("gpu", "the CPU (dry run: TRITON_INTERPRET=1, tiny sizes; timings mean nothing)")
    out = [f"Measured on **{where}** on {env['date'][:10]} (torch {env['torch']}, triton {env['triton']}, "
           f"CUDA {env['cuda']}, Python {env['python']}) with `{env['command']}`.", "",
           "| step | status | figures |", "| --- | --- | --- |"]
    keep = ("aha_ms", "dense_ms", "flex_ms", "speedup_vs_dense", "ideal_speedup", "aha_tflops_useful",
            "tflops_over_dense", "fraction_of_bound", "out_err", "dq_err", "dgate_err", "summary")
    for p in result.get("points", []):
        figures = ", ".join(f"{k} {p[k]:.3g}" if isinstance(p[k], float) else f"{k} {p[k]}" for k in keep if k in p)
        if p["status"] != "ok":
            figures = (p.get("error") or p.get("reason") or "")[:160].replace("|", "/").replace("\n", " ")
        out.append(f"| {p['name']} | {p['status']} | {figures} |")
    out.append("")
    for name, goal in result.get("goals", {}).items():
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in goal.items() if k != "met")
        verdict = {True: "met", False: "**not met**", None: "not judged (dry run)"}[goal["met"]]
        out.append(f"- goal `{name}`: {verdict} ({figures})")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="The triton backend's GPU run: correctness, then speed; JSON after every step")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/gpu.json; dry run: benchmarks/out/gpu-dry-run.json)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no step after this many seconds (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="the plan on the CPU under TRITON_INTERPRET=1 at tiny sizes")
    parser.add_argument("--aot", action="store_true", help="compile every kernel variant (every tile of the autotune sets) "
                        "for --arch offline; exit 1 when one does not fit")
    parser.add_argument("--arch", type=int, default=90, help="--aot: compute capability without the dot (default 90)")
    parser.add_argument("--only", metavar="REGEX", help="run only the steps whose name matches (the rest are recorded as skipped)")
    parser.add_argument("--list", action="store_true", help="print the plan's steps and exit")
    parser.add_argument("--render", metavar="JSON", help="print the Markdown of a result file and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # real kernels (the offline compiler for --aot)
    child_env = bootstrap()
    os.environ["PYTHONPATH"] = child_env["PYTHONPATH"]
    if args.aot:
        from aha_triton import _aot

        out = args.out or str(ROOT / "benchmarks" / "out" / f"aot-sm{args.arch}.json")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return _aot.main(["--arch", str(args.arch), "--check", "--candidates", "--json", out])
    s = DRY if args.dry_run else GPU
    steps = plan(s)
    if args.list:
        for step in steps:
            print(f"{step.group:<12} {step.name}")
        return 0
    import torch

    if not s.dry and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False); "
              "--dry-run runs the same plan on the CPU", file=sys.stderr)
        return 2
    import aha

    row = aha.registry.registry.get("triton")
    if row is None or row.status != "available":
        print(f"the triton backend is not usable here: {row.reason if row else 'not registered'}", file=sys.stderr)
        return 2
    problem = interpreter_problem() if s.dry else None
    if problem:
        print(problem, file=sys.stderr)
        return 2
    out = Path(args.out or (ROOT / ("benchmarks/out/gpu-dry-run.json" if s.dry else "benchmarks/results/gpu.json")))
    result = {"environment": environment(s, argv), "config": {k: v for k, v in s.__dict__.items()},
              "plan": [step.name for step in steps], "budget_s": args.budget_s}
    print(f"plan: {len(steps)} steps within {args.budget_s:.0f} s; writing {out} after each", flush=True)
    run_plan(steps, s, result, out, args.budget_s, args.only)
    points = result["points"]
    counts = {k: sum(p["status"] == k for p in points) for k in ("ok", "failed", "skipped")}
    print(f"\n{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; wrote {out}")
    for name, goal in result["goals"].items():
        print(f"goal {name}: {_met(goal)} {_short({k: v for k, v in goal.items() if k != 'met'})}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
