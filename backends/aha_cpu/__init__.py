"""The ``cpu`` backend: blocked All-or-Here attention on CPU tensors.

A Here token costs O(window) and an All token O(context); memory stays
O(N * D). See :mod:`aha_cpu.attention` for the paths, :mod:`aha_cpu.here` and
:mod:`aha_cpu.causal` for the two branches.
"""
