"""Router calibration (aha.calibration, aha.hf.calibrate): the need it measures against the layer's own
forward, a planted head that needs far context, shares and budgets, and the command for transformers checkpoints."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from aha.calibration import calibrate_routers, measure_need, need_gates, need_threshold  # noqa: E402
from aha.nn import AHAAttention  # noqa: E402
from aha_tiny import one_thread  # noqa: E402, F401

ANCHOR, MARKER, FILLER = 0, 1, 2
C, WINDOW, N = 8, 4, 32


class Planted(nn.Module):
    """One AHA layer over fixed embeddings. Head 0 of a MARKER token attends to the ANCHOR at position 0 (far
    beyond the window) and copies it; other tokens look at nothing in particular and head 0's values are 0
    except at the anchor. Head 1 reads a constant value: Here and All give it the same output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, C)
        self.attn = AHAAttention(C, 2, window=WINDOW, rope_theta=None, router_bias=True)
        with torch.no_grad():
            e = torch.zeros(3, C)
            e[ANCHOR, 0] = e[MARKER, 1] = e[FILLER, 2] = 1.0
            e[:, 7] = 1.0  # a constant feature
            self.embed.weight.copy_(e)
            for proj in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj):
                proj.weight.zero_()
            self.attn.q_proj.weight[0, 1] = 8.0  # head 0, dim 0 of q: the marker
            self.attn.k_proj.weight[0, 0] = 8.0  # head 0, dim 0 of k: the anchor
            self.attn.v_proj.weight[0, 0] = 1.0  # head 0's value: the anchor indicator
            self.attn.v_proj.weight[4, 7] = 1.0  # head 1's value: constant
            self.attn.o_proj.weight[:, :] = torch.eye(C)

    def forward(self, ids):
        return self.attn(self.embed(ids))


def planted_ids(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, N), FILLER)
    ids[:, 0] = ANCHOR
    ids[torch.rand(batch, N, generator=gen) < 0.2] = MARKER
    ids[:, 0] = ANCHOR
    return ids


def test_a_planted_head_that_needs_far_context_gets_all_where_it_needs_it():
    model = Planted()
    cal = planted_ids(16, seed=0)
    beyond = cal[:, WINDOW:]
    share = float((beyond == MARKER).float().mean()) / 2  # head 0 at every marker, of two heads
    report = calibrate_routers(model, [cal[:8], cal[8:]], window=WINDOW, share=share)
    assert model.attn.window == WINDOW
    assert report["oracle"]["per_head"][0][1] == 0.0  # head 1 never needs All
    test = planted_ids(8, seed=1)
    with torch.no_grad():
        gates = model.attn.router.gate(model.attn.router(model.embed(test)))  # (B, 2, N)
    marker = test == MARKER
    assert torch.equal(gates[:, 0, WINDOW:], marker[:, WINDOW:])  # All exactly at the far-reading tokens
    assert not gates[:, 1, WINDOW:].any()
    assert report["router"]["need_covered"] == pytest.approx(report["oracle"]["need_covered"])


class Stack(nn.Module):
    """Three residual AHA layers on hidden states: what a layer reads depends on how the layers before it route."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(AHAAttention(16, 4, window=4, router_bias=True) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + 2.0 * layer(x)
        return x


def _routed_shares(model, batches, window) -> torch.Tensor:
    """[L, Hq] share of All at positions >= window as ``model`` runs on ``batches`` with its routers."""
    seen = [[] for _ in model.layers]
    hooks = [
        layer.router.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(mod.gate(out)))
        for i, layer in enumerate(model.layers)
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return torch.stack([torch.cat(g)[:, :, window:].float().mean((0, 2)) for g in seen])


@pytest.mark.parametrize("share", [0.1, 0.25])
def test_layer_by_layer_calibration_meets_the_share_as_the_model_runs(share):
    """Each head routes All the share the oracle gave it, on the calibration data, with the layers before it routed.

    (Fitted on full-attention inputs instead, the later layers' shares drift: on the reproduction's model
    a third fewer tokens were All than asked.)
    """
    model = Stack().eval()
    batches = list(torch.randn(4, 2, 40, 16).unbind())
    report = calibrate_routers(model, batches, window=8, share=share)
    want = torch.tensor(report["oracle"]["per_head"])
    tokens = report["tokens"]
    got = _routed_shares(model, batches, 8)
    torch.testing.assert_close(got.double(), want.double(), atol=1.5 / tokens, rtol=0)
    torch.testing.assert_close(torch.tensor(report["router"]["per_head"]), got, atol=1e-6, rtol=0)
    assert abs(float(got.mean()) - share) <= 1.0 / tokens


def test_one_pass_calibration_fits_every_layer_on_full_attention_inputs():
    """sequential=False: the old behaviour, the first layer as sequential has it, the later ones not."""
    a, b = Stack().eval(), Stack().eval()
    batches = list(torch.randn(4, 2, 40, 16).unbind())
    calibrate_routers(a, batches, window=8, share=0.25)
    calibrate_routers(b, batches, window=8, share=0.25, sequential=False)
    assert torch.equal(a.layers[0].router.weight, b.layers[0].router.weight)
    assert not torch.equal(a.layers[2].router.weight, b.layers[2].router.weight)
    need = measure_need(b, batches, window=8, keep_inputs=True)
    with pytest.raises(ValueError, match="give the calibration batches too"):
        calibrate_routers(b, window=8, share=0.25, need=need)
    calibrate_routers(b, window=8, share=0.25, need=need, sequential=False)


def test_the_measured_need_is_the_layers_own_all_against_here():
    """Against the layer's forward (aha.attention): one head forced Here, the others All."""
    torch.manual_seed(0)
    layer = AHAAttention(16, 4, window=3, num_kv_heads=2, router_bias=True, qk_norm="head").eval()
    x = torch.randn(2, 12, 16)
    need = measure_need(layer, [x], window=3)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.fill_(1.0)
        layer.window = 3
        full, weights = layer(x, return_weights=True)
        for h in range(4):
            layer.router.bias[h] = -1.0
            here = layer(x)
            layer.router.bias[h] = 1.0
            want = (full - here).norm(dim=-1) / full.norm(dim=-1)
            want[:, :3] = 0
            torch.testing.assert_close(need.output[0, :, h], want, atol=1e-5, rtol=1e-4)
    cols = torch.arange(12)
    outside = cols[None, :] <= cols[:, None] - 3
    want_mass = (weights * outside).sum(-1)
    want_mass[..., :3] = 0
    torch.testing.assert_close(need.mass[0], want_mass, atol=1e-5, rtol=1e-4)


def test_thresholds_meet_a_share_or_a_budget():
    need = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert (need > need_threshold(need, share=0.3)).sum() == 3
    # budget 0.2: Here may carry at most 3 of the total 15: the top three (12) are All
    assert (need > need_threshold(need, budget=0.2)).sum() == 3
    assert (need > need_threshold(need, budget=0.99)).sum() == 1
    for bad in ({"share": 0.0}, {"share": 1.5}, {"budget": 1.0}, {}, {"share": 0.1, "budget": 0.1}):
        with pytest.raises(ValueError, match="share|budget"):
            need_threshold(need, **bad)


def test_oracle_gates_meet_the_share_beyond_the_window_and_are_all_below_it():
    torch.manual_seed(1)
    layer = AHAAttention(16, 4, window=3, router_bias=True).eval()
    need = measure_need(layer, [torch.randn(3, 20, 16)], window=5)
    gates = need_gates(need, share=0.25)
    assert gates[..., :5].all()
    assert abs(float(gates[..., 5:].float().mean()) - 0.25) < 0.01


def test_calibration_errors_name_the_argument():
    model = Planted()
    ids = planted_ids(2, seed=0)
    with pytest.raises(ValueError, match="window"):
        calibrate_routers(model, [ids], window=N, share=0.1)
    with pytest.raises(ValueError, match="window"):
        calibrate_routers(model, [ids], window=0, share=0.1)
    with pytest.raises(ValueError, match="share"):
        calibrate_routers(model, [ids], window=WINDOW, share=1.0)
    with pytest.raises(ValueError, match="batches"):
        calibrate_routers(model, [], window=WINDOW, share=0.1)
    with pytest.raises(ValueError, match="router has no bias"):
        calibrate_routers(AHAAttention(8, 2, window=2), [torch.randn(1, 8, 8)], window=2, share=0.2)


# --- transformers checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def olmo2_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import TINY

    torch.manual_seed(5)
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**TINY)).save_pretrained(tmp_path / "src")
    torch.save(torch.randint(2, 100, (4000,), generator=torch.Generator().manual_seed(0)), tmp_path / "ids.pt")
    return tmp_path


def test_the_command_calibrates_a_checkpoint_that_round_trips(olmo2_dir, capsys):
    from transformers import AutoModelForCausalLM

    from aha.hf.calibrate import REPORT, main
    from aha.training import GateStats

    src, dst = olmo2_dir / "src", olmo2_dir / "dst"
    argv = [str(src), str(dst), "--window", "8", "--share", "0.25", "--data", str(olmo2_dir / "ids.pt")]
    assert main([*argv, "--length", "32", "--sequences", "16"]) == 0
    assert "All share" in capsys.readouterr().out
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "faolmo" and config["local_window_size"] == 8 and config["router_bias"]
    report = json.loads((dst / REPORT).read_text())
    assert abs(report["router"]["all_share"] - 0.25) < 0.05
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.load(olmo2_dir / "ids.pt")[: 16 * 32].view(16, 32)
    seen = [[] for _ in loaded.model.layers]
    for i, layer in enumerate(loaded.model.layers):
        layer.self_attn.observe(lambda m, logits, gate, offset, i=i: seen[i].append(gate))
    with GateStats(loaded) as stats, torch.no_grad():
        loaded(ids)
    # calibrated layer by layer: every layer routes on the calibration data as the report says
    assert report["sequential"] and len(seen) > 1
    for i, gates in enumerate(seen):
        per_head = gates[0][..., 8:].float().mean((0, 2))
        torch.testing.assert_close(per_head, torch.tensor(report["router"]["per_head"][i]), atol=1e-6, rtol=0)
    assert 0 < stats.all_share() < 1
    bias = loaded.model.layers[0].self_attn.gate_bias
    assert not torch.equal(bias, torch.ones_like(bias))  # set by calibration, not add_router's start
    assert main([*argv, "--length", "32", "--sequences", "16", "--no-sequential"]) == 0
    assert json.loads((dst / REPORT).read_text())["sequential"] is False


def test_the_command_reads_text_with_the_checkpoints_tokenizer(olmo2_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from aha.hf.calibrate import load_tokens, main

    words = [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({w: i + 2 for i, w in enumerate(words)} | {"<unk>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(olmo2_dir / "src")
    gen = torch.Generator().manual_seed(3)
    text = " ".join(words[int(i)] for i in torch.randint(0, 90, (2000,), generator=gen))
    (olmo2_dir / "text.txt").write_text(text)
    ids = load_tokens(olmo2_dir / "text.txt", length=32, tokenizer_src=olmo2_dir / "src")
    assert ids.shape == (2000 // 32, 32)
    assert ids.flatten().tolist() == AutoTokenizer.from_pretrained(olmo2_dir / "src")(text)["input_ids"][: ids.numel()]
    argv = [str(olmo2_dir / "src"), str(olmo2_dir / "dst"), "--window", "8", "--budget", "0.5"]
    assert main([*argv, "--data", str(olmo2_dir / "text.txt"), "--length", "32"]) == 0
    assert (olmo2_dir / "dst" / "tokenizer.json").is_file()  # the tokenizer travels with the checkpoint
    report = json.loads((olmo2_dir / "dst" / "aha_calibration.json").read_text())
    assert report["oracle"]["need_covered"] >= 0.5 and report["target"]["budget"] == 0.5


def test_a_routed_checkpoint_without_router_bias_gets_one(olmo2_dir):
    from transformers import AutoModelForCausalLM

    from aha.hf.calibrate import main
    from test_hf import faolmo

    src = faolmo(window=4)  # the released layout: routers without bias, trained gate rows
    assert not src.config.router_bias
    src.save_pretrained(olmo2_dir / "routed")
    argv = [str(olmo2_dir / "routed"), str(olmo2_dir / "dst"), "--window", "8", "--share", "0.3"]
    assert main([*argv, "--data", str(olmo2_dir / "ids.pt"), "--length", "32"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(olmo2_dir / "dst").eval()
    assert loaded.config.router_bias and loaded.config.local_window_size == 8
    assert all(layer.self_attn.window == 8 for layer in loaded.model.layers)
    heads = src.config.num_attention_heads
    for name, weight in src.state_dict().items():  # every weight but the gate rows is the source's
        got = loaded.state_dict()[name]
        if name.endswith("q_proj.weight"):
            weight, got = weight[:-heads], got[:-heads]
        torch.testing.assert_close(got, weight, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--share", "1.5"], "--share"),
        (["--share", "0"], "--share"),
        (["--budget", "2"], "--budget"),
        (["--share", "0.1", "--window", "0"], "--window"),
        (["--share", "0.1", "--window", "64"], "--window"),
        (["--share", "0.1", "--data", "EMPTY"], "--data"),
        (["--share", "0.1", "--data", "TEXT"], "--data"),
    ],
)
def test_the_command_names_a_bad_argument(olmo2_dir, capsys, extra, match):
    from aha.hf.calibrate import main

    (olmo2_dir / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(0, dtype=torch.long), olmo2_dir / "empty.pt")
    (olmo2_dir / "text.txt").write_text("some calibration text, but src has no tokenizer\n")
    args = {"--window": "8", "--data": str(olmo2_dir / "ids.pt")}
    it = iter(extra)
    for k in it:
        args[k] = next(it)
    args["--data"] = {"EMPTY": str(olmo2_dir / "empty.pt"), "TEXT": str(olmo2_dir / "text.txt")}.get(
        args["--data"], args["--data"]
    )
    argv = [str(olmo2_dir / "src"), str(olmo2_dir / "dst")] + [x for kv in args.items() for x in kv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
