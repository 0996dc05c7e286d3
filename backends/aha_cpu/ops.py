"""The cpu backend as one custom op, ``aha_cpu::attention``, for torch.compile and torch.export.

Its eager code branches on tensor values (finite checks, routing, job lists), which would break
a traced graph; the op hides it (see aha.torch_ops.opaque_attention).
"""

from __future__ import annotations

from aha.torch_ops import opaque_attention
from aha_cpu.attention import attention as _eager

attention = opaque_attention("aha_cpu", _eager)
