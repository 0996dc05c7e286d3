"""aha: All-or-Here Attention.

Each attention head routes every token either to All (full causal attention)
or Here (a sliding window of ``window`` keys). See docs/spec.md.
"""

from aha.api import attention, backends, route, select, sparsity_loss
from aha.hookspecs import hookimpl
from aha.registry import Backend, BackendError, BackendInfo, Capabilities, PluginError

__version__ = "0.1.0"

__all__ = [
    "attention",
    "route",
    "sparsity_loss",
    "backends",
    "select",
    "hookimpl",
    "Backend",
    "BackendInfo",
    "BackendError",
    "Capabilities",
    "PluginError",
]
