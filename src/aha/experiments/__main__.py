"""``python -m aha.experiments reproduce [--quick] [--out DIR]`` | ``pretrain`` | ``report [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path("docs/results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aha.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser(
        "reproduce", help="train, fine-tune, evaluate and write the results (under an hour on 2 cores)"
    )
    rep.add_argument("--quick", action="store_true", help="a tiny configuration that runs in well under a minute")
    rep.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON and plots go here, the page to OUT.md (default {DEFAULT_OUT})",
    )
    rep.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre = sub.add_parser(
        "pretrain", help="only the full-attention pretraining of `reproduce`, saved to OUT/pretrained.pt"
    )
    pre.add_argument("--quick", action="store_true", help="the tiny configuration")
    pre.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the weights go here (default {DEFAULT_OUT})")
    pre.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal = sub.add_parser(
        "calibrate",
        help="routers without fine-tuning against per-head, random and oracle routing (OUT/calibration.json); "
        "uses OUT/pretrained.pt",
    )
    cal.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    cal.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON, plot and page (default {DEFAULT_OUT})")
    cal.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    show = sub.add_parser("report", help="redraw the plots and the page from OUT/results.json")
    show.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from aha.experiments.pipeline import RESULTS_JSON

    if args.cmd == "report":
        from aha.experiments.report import write_report

        path = args.out / RESULTS_JSON
        if not path.is_file():
            parser.error(f"--out: {path} does not exist; run `python -m aha.experiments reproduce --out {args.out}`")
        print(write_report(json.loads(path.read_text()), args.out))
        return 0

    from dataclasses import replace

    from aha.experiments.pipeline import FULL, PRETRAINED, QUICK, pretrain, reproduce, save_pretrained

    cfg = QUICK if args.quick else FULL
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        cfg = replace(cfg, threads=args.threads)
    if args.cmd == "calibrate":
        from aha.experiments.calibrate import CALIBRATION_JSON, STUDY, STUDY_QUICK, study

        scfg = replace(STUDY_QUICK if args.quick else STUDY, experiment=cfg)
        result = study(scfg, args.out, progress=not args.no_progress, command=_command(args))
        print(_wrote(args.out, CALIBRATION_JSON, "the plot", result))
        return 0
    if args.cmd == "pretrain":
        from aha.experiments.corpus import load_corpus
        from aha.experiments.progress import Progress

        bar = Progress(cfg.pretrain.steps, enabled=not args.no_progress)
        bar.stage("pretrain (full attention)")
        try:
            model, log = pretrain(cfg, load_corpus(max_bytes=cfg.corpus_max_bytes), tick=bar.update)
        finally:
            bar.close()
        save_pretrained(model, cfg, log, args.out / PRETRAINED)
        print(f"wrote {args.out / PRETRAINED} in {log['seconds'] / 60:.1f} min")
        return 0
    result = reproduce(cfg, args.out, progress=not args.no_progress, command=_command(args))
    print(_wrote(args.out, RESULTS_JSON, "the plots", result))
    return 0


def _command(args) -> str:
    """The command line as the results state it."""
    command = f"python -m aha.experiments {args.cmd}" + (" --quick" if args.quick else "")
    return command + (f" --threads {args.threads}" if args.threads is not None else "")


def _wrote(out: Path, name: str, plots: str, result: dict) -> str:
    return f"wrote {out / name}, {plots} and {out.with_suffix('.md')} in {result['meta']['seconds'] / 60:.1f} min"


if __name__ == "__main__":
    sys.exit(main())
