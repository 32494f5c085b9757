"""The planner: which points go into which batch, for every epoch, rank and option. Pure, no I/O.

Everything that can be wrong about ordering, sharding, epochs and resume lives here, so both
backends execute the same plan and the contract is tested on the CPU.

Units are points (``batch_points``) or whole scans (``batch_scans``). An epoch's *stream* is the
sequence of units in epoch order:

* ``shuffle=False``: file order;
* ``shuffle=True``, points: blocks of ``block_points`` consecutive points (each field's block at
  least 1 MiB and 4 KiB-aligned) in a permutation drawn from ``(seed, epoch)``; the points of
  each batch are then permuted on the device (:meth:`BatchPlan.permutation`);
* ``shuffle=True``, scans: the scans in a permutation drawn from ``(seed, epoch)``.

The stream is cut into batches and dealt to ranks so that every rank has the same number of
steps and the ranks' shares are disjoint and cover the dataset:

* ``drop_last=False``: ``steps = ceil(U / (W·B))``. The first ``steps-1`` steps are full batches
  dealt round-robin (batch ``s·W + r`` of the stream goes to rank ``r``); the remaining
  ``R = U - (steps-1)·W·B`` units are split as evenly as possible, rank ``r`` taking
  ``R//W + (r < R%W)`` of them for its last batch (empty only when ``R < W``).
* ``drop_last=True``: ``steps = U // (W·B)`` full batches each; the fewer than ``W·B`` units
  left over are dropped (the global final short batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .format import ALIGN, align_up

#: Every field read of a shuffled block is at least this large.
MIN_READ_BYTES = 1 << 20
_PERM_TAG = 0x9E3779B9  # separates the within-batch permutation streams from the epoch order


def shuffle_block_points(point_bytes: list[int]) -> int:
    """Points per shuffle block: the smallest field's block is ≥ 1 MiB, and every field's block
    starts 4 KiB-aligned (block_points is a multiple of 4096)."""
    smallest = min(point_bytes)
    return align_up(-(-MIN_READ_BYTES // smallest), ALIGN)


@dataclass(frozen=True)
class PlanSpec:
    """What the plan depends on. Same spec + same epoch ⇒ same batches, on any backend."""

    num_points: int
    scan_offsets: np.ndarray  # int64, num_scans + 1
    batch_size: int
    scan_mode: bool
    shuffle: bool
    seed: int
    drop_last: bool
    rank: int
    world_size: int
    block_points: int

    @property
    def num_units(self) -> int:
        return len(self.scan_offsets) - 1 if self.scan_mode else self.num_points

    def num_steps(self) -> int:
        """Batches per epoch on every rank."""
        u, wb = self.num_units, self.world_size * self.batch_size
        if self.drop_last:
            return u // wb
        return -(-u // wb)


@dataclass(frozen=True)
class BatchPlan:
    """One batch: ordered point ranges of the file, concatenated in this order."""

    step: int
    epoch: int
    segments: np.ndarray  # (k, 2) int64 [start, stop) in file order, concatenated in row order
    scan_sizes: np.ndarray | None  # scan mode: points of each scan in the batch, in order
    perm_key: tuple[int, ...] | None  # points mode + shuffle: seeds the within-batch permutation

    @cached_property
    def num_points(self) -> int:
        return int((self.segments[:, 1] - self.segments[:, 0]).sum()) if len(self.segments) else 0

    def offsets(self) -> np.ndarray | None:
        """Scan mode: int64 cumulative ends of the scans (Pointcept's ``offset``)."""
        if self.scan_sizes is None:
            return None
        return np.cumsum(self.scan_sizes, dtype=np.int64)

    def permutation(self) -> np.ndarray | None:
        """The within-batch point permutation (int32), or None when points keep stream order."""
        if self.perm_key is None:
            return None
        rng = np.random.default_rng(list(self.perm_key))
        return rng.permutation(self.num_points).astype(np.int32, copy=False)

    def point_indices(self) -> np.ndarray:
        """Dataset point index of every row of the batch, after the permutation (for tests)."""
        idx = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.segments]) \
            if len(self.segments) else np.zeros(0, dtype=np.int64)
        perm = self.permutation()
        return idx if perm is None else idx[perm]


class EpochPlan:
    """The batches of one epoch for one rank."""

    def __init__(self, spec: PlanSpec, epoch: int):
        self.spec = spec
        self.epoch = epoch
        self.num_batches = spec.num_steps()
        s = spec
        if s.scan_mode:
            sizes = np.diff(s.scan_offsets)
            order = (np.random.default_rng([s.seed, epoch, 1]).permutation(len(sizes))
                     if s.shuffle else np.arange(len(sizes)))
            self._order = order.astype(np.int64)
            self._unit_sizes = sizes[self._order]
        else:
            n, bp = s.num_points, s.block_points
            nblocks = -(-n // bp)
            order = (np.random.default_rng([s.seed, epoch]).permutation(nblocks)
                     if s.shuffle else np.arange(nblocks))
            starts = order.astype(np.int64) * bp
            stops = np.minimum(starts + bp, n)
            self._block_starts = starts
            self._block_cum = np.concatenate([[0], np.cumsum(stops - starts)])

    def unit_range(self, step: int) -> tuple[int, int]:
        """The stream units ``[a, b)`` of this rank's batch ``step``."""
        s = self.spec
        if not 0 <= step < self.num_batches:
            raise IndexError(f"step {step} outside 0..{self.num_batches - 1}")
        w, r, b = s.world_size, s.rank, s.batch_size
        if s.drop_last or step < self.num_batches - 1:
            a = (step * w + r) * b
            return a, a + b
        tail = (self.num_batches - 1) * w * b
        rem = s.num_units - tail
        q, m = divmod(rem, w)
        a = tail + r * q + min(r, m)
        return a, a + q + (1 if r < m else 0)

    def batch(self, step: int) -> BatchPlan:
        a, b = self.unit_range(step)
        s = self.spec
        if s.scan_mode:
            scans = self._order[a:b]
            starts = s.scan_offsets[scans]
            stops = s.scan_offsets[scans + 1]
            return BatchPlan(step, self.epoch, _merge(starts, stops), stops - starts, None)
        if not s.shuffle:
            return BatchPlan(step, self.epoch, np.array([[a, b]], dtype=np.int64), None, None)
        cum = self._block_cum
        first = int(np.searchsorted(cum, a, side="right")) - 1
        last = int(np.searchsorted(cum, b, side="left"))  # exclusive block index
        starts = self._block_starts[first:last].copy()
        lens = cum[first + 1:last + 1] - cum[first:last]
        stops = starts + lens
        if len(starts):
            starts[0] += a - cum[first]
            stops[-1] -= cum[last] - b
        key = (s.seed, self.epoch, a, _PERM_TAG)
        return BatchPlan(step, self.epoch, _merge(starts, stops), None, key)

    def max_batch_points(self) -> int:
        """The largest batch of this epoch, in points (sizes the host ring's slots)."""
        if self.num_batches == 0:
            return 0
        if not self.spec.scan_mode:
            return max(self.batch(i).num_points for i in {0, self.num_batches - 1})
        cum = np.concatenate([[0], np.cumsum(self._unit_sizes)])
        ranges = np.array([self.unit_range(i) for i in range(self.num_batches)], dtype=np.int64)
        return int((cum[ranges[:, 1]] - cum[ranges[:, 0]]).max())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return (self.batch(i) for i in range(self.num_batches))


def _merge(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Ranges as (k, 2), consecutive ones fused and empty ones dropped (order kept)."""
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    brk = np.nonzero(starts[1:] != stops[:-1])[0] + 1
    first = np.concatenate([[0], brk])
    last = np.concatenate([brk - 1, [len(starts) - 1]])
    return np.stack([starts[first], stops[last]], axis=1).astype(np.int64)
