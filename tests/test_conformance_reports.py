"""What the conformance suite prints when it fails, read back from its output.

Backends of tests/planted_backends.py with planted bugs run through ``python -m aha conformance``
on the properties that catch them. Each failure must carry a ``reproduce:`` line, a call that reruns
the check that failed on the problem as it ran (shapes, dtype, window, gate kind and seed, ragged
arguments), and a section saying how to run it again; a missing gradient is named as such, and a
finiteness mismatch says which side holds the non-finite values and where. A run is reproducible
by default: derandomized, with no example database in the current directory.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aha.testing.conformance as conformance
from aha.registry import registry
from aha.testing.checks import assert_agree, assert_close
from aha.testing.strategies import edge_cases

TESTS = Path(__file__).resolve().parent

# backend: the properties run on it (all must fail it)
RUNS = {
    "planted_hard_soft": ("test_forward_edge_cases", "test_gradient_edge_cases"),
    "planted_here_short": ("test_forward_edge_cases",),
    "planted_gate_detached": ("test_gradient_edge_cases", "test_gradients_match_reference", "test_route_gradient_reaches_logits"),
    "planted_seqlens_grad": ("test_cache_seqlens_read_only_each_sequence_s_keys", "test_decode_steps_with_cache_seqlens"),
    "planted_top_left": ("test_prefill_then_decode_equals_one_full_pass",),
}


try:  # what makes Hypothesis load its ``ci`` profile by itself (private; the names are also below)
    from hypothesis._settings import _CI_VARS
except ImportError:
    _CI_VARS = {}
# ... and pytest print untruncated summaries
CI_VARIABLES = ("CI", "BUILD_NUMBER", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", *_CI_VARS)


def _env(**extra) -> dict:
    """This process's environment, less what marks a CI machine (so a run here is a run on a laptop), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CI_VARIABLES}
    return dict(env, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra)


def _run(cwd, *args, env=None) -> str:
    """A subprocess (``python -m aha ...`` or ``python -m pytest ...``) with the planted backends; stdout + stderr."""
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env or _env(), cwd=cwd, timeout=600)
    return res.stdout + res.stderr


def _conformance(cwd, backends, select, *extra) -> str:
    names = [arg for name in backends for arg in ("--backend", name)]
    return _run(cwd, "aha", "conformance", "-p", "planted_backends", *names, "--max-len", "64", "-q", "-k", select, *extra)


def _failures(output: str) -> dict[str, str]:
    """{"test_x[backend]": its failure report} from pytest's output (the short summary left out)."""
    output = re.split(r"^=+ short test summary info =+$", output, flags=re.M)[0]
    blocks = re.split(r"^_{3,} (test_\S+) _{3,}$", output, flags=re.M)
    return dict(zip(blocks[1::2], blocks[2::2]))


def _reproduce(report: str) -> list[str]:
    return re.findall(r"reproduce: (check_\w+\(.*\))$", report, flags=re.M)


def _message(report: str) -> str:
    """The first line of the report's AssertionError."""
    return re.search(r"^E\s+AssertionError: (.*)$", report, flags=re.M).group(1)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, str]:
    """One run of `RUNS` (about 10 s), under the derandomized ``planted`` profile: the failure reports."""
    select = " or ".join(f"({name} and ({' or '.join(props)}))" for name, props in RUNS.items())
    out = _conformance(tmp_path_factory.mktemp("reports"), RUNS, select, "--hypothesis-profile=planted")
    failures = _failures(out)
    expected = {f"{prop}[{name}]" for name, props in RUNS.items() for prop in props}
    assert set(failures) == expected, out[-3000:]
    return failures


@pytest.fixture(scope="module")
def planted():
    """The planted backends registered in this process, to replay ``reproduce:`` lines here."""
    import planted_backends

    registry.add_plugin(planted_backends.Plugin(), "planted", "planted-backends", "0")
    yield
    registry.reload()


def _replay(line: str) -> str:
    """Run a ``reproduce:`` call in the namespace of aha.testing.conformance; the first line of its AssertionError."""
    with pytest.raises(AssertionError) as e:
        eval(line, vars(conformance))
    return str(e.value).splitlines()[0]


def test_every_failure_says_how_to_replay_it(reports):
    for test, report in reports.items():
        prop, backend = test.rstrip("]").split("[")
        assert "aha conformance: how to replay this failure" in report, test
        assert f"python -m aha conformance --backend {backend} --max-len 64 -k {prop}" in report, report
        assert "from aha.testing.conformance import *" in report, test


@pytest.mark.parametrize("prop", ["test_forward_edge_cases", "test_gradient_edge_cases"])
def test_a_failing_edge_case_is_named(reports, planted, prop):
    """The pinned edge cases print the case that failed (before: only ``out (float32): relative error ...``)."""
    report = reports[f"{prop}[planted_hard_soft]"]
    (line,) = _reproduce(report)
    check = "check_forward" if prop == "test_forward_edge_cases" else "check_gradients"
    assert line.startswith(f"{check}(backend_under_test('planted_hard_soft'), Case(")
    case = eval(line[line.index("Case(") : line.rindex(")")], vars(conformance))
    caps = registry.get("planted_hard_soft").backend.capabilities
    assert case in edge_cases(caps) and case.gate == "soft"  # the one pinned case with a soft gate
    assert _replay(line) == _message(report)


@pytest.mark.parametrize(
    "test, arg",
    [
        ("test_cache_seqlens_read_only_each_sequence_s_keys[planted_seqlens_grad]", "cache_seqlens"),
        ("test_decode_steps_with_cache_seqlens[planted_seqlens_grad]", "cache_seqlens"),
        ("test_prefill_then_decode_equals_one_full_pass[planted_top_left]", "chunks"),
    ],
)
def test_a_drawn_case_is_reported_as_it_ran(reports, planted, test, arg):
    """Properties that change B and Nq after drawing print the case they ran, with its ragged arguments.

    (Before, the one ``reproduce:`` line held the case as drawn, before B and Nq were set.)
    The line, run here, fails with the same message.
    """
    report = reports[test]
    (line,) = _reproduce(report)
    case = eval(line[line.index("Case(") : line.index(")", line.index("Case(")) + 1], vars(conformance))
    values = eval(re.search(rf"{arg}=(\[[^\]]*\])", line).group(1))
    if arg == "cache_seqlens":
        assert len(values) == case.B >= 2 and all(case.Nq <= n <= case.Nk for n in values)
    else:
        assert case.Nq == case.Nk == sum(values)
    assert _replay(line) == _message(report)


def test_a_missing_gradient_is_named(reports):
    """A backend that gives the gate no gradient is told so, not torch's "appears to not have been used in the graph"."""
    for prop in RUNS["planted_gate_detached"]:
        report = reports[f"{prop}[planted_gate_detached]"]
        assert "the backend returned no gradient for gate" in report, report
        assert "not have been used in the graph" not in report


def test_a_finiteness_mismatch_names_the_side_and_the_place(reports, planted):
    """planted_here_short gives NaN where a Here token reads no key (window 1): the report says it is the backend's."""
    report = reports["test_forward_edge_cases[planted_here_short]"]
    assert re.search(r"\d+ non-finite in the backend where the reference is finite; first at index \(\d+, \d+, \d+, \d+\) \(nan\)", report), report
    (line,) = _reproduce(report)
    assert "window=1" in line and _replay(line) == _message(report)


def test_finiteness_messages_say_which_side_is_not_finite():
    got = torch.zeros(2, 3, dtype=torch.float64)
    got[1, 2] = float("inf")
    ref = np.zeros((2, 3))
    ref[0, 1] = np.nan
    with pytest.raises(AssertionError) as e:
        assert_close("out", got, ref, "float64")
    msg = str(e.value)
    assert "1 non-finite in the backend where the reference is finite; first at index (1, 2) (inf)" in msg
    assert "1 non-finite in the reference where the backend is finite; first at index (0, 1)" in msg
    with pytest.raises(AssertionError, match=r"non-finite in the run it is compared with where this run of the backend is finite; first at index \(0, 1\)"):
        assert_agree("out", torch.zeros(2, 3, dtype=torch.float64), torch.from_numpy(ref), "float64")


def _reproduce_lines(output: str) -> list[str]:
    lines = _reproduce(output)
    assert lines, output[-3000:]
    return lines


def test_a_run_without_a_profile_is_derandomized_and_keeps_no_database(tmp_path):
    """pytest with the aha plugin and no profile, then ``python -m aha conformance``: the same falsifying problem.

    Neither writes an example database (.hypothesis/examples) into the current directory, and the
    report says the run is derandomized and gives the command that replays it.
    """
    select = ("-k", "test_forward_matches_reference")
    by_pytest = _run(tmp_path, "pytest", "--pyargs", "aha.testing.conformance", "-p", "planted_backends", "-p", "no:cacheprovider",
                     "--aha-backend", "planted_top_left", "--aha-max-len", "64", "-q", *select)  # fmt: skip
    by_cli = _conformance(tmp_path, ["planted_top_left"], select[1])
    assert _reproduce_lines(by_pytest) == _reproduce_lines(by_cli)
    assert not (tmp_path / ".hypothesis" / "examples").exists()
    assert "Derandomized (Hypothesis profile 'dev')" in by_pytest
    assert "--backend planted_top_left --max-len 64 -k test_forward_matches_reference --hypothesis-profile=dev" in by_cli


def test_in_a_ci_environment_a_run_without_a_profile_is_the_ci_profile(tmp_path):
    """With CI set, Hypothesis itself loads its ``ci`` profile, which the plugin defines: still derandomized.

    The report names that profile in the command that replays the run, and that command (the
    conformance CLI with ``--hypothesis-profile=ci``, outside CI) finds the same falsifying problem.
    """
    select = ("-k", "test_forward_matches_reference")
    in_ci = _run(tmp_path, "pytest", "--pyargs", "aha.testing.conformance", "-p", "planted_backends", "-p", "no:cacheprovider",
                 "--aha-backend", "planted_top_left", "--aha-max-len", "64", "-q", *select, env=_env(CI="true"))  # fmt: skip
    replay = "--backend planted_top_left --max-len 64 -k test_forward_matches_reference --hypothesis-profile=ci"
    assert "Derandomized (Hypothesis profile 'ci')" in in_ci and replay in in_ci, in_ci[-3000:]
    assert "@reproduce_failure(" in in_ci  # the ci profile prints Hypothesis' blob
    by_cli = _conformance(tmp_path, ["planted_top_left"], select[1], "--hypothesis-profile=ci")
    assert _reproduce_lines(_failures(in_ci)["test_forward_matches_reference[planted_top_left]"]) == _reproduce_lines(by_cli)
    assert not (tmp_path / ".hypothesis" / "examples").exists()


def test_the_explore_profile_draws_at_random_from_a_printed_seed(tmp_path):
    """``--hypothesis-profile=explore``: a seed is printed and put in the replay command; rerun with it, the same failure."""
    first = _conformance(tmp_path, ["planted_top_left"], "test_forward_matches_reference", "--hypothesis-profile=explore")
    seed = re.search(r"this run's seed is (\d+)", first).group(1)
    assert f"--hypothesis-profile=explore --hypothesis-seed={seed}" in first
    again = _conformance(tmp_path, ["planted_top_left"], "test_forward_matches_reference", "--hypothesis-profile=explore",
                         f"--hypothesis-seed={seed}")  # fmt: skip
    assert "this run's seed" not in again
    assert _reproduce_lines(again) == _reproduce_lines(first)
    assert not (tmp_path / ".hypothesis" / "examples").exists()


def test_the_conformance_command_writes_nothing_into_the_current_directory(tmp_path):
    """Hypothesis' cache (``.hypothesis/constants``) goes to $XDG_CACHE_HOME/aha/hypothesis, not the cwd."""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    names = ["--backend", "planted_top_left", "--max-len", "64", "-q", "-k", "test_forward_matches_reference"]
    out = _run(cwd, "aha", "conformance", "-p", "planted_backends", *names, env=_env(XDG_CACHE_HOME=str(cache)))
    assert _reproduce_lines(out)  # it ran, and failed as planted
    assert list(cwd.iterdir()) == []
    assert (cache / "aha" / "hypothesis").is_dir()


def test_every_profile_is_documented():
    from aha.testing.pytest_plugin import PROFILES

    page = (TESTS.parent / "docs" / "writing-a-backend.md").read_text()
    helptext = _run(TESTS, "aha", "conformance", "--help")
    for name in PROFILES:
        assert f"| `{name}`" in page and f"  {name} " in helptext, name


def test_missing_gradients_are_named_for_q_k_v_too():
    """`_backend_grads` names each input the output has no autograd path to, unless its reference gradient is 0."""
    q, k, v, gate = (torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(4))
    refs = [np.ones((1, 1, 3, 2))] * 3 + [np.zeros((1, 1, 3, 2))]
    out = q.detach() * k * v.detach()  # only k is on the graph; the gate's reference gradient is 0
    with pytest.raises(AssertionError, match=r"no gradient for q, v \(.*the reference's dq, dv are nonzero\)"):
        conformance._backend_grads(out, [q, k, v, gate], torch.ones_like(out), refs)
    grads = conformance._backend_grads(q * k * v, [q, k, v, gate], torch.ones_like(out), refs)
    assert not grads[3].any() and grads[0].equal((k * v).detach())
    with pytest.raises(AssertionError, match="no gradient for q, k, v .*its output has no autograd graph at all"):
        conformance._backend_grads(out.detach(), [q, k, v, gate], torch.ones_like(out), refs)
