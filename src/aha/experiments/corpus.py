"""The corpus: the Python standard library's own source files, split into train and held-out by file.

Every machine with Python has it, so the experiment needs no download. Source code
has real long-range dependencies (imports, names defined far above their use,
matching indentation), which is what the router has to find.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Corpus",
    "stdlib_root",
    "stdlib_files",
    "is_heldout",
    "load_corpus",
    "sample_batch",
    "heldout_windows",
    "PLANT",
    "PASSKEY_DIGITS",
    "plant_passkeys",
]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SEPARATOR = b"\n\n"  # between files in the byte stream
PLANT = b"# the passkey is "  # a passkey line: PLANT, the digits, a newline
PASSKEY_DIGITS = 5


def stdlib_root() -> Path:
    """The directory of the standard library's .py files (the one ``os`` comes from)."""
    return Path(os.path.dirname(os.__file__))


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file under ``root`` (the stdlib by default), sorted, installed packages left out."""
    root = stdlib_root() if root is None else Path(root)
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        found += [Path(d) / f for f in files if f.endswith(".py")]
    if not found:
        raise FileNotFoundError(f"root: no .py files under {root}")
    return sorted(found)


def is_heldout(relpath: str, heldout_per_mille: int) -> bool:
    """Deterministic split by file: the crc32 of the posix relative path decides, the same on every machine."""
    return zlib.crc32(relpath.encode()) % 1000 < heldout_per_mille


@dataclass
class Corpus:
    """Bytes of the train and held-out files, each a uint8 tensor of the files joined by SEPARATOR."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: int
    heldout_files: int
    root: str

    def describe(self) -> dict:
        return {
            "source": "Python standard library .py files",
            "root": self.root,
            "python": sys.version.split()[0],
            "train_files": self.train_files,
            "heldout_files": self.heldout_files,
            "train_bytes": int(self.train.numel()),
            "heldout_bytes": int(self.heldout.numel()),
        }


def load_corpus(root: Path | None = None, heldout_per_mille: int = 50, max_bytes: int | None = None) -> Corpus:
    """Read the files; ``max_bytes`` caps each split (files are taken in sorted order until it is reached)."""
    root = stdlib_root() if root is None else Path(root)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    size = {False: 0, True: 0}
    for path in stdlib_files(root):
        held = is_heldout(path.relative_to(root).as_posix(), heldout_per_mille)
        if max_bytes is not None and size[held] >= max_bytes:
            continue
        data = path.read_bytes()
        parts[held].append(data)
        size[held] += len(data) + len(SEPARATOR)
    if not parts[True] or not parts[False]:
        raise ValueError(f"heldout_per_mille={heldout_per_mille} leaves a split of {root} empty")

    def stream(chunks):
        return torch.frombuffer(bytearray(SEPARATOR.join(chunks)), dtype=torch.uint8)

    return Corpus(stream(parts[False]), stream(parts[True]), len(parts[False]), len(parts[True]), str(root))


def sample_batch(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` bytes -> int64 [batch, length]."""
    if data.numel() <= length:
        raise ValueError(f"data: {data.numel()} bytes cannot hold a window of {length}")
    start = torch.randint(0, data.numel() - length, (batch,), generator=generator)
    return data[start[:, None] + torch.arange(length)].long()  # (batch, length)


def heldout_windows(data: torch.Tensor, count: int, length: int, seed: int = 1234) -> torch.Tensor:
    """A fixed set of ``count`` held-out windows (the same for every model evaluated) -> [count, length]."""
    return sample_batch(data, count, length, torch.Generator().manual_seed(seed))


def _line_starts(seq: bytes, lo: int, hi: int) -> list[int]:
    """Positions in [lo, hi) just after a newline of seq."""
    return [i + 1 for i in range(max(lo - 1, 0), min(hi - 1, len(seq) - 1)) if seq[i] == 10]


def plant_passkeys(
    ids: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    repeats: int = 1,
    digits: int = PASSKEY_DIGITS,
) -> torch.Tensor:
    """Synthetic passkey sequences mixed into a training batch ids [B, N] (a new tensor; ids is kept).

    Each sequence, with probability ``fraction``, gets the line ``# the passkey is NNNNN``
    (fresh random digits) inserted at a line start in its first half and the same line
    inserted ``repeats`` times again at later line starts, at least 16 bytes after the
    first, so the distance to the first varies from a few bytes to most of the sequence;
    the sequence is then cut back to N bytes, every repeated line kept whole. The filler
    is the training data the batch came from, so held-out files never enter training.
    Sequences without line starts where needed are left as they were.
    """
    out = ids.clone()
    n = ids.shape[1]
    line_len = len(PLANT) + digits + 1
    chosen = torch.rand(ids.shape[0], generator=generator) < fraction
    for b in chosen.nonzero().flatten().tolist():
        seq = bytes(ids[b].to(torch.uint8).tolist())
        firsts = _line_starts(seq, 1, n // 2)
        if not firsts:
            continue
        p = firsts[int(torch.randint(len(firsts), (1,), generator=generator))]
        # every line inserted must fit whole: the last repeat starts by n - (repeats + 1) * line_len
        laters = _line_starts(seq, p + 16, n - (repeats + 1) * line_len + 1)
        if len(laters) < repeats:
            continue
        pick = torch.randperm(len(laters), generator=generator)[:repeats].sort().values.tolist()
        key = str(int(torch.randint(10 ** (digits - 1), 10**digits, (1,), generator=generator))).encode()
        line = PLANT + key + b"\n"
        cuts = [0, p, *(laters[i] for i in pick), n]
        seq = line.join(seq[a:z] for a, z in zip(cuts, cuts[1:]))[:n]
        out[b] = torch.tensor(list(seq), dtype=ids.dtype)
    return out
