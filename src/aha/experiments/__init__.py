"""Reproduce the paper's findings at small scale: how much global attention a language model needs, per window.

``python -m aha.experiments reproduce [--quick] [--out DIR]`` pretrains a byte-level
decoder on the Python standard library's source with full attention, fine-tunes it with
AHA routers at several windows (the paper's lambda), evaluates held-out loss, the share
of All per window, layer and head, and a passkey probe, and writes the JSON, the plots
and the results page. Needs torch and matplotlib (the ``experiments`` extra; tqdm, if
installed, draws the progress bar).
"""

from aha.experiments.pipeline import FULL, QUICK, ExperimentConfig, reproduce

__all__ = ["ExperimentConfig", "FULL", "QUICK", "reproduce"]
