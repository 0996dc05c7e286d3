"""The ``triton`` backend: kernels against the float64 reference, dispatch, index pass, torch.compile.

Without a GPU the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1,
set below before triton is imported); with TRITON_INTERPRET=0 and a GPU they run on CUDA.
Small tiles (16) are forced in most tests so that a few dozen tokens already span
several query and key blocks.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'aha-attention[triton]')")

import aha  # noqa: E402
from aha import reference  # noqa: E402
from aha.torch_ops import group_rows, route_order  # noqa: E402
from aha.window import num_blocks, position_offset  # noqa: E402
from aha_triton import _index, _launch, ops  # noqa: E402
from aha_triton import plugin as triton_plugin  # noqa: E402
from aha_triton._launch import Tiles, tiles  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

SMALL = {"fwd": Tiles(16, 16), "dkdv": Tiles(16, 16), "dq": Tiles(16, 16)}
# (forward, gradient) tolerance relative to max(1, max|ref|)
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 6e-2)}


@pytest.fixture(autouse=True)
def small_tiles():
    with tiles(**SMALL):
        yield


def _np(x):
    return x.detach().to("cpu", torch.float64).numpy()


def _inputs(b, hq, hkv, nq, nk, d, dtype, gate="random", seed=0, share=0.3):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, hq, nq, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, hkv, nk, d, generator=gen) for _ in range(2))
    u = torch.rand(b, hq, nq, generator=gen)
    g = {"random": (u < share).double(), "all": torch.ones_like(u), "here": torch.zeros_like(u), "soft": u}[gate]
    return [x.to(DEVICE, dtype) for x in (q, k, v, g, dout)]


def _close(name, got, ref, dtype, kind=0):
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    err = float(np.abs(_np(got) - ref).max()) / scale if ref.size else 0.0
    assert err <= TOL[dtype][kind], f"{name} ({dtype}): relative error {err:.3g} > {TOL[dtype][kind]}"


CASES = [  # B, Hq, Hkv, Nq, Nk, D, window
    (1, 2, 1, 1, 1, 16, 1),
    (1, 2, 1, 17, 17, 16, 4),
    (2, 4, 2, 33, 33, 40, 8),
    (1, 3, 1, 70, 70, 64, 17),
    (1, 2, 2, 5, 33, 16, 6),  # Nq < Nk
    (1, 4, 1, 33, 70, 48, 100),  # window > Nk: Here == All
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hkv{}Nq{}Nk{}D{}w{}".format(*c))
@pytest.mark.parametrize("gate", ["random", "all", "here", "soft"])
def test_forward_matches_reference(case, gate):
    *shape, window = case
    q, k, v, g, _ = _inputs(*shape, torch.float32, gate=gate, seed=sum(case))
    out = aha.attention(q, k, v, g, window=window, backend="triton")
    _close("out", out, reference.attention(_np(q), _np(k), _np(v), _np(g), window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate_grad", [False, True], ids=["routed", "gate-grad"])
def test_gradients_match_reference(dtype, gate_grad):
    q, k, v, g, dout = _inputs(1, 4, 2, 33, 40, 40, dtype, seed=3)
    for x in (q, k, v):
        x.requires_grad_(True)
    g.requires_grad_(gate_grad)
    out = aha.attention(q, k, v, g, window=7, backend="triton")
    wrt = [q, k, v] + ([g] if gate_grad else [])
    grads = torch.autograd.grad(out, wrt, dout)
    ref = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), 7, _np(dout))
    _close("out", out, reference.attention(_np(q), _np(k), _np(v), _np(g), 7), dtype)
    for name, got, r in zip(("dq", "dk", "dv", "dgate"), grads, ref):
        assert got.dtype == dtype
        _close(name, got, r, dtype, kind=1)


@pytest.mark.parametrize(("d", "tiles_of"), [(128, torch.bfloat16), (256, torch.bfloat16), (128, torch.float32)])
@pytest.mark.parametrize("gate_grad", [False, True], ids=["routed", "gate-grad"])
def test_gpu_tile_sizes(d, tiles_of, gate_grad):
    """The tile sizes used on GPUs (_launch.TILES: per dtype, head dim and branch), over enough tokens for
    several blocks of each kernel; float32 inputs, so that the tolerance is float32's."""
    q, k, v, g, dout = _inputs(1, 4, 2, 150, 170, d, torch.float32, seed=d)
    for x in (q, k, v):
        x.requires_grad_(True)
    g.requires_grad_(gate_grad)
    with _launch.gpu_tile_sizes(tiles_of):
        out = ops.attention(q, k, v, g, window=40, deterministic=True)
        grads = torch.autograd.grad(out, [q, k, v] + ([g] if gate_grad else []), dout)
    args = (_np(q), _np(k), _np(v), _np(g), 40)
    _close("out", out, reference.attention(*args), torch.float32)
    for name, got, r in zip(("dq", "dk", "dv", "dgate"), grads, reference.attention_vjp(*args, _np(dout))):
        _close(name, got, r, torch.float32, kind=1)


@pytest.mark.parametrize("gate", ["soft", "bool", "all", "here"])
def test_gradients_other_gates(gate):
    """Soft gate without grad (recomputed backward), bool gate, and one-branch gates."""
    q, k, v, g, dout = _inputs(2, 2, 1, 17, 17, 16, torch.float32, gate="soft" if gate == "soft" else "random", seed=5)
    g = {"bool": g.bool(), "all": torch.ones_like(g), "here": torch.zeros_like(g)}.get(gate, g)
    for x in (q, k, v):
        x.requires_grad_(True)
    grads = torch.autograd.grad(aha.attention(q, k, v, g, window=3, backend="triton"), [q, k, v], dout)
    ref = reference.attention_vjp(_np(q), _np(k), _np(v), _np(g), 3, _np(dout))
    for name, got, r in zip(("dq", "dk", "dv"), grads, ref):
        _close(name, got, r, torch.float32, kind=1)


@pytest.mark.parametrize("gate_grad", [False, True], ids=["routed", "gate-grad"])
def test_deterministic_gradients_are_bitwise_repeatable(gate_grad):
    q, k, v, g, dout = _inputs(1, 4, 2, 40, 40, 16, torch.float32, seed=11)
    leaves = [x.requires_grad_(True) for x in (q, k, v)] + ([g.requires_grad_(True)] if gate_grad else [])

    def grads(deterministic):
        out = ops.attention(q, k, v, g, window=5, deterministic=deterministic)
        return torch.autograd.grad(out, leaves, dout)

    first, second, fused = grads(True), grads(True), grads(False)
    for a, b, c in zip(first, second, fused):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)  # the atomic dq pass agrees


def test_deterministic_follows_torch_setting(monkeypatch):
    seen = []
    real = _launch.backward
    monkeypatch.setattr(_launch, "backward", lambda *a, **kw: seen.append(a[11]) or real(*a, **kw))  # a[11]: deterministic
    q, k, v, g, dout = _inputs(1, 2, 1, 9, 9, 16, torch.float32)
    q.requires_grad_(True)
    for flag in (True, False):
        torch.use_deterministic_algorithms(flag)
        try:
            aha.attention(q, k, v, g, window=3, backend="triton").backward(dout)
        finally:
            torch.use_deterministic_algorithms(False)
    assert seen == [True, False]


def _fwd_modes(monkeypatch):
    """Record BOTH, STORE_BRANCHES and SKIP of every forward launch."""
    modes = []
    kernel = _launch._aha_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                modes.append((kw["BOTH"], kw["STORE_BRANCHES"], kw["SKIP"]))
                return kernel[grid](*args, **kw)

            return launch

    monkeypatch.setattr(_launch, "_aha_fwd", Spy())
    return modes


def test_hard_gate_without_grad_runs_only_the_selected_branch(monkeypatch):
    """A float gate needs no host check: the routed launch is followed by one that computes only the kv
    groups with a soft value (none for a 0/1 gate); a bool gate needs no second launch."""
    modes = _fwd_modes(monkeypatch)
    q, k, v, g, dout = _inputs(1, 2, 1, 17, 17, 16, torch.float32)
    q.requires_grad_(True)
    routed, soft_groups = (False, False, False), (True, False, True)
    aha.attention(q, k, v, g, window=4, backend="triton").backward(dout)  # routed; q's grad needs no branch
    aha.attention(q, k, v, g.requires_grad_(True), window=4, backend="triton")  # dgate needs both branches
    with torch.no_grad():
        aha.attention(q, k, v, g, window=4, backend="triton")  # no grad at all: routed again
    aha.attention(q, k, v, g.detach().bool(), window=4, backend="triton")  # bool: routed, nothing else
    assert modes == [routed, soft_groups, (True, True, False), routed, soft_groups, routed]


def test_soft_gate_without_grad_needs_no_host_sync(monkeypatch):
    """A soft gate without grad (no backward): routed, then both branches for the groups that need them,
    with no host check of the gate's values; a kv group of 0/1 values keeps its routed output."""
    calls = []
    monkeypatch.setattr(ops, "_routable", lambda gate: calls.append(1) or True)
    q, k, v, g, _ = _inputs(2, 4, 2, 20, 20, 16, torch.float32, gate="soft", seed=9)
    g[0, 2:] = (g[0, 2:] > 0.5).to(g.dtype)  # batch 0, kv group 1: a 0/1 gate
    with torch.no_grad():
        out = aha.attention(q, k, v, g, window=5, backend="triton")
    assert calls == []
    _close("out", out, reference.attention(_np(q), _np(k), _np(v), _np(g), 5), torch.float32)



@pytest.mark.parametrize("gate", ["bool", "float", "gate-grad", "packed"])
def test_the_forward_computes_the_index_once_for_its_backward(monkeypatch, gate):
    """route_order (one sort) and dkdv_ranges (the dk/dv pass's key-block ranges) run in the forward only; the
    backward reuses what the forward saved. The gate is checked on the host (one sync) only in the backward of a
    float gate without grad (a soft one needs both branches recomputed; a bool gate needs no check); the gradients
    match the reference."""
    calls = []
    for name in ("route_order", "dkdv_ranges"):
        fn = getattr(_launch, name)
        monkeypatch.setattr(_launch, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    routable = ops._routable
    monkeypatch.setattr(ops, "_routable", lambda g: g.dtype == torch.bool or calls.append("host check") or routable(g))
    q, k, v, g, dout = _inputs(1, 4, 2, 40, 40, 16, torch.float32, seed=3)
    rag = {}
    if gate == "packed":
        rag = {"cu_seqlens_q": torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)}
        rag["cu_seqlens_k"] = rag["cu_seqlens_q"]
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    g = {"bool": g.bool(), "float": g, "gate-grad": g.clone().requires_grad_(True), "packed": g}[gate]
    out = aha.attention(*leaves, g, window=6, backend="triton", **rag)
    forward = list(calls)
    grads = torch.autograd.grad(out, leaves, dout)
    routed = ["route_order", "dkdv_ranges"]
    assert forward == {"bool": routed, "float": routed, "gate-grad": [], "packed": routed}[gate]
    assert calls[len(forward):] == (["host check"] if gate in ("float", "packed") else [])
    want = reference.attention_vjp(*(_np(x) for x in (q, k, v, g)), 6, _np(dout),
                                   **{key: x.cpu().numpy() for key, x in rag.items()})
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        _close(name, got, ref, torch.float32, 1)

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-pass"])
@pytest.mark.parametrize("gate_grad", [False, True], ids=["routed", "gate-grad"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_poisoned_keys_outside_a_window_do_not_leak(gate_grad, bad, deterministic):
    """NaN/inf keys outside a Here token's window leave its output and its dq unchanged."""
    nq = nk = 40
    window = 6
    q, k, v, g, dout = _inputs(1, 2, 1, nq, nk, 16, torch.float32, seed=2)
    j = torch.tensor([3, 20])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, j], v2[:, :, j] = bad, bad
    pos = position_offset(nq, nk) + torch.arange(nq, device=DEVICE)
    reads = ((pos[:, None] >= j.to(DEVICE)) & (pos[:, None] - window < j.to(DEVICE))).any(1)
    clean = (g == 0) & ~reads  # (B, Hq, Nq)
    assert clean.sum() > 10

    def run(k, v):
        qq, gg = q.clone().requires_grad_(True), g.clone().requires_grad_(gate_grad)
        out = ops.attention(qq, k, v, gg, window=window, deterministic=deterministic)
        (dq,) = torch.autograd.grad(out, [qq], dout)
        return out, dq

    out0, dq0 = run(k, v)
    out1, dq1 = run(k2, v2)
    assert torch.isfinite(out1[clean]).all() and torch.isfinite(dq1[clean]).all()
    torch.testing.assert_close(out1[clean], out0[clean], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dq1[clean], dq0[clean], rtol=1e-5, atol=1e-6)
    assert not torch.isfinite(out1[g == 1]).all()  # All tokens do read the poisoned keys


SEQLEN_CASES = [  # B, Hq, Hkv, Nq, Nk, D, window, cache_seqlens
    (3, 4, 2, 1, 40, 16, 6, (40, 17, 1)),  # decode: one query per sequence, GQA
    (2, 3, 1, 5, 37, 16, 9, (12, 37)),  # chunked prefill: Nq > 1, a window wider than a block
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-pass"])
@pytest.mark.parametrize("mode", ["routed", "gate-grad", "soft"])
@pytest.mark.parametrize("case", SEQLEN_CASES, ids=lambda c: "B{}Hq{}Hkv{}Nq{}Nk{}D{}w{}L{}".format(*c))
def test_cache_seqlens_match_reference_with_nan_past_each_length(case, mode, deterministic):
    """Sequence b reads k[b, :, :L_b] only: NaN past L_b stays out of the output and the gradients,
    which match the reference; dk and dv past L_b are exactly 0."""
    *shape, window, lens = case
    q, k, v, g, dout = _inputs(*shape, torch.float32, gate="soft" if mode == "soft" else "random", seed=shape[3])
    for b, n in enumerate(lens):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    leaves = [x.requires_grad_(True) for x in (q, k, v)] + ([g.requires_grad_(True)] if mode == "gate-grad" else [])
    seqlens = torch.tensor(lens, device=DEVICE)
    out = ops.attention(q, k, v, g, window=window, deterministic=deterministic, cache_seqlens=seqlens)
    grads = torch.autograd.grad(out, leaves, dout)
    args = (_np(q), _np(k), _np(v), _np(g), window)
    assert torch.isfinite(out).all()
    _close("out", out, reference.attention(*args, cache_seqlens=lens), torch.float32)
    for name, got, r in zip(("dq", "dk", "dv", "dgate"), grads, reference.attention_vjp(*args, _np(dout), cache_seqlens=lens)):
        assert torch.isfinite(got).all(), name
        _close(name, got, r, torch.float32, kind=1)
    for b, n in enumerate(lens):
        assert not grads[1][b, :, n:].any() and not grads[2][b, :, n:].any()


def test_cache_seqlens_through_aha_attention_equal_one_sequence_at_a_time():
    """The dispatcher passes cache_seqlens on (int64 on the way in); each row equals its sequence run alone."""
    q, k, v, g, _ = _inputs(2, 2, 1, 3, 20, 16, torch.float32, seed=6)
    lens = torch.tensor([20, 7], device=DEVICE)
    out = aha.attention(q, k, v, g, window=4, cache_seqlens=lens, backend="triton")
    for b, n in enumerate(lens.tolist()):
        alone = aha.attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], g[b : b + 1], window=4, backend="triton")
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-5, atol=1e-6)


def _ragged_grads(q, k, v, g, dout, window, mode, deterministic, rag):
    """out and the gradients (dq, dk, dv[, dgate]) through aha.attention(..., backend="triton")."""
    q, k, v, g = (x.clone() for x in (q, k, v, g))
    leaves = [x.requires_grad_(True) for x in (q, k, v)] + ([g.requires_grad_(True)] if mode == "gate-grad" else [])
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = aha.attention(q, k, v, g, window=window, backend="triton", **rag)
        return out, torch.autograd.grad(out, leaves, dout)
    finally:
        torch.use_deterministic_algorithms(False)


def _reference(q, k, v, g, dout, window, rag):
    """The float64 reference forward and VJP (dq, dk, dv, dgate) of a ragged call."""
    args = (_np(q), _np(k), _np(v), _np(g), window)
    rag = {name: _np(x).astype(np.int64) for name, x in rag.items()}
    return reference.attention(*args, **rag), reference.attention_vjp(*args, _np(dout), **rag)


def _finite_and_close(out, grads, ref_out, ref_grads):
    """out and dq, dk, dv[, dgate] are finite and within float32 tolerance of the reference."""
    for name, got, r in zip(("out", "dq", "dk", "dv", "dgate"), (out, *grads), (ref_out, *ref_grads)):
        assert torch.isfinite(got).all(), name
        _close(name, got, r, torch.float32, kind=int(name != "out"))


LEFTPAD_CASES = [  # B, Hq, Hkv, Nq, Nk, D, window, cache_leftpad, cache_seqlens
    (3, 4, 2, 20, 45, 16, 6, (0, 7, 38), (45, 40, 45)),  # chunked prefill; row 2: 13 padding queries
    (2, 3, 1, 33, 33, 16, 40, (0, 13), None),  # left-padded prefill (generate), window >= every length
]


# soft: the kernels of gate-grad, without storing the branches in the forward
RAGGED_MODES = [("routed", False), ("routed", True), ("gate-grad", False), ("gate-grad", True), ("soft", True)]


@pytest.mark.parametrize(("mode", "deterministic"), RAGGED_MODES, ids=lambda x: {False: "atomic-dq", True: "dq-pass"}.get(x, x))
@pytest.mark.parametrize("case", LEFTPAD_CASES, ids=lambda c: "B{}Hq{}Hkv{}Nq{}Nk{}D{}w{}lp{}L{}".format(*c))
def test_cache_leftpad_matches_reference_with_nan_in_every_padding_slot(case, mode, deterministic):
    """Row b reads keys [lp_b, L_b) only: NaN in the padding keys, and in the q and k/v slots of padding
    queries, reaches nothing; forward and the four gradients match the reference; padding queries
    output exactly 0 and get exactly 0 gradient, padding keys too."""
    *shape, window, pads, lens = case
    bsz, _, _, nq, nk, _ = shape
    q, k, v, g, dout = _inputs(*shape, torch.float32, gate="soft" if mode == "soft" else "random", seed=nq)
    lens = lens or (nk,) * bsz
    rag = {"cache_leftpad": torch.tensor(pads, device=DEVICE)}
    if case[-1] is not None:
        rag["cache_seqlens"] = torch.tensor(lens, device=DEVICE)
    padq = torch.zeros(bsz, nq, dtype=torch.bool, device=DEVICE)  # queries before their row's first key
    for b, (lp, n) in enumerate(zip(pads, lens)):
        k[b, :, :lp], v[b, :, :lp] = float("nan"), float("inf")
        k[b, :, n:], v[b, :, n:] = float("inf"), float("nan")
        padq[b] = n - nq + torch.arange(nq, device=DEVICE) < lp
    assert padq.any()
    q[padq[:, None].expand_as(g)] = float("nan")
    out, grads = _ragged_grads(q, k, v, g, dout, window, mode, deterministic, rag)
    ref_out, ref_grads = _reference(q, k, v, g, dout, window, rag)
    _finite_and_close(out, grads, ref_out, ref_grads)
    pad = padq[:, None].expand_as(g)
    assert not out[pad].any() and not grads[0][pad].any()
    assert mode != "gate-grad" or not grads[3][pad].any()
    for b, (lp, n) in enumerate(zip(pads, lens)):
        for dkv in grads[1:3]:
            assert not dkv[b, :, :lp].any() and not dkv[b, :, n:].any()


# B = 1, Hq, Hkv, D; 5 sequences: Nq < Nk, no queries, Nq = Nk twice (blocks of 16 straddle them), Nq < Nk
PACKED = (1, 4, 2, 16)
CU_Q, CU_K = (0, 3, 3, 20, 31, 40), (0, 5, 9, 26, 37, 50)


def _packed_inputs(mode, seed):
    q, k, v, g, dout = _inputs(*PACKED[:3], CU_Q[-1], CU_K[-1], PACKED[3], torch.float32,
                               gate="soft" if mode == "soft" else "random", seed=seed)
    rag = {"cu_seqlens_q": torch.tensor(CU_Q, device=DEVICE), "cu_seqlens_k": torch.tensor(CU_K, device=DEVICE)}
    return q, k, v, g, dout, rag


@pytest.mark.parametrize(("window", "mode", "deterministic"), [(6, *m) for m in RAGGED_MODES]
                         + [(64, "routed", False), (64, "gate-grad", True)],  # 64: window >= every length
                         ids=lambda x: {False: "atomic-dq", True: "dq-pass"}.get(x, str(x)))
def test_packed_sequences_match_reference(window, mode, deterministic):
    """Packed sequences (cu_seqlens_q / _k) in one launch per kernel: forward and the four gradients
    match the reference; NaN/inf in the keys of a sequence without queries reach nothing, and those
    keys get exactly 0 gradient."""
    q, k, v, g, dout, rag = _packed_inputs(mode, seed=window)
    k[:, :, CU_K[1] : CU_K[2]], v[:, :, CU_K[1] : CU_K[2]] = float("nan"), float("inf")
    out, grads = _ragged_grads(q, k, v, g, dout, window, mode, deterministic, rag)
    ref_out, ref_grads = _reference(q, k, v, g, dout, window, rag)
    _finite_and_close(out, grads, ref_out, ref_grads)
    for dkv in grads[1:3]:
        assert not dkv[:, :, CU_K[1] : CU_K[2]].any()


@pytest.mark.parametrize(("mode", "deterministic"), [("routed", False), ("gate-grad", True)],
                         ids=["routed-atomic-dq", "gate-grad-dq-pass"])
def test_packed_keys_of_one_sequence_never_reach_another(mode, deterministic):
    """NaN keys and inf values in sequence 3 leave every other sequence's output and gradients
    (dq, dgate of its queries; dk, dv of its keys) finite and equal to the reference on clean inputs."""
    q, k, v, g, dout, rag = _packed_inputs(mode, seed=9)
    ref_out, ref_grads = _reference(q, k, v, g, dout, 6, rag)
    (q0, q1), (k0, k1) = CU_Q[3:5], CU_K[3:5]
    k[:, :, k0:k1], v[:, :, k0:k1] = float("nan"), float("inf")
    out, grads = _ragged_grads(q, k, v, g, dout, 6, mode, deterministic, rag)
    others_q = torch.ones(CU_Q[-1], dtype=torch.bool)
    others_q[q0:q1] = False
    others_k = torch.ones(CU_K[-1], dtype=torch.bool)
    others_k[k0:k1] = False
    assert not torch.isfinite(out[:, :, q0:q1]).all()  # sequence 3's All tokens read the poison
    keep = (others_q, others_k, others_k, others_q)  # dq, dk, dv, dgate
    _finite_and_close(out[:, :, others_q.to(DEVICE)], [x[:, :, m.to(DEVICE)] for x, m in zip(grads, keep)],
                      ref_out[:, :, others_q.numpy()], [x[:, :, m.numpy()] for x, m in zip(ref_grads, keep)])


@pytest.mark.parametrize(("case", "mode", "deterministic"), [("packed", "routed", False), ("leftpad", "gate-grad", True)])
def test_ragged_batches_with_gpu_tile_sizes(case, mode, deterministic):
    """The bfloat16 GPU tile sizes (query blocks of 128 in the forward, key blocks of 64 in dk/dv) over
    sequences of 90 and more keys: packed, and left-padded rows, against the reference."""
    if case == "packed":
        shape, cu_q, cu_k = (1, 4, 2, 200, 230, 64), (0, 70, 75, 160, 200), (0, 90, 100, 190, 230)
        rag = {"cu_seqlens_q": torch.tensor(cu_q, device=DEVICE), "cu_seqlens_k": torch.tensor(cu_k, device=DEVICE)}
    else:
        shape = (2, 4, 2, 150, 170, 64)
        rag = {"cache_leftpad": torch.tensor([30, 100], device=DEVICE), "cache_seqlens": torch.tensor([170, 160], device=DEVICE)}
    q, k, v, g, dout = _inputs(*shape, torch.float32, seed=len(case))
    with _launch.gpu_tile_sizes(torch.bfloat16):
        out, grads = _ragged_grads(q, k, v, g, dout, 40, mode, deterministic, rag)
    _finite_and_close(out, grads, *_reference(q, k, v, g, dout, 40, rag))


DECODE_GATES = {"hard": lambda u: (u < 0.3).double(), "soft": lambda u: u, "here": torch.zeros_like,
                "all": torch.ones_like}


def _decode_spy(monkeypatch):
    used = []
    real = _launch.decode
    monkeypatch.setattr(_launch, "decode", lambda *a, **kw: used.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setattr(_launch, "DECODE_BLOCKS_PER_SPLIT", 1)  # many splits on a short cache: the merge matters
    return used


@pytest.mark.parametrize("gate", list(DECODE_GATES))
@pytest.mark.parametrize("nq", [1, 4])
def test_split_kv_decode_matches_reference_with_ragged_rows_and_nan(monkeypatch, nq, gate):
    """Decode (no grad, few queries): split-KV kernel and merge against the reference, GQA, cache_seqlens and
    cache_leftpad, hard and soft gates. NaN/inf keys and values sit in padding slots, past each row's length
    and outside every window (never read: no NaN out), and inside rows' ranges (their rows come out NaN)."""
    used = _decode_spy(monkeypatch)
    b, hq, hkv, nk, d, window = 3, 4, 2, 70, 16, 9
    q, k, v, _, _ = _inputs(b, hq, hkv, nq, nk, d, torch.float32, seed=nq)
    g = DECODE_GATES[gate](torch.rand(b, hq, nq, generator=torch.Generator().manual_seed(7))).to(DEVICE, torch.float32)
    seqlens = torch.tensor([70, 50, 12], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
    k[1, :, 20:30], v[1, :, 50:] = float("nan"), float("nan")  # row 1: NaN keys only All reads; past its length
    v[2, :, :10], k[2, :, :10] = float("nan"), float("inf")  # row 2: its padding slots
    v[0, :, 3] = float("nan")  # row 0: far outside every window
    with tiles(decode=Tiles(16, 16)):
        out = aha.attention(q, k, v, g, window=window, backend="triton", cache_seqlens=seqlens, cache_leftpad=leftpad)
    assert used, "the split-KV decode kernel did not run"
    ref = reference.attention(_np(q), _np(k), _np(v), _np(g), window, cache_seqlens=seqlens.cpu().numpy(),
                              cache_leftpad=leftpad.cpu().numpy())
    got = _np(out)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    if gate == "here":  # no row reads row 1's NaN keys through its window, or row 0's far NaN value
        assert np.isfinite(ref[[0, 1]]).all()
    _close("out", torch.from_numpy(np.nan_to_num(got)), np.nan_to_num(ref), torch.float32)


def test_split_kv_decode_groups_of_here_rows_see_only_their_windows(monkeypatch):
    """A kv group whose query heads are all Here depends only on their windows (the kernel reads no other
    key block of it): every other key and value is NaN, and its outputs are finite and equal the reference;
    a bfloat16 cache, its tolerance."""
    _decode_spy(monkeypatch)
    b, hq, hkv, nk, d, window = 2, 4, 2, 90, 32, 6
    q, k, v, _, _ = _inputs(b, hq, hkv, 1, nk, d, torch.bfloat16, seed=3)
    g = torch.zeros(b, hq, 1, device=DEVICE, dtype=torch.bfloat16)
    g[1, 2] = 1  # batch 1, kv head 1 has an All head: it reads its whole cache
    k[:, 0, : nk - window], v[:, 0, : nk - window] = float("nan"), float("nan")
    k[0, 1, : nk - window] = float("nan")
    with tiles(decode=Tiles(16, 16)):
        out = aha.attention(q, k, v, g, window=window, backend="triton")
    ref = reference.attention(_np(q), _np(k), _np(v), _np(g), window)
    assert np.isfinite(_np(out)[:, :2]).all() and np.isfinite(_np(out)[0]).all()
    _close("out", out, ref, torch.bfloat16)


def test_decode_kernel_serves_only_forwards_without_grad(monkeypatch):
    used = _decode_spy(monkeypatch)
    q, k, v, g, dout = _inputs(1, 2, 1, 1, 20, 16, torch.float32)
    aha.attention(q.requires_grad_(True), k, v, g, window=4, backend="triton").backward(dout[:, :, :1])
    assert used == []
    with torch.no_grad():
        aha.attention(q, k, v, g, window=4, backend="triton")
    assert len(used) == 1


def test_route_order_is_a_stable_partition():
    gen = torch.Generator().manual_seed(0)
    is_all = torch.rand(2, 6, 23, generator=gen) < 0.3
    order, n_all = route_order(is_all, heads_kv=2)  # (4, 69), (4,)
    rows = group_rows(is_all, 2)  # (4, 69), row = i * 3 + hl
    for bh in range(4):
        want = torch.cat([torch.nonzero(rows[bh]).flatten(), torch.nonzero(~rows[bh]).flatten()])
        assert torch.equal(order[bh].long(), want)
        assert n_all[bh] == rows[bh].sum()


RANGE_CASES = {  # B and the ragged arguments of a problem with Nq = 37, Nk = 45
    "Nk": (1, {}),
    "cache_seqlens": (3, {"cache_seqlens": (45, 38, 37)}),
    "cache_leftpad": (3, {"cache_seqlens": (45, 38, 41), "cache_leftpad": (0, 9, 30)}),  # row 2: 26 padding queries
    "packed": (1, {"cu_seqlens_q": (0, 10, 10, 30, 37), "cu_seqlens_k": (0, 12, 15, 38, 45)}),  # one without queries
}


def _query_keys(bsz, nq, nk, rag):
    """Oracle from aha.sequences: keys [start, pos] of each query's sequence, None for a padding query."""
    from aha.sequences import segments

    keys = [[None] * nq for _ in range(bsz)]
    for sg in segments(bsz, nq, nk, **rag):
        for i in range(sg.q_lo, sg.q_hi):
            keys[sg.batch][i] = (sg.k_lo, sg.k_hi - sg.q_hi + i)
    return keys


@pytest.mark.parametrize("case", RANGE_CASES)
@pytest.mark.parametrize("window", [1, 5, 40])
def test_dkdv_ranges_cover_the_touched_blocks(window, case):
    """Each key block's query block ranges (routed segments, and BOTH's natural order) cover every
    query block with a row that reads a key of it (exactly those, without left padding or packing),
    and blocks said to see the whole key block have every row read all of its keys."""
    nq, nk, hkv, g, bm, bn = 37, 45, 2, 2, 8, 8
    bsz, rag = RANGE_CASES[case]
    keys = _query_keys(bsz, nq, nk, rag)
    gen = torch.Generator().manual_seed(window)
    is_all = torch.rand(bsz, hkv * g, nq, generator=gen) < 0.4
    order, n_all = route_order(is_all, heads_kv=hkv)
    t = {name: torch.tensor(val, dtype=torch.int32) for name, val in rag.items()}
    qpos = qstart = None
    if case == "packed":
        qpos, qstart = _launch.packed_positions(t["cu_seqlens_q"], t["cu_seqlens_k"], nq)
    pos, start = _index.query_bounds(bsz, hkv, nq, nk, "cpu", t.get("cache_seqlens"), t.get("cache_leftpad"),
                                     qpos, qstart)
    exact = case in ("Nk", "cache_seqlens")
    for both in (False, True):
        ranges = _index.dkdv_ranges(None if both else (order, n_all), pos, start, nk, g, window, bm, bn)
        for bh in range(order.shape[0]):
            na = int(n_all[bh])
            segs = [(None, 0, g * nq)] if both else [(True, 0, na), (False, na, g * nq)]
            for seg, (seg_all, lo, hi) in enumerate(segs):
                for tb in range(num_blocks(hi - lo, bm)):
                    slots = range(lo + tb * bm, min(lo + (tb + 1) * bm, hi))
                    rows = list(slots) if both else order[bh, lo + tb * bm : slots.stop].tolist()
                    reads = []  # per row: keys [first, last] it reads in this segment's branch, None if none
                    for r in rows:
                        kr = keys[bh // hkv][r // g]
                        first = None if kr is None else (kr[0] if seg_all in (True, None) else max(kr[0], kr[1] - window + 1))
                        reads.append(None if kr is None else (first, kr[1]))
                    for kb in range(num_blocks(nk, bn)):
                        k_first, k_last = kb * bn, min(kb * bn + bn, nk) - 1
                        r0, r1, r2, r3 = ranges[bh, kb, 4 * seg : 4 * seg + 4].tolist()
                        touched = any(x is not None and max(x[0], k_first) <= min(x[1], k_last) for x in reads)
                        visited, whole = r0 <= tb < r3, r1 <= tb < r2
                        assert visited == touched if exact else (visited or not touched), (both, bh, seg, tb, kb)
                        if whole:  # every row reads all of the key block (BOTH: through All only)
                            assert all(x is not None and x[0] <= k_first and k_last <= x[1] for x in reads)
                            assert not both or all(keys[bh // hkv][r // g][1] - window + 1 > k_last for r in rows)


def test_packed_positions_follow_the_sequences():
    cq, ck = (0, 3, 3, 7), (0, 5, 9, 13)  # sequence 1 has keys but no query
    qpos, qstart = _launch.packed_positions(torch.tensor(cq), torch.tensor(ck), 7)
    assert qpos.tolist() == [2, 3, 4, 9, 10, 11, 12] and qstart.tolist() == [0, 0, 0, 9, 9, 9, 9]
    assert qpos.dtype == qstart.dtype == torch.int32


def test_interpreted_kernels_serve_only_calls_that_name_them():
    q, k, v, g, _ = _inputs(1, 2, 1, 8, 8, 16, torch.float32)
    chosen = aha.select(q, k, v, g, window=3)
    assert (chosen != "triton") if INTERPRET else (chosen == "triton")
    assert aha.select(q, k, v, g, window=3, backend="triton") == "triton"


def test_capabilities_and_availability(monkeypatch):
    row = next(r for r in aha.backends() if r.name == "triton")
    assert row.status == "available" and row.backend.priority == (-1 if INTERPRET else 100)
    caps = row.backend.capabilities
    assert caps.head_dims == (16, 256) and "bfloat16" in caps.dtypes and "cuda" in caps.devices and caps.seqlens
    assert caps.leftpad and caps.packed
    assert ("cpu" in caps.devices) == INTERPRET
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = triton_plugin._available()
    assert "NVIDIA GPU" in reason and "TRITON_INTERPRET=1" in reason


def test_custom_op_passes_opcheck():
    q, k, v, g, _ = _inputs(1, 2, 1, 9, 12, 16, torch.float32, seed=1)
    kv = [16, 16, 4, 2]  # dk/dv tiles: m, n, warps, stages
    for both, gate in ((False, g), (True, g.clone().requires_grad_(True))):
        args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), gate, 3, 0.25, both, True, True,
                kv)
        torch.library.opcheck(ops.aha_forward, args)
    seqlens = torch.tensor([10], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.aha_forward, (q, k, v, g.clone().requires_grad_(True), 3, 0.25, True, True, True, kv,
                                            seqlens))
    leftpad = torch.tensor([4], dtype=torch.int32, device=DEVICE)  # queries 1..3 are padding
    torch.library.opcheck(ops.aha_forward, (q, k, v, g, 3, 0.25, False, False, True, kv, seqlens, leftpad))
    cu_q, cu_k = torch.tensor([0, 4, 9], device=DEVICE), torch.tensor([0, 5, 12], device=DEVICE)
    torch.library.opcheck(ops.aha_forward, (q, k, v, g.clone().requires_grad_(True), 3, 0.25, True, False, True, kv,
                                            None, None, cu_q, cu_k))


def _traced_by_dynamo(module) -> bool:
    """Dynamo skips files whose path contains e.g. 'triton/backends' (a checkout directory named triton)."""
    from torch._dynamo import trace_rules

    return not trace_rules.check_file(module.__file__).skipped


@pytest.mark.skipif(not _traced_by_dynamo(ops), reason="dynamo skips this checkout's path (contains 'triton/backends')")
def test_torch_compile_fullgraph_through_aha_attention():
    q, k, v, _, dout = _inputs(1, 2, 1, 17, 17, 16, torch.float32, seed=4)
    logits = torch.randn(1, 2, 17, device=DEVICE)

    def step(q, k, v, logits):
        return aha.attention(q, k, v, aha.route(logits), window=4, backend="triton")

    aha.backends()  # dynamo cannot trace loading the plugins: load them before compiling (see docs/plugins.md)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, logits)]
    got = torch.autograd.grad(compiled(*leaves), leaves, dout)
    want = torch.autograd.grad(step(*leaves), leaves, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


COMPILE_RAGGED = {  # B, Nq, Nk, ragged arguments (lists of ints)
    "cache_seqlens": (2, 5, 17, {"cache_seqlens": [17, 9]}),
    "cache_leftpad": (2, 5, 17, {"cache_seqlens": [17, 9], "cache_leftpad": [0, 6]}),  # row 1: 2 padding queries
    "packed": (1, 12, 17, {"cu_seqlens_q": [0, 5, 12], "cu_seqlens_k": [0, 8, 17]}),
}


@pytest.mark.skipif(not _traced_by_dynamo(ops), reason="dynamo skips this checkout's path (contains 'triton/backends')")
@pytest.mark.parametrize("case", COMPILE_RAGGED)
def test_torch_compile_fullgraph_with_ragged_batches(case):
    """cache_seqlens, cache_leftpad and cu_seqlens_q/_k go through torch.compile(fullgraph=True) from
    aha.attention to the custom ops (validation checks their values in eager calls only; max_seqlen_q/_k
    are None there)."""
    bsz, nq, nk, rag = COMPILE_RAGGED[case]
    q, k, v, _, dout = _inputs(bsz, 2, 1, nq, nk, 16, torch.float32, seed=4)
    logits = torch.randn(bsz, 2, nq, device=DEVICE)
    rag = {name: torch.tensor(val, dtype=torch.int32, device=DEVICE) for name, val in rag.items()}

    def step(q, k, v, logits, rag):
        return aha.attention(q, k, v, aha.route(logits), window=4, backend="triton", **rag)

    aha.backends()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, logits)]
    got = torch.autograd.grad(compiled(*leaves, rag), leaves, dout)
    want = torch.autograd.grad(step(*leaves, rag), leaves, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_kernels_compile_for_sm90_without_spilling():
    """The whole GPU pipeline (down to cubin, with the GPU tile sizes) runs offline; see aha_triton._aot.
    bfloat16 at D=128, every plain variant: no spill (ptxas -v), shared memory within an H100/H200's,
    wgmma in every matmul kernel. A tile that does spill is caught (the check can fail)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = (
        "import json, aha_triton._aot as a; from aha_triton._launch import Tiles;"
        "print(json.dumps(a.compile_all(90, 'test')));"
        "print(json.dumps(a.compile_problem(90, 'bfloat16', 128, (), {'fwd': Tiles(64, 128, 4, 2)}, ('_aha_fwd',))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert run.returncode == 0, run.stderr[-3000:]
    rows, spilling = (__import__("json").loads(line) for line in run.stdout.strip().splitlines()[-2:])
    from aha_triton import _aot

    assert {r["kernel"] for r in rows} == set(_aot._KERNELS)  # every kernel of the backend
    for r in rows:
        assert _aot.problems_of(r) == [], r["variant"]
        assert r["stack"] == r["spill_stores"] == 0 and r["shared_triton"] <= _aot.SMEM_LIMIT, r
        if r["kernel"] in ("_aha_fwd", "_aha_bwd_dkdv", "_aha_bwd_dq"):  # decode: 16 rows, mma.sync
            assert r["wgmma"] > 0, f"{r['variant']}: no wgmma"
    routed = next(r for r in spilling if not r["BOTH"])
    assert routed["spill_stores"] > 0 and any("spills" in p for p in _aot.problems_of(routed)), routed
