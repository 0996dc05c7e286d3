"""aha.hf: the FAOlmo (AHA-OLMo2) format, the routed Llama/Qwen2 models and the converter.

Tiny random configs only; nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import re
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import aha.hf  # noqa: E402
from aha.hf import (  # noqa: E402
    AHALlamaConfig,
    AHALlamaForCausalLM,
    AHAQwen2Config,
    AHAQwen2ForCausalLM,
    FAOlmoConfig,
    FAOlmoForCausalLM,
    add_router,
)
from aha.hf.convert import main as convert_main  # noqa: E402
from aha.nn import rotary_embedding  # noqa: E402
from aha.training import GateStats, RouterSparsity  # noqa: E402
from aha_tiny import one_thread  # noqa: E402, F401

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
)
H, D = 4, 8


def faolmo(window: int, seed: int = 0, **kw) -> FAOlmoForCausalLM:
    """A tiny FAOlmo whose routers pick a mix of All and Here."""
    torch.manual_seed(seed)
    model = FAOlmoForCausalLM(FAOlmoConfig(local_window_size=window, **TINY, **kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[-H:].normal_(0.0, 1.0)
    return model


def ids(batch=2, length=16, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def olmo2_weights(model: FAOlmoForCausalLM) -> dict:
    """FAOlmo's state dict without the router rows: an Olmo2ForCausalLM state dict."""
    state = dict(model.state_dict())
    for i in range(len(model.model.layers)):
        key = f"model.layers.{i}.self_attn.q_proj.weight"
        state[key] = state[key][: H * D]
    return state


def test_faolmo_equals_olmo2_when_the_window_covers_the_sequence():
    x = ids(length=16)
    model = faolmo(window=16)
    with GateStats(model) as stats:
        got = logits(model, x)
    assert 0.1 < stats.all_share() < 0.9  # a real mix of All and Here
    olmo2 = Olmo2ForCausalLM(Olmo2Config(**TINY)).eval()
    olmo2.load_state_dict(olmo2_weights(model), strict=True)
    torch.testing.assert_close(got, logits(olmo2, x), atol=1e-5, rtol=1e-5)
    short = faolmo(window=3)  # same weights, a window shorter than the sequence: Here differs
    assert not torch.allclose(logits(short, x), got, atol=1e-3)


def test_the_state_dict_is_olmo2s_plus_hq_gate_rows_in_q_proj():
    model = faolmo(window=4)
    mine, theirs = model.state_dict(), Olmo2ForCausalLM(Olmo2Config(**TINY)).state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        rows = H if key.endswith("self_attn.q_proj.weight") else 0
        assert value.shape[0] == theirs[key].shape[0] + rows, key
    assert mine["model.layers.0.self_attn.q_norm.weight"].shape == (H * D,)  # q_norm: query rows only


def test_a_checkpoint_in_the_released_layout_loads_with_the_auto_classes(tmp_path):
    torch.manual_seed(3)
    olmo2 = Olmo2ForCausalLM(Olmo2Config(**TINY))
    state = {k: v.contiguous() for k, v in olmo2.state_dict().items()}
    gates = {}
    for i in range(TINY["num_hidden_layers"]):
        key = f"model.layers.{i}.self_attn.q_proj.weight"
        gates[key] = torch.randn(H, TINY["hidden_size"])
        state[key] = torch.cat([state[key], gates[key]])
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = {**TINY, "model_type": "faolmo", "architectures": ["FAOlmoForCausalLM"], "local_window_size": 5}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, FAOlmoForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.local_window_size == 5 and model.config.router_bias is False
    for i, layer in enumerate(model.model.layers):
        assert layer.self_attn.window == 5 and layer.self_attn.gate_bias is None
        torch.testing.assert_close(layer.self_attn.router_weight(), gates[f"model.layers.{i}.self_attn.q_proj.weight"])


@pytest.mark.parametrize("router_bias", [False, True])
def test_save_pretrained_and_from_pretrained_round_trip(tmp_path, router_bias):
    model = faolmo(window=4, router_bias=router_bias)
    if router_bias:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.gate_bias.uniform_(-1, 1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "faolmo" and saved["local_window_size"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is FAOlmoForCausalLM and loaded.config.router_bias is router_bias
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(logits(loaded, ids()), logits(model, ids()))


def test_generate_with_the_cache_equals_generate_without_it():
    model = faolmo(window=3)
    prompt = ids(batch=2, length=6, seed=1)
    with GateStats(model) as cached_stats:
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)
    # the cached decode routed every token as a full pass over the final sequence does
    with torch.no_grad(), GateStats(model) as full_stats:
        model(cached[:, :-1])
    torch.testing.assert_close(cached_stats.per_position(), full_stats.per_position())
    torch.testing.assert_close(cached_stats.per_head(), full_stats.per_head())


def test_a_mask_of_ones_is_no_mask_and_bad_masks_are_named():
    model, x = faolmo(window=3), ids()
    torch.testing.assert_close(logits(model, x, attention_mask=torch.ones_like(x)), logits(model, x))
    hole = torch.ones_like(x)
    hole[1, 5:7] = 0  # a 0 between 1s
    with pytest.raises(ValueError, match="hole in row 1 at position 5"):
        model(x, attention_mask=hole)
    with pytest.raises(ValueError, match="4-D"):
        model(x, attention_mask=torch.ones(2, 1, 16, 16))
    cu = torch.tensor([0, 6, 16])
    with pytest.raises(ValueError, match="one way"):
        model(x[:1], attention_mask=hole[1:].cumprod(1), cu_seq_lens_q=cu, cu_seq_lens_k=cu)


# --- ragged batches: every routed family, tiny random models with a mix of All and Here ------------

ROUTED = {"olmo2": (FAOlmoConfig, FAOlmoForCausalLM), "llama": (AHALlamaConfig, AHALlamaForCausalLM),
          "qwen2": (AHAQwen2Config, AHAQwen2ForCausalLM)}  # fmt: skip
FAMILIES = list(ROUTED)


def routed(family: str, window: int = 3, seed: int = 0):
    """A tiny routed model of ``family``: random gate rows, so tokens route to All and to Here."""
    config_cls, model_cls = ROUTED[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(local_window_size=window, **TINY)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[-H:].normal_(0.0, 1.0)
            if family == "qwen2":  # Qwen2 initialises its q/k/v biases to zero: make them matter
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    return model


def next_step(model, out) -> dict:
    """The keyword that hands ``out``'s cache to the next forward: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    if "cache" in inspect.signature(type(model).forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g) for n in lengths]


def pad(seqs, side: str):
    """input_ids and attention_mask of ``seqs`` padded with token 0 on ``side``."""
    width = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        x[i, cols], mask[i, cols] = s, 1
    return x, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generate_with_left_padding_gives_each_prompt_its_own_tokens(family):
    model, seqs = routed(family), prompts([9, 4, 6])
    x, mask = pad(seqs, "left")
    with GateStats(model) as stats:
        batched = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert 0.1 < stats.all_share() < 0.9  # a real mix of All and Here, windows (3) shorter than the prompts
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=6, do_sample=False)
        assert batched[i, x.shape[1] :].tolist() == alone[0, len(s) :].tolist(), f"prompt {i}"
    uncached = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(uncached, batched)  # every step a full pass over the left-padded rows
    unmasked = logits(model, x)[1:, -1]  # the last prompt token of the padded rows, reading the pads
    assert not torch.allclose(logits(model, x, attention_mask=mask)[1:, -1], unmasked, atol=1e-3)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_forward_gives_each_row_the_logits_it_has_alone(family, use_cache):
    """Right padding (row 1), both sides (row 2), with and without the cache: the real tokens' logits
    are those of each sequence alone (row 2's positions are shifted by 2, which RoPE does not see)."""
    model, seqs = routed(family), prompts([9, 4, 5])
    x, mask = pad(seqs, "right")
    x[2], mask[2] = x[2].roll(2), mask[2].roll(2)
    with torch.no_grad(), GateStats(model) as stats:
        out = model(x, attention_mask=mask, use_cache=use_cache)
    assert 0.1 < stats.all_share() < 0.9
    for i, (s, start) in enumerate(zip(seqs, [0, 0, 2])):
        torch.testing.assert_close(
            out.logits[i, start : start + len(s)], logits(model, s[None])[0], atol=1e-5, rtol=1e-5
        )
    if use_cache:  # the pads of rows 1 and 2 sit in the cache: a next step's mask has holes
        step = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        with pytest.raises(ValueError, match="hole in row 1 at position 4"):
            model(x[:, :1], attention_mask=step, **next_step(model, out))


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("described_by", ["position_ids", "cu_seq_lens", "both"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_training_batch_gives_the_loss_and_gradients_of_its_sequences_one_at_a_time(family, described_by):
    """DataCollatorWithFlattening's batch: position ids restarting at 0, the flash-attention keywords, or
    both. With the keywords alone the positions run on across sequences (0..23): RoPE does not see a
    shift within a sequence, so only the keywords can separate them."""
    from transformers import DataCollatorWithFlattening

    model, seqs = routed(family).train(), prompts([7, 3, 9, 5], seed=2)
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=described_by != "position_ids")
    batch = collate([{"input_ids": s.tolist()} for s in seqs])  # [1, 24]
    assert batch["input_ids"].shape == (1, 24) and batch["position_ids"][0, 7:10].tolist() == [0, 1, 2]
    if described_by == "cu_seq_lens":
        del batch["position_ids"]
        assert batch["cu_seq_lens_q"].tolist() == [0, 7, 10, 19, 24]
    with GateStats(model) as stats:
        loss, grads = _loss_and_grads(model, batch)
    assert 0.1 < stats.all_share() < 0.9
    # one at a time: each sequence's mean loss, weighted by its share of the predicted tokens
    model.zero_grad()
    total, want = sum(len(s) - 1 for s in seqs), 0.0
    for s in seqs:
        part = model(s[None], labels=s[None]).loss * (len(s) - 1) / total
        part.backward()
        want += part.item()
    assert loss == pytest.approx(want, rel=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # without the restarts, the later sequences would read the earlier ones
        packed, one_sequence = model(**batch).logits, model(batch["input_ids"]).logits
    torch.testing.assert_close(packed[:, :7], one_sequence[:, :7])
    assert not torch.allclose(packed[:, 7:], one_sequence[:, 7:], atol=1e-3)


def test_position_ids_that_restart_in_several_rows_pack_each_row():
    model, seqs = routed("qwen2"), prompts([5, 7, 8, 4], seed=3)
    x = torch.stack([torch.cat(seqs[:2]), torch.cat(seqs[2:])])  # (2, 12): two documents per row
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(8)) + list(range(4))])
    got = logits(model, x, position_ids=pos)
    for row, (a, b) in enumerate([(0, 1), (2, 3)]):
        torch.testing.assert_close(got[row, : len(seqs[a])], logits(model, seqs[a][None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[row, len(seqs[a]) :], logits(model, seqs[b][None])[0], atol=1e-5, rtol=1e-5)


def test_packed_sequences_need_an_empty_cache():
    model, x = faolmo(window=3), ids(batch=1, length=8)
    out = model(x, use_cache=True)
    with pytest.raises(ValueError, match="empty cache"):
        model(x, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]) + 8, **next_step(model, out))


def _base(family: str):
    torch.manual_seed(5)
    if family == "olmo2":
        return Olmo2ForCausalLM(Olmo2Config(**TINY)).eval()
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    with torch.no_grad():  # Qwen2 initialises its q/k/v biases to zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", ["olmo2", "llama", "qwen2"])
def test_a_converted_model_gives_the_original_logits_and_round_trips(tmp_path, family):
    base, x = _base(family), ids(length=12)
    routed = add_router(base, window=2)
    assert routed.config.local_window_size == 2 and routed.config.router_bias
    with GateStats(routed) as stats:
        got = logits(routed, x)
    assert stats.all_share() == 1.0  # every gate starts All
    torch.testing.assert_close(got, logits(base, x), atol=1e-5, rtol=1e-5)
    routed.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(routed)
    torch.testing.assert_close(logits(loaded, x), got)
    with torch.no_grad():  # and the router is live: negative bias, every gate Here, window 2 matters
        for layer in routed.model.layers:
            layer.self_attn.gate_bias.fill_(-1.0)
    assert not torch.allclose(logits(routed, x), got, atol=1e-3)


def test_the_converter_names_what_it_cannot_convert():
    other = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="gpt2"):
        add_router(other, window=4)
    with pytest.raises(ValueError, match="init_logit"):
        add_router(_base("llama"), window=4, init_logit=0.0)
    sliding = Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4))
    with pytest.raises(ValueError, match="sliding"):
        add_router(sliding, window=4)
    with pytest.raises(ValueError, match="local_window_size"):
        FAOlmoConfig(local_window_size=0)


def test_convert_command_writes_a_faolmo_checkpoint(tmp_path):
    base = _base("olmo2")
    base.save_pretrained(tmp_path / "src")
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "dst"), "--window", "4"]) == 0
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["model_type"] == "faolmo" and config["local_window_size"] == 4 and config["router_bias"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    torch.testing.assert_close(logits(loaded, ids()), logits(base, ids()), atol=1e-5, rtol=1e-5)


def _router_grads(model, x, sparsity):
    model.zero_grad()
    loss = model(x, labels=x).loss
    (loss + sparsity()).backward()
    return loss.item(), [layer.self_attn.gate_bias.grad.clone() for layer in model.model.layers]


def test_fine_tuning_a_converted_model_lowers_the_loss_and_checkpointing_keeps_router_grads():
    routed = add_router(_base("llama"), window=2).train()
    sparsity = RouterSparsity(routed, lam=1.0)
    x = ids(batch=4, length=16)
    _, plain = _router_grads(routed, x, sparsity)
    enable = getattr(routed, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5
        routed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss0, checkpointed = _router_grads(routed, x, sparsity)
    assert all(g.abs().sum() > 0 for g in plain)
    torch.testing.assert_close(checkpointed, plain)  # the recomputed pass replaced, did not add
    opt, losses = torch.optim.AdamW(routed.parameters(), lr=1e-2), [loss0]
    for _ in range(6):
        opt.step()
        losses.append(_router_grads(routed, x, sparsity)[0])
    assert losses[-1] < losses[0]


def test_router_sparsity_refuses_logits_without_gradient():
    routed = add_router(_base("olmo2"), window=2).train()
    sparsity = RouterSparsity(routed)
    with torch.no_grad():
        routed(ids())
    with pytest.raises(RuntimeError, match="no gradient"):
        sparsity()


def test_rotary_embedding_matches_transformers():
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RotaryEmbedding

    pos = torch.arange(20)[None]
    cos, sin = Olmo2RotaryEmbedding(Olmo2Config(**TINY))(torch.zeros(1), pos)
    mine = rotary_embedding(pos, D, 10000.0)
    torch.testing.assert_close(mine[0], cos)
    torch.testing.assert_close(mine[1], sin)


def test_the_routed_types_are_registered():
    from transformers import AutoConfig

    for model_type in ("faolmo", "aha_llama", "aha_qwen2"):
        assert AutoConfig.for_model(model_type).model_type == model_type
    assert aha.hf.FAOlmoConfig().local_window_size >= 1


def test_the_fine_tuning_example_runs_and_learns():
    import math
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
    if not script.exists():
        pytest.skip("examples/ is not part of this installation")
    result = runpy.run_path(str(script))["main"](steps=20)
    assert result["lm_loss"] < 0.8 * math.log(128)  # from ln(vocab) at the start
    assert result["all_share"] < 1.0  # the routers left the all-All start


def test_transformers_builds_no_attention_mask_for_the_routed_layers(monkeypatch):
    """The layers never read transformers' 4-D mask, so none is built: a padded or packed batch of N tokens
    costs no [B, 1, N, N] tensor."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    mapping = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping

    def refuse(*args, **kwargs):
        raise AssertionError("transformers built an attention mask")

    model, seqs = routed("llama"), prompts([9, 4, 6])
    for name in list(mapping):
        monkeypatch.setitem(mapping, name, refuse)
    x, mask = pad(seqs, "left")
    model(x, attention_mask=mask)  # padded
    model(torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(len(s)) for s in seqs])[None])  # packed


# --- transformers conventions: GenerationMixin, bare models, attn_implementation -------------------

BARE = {"olmo2": aha.hf.FAOlmoModel, "llama": aha.hf.AHALlamaModel, "qwen2": aha.hf.AHAQwen2Model}


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_models_load_with_automodel_and_the_lms_inherit_generation_mixin(tmp_path, family):
    from transformers import AutoModel, GenerationMixin

    model, x = routed(family), ids(length=12)
    lm_class = type(model)
    assert GenerationMixin in lm_class.__bases__ and lm_class.can_generate()
    assert type(model.model) is BARE[family] and not BARE[family].can_generate()
    model.save_pretrained(tmp_path)
    bare = AutoModel.from_pretrained(tmp_path).eval()
    assert type(bare) is BARE[family]
    with torch.no_grad():
        torch.testing.assert_close(bare(x).last_hidden_state, model.model(x).last_hidden_state)
        bare.save_pretrained(tmp_path / "bare")  # and the bare checkpoint loads into the LM's body
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bare").eval()
    for key, value in bare.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


@pytest.mark.parametrize("requested", ["flash_attention_2", "flex_attention", "paged|eager", "kernels-community/x"])
def test_an_attn_implementation_aha_cannot_honour_is_refused(tmp_path, requested):
    faolmo(window=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"attn_implementation=.*not supported.*'sdpa'.*'eager'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=requested)
    with pytest.raises(ValueError, match="All-or-Here"):
        FAOlmoForCausalLM(FAOlmoConfig(local_window_size=3, attn_implementation=requested, **TINY))


def test_eager_and_sdpa_are_honoured_and_can_be_switched(tmp_path):
    model, x = faolmo(window=3), ids(length=12)
    assert model.config._attn_implementation == "sdpa"
    fast = model(x)
    assert fast.attentions is None
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        plain = model(x, output_attentions=True)
    torch.testing.assert_close(plain.logits, fast.logits, atol=1e-5, rtol=1e-5)
    assert len(plain.attentions) == TINY["num_hidden_layers"]
    model.set_attn_implementation("sdpa")
    model.save_pretrained(tmp_path)
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation
        == "eager"
    )


# --- output_attentions: one map per layer, each row All's or Here's softmax as routed ----------------


def record_gates(model) -> tuple[list, list]:
    """Each layer's hard gate [B, Hq, N] of every forward, in order; and the handles to remove."""
    seen = []
    handles = [layer.self_attn.observe(lambda mod, logits, gate, offset: seen.append(gate.bool()))
               for layer in model.model.layers]  # fmt: skip
    return seen, handles


def expected_support(gate, lp: int, offset: int, n: int, window: int) -> torch.Tensor:
    """[Hq, N, offset + N]: the keys each query of a row left-padded by ``lp`` reads, as its gate chose."""
    i = offset + torch.arange(n)[:, None]  # each query's key slot
    j = torch.arange(offset + n)
    causal = (j <= i) & (j >= lp)
    here = causal & (j > i - window)
    return torch.where(gate[..., None], causal, here)  # a padding query (i < lp) reads nothing


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_gives_each_query_alls_or_heres_softmax_as_routed(family, implementation):
    model, seqs = routed(family, window=3), prompts([9, 4, 6])
    x, mask = pad(seqs, "left")
    model.set_attn_implementation(implementation)  # sdpa: the plain path runs when weights are asked for
    gates, handles = record_gates(model)
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_attentions=True, use_cache=True)
        step = model(ids(3, 1), attention_mask=torch.cat([mask, mask.new_ones(3, 1)], 1), output_attentions=True,
                     **next_step(model, out))  # fmt: skip
    for h in handles:
        h.remove()
    assert len(out.attentions) == len(step.attentions) == TINY["num_hidden_layers"]
    with torch.no_grad():
        torch.testing.assert_close(out.logits, logits(model, x, attention_mask=mask), atol=1e-5, rtol=1e-5)
    layers = len(model.model.layers)
    for weights, gate, offset, n in [(out.attentions, gates[:layers], 0, 9), (step.attentions, gates[layers:], 9, 1)]:
        for w, g in zip(weights, gate):
            assert w.shape == (3, H, n, offset + n)
            for b, s in enumerate(seqs):
                lp = 9 - len(s)
                support = expected_support(g[b], lp, offset, n, window=3)
                assert torch.equal(w[b] > 0, support), f"row {b}"
                torch.testing.assert_close(w[b].sum(-1), support.any(-1).float())  # 1, or 0 for a padding query
    assert any(bool(g.any()) and not bool(g.all()) for g in gates)  # a real mix of All and Here rows


def test_output_attentions_of_packed_sequences_stay_within_each_sequence():
    model, seqs = routed("llama", window=2), prompts([4, 3, 5], seed=4)
    model.set_attn_implementation("eager")
    x = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        w = model(x, position_ids=pos, output_attentions=True).attentions[0][0]  # (Hq, 12, 12)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 3, 5]))
    outside = doc[:, None] != doc[None, :]
    assert bool((w[:, outside] == 0).all()) and bool((w.sum(-1) - 1).abs().max() < 1e-5)


def test_assisted_decoding_returns_the_attentions_and_the_same_tokens():
    model, assistant = faolmo(window=3, seed=0), faolmo(window=3, seed=1)
    prompt = ids(batch=1, length=6, seed=2)
    for m in (model, assistant):
        m.set_attn_implementation("eager")
    out = model.generate(prompt, assistant_model=assistant, max_new_tokens=6, do_sample=False,
                         output_attentions=True, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=6, do_sample=False))
    assert all(len(step) == TINY["num_hidden_layers"] for step in out.attentions)
    assert out.attentions[0][0].shape == (1, H, 6, 6) and out.attentions[-1][0].shape[-1] == 11


# --- 4-D masks: causal plus padding becomes the ragged arguments; any other is refused ---------------


def transformers_4d_mask(model, x, mask, implementation: str, cache=None):
    """The 4-D mask transformers' own Llama/OLMo-2 code builds from a 2-D padding mask."""
    from transformers.masking_utils import create_causal_mask

    config = type(model.config)(**{**model.config.to_dict(), "attn_implementation": implementation})
    config._attn_implementation = implementation
    embeds = torch.zeros(*x.shape, 1)
    kw = {"cache": cache} if "cache" in inspect.signature(create_causal_mask).parameters else {"past_key_values": cache}
    return create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=mask, allow_is_causal_skip=False,
                              position_ids=torch.arange(x.shape[1])[None], **kw)  # fmt: skip


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])  # bool and additive float masks
def test_a_4d_causal_plus_padding_mask_gives_the_logits_of_its_2d_mask(implementation):
    model, seqs = routed("olmo2"), prompts([9, 4, 5])
    x, mask = pad(seqs, "right")
    x[2], mask[2] = x[2].roll(2), mask[2].roll(2)  # row 1 right padding, row 2 both sides
    mask4 = transformers_4d_mask(model, x, mask, implementation)
    assert mask4.shape == (3, 1, 9, 9) and (mask4.dtype == torch.bool) == (implementation == "sdpa")
    with torch.no_grad():
        got, want = model(x, attention_mask=mask4).logits, model(x, attention_mask=mask).logits
    for i, (s, start) in enumerate(zip(seqs, [0, 0, 2])):
        torch.testing.assert_close(got[i, start : start + len(s)], want[i, start : start + len(s)])
    left, lmask = pad(seqs, "left")  # and a decode step over a left-padded cache, as generate() makes it
    with torch.no_grad():
        out = model(left, attention_mask=lmask, use_cache=True)
        step_mask = torch.cat([lmask, lmask.new_ones(3, 1)], 1)
        mask4 = transformers_4d_mask(model, left[:, :1], step_mask, implementation, cache=out.cache)
        assert mask4.shape == (3, 1, 1, 10)
        got = model(left[:, :1], attention_mask=mask4, **next_step(model, out)).logits
    with torch.no_grad():
        out = model(left, attention_mask=lmask, use_cache=True)
        want = model(left[:, :1], attention_mask=step_mask, **next_step(model, out)).logits
    torch.testing.assert_close(got, want)


def _document_mask(lengths):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    n = len(doc)
    return ((doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool).tril())[None, None]


@pytest.mark.parametrize(
    "name, mask, says",
    [
        ("bidirectional", torch.ones(1, 1, 8, 8, dtype=torch.bool), r"query 0 \(key slot 0\) reads key 1"),
        ("packed documents", _document_mask([3, 5]), r"query 3 \(key slot 3\) does not read key 0"),
        ("sliding window", torch.ones(8, 8, dtype=torch.bool).tril().triu(-2)[None, None], "does not read key 0"),
        ("additive bias", torch.zeros(1, 1, 8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), -1e9) - 0.5, "bias"),
        ("wrong shape", torch.ones(1, 1, 8, 7, dtype=torch.bool), r"\[1, 1, 8, 8\]"),
    ],
)
def test_a_4d_mask_that_is_not_causal_plus_padding_is_refused_with_the_reason(name, mask, says):
    model = faolmo(window=3)
    with pytest.raises(ValueError, match="4-D") as err:
        model(ids(batch=1, length=8), attention_mask=mask)
    assert re.search(says, str(err.value)), str(err.value)
    if name != "wrong shape":
        assert "causal mask plus padding" in str(err.value)


def test_docs_list_every_upstream_test_skipped_by_design():
    from pathlib import Path

    from hf_testers.skips import BY_DESIGN

    page = " ".join((Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text().split())
    for key, reason in BY_DESIGN.items():
        assert f"| `{key}` | {reason} |" in page, key
