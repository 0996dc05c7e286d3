"""Backends, their capabilities, and the pluggy registry that loads them.

Plugins are found through the entry-point group ``aha`` and loaded one by one:
a plugin that fails to import or to register is reported (a warning naming the
distribution and the error) and listed as broken, never raised at ``import aha``.

Environment:
    AHA_LOAD_PLUGINS=a,b   load only these entry points (names or distributions)
    AHA_STRICT_PLUGINS=1   raise on a broken plugin instead of warning
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from aha import hookspecs
from aha.validation import FLOAT_DTYPES, Problem, is_compiling

__all__ = ["Backend", "Capabilities", "BackendInfo", "PluginError", "BackendError", "registry", "select_backend"]


LOAD_WHILE_TRACING = (
    "aha: the backends load on first use, and torch.compile cannot trace loading them; "
    "call aha.backends() once before compiling code that calls aha.attention"
)


class PluginError(RuntimeError):
    """A plugin failed to load (raised only with AHA_STRICT_PLUGINS=1)."""


class BackendError(ValueError):
    """No backend, or not the named one, can serve a call; the message says why."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve; ``backend=None`` skips a backend whose capabilities refuse a call.

    Attributes:
        arrays: array libraries it accepts: ``"torch"``, ``"numpy"``.
        devices: device types (``"cpu"``, ``"cuda"``, ...); ``("*",)`` means any torch device.
        dtypes: floating dtypes of q, k, v it accepts, by name (``"float32"``, ``"bfloat16"``, ...).
        grad: whether it is differentiable w.r.t. q, k, v and gate. A backend
            without ``grad`` is skipped when any input requires grad.
        cross: whether it serves ``Nq < Nk`` (decoding, chunked prefill against a KV cache).
        seqlens: whether it takes ``cache_seqlens``, per-sequence key lengths in a batch;
            ``forward`` then receives ``cache_seqlens=`` as a keyword.
        leftpad: whether it takes ``cache_leftpad``, padding slots at the start of each row
            (left-padded batches); ``forward`` then receives ``cache_leftpad=``.
        packed: whether it takes packed sequences (B = 1, ``cu_seqlens_q``, ``cu_seqlens_k``);
            ``forward`` then receives ``cu_seqlens_q=``, ``cu_seqlens_k=``, ``max_seqlen_q=`` and
            ``max_seqlen_k=`` (the longest sequences, or None while torch.compile traces).
        head_dims: inclusive range ``(lo, hi)`` of the head dim D it serves.
        deterministic: whether two identical calls give bitwise identical results.
            Informational: selection does not look at it.
    """

    arrays: tuple[str, ...] = ("torch",)
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    grad: bool = True  # differentiable w.r.t. q, k, v and gate
    cross: bool = True  # Nq < Nk (decode, chunked prefill)
    seqlens: bool = False  # per-sequence cache lengths (cache_seqlens)
    leftpad: bool = False  # padding slots at the start of each row (cache_leftpad)
    packed: bool = False  # packed sequences (cu_seqlens_q, cu_seqlens_k)
    head_dims: tuple[int, int] = (1, 1 << 16)  # inclusive range of D
    deterministic: bool = True

    def refuse(self, p: Problem) -> str | None:
        """Why this backend cannot serve ``p``, or None when it can.

        The sentence goes into the ``BackendError`` a user sees when they name
        this backend for a call it cannot serve.
        """
        if p.array not in self.arrays:
            return f"takes {'/'.join(self.arrays)} arrays, got {p.array}"
        if "*" not in self.devices and p.device not in self.devices:
            return f"runs on {'/'.join(self.devices)}, got device {p.device}"
        if p.dtype not in self.dtypes:
            return f"supports {'/'.join(self.dtypes)}, got {p.dtype}"
        if p.requires_grad and not self.grad:
            return "has no backward pass, but an input requires grad"
        if p.len_q < p.len_k and not self.cross:
            return f"needs Nq == Nk, got Nq={p.len_q} < Nk={p.len_k}"
        if p.seqlens and not self.seqlens:
            return "takes no cache_seqlens"
        if p.leftpad and not self.leftpad:
            return "takes no cache_leftpad (left-padded rows)"
        if p.packed and not self.packed:
            return "takes no packed sequences (cu_seqlens_q / cu_seqlens_k)"
        lo, hi = self.head_dims
        if not lo <= p.head_dim <= hi:
            return f"supports head dims {lo}..{hi}, got D={p.head_dim}"
        return None


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """An attention backend, as a plugin registers it from its ``register_backends`` hook.

    Attributes:
        name: what users pass as ``backend=``. Names are unique: a plugin that
            registers a taken name is reported broken. The built-ins load first.
        forward: ``forward(q, k, v, gate, *, window, scale) -> out``. Receives
            inputs that passed validation (shapes, dtypes, devices, ``window`` an
            int >= 1; ``scale`` may be None, meaning ``1/sqrt(D)``) and returns
            ``out`` [B, Hq, Nq, D] in q's dtype on q's device. A backend that
            declares ``seqlens`` also gets ``cache_seqlens=`` when the caller gave it; likewise
            ``cache_leftpad=`` (``leftpad``) and ``cu_seqlens_q=``, ``cu_seqlens_k=``,
            ``max_seqlen_q=``, ``max_seqlen_k=`` (``packed``). Never a keyword it did not declare,
            and never a call without queries (B, Hq or Nq is 0): ``aha.attention`` answers those
            itself, with an empty output, once it has chosen the backend.
        capabilities: what it can serve; see ``Capabilities``.
        priority: ``backend=None`` picks the highest-priority available backend
            whose capabilities accept the call.
        available: ``available() -> None`` when it can run here, or a sentence
            saying why not (e.g. a missing dependency or no GPU). Called once, when
            the registry loads; an exception counts as unavailable.
        description: one line for ``python -m aha backends`` and the docs.
    """

    name: str
    forward: Callable  # forward(q, k, v, gate, *, window, scale) -> out
    capabilities: Capabilities = field(default_factory=Capabilities)
    priority: int = 0  # backend=None picks the highest available that can serve
    available: Callable[[], str | None] = _always_available
    description: str = ""


@dataclass(frozen=True)
class BackendInfo:
    """One row of ``aha.backends()``: a backend, or a plugin that broke.

    Attributes:
        name: the backend's name (the entry point's name for a broken plugin).
        plugin: the entry point's name.
        distribution: the distribution that provides it (``aha-attention`` for the built-ins).
        version: that distribution's version.
        status: ``"available"``, ``"unavailable"`` or ``"broken"``.
        reason: why it is unavailable or broken; None when available.
        backend: the ``Backend``, or None for a broken plugin.
    """

    name: str
    plugin: str  # entry point name
    distribution: str
    version: str
    status: str  # "available", "unavailable" or "broken"
    reason: str | None
    backend: Backend | None


class Registry:
    """Loads plugins once, lazily, and answers which backend serves a call.

    The one instance is ``aha.registry.registry``. Plugins load on first use
    (``aha.backends()``, ``aha.attention``), not at ``import aha``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self._ready = False  # set once every plugin is loaded
        self.pm = pluggy.PluginManager("aha")
        self.pm.add_hookspecs(hookspecs)
        self._rows: dict[str, BackendInfo] = {}
        self._broken: list[BackendInfo] = []

    def reload(self) -> None:
        """Forget everything and load the plugins again (tests, notebooks)."""
        with self._lock:
            self.__init__()

    def add_plugin(self, plugin, name: str, distribution: str = "", version: str = "") -> None:
        """Register a plugin object directly, bypassing entry points (tests, notebooks)."""
        self._ensure_loaded()
        self._register_plugin(plugin, name, distribution, version)

    def _ensure_loaded(self) -> None:
        if self._ready:  # lock-free once loaded, so that torch.compile(fullgraph=True) can trace aha.attention
            return
        if is_compiling():  # loading imports plugins: torch.compile cannot trace that; a graph break runs it
            from aha._compile import eager_load

            eager_load(self)
            return
        self._load()

    def _load(self) -> None:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                for ep in _selected_entry_points():
                    self._load_entry_point(ep)
                self._ready = True

    def _load_entry_point(self, ep) -> None:
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break aha
            self._report_broken(ep.name, dist, version, exc)
            return
        self._register_plugin(plugin, ep.name, dist, version)

    def _register_plugin(self, plugin, name: str, dist: str, version: str) -> None:
        found: list[Backend] = []
        try:
            self.pm.register(plugin, name=name)
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            self.pm.subset_hook_caller("register_backends", others)(register=found.append)
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._report_broken(name, dist, version, exc)
            return
        for backend in found:
            if not isinstance(backend, Backend):
                self._report_broken(name, dist, version, TypeError(f"registered {backend!r}, not an aha.Backend"))
            elif backend.name in self._rows:
                self._report_broken(name, dist, version, ValueError(f"backend name {backend.name!r} is already registered by {self._rows[backend.name].distribution}"))
            else:
                self._rows[backend.name] = _describe(backend, name, dist, version)

    def _report_broken(self, name: str, dist: str, version: str, exc: Exception) -> None:
        msg = f"aha plugin {name!r} from distribution {dist!r} failed to load: {type(exc).__name__}: {exc}"
        if os.environ.get("AHA_STRICT_PLUGINS", "") not in ("", "0"):
            raise PluginError(msg) from exc
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        self._broken.append(BackendInfo(name, name, dist, version, "broken", f"{type(exc).__name__}: {exc}", None))

    def rows(self) -> list[BackendInfo]:
        """Every backend (sorted by priority) followed by the broken plugins."""
        self._ensure_loaded()
        ordered = sorted(self._rows.values(), key=lambda r: (-r.backend.priority, r.name))
        return ordered + list(self._broken)

    def get(self, name: str) -> BackendInfo | None:
        self._ensure_loaded()
        return self._rows.get(name)


def _describe(backend: Backend, plugin: str, dist: str, version: str) -> BackendInfo:
    try:
        reason = backend.available()
    except Exception as exc:
        reason = f"availability check failed: {type(exc).__name__}: {exc}"
    status = "available" if reason is None else "unavailable"
    return BackendInfo(backend.name, plugin, dist, version, status, reason, backend)


def _selected_entry_points():
    wanted = {w.strip() for w in os.environ.get("AHA_LOAD_PLUGINS", "").split(",") if w.strip()}
    def builtin_first(ep):  # a third-party plugin cannot take a built-in backend's name
        return (ep.dist is None or ep.dist.name != "aha-attention", ep.name)

    for ep in sorted(entry_points(group="aha"), key=builtin_first):
        dist = ep.dist.name if ep.dist else ""
        if not wanted or ep.name in wanted or dist in wanted:
            yield ep


registry = Registry()


def select_backend(problem: Problem, name: str | None) -> Backend:
    """The backend that serves ``problem``: ``name``'s, or the best available one.

    With ``name=None``: the first backend, in priority order, that is available
    and whose capabilities accept ``problem``; ``BackendError`` when there is none.
    With a name: that backend, or ``ValueError`` when no such backend is
    registered, or ``BackendError`` saying why it cannot serve ``problem`` and
    which backends can.
    """
    rows = [r for r in registry.rows() if r.backend is not None]
    fits = [r.name for r in rows if r.status == "available" and r.backend.capabilities.refuse(problem) is None]
    if name is None:
        if not fits:
            raise BackendError(f"no available aha backend can serve {_summary(problem)}; see `python -m aha backends`")
        return registry.get(fits[0]).backend
    if not isinstance(name, str):
        raise TypeError(f"backend must be a backend name (str) or None, got {type(name).__name__}")
    row = registry.get(name)
    if row is None:
        known = ", ".join(r.name for r in rows) or "none"
        raise ValueError(f"backend {name!r} is not registered; registered backends: {known}")
    why = row.reason if row.status != "available" else row.backend.capabilities.refuse(problem)
    if why is not None:
        raise BackendError(f"backend {name!r} cannot serve {_summary(problem)}: {why}. Backends that can: {', '.join(fits) or 'none'}")
    return row.backend


def _summary(p: Problem) -> str:
    grad = ", with grad" if p.requires_grad else ""
    return f"{p.array} {p.dtype} on {p.device} (B={p.batch}, Hq={p.heads_q}, Hkv={p.heads_kv}, Nq={p.len_q}, Nk={p.len_k}, D={p.head_dim}{grad})"
