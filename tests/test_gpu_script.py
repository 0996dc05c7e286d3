"""benchmarks/gpu.py, the triton backend's one offline command for a GPU node, checked without a GPU.

The dry run (``--dry-run``: the GPU plan on the CPU under TRITON_INTERPRET=1 at tiny sizes) runs here in an
isolated interpreter (``-I``: no PYTHONPATH, no user site) with pip unable to reach an index, as on an
air-gapped node; two failures are planted in it to see that each is recorded and the plan goes on.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="benchmarks/gpu.py runs the triton backend")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import gpu  # noqa: E402
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

# Run by the isolated interpreter: benchmarks/gpu.py's main() with two failures planted and every JSON write
# checked on disk. A float16 forward made wrong by 0.05 (the comparison with the reference must catch it),
# and an out-of-memory error in the first decode speed step (as CUDA would raise it).
DRIVER = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path

    root, out, log = map(Path, sys.argv[1:4])
    spec = importlib.util.spec_from_file_location("gpu", root / "benchmarks" / "gpu.py")
    gpu = sys.modules["gpu"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)

    aha_call, correctness, decode_speed, write = gpu._aha, gpu.correctness, gpu.decode_speed, gpu._write
    planted = {"wrong": False}

    def wrong_aha(q, *args, **kwargs):
        out = aha_call(q, *args, **kwargs)
        return out + 0.05 if planted["wrong"] else out

    def planted_correctness(s, dtype, mode, ragged=None):
        planted["wrong"] = (dtype, mode, ragged) == ("float16", "routed", None)
        try:
            return correctness(s, dtype, mode, ragged)
        finally:
            planted["wrong"] = False

    def planted_decode_speed(s, share, hq, hkv):
        if (hq, hkv) == s.heads[0] and share == 0.07:
            import torch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (planted)")
        return decode_speed(s, share, hq, hkv)

    writes = []

    def checked_write(path, result):
        write(path, result)
        on_disk = json.loads(Path(path).read_text())
        writes.append([len(result["points"]), on_disk["points"] == json.loads(json.dumps(result["points"], default=str))])
        log.write_text(json.dumps(writes))

    gpu._aha, gpu.correctness, gpu.decode_speed, gpu._write = wrong_aha, planted_correctness, planted_decode_speed, checked_write
    sys.exit(gpu.main(["--dry-run", "--out", str(out)]))
""")


def _offline_env() -> dict:
    """The environment of an air-gapped node: no PYTHONPATH (-I ignores it anyway), pip without an index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # --dry-run sets it itself
    return env


def test_dry_run_records_every_step_of_the_gpu_plan_offline(tmp_path):
    out, log = tmp_path / "dry.json", tmp_path / "writes.json"
    (tmp_path / "driver.py").write_text(DRIVER)
    run = subprocess.run([sys.executable, "-I", str(tmp_path / "driver.py"), str(ROOT), str(out), str(log)],
                         cwd=tmp_path, env=_offline_env(), capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # the planted failures, and nothing else

    # the same shape as the GPU run: the same steps (names differ by sizes only), the same fields
    dry, full = gpu.plan(gpu.DRY), gpu.plan(gpu.GPU)
    assert [(s.group, s.fn.__name__) for s in dry] == [(s.group, s.fn.__name__) for s in full]
    assert set(result) == {"environment", "config", "plan", "budget_s", "points", "goals"}
    assert set(result["config"]) == set(gpu.GPU.__dict__) and result["config"]["dry"] is True
    assert result["plan"] == [s.name for s in dry]
    assert [p["name"] for p in result["points"]] == result["plan"]  # every step recorded, in order
    env = result["environment"]
    assert env["dry_run"] and env["interpreter"]
    assert env["aha_triton_from"] == str(ROOT / "backends" / "aha_triton" / "__init__.py")  # this checkout's
    assert env["aha_from"] == str(ROOT / "src" / "aha" / "__init__.py")

    # the JSON was on disk after every step (and once before the first), each time with every step so far
    assert json.loads(log.read_text()) == [[i, True] for i in range(len(dry) + 1)]

    points = {p["name"]: p for p in result["points"]}
    wrong, oom = points["correct float16 routed"], next(p for p in result["points"] if p["group"] == "decode")
    assert wrong["status"] == "failed" and wrong["error"].startswith("float16 routed"), wrong
    assert wrong["out_err"] > wrong["out_allowed"] and "out error" in wrong["error"]
    assert oom["status"] == "failed" and oom["error"].startswith("OutOfMemoryError: CUDA out of memory"), oom
    assert "planted_decode_speed" in oom["traceback"]
    skipped = {p["name"] for p in result["points"] if p["status"] == "skipped"}
    assert skipped == {s.name for s in dry if s.fn is gpu.flex and "bwd" in s.name}  # no flex backward on a CPU
    ok = [p for p in result["points"] if p["status"] == "ok"]
    assert len(ok) == len(dry) - 2 - len(skipped), [p for p in result["points"] if p not in ok]
    for p in ok:  # correctness within the same-dtype-baseline rule; every speed step timed both methods
        for key in (k for k in p if k.endswith("_err")):
            assert p[key] <= p[key.replace("_err", "_allowed")], (p["name"], key)
        if p["group"] in ("speed", "decode"):
            assert p["aha_ms"] > 0 and p["dense_ms"] > 0, p
    assert {p["name"].split()[1] for p in ok if p["name"].startswith("correct ")} == {"bfloat16", "float16", "float32"}
    assert all(p["returncode"] == 0 for p in ok if p["group"] == "tests")  # pytest started offline, addopts ignored
    # every goal has its figures; a dry run judges none
    assert set(result["goals"]) == {"fwd_5x_dense_at_32k_7pct", "half_dense_tflops_useful_fwd",
                                    "all_within_1.25x_dense_fwd", "gate_grad_fwd_bwd_within_2.5x_dense",
                                    "decode_0.8_of_memory_bound"}
    assert all(goal["met"] is None for goal in result["goals"].values())
    assert "FAILED" in run.stdout and "not judged (dry run)" in run.stdout
    markdown = gpu.render(result)
    assert markdown.count("| failed |") == 2 and "not judged (dry run)" in markdown


def test_the_script_itself_runs_offline_with_only(tmp_path):
    """The command line as documented (python3 -I benchmarks/gpu.py --dry-run), one step selected by --only:
    it runs and passes, every other step is recorded as skipped with the reason."""
    out = tmp_path / "one.json"
    run = subprocess.run([sys.executable, "-I", str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--only",
                          "^correct float32 routed$", "--out", str(out)], cwd=tmp_path, env=_offline_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    assert [p["name"] for p in points] == [s.name for s in gpu.plan(gpu.DRY)]
    ran = [p for p in points if p["status"] != "skipped"]
    assert [(p["name"], p["status"]) for p in ran] == [("correct float32 routed", "ok")]
    assert ran[0]["out_err"] <= ran[0]["out_allowed"] and ran[0]["dq_err"] <= ran[0]["dq_allowed"]
    assert {p["reason"] for p in points if p not in ran} == {"not selected by --only '^correct float32 routed$'"}
    assert "correct float32 routed" in run.stdout and "1 ok, 0 failed" in run.stdout


def _step(name, fn, group="speed"):
    return gpu.Step(name, group, fn)


def test_budget_spent_records_the_rest_as_skipped(tmp_path, monkeypatch):
    """No step starts once --budget-s is spent; the rest are recorded as skipped."""
    now = [0.0]
    monkeypatch.setattr(gpu, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def step(i):
        now[0] += 10  # each step takes 10 s
        return {"i": i}

    steps = [_step(f"step {i}", lambda i=i: step(i)) for i in range(5)]
    gpu.run_plan(steps, gpu.DRY, {}, tmp_path / "r.json", budget_s=25)
    points = json.loads((tmp_path / "r.json").read_text())["points"]
    assert [(p["status"], p.get("i")) for p in points] == [("ok", 0), ("ok", 1), ("ok", 2), ("skipped", None),
                                                           ("skipped", None)]
    assert points[3]["reason"] == "budget of 25 s spent"


def test_flex_is_skipped_before_allocating_where_its_mask_does_not_fit(monkeypatch):
    """A 64k FlexAttention point: the eager block mask (dry run) would need 2 Hq N^2 bytes; with 8 GiB free it
    is recorded as skipped before any tensor is made. The compiled mask (GPU) needs block-level tensors only."""
    n, (hq, hkv) = 65536, gpu.DRY.heads[-1]
    eager, compiled = (gpu.flex_bytes(n, hq, hkv, 128, c, False) for c in (False, True))
    assert eager > 2 * hq * n * n and compiled < 2**30
    monkeypatch.setattr(gpu, "free_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(gpu, "_inputs", lambda *a, **k: pytest.fail("allocated inputs for a point that cannot fit"))
    with pytest.raises(gpu.Skip, match=r"does not fit at N=65536: needs about \d+\.\d GiB, 8\.0 GiB free"):
        gpu.flex(gpu.DRY, n, 0.07, hq, hkv, "fwd")
    # the GPU plan's 128k point fits an H200 (about 139 GiB) with a compiled mask
    assert gpu.flex_bytes(131072, 32, 8, 128, True, True) < 100 * 2**30


def test_flex_out_of_memory_is_recorded_as_skipped_and_the_plan_goes_on(tmp_path, monkeypatch):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(gpu, "_flex", oom)
    monkeypatch.setattr(gpu, "free_bytes", lambda device: None)
    steps = [gpu.Step("flex fwd N=65536", "flex", gpu.flex, (gpu.DRY, 65536, 0.07, 4, 2, "fwd")),
             _step("after", lambda: {"x": 2.0})]
    result = {}
    gpu.run_plan(steps, gpu.DRY, result, tmp_path / "r.json", budget_s=100)
    flex, after = json.loads((tmp_path / "r.json").read_text())["points"]
    assert flex["status"] == "skipped" and "ran out of memory at N=65536" in flex["reason"], flex
    assert after["status"] == "ok" and after["x"] == 2.0


def test_gpu_script_bootstrap_needs_no_install():
    """benchmarks/gpu.py makes this checkout's aha, its backends' entry points and the pytest plugin
    visible without installing: in an isolated interpreter (-I: no PYTHONPATH, no user site), the
    registry's triton backend and pytest's aha plugin both come from this checkout."""
    code = (
        "import sys, importlib.metadata as md; sys.path.insert(0, 'benchmarks'); import gpu; gpu.bootstrap();"
        "eps = {e.name: e for e in md.entry_points(group='aha')};"
        "print(eps['triton'].load().__file__); print(md.entry_points(group='pytest11')['aha'].load().__file__)"
    )
    run = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    plugin, pytest_plugin = run.stdout.split()
    assert plugin == str(ROOT / "backends" / "aha_triton" / "plugin.py")
    assert pytest_plugin == str(ROOT / "src" / "aha" / "testing" / "pytest_plugin.py")


def test_gpu_script_reads_the_entry_points_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    name, version, groups = gpu.pyproject_metadata(text)
    assert (name, version) == (project["name"], project["version"])
    assert groups == {**project["entry-points"], "console_scripts": project["scripts"]}


def test_nox_gpu_session_runs_the_script_and_installs_nothing():
    """`nox -s gpu` is the same command: no virtualenv (python=False), no install, benchmarks/gpu.py."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    session = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "gpu")
    (decorator,) = session.decorator_list
    assert any(k.arg == "python" and isinstance(k.value, ast.Constant) and k.value.value is False
               for k in decorator.keywords)
    calls = [c for c in ast.walk(session) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)]
    assert not [c for c in calls if c.func.attr in ("install", "conda_install", "run_install")]
    runs = [c for c in calls if c.func.attr == "run"]
    assert len(runs) == 1 and [a.value for a in runs[0].args[:2]] == ["python3", "benchmarks/gpu.py"]


def test_a_broken_cuda_context_does_not_stop_the_plan(tmp_path, monkeypatch):
    """After a CUDA error (an illegal address, say) even emptying the cache raises: each step still records
    its own error and the plan goes on to the end."""

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    steps = [_step(f"step {i}", broken) for i in range(3)]
    gpu.run_plan(steps, gpu.DRY, {}, tmp_path / "r.json", budget_s=100)
    points = json.loads((tmp_path / "r.json").read_text())["points"]
    assert [p["status"] for p in points] == ["failed"] * 3
    assert all(p["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered" for p in points)


def test_an_interpreter_that_cannot_run_the_kernels_is_named_before_the_dry_run(monkeypatch):
    """Triton 3.6.0's interpreter with numpy 2.4 fails every kernel that loops over key blocks (int() of a
    1-element array): the dry run stops at once and says why, instead of recording every step as failed."""
    assert gpu.interpreter_problem() is None  # this machine's interpreter runs them

    def old_interpreter(*args, **kwargs):
        try:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        except TypeError as exc:
            raise RuntimeError("InterpreterError(TypeError(...))") from exc

    monkeypatch.setattr(gpu, "_aha", old_interpreter)
    problem = gpu.interpreter_problem()
    assert f"numpy {__import__('numpy').__version__}: TypeError: only 0-dimensional arrays" in problem
    assert "use numpy < 2.4 with this Triton, or Triton 3.9" in problem


def test_a_tile_sweep_where_no_tile_launches_is_a_failure(monkeypatch):
    def no_launch(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(gpu, "_aha", no_launch)
    with pytest.raises(gpu.Wrong, match="no fwd tile of the autotune set launched") as failed:
        gpu.tile_sweep(gpu.DRY, "fwd")
    assert all(ms.startswith("RuntimeError: out of resource") for ms in failed.value.figures["ms"].values())
