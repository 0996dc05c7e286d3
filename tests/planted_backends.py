"""Small backends with planted bugs, to show that the conformance suite fails them (tests/test_conformance.py).

Load it as a pytest plugin (``-p planted_backends``, with tests/ on the path): it registers its
backends in-process at configure time, as an installed entry point would. Each is the same dense
masked attention written here from the spec (float32 math, cache_seqlens, GQA, Nq < Nk), with at
most one bug:

    planted_ok16          correct; declares float16 and bfloat16 only
    planted_scale         ignores the caller's scale (always 1/sqrt(D))
    planted_seqlens_grad  correct forward; keys past cache_seqlens[b] get dk = dv = 1
    planted_long          All reads only the first 256 keys (a bug of long sequences only)
    planted_hard_soft     rounds a soft gate to 0/1 (fails a pinned edge case: the report must name it)
    planted_here_short    Here reads window - 1 keys: none, so NaN, at window 1 (the report must say which side is NaN)
    planted_top_left      aligns queries top-left (pos(i) = i) when Nq < Nk, as SDPA's is_causal does
    planted_gate_detached gives the gate no gradient (the report must say so, not torch's "not used in the graph")

It also registers the Hypothesis profile ``planted``: 5 derandomized examples a property, no
shrinking, so that a run over all of them stays short and gives the same verdicts every time.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

import aha

settings.register_profile(
    "planted",
    max_examples=5,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LONG = 256  # planted_long's All branch reads keys [0, LONG) only


def _branch(s, v, visible):
    """softmax over the visible keys, times v. s [B, H, Nq, Nk], v [B, H, Nk, D], visible [B, 1, Nq, Nk].

    A non-finite value in v reaches exactly the queries that see its key (p @ v alone would
    carry it to every query through 0 * NaN).
    """
    import torch

    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    finite = torch.isfinite(v)
    out = p @ torch.where(finite, v, 0.0)
    reached = (visible.to(v.dtype) @ (~finite).to(v.dtype)) > 0  # [B, H, Nq, D]
    return torch.where(reached, float("nan"), out)


def _leak_past(lens):
    """Identity whose backward adds 1 to the gradient of every key past lens[b] (the planted bug)."""
    import torch

    class Leak(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, dx):
            past = torch.arange(dx.shape[2], device=dx.device)[None, :] >= lens[:, None]  # [B, Nk]
            return dx + past[:, None, :, None].to(dx.dtype)

    return Leak.apply


def _forward(q, k, v, gate, *, window, scale=None, cache_seqlens=None, bug=None):
    import torch

    from aha.torch_ops import mix

    b, hq, nq, d = q.shape
    nk = k.shape[2]
    lens = torch.full((b,), nk, device=q.device) if cache_seqlens is None else cache_seqlens.long()
    if bug == "seqlens_grad":
        leak = _leak_past(lens)
        k, v = leak(k), leak(v)
    j = torch.arange(nk, device=q.device)
    owned = (j[None, :] < lens[:, None])[:, None, :, None]  # [B, 1, Nk, 1]: keys row b may read
    group = hq // k.shape[1]
    k, v = (torch.where(owned, x, 0).float().repeat_interleave(group, 1) for x in (k, v))  # [B, Hq, Nk, D]
    scale = d**-0.5 if scale is None or bug == "scale" else scale
    pos = lens[:, None] - nq + torch.arange(nq, device=q.device)  # [B, Nq], bottom-right in each row
    if bug == "top_left":
        pos = pos - pos[:, :1]
    causal = j <= pos[..., None]  # [B, Nq, Nk]
    here = causal & (j > pos[..., None] - window)
    if bug == "here_short":
        here = causal & (j > pos[..., None] - window + 1)
    if bug == "long":
        causal = causal & (j < LONG)
    if bug == "hard_soft":  # straight-through: the gate keeps its gradient
        gate = gate + ((gate > 0.5).to(gate.dtype) - gate).detach()
    if bug == "gate_detached":
        gate = gate.detach()
    s = (q.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, Nq, Nk]
    out_all, out_here = _branch(s, v, causal[:, None]), _branch(s, v, here[:, None])
    return mix(gate.float(), out_all, out_here).to(q.dtype)


def _backend(name: str, bug: str | None, dtypes=("float32",)) -> aha.Backend:
    def forward(q, k, v, gate, *, window, scale=None, cache_seqlens=None):
        return _forward(q, k, v, gate, window=window, scale=scale, cache_seqlens=cache_seqlens, bug=bug)

    caps = aha.Capabilities(arrays=("torch",), devices=("cpu",), dtypes=dtypes, seqlens=True)
    return aha.Backend(name, forward, capabilities=caps, priority=-20, description=f"planted bug: {bug}")


BACKENDS = {
    "planted_ok16": (None, ("float16", "bfloat16")),
    "planted_scale": ("scale", ("float32",)),
    "planted_seqlens_grad": ("seqlens_grad", ("float32",)),
    "planted_long": ("long", ("float32",)),
    "planted_hard_soft": ("hard_soft", ("float32",)),
    "planted_here_short": ("here_short", ("float32",)),
    "planted_top_left": ("top_left", ("float32",)),
    "planted_gate_detached": ("gate_detached", ("float32",)),
}


class Plugin:
    @aha.hookimpl
    def register_backends(self, register):
        for name, (bug, dtypes) in BACKENDS.items():
            register(_backend(name, bug, dtypes))


def pytest_configure(config):
    from aha.registry import registry

    if registry.get("planted_ok16") is None:
        registry.add_plugin(Plugin(), "planted", "planted-backends", "0")
