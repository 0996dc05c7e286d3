"""Stands for upstream's tests/exporters/test_export.py, which the transformers sdist does not ship.

`ExportTesterMixin` is an empty base of ModelTesterMixin here; torch.export of the AHA models is
tested in tests/test_hf_export.py.
"""


class ExportTesterMixin:
    """Empty: the export tests live in tests/test_hf_export.py."""
