"""Kernel launches: tile sizes, shape checks, buffers and grids.

``forward`` and ``backward`` here are plain functions on tensors; ops.py wraps
them in a torch.library custom op with its autograd formula.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from aha.torch_ops import route_order
from aha.window import num_blocks
from aha_triton._bwd import _aha_bwd_dkdv, _aha_bwd_dq, _aha_bwd_preprocess
from aha_triton._common import LOG2E
from aha_triton._fwd import _aha_fwd
from aha_triton._index import dkdv_ranges, query_bounds


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel: queries per block (m), keys per block (n)."""

    m: int
    n: int
    warps: int = 4
    stages: int = 2


_OVERRIDE: dict[str, Tiles] = {}


@contextlib.contextmanager
def tiles(**kernels: Tiles):
    """Force tile sizes, e.g. ``with tiles(fwd=Tiles(16, 16)):`` (tests, benchmark sweeps).

    Keys: fwd, dkdv, dq.
    """
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kernels)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def gpu_tiles(kernel: str, d: int) -> Tiles:
    """GPU tiles of ``kernel`` (fwd, dkdv, dq) at padded head dim d: chosen for Hopper, not yet tuned on one."""
    if kernel == "fwd":
        return Tiles(128, 64, 8, 3) if d <= 128 else Tiles(64, 64, 8, 2)
    if kernel == "dkdv":  # m = queries per step, n = keys per program
        return Tiles(64, 64, 8, 2) if d <= 128 else Tiles(32, 64, 8, 1)
    return Tiles(64, 64, 8, 2) if d <= 128 else Tiles(64, 32, 8, 1)  # dq


def tile_candidates(kernel: str, dtype: torch.dtype, d: int) -> list[Tiles]:
    """The tiles worth timing for ``kernel`` at (dtype, padded head dim d), the default first."""
    first = gpu_tiles(kernel, d)
    more = {"fwd": [Tiles(128, 128, 8, 3), Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 3)],
            "dkdv": [Tiles(32, 128, 8, 2), Tiles(64, 128, 8, 2), Tiles(32, 64, 4, 3)],
            "dq": [Tiles(64, 32, 4, 2)]}[kernel]
    return [first] + [t for t in more if t != first]


def _tiles(kernel: str, d: int) -> Tiles:
    if kernel in _OVERRIDE:
        return _OVERRIDE[kernel]
    if interpreting():
        return Tiles(32, 32)  # the interpreter runs one block at a time in NumPy: few, large blocks
    return gpu_tiles(kernel, d)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 stays float32; 16-bit types ignore it


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along D; any other strides are passed through.

    Triton's interpreter treats bfloat16 as raw uint16 in tl.dot and comparisons,
    so there bfloat16 inputs are computed in float32 (outputs are still rounded to bfloat16).
    """
    if x.dtype == torch.bfloat16 and interpreting():
        return x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def hard_is_all(gate: torch.Tensor) -> torch.Tensor:
    """[B, Hq, Nq] bool of a 0/1 gate: the All tokens."""
    return gate if gate.dtype == torch.bool else gate == 1


@dataclass(frozen=True)
class Ragged:
    """The ragged-batch tensors the kernels read, int32 on q's device (see _common):
    seqlens, leftpad [B] (cache_seqlens, cache_leftpad); qpos, qstart [Nq] (packed sequences)."""

    seqlens: torch.Tensor | None = None
    leftpad: torch.Tensor | None = None
    qpos: torch.Tensor | None = None
    qstart: torch.Tensor | None = None

    def pointers(self, none: torch.Tensor) -> tuple:
        """SEQLENS, PADS, QPOS, QSTART (``none`` where absent: never read)."""
        return tuple(none if x is None else x for x in (self.seqlens, self.leftpad, self.qpos, self.qstart))

    def switches(self) -> dict:
        return {"VARLEN": self.seqlens is not None, "LEFTPAD": self.leftpad is not None, "PACKED": self.qpos is not None}


def packed_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, nq: int) -> tuple:
    """Where each packed query sits: qpos, qstart [Nq] int32 on the device of cu_seqlens (no host sync).

    Query i of sequence s (cu_seqlens_q[s] <= i < cu_seqlens_q[s + 1]) sits at key
    cu_seqlens_k[s + 1] - (cu_seqlens_q[s + 1] - i) (bottom-right in its sequence) and reads keys
    from qstart[i] = cu_seqlens_k[s] on.
    """
    cq, ck = cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64)
    i = torch.arange(nq, device=cq.device)
    seq = torch.searchsorted(cq[1:].contiguous(), i, right=True)  # s: the sequences that end at or before i
    qpos = i + ck[1:].gather(0, seq) - cq[1:].gather(0, seq)
    return qpos.to(torch.int32).contiguous(), ck.gather(0, seq).to(torch.int32).contiguous()


def ragged(q, seqlens=None, leftpad=None, cu_seqlens_q=None, cu_seqlens_k=None) -> Ragged:
    """The kernels' view of a call's ragged-batch arguments (already validated, on q's device)."""
    if cu_seqlens_q is not None:
        return Ragged(None, None, *packed_positions(cu_seqlens_q, cu_seqlens_k, q.shape[2]))
    return Ragged(seqlens, leftpad)


def _check(q, k, v, gate, rag: Ragged):
    b, hq, nq, d = q.shape
    for x in (rag.seqlens, rag.leftpad):
        assert x is None or (x.shape == (b,) and x.dtype == torch.int32), (x, q.shape)
    assert rag.qpos is None or (b == 1 and rag.qpos.shape == rag.qstart.shape == (nq,)), (rag, q.shape)
    assert k.shape == v.shape and k.shape[0] == b and k.shape[3] == d, (q.shape, k.shape, v.shape)
    assert hq % k.shape[1] == 0 and nq <= k.shape[2], (q.shape, k.shape)
    assert gate.shape == (b, hq, nq), (gate.shape, q.shape)
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype


def forward(q, k, v, gate, window: int, scale: float, both: bool, store_branches: bool, seqlens=None, leftpad=None,
            cu_seqlens_q=None, cu_seqlens_k=None):
    """AHA forward. Returns out [B, Hq, Nq, D], lse2 [S, B, Hq, Nq] float32, branches [2, B, Hq, Nq, D].

    seqlens, leftpad: None, or int32 [B] on q's device (cache_seqlens, cache_leftpad): row b reads
    k[b, :, leftpad[b]:seqlens[b]] and its queries sit at seqlens[b] - Nq + i; a query before
    leftpad[b] outputs 0. cu_seqlens_q, cu_seqlens_k: None, or [S + 1] ints on q's device (packed
    sequences, B = 1; see :func:`packed_positions`).

    both=False: ``gate`` must be 0/1; each token runs its selected branch (S = 1).
    both=True: every token runs both branches, mixed by ``gate``; with ``store_branches``
    the All and Here outputs and lse2 (S = 2) are kept for the backward, else lse2 and
    branches are empty.
    """
    rag = ragged(q, seqlens, leftpad, cu_seqlens_q, cu_seqlens_k)
    _check(q, k, v, gate, rag)
    dtype = q.dtype
    q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    out = torch.empty((bsz, hq, nq, d), dtype=dtype, device=dev)
    none_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
    if both:
        gate32 = gate.to(torch.float32).contiguous()
        order, n_all = none_i32, none_i32
        shape = (2, bsz, hq, nq) if store_branches else (0,)
        lse = torch.empty(shape, dtype=torch.float32, device=dev)
        branches = torch.empty(shape + ((d,) if store_branches else ()), dtype=dtype, device=dev)
    else:
        gate32 = torch.zeros(1, dtype=torch.float32, device=dev)
        order, n_all = route_order(hard_is_all(gate), hkv)
        lse = torch.empty((1, bsz, hq, nq), dtype=torch.float32, device=dev)
        branches = torch.empty((0,), dtype=dtype, device=dev)
    t = _tiles("fwd", _block_d(d))
    grid = (num_blocks(g * nq, t.m) + (0 if both else 1), bsz * hkv)  # + 1: the block split by the segments
    _aha_fwd[grid](
        q,
        k,
        v,
        gate32,
        order,
        n_all,
        out,
        lse if lse.numel() else none_i32,
        branches if branches.numel() else out,
        *rag.pointers(none_i32),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        hkv,
        nq,
        nk,
        window,
        bsz * hq * nq,
        scale * LOG2E,
        G=g,
        HEAD_DIM=d,
        BOTH=both,
        STORE_BRANCHES=both and store_branches,
        **rag.switches(),
        BLOCK_M=t.m,
        BLOCK_N=t.n,
        BLOCK_D=_block_d(d),
        PRECISION=_precision(q.dtype),
        num_warps=t.warps,
        num_stages=t.stages,
    )
    return out, lse, branches


def backward(
    dout, q, k, v, gate, out, lse, branches, window: int, scale: float, both: bool, deterministic: bool, seqlens=None,
    leftpad=None, cu_seqlens_q=None, cu_seqlens_k=None,
):
    """Gradients of AHA given what :func:`forward` kept. Returns dq, dk, dv and dgate
    ([B, Hq, Nq] float32 when ``both``, else empty). deterministic=False accumulates dq
    with float32 atomics inside the dk/dv pass instead of running a dq pass.
    Ragged arguments as in :func:`forward`; keys no query reads (outside [leftpad[b], seqlens[b]),
    sequences without queries) get dk = dv = 0, queries that read no key dq = dgate = 0."""
    rag = ragged(q, seqlens, leftpad, cu_seqlens_q, cu_seqlens_k)
    _check(q, k, v, gate, rag)
    dtype = q.dtype
    q, k, v, dout = _kernel_input(q), _kernel_input(k), _kernel_input(v), _kernel_input(dout).contiguous()
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g, tokens, dev = hq // hkv, bsz * hq * nq, q.device
    block_d = _block_d(d)
    none_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
    delta = torch.empty((2 if both else 1, bsz, hq, nq), dtype=torch.float32, device=dev)
    dgate = torch.empty((bsz, hq, nq) if both else (0,), dtype=torch.float32, device=dev)
    gate32 = gate.to(torch.float32).contiguous() if both else torch.zeros(1, dtype=torch.float32, device=dev)
    block_r = max(1, 4096 // block_d)
    _aha_bwd_preprocess[(num_blocks(tokens, block_r),)](
        dout,
        out,
        branches if both else out,
        gate32,
        delta,
        dgate if both else delta,
        tokens,
        HEAD_DIM=d,
        BOTH=both,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    t_kv = _tiles("dkdv", block_d)
    routed = None if both else route_order(hard_is_all(gate), hkv)
    order, n_all = routed or (none_i32, none_i32)
    ranges = none_i32
    if not both or rag.qpos is not None:  # BOTH without packed sequences finds its query blocks in the kernel
        pos, start = query_bounds(bsz, hkv, nq, nk, dev, rag.seqlens, rag.leftpad, rag.qpos, rag.qstart)
        ranges = dkdv_ranges(routed, pos, start, nk, g, window, t_kv.m, t_kv.n)
    dk = torch.empty((bsz, hkv, nk, d), dtype=dtype, device=dev)
    dv = torch.empty((bsz, hkv, nk, d), dtype=dtype, device=dev)
    dq = (
        torch.empty((bsz, hq, nq, d), dtype=dtype, device=dev)
        if deterministic
        else torch.zeros((bsz, hq, nq, d), dtype=torch.float32, device=dev)
    )
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
    )
    common = (hkv, nq, nk, window, tokens, scale, scale * LOG2E)
    _aha_bwd_dkdv[(num_blocks(nk, t_kv.n), bsz * hkv)](
        q,
        k,
        v,
        dout,
        gate32,
        lse,
        delta,
        order,
        n_all,
        ranges,
        dk,
        dv,
        dq,
        *rag.pointers(none_i32),
        *strides,
        *common,
        G=g,
        HEAD_DIM=d,
        BOTH=both,
        FUSE_DQ=not deterministic,
        **rag.switches(),
        BLOCK_M=t_kv.m,
        BLOCK_N=t_kv.n,
        BLOCK_D=block_d,
        PRECISION=_precision(q.dtype),
        num_warps=t_kv.warps,
        num_stages=t_kv.stages,
    )
    if deterministic:
        t_q = _tiles("dq", block_d)
        _aha_bwd_dq[(num_blocks(g * nq, t_q.m) + (0 if both else 1), bsz * hkv)](
            q,
            k,
            v,
            dout,
            gate32,
            lse,
            delta,
            order,
            n_all,
            dq,
            *rag.pointers(none_i32),
            *strides,
            *common,
            G=g,
            HEAD_DIM=d,
            BOTH=both,
            **rag.switches(),
            BLOCK_M=t_q.m,
            BLOCK_N=t_q.n,
            BLOCK_D=block_d,
            PRECISION=_precision(q.dtype),
            num_warps=t_q.warps,
            num_stages=t_q.stages,
        )
    else:
        dq = dq.to(dtype)
    return dq, dk, dv, dgate
