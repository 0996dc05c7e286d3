"""Compile every kernel variant for an NVIDIA target without a GPU, and report its resources.

    python -m aha_triton._aot [--arch 90] [--json PATH]

Triton ships ptxas, so the whole GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin)
runs on any machine. The launches of ``_launch`` are replayed on small CPU tensors
with the kernels swapped for recorders; each recorded launch is then compiled with
the GPU tile sizes. Registers, spill (local) memory and shared memory come from the
cubin. Must run in a process where TRITON_INTERPRET is unset (the interpreter replaces
the kernels by Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aha_triton import _launch

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64"}
_KERNELS = ("_aha_fwd", "_aha_bwd_preprocess", "_aha_bwd_dkdv", "_aha_bwd_dq")
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


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


def _resources(cubin: bytes) -> dict:
    """REG, SHARED, LOCAL (spills) and STACK of a cubin, from the cuobjdump that ships with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {key.lower(): int(val) for key, val in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", text)}


PROBLEMS = {
    "all": [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 64),
            (torch.bfloat16, 16), (torch.bfloat16, 40), (torch.bfloat16, 256)],
    "quick": [(torch.bfloat16, 128)],
}
# ragged variants compiled per problem set: quick skips cache_seqlens alone (the leftpad variant has it too)
RAGGED = {"all": ("seqlens", "leftpad", "packed"), "quick": ("leftpad", "packed")}


def recorded_launches(dtype, d, ragged=("seqlens", "leftpad", "packed")):
    """Every kernel launch of forward and backward (routed and dense; both dq modes; plain calls and the
    ``ragged`` variants: cache_seqlens, cache_seqlens with cache_leftpad, packed sequences) for one dtype and D."""
    calls = []
    saved = {name: getattr(_launch, name) for name in _KERNELS}
    for name in _KERNELS:
        setattr(_launch, name, _Recorder(saved[name], calls))
    gpu = {kernel: _launch.gpu_tiles(kernel, _launch._block_d(d)) for kernel in ("fwd", "dkdv", "dq")}
    i32 = dict(dtype=torch.int32)
    variants = {  # decode / chunked prefill: 5 queries; packed: 40 queries in two sequences
        "seqlens": (5, {"seqlens": torch.tensor([33], **i32)}),
        "leftpad": (5, {"seqlens": torch.tensor([33], **i32), "leftpad": torch.tensor([30], **i32)}),
        "packed": (40, {"cu_seqlens_q": torch.tensor([0, 17, 40], **i32), "cu_seqlens_k": torch.tensor([0, 17, 40], **i32)}),
    }
    try:
        with _launch.tiles(**gpu), _no_interpreter():
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 4, 40, d, generator=gen).to(dtype) for _ in range(3))
            k, v = k[:, :2], v[:, :2]
            for both in (False, True):
                gate = (torch.rand(1, 4, 40, generator=gen) < 0.3).to(dtype)
                out, lse, br = _launch.forward(q, k, v, gate, 8, d**-0.5, both=both, store_branches=both)
                for det in (True, False):
                    _launch.backward(q, q, k, v, gate, out, lse, br, 8, d**-0.5, both, det)
                for name in ragged:  # the dq pass (deterministic) compiles every kernel
                    nq, rag = variants[name]
                    q1, gate1 = q[:, :, :nq], gate[:, :, :nq]
                    out, lse, br = _launch.forward(q1, k, v, gate1, 8, d**-0.5, both=both, store_branches=both, **rag)
                    _launch.backward(q1, q1, k, v, gate1, out, lse, br, 8, d**-0.5, both, True, **rag)
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


def compile_all(arch: int = 90, problems="all", kernels=_KERNELS) -> list[dict]:
    """Compile each distinct launch for sm_<arch>; one row per compiled variant."""
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    rows, seen = [], set()
    for dtype, d in PROBLEMS[problems]:
        for fn, args, kwargs in recorded_launches(dtype, d, RAGGED[problems]):
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
            row = {"kernel": fn.__name__, "dtype": str(dtype).removeprefix("torch."), "D": d, **consts, **options}
            row.update(_resources(compiled.asm["cubin"]))
            row["shared_triton"] = compiled.metadata.shared
            row["wgmma"] = compiled.asm["ptx"].count("wgmma.mma_async")
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot: 80, 90, ...")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--problems", choices=sorted(PROBLEMS), default="all", help="dtype and head dim set")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    rows = compile_all(args.arch, args.problems)
    for r in rows:
        ragged = "+".join(name for name in ("VARLEN", "LEFTPAD", "PACKED") if r.get(name)) or "-"
        print(f"sm_{args.arch} {r['kernel']:<20} {r['dtype']:<8} D={r['D']:<3} BOTH={r.get('BOTH', '-')!s:<5} {ragged:<14} "
              f"M={r.get('BLOCK_M', r.get('BLOCK_R'))} N={r.get('BLOCK_N', '-')} warps={r.get('num_warps', '-')} "
              f"stages={r.get('num_stages', '-')}  regs={r.get('reg')} spill={r.get('local')} "
              f"shared={r['shared_triton']} wgmma={r['wgmma']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
