"""Stands for upstream's tests/distributed_testing_utils.py (not in the sdist), on the CPU with gloo:
`run_distributed` runs a function on ``world_size`` processes, as the tensor-parallel mixin needs; the
``_get_*`` / ``_set_rank_device`` / ``_start_rank_processes`` helpers are what the FSDP mixin imports."""

from __future__ import annotations

import os
import socket

# forkserver: ranks fork from one server process started once per session, which has torch, transformers and
# aha.hf loaded (a spawned rank spends most of a test importing them). Not fork: a rank forked from the busy test
# process inherits its threads' locks (a glibc resolver lock held at fork time deadlocked a rank's TCPStore).
_START = os.environ.get("AHA_DISTRIBUTED_START", "forkserver")
if _START == "forkserver":
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "transformers", "aha.hf"])


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
                _rank_main, args=(world_size, _free_port(), fn, args), nprocs=world_size, start_method=_START
            )

        return call

    return wrap


def _get_distributed_backend() -> str:
    return "gloo"


def _get_distributed_device_type() -> str:
    return "cpu"


def _get_rank_device(rank: int):
    import torch

    return torch.device("cpu")


def _set_rank_device(rank: int) -> None:
    """Nothing to pin on the CPU."""


def _start_rank_processes(fn, args=(), nprocs: int = 2) -> None:
    """Calls ``fn(rank, *args)`` on ``nprocs`` spawned processes (each with one torch thread); raises if any fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_one_thread, args=(fn, args), nprocs=nprocs, start_method=_START)


def _one_thread(rank: int, fn, args) -> None:
    import torch

    torch.set_num_threads(1)
    fn(rank, *args)
