"""The conformance suite: properties every AHA backend must satisfy.

Run it with ``python -m aha conformance --backend NAME`` (or ``nox -s conformance``).
Each test takes the ``aha_backend`` fixture of ``aha.testing.pytest_plugin``;
the problems are drawn per backend from what its capabilities declare.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, note, settings
from hypothesis import given as _given
from hypothesis import strategies as st

import aha
from aha import reference
from aha.testing.checks import assert_close, eager_attention, reference_forward, reference_grads, to_np
from aha.testing.golden import golden_cases
from aha.testing.strategies import Case, aha_cases, edge_cases, make_inputs
from aha.torch_ops import all_mask, here_mask
from aha.window import position_offset


def given(**strategies):
    """hypothesis.given with the suite's fixed settings: no deadline (backends differ wildly in speed)."""
    relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    return lambda test: relaxed(_given(**strategies)(test))


def _attend(be, inp, case, gate=None, **kw):
    gate = inp.gate if gate is None else gate
    return aha.attention(inp.q, inp.k, inp.v, gate, window=case.window, backend=be.name, **kw)


def _draw(be, data, **kw) -> Case:
    case = data.draw(aha_cases(be.caps, max_len=be.max_len, **kw), label="case")
    note(f"reproduce: make_inputs({case!r})")
    return case


def check_forward(be, case: Case) -> None:
    inp = make_inputs(case, be.device)
    out = _attend(be, inp, case)
    assert out.dtype == inp.q.dtype and out.device == inp.q.device
    base = eager_attention(inp.q, inp.k, inp.v, inp.gate, case.window) if case.dtype in ("float16", "bfloat16") else None
    assert_close("out", out, reference_forward(inp, case.window), case.dtype, baseline=base)


def check_gradients(be, case: Case, gate_grad: bool = True) -> None:
    inp = make_inputs(case, be.device, requires_grad=True)
    inp.gate.requires_grad_(gate_grad)
    wrt = [inp.q, inp.k, inp.v] + ([inp.gate] if gate_grad else [])
    got = torch.autograd.grad(_attend(be, inp, case), wrt, inp.dout)
    ref = reference_grads(inp, case.window)
    base = [None] * 4
    if case.dtype in ("float16", "bfloat16"):
        base = torch.autograd.grad(eager_attention(inp.q, inp.k, inp.v, inp.gate, case.window), wrt, inp.dout)
    for name, g, r, b in zip(("dq", "dk", "dv", "dgate"), got, ref, base):
        assert_close(name, g, r, case.dtype, kind="grad", baseline=b)


@given(data=st.data())
def test_forward_matches_reference(aha_backend, data):
    check_forward(aha_backend, _draw(aha_backend, data))


def test_forward_edge_cases(aha_backend):
    for case in edge_cases(aha_backend.caps):
        check_forward(aha_backend, case)


@given(data=st.data())
def test_gradients_match_reference(aha_backend, data):
    if not aha_backend.caps.grad:
        return
    case = _draw(aha_backend, data)
    check_gradients(aha_backend, case, gate_grad=data.draw(st.booleans(), label="gate_grad") or case.gate == "soft")


def test_gradient_edge_cases(aha_backend):
    if aha_backend.caps.grad:
        for case in edge_cases(aha_backend.caps):
            check_gradients(aha_backend, case)


@given(data=st.data())
def test_route_gradient_reaches_logits(aha_backend, data):
    """d loss / d logits through aha.route (straight-through) matches the reference."""
    if not aha_backend.caps.grad:
        return
    case = _draw(aha_backend, data, gates=("random",))
    inp = make_inputs(case, aha_backend.device)
    logits = (torch.randn(inp.gate.shape, generator=torch.Generator().manual_seed(case.seed + 1)) * 2)
    logits = logits.to(inp.q.device, inp.q.dtype).requires_grad_(True)
    gate = aha.route(logits)
    (dlogits,) = torch.autograd.grad(_attend(aha_backend, inp, case, gate=gate), [logits], inp.dout)
    hard = reference.route(to_np(logits))
    _, _, _, dgate = reference.attention_vjp(to_np(inp.q), to_np(inp.k), to_np(inp.v), hard, case.window, to_np(inp.dout))
    ref = reference.route_vjp(to_np(logits), dgate)
    base = None
    if case.dtype in ("float16", "bfloat16"):
        out = eager_attention(inp.q, inp.k, inp.v, aha.route(logits), case.window)
        (base,) = torch.autograd.grad(out, [logits], inp.dout)
    assert_close("dlogits", dlogits, ref, case.dtype, kind="grad", baseline=base)


def _oracle(inp, mask) -> np.ndarray:
    """torch SDPA in float64 with an explicit mask: independent of aha's kernels."""
    group = inp.q.shape[1] // inp.k.shape[1]
    q, k, v = (to_np(x) for x in (inp.q, inp.k, inp.v))
    k, v = (torch.from_numpy(np.repeat(x, group, axis=1)) for x in (k, v))
    return F.scaled_dot_product_attention(torch.from_numpy(q), k, v, attn_mask=mask.cpu()).numpy()


@given(data=st.data())
def test_all_gate_is_causal_attention(aha_backend, data):
    case = _draw(aha_backend, data, gates=("all",))
    inp = make_inputs(case, aha_backend.device)
    out = _attend(aha_backend, inp, case)
    base = eager_attention(inp.q, inp.k, inp.v, inp.gate, case.window)
    assert_close("out", out, _oracle(inp, all_mask(case.Nq, case.Nk)), case.dtype, baseline=base)


@given(data=st.data())
def test_here_gate_is_sliding_window_attention(aha_backend, data):
    case = _draw(aha_backend, data, gates=("here",))
    inp = make_inputs(case, aha_backend.device)
    out = _attend(aha_backend, inp, case)
    base = eager_attention(inp.q, inp.k, inp.v, inp.gate, case.window)
    assert_close("out", out, _oracle(inp, here_mask(case.Nq, case.Nk, case.window)), case.dtype, baseline=base)


@given(data=st.data())
def test_bool_gate_equals_float_gate(aha_backend, data):
    case = _draw(aha_backend, data, gates=("all", "here", "random"))
    inp = make_inputs(case, aha_backend.device)
    torch.testing.assert_close(_attend(aha_backend, inp, case, gate=inp.gate.bool()), _attend(aha_backend, inp, case))


_LOCALITY_TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@given(data=st.data())
def test_locality_keys_outside_the_window_are_never_read(aha_backend, data):
    """A NaN/inf key outside a Here token's window leaves that token's output unchanged.

    (The spec promises this for Here tokens only: an All token's future keys may be read and masked.)
    """
    case = _draw(aha_backend, data, gates=("here", "random"))
    inp = make_inputs(case, aha_backend.device)
    j = data.draw(st.integers(0, case.Nk - 1), label="poisoned key")
    bad = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e4]), label="value")
    k2, v2 = inp.k.clone(), inp.v.clone()
    k2[:, :, j], v2[:, :, j] = bad, bad
    out0 = _attend(aha_backend, inp, case)
    out1 = aha.attention(inp.q, k2, v2, inp.gate, window=case.window, backend=aha_backend.name)
    pos = position_offset(case.Nq, case.Nk) + torch.arange(case.Nq, device=inp.q.device)
    outside = (inp.gate == 0) & ((pos < j) | (pos - case.window >= j))  # (B, Hq, Nq)
    kept0, kept1 = out0[outside], out1[outside]
    assert torch.isfinite(kept1).all(), f"{int((~torch.isfinite(kept1)).sum())} values leaked a poisoned key"
    err = float((kept1.double() - kept0.double()).abs().max()) if kept0.numel() else 0.0
    assert err <= _LOCALITY_TOL[case.dtype] * max(1.0, float(out0.double().abs().max()))


@given(data=st.data())
def test_batch_and_head_permutation_invariance(aha_backend, data):
    case = _draw(aha_backend, data)
    inp = make_inputs(case, aha_backend.device)
    group = case.Hq // case.Hkv
    pb = torch.tensor(data.draw(st.permutations(range(case.B)), label="batch order"))
    pk = data.draw(st.permutations(range(case.Hkv)), label="kv head order")
    ph = torch.tensor([pk[h // group] * group + h % group for h in range(case.Hq)])
    pk = torch.tensor(pk)
    out = _attend(aha_backend, inp, case)
    q, k, v, g = inp.q[pb][:, ph], inp.k[pb][:, pk], inp.v[pb][:, pk], inp.gate[pb][:, ph]
    out_p = aha.attention(q, k, v, g, window=case.window, backend=aha_backend.name)
    tol = _LOCALITY_TOL[case.dtype]
    torch.testing.assert_close(out_p, out[pb][:, ph], rtol=tol, atol=tol)


@given(data=st.data())
def test_large_inputs_stay_finite(aha_backend, data):
    """Inputs scaled by 1e3 give no inf or NaN (scores must not overflow)."""
    case = _draw(aha_backend, data)
    inp = make_inputs(case, aha_backend.device)
    big = replace(inp, q=inp.q * 1e3, k=inp.k * 1e3, v=inp.v * 1e3)
    out = _attend(aha_backend, big, case)
    assert torch.isfinite(out).all()


def test_golden_vectors(aha_backend):
    """Cases computed by an independent float64 implementation (shared/vectors)."""
    dtype = "float64" if "float64" in aha_backend.caps.dtypes else "float32"
    lo, hi = aha_backend.caps.head_dims
    for name, g in golden_cases():
        if not lo <= g["q"].shape[-1] <= hi or (g["q"].shape[2] < g["k"].shape[2] and not aha_backend.caps.cross):
            continue
        t = {key: torch.from_numpy(g[key]).to(aha_backend.device, getattr(torch, dtype)) for key in ("q", "k", "v", "gate", "dout")}
        for key in ("q", "k", "v", "gate"):
            t[key].requires_grad_(aha_backend.caps.grad)
        out = aha.attention(t["q"], t["k"], t["v"], t["gate"], window=int(g["window"]), backend=aha_backend.name)
        assert_close(f"{name}/out", out, g["out"], dtype)
        if aha_backend.caps.grad:
            grads = torch.autograd.grad(out, [t["q"], t["k"], t["v"], t["gate"]], t["dout"])
            for key, got in zip(("dq", "dk", "dv", "dgate"), grads):
                assert_close(f"{name}/{key}", got, g[key], dtype, kind="grad")


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
    case = _draw(aha_backend, data, gates=("here", "random", "all"))
    case = replace(case, Nq=case.Nk) if case.Nk <= 48 else replace(case, Nq=48, Nk=48)
    inp = make_inputs(case, aha_backend.device)
    full = _attend(aha_backend, inp, case)
    rows, end = [], 0
    for size in _chunks(data, case.Nk):
        end += size
        sl = slice(end - size, end)
        rows.append(aha.attention(inp.q[:, :, sl], inp.k[:, :, :end], inp.v[:, :, :end], inp.gate[:, :, sl], window=case.window, backend=aha_backend.name))
    tol = _LOCALITY_TOL[case.dtype]
    torch.testing.assert_close(torch.cat(rows, dim=2), full, rtol=tol, atol=tol)


@given(data=st.data())
def test_cache_seqlens_read_only_each_sequence_s_keys(aha_backend, data):
    """With cache_seqlens, sequence b reads k[b, :, :L_b] only: NaN past it changes nothing."""
    if not aha_backend.caps.seqlens:
        return
    case = _draw(aha_backend, data)
    case = replace(case, B=max(case.B, 2))
    inp = make_inputs(case, aha_backend.device)
    lens = [data.draw(st.integers(case.Nq, case.Nk), label=f"len{b}") for b in range(case.B)]
    k, v = inp.k.clone(), inp.v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    seqlens = torch.tensor(lens, device=inp.q.device)
    out = aha.attention(inp.q, k, v, inp.gate, window=case.window, cache_seqlens=seqlens, backend=aha_backend.name)
    ref = reference.attention(to_np(inp.q), to_np(k), to_np(v), to_np(inp.gate), case.window, cache_seqlens=lens)
    base = None
    if case.dtype in ("float16", "bfloat16"):
        base = torch.cat([eager_attention(inp.q[b : b + 1], inp.k[b : b + 1, :, :n], inp.v[b : b + 1, :, :n], inp.gate[b : b + 1], case.window) for b, n in enumerate(lens)])
    assert_close("out", out, ref, case.dtype, baseline=base)
