"""Stands for upstream's tests/distributed_testing_utils.py (not in the sdist): `run_distributed`
runs a function on ``world_size`` CPU processes joined by gloo, as the tensor-parallel mixin needs."""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int):
    """``run_distributed(2)(fn)(*args)`` calls ``fn(rank, *args)`` on 2 spawned processes; raises if any fails."""

    def wrap(fn):
        def call(*args):
            import torch.multiprocessing as mp

            mp.start_processes(
                _rank_main, args=(world_size, _free_port(), fn, args), nprocs=world_size, start_method="spawn"
            )

        return call

    return wrap
