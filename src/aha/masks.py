"""Padding masks, packed position ids and cu_seqlens -> the sequences of one attention call.

Models learn the layout of a batch in the forms transformers uses:

* a 2-D ``attention_mask`` [B, past + current] of 1 (a real token) and 0 (padding). Left padding
  (what ``generate()`` makes), right padding, or both; never a 0 between 1s;
* ``position_ids`` [B or 1, N] that restart for each sequence packed in a row
  (``DataCollatorWithFlattening``): a sequence starts wherever a position id is not one more than
  the one before it, the rule of transformers' default (SDPA) masks;
* flash-attn's ``cu_seqlens_q`` / ``cu_seqlens_k`` over the flattened ``B * N`` tokens (transformers
  passes them as ``cu_seq_lens_q`` / ``cu_seq_lens_k``);
* a 4-D mask [B, 1, N, keys] that is a causal mask plus padding, the mask transformers builds from
  a 2-D one (bool, or additive float: 0 where a key is read, -inf or the dtype's minimum where not).
  Any other 4-D mask (a document mask, a prefix-LM mask, a custom pattern) is refused: AHA's All and
  Here are causal by definition.

A fixed-size cache (transformers' ``StaticCache``) holds ``len_k`` key slots of which the first
``used`` are filled: the call then passes ``cache_seqlens`` = ``used`` for every row (and
``cache_leftpad`` for left padding), so the attention reads the filled slots only.

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
from aha.validation import is_compiling

__all__ = [
    "Sequences",
    "sequences",
    "from_attention_mask",
    "from_position_ids",
    "from_cu_seqlens",
    "keys_of_4d_mask",
    "for_fixed_cache",
]


@dataclass(frozen=True, eq=False)
class Sequences:
    """The sequences of one self-attention call over ``len_q`` new tokens and ``len_k`` keys per row.

    Exactly one of two forms:

    * per row: ``cache_leftpad`` [B] (int32): row b's first ``cache_leftpad[b]`` keys are padding;
      ``cache_seqlens`` [B] (int32): row b's keys end at ``cache_seqlens[b]`` (a fixed-size cache of
      ``len_k`` slots); None: at ``len_k``. Either may be None.
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
    cache_seqlens: torch.Tensor | None = None
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
                q, k, v, gate, window=window, scale=scale, cache_seqlens=self.cache_seqlens,
                cache_leftpad=self.cache_leftpad, backend=backend,
            )  # fmt: skip
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

    def spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each query reads, in its row's key slots: ``first``, ``own`` [B, len_q] (int64).

        Query i of row b is key slot ``own[b, i]``; its sequence's keys start at slot ``first[b, i]``:
        All reads slots [first, own], Here the last ``window`` of them. A padding query has
        ``first > own`` (it reads nothing). Packed sequences must not cross rows here.
        """
        b, nq, nk = self.batch, self.len_q, self.len_k
        if not self.packed:
            end = nk if self.cache_seqlens is None else self.cache_seqlens.long()[:, None]
            own = (end - nq + torch.arange(nq, device=self.positions.device)).expand(b, nq)
            pad = 0 if self.cache_leftpad is None else self.cache_leftpad.long()[:, None]
            return torch.zeros_like(own) + pad, own
        cq, ck = self.cu_seqlens_q.long(), self.cu_seqlens_k.long()
        dev = cq.device
        q_flat = torch.arange(b * nq, device=dev) if self.q_index is None else self.q_index
        k_flat = torch.arange(b * nk, device=dev) if self.k_index is None else self.k_index
        p = torch.arange(q_flat.numel(), device=dev)  # packed query index
        s = torch.searchsorted(cq[1:], p, right=True)  # its sequence
        own_flat = k_flat[ck[s + 1] - cq[s + 1] + p]  # bottom-right aligned: the query's own key
        first_flat = k_flat[ck[s]]
        row = q_flat // nq
        if not is_compiling() and bool(((own_flat // nk != row) | (first_flat // nk != row)).any()):
            raise ValueError(
                "cu_seqlens: a packed sequence crosses from one row of the batch into the next; per-row attention "
                "weights cannot show it. Pack the sequences in one row (batch size 1) or keep each within its row"
            )
        first = torch.ones(b * nq, dtype=torch.long, device=dev)  # padding queries: first 1 > own 0
        own = torch.zeros(b * nq, dtype=torch.long, device=dev)
        first[q_flat], own[q_flat] = first_flat % nk, own_flat % nk
        return first.view(b, nq), own.view(b, nq)


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


def _check_mask(mask, ndims=(2, 4)) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim not in ndims:
        raise ValueError(
            "attention_mask: AHA attention takes a 2-D [batch, past + current tokens] mask of 1 (token) and 0 "
            "(padding), a 4-D [batch, 1, new tokens, keys] mask that is a causal mask plus padding (what "
            f"transformers builds from a 2-D one), or None; got {type(mask).__name__} of shape "
            f"{tuple(getattr(mask, 'shape', ()))}"
        )


_NOT_CAUSAL = (
    "AHA attention takes a 4-D mask only when it is a causal mask plus padding (what transformers builds "
    "from a 2-D mask): All reads every earlier key of its sequence and Here its last `window` ones, so no "
    "other pattern (a document mask, a prefix-LM mask, a custom pattern) can be expressed. Describe padding "
    "with a 2-D mask and packed sequences with position_ids or cu_seqlens"
)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask -> bool, True where a query reads a key: bool as is, integers 1 / 0, additive floats
    0 (read) / -inf or the dtype's minimum (not read)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        allowed = mask == 0
        if not is_compiling() and bool((~allowed & (mask > torch.finfo(mask.dtype).min / 2)).any()):
            raise ValueError(
                "attention_mask: a 4-D float mask must hold 0 where a key is read and -inf (or the dtype's minimum) "
                "where it is not; this one adds other values (a bias), which AHA attention does not take. "
                + _NOT_CAUSAL
            )
        return allowed
    if not is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask: a 4-D integer mask must hold 1 (read) and 0 (not read)")
    return mask != 0


def keys_of_4d_mask(mask: torch.Tensor, batch: int, len_q: int, len_k: int, used=None) -> torch.Tensor:
    """The real keys [B, len_k] (bool) of a 4-D mask [B, 1 or H, len_q, len_k] that is a causal mask plus
    padding; a ValueError names the first entry of any other mask.

    ``used``: the key slots in use (int or tensor) when the cache is fixed-size; the new queries are
    then slots ``used - len_q`` to ``used - 1``, else the last ``len_q`` of the ``len_k`` keys. A key is
    real when some query reads it; a padding query (one whose own token is padding) may read the real
    keys before it (transformers' right padding) or none. While torch.compile traces, the mask is
    trusted (its values cannot be read).
    """
    _check_mask(mask, (4,))
    want = (batch, len_q, len_k)
    if mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != want[1:]:
        raise ValueError(
            f"attention_mask: a 4-D mask must have shape [batch, 1, new tokens, keys] = [{batch}, 1, {len_q}, "
            f"{len_k}], got {tuple(mask.shape)}"
        )
    allowed = _allowed(mask).expand(batch, -1, len_q, len_k)
    if not is_compiling() and allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("attention_mask: a 4-D mask with one slice per head must be the same for every head")
    allowed = allowed[:, 0]  # (B, Nq, Nk)
    keys = allowed.any(1)  # (B, Nk): a key some query reads
    if is_compiling():
        return keys
    end = len_k if used is None else int(used)
    own = end - len_q + torch.arange(len_q, device=mask.device)  # (Nq,) each query's own key slot
    causal = torch.arange(len_k, device=mask.device) <= own[:, None]  # (Nq, Nk)
    wrong = (keys[:, None, :] & causal) != allowed
    if bool(wrong.any()):
        b, i, j = (int(x) for x in wrong.nonzero()[0].tolist())
        does = "reads" if bool(allowed[b, i, j]) else "does not read"
        raise ValueError(
            f"attention_mask: this 4-D mask is not a causal mask plus padding: in row {b}, query {i} (key slot "
            f"{int(own[i])}) {does} key {j}, which causal attention over the row's real keys would not. "
            f"{_NOT_CAUSAL}"
        )
    return keys


def for_fixed_cache(batch: int, len_q: int, len_k: int, used, keys: torch.Tensor | None = None) -> Sequences:
    """The sequences of a call into a fixed-size cache (transformers' ``StaticCache``) of ``len_k`` slots,
    of which the first ``used`` (int or 0-d tensor; past + new tokens) are filled after this call.

    ``keys``: the real keys [B, len_k] or [B, used] (bool or 0/1), None if every filled slot is real.
    With a fixed-size cache a row may be padded on the left only (every row ends at ``used``). The
    result passes ``cache_seqlens`` = ``used`` and, for left padding, ``cache_leftpad``; under
    torch.compile it always passes ``cache_leftpad`` when ``keys`` is given (values cannot be read).
    """
    dev = keys.device if keys is not None else (used.device if isinstance(used, torch.Tensor) else None)
    used_t = torch.as_tensor(used, device=dev).reshape(1)
    seqlens = used_t.to(torch.int32).repeat(batch)  # (B,)
    own = used_t - len_q + torch.arange(len_q, device=used_t.device)  # (Nq,) the new tokens' slots
    if keys is None:
        return Sequences(batch, len_q, len_k, own.expand(batch, len_q), cache_seqlens=seqlens)
    if keys.ndim != 2 or keys.shape[0] != batch or keys.shape[1] > len_k:
        raise ValueError(
            f"attention_mask must have shape [batch, past + current tokens] = [{batch}, {used}] (or the cache's "
            f"{len_k} slots), got {tuple(keys.shape)}"
        )
    keys = F.pad(keys != 0, (0, len_k - keys.shape[1]))  # (B, Nk): slots beyond the mask are empty
    first = keys.int().argmax(1)  # (B,) the row's first real key
    if not is_compiling():
        n = int(used)
        cols = torch.arange(len_k, device=keys.device)
        wrong = keys != ((cols >= first[:, None]) & (cols < n))
        if bool(wrong.any()):
            row, pos = (int(i) for i in wrong.nonzero()[0].tolist())
            raise ValueError(
                f"attention_mask: with a fixed-size cache (StaticCache) every row must end at the last filled "
                f"slot ({n}) and may be padded on the left only; row {row} differs at position {pos} (right padding "
                "or a hole). Pad on the left, as generate() does, or use a DynamicCache"
            )
        if not bool(first.any()):
            return Sequences(batch, len_q, len_k, own.expand(batch, len_q), cache_seqlens=seqlens)
    positions = (own - first[:, None]).clamp(min=0)  # (B, Nq): place within the row's sequence
    return Sequences(batch, len_q, len_k, positions, cache_leftpad=first.to(torch.int32), cache_seqlens=seqlens)


def from_attention_mask(mask: torch.Tensor, len_q: int) -> Sequences | None:
    """The sequences of a 2-D padding mask [B, len_k] over past and current tokens; None if it has no 0.

    Row b's real keys are its 1s, which must be contiguous; its queries are the last ``len_q``
    positions, those at a 0 are padding queries.
    """
    _check_mask(mask, (2,))
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
            "for generation. generate() makes such a mask itself from a prompt that holds the pad token and "
            "comes without an attention_mask: pass the mask"
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
    used=None,
    device=None,
) -> Sequences | None:
    """The sequences of a self-attention call from whichever description the caller has; None when each
    row is one whole sequence (a plain call).

    A padding mask with a 0 wins (a 2-D mask, or a 4-D one that is a causal mask plus padding); a
    mask of 1s is no mask. ``cu_seqlens_q/_k`` next, then ``position_ids`` (pass them only where
    restarting ids mean packing, as in transformers). Padding and packing together are refused.
    ``used``: with a fixed-size cache of ``len_k`` slots, the slots filled after this call (past + new
    tokens); the result then always passes ``cache_seqlens`` (see `for_fixed_cache`).
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if used is not None:
        return _fixed(batch, len_q, len_k, used, attention_mask, position_ids, packed)
    padded = None
    if attention_mask is not None:
        _check_mask(attention_mask)
        if attention_mask.ndim == 4:
            attention_mask = keys_of_4d_mask(attention_mask, batch, len_q, len_k)
        if tuple(attention_mask.shape) != (batch, len_k):
            raise ValueError(
                f"attention_mask must have shape [batch, past + current tokens] = [{batch}, {len_k}], "
                f"got {tuple(attention_mask.shape)}"
            )
        padded = from_attention_mask(attention_mask, len_q)
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


def _fixed(batch, len_q, len_k, used, mask, position_ids, packed) -> Sequences:
    """`sequences` for a fixed-size cache: padding on the left only, no packing."""
    restarts = (  # a padding mask wins over position ids, as in `sequences` (generate's pads repeat ids)
        mask is None and position_ids is not None and len_q > 1 and not is_compiling()
        and from_position_ids(position_ids, batch, len_q, len_q) is not None
    )  # fmt: skip
    if packed or restarts:
        raise ValueError(
            "packed sequences (cu_seqlens, or position_ids that restart) need a growing cache (DynamicCache) or "
            "none; a fixed-size cache (StaticCache) holds one sequence per row"
        )
    if mask is None:
        return for_fixed_cache(batch, len_q, len_k, used)
    _check_mask(mask)
    if mask.ndim == 4:
        mask = keys_of_4d_mask(mask, batch, len_q, len_k, used)
    elif not is_compiling() and mask.shape[-1] not in (int(used), len_k):
        raise ValueError(
            f"attention_mask must have shape [batch, past + current tokens] = [{batch}, {int(used)}] (or the "
            f"cache's {len_k} slots), got {tuple(mask.shape)}"
        )
    return for_fixed_cache(batch, len_q, len_k, used, mask)
