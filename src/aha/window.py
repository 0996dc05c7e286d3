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

from dataclasses import dataclass

__all__ = [
    "position_offset",
    "query_position",
    "here_start",
    "key_range",
    "keys_read",
    "key_block_range",
    "num_blocks",
    "HereBands",
    "here_bands",
    "AllTiles",
    "all_tiles",
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


def keys_read(pos, gate, window: int):
    """How many keys a query at position ``pos`` reads, elementwise over arrays or tensors: All ``pos + 1``,
    Here ``min(pos + 1, window)``; a float gate weighs the two."""
    causal = pos + 1
    return gate * causal + (1 - gate) * causal.clip(max=window)


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


@dataclass(frozen=True)
class HereBands:
    """Tiling of the Here branch into query tiles and the band of keys each tile reads.

    Query tile ``t`` holds queries ``[t * block, (t + 1) * block)`` (the last one
    padded past ``nq``); its band is the ``span = halo + block`` keys starting at
    absolute position ``key_start + t * block``. ``halo`` is a whole number of
    tiles, so a band is key tiles ``t - halo // block .. t`` of a key sequence
    padded with ``pad_left`` keys before position 0 and ``pad_right`` after nk.
    Inside a band, query row ``r`` reads key column ``c`` iff
    ``0 <= r + halo - c < window`` (and the key exists: ``c >= edge(t)``).
    """

    block: int
    halo: int
    span: int
    tiles: int
    key_start: int  # absolute position of band 0's first key; < 0 reaches into padding
    pad_left: int
    pad_right: int

    def edge(self, t: int) -> int:
        """Columns of band ``t`` that lie before key 0 (padding, never read)."""
        return max(0, -(self.key_start + t * self.block))

    @property
    def edge_tiles(self) -> int:
        """Number of leading bands that reach into the left padding."""
        return min(self.tiles, num_blocks(self.pad_left, self.block))


def here_bands(nq: int, nk: int, window: int, block: int) -> HereBands:
    """Bands of keys that tiles of ``block`` Here queries read (bottom-right aligned)."""
    halo = num_blocks(max(window - 1, 0), block) * block
    tiles = num_blocks(nq, block)
    key_start = position_offset(nq, nk) - halo
    pad_left = max(0, -key_start)
    pad_right = tiles * block - nq  # key_start + halo + tiles * block - nk
    return HereBands(block, halo, halo + block, tiles, key_start, pad_left, pad_right)


@dataclass(frozen=True)
class AllTiles:
    """How rows of All tokens at ascending positions read their keys: shared key chunks and tiles.

    Tile t is rows ``[t * tile, (t + 1) * tile)``. The keys below its first row's position
    are cut into chunks at some tiles' first positions, at least ``min_chunk`` keys apart:
    chunk ``[a, b)`` is read whole by every row from the tile that starts at b on, so it
    is one unmasked pass over a suffix of the rows. Each tile then reads the rest of its
    keys, ``[c_t, hi_t)`` from its last chunk boundary to its last row's position + 1,
    with a mask (row r reads key j iff j <= pos[r]).

    chunks: (first row, a, b); tiles: (first row, end row, c_t, hi_t).
    """

    chunks: list[tuple[int, int, int]]
    tiles: list[tuple[int, int, int, int]]


def all_tiles(pos: list[int], tile: int, min_chunk: int = 1) -> AllTiles:
    """Plan for rows at positions ``pos`` (ascending) of All tokens: see `AllTiles`."""
    chunks, tiles, bound = [], [], 0
    for r0 in range(0, len(pos), tile):
        r1 = min(len(pos), r0 + tile)
        if pos[r0] - bound >= min_chunk:  # a new chunk [bound, pos[r0]) for the rows from r0 on
            chunks.append((r0, bound, pos[r0]))
            bound = pos[r0]
        tiles.append((r0, r1, bound, pos[r1 - 1] + 1))
    return AllTiles(chunks, tiles)
