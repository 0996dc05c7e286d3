"""The conformance suite: properties every AHA backend must satisfy.

Run it with ``python -m aha conformance --backend NAME`` (or ``nox -s conformance``).
Each test takes the ``aha_backend`` fixture of ``aha.testing.pytest_plugin``;
the problems are drawn per backend from what its capabilities declare. A property that
needs a capability the backend does not declare (``grad``, ``cross``, ``seqlens``,
``leftpad``, ``packed``) passes without drawing anything.

Each property draws its problem, then runs one ``check_*`` function on it through `run_check`, so
that a failure carries a ``reproduce:`` line: the call that reruns that check alone, e.g.
``check_forward(backend_under_test('mine'), Case(...), scale=0.5)``, to run after
``from aha.testing.conformance import *``.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, settings
from hypothesis import given as _given
from hypothesis import strategies as st

import aha
from aha import reference
from aha.sequences import Segment, segments
from aha.testing.checks import (
    allowed_error,
    assert_agree,
    assert_close,
    branch_error,
    eager_attention,
    eager_branches,
    eager_fused_grads,
    reference_forward,
    reference_grads,
    to_np,
)
from aha.testing.golden import golden_cases, golden_ragged_cases
from aha.testing.pytest_plugin import BackendUnderTest, backend_under_test  # noqa: F401 (for reproduce: lines)
from aha.testing.strategies import (
    TEST_DTYPES,
    Case,
    DecodeCase,
    Inputs,
    LongCase,
    PackedCase,
    PaddedCase,
    aha_cases,
    decode_cases,
    edge_cases,
    long_cases,
    make_inputs,
    packed_cases,
    padded_cases,
    ragged_edge_cases,
    scale_factors,
)
from aha.torch_ops import all_mask, here_mask, mix
from aha.window import position_offset


def given(**strategies):
    """hypothesis.given with the suite's fixed settings: no deadline (backends differ wildly in speed).

    Under Hypothesis' own ``default`` profile (no profile chosen), a property runs as the ``dev``
    profile of `aha.testing.pytest_plugin` says: 10 examples, derandomized, no example database.
    A run then draws the same problems every time; choose the ``explore`` profile to draw new ones.
    """
    fixed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    if settings.get_current_profile_name() == "default":
        fixed = settings(settings.get_profile("dev"))
    return lambda test: fixed(_given(**strategies)(test))


def _shown(x) -> str:
    """``repr(x)``, but a non-finite float as ``float('nan')`` so that the line runs as Python."""
    if isinstance(x, float) and not math.isfinite(x):
        return f"float({str(x)!r})"
    return repr(x)


def reproduce_line(check, be, *args, **kw) -> str:
    """``reproduce: check(backend_under_test('name'), args..., kw=...)``: the call that reruns one check alone."""
    shown = [f"backend_under_test({be.name!r})"] + [_shown(a) for a in args] + [f"{k}={_shown(v)}" for k, v in kw.items()]
    return f"reproduce: {check.__name__}({', '.join(shown)})"


@contextmanager
def _reporting(line: str):
    """Attach ``line`` to whatever the block raises (an assertion, or a backend's own error)."""
    try:
        yield
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11: pytest and Hypothesis print the note
            e.add_note(line)
            raise
        raise AssertionError(f"{line}\n{e}" if isinstance(e, AssertionError) else line) from e


def run_check(check, be, *args, **kw):
    """``check(be, *args, **kw)``; if it fails, the failure carries its `reproduce_line`.

    Every property goes through here once its problem is drawn and final, so that the line names
    the problem that failed (shapes, dtype, window, gate kind and seed, ragged arguments, scale).
    """
    with _reporting(reproduce_line(check, be, *args, **kw)):
        return check(be, *args, **kw)


def _attend(be, inp, case, gate=None, **kw):
    gate = inp.gate if gate is None else gate
    return aha.attention(inp.q, inp.k, inp.v, gate, window=case.window, backend=be.name, **kw)


def _draw(be, data, max_len: int | None = None, label: str = "case", **kw) -> Case:
    """A case of ``aha_cases`` for the backend, at most ``max_len`` (and ``--aha-max-len``) keys long.

    A property that changes the case before running it says so in ``label``: the ``reproduce:``
    line of a failure holds the case as run.
    """
    max_len = be.max_len if max_len is None else min(max_len, be.max_len)
    return data.draw(aha_cases(be.caps, max_len=max_len, **kw), label=label)


def _eager(inp: Inputs, window: int, scale=None, pieces=None, wrt=()):
    """The same-dtype eager baselines of a low-precision problem: (out, grads, roundings).

    grads: for each of ``wrt``, (torch autograd's, `eager_fused_grads`') gradient of sum(dout * out);
    roundings: the ``rounding`` of `assert_close` (`branch_error` for the gate, None otherwise).
    """
    branches = eager_branches(inp.q, inp.k, inp.v, window, scale, pieces)
    out = mix(inp.gate, *branches)
    if not wrt:
        return out, [], []
    dgate = branch_error(inp.dout, branches, _exact_branches(inp, window, scale, pieces))
    fused = eager_fused_grads(inp.q, inp.k, inp.v, inp.gate, inp.dout, window, scale, pieces)
    by_input = {id(x): f for x, f in zip((inp.q, inp.k, inp.v, inp.gate), fused)}
    grads = [(g, by_input[id(x)]) for x, g in zip(wrt, _grads(out, wrt, inp.dout))]
    return out, grads, [dgate if x is inp.gate else None for x in wrt]


def _exact_branches(inp: Inputs, window: int, scale=None, pieces=None):
    """(All, Here) in float64, for `branch_error`."""
    with torch.no_grad():
        return eager_branches(*(x.double() for x in (inp.q, inp.k, inp.v)), window, scale, pieces)


def check_forward(be, case: Case, scale: float | None = None) -> None:
    """``out`` of ``case`` (at softmax ``scale``; None: 1/sqrt(D)) against the reference."""
    inp = make_inputs(case, be.device)
    out = _attend(be, inp, case, scale=scale)
    assert out.dtype == inp.q.dtype and out.device == inp.q.device
    base = eager_attention(inp.q, inp.k, inp.v, inp.gate, case.window, scale) if case.dtype in ("float16", "bfloat16") else None
    assert_close("out", out, reference_forward(inp, case.window, scale), case.dtype, baseline=base)


def check_gradients(be, case: Case, gate_grad: bool = True, scale: float | None = None) -> None:
    """dq, dk, dv (and dgate if ``gate_grad``) of ``case`` against the reference VJP."""
    inp = make_inputs(case, be.device, requires_grad=True)
    inp.gate.requires_grad_(gate_grad)
    wrt = [inp.q, inp.k, inp.v] + ([inp.gate] if gate_grad else [])
    ref = reference_grads(inp, case.window, scale)
    got = _backend_grads(_attend(be, inp, case, scale=scale), wrt, inp.dout, ref)
    bases, roundings = [None] * 4, [None] * 4
    if _low(case.dtype):
        _, bases, roundings = _eager(inp, case.window, scale, wrt=wrt)
    for name, g, r, b, rnd in zip(_NAMES, got, ref, bases, roundings):
        assert_close(name, g, r, case.dtype, kind="grad", baseline=b, rounding=rnd)


@given(data=st.data())
def test_forward_matches_reference(aha_backend, data):
    run_check(check_forward, aha_backend, _draw(aha_backend, data))


def test_forward_edge_cases(aha_backend):
    for case in edge_cases(aha_backend.caps):
        run_check(check_forward, aha_backend, case)


@given(data=st.data())
def test_gradients_match_reference(aha_backend, data):
    if not aha_backend.caps.grad:
        return
    case = _draw(aha_backend, data)
    gate_grad = data.draw(st.booleans(), label="gate_grad") or case.gate == "soft"
    run_check(check_gradients, aha_backend, case, gate_grad=gate_grad)


def test_gradient_edge_cases(aha_backend):
    if aha_backend.caps.grad:
        for case in edge_cases(aha_backend.caps):
            run_check(check_gradients, aha_backend, case)


def _pinned_scale_case(caps) -> Case:
    """The problem of the scale property's pinned example: GQA, a soft gate, Nq < Nk if ``cross``."""
    d = max(caps.head_dims[0], min(16, caps.head_dims[1]))
    dtype = next(t for t in TEST_DTYPES if t in caps.dtypes)
    nq = 7 if caps.cross else 19
    return Case(1, 4, 2, nq, 19, d, 5, "soft", dtype, seed=31)


@given(data=st.data(), factor=scale_factors())
@example(data=None, factor=4.0)
def test_scale_is_the_callers(aha_backend, data, factor):
    """A non-default ``scale`` (``factor`` times 1/sqrt(D)) multiplies the scores: out and dq, dk, dv,
    dgate match the reference at that scale.

    The pinned example (``data=None``) runs `_pinned_scale_case` at 4x the default scale. Drawn problems
    are at most 97 keys long (several tiles of a blocked kernel); longer ones run at the default scale.
    """
    be = aha_backend
    case = _pinned_scale_case(be.caps) if data is None else _draw(be, data, max_len=97)
    scale = factor * case.D**-0.5
    run_check(check_forward, be, case, scale=scale)
    if be.caps.grad:
        run_check(check_gradients, be, case, gate_grad=True, scale=scale)


@given(data=st.data())
def test_route_gradient_reaches_logits(aha_backend, data):
    """d loss / d logits through aha.route (straight-through) matches the reference."""
    if aha_backend.caps.grad:
        run_check(check_route_gradient, aha_backend, _draw(aha_backend, data, gates=("random",)))


def check_route_gradient(be, case: Case) -> None:
    """d loss / d logits through aha.route of logits drawn from ``case.seed`` against the reference's."""
    inp = make_inputs(case, be.device)
    logits = (torch.randn(inp.gate.shape, generator=torch.Generator().manual_seed(case.seed + 1)) * 2)
    logits = logits.to(inp.q.device, inp.q.dtype).requires_grad_(True)
    gate = aha.route(logits)
    hard = reference.route(to_np(logits))
    _, _, _, dgate = reference.attention_vjp(to_np(inp.q), to_np(inp.k), to_np(inp.v), hard, case.window, to_np(inp.dout))
    ref = reference.route_vjp(to_np(logits), dgate)
    out = _attend(be, inp, case, gate=gate)
    if out.requires_grad:
        (dlogits,) = torch.autograd.grad(out, [logits], inp.dout, allow_unused=True)
    if not out.requires_grad or (dlogits is None and np.any(ref)):
        raise AssertionError("dlogits: the backend returned no gradient for gate, so none reaches the router's logits (" + _NO_GRAD + ")")
    if dlogits is None:
        dlogits = torch.zeros_like(logits)
    base = rounding = None
    if _low(case.dtype):
        branches = eager_branches(inp.q, inp.k, inp.v, case.window)
        (base,) = torch.autograd.grad(mix(aha.route(logits), *branches), [logits], inp.dout)
        s = torch.sigmoid(logits.detach().double())
        rounding = branch_error(inp.dout, branches, _exact_branches(inp, case.window)) * to_np(s * (1 - s))
    assert_close("dlogits", dlogits, ref, case.dtype, kind="grad", baseline=base, rounding=rounding)


def _oracle(inp, mask) -> np.ndarray:
    """torch SDPA in float64 with an explicit mask: independent of aha's kernels."""
    group = inp.q.shape[1] // inp.k.shape[1]
    q, k, v = (to_np(x) for x in (inp.q, inp.k, inp.v))
    k, v = (torch.from_numpy(np.repeat(x, group, axis=1)) for x in (k, v))
    return F.scaled_dot_product_attention(torch.from_numpy(q), k, v, attn_mask=mask.cpu()).numpy()


def check_against_sdpa(be, case: Case) -> None:
    """An all-All (``case.gate == "all"``) or all-Here case against float64 SDPA with causal or window mask."""
    inp = make_inputs(case, be.device)
    out = _attend(be, inp, case)
    base = eager_attention(inp.q, inp.k, inp.v, inp.gate, case.window)
    mask = all_mask(case.Nq, case.Nk) if case.gate == "all" else here_mask(case.Nq, case.Nk, case.window)
    assert_close("out", out, _oracle(inp, mask), case.dtype, baseline=base)


@given(data=st.data())
def test_all_gate_is_causal_attention(aha_backend, data):
    run_check(check_against_sdpa, aha_backend, _draw(aha_backend, data, gates=("all",)))


@given(data=st.data())
def test_here_gate_is_sliding_window_attention(aha_backend, data):
    run_check(check_against_sdpa, aha_backend, _draw(aha_backend, data, gates=("here",)))


def check_bool_gate(be, case: Case) -> None:
    """The gate of ``case`` as bool gives what it gives as q's dtype."""
    inp = make_inputs(case, be.device)
    torch.testing.assert_close(_attend(be, inp, case, gate=inp.gate.bool()), _attend(be, inp, case))


@given(data=st.data())
def test_bool_gate_equals_float_gate(aha_backend, data):
    run_check(check_bool_gate, aha_backend, _draw(aha_backend, data, gates=("all", "here", "random")))


_LOCALITY_TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@given(data=st.data())
def test_locality_keys_outside_the_window_are_never_read(aha_backend, data):
    """A NaN/inf key outside a Here token's window leaves that token's output unchanged.

    (The spec promises this for Here tokens only: an All token's future keys may be read and masked.)
    """
    case = _draw(aha_backend, data, gates=("here", "random"))
    j = data.draw(st.integers(0, case.Nk - 1), label="poisoned key")
    bad = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e4]), label="value")
    run_check(check_locality, aha_backend, case, key=j, value=bad)


def check_locality(be, case: Case, key: int, value: float) -> None:
    """``value`` in k and v at ``key`` leaves the output of every Here token whose window misses it unchanged."""
    inp = make_inputs(case, be.device)
    j = key
    k2, v2 = inp.k.clone(), inp.v.clone()
    k2[:, :, j], v2[:, :, j] = value, value
    out0 = _attend(be, inp, case)
    out1 = aha.attention(inp.q, k2, v2, inp.gate, window=case.window, backend=be.name)
    pos = position_offset(case.Nq, case.Nk) + torch.arange(case.Nq, device=inp.q.device)
    outside = (inp.gate == 0) & ((pos < j) | (pos - case.window >= j))  # (B, Hq, Nq)
    kept0, kept1 = out0[outside], out1[outside]
    assert torch.isfinite(kept1).all(), f"{int((~torch.isfinite(kept1)).sum())} values leaked a poisoned key"
    err = float((kept1.double() - kept0.double()).abs().max()) if kept0.numel() else 0.0
    allowed = _LOCALITY_TOL[case.dtype] * max(1.0, float(out0.double().abs().max()))
    assert err <= allowed, f"out of Here tokens whose window misses key {j}: changed by {err:.3g} > {allowed:.3g}"


@given(data=st.data())
def test_batch_and_head_permutation_invariance(aha_backend, data):
    case = _draw(aha_backend, data)
    batch_order = data.draw(st.permutations(range(case.B)), label="batch order")
    kv_order = data.draw(st.permutations(range(case.Hkv)), label="kv head order")
    run_check(check_permutation, aha_backend, case, batch_order=batch_order, kv_order=kv_order)


def check_permutation(be, case: Case, batch_order: list, kv_order: list) -> None:
    """Batch entries in ``batch_order`` and kv heads in ``kv_order`` (each with its query heads) permute the output."""
    inp = make_inputs(case, be.device)
    group = case.Hq // case.Hkv
    pb = torch.tensor(batch_order)
    ph = torch.tensor([kv_order[h // group] * group + h % group for h in range(case.Hq)])
    pk = torch.tensor(kv_order)
    out = _attend(be, inp, case)
    q, k, v, g = inp.q[pb][:, ph], inp.k[pb][:, pk], inp.v[pb][:, pk], inp.gate[pb][:, ph]
    out_p = aha.attention(q, k, v, g, window=case.window, backend=be.name)
    tol = _LOCALITY_TOL[case.dtype]
    torch.testing.assert_close(out_p, out[pb][:, ph], rtol=tol, atol=tol)


@given(data=st.data())
def test_large_inputs_stay_finite(aha_backend, data):
    """Inputs scaled by 1e3 give no inf or NaN (scores must not overflow)."""
    run_check(check_large_inputs, aha_backend, _draw(aha_backend, data))


def check_large_inputs(be, case: Case) -> None:
    """q, k, v of ``case`` times 1e3 give a finite output."""
    inp = make_inputs(case, be.device)
    big = replace(inp, q=inp.q * 1e3, k=inp.k * 1e3, v=inp.v * 1e3)
    out = _attend(be, big, case)
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"out: {int(bad.sum())} non-finite values, first at index {tuple(bad.nonzero()[0].tolist())}"


def golden_dtype(caps) -> str:
    """The dtype the golden vectors run in: the most precise one the backend declares.

    float16 / bfloat16 are compared as everywhere else: the error against the float64 vectors
    may be at most 2x that of an eager computation in the same dtype, plus a rounding floor.
    """
    return next(t for t in TEST_DTYPES if t in caps.dtypes)


def _fits_golden(caps, g: dict) -> bool:
    lo, hi = caps.head_dims
    return lo <= g["q"].shape[-1] <= hi and (g["q"].shape[2] == g["k"].shape[2] or caps.cross)


def check_golden(be, name: str, g: dict, ragged: dict | None = None) -> None:
    """One golden case (arrays ``g``, ragged-batch arrays ``ragged``) in `golden_dtype`: forward and gradients."""
    dtype = golden_dtype(be.caps)
    ragged = ragged or {}
    t = {key: torch.tensor(g[key], device=be.device, dtype=getattr(torch, dtype)) for key in ("q", "k", "v", "gate", "dout")}
    wrt = [t[key].requires_grad_(be.caps.grad) for key in ("q", "k", "v", "gate")]
    kw = {key: torch.from_numpy(x).to(be.device) for key, x in ragged.items()}
    out = aha.attention(*wrt, window=int(g["window"]), backend=be.name, **kw)
    base, bases, roundings = None, [None] * 4, [None] * 4
    if _low(dtype):  # the same-dtype eager baseline, each sequence on its own slices
        (b, _, nq, _), nk = t["q"].shape, t["k"].shape[2]
        pieces = segments(b, nq, nk, **{key: x.tolist() for key, x in ragged.items()}) if ragged else None
        base, bases, roundings = _eager(Inputs(*wrt, t["dout"]), int(g["window"]), pieces=pieces, wrt=wrt if be.caps.grad else ())
    assert_close(f"{name}/out", out, g["out"], dtype, baseline=base)
    if be.caps.grad:
        got = _backend_grads(out, wrt, t["dout"], [g[key] for key in _NAMES])
        for key, grad, b, rnd in zip(_NAMES, got, bases, roundings):
            assert_close(f"{name}/{key}", grad, g[key], dtype, kind="grad", baseline=b, rounding=rnd)


_RAGGED_KEYS = ("cu_seqlens_q", "cu_seqlens_k", "cache_leftpad", "cache_seqlens")


@functools.cache
def _golden_by_name() -> dict:
    return dict([*golden_cases(), *golden_ragged_cases()])


def check_golden_vector(be, name: str) -> None:
    """The golden case ``name`` (of `golden_cases` or `golden_ragged_cases`): `check_golden`."""
    g = _golden_by_name().get(name)
    if g is None:
        raise LookupError(f"no golden case is named {name!r}; there are {sorted(_golden_by_name())}")
    check_golden(be, name, g, {key: g[key] for key in _RAGGED_KEYS if key in g})


def test_golden_vectors(aha_backend):
    """Cases computed by an independent float64 implementation (vectors/), in `golden_dtype`."""
    fitting = [(name, g) for name, g in golden_cases() if _fits_golden(aha_backend.caps, g)]
    if not fitting:
        pytest.skip(f"no golden case fits the head dims {aha_backend.caps.head_dims} of {aha_backend.name!r}")
    for name, _ in fitting:
        run_check(check_golden_vector, aha_backend, name)


def _chunks(data, n: int) -> list[int]:
    """Split n tokens into a prefill and then chunks of 1..4 tokens (decode and chunked prefill)."""
    sizes = [data.draw(st.integers(1, n), label="prefill")]
    while sum(sizes) < n:
        sizes.append(min(n - sum(sizes), data.draw(st.integers(1, 4), label="chunk")))
    return sizes


@given(data=st.data())
def test_prefill_then_decode_equals_one_full_pass(aha_backend, data):
    """Queries fed chunk by chunk against a growing cache give the rows of one full forward."""
    if not aha_backend.caps.cross:
        return
    case = _draw(aha_backend, data, gates=("here", "random", "all"), label="case, before Nq = Nk <= 48")
    case = replace(case, Nq=case.Nk) if case.Nk <= 48 else replace(case, Nq=48, Nk=48)
    run_check(check_chunks, aha_backend, case, chunks=_chunks(data, case.Nk))


def check_chunks(be, case: Case, chunks: list) -> None:
    """``case`` (Nq = Nk) fed in ``chunks`` of queries, each against the cache so far, gives the full pass's rows."""
    inp = make_inputs(case, be.device)
    full = _attend(be, inp, case)
    tol = _LOCALITY_TOL[case.dtype]
    end = 0
    for size in chunks:
        end += size
        sl = slice(end - size, end)
        rows = aha.attention(inp.q[:, :, sl], inp.k[:, :, :end], inp.v[:, :, :end], inp.gate[:, :, sl], window=case.window, backend=be.name)
        torch.testing.assert_close(rows, full[:, :, sl], rtol=tol, atol=tol, msg=lambda m, sl=sl, end=end: (
            f"the call of queries {sl.start}..{sl.stop - 1} against keys 0..{end - 1} (Nq={sl.stop - sl.start}, Nk={end}) "
            f"differs from the rows of the full pass:\n{m}"))  # fmt: skip


def check_cache_seqlens(be, case: Case, cache_seqlens: list, scale=None, gate_grad: bool | None = None):
    """``case`` with ``cache_seqlens`` (L_b >= Nq each) and NaN / inf in k and v past each L_b, against the reference.

    The forward runs without grad (the path decoding takes). If the backend declares ``grad``
    and ``gate_grad`` is not None, a second run checks dq, dk, dv (and dgate if ``gate_grad``):
    exactly zero dk and dv past L_b, the rest as the reference VJP.
    Returns (inp, out, k, v, seqlens): the clean inputs, the output and the poisoned keys, values and lengths.
    """
    inp, lens = make_inputs(case, be.device), list(cache_seqlens)
    k, v = inp.k.clone(), inp.v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
    seqlens = torch.tensor(lens, device=inp.q.device)
    poisoned = replace(inp, k=k, v=v)
    out = _attend(be, poisoned, case, cache_seqlens=seqlens, scale=scale)
    ref = reference_forward(poisoned, case.window, scale, cache_seqlens=lens)
    pieces = [Segment(b, 0, case.Nq, 0, n) for b, n in enumerate(lens)]
    grads = be.caps.grad and gate_grad is not None
    clean, clean_wrt = _leaves(inp, be, bool(gate_grad))
    base, bases, roundings = None, [None] * 4, [None] * 4
    if _low(case.dtype):
        base, bases, roundings = _eager(clean, case.window, scale, pieces, clean_wrt if grads else ())
    assert_close("out", out, ref, case.dtype, baseline=base)
    if grads:
        leaves, wrt = _leaves(poisoned, be, gate_grad)
        refs = reference_grads(poisoned, case.window, scale, cache_seqlens=lens)
        got = _backend_grads(_attend(be, leaves, case, cache_seqlens=seqlens, scale=scale), wrt, inp.dout, refs)
        past = torch.arange(case.Nk, device=seqlens.device)[None, :] >= seqlens[:, None]  # (B, Nk)
        for name, g in zip(("dk", "dv"), got[1:3]):
            assert not _tokens(g, past).any(), f"{name}: a key past cache_seqlens[b] got a nonzero gradient (cache_seqlens={lens})"
        for name, g, r, b, rnd in zip(_NAMES, got, refs, bases, roundings):
            assert_close(f"{name} (cache_seqlens={lens})", g, r, case.dtype, kind="grad", baseline=b, rounding=rnd)
    return inp, out, k, v, seqlens


def _maybe_scale(data, d: int):
    """The default scale (None) or a drawn one, for head dim ``d``."""
    factor = data.draw(st.one_of(st.none(), scale_factors()), label="scale factor")
    return None if factor is None else factor * d**-0.5


@given(data=st.data())
def test_cache_seqlens_read_only_each_sequence_s_keys(aha_backend, data):
    """With cache_seqlens, sequence b reads k[b, :, :L_b] only: NaN past it changes nothing.

    Gradients too (if ``grad``): keys past L_b get exactly zero dk and dv.
    """
    if not aha_backend.caps.seqlens:
        return
    case = _draw(aha_backend, data, label="case, before B >= 2")
    case = replace(case, B=max(case.B, 2))
    lens = [data.draw(st.integers(case.Nq, case.Nk), label=f"len{b}") for b in range(case.B)]
    scale, gate_grad = _maybe_scale(data, case.D), _gate_grad(data, case)
    run_check(check_cache_seqlens, aha_backend, case, cache_seqlens=lens, scale=scale, gate_grad=gate_grad)


@given(data=st.data())
def test_decode_steps_with_cache_seqlens(aha_backend, data):
    """A batch of few new queries (decode, 1..8) against caches of different lengths, hard gates.

    NaN past each L_b is never read; a NaN key below every Here window reaches no Here token.
    Gradients too (if ``grad``, in the examples that draw them): keys past L_b get exactly zero dk and dv.
    """
    if not (aha_backend.caps.seqlens and aha_backend.caps.cross):
        return
    case = _draw(aha_backend, data, gates=("here", "random", "all"), label="case, before B and Nq are drawn")
    nq = data.draw(st.integers(1, min(8, case.Nk)), label="Nq")
    case = replace(case, B=data.draw(st.integers(2, 4), label="B"), Nq=nq)
    lens = [data.draw(st.integers(nq, case.Nk), label=f"len{b}") for b in range(case.B)]
    scale = _maybe_scale(data, case.D)
    gate_grad = _gate_grad(data, case) if data.draw(st.booleans(), label="gradients too") else None
    below = min(lens) - nq - case.window + 1  # keys [0, below) lie below every Here window
    key = data.draw(st.integers(0, below - 1), label="poisoned key") if below > 0 else None
    run_check(check_decode_steps, aha_backend, case, cache_seqlens=lens, scale=scale, gate_grad=gate_grad, poisoned_key=key)


def check_decode_steps(be, case: Case, cache_seqlens: list, scale=None, gate_grad=None, poisoned_key: int | None = None) -> None:
    """`check_cache_seqlens`, then NaN at ``poisoned_key`` (below every Here window) changes no Here token."""
    inp, out, k, v, seqlens = check_cache_seqlens(be, case, cache_seqlens, scale, gate_grad)
    if poisoned_key is not None:
        k[:, :, poisoned_key] = float("nan")
        here = inp.gate == 0
        out1 = aha.attention(inp.q, k, v, inp.gate, window=case.window, scale=scale, cache_seqlens=seqlens, backend=be.name)
        assert torch.isfinite(out1[here]).all(), f"a Here token read key {poisoned_key}, below its window"
        tol = _LOCALITY_TOL[case.dtype]
        torch.testing.assert_close(out1[here], out[here], rtol=tol, atol=tol)


def test_long_sequences(aha_backend):
    """Pinned problems of 1000+ keys (`long_cases`), run whatever ``--aha-max-len`` says: forward and gradients.

    A kernel wrong only past its first tiles fails here even when every drawn problem is short.
    """
    for lc in long_cases(aha_backend.caps):
        run_check(check_long_case, aha_backend, lc)


def check_long_case(be, lc: LongCase) -> None:
    """One of `long_cases`: forward and (if ``grad``) gradients, with ``cache_seqlens`` if it has them."""
    if lc.seqlens is not None:
        check_cache_seqlens(be, lc.case, list(lc.seqlens), gate_grad=True)
        return
    check_forward(be, lc.case)
    if be.caps.grad:
        check_gradients(be, lc.case)


# Ragged batches: packed sequences (cu_seqlens_q / cu_seqlens_k) and left-padded rows
# (cache_leftpad, with cache_seqlens). Each sequence must be exactly a call of its own.

_POISONS = (float("nan"), float("inf"), float("-inf"), 1e4)
_NAMES = ("dq", "dk", "dv", "dgate")


def _draw_ragged(be, data, strategy, **kw):
    return data.draw(strategy(be.caps, max_len=be.max_len, **kw), label="case")


def _leaves(inp: Inputs, be, gate_grad: bool) -> tuple[Inputs, list]:
    """``inp`` as fresh leaves (q, k, v, and the gate if ``gate_grad``) and the list to differentiate."""
    grad = be.caps.grad
    q, k, v, g = (x.detach().clone().requires_grad_(grad and (x is not inp.gate or gate_grad)) for x in (inp.q, inp.k, inp.v, inp.gate))
    leaves = Inputs(q, k, v, g, inp.dout)
    return leaves, ([q, k, v] + ([g] if gate_grad else [])) if grad else []


def _grads(out, wrt, dout) -> tuple:
    """d sum(dout * out) / d wrt; zeros for an input ``out`` does not depend on."""
    if not wrt:
        return ()
    if not out.requires_grad:
        return tuple(torch.zeros_like(x) for x in wrt)
    return torch.autograd.grad(out, wrt, dout, allow_unused=True, materialize_grads=True)


_NO_GRAD = "autograd finds no path from the output to it: detached, or computed outside autograd with no backward for it"


def _backend_grads(out, wrt, dout, refs) -> tuple:
    """The backend's d sum(dout * out) / d wrt (q, k, v and maybe gate, in that order).

    An input the output does not depend on in autograd fails, naming it, unless its reference
    gradient (``refs``, float64, same order) is exactly zero: then its gradient is zeros.
    """
    if not wrt:
        return ()
    got = torch.autograd.grad(out, wrt, dout, allow_unused=True) if out.requires_grad else (None,) * len(wrt)
    missing = [name[1:] for name, g, r in zip(_NAMES, got, refs) if g is None and np.any(np.asarray(r))]
    if missing:
        where = "its output has no autograd graph at all" if not out.requires_grad else _NO_GRAD
        raise AssertionError(
            f"the backend returned no gradient for {', '.join(missing)} (it declares grad=True and the reference's "
            f"{', '.join('d' + m for m in missing)} {'is' if len(missing) == 1 else 'are'} nonzero): {where}"
        )
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(got, wrt))


def _alone(be, inp: Inputs, window: int, pieces, scale=None):
    """Each sequence run alone through the backend, its output placed at its queries (zeros elsewhere)."""
    out = torch.zeros_like(inp.q)
    for p in pieces:
        b, qs, ks = slice(p.batch, p.batch + 1), slice(p.q_lo, p.q_hi), slice(p.k_lo, p.k_hi)
        q, k, v, gate = inp.q[b, :, qs], inp.k[b, :, ks], inp.v[b, :, ks], inp.gate[b, :, qs]
        one = aha.attention(q, k, v, gate, window=window, scale=scale, backend=be.name)
        out[b, :, qs] = one
    return out


def _owned(pieces, shape_q, shape_k, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Nq] and [B, Nk] bool: the queries and the keys that belong to a sequence of ``pieces``."""
    rq = torch.zeros(shape_q[0], shape_q[2], dtype=torch.bool, device=device)
    rk = torch.zeros(shape_k[0], shape_k[2], dtype=torch.bool, device=device)
    for p in pieces:
        rq[p.batch, p.q_lo : p.q_hi] = True
        rk[p.batch, p.k_lo : p.k_hi] = True
    return rq, rk


def _tokens(x, mask):
    """The entries of x ([B, H, N, ...]) at the tokens ``mask`` ([B, N] bool) selects: [M, H, ...]."""
    return x.transpose(1, 2)[mask]


def _low(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16")


def check_ragged(be, rc: PackedCase | PaddedCase, gate_grad: bool = True, scale: float | None = None) -> None:
    """A ragged batch against each of its sequences run alone (same backend) and against the reference.

    Forward and, if the backend declares ``grad``, dq, dk, dv (and dgate if ``gate_grad``), at
    softmax ``scale`` (None: 1/sqrt(D)). Queries of no sequence output exactly 0 and get exactly
    zero gradient; so do keys that no sequence owns.
    """
    case, pieces = rc.case, rc.pieces()
    inp, wrt = _leaves(make_inputs(case, be.device), be, gate_grad)
    ragged = rc.ragged(be.device)
    out = _attend(be, inp, case, scale=scale, **ragged)
    assert out.shape == inp.q.shape and out.dtype == inp.q.dtype and out.device == inp.q.device
    alone = _alone(be, inp, case.window, pieces, scale)
    ref = reference_forward(inp, case.window, scale, **ragged)
    base, bases, roundings = None, [None] * 4, [None] * 4
    if _low(case.dtype):
        base, bases, roundings = _eager(inp, case.window, scale, pieces, wrt)
    assert_close("out", out, ref, case.dtype, baseline=base)
    assert_agree("out against each sequence alone", out, alone, case.dtype, ref=ref, baseline=base)
    real_q, real_k = _owned(pieces, inp.q.shape, inp.k.shape, out.device)
    assert not _tokens(out, ~real_q).any(), "a padding query's output is not exactly 0"
    if not wrt:
        return
    refs = reference_grads(inp, case.window, scale, **ragged)
    got, want = _backend_grads(out, wrt, inp.dout, refs), _backend_grads(alone, wrt, inp.dout, refs)
    for name, g, w, r, b, rnd in zip(_NAMES, got, want, refs, bases, roundings):
        assert_close(name, g, r, case.dtype, kind="grad", baseline=b, rounding=rnd)
        assert_agree(f"{name} against each sequence alone", g, w, case.dtype, kind="grad", ref=r, baseline=b, rounding=rnd)
        unowned = ~(real_k if name in ("dk", "dv") else real_q)
        assert not _tokens(g, unowned).any(), f"{name}: a padding query or a key of no sequence got a gradient"


def _gate_grad(data, case) -> bool:
    """Whether the gate requires grad: always for a soft gate (training), drawn otherwise.

    ``case``: a `Case`, or a ragged case holding one as ``.case``.
    """
    case = getattr(case, "case", case)
    return case.gate == "soft" or data.draw(st.booleans(), label="gate_grad")


@given(data=st.data())
def test_packed_batch_equals_each_sequence_alone(aha_backend, data):
    """Packed sequences (cu_seqlens_q / cu_seqlens_k) give what each sequence gives alone, gradients too."""
    if aha_backend.caps.packed:
        pc = _draw_ragged(aha_backend, data, packed_cases)
        run_check(check_ragged, aha_backend, pc, gate_grad=_gate_grad(data, pc), scale=_maybe_scale(data, pc.case.D))


@given(data=st.data())
def test_left_padded_rows_equal_their_sequences_alone(aha_backend, data):
    """Row b with cache_leftpad (and cache_seqlens) is its sequence k[b, :, lp:L] alone; padding queries give 0."""
    if aha_backend.caps.leftpad:
        pc = _draw_ragged(aha_backend, data, padded_cases)
        run_check(check_ragged, aha_backend, pc, gate_grad=_gate_grad(data, pc), scale=_maybe_scale(data, pc.case.D))


def test_ragged_edge_cases(aha_backend):
    for rc in ragged_edge_cases(aha_backend.caps):
        run_check(check_ragged, aha_backend, rc)


def _poisons(data) -> dict:
    """The values put into poisoned keys and values: ``bad_k``, ``bad_v`` (NaN, inf, -inf or 1e4)."""
    return {"bad_k": data.draw(st.sampled_from(_POISONS), label="poison k"), "bad_v": data.draw(st.sampled_from(_POISONS), label="poison v")}


def _poisoned_run(be, inp: Inputs, rc, gate_grad: bool, slots: torch.Tensor, bad_k: float, bad_v: float):
    """The clean run and the run with ``bad_k`` / ``bad_v`` in the keys and values at ``slots`` ([B, Nk] bool).

    Returns (clean out, clean grads, poisoned out, poisoned grads).
    """
    ragged = rc.ragged(be.device)
    clean, wrt = _leaves(inp, be, gate_grad)
    out0 = _attend(be, clean, rc.case, **ragged)
    k, v = inp.k.detach().clone(), inp.v.detach().clone()
    k[slots[:, None].expand(k.shape[:3])], v[slots[:, None].expand(v.shape[:3])] = bad_k, bad_v
    dirty, wrt1 = _leaves(replace(inp, k=k, v=v), be, gate_grad)
    out1 = _attend(be, dirty, rc.case, **ragged)
    return out0, _grads(out0, wrt, inp.dout), out1, _grads(out1, wrt1, inp.dout)


def _assert_unreached(name, got, want, dtype, kind="forward"):
    """``got`` (poisoned run) is finite and agrees with ``want`` (clean run) where ``want`` is finite."""
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} values reached by a poisoned key"
    tol = allowed_error(dtype, kind) if dtype not in ("float16", "bfloat16") else _LOCALITY_TOL[dtype]
    got, want = got.detach().double(), want.detach().double()
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= tol * max(1.0, float(want.abs().max()) if want.numel() else 1.0), f"{name}: changed by {err:.3g}"


@given(data=st.data())
def test_nan_in_another_packed_sequence_reaches_no_token(aha_backend, data):
    """NaN / inf / 1e4 in some sequences' keys and values leaves the other sequences' outputs and gradients unchanged."""
    be = aha_backend
    if not be.caps.packed:
        return
    pc = _draw_ragged(be, data, packed_cases, max_seqs=5)
    seqs = len(pc.lens_k)
    poisoned = data.draw(st.sets(st.integers(0, seqs - 1), max_size=max(0, seqs - 1)), label="poisoned sequences")
    run_check(check_nan_in_other_sequences, be, pc, poisoned=sorted(poisoned), gate_grad=_gate_grad(data, pc), **_poisons(data))


def check_nan_in_other_sequences(be, pc: PackedCase, poisoned: list, gate_grad: bool, bad_k: float, bad_v: float) -> None:
    """``bad_k`` / ``bad_v`` in the keys / values of the sequences ``poisoned`` change no output or gradient of the others."""
    cq, ck = pc.cu_seqlens()
    slots = torch.zeros(1, pc.case.Nk, dtype=torch.bool, device=be.device)
    for s in poisoned:
        slots[0, ck[s] : ck[s + 1]] = True
    clean_q = torch.ones(1, pc.case.Nq, dtype=torch.bool, device=be.device)
    for s in poisoned:
        clean_q[0, cq[s] : cq[s + 1]] = False
    out0, grads0, out1, grads1 = _poisoned_run(be, make_inputs(pc.case, be.device), pc, gate_grad, slots, bad_k, bad_v)
    _assert_unreached("out", out1[:, :, clean_q[0]], out0[:, :, clean_q[0]], pc.case.dtype)
    for name, g1, g0 in zip(_NAMES, grads1, grads0):
        keep = ~slots[0] if name in ("dk", "dv") else clean_q[0]
        _assert_unreached(name, g1[:, :, keep], g0[:, :, keep], pc.case.dtype, kind="grad")


@given(data=st.data())
def test_nan_in_padding_slots_reaches_no_token(aha_backend, data):
    """NaN / inf / 1e4 in the keys and values before cache_leftpad[b] and past cache_seqlens[b] reach no token.

    Outputs and gradients equal the clean run's and the reference's; padding queries still give 0.
    """
    be = aha_backend
    if not be.caps.leftpad:
        return
    pc = _draw_ragged(be, data, padded_cases)
    run_check(check_nan_in_padding, be, pc, gate_grad=_gate_grad(data, pc), **_poisons(data))


def check_nan_in_padding(be, pc: PaddedCase, gate_grad: bool, bad_k: float, bad_v: float) -> None:
    """``bad_k`` / ``bad_v`` in the padding slots of ``pc`` change no output or gradient; padding queries give 0."""
    case = pc.case
    j = torch.arange(case.Nk, device=be.device)
    lp = torch.tensor(pc.leftpad, device=be.device)[:, None]
    ends = torch.tensor(pc.ends(), device=be.device)[:, None]
    slots = (j < lp) | (j >= ends)  # (B, Nk)
    inp = make_inputs(case, be.device)
    out0, grads0, out1, grads1 = _poisoned_run(be, inp, pc, gate_grad, slots, bad_k, bad_v)
    _assert_unreached("out", out1, out0, case.dtype)
    real_q, _ = _owned(pc.pieces(), inp.q.shape, inp.k.shape, be.device)
    assert not _tokens(out1, ~real_q).any(), "a padding query's output is not exactly 0"
    for name, g1, g0 in zip(_NAMES, grads1, grads0):
        _assert_unreached(name, g1, g0, case.dtype, kind="grad")
        unowned = slots if name in ("dk", "dv") else ~real_q
        assert not _tokens(g1, unowned).any(), f"{name}: a padding slot or padding query got a gradient"


def _shift(x, offsets, n: int):
    """out[b, :, i] = x[b, :, i + offsets[b]] for i < n; zero where that index lies outside x."""
    idx = torch.arange(n, device=x.device)[None, :] + torch.tensor(offsets, device=x.device)[:, None]  # (B, n)
    inside = (idx >= 0) & (idx < x.shape[2])
    shape = (x.shape[0], x.shape[1], n) + tuple(x.shape[3:])
    gather = idx.clamp(0, x.shape[2] - 1).view(x.shape[0], 1, n, *([1] * (x.dim() - 3))).expand(shape)
    keep = inside.view(x.shape[0], 1, n, *([1] * (x.dim() - 3)))
    return torch.where(keep, torch.gather(x, 2, gather), torch.zeros((), dtype=x.dtype, device=x.device))


@given(data=st.data())
def test_prefill_then_decode_on_a_left_padded_ragged_cache(aha_backend, data):
    """A prefill, then decode steps of 1..8 tokens, on a left-padded cache whose rows end apart, equal one full pass.

    Every call gets cache_leftpad and cache_seqlens; the cache slots not yet written and the
    padding slots hold NaN / inf, and padding queries give 0.
    """
    be = aha_backend
    if not (be.caps.cross and be.caps.seqlens and be.caps.leftpad):
        return
    run_check(check_ragged_decode, be, _draw_ragged(be, data, decode_cases))


def check_ragged_decode(be, dc: DecodeCase) -> None:
    """Each call of the generation ``dc`` (`DecodeCase.calls`) against the rows of one full pass and the reference."""
    case, nk = dc.case, dc.case.Nk
    inp = make_inputs(case, be.device)  # one token per position
    j = torch.arange(nk, device=be.device)
    lp = torch.tensor(dc.leftpad, device=be.device)

    def call(ends, n):
        """Row b's last n tokens before ends[b], against its cache of keys [leftpad[b], ends[b])."""
        unwritten = (j < lp[:, None]) | (j >= torch.tensor(ends, device=be.device)[:, None])  # (B, Nk)
        k, v = inp.k.clone(), inp.v.clone()
        k[unwritten[:, None].expand(k.shape[:3])], v[unwritten[:, None].expand(v.shape[:3])] = float("nan"), float("inf")
        offsets = [e - n for e in ends]
        q, gate = _shift(inp.q, offsets, n), _shift(inp.gate, offsets, n)
        pc = PaddedCase(replace(case, Nq=n), dc.leftpad, tuple(ends), dc.index_dtype)
        ragged = pc.ragged(be.device)
        out = aha.attention(q, k, v, gate, window=case.window, backend=be.name, **ragged)
        one = Inputs(q, k, v, gate, None)
        ref = reference_forward(one, case.window, **ragged)
        base = eager_attention(q, k, v, gate, case.window, pieces=pc.pieces()) if _low(case.dtype) else None
        assert_close(f"out of the call with cache_seqlens={ends}, Nq={n}", out, ref, case.dtype, baseline=base)
        real = (torch.tensor(offsets, device=be.device)[:, None] + torch.arange(n, device=be.device)) >= lp[:, None]
        assert not _tokens(out, ~real).any(), "a padding query's output is not exactly 0"
        return out, real, ref, base

    final = dc.final()
    full, _, ref_full, base_full = call(final, nk)
    by_position = _shift(full, [nk - f for f in final], nk)  # by_position[b, :, p]: the full pass at position p
    for ends, n in dc.calls():
        out, real, ref, base = call(ends, n)
        want = _shift(by_position, [e - n for e in ends], n)
        assert_agree(f"call with cache_seqlens={ends}, Nq={n}, against the full pass", _tokens(out, real), _tokens(want, real), case.dtype,
                     ref=ref_full, baseline=base_full)  # fmt: skip


def test_golden_ragged_vectors(aha_backend):
    """Packed and left-padded cases computed by an independent float64 implementation (vectors/ragged_*), in `golden_dtype`."""
    be = aha_backend
    needs = {"cu_seqlens_q": "packed", "cache_leftpad": "leftpad", "cache_seqlens": "seqlens"}
    for name, g in golden_ragged_cases():
        ragged = [key for key in _RAGGED_KEYS if key in g]
        if all(getattr(be.caps, needs[key]) for key in ragged if key in needs) and _fits_golden(be.caps, g):
            run_check(check_golden_vector, be, name)
