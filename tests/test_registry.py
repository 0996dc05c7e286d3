"""Plugin loading through entry points, broken plugins, and backend selection."""

import sys
import textwrap

import pytest
import torch

import aha
from aha.registry import registry


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Install a fake distribution (dist-info + modules) on sys.path and reload the registry."""

    def _install(dist, entry_points, modules):
        info = tmp_path / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text("[aha]\n" + eps)
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.reload()

    yield _install
    for mod in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[mod]
    monkeypatch.undo()
    registry.reload()


BACKEND = """
import aha
from aha.registry import Capabilities

def forward(q, k, v, gate, *, window, scale=None):
    return q * 0 + {value}

@aha.hookimpl
def register_backends(register):
    register(aha.Backend(name={name!r}, forward=forward, priority={priority},
                         capabilities=Capabilities(dtypes={dtypes!r}, grad=False),
                         available=lambda: {reason!r}))
"""


def _backend(name, priority=100, dtypes=("float32",), reason=None, value=7.0):
    return BACKEND.format(name=name, priority=priority, dtypes=dtypes, reason=reason, value=value)


def _inputs(dtype=torch.float32):
    q = torch.randn(1, 2, 4, 8, dtype=dtype)
    return q, q.clone(), q.clone(), torch.zeros(1, 2, 4, dtype=dtype)


def test_broken_import_warns_names_distribution_and_lists_it(install):
    install("fake-broken", {"fakebroken": "fake_broken"}, {"fake_broken": "raise ImportError('no such thing')"})
    with pytest.warns(
        RuntimeWarning, match=r"'fakebroken' from distribution 'fake-broken' failed to load: ImportError: no such thing"
    ):
        rows = aha.backends()
    broken = [r for r in rows if r.status == "broken"]
    assert [(r.name, r.distribution, r.version) for r in broken] == [("fakebroken", "fake-broken", "1.2.3")]
    assert aha.attention(*_inputs(), window=2).shape == (1, 2, 4, 8)  # the built-ins still work


def test_strict_plugins_turns_a_broken_plugin_into_an_error(install, monkeypatch):
    monkeypatch.setenv("AHA_STRICT_PLUGINS", "1")
    install("fake-broken", {"fakebroken": "fake_broken"}, {"fake_broken": "1 / 0"})
    with pytest.raises(aha.PluginError, match="ZeroDivisionError"):
        aha.backends()


def test_load_plugins_selects_entry_points(install, monkeypatch):
    monkeypatch.setenv("AHA_LOAD_PLUGINS", "reference, fake-good")
    install("fake-good", {"fakegood": "fake_good"}, {"fake_good": _backend("good")})
    assert {r.name for r in aha.backends()} == {"reference", "good"}


def test_hook_that_raises_or_registers_junk_is_broken(install):
    raising = "import aha\n@aha.hookimpl\ndef register_backends(register):\n    raise RuntimeError('boom')\n"
    junk = "import aha\n@aha.hookimpl\ndef register_backends(register):\n    register('not a backend')\n"
    install("fake-bad", {"raising": "fake_raising", "junk": "fake_junk"}, {"fake_raising": raising, "fake_junk": junk})
    with pytest.warns(RuntimeWarning):
        rows = {r.name: r for r in aha.backends()}
    assert rows["raising"].status == "broken" and "boom" in rows["raising"].reason
    assert rows["junk"].status == "broken" and "not an aha.Backend" in rows["junk"].reason


def test_duplicate_backend_name_is_refused(install):
    install("fake-dup", {"dup": "fake_dup"}, {"fake_dup": _backend("torch")})
    with pytest.warns(RuntimeWarning, match="already registered"):
        rows = aha.backends()
    assert [r.distribution for r in rows if r.name == "torch"] == ["aha-attention"]


def test_selection_prefers_priority_and_respects_capabilities(install):
    install("fake-sel", {"fast": "fake_fast"}, {"fake_fast": _backend("fast", priority=1000, dtypes=("float32",))})
    assert aha.select(*_inputs(), window=2) == "fast"
    assert float(aha.attention(*_inputs(), window=2).flatten()[0]) == 7.0
    assert aha.select(*_inputs(torch.float64), window=2) == "torch"  # fast declares float32 only
    q, k, v, g = _inputs()
    q.requires_grad_(True)
    assert aha.select(q, k, v, g, window=2) == "cpu"  # fast declares no backward; cpu (priority 50) is next


def test_unavailable_backend_is_listed_with_its_reason_and_skipped(install):
    install(
        "fake-un",
        {"gpuonly": "fake_gpuonly"},
        {"fake_gpuonly": _backend("gpuonly", priority=1000, reason="needs a GPU")},
    )
    row = next(r for r in aha.backends() if r.name == "gpuonly")
    assert (row.status, row.reason) == ("unavailable", "needs a GPU")
    assert aha.select(*_inputs(), window=2) != "gpuonly"
    with pytest.raises(
        aha.BackendError, match=r"'gpuonly' cannot serve .*needs a GPU\. Backends that can: cpu, torch, reference"
    ):
        aha.attention(*_inputs(), window=2, backend="gpuonly")


def test_add_plugin_registers_an_object_directly():
    class Plugin:
        @aha.hookimpl
        def register_backends(self, register):
            register(aha.Backend(name="inline", forward=lambda q, k, v, gate, *, window, scale: q))

    try:
        registry.add_plugin(Plugin(), "inline")
        q, k, v, g = _inputs()
        assert aha.attention(q, k, v, g, window=2, backend="inline") is q
    finally:
        registry.reload()


def test_first_use_inside_torch_compile():
    """Loading plugins cannot be traced: fullgraph says what to do; without fullgraph it loads eagerly."""
    q, k, v, _ = _inputs()
    gate = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    step = lambda q, k, v, g: aha.attention(q, k, v, g, window=2, backend="cpu")  # noqa: E731
    registry.reload()
    with pytest.raises(Exception, match=r"call aha\.backends\(\) once before compiling"):
        torch.compile(step, fullgraph=True, backend="eager")(q, k, v, gate)
    torch._dynamo.reset()
    registry.reload()
    out = torch.compile(step, backend="eager")(q, k, v, gate)  # a graph break where the plugins load
    torch.testing.assert_close(out, aha.attention(q, k, v, gate, window=2, backend="reference"))
    torch._dynamo.reset()
