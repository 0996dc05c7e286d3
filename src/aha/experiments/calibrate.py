"""Routers without fine-tuning: calibration from the model's own attention, against per-head, random and oracle routing.

``study(cfg, out)`` loads the reproduction's pretrained full-attention model (``out/pretrained.pt``,
written by ``reproduce`` or ``pretrain``; pretrained again when missing), and at each window and each
matched share of All evaluates, on the reproduction's held-out windows:

* ``calibrated``: routers fitted by `aha.calibration.calibrate_routers` (relative output change, layer by
  layer), no training;
* ``calibrated_one_pass``: the same, every layer fitted on its full-attention input (``sequential=False``);
* ``calibrated_mass``: layer by layer, fitted to the attention mass outside the window;
* ``per_head``: the heads of highest mean need All for every token, the rest Here (DuoAttention's static split);
* ``random``: each token All at random, with the calibrated routers' per-head shares on the held-out data;
* ``oracle``: All exactly where the measured need of the held-out token is highest (a bound no router reaches);
* ``calibrated_finetuned``: calibrated routers, then the reproduction's fine-tune (its steps, batches and lambdas).

Shares are counted at positions >= window (Here = All below). They are multiples of one head's share,
``k / (layers * heads)``, so that the per-head split meets them exactly. Writes ``out/calibration.json`` and
``out/calibration.png``; the page section comes from the JSON (`aha.experiments.page`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from aha.calibration import calibrate_routers, measure_need, need_gates
from aha.experiments.corpus import heldout_windows, load_corpus
from aha.experiments.model import init_routers, set_window
from aha.experiments.pipeline import (
    FULL,
    PRETRAINED,
    QUICK,
    RESULTS_JSON,
    ExperimentConfig,
    ResultWriter,
    load_pretrained,
    pretrain,
    run_meta,
    save_pretrained,
)
from aha.experiments.progress import Progress
from aha.experiments.train import evaluate, gate_shares, train
from aha.nn import aha_layers
from aha.training import LAMBDA

__all__ = ["StudyConfig", "STUDY", "STUDY_QUICK", "study", "CALIBRATION_JSON", "METHODS"]

CALIBRATION_JSON = "calibration.json"
CALIBRATION_PLOT = "calibration.png"
METHODS = ("calibrated", "calibrated_one_pass", "calibrated_mass", "per_head", "random", "oracle")
CALIBRATIONS = (  # method, measure, sequential
    ("calibrated", "output", True),
    ("calibrated_one_pass", "output", False),
    ("calibrated_mass", "mass", True),
)
CALIBRATION_SEED = 4321  # the calibration windows (from the training split)
RANDOM_SEED = 7  # the random routing


@dataclass(frozen=True)
class StudyConfig:
    experiment: ExperimentConfig  # the reproduction's: model, pretraining, fine-tune, held-out windows
    windows: tuple[int, ...]
    heads_all: tuple[int, ...]  # matched shares: this many heads' worth of All (share = k / (layers * heads))
    calibration_sequences: int = 32
    finetune_windows: tuple[int, ...] = ()
    finetune_heads_all: int = 2  # the calibrated start of the fine-tunes
    finetune_lams: tuple[float, ...] = ()

    def shares(self) -> list[float]:
        total = self.experiment.model.layers * self.experiment.model.heads
        return [k / total for k in self.heads_all]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["experiment"] = {"model": d["experiment"]["model"], "finetune": d["experiment"]["finetune"]}
        return {**d, "shares": self.shares()}


STUDY = StudyConfig(
    experiment=FULL,
    windows=(16, 32, 64, 128, 256),
    heads_all=(1, 2, 3, 5),  # 6.25%, 12.5%, 18.75%, 31.25% of 16 heads
    finetune_windows=(16, 64, 256),
    finetune_lams=(LAMBDA, 3e-2),  # the reproduction's paper and larger lambda
)
STUDY_QUICK = StudyConfig(
    experiment=QUICK,
    windows=(8, 32),
    heads_all=(1, 2),
    calibration_sequences=8,
    finetune_windows=(8,),
    finetune_heads_all=1,
    finetune_lams=(3e-2,),
)


class _FixedRouter(nn.Module):
    """Stands in for a layer's router: logits +-1 from fixed gates [S, Hq, N], consecutive batches in order."""

    def __init__(self, gates: torch.Tensor):
        super().__init__()
        self.gates, self.cursor = gates, 0

    def forward(self, x):
        b, n = x.shape[:2]
        g = self.gates[self.cursor : self.cursor + b, :, :n]
        if g.shape[0] != b:
            raise RuntimeError("fixed gates: more sequences evaluated than gates given")
        self.cursor += b
        return torch.where(g, 1.0, -1.0).to(x.dtype)


class fixed_gates:
    """Within the block the AHA layers of ``model`` route by gates [L, S, Hq, N] (True = All) for the S sequences
    evaluated in order (e.g. by `evaluate`), whatever their routers say."""

    def __init__(self, model: nn.Module, gates: torch.Tensor):
        self.layers, self.gates = aha_layers(model), gates

    def __enter__(self):
        self.saved = [layer.router for layer in self.layers]
        for layer, g in zip(self.layers, self.gates):
            layer.router = _FixedRouter(g)
        return self

    def __exit__(self, *exc):
        for layer, router in zip(self.layers, self.saved):
            layer.router = router


def _per_head_gates(need_cal: torch.Tensor, k: int, shape) -> torch.Tensor:
    """The k heads of highest mean need [L, Hq, T] All everywhere, the others Here: gates of ``shape`` [L, S, Hq, N]."""
    mean = need_cal.mean(-1)  # (L, Hq)
    top = mean.flatten().argsort(descending=True)[:k]
    chosen = torch.zeros(mean.numel(), dtype=torch.bool)
    chosen[top] = True
    chosen = chosen.view_as(mean)
    return chosen[:, None, :, None].expand(shape).clone()


def _random_gates(per_head: torch.Tensor, shape, window: int, seed: int) -> torch.Tensor:
    """Each token All with its head's probability per_head [L, Hq], independently: gates [L, S, Hq, N]."""
    gen = torch.Generator().manual_seed(seed)
    gates = torch.rand(shape, generator=gen) < per_head[:, None, :, None]
    gates[..., :window] = True
    return gates


def _point(method: str, window: int, target: float | None, loss: float, gates: torch.Tensor, full: float, **extra):
    shares = gate_shares(gates, window)
    return {
        "method": method,
        "window": window,
        "target_share": target,
        "heldout_loss": loss,
        "delta_loss": loss - full,
        "all_share": shares["all_share_beyond_window"],
        "per_head": shares["per_head"],
        **extra,
    }


def _reproduction(out: Path, full_loss: float) -> dict | None:
    """The reproduction's fine-tuned runs and control from out/results.json, when it was made from these weights."""
    path = out / RESULTS_JSON
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if "full" not in saved or abs(saved["full"]["heldout_loss"] - full_loss) > 1e-4:
        return None
    runs = [
        {
            "window": r["window"],
            "lam": r["lam"],
            "kind": r["kind"],
            "heldout_loss": r["heldout_loss"],
            "all_share": r["gates"]["all_share_beyond_window"],
        }
        for r in saved["runs"]
    ]
    return {"full_loss": saved["full"]["heldout_loss"], "control_loss": saved["full_continued"]["heldout_loss"],
            "runs": runs}  # fmt: skip


def _units(cfg: StudyConfig) -> int:
    per_window = 3 + len(cfg.heads_all) * (2 * len(CALIBRATIONS) + 3)  # measures + the calibrations and evaluations
    fts = len(cfg.finetune_windows) * len(cfg.finetune_lams)
    return 2 + len(cfg.windows) * per_window + (fts + 1) * (cfg.experiment.finetune.steps + 1)


def study(cfg: StudyConfig, out: Path, *, progress: bool = True, command: str = "") -> dict:
    """Run the study; write out/calibration.json (after every window) and the plot, then the page section."""
    from aha.experiments.calibration_report import write_calibration

    exp = cfg.experiment
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(exp.threads)
    writer = ResultWriter(out / CALIBRATION_JSON)
    corpus = load_corpus(max_bytes=exp.corpus_max_bytes)
    ctx = exp.model.context
    eval_ids = heldout_windows(corpus.heldout, exp.eval_sequences, ctx + 1)  # the reproduction's windows
    cal_ids = heldout_windows(corpus.train, cfg.calibration_sequences, ctx, seed=CALIBRATION_SEED)
    inputs = eval_ids[:, :-1]
    path = out / PRETRAINED
    missing = not path.is_file()  # then pretrain as `reproduce` does (slow: the weights are kept for next time)
    bar = Progress(_units(cfg) + (exp.pretrain.steps if missing else 0), enabled=progress)
    result = {
        "schema": 1,
        "meta": {
            **run_meta(command),
            "config": cfg.to_dict(),
            "eval_bytes": int(eval_ids.shape[0] * ctx),
            "calibration_bytes": int(cal_ids.numel()),
            "seeds": {
                "calibration_windows": CALIBRATION_SEED,
                "random_routing": RANDOM_SEED,
                "heldout_windows": 1234,
                "finetune": exp.finetune.seed,
                "fit_subset": 0,
            },
        },  # fmt: skip
        "points": [],
        "finetuned": [],
    }

    try:
        bar.stage(f"pretrain (full attention; no {path})" if missing else "pretrained full-attention model")
        if not missing:
            full, log = load_pretrained(exp, path)
            result["meta"]["pretrained"] = {"path": str(path), "loaded": True}
        else:
            full, log = pretrain(exp, corpus, tick=bar.update)
            save_pretrained(full, exp, log, path)
            result["meta"]["pretrained"] = {"path": str(path), "loaded": False, "seconds": log["seconds"]}
        torch.set_num_threads(exp.threads)
        bar.update()
        set_window(full, ctx)
        full_loss = evaluate(full, eval_ids)[0]
        result["full_loss"] = full_loss
        result["reproduction"] = _reproduction(out, full_loss)
        bar.update()
        if result["reproduction"] is not None:
            result["control_loss"] = result["reproduction"]["control_loss"]
            bar.update(n=exp.finetune.steps + 1)
        elif cfg.finetune_lams and cfg.finetune_windows:  # the reproduction's control, run again
            bar.stage("fine-tune full attention (control)")
            control = copy.deepcopy(full)
            train(control, corpus.train, exp.finetune, tick=bar.update)
            result["control_loss"] = evaluate(control, eval_ids)[0]
            bar.update()
        writer.save(result)
        starts = {}  # window -> (share, calibrated model) to fine-tune
        for w in cfg.windows:
            bar.stage(f"window {w}: measure")
            cal_batches = cal_ids.split(8)
            need_cal = measure_need(full, cal_batches, window=w, keep_inputs=True)
            bar.update()
            need_eval = measure_need(full, inputs.split(8), window=w, mass=False)
            bar.update()
            here = copy.deepcopy(full)
            set_window(here, w)
            init_routers(here, -1.0)
            here_loss, here_gates = evaluate(here, eval_ids)
            result["points"].append(_point("here", w, 0.0, here_loss, here_gates, full_loss))
            bar.update()
            shape = need_eval.output.shape  # (L, S, Hq, N)
            for k, share in zip(cfg.heads_all, cfg.shares()):
                bar.stage(f"window {w}: share {share:.3f}")
                calibrated = {}
                for method, measure, sequential in CALIBRATIONS:
                    model = copy.deepcopy(full)
                    fit = calibrate_routers(model, cal_batches, window=w, share=share, measure=measure, need=need_cal,
                                            sequential=sequential)  # fmt: skip
                    bar.update()
                    loss, gates = evaluate(model, eval_ids)
                    point = _point(method, w, share, loss, gates, full_loss,
                                   calibration={key: fit[key] for key in ("threshold", "tokens")}
                                   | {"oracle_need_covered": fit["oracle"]["need_covered"],
                                      "router_need_covered": fit["router"]["need_covered"],
                                      "router_share": fit["router"]["all_share"],
                                      "agreement": fit["router"]["agreement"]})  # fmt: skip
                    result["points"].append(point)
                    calibrated[method] = (model, gates)
                    bar.update()
                per_head = _per_head_gates(need_cal.beyond("output"), k, shape)
                rnd = _random_gates(gates_per_head(calibrated["calibrated"][1], w), shape, w, RANDOM_SEED)
                oracle = need_gates(need_eval, share=share)
                for method, gates in (("per_head", per_head), ("random", rnd), ("oracle", oracle)):
                    model = copy.deepcopy(full)
                    set_window(model, w)
                    with fixed_gates(model, gates):
                        loss, seen = evaluate(model, eval_ids)
                    if not torch.equal(seen, gates):
                        raise RuntimeError(f"{method}: the model did not route by the gates given")
                    result["points"].append(_point(method, w, share, loss, gates, full_loss))
                    bar.update()
                if w in cfg.finetune_windows and k == cfg.finetune_heads_all:
                    starts[w] = (share, calibrated["calibrated"][0])
            writer.save(result)
        for w, (share, start) in starts.items():  # last: every point without training is saved by now
            for lam in cfg.finetune_lams:
                bar.stage(f"window {w}: fine-tune calibrated routers, lambda {lam:g}")
                model = copy.deepcopy(start)
                log = train(model, corpus.train, exp.finetune, lam=lam, tick=bar.update)
                loss, gates = evaluate(model, eval_ids)
                point = _point("calibrated_finetuned", w, share, loss, gates, full_loss, lam=lam,
                               train={"curve": log["curve"], "seconds": log["seconds"]})  # fmt: skip
                result["finetuned"].append(point)
                bar.update()
                writer.save(result)
    finally:
        bar.close()
    saved = writer.finish(result)
    write_calibration(saved, out)
    return saved


def gates_per_head(gates: torch.Tensor, window: int) -> torch.Tensor:
    """[L, Hq] share of All of gates [L, S, Hq, N] at positions >= window."""
    return gates[..., window:].float().mean((1, 3))
