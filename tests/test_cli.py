"""python -m aha backends | demo | conformance, and a third-party plugin found through its entry point."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "aha", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_backends_table_lists_builtins():
    res = _run("backends")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["backend", "status"]
    names = {line.split()[0] for line in lines[1:] if line and not line.startswith(" ")}
    assert {"reference", "torch"} <= names


def test_demo_runs_every_backend_and_agrees():
    res = _run("demo", "--n", "256", "--window", "32")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all backends agree with the reference" in res.stdout
    assert "go All" in res.stdout


def test_unknown_command_arguments_are_refused():
    res = _run("backends", "--bogus")
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    """pip-install tests/example_plugin into a private target directory."""
    target = tmp_path_factory.mktemp("site")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(target),
        str(ROOT / "tests" / "example_plugin"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"installing the example plugin failed:\n{res.stdout}\n{res.stderr}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


def test_example_plugin_is_found_through_its_entry_point(example_plugin):
    res = _run("backends", env=example_plugin)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("example "))
    assert "available" in row and "aha-example-backend 0.1.0" in row


def test_conformance_checks_the_example_plugin(example_plugin):
    res = _run(
        "conformance", "--backend", "example", "--max-len", "48", "-q", "--hypothesis-profile", "ci", env=example_plugin
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    from aha.testing import conformance

    n_props = sum(name.startswith("test_") for name in vars(conformance))
    assert f"{n_props} passed" in res.stdout


def test_conformance_fails_a_wrong_backend(example_plugin, tmp_path):
    """The suite must catch a backend with an off-by-one window."""
    wrong = tmp_path / "aha_example"
    wrong.mkdir()
    src = (ROOT / "tests" / "example_plugin" / "src" / "aha_example" / "plugin.py").read_text()
    (wrong / "__init__.py").write_text("")
    (wrong / "plugin.py").write_text(src.replace("(j > pos - window)", "(j > pos - window - 1)"))
    env = dict(example_plugin, PYTHONPATH=os.pathsep.join([str(tmp_path), example_plugin["PYTHONPATH"]]))
    res = _run("conformance", "--backend", "example", "--max-len", "48", "-q", "--hypothesis-profile", "ci", env=env)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "failed" in res.stdout


def test_version_and_help_say_what_they_are():
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.startswith("aha-attention "), res.stdout + res.stderr
    res = _run("conformance", "--help")
    assert res.returncode == 0 and "goes to pytest" in res.stdout and "--hypothesis-profile" in res.stdout


def test_conformance_without_hypothesis_says_which_extra_to_install():
    code = "import sys; sys.modules['hypothesis'] = None; from aha.__main__ import main; sys.exit(main(['conformance']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pip install 'aha-attention[testing]'" in res.stderr and "Traceback" not in res.stderr


def test_convert_names_a_missing_checkpoint_and_runs_without_a_runpy_warning():
    pytest.importorskip("transformers")
    res = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "aha.hf.convert", "/nonexistent/ckpt", "/tmp/aha-out", "--window", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "src '/nonexistent/ckpt': no such checkpoint directory" in res.stderr
    assert "Traceback" not in res.stderr and "RuntimeWarning" not in res.stderr


def test_install_hints_name_the_distribution():
    for plugin in ("aha_torch", "aha_cpu", "aha_triton"):
        text = (ROOT / "backends" / plugin / "plugin.py").read_text()
        assert "'aha[" not in text and "aha-attention[" in text, plugin
