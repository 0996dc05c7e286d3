"""The reference itself: golden vectors, finite differences, and the semantics' corner cases."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from aha import reference
from aha.testing.golden import golden_cases, golden_ragged_cases, golden_router

CASES = list(golden_cases())
RAGGED = list(golden_ragged_cases())
RAGGED_KEYS = ("cu_seqlens_q", "cu_seqlens_k", "cache_leftpad", "cache_seqlens")


@pytest.mark.parametrize("name,g", CASES, ids=[n for n, _ in CASES])
def test_reference_matches_golden_vectors(name, g):
    args = (g["q"], g["k"], g["v"], g["gate"], int(g["window"]))
    np.testing.assert_allclose(reference.attention(*args), g["out"], rtol=0, atol=1e-12)
    for got, key in zip(reference.attention_vjp(*args, g["dout"]), ("dq", "dk", "dv", "dgate")):
        np.testing.assert_allclose(got, g[key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name,g", RAGGED, ids=[n for n, _ in RAGGED])
def test_reference_matches_ragged_golden_vectors(name, g):
    """Packed and left-padded batches, from a dense implementation that shares nothing with aha."""
    args = (g["q"], g["k"], g["v"], g["gate"], int(g["window"]))
    ragged = {key: g[key] for key in RAGGED_KEYS if key in g}
    assert ragged, f"{name} holds no ragged-batch argument"
    np.testing.assert_allclose(reference.attention(*args, **ragged), g["out"], rtol=0, atol=1e-12)
    for got, key in zip(reference.attention_vjp(*args, g["dout"], **ragged), ("dq", "dk", "dv", "dgate")):
        np.testing.assert_allclose(got, g[key], rtol=0, atol=1e-12, err_msg=key)


def test_ragged_golden_vectors_are_what_their_script_makes():
    """src/aha/testing/vectors/ragged_* are the output of tests/golden_ragged.py, case for case."""
    path = Path(__file__).with_name("golden_ragged.py")
    spec = importlib.util.spec_from_file_location("golden_ragged", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stored = dict(RAGGED)
    assert list(stored) == [c["name"] for c in script.CASES], "run python tests/golden_ragged.py"
    described = json.loads((script.OUT / script.JSON).read_text())
    assert described == [script.describe(c) for c in script.CASES]
    for case in script.CASES:
        made, kept = script.compute(case), stored[case["name"]]
        assert sorted(made) == sorted(kept), case["name"]
        for key, val in made.items():
            assert kept[key].dtype == val.dtype, f"{case['name']}/{key}"
            np.testing.assert_allclose(kept[key], val, rtol=0, atol=1e-13, err_msg=f"{case['name']}/{key}")


def test_router_matches_golden_vectors():
    r = golden_router()
    np.testing.assert_array_equal(reference.route(r["logits"]), r["gate"])
    np.testing.assert_allclose(reference.route_vjp(r["logits"], r["upstream"]), r["dlogits"], atol=1e-14)
    assert reference.sparsity_loss(r["logits"]) == pytest.approx(float(r["sparsity_loss"]), abs=1e-14)


def _problem(seed, b=1, hq=2, hkv=1, nq=6, nk=9, d=3, soft=True):
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(b, hq, nq, d)), rng.normal(size=(b, hkv, nk, d)), rng.normal(size=(b, hkv, nk, d))
    gate = rng.uniform(size=(b, hq, nq)) if soft else (rng.uniform(size=(b, hq, nq)) < 0.5).astype(float)
    return q, k, v, gate, rng.normal(size=(b, hq, nq, d))


@pytest.mark.parametrize("seed,window", [(0, 1), (1, 3), (2, 20)])
def test_vjp_matches_finite_differences(seed, window):
    q, k, v, gate, dout = _problem(seed)
    grads = reference.attention_vjp(q, k, v, gate, window, dout)
    eps = 1e-6
    for x, g in zip((q, k, v, gate), grads):
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            up = np.sum(dout * reference.attention(q, k, v, gate, window))
            x[idx] = old - eps
            down = np.sum(dout * reference.attention(q, k, v, gate, window))
            x[idx] = old
            assert g[idx] == pytest.approx((up - down) / (2 * eps), abs=1e-7)


def test_route_vjp_and_sparsity_loss_match_finite_differences():
    logits = np.random.default_rng(3).normal(size=(2, 3, 5))
    eps = 1e-6
    grad = reference.sparsity_loss_vjp(logits)
    for idx in np.ndindex(logits.shape):
        x = logits.copy()
        x[idx] += eps
        up = reference.sparsity_loss(x)
        x[idx] -= 2 * eps
        assert grad[idx] == pytest.approx((up - reference.sparsity_loss(x)) / (2 * eps), abs=1e-9)
    s = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(reference.route_vjp(logits, np.ones_like(logits)), s * (1 - s))


def test_here_token_ignores_nan_outside_its_window_and_all_token_sees_it():
    q, k, v, _, _ = _problem(4, nq=9, nk=9, soft=False)
    gate = np.zeros((1, 2, 9))
    gate[:, 1] = 1.0  # head 1 is All, head 0 Here
    k[:, :, 2] = np.nan
    out = reference.attention(q, k, v, gate, 3)
    assert np.isnan(out[:, 0, 2:5]).all()  # tokens 2..4 of the Here head read key 2
    assert np.isfinite(out[:, 0, 5:]).all() and np.isfinite(out[:, 0, :2]).all()
    assert not np.isfinite(out[:, 1, 2:]).any() and np.isfinite(out[:, 1, :2]).all()


def test_here_token_gradients_ignore_nan_outside_its_window_next_to_an_all_head():
    """A Here token's All slice holds a NaN key that its window does not: its dq stays that of clean keys."""
    q, k, v, _, _ = _problem(4, nq=9, nk=9, soft=False)
    gate = np.zeros((1, 2, 9))
    gate[:, 1] = 1.0  # head 1 is All (reads the NaN at every token from 2 on), head 0 Here
    dout = np.random.default_rng(5).standard_normal(q.shape)
    clean = reference.attention_vjp(q, k, v, gate, 3, dout)
    k[:, :, 2], v[:, :, 2] = np.nan, np.inf
    dq, dk, dv, _ = reference.attention_vjp(q, k, v, gate, 3, dout)
    np.testing.assert_array_equal(dq[:, 0, 5:], clean[0][:, 0, 5:])  # Here tokens 5.. do not read key 2
    np.testing.assert_array_equal(dq[:, 0, :2], clean[0][:, 0, :2])
    assert np.isnan(dq[:, 0, 2:5]).all() and np.isnan(dq[:, 1, 2:]).all()
    assert np.isfinite(dq[:, 1, :2]).all()


def test_window_at_least_n_makes_here_equal_all():
    q, k, v, _, _ = _problem(5)
    ones, zeros = np.ones((1, 2, 6)), np.zeros((1, 2, 6))
    np.testing.assert_allclose(
        reference.attention(q, k, v, zeros, 9), reference.attention(q, k, v, ones, 1), atol=1e-15
    )


def test_window_one_returns_own_value_for_here_tokens():
    q, k, v, _, _ = _problem(6, hq=1, nq=9)
    out = reference.attention(q, k, v, np.zeros((1, 1, 9)), 1)
    np.testing.assert_allclose(out[0, 0], v[0, 0], atol=1e-15)


def test_soft_gate_blends_linearly():
    q, k, v, _, _ = _problem(7)
    g = np.full((1, 2, 6), 0.25)
    a, h = reference.attention(q, k, v, np.ones_like(g), 2), reference.attention(q, k, v, np.zeros_like(g), 2)
    np.testing.assert_allclose(reference.attention(q, k, v, g, 2), 0.25 * a + 0.75 * h, atol=1e-15)


def test_cache_seqlens_is_one_call_per_sequence_and_ignores_the_tail():
    rng = np.random.default_rng(8)
    q, k, v = rng.normal(size=(2, 2, 3, 4)), rng.normal(size=(2, 1, 9, 4)), rng.normal(size=(2, 1, 9, 4))
    gate, dout = (rng.uniform(size=(2, 2, 3)) < 0.5).astype(float), rng.normal(size=(2, 2, 3, 4))
    lens = [5, 9]
    k[0, :, 5:] = np.nan
    out = reference.attention(q, k, v, gate, 3, cache_seqlens=lens)
    grads = reference.attention_vjp(q, k, v, gate, 3, dout, cache_seqlens=lens)
    for b, n in enumerate(lens):
        one = (q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], gate[b : b + 1])
        np.testing.assert_array_equal(out[b : b + 1], reference.attention(*one, 3))
        dq, dk, dv, dg = reference.attention_vjp(*one, 3, dout[b : b + 1])
        np.testing.assert_array_equal(grads[1][b : b + 1, :, :n], dk)
        assert not grads[1][b, :, n:].any() and not grads[2][b, :, n:].any()
        np.testing.assert_array_equal(grads[0][b : b + 1], dq)
        np.testing.assert_array_equal(grads[3][b : b + 1], dg)


def _finite_differences(q, k, v, gate, window, dout, **ragged):
    """d sum(dout * attention) by central differences, for each of q, k, v, gate."""
    eps, out = 1e-6, []
    for x in (q, k, v, gate):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            up = np.sum(dout * reference.attention(q, k, v, gate, window, **ragged))
            x[idx] = old - eps
            down = np.sum(dout * reference.attention(q, k, v, gate, window, **ragged))
            x[idx] = old
            g[idx] = (up - down) / (2 * eps)
        out.append(g)
    return out


@pytest.mark.parametrize(
    "shape,window,ragged",
    [
        ((1, 2, 4, 7), 2, dict(cu_seqlens_q=np.array([0, 1, 1, 4]), cu_seqlens_k=np.array([0, 3, 4, 7]))),
        ((2, 2, 3, 5), 2, dict(cache_leftpad=np.array([1, 3]), cache_seqlens=np.array([5, 4]))),
    ],
    ids=["packed", "leftpad"],
)
def test_ragged_vjp_matches_finite_differences(shape, window, ragged):
    """Sequence 1 of the packed batch has a key and no query; leftpad row 1 has padding queries and keys."""
    b, hq, nq, nk = shape
    q, k, v, gate, dout = _problem(9, b=b, hq=hq, nq=nq, nk=nk)
    grads = reference.attention_vjp(q, k, v, gate, window, dout, **ragged)
    for name, got, fd in zip(("dq", "dk", "dv", "dgate"), grads, _finite_differences(q, k, v, gate, window, dout, **ragged)):
        np.testing.assert_allclose(got, fd, rtol=0, atol=1e-7, err_msg=name)


def test_padding_queries_output_zero_and_read_no_key():
    """A query before cache_leftpad[b] outputs exactly 0 whatever the keys hold; padding keys get no gradient."""
    q, k, v, gate, dout = _problem(10, b=2, nq=4, nk=6)
    lp, lens = np.array([3, 0]), np.array([5, 6])
    k[0, :, :3], v[0, :, :3] = np.nan, np.inf  # row 0's padding slots
    k[0, :, 5:], v[0, :, 5:] = -np.inf, np.nan  # past its cache_seqlens
    out = reference.attention(q, k, v, gate, 2, cache_seqlens=lens, cache_leftpad=lp)
    assert np.isfinite(out).all()
    assert not out[0, :, :2].any() and out[0, :, 2:].all()  # row 0: queries at 1, 2 are padding; 3, 4 real
    dq, dk, dv, dg = reference.attention_vjp(q, k, v, gate, 2, dout, cache_seqlens=lens, cache_leftpad=lp)
    assert all(np.isfinite(x).all() for x in (dq, dk, dv, dg))
    assert not dq[0, :, :2].any() and not dg[0, :, :2].any()
    assert not dk[0, :, :3].any() and not dk[0, :, 5:].any() and not dv[0, :, :3].any() and not dv[0, :, 5:].any()


SPEC = Path(__file__).resolve().parents[1] / "docs" / "spec.md"


def _pictures():
    """The ```txt drawings of spec.md's "Ragged batches": per drawing, per query line, its groups of key glyphs."""
    blocks = re.findall(r"^```txt\n(.*?)^```", SPEC.read_text(), re.S | re.M)
    return [
        [(line, [g.replace("| ", "").split() for g in re.findall(r"[x.\-_](?: [x.\-_|])+", line)])
         for line in block.splitlines() if re.match(r"^ (q\d|row \d)", line)]
        for block in blocks
    ]  # fmt: skip


def _glyphs(q, k, gate, window, **ragged):
    """[B][Nq] rows of glyphs: x where the reference's output depends on the key (poisoned one at a
    time), - before cache_leftpad, _ from cache_seqlens on, . otherwise; and [B, Nq] padding queries."""
    b, nk = k.shape[0], k.shape[2]
    v = np.ones_like(k)
    lp = ragged.get("cache_leftpad", np.zeros(b, int))
    ends = ragged.get("cache_seqlens", np.full(b, nk))
    read = np.zeros((b, q.shape[2], nk), bool)
    for j in range(nk):
        k2 = k.copy()
        k2[:, :, j] = np.nan
        read[:, :, j] = np.isnan(reference.attention(q, k2, v, gate, window, **ragged)[:, 0]).any(-1)
    marks = np.where(np.arange(nk) < lp[:, None], "-", np.where(np.arange(nk) >= ends[:, None], "_", "."))
    rows = [[[("x" if read[r, i, j] else marks[r, j]) for j in range(nk)] for i in range(q.shape[2])] for r in range(b)]
    padding = reference.attention(q, k, v, gate, window, **ragged)[:, 0].any(-1) == 0
    return rows, padding


def _drawn(n, nq, nk, window, gate, **ragged):
    rng = np.random.default_rng(n)
    b = np.shape(gate)[0]
    q, k = rng.normal(size=(b, 1, nq, 4)), rng.normal(size=(b, 1, nk, 4))
    return _glyphs(q, k, np.asarray(gate, float)[:, None], window, **ragged)


def test_spec_ragged_pictures_are_what_the_reference_reads():
    packed, prefill, decode = _pictures()
    rows, padding = _drawn(0, 5, 8, 2, [[1, 0, 1, 1, 0]], cu_seqlens_q=np.array([0, 3, 5]), cu_seqlens_k=np.array([0, 3, 8]))
    assert [groups[0] for _, groups in packed] == rows[0] and not padding.any()
    assert [line.split(",")[2].split()[0] for line, _ in packed] == ["All", "Here", "All", "All", "Here"]
    rows, padding = _drawn(1, 6, 6, 2, [[0, 1, 0, 1, 0, 1]] * 2, cache_leftpad=np.array([0, 3]))
    assert [groups for _, groups in prefill] == [[rows[0][i], rows[1][i]] for i in range(6)]
    assert ["padding query" in line for line, _ in prefill] == padding[1].tolist() and not padding[0].any()
    assert [line.split()[1] for line, _ in prefill] == ["Here", "All"] * 3
    rows, padding = _drawn(2, 1, 8, 3, [[1], [0], [1]], cache_leftpad=np.array([0, 3, 1]), cache_seqlens=np.array([8, 8, 5]))
    assert [groups[0] for _, groups in decode] == [rows[r][0] for r in range(3)] and not padding.any()
    assert [line.split()[3] for line, _ in decode] == ["All", "Here", "All"]


def test_keys_read_counts_the_keys_of_key_range():
    """aha.window.keys_read (the benchmarks' work counts) agrees with key_range, the bounds the backends use,
    for arrays of positions and gates; a soft gate weighs the two counts."""
    from aha.window import key_range, keys_read

    pos = np.arange(40, dtype=np.float64)
    for window in (1, 3, 16, 64):
        for is_all in (False, True):
            want = [key_range(int(p), window, is_all)[1] - key_range(int(p), window, is_all)[0] for p in pos]
            np.testing.assert_array_equal(keys_read(pos, np.full(40, float(is_all)), window), want)
        soft = keys_read(pos, np.full(40, 0.25), window)
        np.testing.assert_allclose(soft, 0.25 * (pos + 1) + 0.75 * np.minimum(pos + 1, window))
