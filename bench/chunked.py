"""Spatial-chunk mode of the benchmark: which points every loader reads, batch by batch.

Owns: :class:`ChunkPlanner`, the one source of the chunk order — the library's own plan
(``open_loader(..., batch_chunks=K).epoch_plan(epoch).batch(i).segments``), so the baselines read
the same chunks in the same order as gds-stream's loaders — and the per-loader epoch counters
(:class:`ChunkOrder`): the i-th epoch a loader runs reads the plan of epoch i (with ``--shuffle``
each epoch is a new order, the same for every loader). :class:`PointOrder` is the point mode's
fixed file-order batches behind the same interface. The loaders themselves are in ``variants``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from bench.backbone import FIELDS


def check_chunk_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The command line's chunk-mode options, consistent or a usage error (exit 2)."""
    k, size = args.batch_chunks, args.chunk_size
    if k is not None and k < 1:
        p.error("--batch-chunks must be >= 1")
    if size is not None and not (math.isfinite(size) and size > 0):
        p.error("--chunk-size must be a finite number > 0 (metres)")
    if size is not None and k is None:
        p.error("--chunk-size chunks the generated dataset for --batch-chunks K; give both")
    if size is not None and args.dataset is not None:
        p.error("--chunk-size chunks a generated dataset; with --dataset, convert it with "
                "gds-stream convert --chunk-size instead")
    if k is not None and size is None and args.dataset is None:
        p.error("--batch-chunks needs a chunked dataset: --chunk-size S to generate one, or a "
                "chunked --dataset")
    if k is not None and args.batch_points is not None:
        p.error("--batch-points and --batch-chunks are two batch modes; give one")


def add_chunk_rates(summaries: Iterable[dict], num_chunks: int) -> None:
    """Chunks per second beside points per second, end-to-end and loader-only."""
    for row in summaries:
        for r in (row, row.get("loader_only")):
            if r and r.get("wall_s"):
                r["chunks_per_s"] = num_chunks / r["wall_s"]


class PointOrder:
    """Point mode: batch i is points ``[i·batch, (i+1)·batch)`` of the file, every epoch."""

    def __init__(self, num_points: int, batch: int):
        self._batches = [np.array([[a, min(a + batch, num_points)]], dtype=np.int64)
                         for a in range(0, num_points, batch)]

    def epoch_segments(self) -> list[np.ndarray]:
        """The (k, 2) int64 point ranges of every batch of the next epoch, in order."""
        return self._batches


@dataclass
class ChunkPlanner:
    """The library's chunk plan for one rank: ``batch_chunks`` whole chunks per batch."""

    path: Path
    batch_chunks: int
    shuffle: bool
    seed: int
    _cache: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from gds_stream import open_loader

        # Never iterated: it only plans (no reads, no threads).
        self._loader = open_loader(self.path, backend="fallback", device="cpu",
                                   batch_chunks=self.batch_chunks, fields=list(FIELDS),
                                   shuffle=self.shuffle, seed=self.seed, drop_last=False,
                                   rank=0, world_size=1)
        ds = self._loader.dataset
        self.num_chunks = ds.num_chunks
        sizes = np.diff(ds.chunk_offsets)
        self.chunk_points = (int(sizes.min()), int(np.median(sizes)), int(sizes.max()))

    def segments(self, epoch: int) -> list[np.ndarray]:
        """Epoch ``epoch``: for each batch, its point ranges in batch order (chunks that follow
        each other on disk fused into one range)."""
        got = self._cache.get(epoch)
        if got is None:
            plan = self._loader.epoch_plan(epoch)
            got = [plan.batch(i).segments for i in range(len(plan))]
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = got
        return got

    def units(self, epoch: int) -> list[np.ndarray]:
        """Epoch ``epoch``: the chunk ids of each batch, in order."""
        plan = self._loader.epoch_plan(epoch)
        return [plan.batch(i).units for i in range(len(plan))]

    def order(self) -> "ChunkOrder":
        return ChunkOrder(self)

    def close(self) -> None:
        self._loader.close()


class ChunkOrder:
    """One loader's walk through the epochs: the i-th call reads the plan of epoch i."""

    def __init__(self, planner: ChunkPlanner):
        self.planner = planner
        self.epoch = 0

    def next_epoch(self) -> int:
        e, self.epoch = self.epoch, self.epoch + 1
        return e

    def epoch_segments(self) -> list[np.ndarray]:
        return self.planner.segments(self.next_epoch())
