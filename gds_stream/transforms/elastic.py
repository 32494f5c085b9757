"""ElasticDistortion, batched: every unit's noise grid in one flat tensor, no loop over units.

Pointcept's recipe, per unit and per (granularity, magnitude): a Gaussian noise grid of
``floor(extent / granularity) + 3`` cells per axis (3 channels) with its first cell one
granularity below the unit's minimum, smoothed twice by a 3-cell box filter along x, y and z
(zeros outside the grid), then sampled trilinearly at every point and added × magnitude. The
grids of all units (of different sizes) are laid end to end in one flat tensor; the box filter
reads each cell's neighbours through per-cell strides, so the cost is proportional to the cells
and points of the batch, whatever the number of units. Units of similar extent (chunks) use the
faster layout: one (units, D0, D1, D2) block padded to the largest grid, filtered by slicing.
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
        total = int(cells.sum())
        dmax = dims.max(0).values.tolist()
        padded = u * dmax[0] * dmax[1] * dmax[2]
        if padded <= 2 * total + DENSE_SLACK:    # units of similar extent (chunks): one block
            noise, base, strides = _dense_noise(dims, dmax, generator, dev)
        else:                                    # very unequal units: grids end to end
            noise, base, strides = _flat_noise(dims, cells, total, generator, dev)
        # trilinear sampling, in blocks of points on a CPU (intermediates stay in cache)
        block = units.n if xyz.is_cuda else CPU_BLOCK
        acc = torch.cat([_interp(xyz[a:a + block], units.ids[a:a + block], lo, dims, base,
                                 strides, noise, granularity)
                         for a in range(0, units.n, block)])
        on = units.expand(apply)[:, None]                       # skipped units: unchanged
        return torch.where(on, xyz + (acc * magnitude).to(xyz.dtype), xyz)


#: Points per block of the trilinear sampling on a CPU.
CPU_BLOCK = 1 << 14


def _interp(xyz, ids, lo, dims, base, strides, noise, granularity):
    """Trilinear sample of ``noise`` at each point: grid axis a of a unit runs from its
    lo - granularity in steps of granularity; the 8 corners gathered at once."""
    t = (xyz - lo[ids]) / granularity + 1
    i0 = torch.minimum(torch.floor(t).to(torch.int64).clamp_(min=0), dims[ids] - 2)
    w = (t - i0).to(torch.float32)
    s = strides[ids]
    cell0 = base[ids] + i0[:, 0] * s[:, 0] + i0[:, 1] * s[:, 1] + i0[:, 2]
    cx, cy, cz = (torch.tensor(c, device=xyz.device) for c in _CORNERS)
    at = cell0[:, None] + s[:, :1] * cx + s[:, 1:] * cy + cz              # (n, 8)
    vals = noise.index_select(0, at.clamp_(0, noise.shape[0] - 1).view(-1))
    pair = torch.stack([1 - w, w], 2)                                      # (n, 3, 2)
    wts = (pair[:, 0, :, None, None] * pair[:, 1, None, :, None]
           * pair[:, 2, None, None, :]).reshape(-1, 8, 1)
    return (wts * vals.view(-1, 8, 3)).sum(1)


#: The 8 corners of a cell as (x, y, z) offsets, x slowest (the order of the weights' product).
_CORNERS = ((0, 0, 0, 0, 1, 1, 1, 1), (0, 0, 1, 1, 0, 0, 1, 1), (0, 1, 0, 1, 0, 1, 0, 1))

#: Extra cells a padded (U, D0, D1, D2) block may waste before grids are laid end to end.
DENSE_SLACK = 1 << 16


def _dense_noise(dims, dmax, generator, dev):
    """Every unit's grid padded to the largest dims: one (U, D0, D1, D2, 3) block, zero outside
    each unit's own grid. Along each axis the two box passes are one 5-tap filter
    [1, 2, 3, 2, 1] / 9 whose end cells lose x_end / 9 (the second pass sees zeros, not the first
    pass's spill, beyond the ends); filters along different axes commute, so x, x, y, y, z, z
    equals Pointcept's x, y, z, x, y, z."""
    u = dims.shape[0]
    noise = torch.randn((u, *dmax, 3), generator=generator, device=dev, dtype=torch.float32)
    masks, edges = [], []
    for a in range(3):
        shape = [u, 1, 1, 1, 1]
        shape[a + 1] = dmax[a]
        i = torch.arange(dmax[a], device=dev)[None, :]
        masks.append((i < dims[:, a:a + 1]).view(shape).to(torch.float32))
        edges.append(((i == 0) | (i == dims[:, a:a + 1] - 1)).view(shape).to(torch.float32))
    noise = noise * (masks[0] * masks[1] * masks[2])
    for a in range(3):
        ax, n = a + 1, noise.shape[a + 1]
        out = noise * 3
        for k, wgt in ((1, 2), (2, 1)):
            if n > k:
                out.narrow(ax, k, n - k).add_(noise.narrow(ax, 0, n - k), alpha=wgt)
                out.narrow(ax, 0, n - k).add_(noise.narrow(ax, k, n - k), alpha=wgt)
        noise = out.sub_(noise * edges[a]).mul_(masks[a] / 9)
    d1, d2 = dmax[1], dmax[2]
    base = torch.arange(u, device=dev, dtype=torch.int64) * (dmax[0] * d1 * d2)
    strides = torch.tensor([[d1 * d2, d2]], device=dev, dtype=torch.int64).repeat(u, 1)
    return noise.reshape(-1, 3), base, strides


def _flat_noise(dims, cells, total, generator, dev):
    """Every unit's grid end to end in one flat (cells, 3) tensor; neighbours through per-cell
    strides."""
    u = dims.shape[0]
    base = torch.cumsum(cells, 0) - cells
    noise = torch.randn((total, 3), generator=generator, device=dev, dtype=torch.float32)
    cunit = torch.repeat_interleave(torch.arange(u, device=dev), cells, output_size=total)
    local = torch.arange(total, device=dev) - base[cunit]
    d = dims[cunit]                                              # (cells, 3)
    strides = torch.stack([d[:, 1] * d[:, 2], d[:, 2], torch.ones_like(d[:, 2])], 1)
    pos = torch.stack([local // strides[:, 0], (local // d[:, 2]) % d[:, 1],
                       local % d[:, 2]], 1)
    cell = torch.arange(total, device=dev)
    for _ in range(2):
        for a in range(3):
            noise = _box3(noise, cell, strides[:, a], pos[:, a], d[:, a])
    return noise, base, torch.stack([dims[:, 1] * dims[:, 2], dims[:, 2]], 1)


def _box3(x: torch.Tensor, cell: torch.Tensor, stride: torch.Tensor, pos: torch.Tensor,
          dim: torch.Tensor) -> torch.Tensor:
    """(x[i−1] + x[i] + x[i+1]) / 3 along one axis of every unit's grid, zero beyond its ends."""
    prev = x[(cell - stride).clamp(min=0)] * (pos > 0)[:, None]
    nxt = x[(cell + stride).clamp(max=max(len(cell) - 1, 0))] * (pos < dim - 1)[:, None]
    return (prev + x + nxt) / 3
