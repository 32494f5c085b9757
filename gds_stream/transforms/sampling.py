"""Transforms that select points: GridSample, SphereCrop, RandomDropout — per unit, batched.

Every field of the batch is gathered with the selected points and ``offset`` is rewritten; see
:func:`gds_stream.transforms._batch.gather` for which keys are per point.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LoaderError
from ._batch import (Batch, Units, check_range, gather, rand, segment_bbox, segment_reduce,
                     segment_select)
from .geometry import XYZ, Transform

#: FNV-1a 64-bit offset basis and prime, as int64 bit patterns (int64 arithmetic wraps).
_FNV_BASIS = 14695981039346656037 - (1 << 64)
_FNV_PRIME = 1099511628211
_INT64_MIN = -(1 << 63)


def fnv_hash(grid: torch.Tensor) -> torch.Tensor:
    """Pointcept's FNV64-1A of each row of non-negative int64 ``grid``, as int64 bits."""
    h = torch.full(grid.shape[:1], _FNV_BASIS, dtype=torch.int64, device=grid.device)
    for j in range(grid.shape[1]):
        h = torch.bitwise_xor(h * _FNV_PRIME, grid[:, j])
    return h


def _unit_hash_order(h: torch.Tensor, units: Units) -> torch.Tensor:
    """The stable order of the points by (unit, unsigned hash): a stable sort by hash, then a
    stable sort by unit on the narrowest integer type that holds the unit ids (a radix sort's
    cost grows with the key's bytes; uint8 sorts ~4x faster than int32 on a CPU). One int64 key
    cannot hold both: FNV-1a's last step XORs z into the low bits, so any truncation of the
    hash merges voxels that differ in z."""
    order = torch.sort(torch.bitwise_xor(h, _INT64_MIN), stable=True).indices
    if units.num > 1:
        dt = (torch.uint8 if units.num <= 256 else torch.int16 if units.num <= 1 << 15
              else torch.int32)
        by_unit = torch.sort(units.ids.to(dt).index_select(0, order), stable=True).indices
        order = order.index_select(0, by_unit)
    return order


class GridSample(Transform):
    """Voxelise each unit on a grid of edge ``grid_size``: voxel = floor(coord / grid_size) −
    the unit's minimum voxel.

    ``mode="train"`` keeps one uniformly random point of every occupied voxel of every unit
    (in the order of the voxels' keys); ``mode="test"`` returns a *list* of batches, Pointcept's
    parts: part i takes the (i mod count)-th point of every voxel (points of a voxel in their
    batch order) of every unit that has a voxel of more than i points — the other units are
    empty in that part — and adds ``index`` (int64, each point's position in the input batch).

    ``hash``: ``"fnv"`` (Pointcept's default: voxels ordered by their FNV-1a hash) or ``"ravel"``
    (ordered by x, then y, then z; the unit id and the voxel packed in one int64 sort key).
    ``return_grid_coord`` adds ``grid_coord`` (int64 (n, 3), per unit from 0);
    ``return_inverse`` adds ``inverse``: for every input point, the row of its voxel in the output
    (train mode), or the voxel's number counted over all units (test mode).
    """

    def __init__(self, grid_size: float = 0.05, hash: str = "fnv", mode: str = "train",
                 return_inverse: bool = False, return_grid_coord: bool = False,
                 coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        check_range(self.who, "grid_size", grid_size, 0, lo_open=True)
        if hash not in ("fnv", "ravel"):
            raise LoaderError(f"{self.who}: hash must be 'fnv' or 'ravel', got {hash!r}")
        if mode not in ("train", "test"):
            raise LoaderError(f"{self.who}: mode must be 'train' or 'test', got {mode!r}")
        self.grid_size = float(grid_size)
        self.hash, self.mode = hash, mode
        self.return_inverse, self.return_grid_coord = bool(return_inverse), bool(return_grid_coord)

    def _voxels(self, batch: Batch):
        """(grid, units, order, first, vstart, vcount): points sorted by (unit, voxel key)."""
        xyz, units = self._setup(batch)
        dev, n = xyz.device, units.n
        # min of floor(c / g) is floor(min c / g): the per-unit minimum on the floats
        lo = torch.floor(segment_bbox(xyz, units)[0].to(torch.float64) / self.grid_size)
        grid = torch.floor_(xyz.to(torch.float64) / self.grid_size).to(torch.int64).sub_(
            units.expand(lo.to(torch.int64)))
        if n == 0:
            order = torch.zeros(0, dtype=torch.int64, device=dev)
            first = torch.zeros(0, dtype=torch.bool, device=dev)
        elif self.hash == "ravel":
            dims = [int(d) + 1 for d in grid.max(0).values.tolist()]
            if units.num * dims[0] * dims[1] * dims[2] >= (1 << 63):
                raise LoaderError(f"{self.who}: grid_size {self.grid_size} is too fine for "
                                  f"units this large ({dims} voxels) with hash='ravel'; "
                                  f"use hash='fnv'")
            key = ((units.ids * dims[0] + grid[:, 0]) * dims[1] + grid[:, 1]) * dims[2] \
                + grid[:, 2]
            skey, order = torch.sort(key, stable=True)
            first = torch.ones(n, dtype=torch.bool, device=dev)
            first[1:] = skey[1:] != skey[:-1]
        else:
            h = fnv_hash(grid)
            order = _unit_hash_order(h, units)
            hs, us = h.index_select(0, order), units.ids   # by unit: units keep their ranges
            first = torch.ones(n, dtype=torch.bool, device=dev)
            first[1:] = (hs[1:] != hs[:-1]) | (us[1:] != us[:-1])
        vstart = torch.nonzero(first).flatten()
        vcount = torch.diff(vstart, append=vstart.new_full((1,), n))
        return grid, units, order, first, vstart, vcount

    def __call__(self, batch: Batch, generator: torch.Generator | None = None):
        grid, units, order, first, vstart, vcount = self._voxels(batch)
        dev, n = grid.device, units.n
        vunit = units.ids.index_select(0, vstart) if n else vstart
        per_unit = torch.bincount(vunit, minlength=units.num)
        inverse = None
        if self.return_inverse:
            inverse = torch.empty(n, dtype=torch.int64, device=dev)
            inverse[order] = torch.cumsum(first.to(torch.int64), 0) - 1
        if self.mode == "train":
            r = rand(vstart.shape[0], generator, dev)
            pick = vstart + torch.minimum((r * vcount).to(torch.int64), vcount - 1)
            return self._out(batch, order.index_select(0, pick), per_unit, grid, units,
                             inverse)
        # test mode: Pointcept's parts, a Python loop over parts (the largest voxel's count)
        vmax = segment_reduce(vcount, vunit, units.num, "amax")
        parts = []
        for i in range(int(vcount.max()) if n else 1):
            take = vmax[vunit] > i
            idx = order[(vstart + i % vcount)[take]]
            part = self._out(batch, idx, torch.where(vmax > i, per_unit, 0), grid, units, inverse)
            part["index"] = idx
            parts.append(part)
        return parts

    def _out(self, batch, idx, counts, grid, units, inverse) -> Batch:
        out = gather(batch, idx, counts, units.n, units)
        if self.return_grid_coord:
            out["grid_coord"] = grid.index_select(0, idx)
        if inverse is not None:
            out["inverse"] = inverse
        return out


class SphereCrop(Transform):
    """Per unit of more than ``point_max`` points (or ``int(sample_rate × n)`` when given), keep
    the ``point_max`` points nearest to a random point of the unit (``mode="random"``) or to its
    middle-index point (``"center"``), nearest first; smaller units are unchanged."""

    def __init__(self, point_max: int = 80000, sample_rate: float | None = None,
                 mode: str = "random", coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        if isinstance(point_max, bool) or not isinstance(point_max, int) or point_max < 1:
            raise LoaderError(f"{self.who}: point_max must be an integer >= 1, got {point_max!r}")
        if sample_rate is not None:
            check_range(self.who, "sample_rate", sample_rate, 0, 1)
        if mode not in ("random", "center"):
            raise LoaderError(f"{self.who}: mode must be 'random' or 'center', got {mode!r}")
        self.point_max, self.mode = point_max, mode
        self.sample_rate = None if sample_rate is None else float(sample_rate)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, units = self._setup(batch)
        dev, counts = xyz.device, units.counts
        if self.sample_rate is not None:
            limit = torch.floor(self.sample_rate * counts.to(torch.float64)).to(torch.int64)
        else:
            limit = torch.full_like(counts, self.point_max)
        if self.mode == "random":
            r = rand(units.num, generator, dev)
            local = torch.minimum((r * counts).to(torch.int64), (counts - 1).clamp(min=0))
        else:
            local = counts // 2
        crop = counts > limit
        if not bool(crop.any()):
            return batch
        center = xyz[(units.starts + local).clamp(max=max(units.n - 1, 0))]
        d = xyz - units.expand(center)
        dist = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2]
        position = torch.arange(units.n, device=dev) - units.expand(units.starts)
        cropped = units.expand(crop)
        if dist.dtype == torch.float32:  # non-negative float32: its bits sort as the value
            key = torch.where(cropped, dist.view(torch.int32).to(torch.int64), position)
        else:
            key = torch.where(cropped, dist, position.to(torch.float64))
        keep = torch.where(crop, limit, counts)
        return gather(batch, segment_select(units, key, keep), keep, units.n, units)


class RandomDropout(Transform):
    """Per unit with probability ``dropout_application_ratio``, keep ``int(n × (1 −
    dropout_ratio))`` of its points, chosen uniformly without replacement (in random order)."""

    def __init__(self, dropout_ratio: float = 0.2, dropout_application_ratio: float = 0.5,
                 coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        check_range(self.who, "dropout_ratio", dropout_ratio, 0, 1)
        check_range(self.who, "dropout_application_ratio", dropout_application_ratio, 0, 1)
        self.dropout_ratio = float(dropout_ratio)
        self.dropout_application_ratio = float(dropout_application_ratio)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        n = int(batch[self.coord[0]].shape[0]) if self.coord[0] in batch else None
        if n is None:
            self._setup(batch)  # raises the missing-field error
        units = Units(batch, n, batch[self.coord[0]].device, self.who)
        dev, counts = units.device, units.counts
        apply = rand(units.num, generator, dev) < self.dropout_application_ratio
        key = torch.randint(0, 1 << 31, (n,), generator=generator, device=dev)
        if not bool(apply.any()):
            return batch
        position = torch.arange(n, device=dev) - units.expand(units.starts)
        key = torch.where(units.expand(apply), key, position)
        keep = torch.where(apply, torch.floor(counts.to(torch.float64)
                                              * (1 - self.dropout_ratio)).to(torch.int64), counts)
        return gather(batch, segment_select(units, key, keep), keep, n, units)
