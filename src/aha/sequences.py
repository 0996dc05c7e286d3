"""Ragged batches: which queries and keys each sequence owns.

A call describes its sequences in one of two ways (flash-attn's names, see docs/spec.md):

* **packed** (``cu_seqlens_q``, ``cu_seqlens_k``; B = 1): sequence s owns queries
  ``[cu_seqlens_q[s], cu_seqlens_q[s + 1])`` and keys ``[cu_seqlens_k[s], cu_seqlens_k[s + 1])``
  of the packed axis;
* **per row** (``cache_seqlens``, ``cache_leftpad``): row b owns keys
  ``[cache_leftpad[b], cache_seqlens[b])`` (0 and Nk by default) and its Nq queries sit at
  ``cache_seqlens[b] - Nq + i``; a query whose position falls before ``cache_leftpad[b]``
  belongs to no sequence (a padding query).

Both reduce to a list of `Segment`: a slice of queries and a slice of keys of one batch row,
the queries bottom-right aligned to the keys, exactly a plain AHA problem. A query in no segment
reads no key: its output is 0 and it gets no gradient. Within a segment every rule of
`aha.window` holds with positions counted from the segment's first key, so All reads the keys of
its own sequence up to its position and Here the last ``window`` of them; no key of another
sequence, and no padding key, is ever read.

The functions here take plain Python ints (``.tolist()`` of the caller's tensors); free of any
array library, like `aha.window`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Segment", "packed_segments", "row_segments", "segments", "longest"]


@dataclass(frozen=True)
class Segment:
    """Queries ``[q_lo, q_hi)`` and keys ``[k_lo, k_hi)`` of batch row ``batch``: one sequence.

    ``q_hi - q_lo <= k_hi - k_lo``; query ``q_lo + i`` sits at key position ``k_hi - (q_hi - q_lo) + i``.
    """

    batch: int
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int

    @property
    def len_q(self) -> int:
        return self.q_hi - self.q_lo

    @property
    def len_k(self) -> int:
        return self.k_hi - self.k_lo


def packed_segments(cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int]) -> list[Segment]:
    """The sequences of a packed batch (B = 1) that own at least one query."""
    return [
        Segment(0, q0, q1, k0, k1)
        for q0, q1, k0, k1 in zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])
        if q1 > q0
    ]


def row_segments(
    batch: int, len_q: int, len_k: int, cache_seqlens: Sequence[int] | None, cache_leftpad: Sequence[int] | None
) -> list[Segment]:
    """One segment per row that holds a real query: keys ``[leftpad[b], seqlens[b])``, its last queries.

    Row b's queries sit at ``seqlens[b] - Nq + i``; those before ``leftpad[b]`` are padding queries,
    outside every segment.
    """
    out = []
    for b in range(batch):
        end = len_k if cache_seqlens is None else int(cache_seqlens[b])
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        real = min(len_q, end - start)  # the queries at positions >= start
        if real > 0:
            out.append(Segment(b, len_q - real, len_q, start, end))
    return out


def segments(
    batch: int,
    len_q: int,
    len_k: int,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    cache_seqlens=None,
    cache_leftpad=None,
) -> list[Segment]:
    """Every sequence of a call, from whichever of the ragged arguments it has (lists of ints).

    Without any, each batch row is one sequence of ``len_k`` keys and ``len_q`` queries.
    """
    if cu_seqlens_q is not None:
        return packed_segments(_ints(cu_seqlens_q), _ints(cu_seqlens_k))
    lens = None if cache_seqlens is None else _ints(cache_seqlens)
    pads = None if cache_leftpad is None else _ints(cache_leftpad)
    return row_segments(batch, len_q, len_k, lens, pads)


def longest(cu_seqlens: Sequence[int]) -> int:
    """The longest sequence of a ``cu_seqlens`` (0 for none)."""
    c = _ints(cu_seqlens)
    return max((b - a for a, b in zip(c[:-1], c[1:])), default=0)


def _ints(x) -> list[int]:
    return [int(i) for i in (x.tolist() if hasattr(x, "tolist") else x)]
