"""The reproduction experiment (aha.experiments): corpus split, passkey data, gate shares, the regulariser's
direction, and the whole pipeline in --quick mode (JSON fields, plots, the page generated from the JSON)."""

from __future__ import annotations

import json
import zlib

import pytest

torch = pytest.importorskip("torch")

from aha.experiments import corpus as corpus_mod  # noqa: E402
from aha.experiments.model import ByteLM, GateRecorder, ModelConfig, init_routers, lm_loss, set_window  # noqa: E402
from aha.experiments.pipeline import FULL  # noqa: E402
from aha.experiments.probe import PLANT, build_passkey  # noqa: E402
from aha.experiments.train import TrainConfig, evaluate, finetune, forced_gates, gate_shares  # noqa: E402
from aha.training import GateStats  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on shared cores: no OpenMP spin-waiting
    yield
    torch.set_num_threads(threads)


def _tree(tmp_path, files: dict[str, bytes]):
    for rel, data in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


def test_split_is_by_file_and_deterministic(tmp_path):
    files = {f"pkg{i % 3}/mod{i}.py": f"# module {i}\n".encode() * (i + 1) for i in range(40)}
    files["site-packages/foreign.py"] = b"not the stdlib\n"
    files["pkg0/notes.txt"] = b"not python\n"
    root = _tree(tmp_path, files)
    c = corpus_mod.load_corpus(root, heldout_per_mille=300)
    held = sorted(r for r in files if r.endswith(".py") and not r.startswith("site") and corpus_mod.is_heldout(r, 300))
    train = sorted(r for r in files if r.endswith(".py") and not r.startswith("site") and r not in held)
    assert 0 < len(held) < 40 and c.heldout_files == len(held) and c.train_files == len(train)
    assert bytes(c.heldout.tolist()) == corpus_mod.SEPARATOR.join(files[r] for r in held)
    assert bytes(c.train.tolist()) == corpus_mod.SEPARATOR.join(files[r] for r in train)
    assert corpus_mod.is_heldout("a/b.py", 300) == (zlib.crc32(b"a/b.py") % 1000 < 300)
    again = corpus_mod.load_corpus(root, heldout_per_mille=300)
    assert torch.equal(again.train, c.train) and torch.equal(again.heldout, c.heldout)


def test_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        corpus_mod.stdlib_files(tmp_path)
    _tree(tmp_path, {"only.py": b"x = 1\n"})
    with pytest.raises(ValueError, match="heldout_per_mille"):
        corpus_mod.load_corpus(tmp_path, heldout_per_mille=0)


def test_stdlib_corpus_is_there():
    files = corpus_mod.stdlib_files()
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def _filler(n=20000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lines = [b"x%d = foo(%d)\n" % (int(i), int(i) * 7) for i in torch.randint(0, 99, (n // 10,), generator=gen)]
    return torch.frombuffer(bytearray(b"".join(lines)), dtype=torch.uint8)


@pytest.mark.parametrize("context", [64, 512])
def test_passkey_sequences(context):
    probe = build_passkey(_filler(), 12, context, digits=5)
    assert probe.ids.shape == probe.control.shape == (12, context)
    q = probe.query_positions
    for s, (key, p) in enumerate(zip(probe.keys, probe.plant_at)):
        seq, ctl = bytes(probe.ids[s].tolist()), bytes(probe.control[s].tolist())
        assert len(key) == 5 and key.isdigit() and key[0] != "0"
        line = PLANT + key.encode() + b"\n"
        assert seq[p : p + len(line)] == line and (p == 0 or seq[p - 1 : p] == b"\n")  # planted at a line start
        assert seq.endswith(b"\n" + PLANT + key.encode()) and ctl.endswith(b"\n" + PLANT + key.encode())
        assert seq.count(PLANT) == 2 and ctl.count(PLANT) == 1  # the control has no planted key
        assert seq[:p] == ctl[:p] and seq[p + len(line) :] == ctl[p + len(line) :]  # same filler, same places
        assert bytes(probe.ids[s, q + 1].tolist()) == key.encode()  # the targets after the queries are the key
    assert probe.ids[0].tolist() == build_passkey(_filler(), 12, context).ids[0].tolist()  # deterministic


def test_passkey_is_beyond_every_window_of_the_full_run():
    probe = build_passkey(_filler(), 32, FULL.model.context)
    line = len(PLANT) + probe.digits + 1
    nearest = int(probe.query_positions.min()) - max(p + line - 1 for p in probe.plant_at)
    assert nearest >= max(FULL.windows)  # only All reaches the planted key


def test_passkey_near_lies_at_the_distance_asked():
    probe = build_passkey(_filler(), 16, 512, distance=(80, 112))
    assert all(80 <= d <= 112 for d in probe.distances)
    q0 = int(probe.query_positions[0])
    for s, (key, p, d) in enumerate(zip(probe.keys, probe.plant_at, probe.distances)):
        last_digit = q0 - d
        assert bytes(probe.ids[s, last_digit - 4 : last_digit + 1].tolist()) == key.encode()
        assert p == 0 or probe.ids[s, p - 1] == ord("\n")
    with pytest.raises(ValueError, match="distance"):
        build_passkey(_filler(), 2, 64, distance=(10, 60))


@pytest.mark.parametrize("repeats", [1, 3])
def test_plant_passkeys_in_training_batches(repeats):
    import re

    ids = corpus_mod.sample_batch(_filler(), 64, 513, torch.Generator().manual_seed(0))
    out = corpus_mod.plant_passkeys(ids, 0.5, torch.Generator().manual_seed(1), repeats=repeats)
    assert out.shape == ids.shape and out.dtype == ids.dtype and not out.equal(ids)
    planted = 0
    for s in range(ids.shape[0]):
        seq, orig = bytes(out[s].tolist()), bytes(ids[s].tolist())
        lines = [m for m in re.finditer(rb"# the passkey is (\d{5})\n", seq)]
        if not lines:
            assert seq == orig  # left as it was
            continue
        planted += 1
        assert len(lines) == 1 + repeats and lines[0].group(1)[:1] != b"0"
        assert {m.group(1) for m in lines} == {lines[0].group(1)}  # the same key every time
        assert lines[0].start() < 513 // 2 and lines[1].start() - lines[0].end() >= 16
        assert all(m.start() == 0 or seq[m.start() - 1] == ord("\n") for m in lines)  # at line starts
        rest = re.sub(rb"# the passkey is \d{5}\n", b"", seq)
        assert orig.startswith(rest)  # the filler is the batch's own bytes, in order
    assert 16 <= planted <= 48  # about half of 64
    assert corpus_mod.plant_passkeys(ids, 0.0, torch.Generator()).equal(ids)


def test_full_config_plants_passkeys_and_sweeps_the_paper_lambda_everywhere():
    assert 0 < FULL.pretrain.passkey_fraction == FULL.finetune.passkey_fraction <= 0.5
    paper = next(s for s in FULL.sweeps if s.kind == "paper")
    assert paper.windows == tuple(FULL.windows) and {s.kind for s in FULL.sweeps} == {"paper", "none", "extra"}


def test_passkey_needs_room():
    with pytest.raises(ValueError, match="context"):
        build_passkey(_filler(), 2, 50)


def test_gate_shares_by_hand():
    gates = torch.zeros(2, 3, 4, 10, dtype=torch.bool)  # (L, S, Hq, N)
    gates[..., :4] = True  # every gate below window 4 All, none beyond
    gates[1, :, 2, 6] = True  # layer 1 head 2 All at one position beyond
    s = gate_shares(gates, 4)
    assert s["all_share"] == pytest.approx((2 * 3 * 4 * 4 + 3) / gates.numel())
    assert s["all_share_beyond_window"] == pytest.approx(3 / (2 * 3 * 4 * 6))
    assert s["per_head"][1][2] == pytest.approx(1 / 6) and s["per_head"][0][2] == 0
    assert s["per_layer"] == pytest.approx([0, 1 / 24])
    assert s["per_position"][:4] == [1, 1, 1, 1] and s["per_position"][6] == pytest.approx(1 / 8)


def _tiny(window=8):
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(context=32, layers=2, width=32, heads=2))
    set_window(model, window)
    return model


def test_routers_start_all_and_change_nothing():
    model = _tiny(window=32)  # window = context: plain causal attention
    ids = torch.randint(0, 256, (2, 33))
    ref = lm_loss(model, ids)
    set_window(model, 4)
    init_routers(model, 1.0)
    with GateRecorder(model) as rec:
        assert torch.allclose(lm_loss(model, ids), ref, atol=1e-6)  # every gate All: the full model's loss
    assert rec.gates().all()


def test_recorder_agrees_with_gatestats_and_forced_gates_restore():
    model = _tiny()
    for layer in model.blocks:
        torch.nn.init.normal_(layer.attn.router.weight)  # a mix of All and Here
    ids = torch.randint(0, 256, (3, 33))
    before = [b.attn.router.weight.clone() for b in model.blocks]
    with GateStats(model) as stats:
        _, gates = evaluate(model, ids, batch=2)
    assert gates.shape == (2, 3, 2, 32)
    assert 0 < gates.float().mean() < 1
    assert float(gates.float().mean()) == pytest.approx(stats.all_share())
    with forced_gates(model, all_=False):
        assert not evaluate(model, ids)[1].any()
    assert all(torch.equal(b.attn.router.weight, w) for b, w in zip(model.blocks, before))


def test_regulariser_pushes_towards_here():
    """Same weights, batches and steps: a large lambda ends with fewer All gates than none."""
    model = _tiny(window=32)
    data = corpus_mod.load_corpus(max_bytes=200_000)
    cfg = TrainConfig(steps=25, batch=4, lr=1e-2, warmup=1, router_lr_scale=3.0, seed=3)
    held = corpus_mod.heldout_windows(data.heldout, 8, 33)
    share = {}
    for lam in (0.0, 1.0):
        tuned, log = finetune(model, data.train, cfg, window=4, lam=lam)
        share[lam] = float(evaluate(tuned, held)[1][..., 4:].float().mean())
        assert log["curve"][0][2] == 1.0  # every fine-tune starts All
    assert share[1.0] < share[0.0] - 0.2


def test_quick_pipeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from aha.experiments.__main__ import main
    from aha.experiments.page import render
    from aha.experiments.pipeline import QUICK
    from aha.experiments.report import PLOTS, fmt

    out = tmp_path / "results"
    assert main(["reproduce", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    assert [(r["window"], r["lam"], r["kind"]) for r in runs] == [
        (w, s.lam, s.kind) for s in QUICK.sweeps for w in s.windows
    ]
    for key in ("heldout_loss", "here_only_loss", "gates", "passkey", "train"):
        assert all(key in r for r in runs), key
    for r in runs:
        g = r["gates"]
        assert 0 <= g["all_share"] <= 1 and 0 <= g["all_share_beyond_window"] <= 1
        assert len(g["per_head"]) == QUICK.model.layers and len(g["per_head"][0]) == QUICK.model.heads
        for name in ("passkey", "passkey_near"):
            p = r[name]
            assert 0 <= p["planted"]["digit_accuracy"] <= 1 and len(p["per_position"]) == QUICK.model.context - 1
            assert len(p["query_all_share"]) == QUICK.model.layers
    assert set(result["full"]["here_only_loss"]) == {str(w) for w in QUICK.windows}
    assert result["meta"]["seconds"] > 0 and result["meta"]["corpus"]["heldout_files"] > 0
    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (tmp_path / "results.md").read_text()
    assert page == render(result, "results")
    for r in runs:  # the table carries the JSON's numbers
        assert f"| {r['window']} | {r['lam']:g} | {fmt(r['heldout_loss'])} |" in page
    (tmp_path / "results.md").unlink()
    assert main(["report", "--out", str(out)]) == 0  # redrawn from the JSON alone
    assert (tmp_path / "results.md").read_text() == page

    # the calibration study on the weights reproduce kept, its section added to the same page
    from aha.experiments.calibrate import CALIBRATION_JSON, METHODS, STUDY_QUICK
    from aha.experiments.calibration_report import PLOT
    from aha.experiments.report import page_text

    assert (out / "pretrained.pt").is_file()
    assert main(["calibrate", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    study = json.loads((out / CALIBRATION_JSON).read_text())
    assert study["meta"]["pretrained"]["loaded"]
    assert study["full_loss"] == pytest.approx(result["full"]["heldout_loss"], abs=1e-5)  # the same weights
    assert study["reproduction"]["control_loss"] == result["full_continued"]["heldout_loss"]
    shares = STUDY_QUICK.shares()
    for method in METHODS:
        pts = [p for p in study["points"] if p["method"] == method]
        assert [(p["window"], p["target_share"]) for p in pts] == [(w, s) for w in STUDY_QUICK.windows for s in shares]
        for p in pts:
            assert p["delta_loss"] == pytest.approx(p["heldout_loss"] - study["full_loss"], abs=1e-5)
    for method in ("per_head", "oracle"):  # these meet the share exactly on the held-out data
        for p in study["points"]:
            if p["method"] == method:
                assert p["all_share"] == pytest.approx(p["target_share"], abs=1e-3)
    assert len(study["finetuned"]) == len(STUDY_QUICK.finetune_windows) * len(STUDY_QUICK.finetune_lams)
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "results.md").read_text()
    assert "## Routers without fine-tuning" in page and page == page_text(result, out)


def test_cli_errors(tmp_path, capsys):
    from aha.experiments.__main__ import main

    with pytest.raises(SystemExit):
        main(["report", "--out", str(tmp_path)])
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--quick", "--threads", "0", "--out", str(tmp_path)])
    assert "--threads" in capsys.readouterr().err


def test_progress_fallback_without_tqdm(monkeypatch):
    import io
    import sys

    from aha.experiments.progress import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = io.StringIO()
    bar = Progress(3, stream=stream)
    bar.stage("pretrain")
    for _ in range(3):
        bar.update(1.5)
    bar.close()
    text = stream.getvalue()
    assert "pretrain" in text and "100% (3/3)" in text and "loss 1.500" in text


def test_config_checks_its_sweeps():
    from dataclasses import replace

    from aha.experiments.pipeline import QUICK, Sweep

    with pytest.raises(ValueError, match="kind"):
        replace(QUICK, sweeps=(Sweep("bigger", 1.0, (8,)),))
    with pytest.raises(ValueError, match="windows"):
        replace(QUICK, sweeps=(Sweep("paper", 3e-4, (QUICK.model.context,)),))
    assert QUICK.windows == sorted({w for s in QUICK.sweeps for w in s.windows})


def test_committed_results_page_is_rendered_from_its_json():
    """docs/results.md is exactly what docs/results/results.json renders to: no hand edits, no stale page."""
    from pathlib import Path

    from aha.experiments.report import PLOTS, page_text

    docs = Path(__file__).resolve().parents[1] / "docs"
    if not (docs / "results" / "results.json").is_file():
        pytest.skip("no committed results")
    result = json.loads((docs / "results" / "results.json").read_text())
    assert (docs / "results.md").read_text() == page_text(result, docs / "results"), (
        "docs/results.md is stale: run `python -m aha.experiments report`"
    )
    assert all((docs / "results" / name).is_file() for name in PLOTS.values())


def test_pretrained_weights_round_trip_and_name_their_config(tmp_path):
    from dataclasses import replace

    from aha.experiments.pipeline import QUICK, load_pretrained, save_pretrained

    torch.manual_seed(0)
    model = ByteLM(QUICK.model)
    log = {"curve": [[1, 5.0, None]], "seconds": 1.0}
    save_pretrained(model, QUICK, log, tmp_path / "pretrained.pt")
    loaded, got = load_pretrained(QUICK, tmp_path / "pretrained.pt")
    assert got == log
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = replace(QUICK, pretrain=replace(QUICK.pretrain, steps=QUICK.pretrain.steps + 1))
    with pytest.raises(ValueError, match="path: .* was pretrained with"):
        load_pretrained(other, tmp_path / "pretrained.pt")
