"""Run under ``torchrun --nproc_per_node N``: ranks train from one s3:// dataset, with resume.

Each rank opens the dataset from the URL (endpoint from ``AWS_ENDPOINT_URL``) with one block
cache directory shared by all ranks, reads ``STOP`` steps of epoch 1, saves ``state_dict()``,
closes, resumes in a new loader and finishes the epoch, all-reducing every step (unequal step
counts would hang; the test's timeout catches that). Writes the ``pid`` values it saw.

Usage: _s3_dist_worker.py URL CACHE_DIR OUT_DIR
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import gds_stream

OPTS = dict(backend="fallback", device="cpu", fields=["pid"], batch_points=15_000, shuffle=True,
            seed=4, shuffle_window=30_000)
STOP = 3


def _steps(loader, pids, limit=None):
    n = 0
    for batch in loader:
        t = torch.tensor([batch["pid"].numel()], dtype=torch.int64)
        dist.all_reduce(t)
        pids.append(batch["pid"].numpy().copy())
        n += 1
        if limit is not None and n == limit:
            break
    return n


def main() -> int:
    url, cdir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = gds_stream.open_dataset(url, cache_dir=cdir, cache_bytes=64 << 20)
    pids: list[np.ndarray] = []
    with gds_stream.open_loader(ds, **OPTS) as ld:
        ld.set_epoch(1)
        first = _steps(ld, pids, STOP)
        state = ld.state_dict()
        total = len(ld)
    with gds_stream.open_loader(ds, **OPTS) as ld:
        ld.load_state_dict(state)
        rest = _steps(ld, pids)
    dist.barrier()
    np.savez(os.path.join(out, f"rank{rank}.npz"), pids=np.concatenate(pids),
             steps=np.array(first + rest), len=np.array(total),
             state_epoch=np.array(state["epoch"]), state_done=np.array(state["batches_done"]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
