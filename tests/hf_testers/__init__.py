"""Our side of running transformers' own model tests on the AHA models (tests/test_hf_upstream.py).

transformers' test mixins come from the sdist of the installed transformers, which ``nox -s tests``
downloads at test time (never into this repo): `upstream.load` links the sdist's top-level test
files into a temporary package beside our shims for the modules the sdist lacks (upstream's
tests/generation/, tests/exporters/ and its distributed helpers). `testers` holds our tester
classes for the tiny AHA models.
"""
