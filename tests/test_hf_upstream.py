"""transformers' own model tests (ModelTesterMixin, TensorParallelTesterMixin, FSDPTesterMixin) on tiny AHA models.

The mixins come from the sdist of the installed transformers, downloaded by ``nox -s tests``
(hf_testers/upstream.py); without it these tests are skipped. The tester classes are ours
(hf_testers/testers.py). A test that cannot apply to AHA by design is skipped with its reason,
listed in hf_testers/skips.py and in docs/training.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import unittest

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_testers import testers, upstream  # noqa: E402
from hf_testers.skips import BY_DESIGN  # noqa: E402

if upstream.sdist_tests() is None:
    pytest.skip(upstream.MISSING, allow_module_level=True)
pytest.importorskip("parameterized", reason=upstream.MISSING)

PACKAGE = upstream.load()
common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
tensor_parallel = importlib.import_module(f"{PACKAGE}.test_tensor_parallel_mixin")
fsdp = importlib.import_module(f"{PACKAGE}.test_fsdp_mixin")
# upstream runs the distributed TP and FSDP tests for a few model types only; None runs them for ours
tensor_parallel.TP_DISTRIBUTED_TEST_MODEL_TYPES = None
fsdp.FSDP_DISTRIBUTED_TEST_MODEL_TYPES = None
# upstream counts one FSDP worker per CPU core; gloo ranks are processes, so a 2-core machine runs the 4-rank tests too
fsdp._get_available_fsdp_workers = lambda: max(4, os.cpu_count() or 1)

# The mixins tell a bare model from a causal LM by transformers' tables of its own models' class names
# (a bare model trains without labels, a causal LM gets labels); ours join them for these tests.
NAME_TABLES = {"MODEL_MAPPING_NAMES": "base_model_class", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "causal_lm_class"}


@pytest.fixture(autouse=True, scope="module")
def _our_models_in_the_name_tables():
    from unittest import mock

    from transformers.models.auto import modeling_auto

    with contextlib.ExitStack() as stack:
        for table, role in NAME_TABLES.items():
            names = {t.config_class.model_type: getattr(t, role).__name__ for t in testers.TESTERS}
            stack.enter_context(mock.patch.dict(getattr(modeling_auto, table), names))
        yield


class _AHAModelTest(
    common.ModelTesterMixin,
    common.GenerationTesterMixin,
    tensor_parallel.TensorParallelTesterMixin,
    fsdp.FSDPTesterMixin,
):
    model_tester_class: type
    model_tester = None  # FSDPTesterMixin declares it abstract; setUp sets it
    # upstream runs this test for models whose config file carries a copyright year >= 2023; ours has no such line
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.all_model_classes = self.model_tester.all_model_classes

    def _skip_if_not_supported(self):  # the tensor-parallel tests' gate
        if importlib.util.find_spec("accelerate") is None:
            self.skipTest(f"transformers loads tensor-parallel models with accelerate. {upstream.MISSING}")
        super()._skip_if_not_supported()


def _skip_by_design(cls):
    skips = {key.rpartition(".")[2]: f"AHA by design: {why}" for key, why in BY_DESIGN.items()
             if key.partition(".")[0] in (cls.__name__, key)}  # fmt: skip
    for name, reason in skips.items():
        assert hasattr(cls, name), f"{cls.__name__} has no test {name} to skip: the skip lists are stale"
        setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


@_skip_by_design
class FAOlmoModelTest(_AHAModelTest, unittest.TestCase):
    model_tester_class = testers.FAOlmoTester


@_skip_by_design
class AHALlamaModelTest(_AHAModelTest, unittest.TestCase):
    model_tester_class = testers.AHALlamaTester


@_skip_by_design
class AHAQwen2ModelTest(_AHAModelTest, unittest.TestCase):
    model_tester_class = testers.AHAQwen2Tester


# The control run: the same mixins and testers on transformers' plain Olmo2, Llama and Qwen2
# (AHA_HF_UPSTREAM_CONTROLS=1; not in CI). docs/training.md compares its skips and failures with the AHA models'.
if os.environ.get("AHA_HF_UPSTREAM_CONTROLS"):
    for _tester in testers._controls():
        _name = _tester.__name__.replace("Tester", "ModelTest")
        globals()[_name] = type(_name, (_AHAModelTest, unittest.TestCase), {"model_tester_class": _tester})
