"""aha.nn: Router, AHAAttention (projections, RoPE, QK-norm, GQA, router, KV cache)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from aha.nn import AHAAttention, KVCache, Router, aha_layers, apply_rotary, rotary_embedding, set_backend  # noqa: E402
from aha_tiny import one_thread  # noqa: E402, F401

C, H, N = 32, 4, 12


def make(window=3, seed=0, **kw) -> AHAAttention:
    torch.manual_seed(seed)
    return AHAAttention(C, H, window=window, **kw).eval()


def force_gates(m: AHAAttention, logit: float) -> None:
    """Every gate All (logit > 0) or Here (logit < 0) whatever the input."""
    with torch.no_grad():
        m.router_weight().zero_()
        if m.fused_router:
            m.gate_bias.fill_(logit)
        else:
            m.router.bias.fill_(logit)


def test_router_is_a_bias_free_linear_map_to_one_logit_per_head():
    r = Router(C, H)
    assert r.bias is None and tuple(r.weight.shape) == (H, C)
    x = torch.randn(2, N, C)
    logits = r(x)
    assert logits.shape == (2, H, N)
    torch.testing.assert_close(logits, torch.einsum("bnc,hc->bhn", x, r.weight))
    want = torch.sigmoid(logits) > 0.5
    gate = r.gate(logits)  # under autograd: the straight-through float gate
    assert gate.dtype == torch.float32 and gate.requires_grad and torch.equal(gate, want.float())
    with torch.no_grad():
        gate = r.gate(r(x))  # no grad needed: a bool gate
    assert gate.dtype == torch.bool and torch.equal(gate, want)


def test_fused_router_reads_the_last_hq_rows_of_q_proj():
    m = make(fused_router=True)
    assert tuple(m.q_proj.weight.shape) == (H * (C // H) + H, C)
    x = torch.randn(2, N, C)
    q, logits = m.project_query(x)
    assert q.shape == (2, N, C) and logits.shape == (2, H, N)
    torch.testing.assert_close(logits, torch.einsum("bnc,hc->bhn", x, m.q_proj.weight[-H:]))


def test_fused_and_separate_router_give_the_same_output():
    sep = make(window=3, seed=1)
    fused = make(window=3, fused_router=True)
    with torch.no_grad():
        for name in ("k_proj", "v_proj", "o_proj"):
            getattr(fused, name).load_state_dict(getattr(sep, name).state_dict())
        fused.q_proj.weight.copy_(torch.cat([sep.q_proj.weight, sep.router.weight]))
    x = torch.randn(2, N, C)
    torch.testing.assert_close(fused(x), sep(x))


@pytest.mark.parametrize("fused", [False, True])
def test_here_tokens_do_not_see_past_their_window_and_all_tokens_do(fused):
    window = 3
    kw = {"fused_router": True, "router_bias": True} if fused else {}
    m = make(window=window, **kw)
    if not fused:
        m.router = Router(C, H, bias=True)
    x = torch.randn(1, N, C)
    x2 = x.clone()
    x2[:, 2] += 5.0  # change token 2: outside the window of tokens >= 2 + window
    force_gates(m, -4.0)  # every token Here
    d = (m(x) - m(x2)).abs().amax(-1)[0]  # (N,)
    assert torch.all(d[2 + window :] == 0) and torch.all(d[2 : 2 + window] > 0)
    force_gates(m, 4.0)  # every token All
    d = (m(x) - m(x2)).abs().amax(-1)[0]
    assert torch.all(d[2:] > 0) and torch.all(d[:2] == 0)


def test_output_matches_plain_causal_attention_when_the_window_covers_everything():
    m = make(window=N, num_kv_heads=2)
    x = torch.randn(2, N, C)
    d = C // H
    q = m.q_proj(x).view(2, N, H, d).transpose(1, 2)
    k = m.k_proj(x).view(2, N, 2, d).transpose(1, 2).repeat_interleave(2, dim=1)
    v = m.v_proj(x).view(2, N, 2, d).transpose(1, 2).repeat_interleave(2, dim=1)
    cos, sin = rotary_embedding(torch.arange(N)[None], d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, N, C)
    torch.testing.assert_close(m(x), m.o_proj(want))


def test_rope_makes_the_output_invariant_to_a_shift_of_all_positions():
    m = make(window=4)
    x = torch.randn(1, N, C)
    base = m(x, position_ids=torch.arange(N)[None])
    shifted = m(x, position_ids=torch.arange(N)[None] + 17)
    torch.testing.assert_close(base, shifted, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(base, m(x, position_ids=torch.arange(N)[None] * 2), atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(window=3, num_kv_heads=2)
    mha = make(window=3)
    d = C // H
    with torch.no_grad():
        for name in ("q_proj", "o_proj", "router"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, d, C).repeat_interleave(2, dim=0).reshape(C, C)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, N, C)
    torch.testing.assert_close(gqa(x), mha(x))


@pytest.mark.parametrize("qk_norm", ["full", "head"])
def test_qk_norm_makes_the_output_invariant_to_the_scale_of_q_and_k_weights(qk_norm):
    m = make(window=3, qk_norm=qk_norm, fused_router=True)
    x = torch.randn(2, N, C)
    before = m(x)
    with torch.no_grad():  # scale the query rows (not the gate rows) and the keys
        m.q_proj.weight[:C] *= 3.0
        m.k_proj.weight *= 0.5
    torch.testing.assert_close(m(x), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_kv_cache_decoding_equals_the_full_forward(fused):
    m = make(window=3, num_kv_heads=2, qk_norm="full", fused_router=fused)
    x = torch.randn(2, N, C)
    full = m(x)
    cache = KVCache()
    parts = [m(x[:, :5], cache=cache)] + [m(x[:, i : i + 1], cache=cache) for i in range(5, N)]
    assert cache.get_seq_length() == N
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_cache_that_drops_keys_is_refused():
    class Truncating(KVCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            k, v = super().update(k, v, layer_idx)
            return k[..., -2:, :], v[..., -2:, :]

    m = make()
    cache = Truncating()
    m(torch.randn(1, 2, C), cache=cache)  # 2 keys: nothing dropped yet
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(1, 1, C), cache=cache)


def test_training_uses_the_straight_through_gate_and_reaches_the_router():
    m = make(window=2).train()
    x = torch.randn(2, N, C)
    seen = []
    m.observe(lambda mod, logits, gate, offset: seen.append(gate))
    m(x).square().sum().backward()
    assert seen[0].dtype == torch.float32 and seen[0].requires_grad
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        m(x)
    assert seen[1].dtype == torch.bool
    assert torch.equal(seen[1], seen[0].bool())


def test_observer_handles_remove_and_report_the_cache_offset():
    m = make()
    offsets = []
    h = m.observe(lambda mod, logits, gate, offset: offsets.append((offset, gate.shape[-1])))
    cache = KVCache()
    m(torch.randn(1, 5, C), cache=cache)
    m(torch.randn(1, 1, C), cache=cache)
    h.remove()
    m(torch.randn(1, 1, C), cache=cache)
    assert offsets == [(0, 5), (5, 1)]


def test_set_backend_reaches_every_layer_and_the_backend_is_used():
    layers = torch.nn.Sequential(make(), make())
    set_backend(layers, "reference")
    assert [m.backend for m in aha_layers(layers)] == ["reference", "reference"]
    x = torch.randn(1, 6, C, dtype=torch.float64)
    m = make(window=2).double()
    out_ref = m(x)
    m.backend = "torch"
    torch.testing.assert_close(m(x), out_ref)
    m.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        m(x)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        AHAAttention(C, 4, window=2, num_kv_heads=3)
    with pytest.raises(ValueError, match="qk_norm"):
        AHAAttention(C, 4, window=2, qk_norm="layer")
    with pytest.raises(ValueError, match="window"):
        AHAAttention(C, 4, window=0)
    with pytest.raises(ValueError, match="threshold"):
        AHAAttention(C, 4, window=2, threshold=1.0)


# --- ragged batches: padding masks and packed sequences --------------------------------------------


def ragged_layer(**kw) -> AHAAttention:
    """A layer whose router picks a mix of All and Here, window 2, GQA, its own RoPE."""
    m = make(window=2, num_kv_heads=2, seed=3, **kw)
    with torch.no_grad():
        m.router.weight.normal_(0.0, 1.0)
    return m


def padded(rows: list[torch.Tensor], left: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n_i, C] placed at column left[i] of a [B, length, C] batch, and the 0/1 mask."""
    x = torch.randn(len(rows), length, C)  # the padding slots hold noise, never read
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, lp) in enumerate(zip(rows, left)):
        x[i, lp : lp + len(r)] = r
        mask[i, lp : lp + len(r)] = 1
    return x, mask


def test_the_mask_picks_cache_leftpad_for_left_padding_and_packs_anything_else():
    from aha.masks import from_attention_mask

    left = from_attention_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]), len_q=5)
    assert not left.packed and left.cache_leftpad.tolist() == [2, 0, 4]
    assert left.positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    right = from_attention_mask(torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]]), len_q=2)
    assert right.packed and right.cache_leftpad is None
    assert right.cu_seqlens_k.tolist() == [0, 3, 7, 9] and right.k_index.tolist() == [0, 1, 2, 6, 7, 8, 9, 11, 12]
    assert right.cu_seqlens_q.tolist() == [0, 0, 2, 2]  # the last 2 positions: row 0 and row 2 are padding there
    assert right.q_index.tolist() == [2, 3] and (right.max_seqlen_q, right.max_seqlen_k) == (2, 4)
    assert from_attention_mask(torch.ones(2, 4, dtype=torch.bool), len_q=1) is None


def test_a_left_padded_batch_decoded_with_a_cache_equals_each_row_alone():
    m = ragged_layer()
    rows = [torch.randn(n, C) for n in (9, 4, 6)]
    x, mask = padded(rows, left=[0, 5, 3], length=9)
    nxt = torch.randn(3, 3, C)  # three decode steps for every row
    cache = KVCache()
    out = [m(x, cache=cache, attention_mask=mask)]
    for t in range(3):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        out.append(m(nxt[:, t : t + 1], cache=cache, attention_mask=mask))
    out = torch.cat(out, dim=1)  # (3, 12, C)
    for i, (r, lp) in enumerate(zip(rows, [0, 5, 3])):
        alone = m(torch.cat([r, nxt[i]])[None])[0]
        torch.testing.assert_close(out[i, lp:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(x[1:2, 5:]), m(x[1:2])[:, 5:], atol=1e-3)  # reading the pads would differ


@pytest.mark.parametrize("with_cache", [False, True])
def test_right_and_both_side_padding_give_each_row_its_own_output(with_cache):
    m = ragged_layer()
    rows = [torch.randn(n, C) for n in (9, 4, 5)]
    x, mask = padded(rows, left=[0, 0, 2], length=9)  # row 1: right padding; row 2: both sides
    out = m(x, attention_mask=mask, cache=KVCache() if with_cache else None)
    for i, (r, lp) in enumerate(zip(rows, [0, 0, 2])):
        torch.testing.assert_close(out[i, lp : lp + len(r)], m(r[None])[0], atol=1e-5, rtol=1e-5)


def test_packed_sequences_equal_each_sequence_alone_forward_and_backward():
    m = ragged_layer().train()
    lens = [5, 1, 8, 3]
    x = torch.randn(1, sum(lens), C, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 14, 17], dtype=torch.int32)
    seen = []
    m.observe(lambda mod, logits, gate, offset: seen.append(gate.detach()))
    out = m(x, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)
    assert 0 < float(seen[0].mean()) < 1  # a mix of All and Here
    w = torch.randn_like(out)
    (out * w).sum().backward()
    got_dx, got_dw = x.grad.clone(), m.router.weight.grad.clone()
    m.zero_grad()
    x.grad = None
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = m(x[:, a:b])
        torch.testing.assert_close(out[:, a:b], alone, atol=1e-5, rtol=1e-5)
        (alone * w[:, a:b]).sum().backward()
    torch.testing.assert_close(got_dx, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dw, m.router.weight.grad, atol=1e-5, rtol=1e-5)
    assert got_dw.abs().sum() > 0


def test_one_sequences_object_serves_every_layer_of_a_call():
    from aha.masks import sequences

    m1, m2 = ragged_layer(), ragged_layer()
    x, mask = padded([torch.randn(3, C), torch.randn(6, C)], left=[3, 0], length=6)
    seqs = sequences(2, 6, 6, attention_mask=mask)
    torch.testing.assert_close(
        m2(m1(x, sequences=seqs), sequences=seqs), m2(m1(x, attention_mask=mask), attention_mask=mask)
    )
    with pytest.raises(ValueError, match="sequences"):
        m1(x[:, :5], sequences=seqs)  # built for another call
    with pytest.raises(ValueError, match="not both"):
        m1(x, sequences=seqs, attention_mask=mask)


def test_bad_masks_and_packing_are_named():
    m = ragged_layer()
    x = torch.randn(2, 6, C)
    hole = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"hole in row 1 at position 3"):
        m(x, attention_mask=hole)
    with pytest.raises(ValueError, match="4-D"):
        m(x, attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        m(x, attention_mask=torch.ones(2, 5))
    cu = torch.tensor([0, 4, 12])
    with pytest.raises(ValueError, match="cu_seqlens_k is missing"):
        m(x, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="must be equal"):
        m(x, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="from 0 to"):
        m(x, cu_seqlens_q=cu[:2], cu_seqlens_k=cu[:2])
    with pytest.raises(TypeError, match="integers"):
        m(x, cu_seqlens_q=cu.float(), cu_seqlens_k=cu.float())
    cache = KVCache()
    m(x, cache=cache)
    with pytest.raises(ValueError, match="empty cache"):
        m(x, cache=cache, cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="one way"):
        m(x, attention_mask=hole.tril(), cu_seqlens_q=cu, cu_seqlens_k=cu)
