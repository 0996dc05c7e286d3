"""torch.compile sees one graph around aha.attention: no graph break, no warning (Dynamo once warned
about tracing the registry's lock), and a first call inside a compiled function, which loads the
plugins, breaks the graph there only, never turning the caller eager for good."""

from __future__ import annotations

import logging
import operator
import warnings

import pytest

torch = pytest.importorskip("torch")

import aha  # noqa: E402
from aha.registry import registry  # noqa: E402


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g).requires_grad_() for _ in range(3))
    return q, k, v, torch.rand(1, 4, 6, generator=g) > 0.5


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_one_graph_and_no_warning(backend):
    aha.backends()

    def step(q, k, v, gate):
        return aha.attention(q * 2, k, v, gate, window=3, backend=backend).sum()

    torch._dynamo.reset()
    logs = _Records()
    logging.getLogger("torch").addHandler(logs)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explained = torch._dynamo.explain(step)(*_inputs())
            torch._dynamo.reset()
            loss = torch.compile(step, fullgraph=True, backend="eager")(*_inputs())
            loss.backward()
    finally:
        logging.getLogger("torch").removeHandler(logs)
        torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    ours = [w for w in caught if not (issubclass(w.category, DeprecationWarning) and "aha" not in w.filename)]
    said = [str(w.message) for w in ours] + [r.getMessage() for r in logs.records]
    assert not said, said


def test_a_first_call_inside_compile_keeps_the_caller_compiled():
    """The plugins load at a graph break (eagerly): the caller's own ops stay compiled, on every later call.
    (Loading inside the trace used to fail there, and Dynamo then ran the whole caller eagerly, for good.)"""
    seen = []

    def count(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def step(q, k, v, gate):
        return aha.attention(q * 2, k, v, gate, window=3, backend="cpu") + 1

    q, k, v, gate = (x.detach() for x in _inputs())
    registry.reload()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, backend=count)
        for _ in range(2):
            torch.testing.assert_close(compiled(q, k, v, gate), step(q, k, v, gate))
    finally:
        torch._dynamo.reset()
    assert operator.mul in seen and operator.add in seen, seen
