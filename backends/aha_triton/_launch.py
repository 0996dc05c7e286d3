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
from aha_triton._common import LOG2E, _aha_bad_keys
from aha_triton._decode import _aha_decode_merge, _aha_decode_split
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

    Keys: fwd, dkdv, dq, decode.
    """
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kernels)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


_GPU_TILES: list[torch.dtype | None] = []


@contextlib.contextmanager
def gpu_tile_sizes(dtype: torch.dtype | None = None):
    """Use the GPU tiles even under the interpreter, over any ``tiles(...)`` (tests: block boundaries as on a
    GPU); with ``dtype``, those of that dtype whatever the inputs' (e.g. bfloat16 tiles over float32 inputs)."""
    _GPU_TILES.append(dtype)
    try:
        yield
    finally:
        _GPU_TILES.pop()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# The autotune set of each kernel per (kernel, branch, dtype class, padded head dim), the default first.
# Every member passes the offline resource check for sm_90 (python -m aha_triton._aot --check: at most
# 232,448 B of shared memory; no spills at 16 bits and D <= 128) in every variant (ragged, both dq modes);
# benchmarks/gpu.py times them. Chosen offline, not yet tuned on a GPU.
# branch: "routed" (one branch per token) or "both" (gate grads, soft gates: two softmax states).
# bits: "16" (float16, bfloat16) or "32" (float32: no tensor cores, twice the shared memory per tile).
# m = query rows per block (dkdv: per step), n = keys per block (dkdv: per program).
T = Tiles
TILES: dict[tuple[str, str, str, int], tuple[Tiles, ...]] = {}
for _d in (16, 32, 64, 128, 256):
    _big = _d > 128
    # 16 bits: wgmma tiles; D=256 halves the keys per block (and may spill: allowed there)
    TILES["fwd", "routed", "16", _d] = (T(64, 32, 8, 2),) if _big else (T(128, 64, 8, 3), T(128, 64, 8, 2),
                                                                        T(128, 32, 8, 3))
    TILES["fwd", "both", "16", _d] = (T(64, 16, 8, 2),) if _big else (T(64, 32, 8, 3),)
    TILES["dq", "routed", "16", _d] = (T(32, 32, 8, 2),) if _big else (T(64, 64, 8, 2), T(64, 32, 8, 2))
    TILES["dq", "both", "16", _d] = (T(32, 32, 8, 2),) if _big else (T(64, 32, 8, 2),)
    TILES["dkdv", "routed", "16", _d] = (T(16, 32, 8, 2),) if _big else (T(32, 64, 8, 2), T(16, 128, 8, 2))
    # both branches hold twice the state: 32-row steps sit at 255 registers and spill at D=96 on some triton
    # versions (32x64 s2 on 3.9, s3 on 3.6); 16-row steps keep a margin on both
    TILES["dkdv", "both", "16", _d] = (T(16, 32, 8, 2),) if _big else (T(16, 64, 8, 3), T(16, 64, 8, 2))
    # 32 bits: FMA dots (no tensor cores) hold their tiles in registers: small tiles over 8 warps
    _small = _d <= 64
    TILES["fwd", "routed", "32", _d] = (T(32, 32, 8, 2),) if _small else (T(16, 32, 8, 2),)
    TILES["fwd", "both", "32", _d] = (T(16, 32, 8, 2),)
    for _branch in ("routed", "both"):
        TILES["dkdv", _branch, "32", _d] = (T(16, 32, 8, 2),)
        TILES["dq", _branch, "32", _d] = (T(32, 32, 8, 2),) if _small else (T(16, 32, 8, 2),)
    # split-KV decode: m = rows per block (G * Nq, padded to at least 16), n = keys per block
    TILES["decode", "routed", "16", _d] = (T(16, 64, 8, 2),) if _big else (T(16, 128, 8, 3), T(16, 64, 8, 2))
    TILES["decode", "routed", "32", _d] = (T(16, 32, 8, 2),)
del T, _big, _small


def _bits(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def tile_candidates(kernel: str, dtype: torch.dtype, d: int, both: bool = False) -> tuple[Tiles, ...]:
    """The autotune set of ``kernel`` (fwd, dkdv, dq) at (dtype, padded head dim d, branch), the default first."""
    return TILES[kernel, "both" if both else "routed", _bits(dtype), _block_d(d)]


def gpu_tiles(kernel: str, d: int, dtype: torch.dtype = torch.bfloat16, both: bool = False) -> Tiles:
    """The GPU tiles of ``kernel`` (fwd, dkdv, dq): the first of its autotune set."""
    return tile_candidates(kernel, dtype, d, both)[0]


def _tiles(kernel: str, dtype: torch.dtype, d: int, both: bool = False) -> Tiles:
    if _GPU_TILES:
        return gpu_tiles(kernel, d, _GPU_TILES[-1] or dtype, both)
    if kernel in _OVERRIDE:
        return _OVERRIDE[kernel]
    if interpreting():
        return Tiles(32, 32)  # the interpreter runs one block at a time in NumPy: few, large blocks
    return gpu_tiles(kernel, d, dtype, both)


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


def bad_keys(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys' values hold a NaN or an inf: flags [B * Hkv, Nk] int8 (one pass over v, see
    _aha_bad_keys) and their prefix counts [B * Hkv, Nk + 1] int32 (count[j] = flagged keys before j)."""
    bsz, hkv, nk, d = v.shape
    bad = torch.empty((bsz * hkv, nk), dtype=torch.int8, device=v.device)
    block_d = _block_d(d)
    block_r = max(1, min(128, 8192 // block_d))
    _aha_bad_keys[(num_blocks(nk, block_r), bsz * hkv)](
        v, bad, v.stride(0), v.stride(1), v.stride(2), hkv, nk, HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d
    )
    count = torch.zeros((bsz * hkv, nk + 1), dtype=torch.int32, device=v.device)
    torch.cumsum(bad, dim=1, dtype=torch.int32, out=count[:, 1:])
    return bad, count


def _strides(q, k, v) -> tuple:
    """Batch, head and position strides of q, k and v (their last dims have unit stride)."""
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


def _check(q, k, v, gate, rag: Ragged):
    b, hq, nq, d = q.shape
    for x in (rag.seqlens, rag.leftpad):
        assert x is None or (x.shape == (b,) and x.dtype == torch.int32), (x, q.shape)
    assert rag.qpos is None or (b == 1 and rag.qpos.shape == rag.qstart.shape == (nq,)), (rag, q.shape)
    assert k.shape == v.shape and k.shape[0] == b and k.shape[3] == d, (q.shape, k.shape, v.shape)
    assert hq % k.shape[1] == 0 and nq <= k.shape[2], (q.shape, k.shape)
    assert gate.shape == (b, hq, nq), (gate.shape, q.shape)
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype


@dataclass(frozen=True)
class Index:
    """What a forward computes once and its backward reuses (no index work in the backward).

    order [B * Hkv, G * Nq], n_all [B * Hkv] int32: route_order's partition (routed calls; empty for BOTH);
    ranges [B * Hkv, key blocks, 8] int32: the dk/dv pass's query-block ranges (_index.dkdv_ranges) for
    its tiles, or empty when no backward follows (or BOTH without packed sequences, which needs none)."""

    order: torch.Tensor
    n_all: torch.Tensor
    ranges: torch.Tensor


def dkdv_tiles(dtype: torch.dtype, d: int, both: bool) -> Tiles:
    """The dk/dv pass's tiles for a call; its forward computes the key-block ranges for them."""
    return _tiles("dkdv", dtype, _block_d(d), both)


def index_shapes(q_shape, k_shape, both: bool, packed: bool, needs_backward: bool, block_n: int) -> tuple:
    """Shapes of order, n_all and ranges of :class:`Index` (for the custom op's fake implementation);
    block_n: the dk/dv pass's keys per program."""
    bsz, hq, nq, d = q_shape
    hkv, nk = k_shape[1], k_shape[2]
    routed = ((bsz * hkv, hq // hkv * nq), (bsz * hkv,)) if not both else ((0,), (0,))
    ranges = (bsz * hkv, num_blocks(nk, block_n), 8) if needs_backward and (not both or packed) else (0,)
    return (*routed, ranges)


def _index(q, k, gate, window: int, both: bool, rag: Ragged, needs_backward: bool, t_kv: Tiles) -> Index:
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]

    def empty():  # a new one each time: a custom op's outputs may not alias each other
        return torch.empty((0,), dtype=torch.int32, device=q.device)

    order, n_all = (empty(), empty()) if both else route_order(hard_is_all(gate), hkv)
    ranges = empty()
    if needs_backward and (not both or rag.qpos is not None):  # BOTH alone finds its query blocks in the kernel
        pos, start = query_bounds(bsz, hkv, nq, nk, q.device, rag.seqlens, rag.leftpad, rag.qpos, rag.qstart)
        ranges = dkdv_ranges(None if both else (order, n_all), pos, start, nk, hq // hkv, window, t_kv.m, t_kv.n)
    return Index(order, n_all, ranges)


def forward(q, k, v, gate, window: int, scale: float, both: bool, store_branches: bool, seqlens=None, leftpad=None,
            cu_seqlens_q=None, cu_seqlens_k=None, needs_backward: bool = False, dkdv: Tiles | None = None):
    """AHA forward. Returns out [B, Hq, Nq, D], lse2 [S, B, Hq, Nq] float32, branches [2, B, Hq, Nq, D]
    and the :class:`Index` for the backward (its ranges only when ``needs_backward``, for the dk/dv
    tiles ``dkdv``, default :func:`dkdv_tiles`; pass the same to :func:`backward`). Without backward,
    few queries per kv group go to the split-KV decode kernel (:func:`decodes`).

    seqlens, leftpad: None, or int32 [B] on q's device (cache_seqlens, cache_leftpad): row b reads
    k[b, :, leftpad[b]:seqlens[b]] and its queries sit at seqlens[b] - Nq + i; a query before
    leftpad[b] outputs 0. cu_seqlens_q, cu_seqlens_k: None, or [S + 1] ints on q's device (packed
    sequences, B = 1; see :func:`packed_positions`).

    both=False: each token runs its selected branch (S = 1): gate 1 is All, anything else Here. A float
    gate may hold values strictly between 0 and 1 (no host sync checks it): the kv groups that have such
    a token are then computed again with both branches, mixed (a second launch whose other programs
    return at once), and their lse2 is not that of a branch (a backward must check the gate first).
    both=True: every token runs both branches, mixed by ``gate``; with ``store_branches``
    the All and Here outputs and lse2 (S = 2) are kept for the backward, else lse2 and
    branches are empty.
    """
    rag = ragged(q, seqlens, leftpad, cu_seqlens_q, cu_seqlens_k)
    _check(q, k, v, gate, rag)
    dtype = q.dtype
    q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    if not needs_backward and decodes(q.shape, k.shape, rag.qpos is not None):
        out = decode(q, k, v, gate, window, scale, rag, dtype)
        lse = torch.empty((1, bsz, hq, nq), dtype=torch.float32, device=dev)  # never read: no backward follows
        order, n_all, _ = index_shapes(q.shape, k.shape, False, False, False, 1)
        empty = torch.empty((0,), dtype=torch.int32, device=dev)
        index = Index(torch.empty(order, dtype=torch.int32, device=dev), torch.empty(n_all, dtype=torch.int32,
                      device=dev), empty)
        return out, lse, torch.empty((0,), dtype=dtype, device=dev), index
    index = _index(q, k, gate, window, both, rag, needs_backward, dkdv or dkdv_tiles(dtype, d, both))
    out = torch.empty((bsz, hq, nq, d), dtype=dtype, device=dev)
    if both:
        shape = (2, bsz, hq, nq) if store_branches else (0,)
        lse = torch.empty(shape, dtype=torch.float32, device=dev)
        branches = torch.empty(shape + ((d,) if store_branches else ()), dtype=dtype, device=dev)
    else:
        lse = torch.empty((1, bsz, hq, nq), dtype=torch.float32, device=dev)
        branches = torch.empty((0,), dtype=dtype, device=dev)
    bad = bad_keys(v)
    launch = dict(q=q, k=k, v=v, bad=bad, out=out, rag=rag, window=window, scale=scale)
    _fwd_launch(gate, index, lse, branches, both=both, store=both and store_branches, **launch)
    if not both and gate.is_floating_point():  # groups with a soft token: both branches, mixed
        soft = ((gate > 0) & (gate < 1)).reshape(bsz * hkv, -1).any(1).to(torch.int32)
        empty = torch.empty((0,), dtype=torch.int32, device=dev)
        _fwd_launch(gate, Index(empty, soft, empty), lse[:0], branches, both=True, store=False, **launch)
    return out, lse, branches, index


DECODE_MAX_ROWS = 64  # the split-KV decode kernel serves calls with G * Nq <= this and Nq <= 16 (forward only)
DECODE_BLOCKS_PER_SPLIT = 32  # key blocks per split of a group's whole cache (2048 keys at 64 per block)


def decodes(q_shape, k_shape, packed: bool) -> bool:
    """Whether a forward without backward goes to the split-KV decode kernel: few queries per kv group."""
    nq, g = q_shape[2], q_shape[1] // k_shape[1]
    return not packed and nq <= 16 and g * nq <= DECODE_MAX_ROWS


def decode(q, k, v, gate, window: int, scale: float, rag: Ragged, dtype) -> torch.Tensor:
    """Split-KV decode (see _decode): out [B, Hq, Nq, D] in ``dtype``; any gate, hard or soft, no host sync."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g, rows = hq // hkv, hq // hkv * nq
    block_d = _block_d(d)
    t = _tiles("decode", dtype, block_d)
    block_m = max(16, min(t.m, triton.next_power_of_2(rows)))
    splits = max(1, min(num_blocks(num_blocks(nk, t.n), DECODE_BLOCKS_PER_SPLIT), 128))
    parts = bsz * hkv * rows
    part_o = torch.empty((2, splits, parts, block_d), dtype=torch.float32, device=q.device)
    part_l = torch.empty((2, splits, parts), dtype=torch.float32, device=q.device)
    gate32 = gate.to(torch.float32).contiguous()
    none_i32 = torch.zeros(1, dtype=torch.int32, device=q.device)
    _aha_decode_split[(splits, bsz * hkv, num_blocks(rows, block_m))](
        q,
        k,
        v,
        gate32,
        part_o,
        part_l,
        *rag.pointers(none_i32)[:2],
        *_strides(q, k, v),
        hkv,
        nq,
        nk,
        window,
        splits,
        parts,
        scale * LOG2E,
        G=g,
        HEAD_DIM=d,
        VARLEN=rag.seqlens is not None,
        LEFTPAD=rag.leftpad is not None,
        BLOCK_M=block_m,
        BLOCK_N=t.n,
        BLOCK_D=block_d,
        PRECISION=_precision(q.dtype),
        num_warps=t.warps,
        num_stages=t.stages,
    )
    out = torch.empty((bsz, hq, nq, d), dtype=dtype, device=q.device)
    block_r = 16
    _aha_decode_merge[(num_blocks(parts, block_r),)](
        part_o, part_l, gate32, out, splits, parts, nq, G=g, HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out


def _fwd_launch(gate, index: Index, lse, branches, *, q, k, v, bad, out, rag: Ragged, window, scale, both: bool,
                store: bool):
    """One launch of _aha_fwd: routed (order, n_all of ``index``), or BOTH over natural row order; BOTH with
    an n_all of length B * Hkv runs only the groups whose n_all is not 0 (SKIP)."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    none_i32 = torch.zeros(1, dtype=torch.int32, device=q.device)
    gate32 = gate.to(torch.float32).contiguous() if both else none_i32
    skip = both and index.n_all.numel() > 0
    t = _tiles("fwd", q.dtype, _block_d(d), both)
    grid = (num_blocks(g * nq, t.m) + (0 if both else 1), bsz * hkv)  # + 1: the block split by the segments
    _aha_fwd[grid](
        q,
        k,
        v,
        *bad,
        gate32,
        index.order if index.order.numel() else none_i32,
        index.n_all if index.n_all.numel() else none_i32,
        out,
        lse if lse.numel() else none_i32,
        branches if branches.numel() else out,
        *rag.pointers(none_i32),
        *_strides(q, k, v),
        hkv,
        nq,
        nk,
        window,
        bsz * hq * nq,
        scale * LOG2E,
        G=g,
        HEAD_DIM=d,
        BOTH=both,
        STORE_BRANCHES=store,
        SKIP=skip,
        **rag.switches(),
        BLOCK_M=t.m,
        BLOCK_N=t.n,
        BLOCK_D=_block_d(d),
        PRECISION=_precision(q.dtype),
        num_warps=t.warps,
        num_stages=t.stages,
    )


def backward(
    dout, q, k, v, gate, out, lse, branches, window: int, scale: float, both: bool, deterministic: bool, seqlens=None,
    leftpad=None, cu_seqlens_q=None, cu_seqlens_k=None, index: Index | None = None, dkdv: Tiles | None = None,
):
    """Gradients of AHA given what :func:`forward` kept (``index``: its Index, computed for the dk/dv tiles
    ``dkdv``, default :func:`dkdv_tiles`; recomputed when None). Returns dq, dk, dv and dgate ([B, Hq, Nq] float32
    when ``both``, else empty). Routed (both=False): the gate must be 0/1. deterministic=False
    accumulates dq with float32 atomics inside the dk/dv pass instead of running a dq pass.
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
    t_kv = dkdv or dkdv_tiles(dtype, d, both)
    want = index_shapes(q.shape, k.shape, both, rag.qpos is not None, True, t_kv.n)
    if index is None:
        index = _index(q, k, gate, window, both, rag, True, t_kv)
    assert tuple(index.ranges.shape) == want[2], (index.ranges.shape, want)
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
    order = index.order if index.order.numel() else none_i32
    n_all = index.n_all if index.n_all.numel() else none_i32
    ranges = index.ranges if index.ranges.numel() else none_i32
    dk = torch.empty((bsz, hkv, nk, d), dtype=dtype, device=dev)
    dv = torch.empty((bsz, hkv, nk, d), dtype=dtype, device=dev)
    dq = (
        torch.empty((bsz, hq, nq, d), dtype=dtype, device=dev)
        if deterministic
        else torch.zeros((bsz, hq, nq, d), dtype=torch.float32, device=dev)
    )
    strides = _strides(q, k, v)
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
        t_q = _tiles("dq", dtype, block_d, both)
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
