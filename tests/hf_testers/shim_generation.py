"""Stands for upstream's tests/generation/test_utils.py, which the transformers sdist does not ship.

`GenerationTesterMixin` is a marker (ModelTesterMixin checks that a model able to generate has a
tester with it). The generation behaviours themselves (greedy, sampling, beam search, assisted
decoding, static cache, compiled generation, left padding) are tested in tests/test_hf_generation.py.
"""


class GenerationTesterMixin:
    """Marker: the generation tests live in tests/test_hf_generation.py."""
