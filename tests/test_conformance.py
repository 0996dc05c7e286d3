"""The conformance suite of aha.testing, run for every registered backend.

Pick one backend with ``pytest tests/test_conformance.py --aha-backend torch``.
"""

from aha.testing.conformance import *  # noqa: F401,F403
