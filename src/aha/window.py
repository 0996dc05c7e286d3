"""Shared index math of AHA: query positions, window bounds and block ranges.

Every backend needs the same integers: where query ``i`` sits among the keys
(bottom-right alignment), which keys its All and Here branches read, and which
key tiles a tile of queries must visit. They live here once, free of any array
library, so that the reference, the torch, cpu and triton backends agree by
construction.

Conventions (see docs/spec.md):

    pos(i)  = Nk - Nq + i                   bottom-right alignment
    All:    keys j with 0 <= j <= pos(i)
    Here:   keys j with pos(i) - window < j <= pos(i)     (`window` keys)
"""

from __future__ import annotations

__all__ = [
    "position_offset",
    "query_position",
    "here_start",
    "key_range",
    "key_block_range",
    "num_blocks",
]


def position_offset(nq: int, nk: int) -> int:
    """Absolute position of query 0: queries are aligned bottom-right."""
    return nk - nq


def query_position(i: int, nq: int, nk: int) -> int:
    """Absolute position of query ``i`` among ``nk`` keys."""
    return nk - nq + i


def here_start(pos: int, window: int) -> int:
    """First key a Here token at ``pos`` reads (inclusive)."""
    return max(0, pos - window + 1)


def key_range(pos: int, window: int, is_all: bool) -> tuple[int, int]:
    """Half-open key range ``[lo, hi)`` read by the token at ``pos``."""
    lo = 0 if is_all else here_start(pos, window)
    return lo, pos + 1


def num_blocks(n: int, block: int) -> int:
    """Number of tiles of size ``block`` that cover ``n`` items."""
    return -(-n // block)


def key_block_range(
    q_lo: int, q_hi: int, nq: int, nk: int, window: int, block_n: int, is_all: bool
) -> tuple[int, int]:
    """Half-open range of key tiles that queries ``[q_lo, q_hi)`` must visit.

    A tile of All queries visits every key tile up to its last query's position;
    a tile of Here queries visits only the tiles that meet the union of its
    windows: about ``window / block_n + 1`` of them.
    """
    first_pos = query_position(q_lo, nq, nk)
    last_pos = query_position(q_hi - 1, nq, nk)
    lo, _ = key_range(first_pos, window, is_all)
    _, hi = key_range(last_pos, window, is_all)
    return lo // block_n, num_blocks(hi, block_n)
