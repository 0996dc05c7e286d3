"""The registry's plugin loading hidden from torch.compile; imported only while it traces (torch is there)."""

from __future__ import annotations

import torch

from aha.registry import LOAD_WHILE_TRACING, Registry

# A call inside a trace breaks the graph there and runs eagerly; with fullgraph=True, Dynamo's
# error quotes the reason. Tracing the loading instead would fail inside it, and Dynamo would
# then run the whole calling frame eagerly on every later call, not only the first.
eager_load = torch.compiler.disable(Registry._load, reason=LOAD_WHILE_TRACING)
