"""Command line: ``python -m aha backends | demo | conformance``."""

from __future__ import annotations

import argparse
import os
import sys


def cmd_backends(args) -> int:
    import aha

    rows = aha.backends()
    print(f"{'backend':<11} {'status':<12} {'prio':>4}  {'arrays':<12} {'devices':<10} {'dtypes':<34} {'grad':<5} {'Nq<Nk':<6} distribution")
    for r in rows:
        if r.backend is None:
            print(f"{r.name:<11} {'broken':<12} {'':>4}  {r.distribution} {r.version}: {r.reason}")
            continue
        c = r.backend.capabilities
        print(
            f"{r.name:<11} {r.status:<12} {r.backend.priority:>4}  {','.join(c.arrays):<12} {','.join(c.devices):<10} "
            f"{','.join(c.dtypes):<34} {'yes' if c.grad else 'no':<5} {'yes' if c.cross else 'no':<6} {r.distribution} {r.version}"
        )
        if r.reason:
            print(f"{'':<11} why: {r.reason}")
    return 0


def cmd_conformance(args, extra) -> int:
    try:
        import hypothesis  # noqa: F401
        import pytest  # noqa: F401
    except ImportError as exc:
        print(
            f"aha conformance needs hypothesis and pytest ({exc}); "
            "install the testing extra: pip install 'aha-attention[testing]'",
            file=sys.stderr,
        )
        return 2
    from aha.testing import run_conformance

    extra = list(extra)
    if args.max_len is not None:
        extra += ["--aha-max-len", str(args.max_len)]
    return run_conformance(args.backend or (), extra)


def cmd_demo(args) -> int:
    from aha.demo import run_demo

    return run_demo(n=args.n, window=args.window, all_share=args.all_share)


def _prog() -> str:
    """`aha` when run as the console script, `python -m aha` otherwise."""
    return "aha" if os.path.basename(sys.argv[0]) == "aha" else "python -m aha"


def main(argv=None) -> int:
    from aha import __version__

    parser = argparse.ArgumentParser(prog=_prog(), description="All-or-Here Attention")
    parser.add_argument("--version", action="version", version=f"aha-attention {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("backends", help="list the registered backends, their capabilities and status")
    demo = sub.add_parser("demo", help="route one input through every available backend and compare")
    demo.add_argument("--n", type=int, default=2048, help="sequence length (default 2048)")
    demo.add_argument("--window", type=int, default=128, help="Here window (default 128)")
    demo.add_argument("--all-share", type=float, default=0.1, help="target share of All decisions (default 0.1)")
    conf = sub.add_parser(
        "conformance",
        help="run the conformance suite (extra args go to pytest)",
        description="Run the conformance suite (aha.testing.conformance) with pytest.\n"
        "Every argument not listed below goes to pytest, e.g. -x, -k NAME, or --hypothesis-profile=NAME:\n"
        "  dev       10 examples a property, derandomized (the default)\n"
        "  ci        20 examples, derandomized\n"
        "  thorough  300 examples, derandomized\n"
        "  explore   100 examples drawn at random, with a printed seed (--hypothesis-seed=N replays it)\n"
        "Derandomized runs draw the same problems every time and keep no example database, so the\n"
        "same command replays a failure; each failure also prints a reproduce: line to run in Python.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conf.add_argument("--backend", action="append", help="backend to check (repeatable; default all)")
    conf.add_argument("--max-len", type=int, default=None, help="largest sequence length drawn")
    args, extra = parser.parse_known_args(argv)
    if args.cmd != "conformance" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "backends":
        return cmd_backends(args)
    if args.cmd == "demo":
        return cmd_demo(args)
    return cmd_conformance(args, extra)


if __name__ == "__main__":
    sys.exit(main())
