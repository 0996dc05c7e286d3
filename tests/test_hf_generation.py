"""generate() on the AHA models: what transformers' GenerationTesterMixin checks (it lives in upstream's
tests/generation/, which the sdist does not ship), against oracles of our own.

Greedy, sampling and beam search against step-by-step full forward passes; assisted and prompt-lookup
decoding against greedy; the static cache (StaticCache, cache_implementation="static") against the
dynamic one, with and without left padding; compiled generation against eager. Tiny random models with
a window shorter than the sequences and routers that pick a mix of All and Here.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import CompileConfig, StaticCache  # noqa: E402

import aha  # noqa: E402
from aha.hf import AHALlamaConfig, AHALlamaForCausalLM, FAOlmoConfig, FAOlmoForCausalLM  # noqa: E402
from aha.nn import set_backend  # noqa: E402
from aha.training import GateStats  # noqa: E402
from aha_tiny import one_thread  # noqa: E402, F401

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)  # fmt: skip
H = TINY["num_attention_heads"]  # head_dim 16: the smallest the triton backend takes


def model(family: str = "olmo2", window: int = 3, seed: int = 0):
    config_cls, model_cls = {
        "olmo2": (FAOlmoConfig, FAOlmoForCausalLM),
        "llama": (AHALlamaConfig, AHALlamaForCausalLM),
    }[family]
    torch.manual_seed(seed)
    m = model_cls(config_cls(local_window_size=window, **TINY)).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight[-H:].normal_(0.0, 1.0)  # routers that pick a mix of All and Here
    return m


def prompt(batch=2, length=6, seed=1):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths=(6, 3), seed=1):
    """Prompts of ``lengths`` padded on the left with token 0, and their mask."""
    width = max(lengths)
    x = prompt(len(lengths), width, seed)
    mask = torch.ones_like(x)
    for row, n in enumerate(lengths):
        x[row, : width - n], mask[row, : width - n] = 0, 0
    return x, mask


def with_cache(m, cache) -> dict:
    """The keyword that hands a cache to forward() and generate(): ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return {"cache": cache} if "cache" in inspect.signature(type(m).forward).parameters else {"past_key_values": cache}


def full_logits(m, seq) -> torch.Tensor:
    """The last position's logits of a full forward pass (no cache): the oracle every step is held to."""
    with torch.no_grad():
        return m(seq).logits[:, -1].float()


def compile_config(fullgraph: bool, backend: str = "eager") -> CompileConfig:
    """generate() compiles only on accelerators unless told to; "eager" traces with dynamo, no codegen."""
    config = CompileConfig(fullgraph=fullgraph, backend=backend, mode="default" if backend == "inductor" else None)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("family", ["olmo2", "llama"])
def test_greedy_search_picks_the_argmax_of_full_forward_passes(family):
    m, x = model(family), prompt()
    with GateStats(m) as stats:
        got = m.generate(x, max_new_tokens=8, do_sample=False)
    assert 0.1 < stats.all_share() < 0.9  # the routers picked a mix of All and Here
    seq = x
    for _ in range(8):
        seq = torch.cat([seq, full_logits(m, seq).argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


def test_sampling_draws_from_the_softmax_of_full_forward_passes():
    m, x = model(), prompt()
    torch.manual_seed(7)
    got = m.generate(x, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(7)
    seq = x
    for _ in range(8):
        probs = torch.softmax(full_logits(m, seq), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], 1)
    assert torch.equal(got, seq)
    torch.manual_seed(7)
    assert torch.equal(m.generate(x, max_new_tokens=8, do_sample=True, top_k=0, use_cache=False), got)


def test_beam_search_scores_its_beams_by_full_forward_passes_and_pads_like_alone():
    m, x = model(), prompt(batch=1)
    out = m.generate(x, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False, length_penalty=0.0,
                     output_scores=True, return_dict_in_generate=True)  # fmt: skip
    for seq, score in zip(out.sequences, out.sequences_scores):  # length_penalty 0: the sum of the log-probs
        with torch.no_grad():
            logp = torch.log_softmax(m(seq[None]).logits[0, :-1].float(), -1)
        want = logp[torch.arange(5, 10), seq[6:]].sum()
        torch.testing.assert_close(score, want, atol=1e-4, rtol=1e-4)
    uncached = m.generate(x, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                          length_penalty=0.0, use_cache=False)  # fmt: skip
    assert torch.equal(uncached, out.sequences)
    xs, mask = left_padded()
    batched = m.generate(xs, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    for row, n in enumerate((6, 3)):
        alone = m.generate(xs[row : row + 1, 6 - n :], max_new_tokens=5, num_beams=3, do_sample=False)
        assert batched[row, 6:].tolist() == alone[0, n:].tolist(), f"row {row}"


@pytest.mark.parametrize("how", ["assistant", "prompt lookup"])
def test_assisted_decoding_gives_the_greedy_tokens(how):
    m, x = model(seed=0), torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6]])  # repeats for prompt lookup to find
    greedy = m.generate(x, max_new_tokens=8, do_sample=False)
    kw = {"assistant_model": model(seed=1)} if how == "assistant" else {"prompt_lookup_num_tokens": 3}
    assert torch.equal(m.generate(x, max_new_tokens=8, do_sample=False, **kw), greedy)


def test_generation_continues_from_a_returned_cache_and_from_inputs_embeds():
    m, x = model(), prompt()
    whole = m.generate(x, max_new_tokens=8, do_sample=False)
    first = m.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    rest = m.generate(first.sequences, max_new_tokens=4, **with_cache(m, cache), do_sample=False)
    assert torch.equal(rest, whole)
    embeds = m.get_input_embeddings()(x)
    assert torch.equal(m.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False), whole[:, 6:])


# --- the static cache: a fixed-size cache, read up to its filled slots (cache_seqlens) ---------------


@pytest.mark.parametrize("padded", [False, True])
def test_the_static_cache_gives_the_dynamic_caches_tokens(padded):
    m = model()
    x, mask = left_padded() if padded else (prompt(), None)
    want = m.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = m.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
    cache = StaticCache(config=m.config, max_cache_len=32)  # a cache the caller built, larger than needed
    got = m.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, **with_cache(m, cache))
    assert torch.equal(got, want)
    assert int(cache.get_seq_length()) == 13  # the prompt and every new token but the last


def test_a_forward_into_a_static_cache_gives_the_full_passes_logits_step_by_step():
    m, x = model(), prompt(length=9)
    cache = StaticCache(config=m.config, max_cache_len=16)
    with torch.no_grad():
        want = m(x).logits
        got = [m(x[:, :5], use_cache=True, **with_cache(m, cache)).logits]
        got += [m(x[:, i : i + 1], use_cache=True, **with_cache(m, cache)).logits for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="left only"):  # a right-padded row cannot end at the cache's last slot
        m(x[:, :2], attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10 + [0]]),
          use_cache=True, **with_cache(m, cache))  # fmt: skip


# --- compiled generation: the same tokens as eager ----------------------------------------------------


def _compiled_generate(m, x, config, new=8, **kw):
    torch._dynamo.reset()
    aha.backends()  # load the backends outside the traced code
    return m.generate(
        x, max_new_tokens=new, do_sample=False, cache_implementation="static", compile_config=config, **kw
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fullgraph_compiled_greedy_generation_with_the_default_backends_gives_the_eager_tokens(backend):
    """aha's default CPU backends trace as one custom op each, so every decode step is one graph; left
    padding too (the 4-D mask generate() builds becomes cache_leftpad)."""
    m, x = model(), prompt()
    set_backend(m, backend)
    want = m.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(_compiled_generate(m, x, compile_config(fullgraph=True), new=4), want)
    xs, mask = left_padded()
    want = m.generate(xs, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(_compiled_generate(m, xs, compile_config(fullgraph=True), new=4, attention_mask=mask), want)


@pytest.mark.parametrize("path", ["triton", "cpu", "eager attention"])
def test_fullgraph_compiled_generation_gives_the_eager_tokens_and_no_recompile_for_a_shorter_prompt(path):
    """One graph per decode step: the triton and cpu backends trace as custom ops (cache_seqlens
    included), and the plain path of attn_implementation="eager" traces whole."""
    m = model()
    if path == "eager attention":
        m.set_attn_implementation("eager")
    else:
        if path == "triton":
            pytest.importorskip("triton")
        set_backend(m, path)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    aha.backends()
    config = compile_config(fullgraph=True)
    for length in (6, 4):  # the same cache size: the second prompt compiles nothing new
        x = prompt(length=length, seed=length)
        want = m.generate(x, max_new_tokens=8, do_sample=False)
        cache = StaticCache(config=m.config, max_cache_len=20)
        with torch.compiler.set_stance("fail_on_recompile" if length == 4 else "default"):
            got = m.generate(x, max_new_tokens=8, do_sample=False, compile_config=config, **with_cache(m, cache))
        assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the decode steps were compiled


def test_inductor_compiled_generation_gives_the_eager_tokens():
    m, x = model(), prompt()
    m.set_attn_implementation("eager")
    want = m.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(_compiled_generate(m, x, compile_config(fullgraph=True, backend="inductor")), want)


def test_a_prompt_holding_the_pad_token_without_a_mask_is_refused_with_the_way_out():
    """transformers turns it into a mask with a hole, which AHA cannot take (by design: docs/training.md)."""
    m, x = model(), prompt()
    x[1, 3] = m.config.pad_token_id
    with pytest.raises(ValueError, match="hole in row 1 at position 3.*pass the mask"):
        m.generate(x, max_new_tokens=2, do_sample=False)
    assert m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False).shape == (2, 8)


def test_compiled_generation_returns_every_output_of_eager_generation():
    """Scores, logits, hidden states and attentions (over the static cache's slots, 0 past the filled ones)."""
    m, x = model(), prompt()
    m.set_attn_implementation("eager")
    kw = dict(max_new_tokens=4, do_sample=False, output_attentions=True, output_hidden_states=True,
              output_scores=True, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    want = m.generate(x, **kw)
    torch._dynamo.reset()
    got = m.generate(x, cache_implementation="static", compile_config=compile_config(fullgraph=True), **kw)
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        for a, b in zip(getattr(got, name), getattr(want, name), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for step_got, step_want in zip(got.hidden_states, want.hidden_states, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for step_got, step_want in zip(got.attentions, want.attentions, strict=True):
        for a, b in zip(step_got, step_want, strict=True):  # (B, Hq, N, 9 slots) against (B, Hq, N, filled)
            filled = b.shape[-1]
            torch.testing.assert_close(a[..., :filled], b, atol=1e-5, rtol=1e-5)
            assert a.shape[-1] == 9 and not a[..., filled:].any()
