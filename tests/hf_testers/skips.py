"""Which of transformers' own model tests tests/test_hf_upstream.py skips on the AHA models, and why.

docs/training.md lists the same reasons (tests/test_hf.py checks that it does).
"""

# "Class.test" or "test" (every class) -> why it cannot apply to an AHA model; docs/training.md lists them
BY_DESIGN = {
    "AHAQwen2ModelTest.test_sliding_window_mask": (
        "Qwen2's sliding-window layers (config.use_sliding_window) are refused: AHA's Here is the window, "
        "chosen per token and head by the router"
    ),
}
