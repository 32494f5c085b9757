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
            noise = _dense_noise(dims, dmax, generator, dev)
            acc = _sample_dense(xyz, units, lo, noise, granularity)
        else:                                    # very unequal units: grids end to end
            noise, base, strides = _flat_noise(dims, cells, total, generator, dev)
            # trilinear sampling, in blocks of points on a CPU (intermediates stay in cache)
            block = units.n if xyz.is_cuda else CPU_BLOCK
            acc = torch.cat([_interp(xyz[a:a + block], units.ids[a:a + block], lo, dims, base,
                                     strides, noise, granularity)
                             for a in range(0, units.n, block)])
        on = units.expand(apply)[:, None]                       # skipped units: unchanged
        return torch.where(on, xyz + (acc * magnitude).to(xyz.dtype), xyz)


def _sample_dense(xyz, units, lo, noise, granularity):
    """Trilinear sample of the float64 (3, D2, D1, U, D0) ``noise`` volume (:func:`_dense_noise`)
    at each point, one fused ``grid_sample`` for the whole batch: the units' grids side by side
    along x, unit u's cell i at x = u·D0 + i. A point's continuous cell
    index t = (coord − lo) / granularity + 1 lies in [1, dims − 1) of its own unit, so its 8
    corners are its own unit's cells (a corner one past them has weight 0); float64 keeps the
    normalised coordinates exact to ~1e-13 cells however many units sit side by side. On a CPU
    the points are split into one part per intra-op thread (grid_sample parallelises over its
    batch dimension; the volume is expanded, not copied)."""
    d2, d1, u, d0 = noise.shape[1:]
    dev, n, f64 = xyz.device, units.n, torch.float64
    size = torch.tensor([u * d0, d1, d2], dtype=f64, device=dev)
    scale = 2 / (size - 1)                                   # cell index -> [-1, 1]
    shift = torch.zeros((u, 3), dtype=f64, device=dev)
    shift[:, 0] = torch.arange(u, dtype=f64, device=dev) * d0
    # t = (c - lo) / g + 1 (+ u·D0 on x); normalised: t * scale - 1 = c * a + b[unit]
    a = scale / granularity
    b = (shift + 1 - lo.to(f64) / granularity) * scale - 1
    parts = 1 if xyz.is_cuda else max(1, min(torch.get_num_threads(), n // PART_POINTS))
    per = -(-n // parts)
    grid = torch.zeros((parts * per, 3), dtype=f64, device=dev)
    torch.addcmul(units.expand(b), xyz.to(f64), a, out=grid[:n])
    out = torch.nn.functional.grid_sample(
        noise.view(1, 3, d2, d1, u * d0).expand(parts, -1, -1, -1, -1),
        grid.view(parts, per, 1, 1, 3), mode="bilinear", padding_mode="zeros",
        align_corners=True)                                  # (parts, 3, per, 1, 1)
    return out.view(parts, 3, per).transpose(1, 2).reshape(-1, 3)[:n]


#: Fewest points per part of the fused sampling worth a thread of its own.
PART_POINTS = 1 << 14


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
    """Every unit's grid, smoothed, in the layout of the fused sampling: a float64
    (3, D2, D1, U, D0) volume (channel, z, y, unit, x; each unit padded to the largest dims),
    zero outside each unit's own grid. The noise is drawn as (U, D0, D1, D2, 3), the generator's
    stream in Pointcept's order. Along each axis the two box passes are one 5-tap filter
    [1, 2, 3, 2, 1] / 9 whose end cells lose x_end / 9 (the second pass sees zeros, not the first
    pass's spill, beyond the ends); filters along different axes commute, so x, x, y, y, z, z
    equals Pointcept's x, y, z, x, y, z. The spill of a pass lands beyond the unit's grid along
    that axis only, where the later passes along other axes never read it; the one final mask
    clears it (with the 1 / 9³ of the three filters and the cast to float64)."""
    u = dims.shape[0]
    d0, d1, d2 = dmax
    noise = torch.randn((u, d0, d1, d2, 3), generator=generator, device=dev,
                        dtype=torch.float32)
    ar = torch.arange(u, device=dev)
    inside = [(torch.arange(d, device=dev)[None, :] < dims[:, a:a + 1]) for a, d in
              enumerate(dmax)]                                # (U, Da) each
    mask = (inside[2].t()[:, None, :, None] & inside[1].t()[None, :, :, None]
            & inside[0][None, None, :, :])                    # (D2, D1, U, D0)
    x = torch.empty((3, d2, d1, u, d0), dtype=torch.float32, device=dev)
    torch.mul(noise.permute(4, 3, 2, 0, 1), mask, out=x)
    last = (dims - 1).clamp(min=0)                           # each unit's end cell, per axis
    for dim in (4, 2, 1):                                     # x, y, z
        n = x.shape[dim]
        out = x * 3
        for k, wgt in ((1, 2), (2, 1)):
            if n > k:
                out.narrow(dim, k, n - k).add_(x.narrow(dim, 0, n - k), alpha=wgt)
                out.narrow(dim, 0, n - k).add_(x.narrow(dim, k, n - k), alpha=wgt)
        out.narrow(dim, 0, 1).sub_(x.narrow(dim, 0, 1))
        end = last[:, {4: 0, 2: 1, 1: 2}[dim]]
        at = [slice(None)] * 5
        at[3], at[dim] = ar, end
        out[tuple(at)] -= x[tuple(at)]
        x = out
    vol = torch.empty(x.shape, dtype=torch.float64, device=dev)
    return torch.mul(x, mask.to(torch.float64) / 729, out=vol)


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
