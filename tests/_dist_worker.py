"""Run under ``torchrun --nproc_per_node N``: one shuffled epoch per mode on this rank.

Each rank joins a gloo process group, builds a loader *without* rank/world_size (they must come
from torch.distributed), iterates one shuffled epoch, all-reduces a tensor every step (a rank
with fewer steps would hang the others: the test's timeout catches that) and writes what it saw
to ``<out>/rank<r>.npz``: the ``pid`` values (point ids) of every batch, its step count,
``len(loader)``, the rank/world size the loader resolved and the all-reduced step sums.

Usage: _dist_worker.py DATASET OUT_DIR
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from gds_stream.backends import open_loader

MODES = {
    # 1 011 points over 2 ranks with 150-point batches: an uneven final step
    "points": dict(batch_points=150, shuffle=True, seed=7),
    "scans": dict(batch_scans=2, shuffle=True, seed=7),
    "points_drop_last": dict(batch_points=150, shuffle=True, seed=7, drop_last=True),
}


def main() -> int:
    data, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, np.ndarray] = {}
    for mode, opts in MODES.items():
        with open_loader(data, backend="fallback", device="cpu", **opts) as loader:
            loader.set_epoch(3)
            steps, pids = 0, []
            total = torch.zeros(1, dtype=torch.int64)
            for batch in loader:
                n = torch.tensor([batch["pid"].numel()], dtype=torch.int64)
                dist.all_reduce(n)  # every rank must reach every step
                total += n
                pids.append(batch["pid"].numpy().copy())
                steps += 1
            result[f"{mode}_pids"] = np.concatenate(pids) if pids else np.zeros(0, np.int64)
            result[f"{mode}_steps"] = np.array(steps)
            result[f"{mode}_len"] = np.array(len(loader))
            result[f"{mode}_rank"] = np.array(loader.options.rank)
            result[f"{mode}_world"] = np.array(loader.options.world_size)
            result[f"{mode}_reduced"] = total.numpy()
    dist.barrier()
    np.savez(os.path.join(out, f"rank{rank}.npz"), world=np.array(world), **result)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
