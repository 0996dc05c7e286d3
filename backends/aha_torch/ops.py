"""The torch backend as one custom op, ``aha_torch::attention``, for torch.compile and torch.export.

Its eager code branches on tensor values (the all-All shortcut, finite checks, routed token
compaction), which would break a traced graph; the op hides it (see aha.torch_ops.opaque_attention).
"""

from __future__ import annotations

from aha.torch_ops import opaque_attention
from aha_torch.sdpa import attention as _eager

attention = opaque_attention("aha_torch", _eager)
