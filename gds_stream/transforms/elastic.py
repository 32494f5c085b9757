"""ElasticDistortion, batched: every unit's noise grid in one flat tensor, no loop over units.

Pointcept's recipe, per unit and per (granularity, magnitude): a Gaussian noise grid of
``floor(extent / granularity) + 3`` cells per axis (3 channels) with its first cell one
granularity below the unit's minimum, smoothed twice by a 3-cell box filter along x, y and z
(zeros outside the grid), then sampled trilinearly at every point and added × magnitude.

Units of similar extent (chunks, the usual case) share one (units, D0, D1, D2, 3) block padded
to the largest grid, smoothed by three batched matrix products (one banded matrix per unit and
axis; slice passes for large grids; on a CPU in reused buffers) and sampled by 2-D
``grid_sample`` as one image for the batch (:func:`_distort_image`: on a CPU in blocks of points,
each spread over one image per intra-op thread) or one image per unit (:func:`_sample_dense`,
past ``IMAGE_ROWS``). Units of
very different extent lay their grids end to end in one flat tensor instead (the padding would
dwarf them); its box filter reads each cell's neighbours through per-cell strides and the
sampling gathers the 8 corners, so its cost too is proportional to the cells and points of the
batch, whatever the number of units.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from ..errors import LoaderError
from ._batch import Batch, point_blocks, rand, randn, segment_bbox, set_coord
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
        memo = []

        def rows():                   # each point's row in the padded (U, Pmax) layout, once
            if not memo:
                pmax = int(units.counts.max())
                dev = xyz.device
                memo.append((pmax, torch.arange(units.n, device=dev) + units.expand(
                    torch.arange(units.num, device=dev) * pmax - units.starts)))
            return memo[0]

        for granularity, magnitude in self.distortion_params:
            xyz = self._distort(xyz, units, apply, granularity, magnitude, generator, rows)
        return set_coord(batch, self.coord, xyz)

    @staticmethod
    def _distort(xyz, units, apply, granularity, magnitude, generator, rows):
        dev, u = xyz.device, units.num
        lo, hi = segment_bbox(xyz, units)
        dims = torch.div(hi - lo, granularity, rounding_mode="floor").to(torch.int64) + 3
        dims = torch.where(apply[:, None], dims, 0)              # skipped units: no grid
        cells = dims.prod(1)
        total = int(cells.sum())
        dmax = dims.max(0).values.tolist()
        padded = u * dmax[0] * dmax[1] * dmax[2]
        if padded <= DENSE_RATIO * total + DENSE_SLACK:   # units of similar extent: one block
            noise = _dense_noise(dims, dmax, generator, dev)
            if u * dmax[0] <= IMAGE_ROWS:
                return _distort_image(xyz, units, apply, lo, noise, granularity, magnitude)
            acc = _sample_dense(xyz, units, lo, noise, granularity, rows)
            # the 1 / 9 of the six box passes, folded into the magnitude
            if bool(apply.all()):
                return torch.add(xyz, acc.to(xyz.dtype), alpha=magnitude / 729)
            # a skipped unit's points sample whatever lies where its grid would be (finite):
            # × 0, its coordinates stay as they are
            scale = apply.to(acc.dtype) * (magnitude / 729)
            return xyz + (acc * units.expand(scale)[:, None]).to(xyz.dtype)
        else:                                    # very unequal units: grids end to end
            noise, base, strides = _flat_noise(dims, cells, total, generator, dev)
            # trilinear sampling, in blocks of points on a CPU (intermediates stay in cache)
            block = units.n if xyz.is_cuda else CPU_BLOCK
            acc = torch.cat([_interp(xyz[a:a + block], units.ids[a:a + block], lo, dims, base,
                                     strides, noise, granularity)
                             for a in range(0, units.n, block)])
            acc = acc * magnitude
        on = units.expand(apply)[:, None]                       # skipped units: unchanged
        return torch.where(on, xyz + acc.to(xyz.dtype), xyz)


def _distort_image(xyz, units, apply, lo, noise, granularity, magnitude):
    """``xyz`` + magnitude × the trilinear sample of the smoothed (U, D0, D1, D2, 3) ``noise``
    block (:func:`_dense_noise`, × 9³) at each point, planar (n, 3) out. The block is one image
    of a 2-D ``grid_sample``, its memory as it lies: each y slice of a unit side by side along
    the width (cell (x, y, z) at column y·D2 + z), the units one below the other (row u·D0 + x);
    each point a pair of samples, at its slices y0 and y0 + 1 (bilinear in x, z; linear in y
    between them). Float32: a normalised coordinate carries ~3e-8 × (its axis' cells) of
    rounding: ~2e-5 of a cell for 16 chunks' images (``IMAGE_ROWS`` bounds it). On a CPU in blocks
    of ``IMAGE_BLOCK`` points: every intermediate (the grid, the samples) stays in cache and is
    a small allocation the allocator hands back at once, where whole-batch temporaries are
    tens of megabytes of fresh pages each time (their page faults cost as much as the
    arithmetic). Skipped units (``apply`` false) sample whatever lies where their grid would
    be (finite) × 0: their coordinates stay as they are."""
    u, d0, d1, d2 = noise.shape[:4]
    dev, n, f32 = xyz.device, units.n, torch.float32
    sw, sh = 2 / (d1 * d2 - 1), 2 / (u * d0 - 1)           # cell index -> [-1, 1]
    ig = 1 / granularity
    # t = (coord − lo) / granularity + 1 (+ the unit's first row, along x) as coord × ig + b,
    # b per unit in float64; x and z straight to the grid's [-1, 1]: t × s − 1
    b = 1 - lo.to(torch.float64) * ig
    b[:, 0] += torch.arange(u, device=dev) * d0
    b[:, 0] = b[:, 0] * sh - 1
    b[:, 2] = b[:, 2] * sw - 1
    alpha = (ig * sh, ig, ig * sw)
    scale = magnitude / 729                   # the 1 / 9 of the six box passes, folded in
    per = torch.cat([b, (apply.to(torch.float64) * scale)[:, None]], 1).to(xyz.dtype)
    all_on = bool(apply.all())
    img = noise.view(1, u * d0, d1 * d2, 3).permute(0, 3, 1, 2)
    out = torch.empty((3, n), dtype=xyz.dtype, device=dev)
    src = xyz.t()                                          # (3, n): rows contiguous if planar
    parts = _images() if dev.type == "cpu" else 1
    for a, m, pp in point_blocks(per, units.counts, n, IMAGE_BLOCK):
        c = src[:, a:a + m]
        # grid (k, 2, mk, 2): the block's points in k images of the grid_sample batch (the
        # image expanded, not copied: a CPU grid_sample runs one thread per image), each point
        # a pair of samples, at slices y0 and y0 + 1, the pair's two halves apart (the samples
        # then come out as two contiguous runs, no strided lerp); rows past the block's
        # points are 0
        k = parts if m >= parts * MIN_IMAGE_POINTS else 1
        mk = -(-m // k)
        g = torch.empty((k, 2, mk, 2), dtype=f32, device=dev)
        if k * mk > m:
            g[k - 1, :, m - (k - 1) * mk:] = 0
        ty = torch.add(pp[1], c[1], alpha=alpha[1]).to(f32)
        y0 = torch.floor(ty).clamp_(0, d1 - 2)
        wy = ty.sub_(y0)
        gz = torch.add(pp[2], c[2], alpha=alpha[2]).to(f32)
        spans = [(j, j * mk, min(m, (j + 1) * mk)) for j in range(k)]
        for j, s, e in spans:
            torch.add(pp[0, s:e], c[0, s:e], alpha=alpha[0], out=g[j, 0, :e - s, 1])
            g[j, 1, :e - s, 1] = g[j, 0, :e - s, 1]
            torch.add(gz[s:e], y0[s:e], alpha=d2 * sw, out=g[j, 0, :e - s, 0])
            torch.add(g[j, 0, :e - s, 0], d2 * sw, out=g[j, 1, :e - s, 0])
        smp = torch.nn.functional.grid_sample(img.expand(k, -1, -1, -1), g.view(k, 2, mk, 2),
                                              mode="bilinear", padding_mode="zeros",
                                              align_corners=True)           # (k, 3, 2, mk)
        if k * mk > m:
            wy = torch.cat([wy, wy.new_zeros(k * mk - m)])
        # linear in y between the pair's halves, then image by image into out
        acc = torch.lerp(smp[:, :, 0], smp[:, :, 1], wy.view(k, 1, mk)).to(xyz.dtype)
        for j, s, e in spans:
            if all_on:
                torch.add(c[:, s:e], acc[j, :, :e - s], alpha=scale, out=out[:, a + s:a + e])
            else:
                torch.addcmul(c[:, s:e], acc[j, :, :e - s], pp[3, s:e],
                              out=out[:, a + s:a + e])
    return out.t()


def _sample_dense(xyz, units, lo, noise, granularity, rows):
    """Trilinear sample of the smoothed (U, D0, D1, D2, 3) ``noise`` block (:func:`_dense_noise`)
    at each point, the block too many rows for one image (see :func:`_distort_image`): each
    unit one image of a 2-D ``grid_sample`` batch — the block's memory as it lies, no copy, each
    y slice side by side along the width (cell (x, y, z) at row x, column y·D2 + z) — and each
    point a pair of samples, at its slices y0 and y0 + 1 (bilinear in x, z; linear in y between
    them), in its unit's row of Pmax pairs (``rows()``: Pmax and each point's row; the rows past
    a unit's points sample the image's centre and are not read). Float32: a normalised
    coordinate carries ~3e-8 × (its axis' cells) of rounding.

    A point's continuous cell index t = (coord − lo) / granularity + 1 lies in [1, dims − 1) of
    its own unit, so every corner with a weight is one of its own unit's cells (a corner past
    them has weight 0)."""
    u, d0, d1, d2 = noise.shape[:4]
    dev, n, f32 = xyz.device, units.n, torch.float32
    sw, sh = 2 / (d1 * d2 - 1), 2 / (d0 - 1)                # cell index -> [-1, 1]
    # t = (coord − lo) / granularity + 1 as coord × ig + b, b per unit (float64, cast to
    # coord's dtype), column by column; the grid's columns straight away in [-1, 1]
    ig = 1 / granularity
    b = (1 - lo.to(torch.float64) * ig).to(xyz.dtype)

    def col(a, scale, shift, out=None):         # (coord × ig + b) × scale + shift
        per = units.expand(b[:, a] * scale + shift)
        if out is None:
            return torch.add(per, xyz[:, a], alpha=ig * scale).to(f32)
        return torch.add(per, xyz[:, a], alpha=ig * scale, out=out)
    g = torch.empty((n, 4), dtype=f32, device=dev)       # each point's pair, laid in its row
    ty = col(1, 1.0, 0.0)
    y0 = torch.floor(ty).clamp_(0, d1 - 2)
    wy = ty.sub_(y0)
    col(0, sh, -1.0, out=g[:, 1])
    torch.add(col(2, sw, -1.0), y0, alpha=d2 * sw, out=g[:, 0])
    torch.add(g[:, 0], d2 * sw, out=g[:, 2])
    g[:, 3] = g[:, 1]
    pmax, at = rows()
    img = noise.view(u, d0, d1 * d2, 3).permute(0, 3, 1, 2)
    pair = torch.zeros((u * pmax, 4), dtype=f32, device=dev)  # rows past a unit: centre
    pair.index_copy_(0, at, g)
    out = torch.nn.functional.grid_sample(img, pair.view(u, 1, 2 * pmax, 2), mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    v = out.view(u, 3, 2 * pmax).transpose(1, 2).reshape(u * pmax, 6).index_select(0, at)
    return torch.lerp(v[:, :3], v[:, 3:], wy[:, None])


#: Most rows (units × D0 cells) of one image holding every unit: each row more rounds a
#: normalised coordinate by ~1.5e-8 of a cell (float32).
IMAGE_ROWS = 2048


#: Fewest points per image when a block is spread over several (:func:`_images`).
MIN_IMAGE_POINTS = 1024


def _images() -> int:
    """Images of the grid_sample batch a block is spread over on a CPU: one per intra-op
    thread (at most 8), as a CPU grid_sample runs one thread per image."""
    return max(1, min(torch.get_num_threads(), 8))


#: Points per block of the trilinear sampling on a CPU (grids end to end).
CPU_BLOCK = 1 << 14
#: Points per block of the one-image sampling on a CPU: its temporaries stay in cache (and
#: each op still has enough points for two intra-op threads).
IMAGE_BLOCK = 1 << 17


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

#: A padded (U, D0, D1, D2) block is used while it has at most DENSE_RATIO × the cells of the
#: units' own grids (+ DENSE_SLACK); past it the grids are laid end to end. The padded block
#: costs ~5x less per cell (slices, one grid_sample) than the end-to-end layout (neighbours and
#: corners gathered), and randomly rotated square chunks fill only ~50-65 % of it.
DENSE_RATIO = 4
#: Extra cells a padded block may waste before grids are laid end to end.
DENSE_SLACK = 1 << 16


#: The block is smoothed by matrix products while D0 + D1 + 3·D2 (the multiply-adds per cell)
#: is at most this; past it by slice passes (:func:`_filter`), whose cost per cell is fixed.
BAND_MAX = 256


def _dense_noise(dims, dmax, generator, dev):
    """Every unit's grid padded to the largest dims: one (U, D0, D1, D2, 3) block, drawn in
    each unit's own rows (:func:`_draw`), smoothed and returned × 9³ (a view of a scratch
    buffer). Along each axis the two box passes are one 5-tap filter
    [1, 2, 3, 2, 1] (÷ 9, left to the caller) whose end cells lose x_end (the second pass sees
    zeros, not the first pass's spill, beyond the ends); filters along different axes commute,
    so x, x, y, y, z, z equals Pointcept's x, y, z, x, y, z.

    Up to ``BAND_MAX`` each axis' filter is a batched matrix product with one banded (D, D)
    matrix per unit (:func:`_bands`), zero outside the unit's own cells: the padding past a
    unit's grid and a skipped unit's whole grid are neither read nor written (they come out
    0). Three products instead of ~20 slice passes over the block and its masks: the block is
    megabytes, each slice pass a trip through memory, where a product reads its operand once
    (on the bench's loader batch, 16 chunks of 80 k points in all, the smoothing 4.4 -> 1.4 ms).
    Past it (large grids: a product's work per cell grows with the dims) the block is zeroed
    outside each unit's grid and filtered by slices (:func:`_filter`); the spill of a pass lands
    beyond the unit's grid along that axis only, where the passes along the other axes never
    read it, and the sampling gives it no weight. (On CUDA with TF32 matrix products enabled
    by the user, the noise is smoothed at TF32's precision, ~1e-3 of its values.)"""
    u = dims.shape[0]
    d0, d1, d2 = dmax
    shape, k = (u, d0, d1, d2, 3), u * d0 * d1 * d2 * 3
    bufs = [b[:k] for b in _scratch(k, dev)]
    x = _draw(dims, shape, bufs, generator)
    if d0 + d1 + 3 * d2 > BAND_MAX:
        return _slice_filter(x, dims, dmax, bufs)
    ax, ay, az3 = _band_mats(dims, dmax, x.dtype)
    # each product contracts the axis at the front of the layout and puts it last (the
    # matrices are symmetric): (x, y, m) -> (y, m, x) -> (m, x, y) -> (x, y, m), m = (z, c);
    # no operand is copied (a broadcast matrix would be, for the middle axis)
    m = d2 * 3
    y = torch.bmm(x.view(u, d0, d1 * m).transpose(1, 2), ax, out=bufs[1].view(u, d1 * m, d0))
    x = torch.bmm(y.view(u, d1, m * d0).transpose(1, 2), ay, out=bufs[0].view(u, m * d0, d1))
    y = torch.bmm(x.view(u, m, d0 * d1).transpose(1, 2), az3, out=bufs[1].view(u, d0 * d1, m))
    return y.view(shape)


def _draw(dims, shape, bufs, generator):
    """The (U, D0, D1, D2, 3) noise block in ``bufs[0]``: N(0, 1) draws in the (x, y) rows of
    each unit's own grid — (D2, 3) values each, in the order (unit, x, y): Pointcept's order
    per unit, z padded — and 0 in every other row (the padding of units shorter than the
    block, and skipped units whole). Rotated chunks fill ~60 % of the block's rows: the draw
    (torch's CPU Gaussian is ~3 ns a value) costs only what the units use; the rows are drawn
    into ``bufs[1]`` (free until the smoothing) and copied into place."""
    u, d0, d1 = shape[:3]
    dev = dims.device
    own = ((torch.arange(d0, device=dev)[None, :, None] < dims[:, 0, None, None])
           & (torch.arange(d1, device=dev)[None, None, :] < dims[:, 1, None, None]))
    rows = torch.nonzero(own.view(-1)).flatten()
    block = bufs[0].view(u * d0 * d1, -1)
    if rows.numel() == block.shape[0]:
        return randn(bufs[0].view(shape), generator)
    drawn = randn(bufs[1][:rows.numel() * block.shape[1]].view(rows.numel(), -1), generator)
    block.zero_()
    block.index_copy_(0, rows, drawn)
    return bufs[0].view(shape)


def _slice_filter(x, dims, dmax, bufs):
    """:func:`_dense_noise` past ``BAND_MAX``: the drawn block ``x`` zeroed outside each unit's
    grid, then filtered by slices (:func:`_filter`) in the scratch buffers ``bufs``."""
    u, shape, dev = x.shape[0], x.shape, x.device
    # zero outside each unit's grid: skipped units whole, the others' slabs past their ends
    applied = dims[:, 0] > 0
    if not bool(applied.all()):
        x.index_fill_(0, torch.nonzero(~applied).flatten(), 0)
    for a, d in enumerate(dmax):
        lo = int(dims[applied, a].min())
        if lo < d:
            keep = torch.arange(lo, d, device=dev)[None, :] < dims[:, a:a + 1]   # (U, d - lo)
            shape_a = [u, 1, 1, 1, 1]
            shape_a[a + 1] = d - lo
            x.narrow(a + 1, lo, d - lo).masked_fill_(~keep.view(shape_a), 0)
    last = (dims - 1).clamp(min=0)                           # each unit's end cell, per axis
    outs = [bufs[1].view(shape), bufs[0].view(shape), bufs[1].view(shape)]  # ping-pong
    _filter(x, last, outs)
    return outs[2]


def _filter(x, last, outs):
    """The three 5-tap passes of :func:`_slice_filter` on the block, ``outs[a]`` the output of
    the pass along axis a; ``last``: each unit's end cell per axis. (Filtering a few units at a
    time, in cache, measured no faster in the whole transform, and multiplies the ops: each one
    a wait for every intra-op thread.)"""
    for a in range(3):
        dim, n, out = a + 1, x.shape[a + 1], outs[a]
        torch.mul(x, 3, out=out)
        for k, wgt in ((1, 2), (2, 1)):
            if n > k:
                out.narrow(dim, k, n - k).add_(x.narrow(dim, 0, n - k), alpha=wgt)
                out.narrow(dim, 0, n - k).add_(x.narrow(dim, k, n - k), alpha=wgt)
        out.narrow(dim, 0, 1).sub_(x.narrow(dim, 0, 1))
        out.narrow(dim, n - 1, 1).sub_(x.narrow(dim, n - 1, 1))  # (padding for shorter units)
        short = torch.nonzero(last[:, a] < n - 1).flatten()
        if short.numel():
            at = [short] + [slice(None)] * a + [last[short, a]]
            out[tuple(at)] -= x[tuple(at)]
        x = out


def _band_mats(dims: torch.Tensor, dmax, dtype) -> tuple[torch.Tensor, ...]:
    """The three per-unit filter matrices of :func:`_dense_noise`: (U, D0, D0), (U, D1, D1)
    and, z with the 3 channels interleaved, A_z ⊗ I3 (U, 3·D2, 3·D2). On a CPU built by numpy
    (small arrays: a few microseconds, where each torch op costs more than its work); the same
    small integers either way."""
    u, d2 = dims.shape[0], dmax[2]
    if dims.device.type == "cpu":
        rows = dims.tolist()
        return tuple(torch.from_numpy(np.stack([_band_np(r[a], n, a == 2) for r in rows])
                                      ).to(dtype) for a, n in enumerate(dmax))
    ax, ay, az = (_bands(dims[:, a], d, dtype) for a, d in enumerate(dmax))
    az3 = (az[:, :, None, :, None] * torch.eye(3, dtype=dtype, device=dims.device)[:, None, :]
           ).reshape(u, d2 * 3, d2 * 3)
    return ax, ay, az3


_BANDS: dict[tuple[int, int, bool], np.ndarray] = {}
_BANDS_BYTES = [0]
#: Bytes of filter matrices kept between batches (past it the cache starts again).
BANDS_KEEP_BYTES = 32 << 20


def _band_np(d: int, n: int, channels: bool) -> np.ndarray:
    """One unit's (n, n) filter matrix along an axis of ``d`` cells (:func:`_bands`), or with
    ``channels`` its Kronecker product with I3 (3n, 3n): built once per (d, n) and kept (read
    only) — a batch's units repeat a few lengths, and building them is numpy work on small
    arrays that holds the GIL every transform thread shares."""
    key = (d, n, channels)
    m = _BANDS.get(key)
    if m is None:
        i = np.arange(n)
        m = np.clip(3 - np.abs(i[:, None] - i[None, :]), 0, None).astype(np.float32)
        m[d:] = 0                                   # rows and columns past the unit's cells
        m[:, d:] = 0
        if d:
            ends = [0, d - 1]                       # its end cells lose x_end (one when d is 1)
            m[ends, ends] = 2
        if channels:
            m = (m[:, None, :, None] * np.eye(3, dtype=np.float32)[:, None, :]
                 ).reshape(3 * n, 3 * n)
        m.setflags(write=False)
        if _BANDS_BYTES[0] + m.nbytes > BANDS_KEEP_BYTES:
            _BANDS.clear()
            _BANDS_BYTES[0] = 0
        _BANDS[key] = m
        _BANDS_BYTES[0] += m.nbytes
    return m


def _bands(d: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """(U, n, n): per unit the 5-tap filter [1, 2, 3, 2, 1] along an axis of ``d[u]`` cells as
    a symmetric banded matrix — its first and last diagonal entries 2 (the end cells lose
    x_end) — zero in the rows and columns past ``d[u]`` (all of it where ``d[u]`` is 0)."""
    i = torch.arange(n, device=d.device)
    band = (3 - (i[:, None] - i[None, :]).abs()).clamp_(min=0).to(dtype)       # (n, n)
    inside = i[None, :] < d[:, None]                                           # (U, n)
    ends = ((i[None, :] == 0) | (i[None, :] == d[:, None] - 1)) & inside
    m = band * (inside[:, :, None] & inside[:, None, :]).to(dtype)
    return m - torch.diag_embed(ends.to(dtype))


_SCRATCH = threading.local()
#: Largest noise block (floats) whose two buffers a thread keeps between batches: 2 × 64 MiB.
SCRATCH_KEEP_FLOATS = 1 << 24


def _scratch(numel: int, dev: torch.device) -> list[torch.Tensor]:
    """Two flat float32 buffers of at least ``numel`` for the noise block's passes. On a CPU they
    are kept per thread from one call to the next: the block is megabytes, and a fresh
    allocation that large pays its page faults on every batch, as much time as the arithmetic.
    Blocks past ``SCRATCH_KEEP_FLOATS`` (fine granularities on large units) get fresh buffers,
    not kept between batches; so do other devices (CUDA's caching allocator)."""
    if torch.device(dev).type != "cpu" or numel > SCRATCH_KEEP_FLOATS:
        return [torch.empty(numel, device=dev) for _ in range(2)]
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or bufs[0].numel() < numel:
        bufs = _SCRATCH.bufs = [torch.empty(numel) for _ in range(2)]
    return bufs


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
