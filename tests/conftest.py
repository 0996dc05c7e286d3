import os

# The Triton backend runs on the CPU through Triton's interpreter in CI.
os.environ.setdefault("TRITON_INTERPRET", "1")
