"""The planner: which points go into which batch, for every epoch, rank and option. Pure, no I/O.

Everything that can be wrong about ordering, sharding, epochs and resume lives here, so both
backends execute the same plan and the contract is tested on the CPU.

Units are points (``batch_points``) or whole contiguous units — scans (``batch_scans``) or
spatial chunks (``batch_chunks``), given by their offsets. An epoch's *stream* is the sequence of
units in epoch order:

* ``shuffle=False``: file order;
* ``shuffle=True``, points: blocks of ``block_points`` consecutive points (each field's block at
  least 1 MiB and 4 KiB-aligned) in a permutation drawn from ``(seed, epoch)``; the points of
  each batch are then permuted on the device (:meth:`BatchPlan.permutation`);
* ``shuffle=True``, scans or chunks: the units in a permutation drawn from ``(seed, epoch)``.

With ``shuffle_window`` (points mode, shuffle on) a rank's batches are cut from *windows*: the
steps are grouped ``k = shuffle_window // batch`` at a time, each rank takes one contiguous span of
the stream for the steps of a window (so it reads large ranges), and the points of that span are
permuted as a whole, so what shares a batch changes from epoch to epoch even inside one block.
With ``max_batch_points`` (unit modes) the units are packed in stream order into batches of at
most ``batch_size`` units and ``max_batch_points`` points (a larger unit is a batch alone) and the
packed batches are dealt round-robin; the step count then depends on the epoch.

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

import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .format import ALIGN, align_up

#: Every field read of a shuffled block is at least this large.
MIN_READ_BYTES = 1 << 20
_PERM_TAG = 0x9E3779B9  # separates the within-batch permutation streams from the epoch order
_WINDOW_TAG = 0x85EBCA6B  # separates the window permutation streams


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
    #: Points mode + shuffle: points permuted together (0: only within each batch).
    shuffle_window: int = 0
    #: Unit modes: pack units into batches of at most this many points (None: ``batch_size``
    #: units a batch).
    max_batch_points: int | None = None

    @property
    def num_units(self) -> int:
        return len(self.scan_offsets) - 1 if self.scan_mode else self.num_points

    @property
    def windowed(self) -> bool:
        return (not self.scan_mode and self.shuffle and self.shuffle_window > 0
                and self.num_points > 0)

    @property
    def packed(self) -> bool:
        return self.scan_mode and self.max_batch_points is not None

    @property
    def window_steps(self) -> int:
        """Steps per window (windowed plans)."""
        return max(1, self.shuffle_window // self.batch_size)

    def num_steps(self, epoch: int = 0) -> int:
        """Batches per epoch on every rank (depends on ``epoch`` only for packed plans)."""
        if self.packed:
            return EpochPlan(self, epoch).num_batches
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
    scan_sizes: np.ndarray | None  # unit modes: points of each unit in the batch, in order
    perm_key: tuple[int, ...] | None  # points mode + shuffle: seeds the within-batch permutation
    units: np.ndarray | None = None  # unit modes: the ids of the batch's units, in order
    #: Windowed plans: the window this batch is cut from, and the rows of the window (in its
    #: segment order) that make the batch, in batch order. ``segments`` are then the window's.
    window: "WindowPlan | None" = None
    rows: np.ndarray | None = None

    @cached_property
    def num_points(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        segs = self.segments
        if len(segs) <= 8:  # a few ranges (file order): Python's sum beats numpy's reduction
            return sum(b - a for a, b in segs.tolist())
        return int((segs[:, 1] - segs[:, 0]).sum())

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
        idx = _indices(self.segments)
        if self.rows is not None:
            return idx[self.rows]
        perm = self.permutation()
        return idx if perm is None else idx[perm]


@dataclass(frozen=True)
class WindowPlan:
    """One window of a windowed plan: the point ranges read together (stream order) and the
    steps whose batches are cut from them."""

    index: int
    epoch: int
    segments: np.ndarray  # (k, 2) int64, in stream order
    first_step: int
    stop_step: int

    @cached_property
    def num_points(self) -> int:
        return int((self.segments[:, 1] - self.segments[:, 0]).sum()) if len(self.segments) else 0

    def as_batch(self) -> BatchPlan:
        """The window as a plain batch (its points in segment order), for a backend to read."""
        return BatchPlan(self.first_step, self.epoch, self.segments, None, None)


def _indices(segments: np.ndarray) -> np.ndarray:
    if len(segments) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segments])


class EpochPlan:
    """The batches of one epoch for one rank."""

    def __init__(self, spec: PlanSpec, epoch: int):
        self.spec = spec
        self.epoch = epoch
        s = spec
        self._bins: np.ndarray | None = None
        if s.scan_mode:
            sizes = np.diff(s.scan_offsets)
            order = (np.random.default_rng([s.seed, epoch, 1]).permutation(len(sizes))
                     if s.shuffle else np.arange(len(sizes)))
            self._order = order.astype(np.int64)
            self._unit_sizes = sizes[self._order]
            if s.packed:
                assert s.max_batch_points is not None
                self._bins = _pack(self._unit_sizes, s.batch_size, s.max_batch_points)
                nbins, w = len(self._bins) - 1, s.world_size
                self.num_batches = nbins // w if s.drop_last else -(-nbins // w)
            else:
                self.num_batches = s.num_steps()
        else:
            self.num_batches = s.num_steps()
            n, bp = s.num_points, s.block_points
            nblocks = -(-n // bp)
            order = (np.random.default_rng([s.seed, epoch]).permutation(nblocks)
                     if s.shuffle else np.arange(nblocks))
            starts = order.astype(np.int64) * bp
            stops = np.minimum(starts + bp, n)
            self._block_starts = starts
            self._block_cum = np.concatenate([[0], np.cumsum(stops - starts)])
        self._windows: dict[int, tuple[WindowPlan, _Permutation]] = {}

    # -- points: sizes and stream ranges ------------------------------------------------------
    def step_points(self, step: int, rank: int | None = None) -> int:
        """Units of ``rank``'s (default: this rank's) batch ``step`` (points or scans mode)."""
        s = self.spec
        r = s.rank if rank is None else rank
        w, b = s.world_size, s.batch_size
        if s.drop_last or step < self.num_batches - 1:
            return b
        rem = s.num_units - (self.num_batches - 1) * w * b
        q, m = divmod(rem, w)
        return q + (1 if r < m else 0)

    def unit_range(self, step: int) -> tuple[int, int]:
        """The stream units ``[a, b)`` of this rank's batch ``step`` (unwindowed plans)."""
        s = self.spec
        if not 0 <= step < self.num_batches:
            raise IndexError(f"step {step} outside 0..{self.num_batches - 1}")
        w, r, b = s.world_size, s.rank, s.batch_size
        if self._bins is not None:
            k = step * w + r
            if k >= len(self._bins) - 1:
                end = int(self._bins[-1])
                return end, end
            return int(self._bins[k]), int(self._bins[k + 1])
        if s.drop_last or step < self.num_batches - 1:
            a = (step * w + r) * b
            return a, a + b
        tail = (self.num_batches - 1) * w * b
        rem = s.num_units - tail
        q, m = divmod(rem, w)
        a = tail + r * q + min(r, m)
        return a, a + q + (1 if r < m else 0)

    def _stream_segments(self, a: int, b: int) -> np.ndarray:
        """File ranges of the shuffled points stream ``[a, b)``, in stream order."""
        cum = self._block_cum
        first = int(np.searchsorted(cum, a, side="right")) - 1
        last = int(np.searchsorted(cum, b, side="left"))  # exclusive block index
        starts = self._block_starts[first:last].copy()
        lens = cum[first + 1:last + 1] - cum[first:last]
        stops = starts + lens
        if len(starts):
            starts[0] += a - cum[first]
            stops[-1] -= cum[last] - b
        return _merge(starts, stops)

    # -- windows ------------------------------------------------------------------------------
    def window_index(self, step: int) -> int:
        return step // self.spec.window_steps

    def window(self, index: int) -> tuple[WindowPlan, np.ndarray]:
        """Window ``index`` of this rank and the permutation of its points (cached: the last
        two windows asked for)."""
        win, perm = self._window_entry(index)
        return win, perm.result()

    def window_plan(self, index: int) -> WindowPlan:
        """Window ``index``'s ranges, without waiting for its permutation: that is drawn on a
        thread of its own meanwhile (the backend reads the window ahead of its use; the
        permutation is ready by the time its first batch is cut)."""
        return self._window_entry(index)[0]

    def join(self) -> None:
        """Wait for every permutation still being drawn (a loader's ``close()`` joins what it
        started)."""
        for _, perm in list(self._windows.values()):
            perm.join()

    def forget_window(self, index: int) -> None:
        """Drop window ``index``'s cached permutation (its batches are all cut)."""
        self._windows.pop(index, None)

    def _window_entry(self, index: int) -> tuple[WindowPlan, "_Permutation"]:
        got = self._windows.get(index)
        if got is not None:
            return got
        s = self.spec
        k, wb = s.window_steps, s.world_size * s.batch_size
        first, stop = index * k, min((index + 1) * k, self.num_batches)
        if not 0 <= first < self.num_batches:
            raise IndexError(f"window {index} outside this epoch's {self.num_batches} steps")
        lengths = [sum(self.step_points(t, r) for t in range(first, stop))
                   for r in range(s.world_size)]
        a = first * wb + sum(lengths[:s.rank])  # every step before this window is full
        b = a + lengths[s.rank]
        seg = self._stream_segments(a, b) if b > a else np.zeros((0, 2), dtype=np.int64)
        perm = _Permutation(b - a, [s.seed, self.epoch, index, s.rank, _WINDOW_TAG])
        win = WindowPlan(index, self.epoch, seg, first, stop)
        if len(self._windows) >= 2:
            self._windows.pop(next(iter(self._windows)))
        self._windows[index] = (win, perm)
        return win, perm

    # -- batches ------------------------------------------------------------------------------
    def batch(self, step: int) -> BatchPlan:
        s = self.spec
        if s.windowed:
            if not 0 <= step < self.num_batches:
                raise IndexError(f"step {step} outside 0..{self.num_batches - 1}")
            win, perm = self.window(self.window_index(step))
            o = (step - win.first_step) * s.batch_size  # earlier steps of a window are full
            rows = perm[o:o + self.step_points(step)]
            return BatchPlan(step, self.epoch, win.segments, None, None, window=win, rows=rows)
        a, b = self.unit_range(step)
        if s.scan_mode:
            scans = self._order[a:b]
            starts = s.scan_offsets[scans]
            stops = s.scan_offsets[scans + 1]
            return BatchPlan(step, self.epoch, _merge(starts, stops), stops - starts, None,
                             units=scans)
        if not s.shuffle:
            return BatchPlan(step, self.epoch, np.array([[a, b]], dtype=np.int64), None, None)
        key = (s.seed, self.epoch, a, _PERM_TAG)
        return BatchPlan(step, self.epoch, self._stream_segments(a, b), None, key)

    def max_batch_points(self) -> int:
        """The largest batch of this epoch, in points (sizes the host ring's slots)."""
        if self.num_batches == 0:
            return 0
        if not self.spec.scan_mode:
            return max(self.step_points(i) for i in {0, self.num_batches - 1})
        cum = np.concatenate([[0], np.cumsum(self._unit_sizes)])
        ranges = np.array([self.unit_range(i) for i in range(self.num_batches)], dtype=np.int64)
        return int((cum[ranges[:, 1]] - cum[ranges[:, 0]]).max())

    def max_window_points(self) -> int:
        """The largest window of this epoch, in points (windowed plans)."""
        s = self.spec
        k = s.window_steps
        nwin = -(-self.num_batches // k)
        return max((sum(self.step_points(t) for t in range(i * k, min((i + 1) * k,
                                                                        self.num_batches)))
                    for i in {0, nwin - 1}), default=0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return (self.batch(i) for i in range(self.num_batches))


def _permutation(n: int, key: list[int]) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` drawn from ``key`` (int32 below 2³¹).

    torch's CPU ``randperm`` into int32 is a Fisher–Yates shuffle about twice as fast as numpy's
    on millions of rows (it moves 4-byte items); its generator is seeded from ``key`` through
    numpy's SeedSequence, so the same key gives the same permutation on every backend and
    device."""
    import torch

    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=gen, dtype=dtype).numpy()


#: Windows of fewer rows draw their permutation at once, not on a thread.
_THREAD_ROWS = 1 << 16


class _Permutation:
    """A window's row permutation, drawn on a thread of its own (``randperm`` runs without
    the GIL) so that drawing it overlaps the batches of the window before; ``result()`` waits
    for it. Large windows only; the thread holds nothing but its own result."""

    __slots__ = ("_n", "_key", "_value", "_error", "_thread")

    def __init__(self, n: int, key: list[int]):
        self._n, self._key = n, key
        self._value: np.ndarray | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if n >= _THREAD_ROWS:
            # not a daemon: the interpreter waits for it at exit (a fraction of a second) —
            # a daemon thread still inside torch when the process tears down aborts it
            self._thread = threading.Thread(target=self._draw, name="gds-stream-permutation")
            self._thread.start()

    def _draw(self) -> None:
        try:
            self._value = _permutation(self._n, self._key)
        except BaseException as exc:  # handed to result(), on the thread that needs it
            self._error = exc

    def join(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()

    def result(self) -> np.ndarray:
        if self._thread is not None:
            self.join()
            self._thread = None
        elif self._value is None and self._error is None:
            self._draw()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def _pack(sizes: np.ndarray, max_units: int, max_points: int) -> np.ndarray:
    """Bin boundaries (indices into ``sizes``) packing units in order: at most ``max_units``
    units and ``max_points`` points a bin; a unit larger than ``max_points`` is a bin alone."""
    bounds, n, k = [0], 0, 0
    for i, sz in enumerate(sizes.tolist()):
        if k and (k == max_units or n + sz > max_points):
            bounds.append(i)
            n, k = 0, 0
        n += sz
        k += 1
    if len(sizes):
        bounds.append(len(sizes))
    return np.asarray(bounds, dtype=np.int64)


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
