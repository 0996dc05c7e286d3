"""A parallel loop over tiles: one torch thread per worker, work handed out as it frees up.

Torch's intra-op threads split every op across the cores, and each op ends at a
barrier; a loop of many small ops (one chunk of tiles each) then waits at a
barrier per op, and on a busy machine a thread that lost its core stalls all
the others. Here each worker runs whole chunks with one intra-op thread, takes
the next chunk when it is done (largest first), and the caller blocks on the
results: no barrier per op, no busy-waiting, and a slow worker only does less.

There are ``torch.get_num_threads()`` workers; with one, the loop runs inline.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = 0


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when one is needed."""
    global _pool, _size, _lock
    _pool, _size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def workers() -> int:
    """How many workers :func:`parallel` uses: the caller's torch intra-op threads."""
    return max(1, torch.get_num_threads())


def _get_pool(n: int) -> ThreadPoolExecutor:
    """The shared pool of n workers, each with one intra-op thread (created once per size)."""
    global _pool, _size
    with _lock:
        if _pool is None or _size != n:
            caller = torch.get_num_threads()
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool, _size = ThreadPoolExecutor(n, thread_name_prefix="aha-cpu"), n
            started = threading.Barrier(n + 1)
            for _ in range(n):  # start every worker now and give it one intra-op thread
                _pool.submit(_init_worker, started)
            started.wait()
            torch.set_num_threads(caller)  # set_num_threads(1) in a worker also lowered the default for new threads
        return _pool


def _init_worker(started: threading.Barrier) -> None:
    torch.get_num_threads()  # torch sets a thread's count from the global one on first use: use it now,
    torch.set_num_threads(1)  # so that this thread keeps 1 after the caller restores the global count
    started.wait()


def parallel(fn, items, cost=None) -> list:
    """[fn(item, worker) for item in items], spread over the workers; worker is 0 .. workers()-1.

    Items go out one at a time, the costliest first (``cost(item)``), each under no_grad.
    A worker index lets fn keep per-worker accumulators. Exceptions propagate.
    """
    items = list(items)
    n = min(workers(), len(items))
    if n <= 1:
        with torch.no_grad():
            return [fn(item, 0) for item in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))
    results = [None] * len(items)
    queue = iter(order)
    take = threading.Lock()

    def run(worker: int) -> None:
        with torch.no_grad():
            while True:
                with take:
                    i = next(queue, None)
                if i is None:
                    return
                results[i] = fn(items[i], worker)

    for f in [_get_pool(workers()).submit(run, w) for w in range(n)]:
        f.result()
    return results


def run_jobs(jobs) -> list:
    """Run [(cost, job)] on the workers, the costliest first: [job() for each job], in order."""
    return parallel(lambda item, worker: item[1](), jobs, cost=lambda item: item[0])
