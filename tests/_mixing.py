"""How well a shuffled points plan mixes: over two epochs, the fraction of point pairs that share
a batch both times, as a multiple of a full random permutation's ((B-1)/(N-1))².

    python tests/_mixing.py N BATCH_POINTS BLOCK_POINTS WINDOW [SEED]

Pure planner work (no dataset, no I/O); the figures in the README's "Shuffle windows" come from
it. ``tests/test_plan.py`` checks the same metric on a small plan.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gds_stream.plan import EpochPlan, PlanSpec  # noqa: E402


def pairs_shared(a: list[np.ndarray], b: list[np.ndarray], n: int) -> float:
    """Fraction of point pairs that share a batch in both epochs ``a`` and ``b``."""
    ida, idb = np.empty(n, np.int64), np.empty(n, np.int64)
    for k, idx in enumerate(a):
        ida[idx] = k
    for k, idx in enumerate(b):
        idb[idx] = k
    _, counts = np.unique(ida * len(b) + idb, return_counts=True)
    return float((counts * (counts - 1) // 2).sum()) / (n * (n - 1) // 2)


def mixing(n: int, batch: int, block: int, window: int, seed: int = 3) -> float:
    spec = PlanSpec(num_points=n, scan_offsets=np.array([0, n], dtype=np.int64),
                    batch_size=batch, scan_mode=False, shuffle=True, seed=seed, drop_last=False,
                    rank=0, world_size=1, block_points=block, shuffle_window=window)

    def batches(epoch: int) -> list[np.ndarray]:
        p = EpochPlan(spec, epoch)
        return [p.batch(i).point_indices() for i in range(p.num_batches)]

    return pairs_shared(batches(0), batches(1), n) / ((batch - 1) / (n - 1)) ** 2


if __name__ == "__main__":
    args = [int(float(a)) for a in sys.argv[1:6]]
    print(f"{mixing(*args):.2f}x a random permutation")
