"""One rank of the two-process DDP test (tests/test_ddp.py): trains TinyLM with the sparsity term.

Usage: python ddp_worker.py RANK WORLD PORT OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aha.training import GateStats, RouterSparsity
from aha_tiny import TinyLM, copy_task, lm_loss


def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial model on every rank
    model = DistributedDataParallel(TinyLM(window=2))
    sparsity = RouterSparsity(model, lam=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = copy_task(4, 16, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own batch
    losses = []
    for _ in range(12):
        loss = lm_loss(model, data)
        opt.zero_grad()
        (loss + sparsity()).backward()  # DDP averages the gradients across ranks
        opt.step()
        losses.append(loss.item())
    with torch.no_grad(), GateStats(model) as stats:
        model(data)
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    result = {"rank": rank, "losses": losses, "params": flat.tolist(), "all_share": stats.all_share()}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
