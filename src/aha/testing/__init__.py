"""Testing tools for AHA backends: strategies, checks and the conformance suite.

Third-party backend authors run the same suite as the built-in backends:

    python -m aha conformance --backend mybackend

or reuse the pieces: ``aha_cases`` and ``make_inputs`` draw problems (``edge_cases`` and
``long_cases`` pin some, ``scale_factors`` draws softmax scales),
``assert_close`` compares with the float64 reference under the documented
per-dtype tolerances.
"""

from aha.testing.strategies import Case, Inputs, aha_cases, edge_cases, long_cases, make_inputs, scale_factors

__all__ = ["Case", "Inputs", "aha_cases", "edge_cases", "long_cases", "make_inputs", "scale_factors", "run_conformance"]


def _chosen_profile(extra_args) -> str:
    """The Hypothesis profile ``extra_args`` (or HYPOTHESIS_PROFILE) choose; ``dev`` if none."""
    import os

    args = list(extra_args)
    for i, a in enumerate(args):
        if a.startswith("--hypothesis-profile="):
            return a.split("=", 1)[1]
        if a == "--hypothesis-profile" and i + 1 < len(args):
            return args[i + 1]
    return os.environ.get("HYPOTHESIS_PROFILE", "dev")


def run_conformance(backends=(), extra_args=()) -> int:
    """Run the conformance suite with pytest in a fresh interpreter; returns pytest's exit code.

    The Hypothesis profile is ``dev`` (derandomized) unless ``extra_args`` or HYPOTHESIS_PROFILE
    choose another. A profile of aha that draws at random (``explore``) gets a seed, printed first,
    unless ``--hypothesis-seed`` gives one: the same seed replays the run. Nothing is written into
    the current directory: Hypothesis' own cache (``.hypothesis/``, its constants cache; there is
    no example database) goes to `hypothesis_storage` unless HYPOTHESIS_STORAGE_DIRECTORY says where.
    """
    import os
    import random
    import subprocess
    import sys

    from hypothesis import settings

    import aha.testing.pytest_plugin as plugin

    extra_args = list(extra_args)
    args = [sys.executable, "-m", "pytest", "--pyargs", "aha.testing.conformance", "-p", "no:cacheprovider"]
    profile = _chosen_profile(extra_args)
    if not any(a.startswith("--hypothesis-profile") for a in extra_args):
        args.append(f"--hypothesis-profile={profile}")
    seeded = any(a.startswith("--hypothesis-seed") for a in extra_args)
    if profile in plugin.PROFILES and not settings.get_profile(profile).derandomize and not seeded:
        seed = random.randrange(2**32)
        print(f"aha conformance: profile {profile!r} draws at random; this run's seed is {seed} "
              f"(replay it with --hypothesis-seed={seed})", flush=True)  # fmt: skip
        args.append(f"--hypothesis-seed={seed}")
    for name in backends:
        args += ["--aha-backend", name]
    env = dict(os.environ)
    env.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(hypothesis_storage()))
    return subprocess.call(args + extra_args, env=env)


def hypothesis_storage():
    """Where ``python -m aha conformance`` keeps Hypothesis' cache: $XDG_CACHE_HOME/aha/hypothesis (~/.cache/...)."""
    import os
    from pathlib import Path

    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "aha" / "hypothesis"
