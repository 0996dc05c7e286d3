"""The whole experiment: pretrain with full attention, fine-tune with routers per window, evaluate, report.

``reproduce(FULL, out)`` writes ``out/results.json`` (every number), the plots in
``out/`` and the page ``out.md`` (e.g. docs/results/ and docs/results.md), all from the JSON.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aha.experiments.corpus import heldout_windows, load_corpus
from aha.experiments.model import ByteLM, ModelConfig, set_window
from aha.experiments.probe import PLANT, build_passkey, run_passkey
from aha.experiments.progress import Progress
from aha.experiments.report import SWEEP_LABELS
from aha.experiments.train import TrainConfig, evaluate, finetune, forced_gates, gate_shares, train
from aha.training import LAMBDA

__all__ = [
    "ExperimentConfig",
    "Sweep",
    "FULL",
    "QUICK",
    "reproduce",
    "pretrain",
    "save_pretrained",
    "load_pretrained",
    "RESULTS_JSON",
    "PRETRAINED",
]

RESULTS_JSON = "results.json"
PRETRAINED = "pretrained.pt"  # the pretrained full-attention weights, next to results.json
PROBES = ("passkey", "passkey_near")  # planted early (beyond every window), and near (between the windows)


@dataclass(frozen=True)
class Sweep:
    """Fine-tunes at each of ``windows`` with sparsity weight ``lam``; ``kind`` labels it on the page."""

    kind: str  # "paper" (the paper's lambda), "extra" (a larger lambda), "none" (lambda = 0, an ablation)
    lam: float
    windows: tuple[int, ...]


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig
    pretrain: TrainConfig
    finetune: TrainConfig
    sweeps: tuple[Sweep, ...]
    eval_sequences: int = 64
    passkey_sequences: int = 64
    passkey_near: tuple[int, int] | None = (80, 112)  # distances of the near passkey (between the windows)
    corpus_max_bytes: int | None = None
    threads: int = 2
    seed: int = 0

    def __post_init__(self):
        for sweep in self.sweeps:
            if sweep.kind not in SWEEP_LABELS:
                raise ValueError(f"sweeps: kind must be one of {', '.join(SWEEP_LABELS)}, got {sweep.kind!r}")
            if any(not 1 <= w < self.model.context for w in sweep.windows):
                raise ValueError(f"sweeps: windows {sweep.windows} must lie in [1, context={self.model.context})")

    @property
    def windows(self) -> list[int]:
        """Every window of any sweep, ascending."""
        return sorted({w for sweep in self.sweeps for w in sweep.windows})

    def to_dict(self) -> dict:
        return asdict(self)


def _sweeps(
    lam_extra: float, windows: tuple[int, ...], ablation: tuple[int, ...], extra: tuple[int, ...] | None = None
) -> tuple[Sweep, ...]:
    """The paper's lambda at every window, lambda = 0 at ``ablation``, then ``lam_extra`` at ``extra`` (every window)."""
    extra = windows if extra is None else extra
    return (Sweep("paper", LAMBDA, windows), Sweep("none", 0.0, ablation), Sweep("extra", lam_extra, extra))


# Sized for under an hour with one thread: `reproduce --threads 1` took 54.0 min wall, 50.6 min CPU
# (37.1 of them pretraining) on 2 shared cores at load average 0.5-1.0 (docs/results.md).
# Routers get 20x the fine-tuning lr: at 5e-4 they barely leave their start (bias +1), and their All share
# had levelled off by step 40 in the 120-step fine-tunes of commit addedee, so 60 steps suffice.
# Half the training sequences carry a passkey planted once and repeated 3 times (corpus.plant_passkeys):
# at 10% and 25% with one repeat (400 steps), and 25% and 50% with 3 repeats (500 steps), the full model
# still guessed the probe's digits; with 50% / 3 repeats it retrieved 0.13-0.28 of the digits after 1100
# pretraining steps and 0.87 (early) / 1.00 (near) after 1700: retrieval forms between the two.
PASSKEY = {"passkey_fraction": 0.5, "passkey_repeats": 3}
FULL = ExperimentConfig(
    model=ModelConfig(context=512, layers=4, width=128, heads=4),
    pretrain=TrainConfig(steps=1700, batch=16, lr=3e-3, warmup=50, **PASSKEY),
    finetune=TrainConfig(steps=60, batch=16, lr=5e-4, warmup=10, router_lr_scale=20.0, seed=1, **PASSKEY),
    sweeps=_sweeps(3e-2, (16, 32, 64, 128, 256), (16, 256), extra=(16, 64, 256)),
)

QUICK = ExperimentConfig(
    model=ModelConfig(context=64, layers=2, width=32, heads=2),
    pretrain=TrainConfig(steps=30, batch=8, lr=3e-3, warmup=5, passkey_fraction=0.25),
    finetune=TrainConfig(steps=12, batch=8, lr=3e-3, warmup=2, router_lr_scale=5.0, seed=1, passkey_fraction=0.25),
    sweeps=_sweeps(3e-2, (8, 16, 32), (16,)),
    eval_sequences=16,
    passkey_sequences=16,
    passkey_near=(20, 30),
    corpus_max_bytes=1_000_000,
)


def _backend_name(cfg: ModelConfig) -> str:
    import aha

    d = cfg.width // cfg.heads
    q = torch.zeros(1, cfg.heads, 2, d)
    return aha.select(q, q, q, torch.ones(1, cfg.heads, 2, dtype=torch.bool), window=1)


def _total_units(cfg: ExperimentConfig) -> int:
    runs = sum(len(sweep.windows) for sweep in cfg.sweeps)
    evals = 2 + len(cfg.windows) + 2 + 3 * runs  # model evaluations and probes, one unit each
    return cfg.pretrain.steps + (1 + runs) * cfg.finetune.steps + evals


def _assess(model, cfg: ExperimentConfig, data: dict, window: int, routed: bool, bar: Progress) -> dict:
    """Held-out loss, gate shares (routed models), Here-only loss, and the passkey probe."""
    loss, gates = evaluate(model, data["eval"])
    bar.update()
    out = {"heldout_loss": loss}
    if routed:
        out["gates"] = gate_shares(gates, window)
        with forced_gates(model, all_=False):
            out["here_only_loss"] = evaluate(model, data["eval"])[0]
        bar.update()
    for name in PROBES:
        if name in data:
            probe = run_passkey(model, data[name], window)
            if not routed:  # the window holds every key: AHAAttention ignores the (untrained) router
                probe = {k: v for k, v in probe.items() if "share" not in k and k != "per_position"}
            out[name] = probe
    bar.update()
    return out


def _rounded(x):
    """Floats to 6 significant digits, so the JSON stays readable and small."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def _load_average() -> float | None:
    """The 1-minute load average (other work on the machine slows the run), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class ResultWriter:
    """Writes a run's result JSON to ``path`` after every point, with the wall and CPU time since it was made
    and the load average so far; ``finish`` stamps the end and returns the result as saved (rounded)."""

    def __init__(self, path: Path):
        self.path = path
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def save(self, result: dict) -> None:
        meta = result["meta"]
        meta["load_average"]["end"] = _load_average()
        meta["seconds"] = time.perf_counter() - self.started
        meta["cpu_seconds"] = time.process_time() - self.cpu_started
        self.path.write_text(json.dumps(_rounded(result), indent=1))

    def finish(self, result: dict) -> dict:
        result["meta"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.save(result)
        return json.loads(self.path.read_text())


def run_meta(command: str) -> dict:
    """The command, when it started, and on what: Python, torch, machine, threads, CPUs, load average."""
    return {
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": {"start": _load_average()},
    }


def _meta(cfg: ExperimentConfig, corpus, data: dict, command: str) -> dict:
    """What ran, where, on what: everything the page states besides the measurements."""
    probes = {
        name: {
            "plant_at": data[name].plant_at,
            "distances": data[name].distances,
            "digits": data[name].digits,
            "plant_line_bytes": len(PLANT) + data[name].digits + 1,
            "query_positions": data[name].query_positions.tolist(),
        }
        for name in PROBES
        if name in data
    }
    return {
        **run_meta(command),
        "backend": _backend_name(cfg.model),
        "corpus": corpus.describe(),
        "config": {**cfg.to_dict(), "windows": cfg.windows},
        "eval_bytes": int(data["eval"].shape[0] * cfg.model.context),
        "probes": probes,
    }


def pretrain(cfg: ExperimentConfig, corpus, tick=None) -> tuple[ByteLM, dict]:
    """The full-attention model of ``reproduce``: seeded by ``cfg.seed``, trained with ``cfg.pretrain``.

    The model's initialisation is the only draw from the global generator (training samples
    with its own), so the same config gives the same weights here and in ``reproduce``.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    full = ByteLM(cfg.model)
    return full, train(full, corpus.train, cfg.pretrain, tick=tick)


def save_pretrained(model: ByteLM, cfg: ExperimentConfig, log: dict, path: Path) -> None:
    """The weights (fp32), the configs that made them and the training log, in one torch file."""
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    meta = {"model": cfg.model.to_dict(), "pretrain": cfg.pretrain.to_dict(), "seed": cfg.seed, "train": log}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"schema": 1, "meta": meta, "state_dict": state}, path)


def load_pretrained(cfg: ExperimentConfig, path: Path) -> tuple[ByteLM, dict]:
    """The model saved by ``save_pretrained`` and its training log; an error if it was made by another config."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved["meta"]
    want = {"model": cfg.model.to_dict(), "pretrain": cfg.pretrain.to_dict(), "seed": cfg.seed}
    got = {k: meta[k] for k in want}
    if json.loads(json.dumps(got)) != json.loads(json.dumps(want)):
        raise ValueError(
            f"path: {path} was pretrained with {got}, not with this experiment's {want}; "
            "pretrain again (`python -m aha.experiments pretrain`) or point at the right file"
        )
    model = ByteLM(cfg.model)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, meta["train"]


def reproduce(cfg: ExperimentConfig, out: Path, *, progress: bool = True, command: str = "") -> dict:
    """Run everything; write out/results.json after every stage, then the plots and out.md."""
    from aha.experiments.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    writer = ResultWriter(out / RESULTS_JSON)
    corpus = load_corpus(max_bytes=cfg.corpus_max_bytes)
    ctx = cfg.model.context
    data = {
        "eval": heldout_windows(corpus.heldout, cfg.eval_sequences, ctx + 1),
        "passkey": build_passkey(corpus.heldout, cfg.passkey_sequences, ctx),
    }
    if cfg.passkey_near is not None:
        data["passkey_near"] = build_passkey(
            corpus.heldout, cfg.passkey_sequences, ctx, seed=8, distance=cfg.passkey_near
        )
    result = {"schema": 1, "meta": _meta(cfg, corpus, data, command), "runs": []}

    bar = Progress(_total_units(cfg), enabled=progress)
    try:
        bar.stage("pretrain (full attention)")
        full, log = pretrain(cfg, corpus, tick=bar.update)
        save_pretrained(full, cfg, log, out / PRETRAINED)
        result["meta"]["parameters"] = sum(p.numel() for p in full.parameters())
        result["full"] = {"train": log}
        bar.stage("evaluate full attention")
        result["full"].update(_assess(full, cfg, data, ctx, routed=False, bar=bar))
        result["full"]["here_only_loss"] = {}
        for w in cfg.windows:  # the pretrained weights read through a sliding window only, no training
            with forced_gates(full, all_=False):
                set_window(full, w)
                result["full"]["here_only_loss"][str(w)] = evaluate(full, data["eval"])[0]
            bar.update()
        set_window(full, ctx)
        writer.save(result)

        bar.stage("fine-tune full attention (control)")
        control = copy.deepcopy(full)
        result["full_continued"] = {"train": train(control, corpus.train, cfg.finetune, tick=bar.update)}
        result["full_continued"].update(_assess(control, cfg, data, ctx, routed=False, bar=bar))
        writer.save(result)

        for sweep in cfg.sweeps:
            for w in sweep.windows:
                bar.stage(f"fine-tune AHA window {w} lambda {sweep.lam:g}")
                model, log = finetune(full, corpus.train, cfg.finetune, window=w, lam=sweep.lam, tick=bar.update)
                run = {"window": w, "lam": sweep.lam, "kind": sweep.kind, "train": log}
                run.update(_assess(model, cfg, data, w, routed=True, bar=bar))
                result["runs"].append(run)
                writer.save(result)
    finally:
        bar.close()
    saved = writer.finish(result)
    write_report(saved, out)  # from the JSON alone, as `python -m aha.experiments report` would
    return saved
