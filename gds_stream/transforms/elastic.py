"""ElasticDistortion, batched: every unit's noise grid in one flat tensor, no loop over units.

Pointcept's recipe, per unit and per (granularity, magnitude): a Gaussian noise grid of
``floor(extent / granularity) + 3`` cells per axis (3 channels) with its first cell one
granularity below the unit's minimum, smoothed twice by a 3-cell box filter along x, y and z
(zeros outside the grid), then sampled trilinearly at every point and added × magnitude. The
grids of all units (of different sizes) are laid end to end in one flat tensor; the box filter
reads each cell's neighbours through per-cell strides, so the cost is proportional to the cells
and points of the batch, whatever the number of units.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LoaderError
from ._batch import Batch, rand, segment_bbox, set_coord
from .geometry import XYZ, Transform

#: Pointcept applies the distortion to a sample with this probability.
APPLY_P = 0.95


class ElasticDistortion(Transform):
    """Pointcept's ElasticDistortion (default ``[[0.2, 0.4], [0.8, 1.6]]``: granularity and
    magnitude in coordinate units), applied to each unit with probability 0.95."""

    def __init__(self, distortion_params: Sequence[Sequence[float]] | None = None,
                 coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        params = [[0.2, 0.4], [0.8, 1.6]] if distortion_params is None else distortion_params
        try:
            self.distortion_params = [(float(g), float(m)) for g, m in params]
        except (TypeError, ValueError):
            raise LoaderError(f"{self.who}: distortion_params must be pairs (granularity, "
                              f"magnitude), got {distortion_params!r}") from None
        for g, m in self.distortion_params:
            if not (g > 0 and g < float("inf")) or m != m:
                raise LoaderError(f"{self.who}: distortion_params granularity must be > 0 and "
                                  f"magnitude a number, got ({g}, {m})")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, units = self._setup(batch)
        apply = rand(units.num, generator, xyz.device) < APPLY_P
        if units.n == 0 or not bool(apply.any()):
            return batch
        for granularity, magnitude in self.distortion_params:
            xyz = self._distort(xyz, units, apply, granularity, magnitude, generator)
        return set_coord(batch, self.coord, xyz)

    @staticmethod
    def _distort(xyz, units, apply, granularity, magnitude, generator):
        dev, u = xyz.device, units.num
        lo, hi = segment_bbox(xyz, units)
        dims = torch.div(hi - lo, granularity, rounding_mode="floor").to(torch.int64) + 3
        dims = torch.where(apply[:, None], dims, 0)              # skipped units: no grid
        cells = dims.prod(1)
        base = torch.cumsum(cells, 0) - cells
        total = int(cells.sum())
        noise = torch.randn((total, 3), generator=generator, device=dev, dtype=torch.float32)
        cunit = torch.repeat_interleave(torch.arange(u, device=dev), cells, output_size=total)
        local = torch.arange(total, device=dev) - base[cunit]
        d = dims[cunit]                                          # (cells, 3)
        strides = torch.stack([d[:, 1] * d[:, 2], d[:, 2], torch.ones_like(d[:, 2])], 1)
        pos = torch.stack([local // strides[:, 0], (local // d[:, 2]) % d[:, 1],
                           local % d[:, 2]], 1)
        cell = torch.arange(total, device=dev)
        for _ in range(2):
            for a in range(3):
                noise = _box3(noise, cell, strides[:, a], pos[:, a], d[:, a])
        # trilinear sampling: grid axis a runs from lo - granularity in steps of granularity
        ids = units.ids
        t = (xyz.to(torch.float64) - lo[ids].to(torch.float64)) / granularity + 1
        i0 = torch.minimum(torch.floor(t).to(torch.int64).clamp(min=0), dims[ids] - 2)
        w = (t - i0).to(torch.float32)
        s = torch.stack([dims[ids, 1] * dims[ids, 2], dims[ids, 2]], 1)
        cell0 = base[ids] + i0[:, 0] * s[:, 0] + i0[:, 1] * s[:, 1] + i0[:, 2]
        acc = torch.zeros((units.n, 3), dtype=torch.float32, device=dev)
        for cx in (0, 1):
            wx = w[:, 0] if cx else 1 - w[:, 0]
            for cy in (0, 1):
                wy = w[:, 1] if cy else 1 - w[:, 1]
                for cz in (0, 1):
                    wz = w[:, 2] if cz else 1 - w[:, 2]
                    at = (cell0 + cx * s[:, 0] + cy * s[:, 1] + cz).clamp_(0, total - 1)
                    acc += (wx * wy * wz)[:, None] * noise[at]
        on = apply[ids, None]                                   # skipped units: unchanged
        return torch.where(on, xyz + (acc * magnitude).to(xyz.dtype), xyz)


def _box3(x: torch.Tensor, cell: torch.Tensor, stride: torch.Tensor, pos: torch.Tensor,
          dim: torch.Tensor) -> torch.Tensor:
    """(x[i−1] + x[i] + x[i+1]) / 3 along one axis of every unit's grid, zero beyond its ends."""
    prev = x[(cell - stride).clamp(min=0)] * (pos > 0)[:, None]
    nxt = x[(cell + stride).clamp(max=max(len(cell) - 1, 0))] * (pos < dim - 1)[:, None]
    return (prev + x + nxt) / 3
