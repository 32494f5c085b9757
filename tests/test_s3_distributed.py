"""torchrun with 2 ranks (gloo) from one s3:// dataset and one shared block cache: exactly once
across ranks, equal steps, resumed mid-epoch from ``state_dict()`` (issue 19)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_dataset
from s3_fixtures import bucket, s3_server, upload  # noqa: F401

WORLD = 2
SCANS = [40_000, 0, 75_000, 31_000]  # 146 000 points


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_from_one_bucket_with_resume(tmp_path, bucket):
    ds = make_dataset(tmp_path, SCANS)
    url = f"s3://{bucket}/dist"
    upload(ds.path, url)
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).with_name("_s3_dist_worker.py")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(worker), url, str(tmp_path / "cache"), str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env,
                           cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 180 s (a rank hung?)\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
    res = [dict(np.load(out / f"rank{k}.npz")) for k in range(WORLD)]
    steps = {int(rr["steps"]) for rr in res}
    assert len(steps) == 1 and steps.pop() == int(res[0]["len"]), "unequal steps across ranks"
    assert all(int(rr["state_epoch"]) == 1 and int(rr["state_done"]) == 3 for rr in res)
    a, b = res[0]["pids"], res[1]["pids"]
    assert len(np.intersect1d(a, b)) == 0, "ranks share points"
    both = np.concatenate([a, b])
    assert np.array_equal(np.sort(both), np.arange(sum(SCANS))), "not every point exactly once"
