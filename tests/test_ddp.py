"""Two-process DDP on the CPU (gloo, localhost): a tiny AHA model trains and the ranks stay in sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_two_process_ddp_trains_a_tiny_aha_model(tmp_path):
    port, world = free_port(), 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    r0, r1 = (json.loads(o.read_text()) for o in outs)
    assert r0["losses"][0] != r1["losses"][0]  # each rank trained on its own batch
    assert r0["params"] == r1["params"]  # gradients were all-reduced: the replicas agree exactly
    for r in (r0, r1):
        assert r["losses"][-1] < 0.7 * r["losses"][0]
        assert 0.0 <= r["all_share"] <= 1.0
