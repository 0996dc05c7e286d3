"""Routers fitted to a trained model without training it: calibration from its own attention.

`calibrate_routers` runs the model with full attention on calibration batches and, for every
layer, head and token, measures how much that token needs All (`measure_need`):

* ``mass``: the share of the head's attention weight on keys outside the window, the weight
  Here would drop;
* ``output``: how much the layer's attention output moves when this head alone reads Here
  instead of All, ``|W_o,h (o_h^All - o_h^Here)| / |attention output with All|`` (the head's
  contribution through ``o_proj``, relative to the whole layer's).

It then fits each head's router, a linear map of the layer input (the paper's form, and the
gate rows of ``q_proj`` in the released layout), by logistic regression to predict the tokens
whose need is above a threshold, and sets each head's bias so that the router picks All for
the same share of that head's calibration tokens as the oracle does (`need_gates`). The
threshold is global (one for every layer, head and token), chosen for a target share of All
(``share``) or for an error budget (``budget``: the largest part of the total need that may
fall on tokens routed Here).

Shares count positions >= window only: below it Here reads every key All reads, the gate
changes nothing and costs nothing. Nothing here trains the model's weights; the routers
only. Usage::

    from aha.calibration import calibrate_routers
    report = calibrate_routers(model, batches, window=256, share=0.1)   # batches: [B, N] token ids

``aha.hf.calibrate`` does this for transformers checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import aha
from aha.nn import AHAAttention, aha_layers

__all__ = ["AttentionNeed", "measure_need", "need_threshold", "need_gates", "fit_router", "calibrate_routers"]

MEASURES = ("output", "mass")
_EPS = 1e-6


@dataclass
class AttentionNeed:
    """What `measure_need` found, for ``window``: per layer, [B, Hq, N] tensors over the batches given.

    ``output`` and ``mass`` are 0 at positions < window (Here = All there). ``inputs`` holds each
    layer's input [B, N, C] (float32), what its router reads, when measured with ``keep_inputs``.
    """

    window: int
    output: torch.Tensor  # (L, B, Hq, N)
    mass: torch.Tensor | None  # (L, B, Hq, N); None when not measured
    inputs: list[torch.Tensor] | None = None  # per layer (B, N, C)

    def get(self, measure: str) -> torch.Tensor:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
        if getattr(self, measure) is None:
            raise ValueError(f"measure: {measure!r} was not measured (measure_need(..., mass=True) measures it)")
        return getattr(self, measure)

    def beyond(self, measure: str = "output") -> torch.Tensor:
        """The need at positions >= window, [L, Hq, T] (T = B * (N - window) tokens)."""
        x = self.get(measure)[..., self.window :]  # (L, B, Hq, N - w)
        return x.transpose(1, 2).flatten(2)


def _outside_mass(q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """The causal softmax weight [B, Hq, N] each query puts on keys more than ``window`` - 1 behind it."""
    n = q.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, Hq, N, N)
    rows = torch.arange(n, device=q.device)
    causal = rows[None, :] <= rows[:, None]
    outside = rows[None, :] <= rows[:, None] - window
    lse_all = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), -1)
    lse_out = torch.logsumexp(scores.masked_fill(~outside, float("-inf")), -1)
    return torch.exp(lse_out - lse_all)  # exp(-inf) = 0 where no key is outside


def _layer_need(layer: AHAAttention, x: torch.Tensor, position_embeddings, window: int, mass: bool):
    """Relative output change and outside mass (None unless ``mass``) [B, Hq, N] of ``layer`` on its input x."""
    b, n, _ = x.shape
    q, k, v, _ = layer._project(x)
    q, k = layer.rotate(q, k, position_embeddings, torch.arange(n, device=x.device)[None])
    q, k, v = q.float(), k.float(), v.float()
    ones = torch.ones(b, layer.num_heads, n, dtype=torch.bool, device=x.device)
    o_all = aha.attention(q, k, v, ones, window=window, backend=layer.backend)  # (B, Hq, N, D)
    o_here = aha.attention(q, k, v, ~ones, window=window, backend=layer.backend)
    wo = layer.o_proj.weight.float().view(-1, layer.num_heads, layer.head_dim)  # (C, Hq, D)
    delta = torch.einsum("bhnd,chd->bhnc", o_all - o_here, wo).norm(dim=-1)  # (B, Hq, N)
    total = torch.einsum("bhnd,chd->bnc", o_all, wo).norm(dim=-1)  # (B, N)
    output = delta / (total[:, None] + _EPS)
    output[..., :window] = 0.0
    return output, _outside_mass(q, k, window) if mass else None


class _Enough(Exception):
    """Raised by the hook of the one layer measured, to end the forward there (the layers after it are not needed)."""


@torch.no_grad()
def measure_need(
    model: nn.Module, batches: Iterable[torch.Tensor], *, window: int, keep_inputs: bool = False, mass: bool = True
) -> AttentionNeed:
    """Run ``model(ids)`` with full attention on every batch ids [B, N] (one N for all) and measure the need.

    A batch is what the model takes, sequences along dim 1: token ids [B, N] for a language model,
    or hidden states [B, N, C] for a bare layer.

    Every AHA layer computes plain causal attention during the pass (its window is raised to the
    sequence length and restored after), so the routers the model has do not matter. Each layer's
    need is computed from its own q, k, v with the rotary embedding the model passes it (or its own
    RoPE), for a Here window of ``window`` keys, with the layer's own `aha.attention` backend. Batches must be
    whole sequences (no padding). ``mass``: measure the attention mass outside the window as well (it
    needs the [B, Hq, N, N] scores); ``keep_inputs``: keep each layer's input, for fitting routers.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (the keys a Here token reads), got {window!r}")
    layers = aha_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no aha.nn.AHAAttention layer to calibrate")
    return _measure(model, layers, batches, window, keep_inputs=keep_inputs, mass=mass)


@torch.no_grad()
def _measure(model, layers, batches, window, *, keep_inputs, mass, only: int | None = None) -> AttentionNeed:
    """`measure_need` over ``layers``; with ``only = i``, layer i alone, as the model routes now.

    Without ``only`` every layer reads All during the pass. With it, the layers before i route as
    they are set (their routers and windows), layer i's need is measured on the input they give it,
    and the pass ends there; the result then has one layer.
    """
    index = {id(layer): i for i, layer in enumerate(layers)}
    measured = layers if only is None else [layers[only]]
    out: list[list[tuple]] = [[] for _ in measured]

    def hook(layer, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        output, outside = _layer_need(layer, x, kwargs.get("position_embeddings"), window, mass)
        outside = None if outside is None else outside.cpu()
        out[0 if only is not None else index[id(layer)]].append(
            (output.cpu(), outside, x.detach().float().cpu() if keep_inputs else None)
        )
        if only is not None:
            raise _Enough

    saved = [layer.window for layer in layers]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in measured]
    was_training = model.training
    model.eval()
    length, seen = None, 0
    try:
        for ids in batches:
            if ids.ndim < 2 or ids.shape[0] == 0:
                raise ValueError(f"batches: each must be [B, N, ...] (B >= 1 sequences of N), got {tuple(ids.shape)}")
            if length is not None and ids.shape[1] != length:
                raise ValueError(f"batches: every batch must have the same length, got {ids.shape[1]} after {length}")
            length = ids.shape[1]
            if length <= window:
                raise ValueError(
                    f"window: {window} keys hold every token of a {length}-token batch, so Here = All everywhere; "
                    f"use a window below the sequence length or longer sequences"
                )
            if only is None:
                for layer in layers:
                    layer.window = length
            try:
                model(ids)
            except _Enough:
                pass
            seen += 1
    finally:
        for layer, w in zip(layers, saved):
            layer.window = w
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("batches: no calibration data (the iterable was empty)")
    output = torch.stack([torch.cat([o for o, _, _ in per]) for per in out])  # (L, B, Hq, N)
    outside = torch.stack([torch.cat([m for _, m, _ in per]) for per in out]) if mass else None
    inputs = [torch.cat([x for _, _, x in per]) for per in out] if keep_inputs else None
    return AttentionNeed(window, output, outside, inputs)


def _check_target(share: float | None, budget: float | None) -> None:
    if (share is None) == (budget is None):
        raise ValueError("give exactly one of share (the share of All) or budget (the share of need left to Here)")
    if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
        raise ValueError(
            f"share must lie strictly between 0 and 1 (the share of All at positions >= window), got {share!r}"
        )
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise ValueError(
            f"budget must lie strictly between 0 and 1 (the share of the need left to Here), got {budget!r}"
        )


def need_threshold(need: torch.Tensor, *, share: float | None = None, budget: float | None = None) -> float:
    """The global threshold on ``need`` (any shape, positions >= window only) for a share of All or a budget.

    share: All for the ``share`` of the entries of highest need. budget: All for the fewest
    entries of highest need such that the entries left to Here carry at most ``budget`` of the total need.
    Returns tau: All where need > tau.
    """
    _check_target(share, budget)
    flat = need.flatten().double().sort(descending=True).values
    if share is not None:
        k = round(share * flat.numel())
    else:
        left = flat.sum() - flat.cumsum(0)  # need left to Here when the first i + 1 are All
        total = float(flat.sum())
        k = int((left > budget * total).sum()) + 1 if total > 0 else 0
    k = min(max(k, 0), flat.numel())
    if k == 0:
        return float(flat[0]) if flat.numel() else 0.0
    if k == flat.numel():
        return -math.inf
    return float((flat[k - 1] + flat[k]) / 2) if flat[k - 1] > flat[k] else float(flat[k])


def need_gates(need: AttentionNeed, *, share=None, budget=None, measure: str = "output") -> torch.Tensor:
    """Oracle gates [L, B, Hq, N] (True = All): All where the measured need is above the global threshold."""
    tau = need_threshold(need.beyond(measure), share=share, budget=budget)
    gates = need.get(measure) > tau
    gates[..., : need.window] = True  # Here = All there: the gate costs nothing and changes nothing
    return gates


def fit_router(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of labels y [T, H] (bool) on features x [T, C], one per column of y.

    Features are standardised for the fit (the weights are mapped back), with an L2 penalty
    ``l2`` on the standardised weights; full-batch L-BFGS. Returns weight [H, C] and bias [H]
    of logits ``x @ weight.T + bias``.
    """
    x = x.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    t, c = xs.shape
    h = y.shape[1]
    yf = y.double()
    w = torch.zeros(c, h, dtype=torch.float64, requires_grad=True)
    prior = yf.mean(0).clamp(1e-6, 1 - 1e-6)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yf) * h + 0.5 * l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w.detach() / sd[:, None]).T  # (H, C)
    bias = b.detach() - weight @ mu
    return weight, bias


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _bias_for_share(z: torch.Tensor, share: float, threshold: float) -> float:
    """The bias that puts ``share`` of the scores z [T] above logit(threshold), the cut in a gap between distinct
    scores (tied scores, e.g. of equal inputs, all go the same way) and in its middle, away from rounding."""
    cut = _logit(threshold)
    zs = z.double().sort(descending=True).values
    k = round(share * zs.numel())
    gaps = (zs[:-1] > zs[1:]).nonzero().flatten() + 1  # k such that zs[k - 1] > zs[k]
    if k <= 0 or not len(gaps) and k < zs.numel():
        return cut - float(zs[0]) - 1.0
    if k >= zs.numel():
        return cut - float(zs[-1]) + 1.0
    k = int(gaps[(gaps - k).abs().argmin()])
    return cut - (float(zs[k - 1]) + float(zs[k])) / 2


@torch.no_grad()
def _set_router(layer: AHAAttention, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write a router's weight [Hq, C] and bias [Hq] into ``layer``, separate or fused."""
    h = layer.num_heads
    if not layer.fused_router:
        if layer.router.bias is None:
            raise ValueError(
                f"model: layer {layer.layer_idx}'s router has no bias, which calibration needs to set its share; "
                "build the layers with router_bias=True"
            )
        layer.router.weight.copy_(weight.to(layer.router.weight))
        layer.router.bias.copy_(bias.to(layer.router.bias))
        return
    layer.q_proj.weight[-h:] = weight.to(layer.q_proj.weight)
    qb = layer.q_proj.bias
    if layer.gate_bias is not None:
        layer.gate_bias.copy_(bias.to(layer.gate_bias))
        if qb is not None:
            qb[-h:] = 0
    elif qb is not None:
        qb[-h:] = bias.to(qb)
    else:
        raise ValueError(
            f"model: layer {layer.layer_idx}'s fused router has no bias (router_bias=False and no q_proj bias), which "
            "calibration needs to set its share; convert the model with router_bias=True (aha.hf.add_router does)"
        )


def _threshold_of(layer: AHAAttention) -> float:
    return layer.router.threshold if layer.router is not None else layer.threshold


def calibrate_routers(
    model: nn.Module,
    batches: Iterable[torch.Tensor] | None = None,
    *,
    window: int,
    share: float | None = None,
    budget: float | None = None,
    measure: str = "output",
    l2: float = 1e-3,
    max_fit_tokens: int | None = 200_000,
    need: AttentionNeed | None = None,
    seed: int = 0,
    sequential: bool = True,
) -> dict:
    """Fit every router of ``model`` to its own attention and set every AHA layer's window; no training.

    Args:
        model: a model with `aha.nn.AHAAttention` layers whose routers have a bias (separate, or
            fused as in the released layout with ``router_bias=True``); its other weights are kept.
        batches: calibration token ids, [B, N] each, N > window (see `measure_need`).
        window: the Here window the routers are fitted for; every layer gets it.
        share: target share of All at positions >= window (0 < share < 1), over every layer, head and token.
        budget: instead of share, the largest part of the total need that may fall on tokens
            routed Here (0 < budget < 1); the share follows.
        measure: ``"output"`` (relative output change, default) or ``"mass"`` (attention outside the window).
        l2: L2 penalty of the logistic regression (on standardised inputs).
        max_fit_tokens: fit each layer on at most this many tokens (a seeded random subset), None for all.
        need: a measurement from `measure_need` with ``keep_inputs=True`` to reuse instead of measuring
            again (with ``sequential``, batches are still needed for the layers after the first).
        seed: seed of the subset.
        sequential: fit layer by layer, each on the input it gets when the layers before it route
            by their fitted routers (one more pass over the batches per layer after the first, ended
            at that layer), as the model will run. Otherwise every layer is fitted on its input under
            full attention, and layers after the first then see inputs they were not fitted on: on the
            reproduction's model they routed up to a third fewer tokens All than asked.

    The threshold and each head's share of All come from the full-attention measurement; with
    ``sequential``, a layer's labels are its need measured again under the routing before it, and
    its biases give each head that share on the inputs it then gets, so the share of All on the
    calibration data is the one asked for, as the model runs.

    Returns:
        a report: the threshold, the oracle's and the fitted routers' share of All and share of
        the need covered on the calibration tokens, overall and per layer and head (the routers'
        against the need measured as they run, with ``sequential``).
    """
    _check_target(share, budget)
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if batches is not None:
        batches = list(batches)  # read once per layer with sequential
    if need is None:
        if batches is None:
            raise ValueError("batches: give calibration batches (or a measured need)")
        need = measure_need(model, batches, window=window, keep_inputs=True, mass=measure == "mass")
    elif need.window != window or need.inputs is None:
        raise ValueError(f"need: measured for window {need.window} (inputs kept: {need.inputs is not None}); "
                         f"calibrating for window {window} needs a measurement at that window with keep_inputs=True")  # fmt: skip
    layers = aha_layers(model)
    if sequential and len(layers) > 1 and batches is None:
        raise ValueError("batches: sequential calibration measures each layer again under the routing before it; "
                         "give the calibration batches too (or sequential=False)")  # fmt: skip
    values = need.beyond(measure)  # (L, Hq, T)
    tau = need_threshold(values, share=share, budget=budget)
    oracle = values > tau  # (L, Hq, T)
    shares = oracle.double().mean(-1)  # (L, Hq): each head's share of All
    gen = torch.Generator().manual_seed(seed)
    routed = torch.zeros_like(oracle)
    seen = values.clone()  # the need as the routers run: measured again layer by layer with sequential
    for i, layer in enumerate(layers):
        inputs = need.inputs[i]
        if sequential and i > 0:  # the layers before i route now
            again = _measure(model, layers, batches, window, keep_inputs=True, mass=measure == "mass", only=i)
            seen[i], inputs = again.beyond(measure)[0], again.inputs[0]
        x = inputs[:, window:].flatten(0, 1)  # (T, C), the order of beyond(): batch, then position
        y = (seen[i] > tau).T  # (T, Hq)
        pick = slice(None)
        if max_fit_tokens is not None and x.shape[0] > max_fit_tokens:
            pick = torch.randperm(x.shape[0], generator=gen)[:max_fit_tokens]
        weight, bias = fit_router(x[pick], y[pick], l2=l2)
        z = x.double() @ weight.T  # (T, Hq)
        thr = _threshold_of(layer)
        bias = torch.tensor([_bias_for_share(z[:, h], float(shares[i, h]), thr) for h in range(y.shape[1])])
        _set_router(layer, weight, bias)
        routed[i] = (z + bias > _logit(thr)).T
        layer.window = window
    def covered(g, v=values):
        return float((v * g).sum() / v.sum().clamp_min(1e-30))

    return {
        "window": window,
        "measure": measure,
        "sequential": sequential,
        "target": {"share": share, "budget": budget},
        "threshold": tau,
        "tokens": int(values.shape[-1]),
        "oracle": {"all_share": float(oracle.float().mean()), "need_covered": covered(oracle),
                   "per_head": oracle.float().mean(-1).tolist()},
        "router": {"all_share": float(routed.float().mean()), "need_covered": covered(routed, seen),
                   "per_head": routed.float().mean(-1).tolist(),
                   "agreement": float((routed == (seen > tau)).float().mean())},
    }  # fmt: skip
