"""The whole plugin: one hookimpl that registers one backend.

The backend is deliberately plain: dense masked attention in float32, with
O(Nq * Nk * D) memory. It shows the contract, not a fast kernel.
"""

import aha


def _branch(s, v, visible):
    """softmax over the visible keys, then a sum that never touches the hidden ones."""
    import torch

    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)  # (B, Hq, Nq, Nk)
    pv = p.unsqueeze(-1) * v.unsqueeze(2)  # (B, Hq, Nq, Nk, D)
    return torch.where(visible.unsqueeze(-1), pv, 0.0).sum(-2)  # (B, Hq, Nq, D)


def forward(q, k, v, gate, *, window, scale=None):
    import torch

    from aha.torch_ops import mix

    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, 1).float() for x in (k, v))  # (B, Hq, Nk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nq, nk = q.shape[2], k.shape[2]
    pos = nk - nq + torch.arange(nq, device=q.device)[:, None]  # bottom-right alignment
    j = torch.arange(nk, device=q.device)
    s = (q.float() @ k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    out_all = _branch(s, v, j <= pos)
    out_here = _branch(s, v, (j <= pos) & (j > pos - window))
    # aha's mix selects where the gate is 0 or 1 (no 0 * NaN), with the gate's gradient of the blend.
    return mix(gate.float(), out_all, out_here).to(q.dtype)


@aha.hookimpl
def register_backends(register):
    register(
        aha.Backend(
            name="example",
            forward=forward,
            capabilities=aha.Capabilities(arrays=("torch",), devices=("cpu",), dtypes=("float32",)),
            priority=-10,  # backend=None never prefers it over the built-ins
            description="worked example: dense masked attention in float32",
        )
    )
