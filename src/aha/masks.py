"""Padding masks, packed position ids and cu_seqlens -> the sequences of one attention call.

Models learn the layout of a batch in the forms transformers uses:

* a 2-D ``attention_mask`` [B, past + current] of 1 (a real token) and 0 (padding). Left padding
  (what ``generate()`` makes), right padding, or both; never a 0 between 1s;
* ``position_ids`` [B or 1, N] that restart for each sequence packed in a row
  (``DataCollatorWithFlattening``): a sequence starts wherever a position id is not one more than
  the one before it, the rule of transformers' default (SDPA) masks;
* flash-attn's ``cu_seqlens_q`` / ``cu_seqlens_k`` over the flattened ``B * N`` tokens (transformers
  passes them as ``cu_seq_lens_q`` / ``cu_seq_lens_k``).

`sequences` turns any of them into a `Sequences`, whose ``attention`` calls ``aha.attention`` with
``cache_leftpad`` when every row ends at the last key (left padding: queries and keys stay where
they are), and otherwise packs the real tokens of q, k, v and the gate along one axis, calls it with
``cu_seqlens_q`` / ``cu_seqlens_k``, and scatters the outputs back. A padding query (a query at a 0
of the mask) reads nothing: its output is 0 and it gets no gradient. Each sequence is computed
exactly as if it were alone: All reads its own keys up to its position, Here its own last
``window`` keys.

Build a `Sequences` once per forward pass and hand it to every layer (`aha.hf` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import aha

__all__ = ["Sequences", "sequences", "from_attention_mask", "from_position_ids", "from_cu_seqlens"]


@dataclass(frozen=True, eq=False)
class Sequences:
    """The sequences of one self-attention call over ``len_q`` new tokens and ``len_k`` keys per row.

    Exactly one of two forms:

    * ``cache_leftpad`` [B] (int32): row b's first ``cache_leftpad[b]`` keys are padding; every row
      ends at key ``len_k``.
    * packed: ``cu_seqlens_q`` / ``cu_seqlens_k`` [S + 1] (int32) over the real queries and keys taken,
      in order, from the flattened ``[B * len_q]`` queries and ``[B * len_k]`` keys at ``q_index`` /
      ``k_index`` (None: all of them); ``max_seqlen_q`` / ``max_seqlen_k`` the longest sequences.

    ``positions`` [B, len_q]: each query's position within its own sequence (RoPE for callers that
    have no position ids; padding queries get 0).
    """

    batch: int
    len_q: int
    len_k: int
    positions: torch.Tensor
    cache_leftpad: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    def check(self, batch: int, len_q: int, len_k: int) -> None:
        """Raise unless these sequences describe a call of ``batch`` rows, ``len_q`` queries and ``len_k`` keys."""
        if (batch, len_q, len_k) != (self.batch, self.len_q, self.len_k):
            raise ValueError(
                f"sequences: these Sequences describe {self.batch} rows of {self.len_q} queries and {self.len_k} "
                f"keys, the call has {batch} rows of {len_q} queries and {len_k} keys; build them for this call"
            )

    def attention(self, q, k, v, gate, *, window: int, scale=None, backend=None) -> torch.Tensor:
        """``aha.attention`` of q [B, Hq, len_q, D], k, v [B, Hkv, len_k, D], gate [B, Hq, len_q] over these
        sequences: [B, Hq, len_q, D], 0 at padding queries."""
        b, nq = q.shape[0], q.shape[2]
        self.check(b, nq, k.shape[2])
        if not self.packed:
            return aha.attention(
                q, k, v, gate, window=window, scale=scale, cache_leftpad=self.cache_leftpad, backend=backend
            )
        out = aha.attention(
            _pack(q, self.q_index),
            _pack(k, self.k_index),
            _pack(v, self.k_index),
            _pack(gate, self.q_index),
            window=window,
            scale=scale,
            cu_seqlens_q=self.cu_seqlens_q,
            cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
            backend=backend,
        )  # (1, Hq, total_q, D)
        return _unpack(out, self.q_index, b, nq)


def _pack(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x [B, H, N, ...] -> [1, H, total, ...]: the tokens at ``index`` of the flattened B * N (all if None)."""
    b, h, n = x.shape[:3]
    flat = x.transpose(0, 1).reshape(h, b * n, *x.shape[3:])  # (H, B*N, ...): a view when B == 1
    return (flat if index is None else flat.index_select(1, index)).unsqueeze(0)


def _unpack(out: torch.Tensor, index: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
    """out [1, H, total, D] -> [B, H, N, D], zeros where no packed token lands."""
    h, d = out.shape[1], out.shape[3]
    flat = out[0] if index is None else out.new_zeros(h, b * n, d).index_copy(1, index, out[0])  # (H, B*N, D)
    return flat.view(h, b, n, d).transpose(0, 1)


def _cu(counts: torch.Tensor) -> torch.Tensor:
    """[S] lengths -> [S + 1] int32 offsets from 0."""
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def _check_mask(mask) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError(
            "attention_mask: AHA attention takes a 2-D [batch, past + current tokens] mask of 1 (token) and 0 "
            f"(padding), or None; got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}. "
            "4-D (custom) masks are not supported yet: describe padding with a 2-D mask and packed "
            "sequences with position_ids or cu_seqlens (generate() builds a 4-D mask itself for a static "
            "cache, which AHA layers do not take: use the default DynamicCache)"
        )


def from_attention_mask(mask: torch.Tensor, len_q: int) -> Sequences | None:
    """The sequences of a 2-D padding mask [B, len_k] over past and current tokens; None if it has no 0.

    Row b's real keys are its 1s, which must be contiguous; its queries are the last ``len_q``
    positions, those at a 0 are padding queries.
    """
    _check_mask(mask)
    keep = mask != 0  # (B, Nk)
    b, nk = keep.shape
    if nk < len_q:
        raise ValueError(
            f"attention_mask covers {nk} tokens, fewer than the {len_q} new ones; it must cover past + current tokens"
        )
    if bool(keep.all()):
        return None
    count = keep.sum(1)  # (B,) real tokens per row
    first = torch.where(count > 0, keep.int().argmax(1), nk)  # (B,) the row's first real token
    cols = torch.arange(nk, device=keep.device)
    inside = (cols >= first[:, None]) & (cols < (first + count)[:, None])  # (B, Nk): the 1s if contiguous
    wrong = keep != inside
    if bool(wrong.any()):
        row, pos = (int(i) for i in wrong.nonzero()[0].tolist())  # the first 0 after a row's first 1
        raise ValueError(
            f"attention_mask has a hole in row {row} at position {pos}: a 0 between 1s. AHA attention takes "
            "padding only at the start of a row (left padding, as generate() makes) and at its end (right "
            "padding); a row right-padded with a cache leaves such a hole at the next step: pad on the left "
            "for generation"
        )
    positions = (keep.cumsum(1) - 1).clamp(min=0)[:, nk - len_q :]  # (B, Nq): generate()'s position ids
    if bool((first + count == nk).all()):  # every row ends at the last key: left padding only
        return Sequences(b, len_q, nk, positions, cache_leftpad=first.to(torch.int32))
    queries = keep[:, nk - len_q :]  # (B, Nq): the real queries
    q_count = queries.sum(1)
    return Sequences(
        b, len_q, nk, positions,
        cu_seqlens_q=_cu(q_count),
        cu_seqlens_k=_cu(count),
        max_seqlen_q=int(q_count.max()),
        max_seqlen_k=int(count.max()),
        q_index=queries.flatten().nonzero().squeeze(1),
        k_index=keep.flatten().nonzero().squeeze(1),
    )  # fmt: skip


def from_position_ids(position_ids: torch.Tensor, batch: int, len_q: int, len_k: int) -> Sequences | None:
    """Sequences packed in each row of ``position_ids`` [B or 1, len_q]; None if no row holds more than one.

    A sequence starts at every position id that is not one more than the one before it.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.shape[1] != len_q:
        raise ValueError(
            f"position_ids must be a [batch or 1, {len_q}] tensor, got {type(position_ids).__name__} "
            f"of shape {tuple(getattr(position_ids, 'shape', ()))}"
        )
    if position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids has {position_ids.shape[0]} rows for a batch of {batch}")
    pos = position_ids.expand(batch, len_q)
    start = F.pad(pos[:, 1:] != pos[:, :-1] + 1, (1, 0), value=True)  # (B, N): a sequence starts here
    if not bool(start[:, 1:].any()):
        return None
    if len_k != len_q:
        raise ValueError(
            f"position_ids restart inside a row (packed sequences), but the cache already holds {len_k - len_q} "
            "tokens: packed sequences need an empty cache (pass use_cache=False or no cache)"
        )
    starts = start.flatten().nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([batch * len_q])]).to(torch.int32)
    longest = int(cu.diff().max())
    return Sequences(batch, len_q, len_k, _positions(cu, batch, len_q), cu_seqlens_q=cu, cu_seqlens_k=cu,
                     max_seqlen_q=longest, max_seqlen_k=longest)  # fmt: skip


def from_cu_seqlens(
    cu_seqlens_q, cu_seqlens_k, batch: int, len_q: int, len_k: int, *, max_seqlen_q=None, max_seqlen_k=None, device=None
) -> Sequences:
    """Sequences packed along the flattened ``batch * len_q`` tokens by flash-attn's ``cu_seqlens_q`` /
    ``cu_seqlens_k`` (the same offsets: queries and keys are the same tokens)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"{missing} is missing: pass cu_seqlens_q and cu_seqlens_k together (the same offsets twice)")
    cu_q, cu_k = (torch.as_tensor(c, device=device) for c in (cu_seqlens_q, cu_seqlens_k))
    for name, c in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if c.ndim != 1 or c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D tensor of integers [S + 1], got {c.dtype} of shape {tuple(c.shape)}")
    if cu_q.shape != cu_k.shape or not torch.equal(cu_q, cu_k):
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must be equal in self-attention over packed sequences (each token is a "
            f"query and a key of its own sequence), got {cu_q.tolist()} and {cu_k.tolist()}"
        )
    if len_k != len_q:
        raise ValueError(
            f"cu_seqlens describe packed sequences, but the cache already holds {len_k - len_q} tokens: "
            "packed sequences need an empty cache (pass use_cache=False or no cache)"
        )
    if int(cu_q[0]) != 0 or int(cu_q[-1]) != batch * len_q or bool((cu_q.diff() < 0).any()):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the {batch} x {len_q} = {batch * len_q} tokens of the batch, "
            f"got {cu_q.tolist()}"
        )
    cu = cu_q.to(torch.int32)
    hints = {
        n: None if h is None else int(h) for n, h in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k))
    }
    return Sequences(batch, len_q, len_k, _positions(cu, batch, len_q), cu_seqlens_q=cu, cu_seqlens_k=cu, **hints)


def _positions(cu: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """[B, N] position of each token within its packed sequence."""
    idx = torch.arange(batch * n, device=cu.device)
    seq = torch.searchsorted(cu[1:].long(), idx, right=True)  # the sequence of each token
    return (idx - cu.long()[seq]).view(batch, n)


def sequences(
    batch: int,
    len_q: int,
    len_k: int,
    *,
    attention_mask=None,
    position_ids=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    device=None,
) -> Sequences | None:
    """The sequences of a self-attention call from whichever description the caller has; None when each
    row is one whole sequence (a plain call).

    A padding mask with a 0 wins; a mask of 1s is no mask. ``cu_seqlens_q/_k`` next, then
    ``position_ids`` (pass them only where restarting ids mean packing, as in transformers).
    Padding and packing together are refused.
    """
    padded = None
    if attention_mask is not None:
        _check_mask(attention_mask)
        if tuple(attention_mask.shape) != (batch, len_k):
            raise ValueError(
                f"attention_mask must have shape [batch, past + current tokens] = [{batch}, {len_k}], "
                f"got {tuple(attention_mask.shape)}"
            )
        padded = from_attention_mask(attention_mask, len_q)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if padded is not None:
        if packed:
            raise ValueError(
                "attention_mask has padding and cu_seqlens pack sequences: describe the batch one way "
                "(packed sequences need no padding)"
            )
        return padded
    if packed:
        return from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, batch, len_q, len_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, device=device)  # fmt: skip
    if position_ids is not None and len_q > 1:
        return from_position_ids(position_ids, batch, len_q, len_k)
    return None
