"""Compile every kernel variant for an NVIDIA target without a GPU, and check its resources.

    python -m aha_triton._aot [--arch 90] [--problems all|quick] [--check] [--jobs N] [--json PATH]

Triton ships ptxas, so the whole GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin)
runs on any machine. The launches of ``_launch`` are replayed on small CPU tensors
with the kernels swapped for recorders; each recorded launch is then compiled with
the GPU tile sizes the dispatcher picks for its dtype, head dim and branch (with
``--candidates``: every member of the autotune sets of _launch.TILES). Per variant:

* registers and shared memory (from the cubin, cuobjdump; shared memory also as Triton counts it),
* the stack frame and the spill stores and loads (``ptxas -v`` on the variant's PTX, with the
  options Triton uses: a spill to the stack shows here, not in cuobjdump's LOCAL field),
* the wgmma instructions in the PTX (tensor cores on Hopper).

``--check`` exits 1 when a variant needs more than 232,448 B of shared memory (an H100's or
H200's limit per block) or when a float16/bfloat16 variant at D <= 128 spills. Must run where
TRITON_INTERPRET is unset (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aha_triton import _launch

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.int8: "*i8"}
_KERNELS = ("_aha_bad_keys", "_aha_fwd", "_aha_bwd_preprocess", "_aha_bwd_dkdv", "_aha_bwd_dq", "_aha_decode_split",
            "_aha_decode_merge")
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
SMEM_LIMIT = 232_448  # bytes of shared memory per block on sm_90 (H100, H200)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _source(fn, args, kwargs) -> ASTSource:
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = _PTR[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _nvidia_tool(name: str, arch: int) -> str:
    """Path of a CUDA tool that ships with triton (ptxas, cuobjdump), across triton versions."""
    from triton.backends.nvidia import compiler as nv

    getter = getattr(nv, f"get_{name}", None)
    if getter is not None:
        try:
            return getter(arch).path
        except TypeError:
            return getter().path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_options() -> list[str]:
    """The ptxas options of this triton's make_cubin that change register allocation."""
    from triton.backends.nvidia.compiler import CUDABackend

    source = inspect.getsource(CUDABackend.make_cubin)
    return ["-lineinfo"] + [flag for flag in ("--regAllocOptLevel=2",) if flag.split("=")[0] in source]


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Stack frame, spill stores/loads and registers of a PTX, from ``ptxas -v``."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_nvidia_tool("ptxas", arch), "-v", *_ptxas_options(), f"--gpu-name=sm_{arch}{suffix}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    found = dict(stack=r"(\d+) bytes stack frame", spill_stores=r"(\d+) bytes spill stores",
                 spill_loads=r"(\d+) bytes spill loads", ptxas_regs=r"Used (\d+) registers")
    return {key: int(m.group(1)) if (m := re.search(rx, text)) else None for key, rx in found.items()}


def _cubin_resources(cubin: bytes, arch: int) -> dict:
    """REG, SHARED, LOCAL and STACK of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvidia_tool("cuobjdump", arch), "--dump-resource-usage", f.name],
                              capture_output=True, text=True).stdout
    return {key.lower(): int(val) for key, val in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", text)}


PROBLEMS = {  # (dtype, head dim): every padded head dim the dispatcher serves (16..256), and one unpadded
    "all": [(dt, d) for dt in ("bfloat16", "float16", "float32") for d in (16, 32, 64, 128, 256)]
    + [("bfloat16", 96)],
    "quick": [("bfloat16", 128)],
    "test": [("bfloat16", 128)],  # tests/test_triton_backend.py: plain calls only
}
# ragged variants compiled per problem set: quick skips cache_seqlens alone (the leftpad variant has it too)
RAGGED = {"all": ("seqlens", "leftpad", "packed"), "quick": ("leftpad", "packed"), "test": ()}


def recorded_launches(dtype, d, ragged=("seqlens", "leftpad", "packed"), tiles=None):
    """Every kernel launch of forward and backward (routed, dense, and a soft gate without grad; both dq
    modes; split-KV decode; plain calls and the ``ragged`` variants: cache_seqlens, cache_seqlens with
    cache_leftpad, packed sequences) for one dtype and D, with the GPU tiles (or ``tiles``: {kernel: Tiles} for both branches)."""
    calls = []
    saved = {name: getattr(_launch, name) for name in _KERNELS}
    for name in _KERNELS:
        setattr(_launch, name, _Recorder(saved[name], calls))
    i32 = dict(dtype=torch.int32)
    variants = {  # decode / chunked prefill: 5 queries; packed: 40 queries in two sequences
        "seqlens": (5, {"seqlens": torch.tensor([33], **i32)}),
        "leftpad": (5, {"seqlens": torch.tensor([33], **i32), "leftpad": torch.tensor([30], **i32)}),
        "packed": (40, {"cu_seqlens_q": torch.tensor([0, 17, 40], **i32), "cu_seqlens_k": torch.tensor([0, 17, 40], **i32)}),
    }
    try:
        with _launch.tiles(**(tiles or {})), _no_interpreter():
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 4, 40, d, generator=gen).to(dtype) for _ in range(3))
            k, v = k[:, :2], v[:, :2]
            soft = torch.rand(1, 4, 40, generator=gen).to(dtype)
            _launch.forward(q, k, v, soft, 8, d**-0.5, both=False, store_branches=False)  # soft gate, no grad
            for name in ("plain",) + tuple(r for r in ragged if r != "packed"):  # split-KV decode: 1 query, no grad
                rag = variants[name][1] if name != "plain" else {}
                _launch.forward(q[:, :, :1], k, v, soft[:, :, :1], 8, d**-0.5, both=False, store_branches=False, **rag)
            for both in (False, True):
                gate = (torch.rand(1, 4, 40, generator=gen) < 0.3).to(dtype)
                out, lse, br, index = _launch.forward(q, k, v, gate, 8, d**-0.5, both=both, store_branches=both,
                                                      needs_backward=True)
                for det in (True, False):
                    _launch.backward(q, q, k, v, gate, out, lse, br, 8, d**-0.5, both, det, index=index)
                for name in ragged:
                    nq, rag = variants[name]
                    q1, gate1 = q[:, :, :nq], gate[:, :, :nq]
                    out, lse, br, index = _launch.forward(q1, k, v, gate1, 8, d**-0.5, both=both, store_branches=both,
                                                          needs_backward=True, **rag)
                    for det in (True, False):
                        _launch.backward(q1, q1, k, v, gate1, out, lse, br, 8, d**-0.5, both, det, index=index, **rag)
    finally:
        for name, fn in saved.items():
            setattr(_launch, name, fn)
    return calls


@contextlib.contextmanager
def _no_interpreter():
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def _variant_name(row: dict) -> str:
    ragged = "+".join(name for name in ("VARLEN", "LEFTPAD", "PACKED") if row.get(name)) or "plain"
    mode = ""
    if "BOTH" in row:
        mode = "both" if row["BOTH"] else "routed"
        if row.get("SKIP"):
            mode = "soft (groups with a soft gate)"
        elif row.get("STORE_BRANCHES"):
            mode = "gate-grad"
    if "FUSE_DQ" in row:
        mode += ", atomic dq" if row["FUSE_DQ"] else ", dq pass"
    return " ".join(x for x in (row["kernel"], row["dtype"], f"D={row['D']}", mode, ragged) if x)


@contextlib.contextmanager
def _candidate(i: int):
    """Make the i-th member of every autotune set (where it has one) the default."""
    saved = dict(_launch.TILES)
    _launch.TILES.update({key: tiles[i:i + 1] for key, tiles in saved.items() if len(tiles) > i})
    try:
        yield
    finally:
        _launch.TILES.clear()
        _launch.TILES.update(saved)


def compile_problem(arch: int, dtype_name: str, d: int, ragged=RAGGED["all"], tiles=None, kernels=_KERNELS,
                    candidates: bool = False) -> list[dict]:
    """Compile each distinct launch of one (dtype, D) for sm_<arch>; one row per variant. With
    ``candidates``, the launches of every member of the autotune sets (_launch.TILES), not only the defaults."""
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    rows, seen = [], set()
    launches = []
    for i in range(max(map(len, _launch.TILES.values())) if candidates else 1):
        with _candidate(i):
            launches += recorded_launches(DTYPES[dtype_name], d, ragged, tiles)
    for fn, args, kwargs in launches:
        if fn.__name__ not in kernels:
            continue
        src = _source(fn, args, kwargs)
        options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
        consts = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        key = (fn.__name__, repr(sorted(src.signature.items())), repr(sorted({**consts, **options}.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(src, target=target, options=backend.parse_options(options).__dict__)
        row = {"kernel": fn.__name__, "dtype": dtype_name, "D": d, **consts, **options}
        row.update(_cubin_resources(compiled.asm["cubin"], arch))
        row.update(_ptxas_report(compiled.asm["ptx"], arch))
        row["shared_triton"] = compiled.metadata.shared
        row["wgmma"] = compiled.asm["ptx"].count("wgmma.mma_async")
        row["variant"] = _variant_name(row)
        rows.append(row)
    return rows


def compile_all(arch: int = 90, problems="all", kernels=_KERNELS, jobs: int = 1, tiles=None,
                candidates: bool = False) -> list[dict]:
    """Every variant of a problem set, compiled in ``jobs`` processes."""
    todo = [(arch, dt, d, RAGGED[problems], tiles, kernels, candidates) for dt, d in PROBLEMS[problems]]
    if jobs <= 1:
        return [row for args in todo for row in compile_problem(*args)]
    with ProcessPoolExecutor(jobs) as pool:
        return [row for rows in pool.map(compile_problem, *zip(*todo)) for row in rows]


def problems_of(row: dict) -> list[str]:
    """What the resource check finds wrong with one compiled variant (empty: it fits)."""
    out = []
    shared = max(row.get("shared", 0), row.get("shared_triton", 0))
    if shared > SMEM_LIMIT:
        out.append(f"needs {shared} B of shared memory > {SMEM_LIMIT}")
    spills = (row.get("stack") or 0) + (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0) + row.get("local", 0)
    if row["dtype"] != "float32" and row["D"] <= 128 and spills:
        out.append(f"spills (stack {row.get('stack')} B, spill stores {row.get('spill_stores')} B, "
                   f"loads {row.get('spill_loads')} B)")
    return out


def _tiles_of(row: dict) -> str:
    if "BLOCK_R" in row:
        return f"{row['BLOCK_R']} rows"
    return f"{row.get('BLOCK_M')}x{row.get('BLOCK_N')} w{row.get('num_warps')} s{row.get('num_stages')}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot: 80, 90, ...")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--problems", choices=sorted(PROBLEMS), default="all", help="dtype and head dim set")
    parser.add_argument("--check", action="store_true", help="exit 1 when a variant does not fit (see above)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: CPUs)")
    parser.add_argument("--candidates", action="store_true", help="every member of the autotune sets, not only defaults")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    rows = compile_all(args.arch, args.problems, jobs=args.jobs, candidates=args.candidates)
    bad = []
    print(f"{'variant':<58} {'tiles':<16} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'shared':>7} {'wgmma':>5}")
    for r in rows:
        wrong = problems_of(r)
        bad += [f"{r['variant']}: {w}" for w in wrong]
        print(f"{r['variant']:<58} {_tiles_of(r):<16} {r.get('reg')!s:>4} {r.get('stack')!s:>5} "
              f"{r.get('spill_stores')!s:>5}/{r.get('spill_loads')!s:<5} {max(r.get('shared', 0), r['shared_triton']):>7} "
              f"{r['wgmma']:>5}{'  <- ' + '; '.join(wrong) if wrong else ''}")
    print(f"\nsm_{args.arch}, triton {triton.__version__}: {len(rows)} variants, {len(bad)} do not fit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
