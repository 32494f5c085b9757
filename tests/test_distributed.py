"""Sharding under ``torchrun --nproc_per_node 2`` with the gloo backend (contract points 1-2).

The loader takes rank and world size from torch.distributed; the two ranks' points (read from a
``pid`` field, so the values themselves name the points) must be disjoint and cover the dataset,
and both ranks must take the same number of steps (each step all-reduces, so a mismatch hangs
and the subprocess timeout turns that into a failure).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_dataset

WORLD = 2
SCANS = [400, 0, 1, 250, 7, 0, 353]  # 1 011 points, 7 scans (two empty)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_shard_the_dataset(tmp_path):
    ds = make_dataset(tmp_path, SCANS)
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).with_name("_dist_worker.py")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(worker), str(ds.path), str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                           cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 120 s (a rank hung?)\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"

    res = [dict(np.load(out / f"rank{k}.npz")) for k in range(WORLD)]
    n, n_scans = sum(SCANS), len(SCANS)
    for mode in ("points", "scans", "points_drop_last"):
        for k, rr in enumerate(res):
            assert int(rr["world"]) == WORLD
            assert int(rr[f"{mode}_rank"]) == k and int(rr[f"{mode}_world"]) == WORLD, \
                "rank/world_size did not come from torch.distributed"
            assert int(rr[f"{mode}_steps"]) == int(rr[f"{mode}_len"]), f"{mode}: len != steps"
        steps = {int(rr[f"{mode}_steps"]) for rr in res}
        assert len(steps) == 1, f"{mode}: ranks took different numbers of steps {steps}"
        units, per_step = (n_scans, WORLD * 2) if mode == "scans" else (n, WORLD * 150)
        want = units // per_step if mode.endswith("drop_last") else -(-units // per_step)
        assert steps.pop() == want
        a, b = res[0][f"{mode}_pids"], res[1][f"{mode}_pids"]
        assert len(np.intersect1d(a, b)) == 0, f"{mode}: ranks share points"
        both = np.concatenate([a, b])
        assert len(np.unique(both)) == len(both), f"{mode}: a point was yielded twice"
        assert int(res[0][f"{mode}_reduced"][0]) == int(res[1][f"{mode}_reduced"][0]) \
            == len(both)
        if mode == "points_drop_last":
            assert n - len(both) == n % (WORLD * 150)
        else:
            assert np.array_equal(np.sort(both), np.arange(n)), f"{mode}: not every point"
    # shuffled: not file order on either rank
    assert not np.array_equal(res[0]["points_pids"], np.sort(res[0]["points_pids"]))
