"""Transforms that select points: GridSample, SphereCrop, RandomDropout — per unit, batched.

Every field of the batch is gathered with the selected points and ``offset`` is rewritten; see
:func:`gds_stream.transforms._batch.gather` for which keys are per point.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from ..errors import LoaderError
from ._batch import (Batch, Units, check_range, gather, get_coord, point_blocks, rand,
                     segment_bbox, segment_reduce, segment_select)
from .geometry import XYZ, Transform

#: FNV-1a 64-bit offset basis and prime, as int64 bit patterns (int64 arithmetic wraps).
_FNV_BASIS = 14695981039346656037 - (1 << 64)
_FNV_PRIME = 1099511628211
_INT64_MIN = -(1 << 63)


def _wrap(v: int) -> int:
    """What int64 arithmetic drops of ``v``: ``v - _wrap(v)`` is ``v`` wrapped to int64."""
    return ((v + (1 << 63)) >> 64) << 64


#: The FNV-1a hash after its first multiplication (basis × prime, wrapped to int64): a voxel's
#: hash is ((_FNV_START ^ x) × prime ^ y) × prime ^ z, as Pointcept's fnv_hash_vec.
_FNV_START = _FNV_BASIS * _FNV_PRIME - _wrap(_FNV_BASIS * _FNV_PRIME)


def _unit_hash_order(h: torch.Tensor, units: Units) -> torch.Tensor:
    """The stable order of the points by (unit, unsigned hash): a stable sort by hash, then a
    stable sort by unit on the narrowest integer type that holds the unit ids (a radix sort's
    cost grows with the key's bytes; uint8 sorts ~4x faster than int32 on a CPU). One int64 key
    cannot hold both: FNV-1a's last step XORs z into the low bits, so any truncation of the
    hash merges voxels that differ in z (:func:`_hash_order` sorts it in two parts)."""
    order = torch.sort(torch.bitwise_xor(h, _INT64_MIN), stable=True).indices
    if units.num > 1:
        dt = (torch.uint8 if units.num <= 256 else torch.int16 if units.num <= 1 << 15
              else torch.int32)
        by_unit = torch.sort(units.ids.to(dt).index_select(0, order), stable=True).indices
        order = order.index_select(0, by_unit)
    return order


#: Whether a CPU batch takes the packed numpy sorts (:func:`_packed_sort`, :func:`_hash_order`)
#: rather than torch's stable sorts, the path other devices take (the same order either way).
PACKED_SORT = True


def _packed_sort(top: np.ndarray, index_bits: int, with_top: bool = True):
    """CPU: the stable order of the points by ``top`` (uint64, each < 2**(64 − index_bits)),
    from one sort of 64-bit values — ``top`` in the high bits, the point's index in the low
    ones, so equal keys keep their order: numpy's vectorised sort (AVX-512/AVX2 on x86), ~6x
    torch's stable argsort on one thread. Returns (order int64, the sorted ``top`` or None)."""
    key = np.left_shift(top, np.uint64(index_bits), out=top)
    key |= _arange(top.shape[0])
    key.sort()
    hi = key >> np.uint64(index_bits) if with_top else None
    key &= np.uint64((1 << index_bits) - 1)
    return key.view(np.int64), hi


_ARANGE = threading.local()
#: Longest index array a thread keeps between calls (8 bytes a point: 32 MiB).
ARANGE_KEEP = 1 << 22


def _arange(n: int) -> np.ndarray:
    """0 .. n − 1 as uint64, from a per-thread array kept between calls (read only) up to
    ``ARANGE_KEEP`` points, fresh past it."""
    if n > ARANGE_KEEP:
        return np.arange(n, dtype=np.uint64)
    a = getattr(_ARANGE, "a", None)
    if a is None or a.shape[0] < n:
        a = _ARANGE.a = np.arange(max(n, 1 << 16), dtype=np.uint64)
    return a[:n]


def _runs(sorted_key: np.ndarray) -> torch.Tensor:
    """Each position's flag: the first of its run of equal ``sorted_key`` (bool tensor)."""
    first = np.empty(sorted_key.shape[0], dtype=bool)
    first[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    return torch.from_numpy(first)


#: Largest share of the points in runs of one high hash digit for which :func:`_hash_order`
#: sorts those runs apart; past it (dense voxels, long columns) the second digit is a sort.
TIE_SHARE = 0.25


def _hash_order(h: torch.Tensor, units: Units) -> tuple[torch.Tensor, torch.Tensor] | None:
    """CPU: (order, first) of the points by (unit, unsigned 64-bit hash) — the order of
    :func:`_unit_hash_order` — from packed sorts (:func:`_packed_sort`): one by the unit and
    the hash's high 64 − u − b bits (u, b: the unit and index bits) with the index; points whose
    unit and high bits tie (one voxel, or voxels of one column: FNV-1a's last step XORs z into
    the low bits) are then ordered by their whole hash: the runs apart (a packed sort of those
    points by run, low bits, position) while they are a small share of the batch, else the
    whole batch by a packed sort by the low bits first (a radix sort in two digits). ``None``
    when two digits cannot cover the hash (2**29 points or more)."""
    n, u = units.n, units.num
    ib, ub = max(1, (n - 1).bit_length()), max(1, (u - 1).bit_length())
    hb = 64 - ib - ub                           # the high digit's hash bits
    if hb < ib:                                 # the low digit holds 64 - ib of the bits
        return None
    hu = h.numpy().view(np.uint64)

    def high():                                 # the unit and the hash's high bits
        top = np.repeat(np.arange(u, dtype=np.uint64) << np.uint64(hb), units.counts.numpy())
        top |= hu >> np.uint64(64 - hb)
        return top
    tie_at = None
    if n > 1:
        order, top_sorted = _packed_sort(high(), ib)
        tie_at = np.flatnonzero(top_sorted[1:] == top_sorted[:-1])   # i ties with i + 1
        # the runs' packed key: run number, the hash's other 64 − hb bits, index
        if 2 * tie_at.size > TIE_SHARE * n or (2 * tie_at.size).bit_length() > hb - ib:
            tie_at = None
    if tie_at is None:                          # two digits: the low bits, then the high ones
        low = np.left_shift(hu, np.uint64(ib))
        rank1, _ = _packed_sort(np.right_shift(low, np.uint64(ib), out=low), ib,
                                with_top=False)
        pos, top_sorted = _packed_sort(np.take(high(), rank1), ib)
        order = np.take(rank1, pos)
        first = _runs(top_sorted)
        same = np.flatnonzero(~first.numpy())
    else:                                       # the runs of one high digit sorted apart
        first = torch.ones(n, dtype=torch.bool)
        member = np.zeros(n, dtype=bool)
        member[tie_at] = True
        member[tie_at + 1] = True
        members = np.flatnonzero(member)                  # positions in runs, in order
        starts = np.ones(members.size, dtype=bool)         # a run's first position
        starts[1:] = members[1:] - 1 != members[:-1]
        starts[1:] |= top_sorted[members[1:]] != top_sorted[members[1:] - 1]
        idx = order[members]
        key = np.cumsum(starts, dtype=np.uint64) << np.uint64(64 - hb)
        key |= hu[idx] & np.uint64((1 << (64 - hb)) - 1)
        by, _ = _packed_sort(key, ib, with_top=False)     # (run, low hash bits, position)
        order[members] = idx[by]
        same = members[~starts]
    # a voxel's first point: its unit or hash differs from the point before's — the high digit
    # (with the unit) from the sorted keys; the whole hash compared only where that ties
    if same.size:
        first.numpy()[same] = np.take(hu, order[same]) != np.take(hu, order[same - 1])
    return torch.from_numpy(order), first


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

    def _columns(self, xyz: torch.Tensor, lo: torch.Tensor, counts: torch.Tensor):
        """The points' voxel coordinates in blocks (:func:`point_blocks`): yields (a, m, v),
        v (3, m) float64 the voxels of the points [a, a + m): floor(c / grid_size) − their
        unit's ``lo`` (``counts``: points per unit, in order), exact (integers below 2**53)."""
        src = xyz.t()
        for a, m, lo_pp in point_blocks(lo, counts, xyz.shape[0]):
            v = src[:, a:a + m].to(torch.float64, copy=True)
            yield a, m, v.div_(self.grid_size).floor_().sub_(lo_pp)

    def _voxels(self, batch: Batch):
        """(xyz, lo, units, order, first, vstart, vcount): points sorted by (unit, voxel key);
        ``xyz`` the batch's coordinates, ``lo`` each unit's minimum voxel (float64 (U, 3))."""
        xyz, units = self._setup(batch)
        dev, n = xyz.device, units.n
        # min of floor(c / g) is floor(min c / g): the per-unit minimum on the floats
        lo = torch.floor(segment_bbox(xyz, units)[0].to(torch.float64) / self.grid_size)
        if n and self.hash == "ravel":
            grid = torch.empty((3, n), dtype=torch.int64, device=dev)
            for a, m, v in self._columns(xyz, lo, units.counts):
                grid[:, a:a + m] = v
        elif n:                                  # FNV-1a of each point's voxel, block by block
            h = torch.empty(n, dtype=torch.int64, device=dev)
            for a, m, v in self._columns(xyz, lo, units.counts):
                v = v.to(torch.int64)
                hb = torch.bitwise_xor(v[0], _FNV_START, out=h[a:a + m])
                hb.mul_(_FNV_PRIME).bitwise_xor_(v[1]).mul_(_FNV_PRIME).bitwise_xor_(v[2])
        if n == 0:
            order = torch.zeros(0, dtype=torch.int64, device=dev)
            first = torch.zeros(0, dtype=torch.bool, device=dev)
        elif self.hash == "ravel":
            dims = [int(c.max()) + 1 for c in grid]
            if units.num * dims[0] * dims[1] * dims[2] >= (1 << 63):
                raise LoaderError(f"{self.who}: grid_size {self.grid_size} is too fine for "
                                  f"units this large ({dims} voxels) with hash='ravel'; "
                                  f"use hash='fnv'")
            key = ((units.expand(torch.arange(units.num, device=dev)) * dims[0] + grid[0])
                   * dims[1] + grid[1]) * dims[2] + grid[2]
            ib = max(1, (n - 1).bit_length())
            if PACKED_SORT and dev.type == "cpu" and \
                    (units.num * dims[0] * dims[1] * dims[2]).bit_length() + ib <= 64:
                order, top = _packed_sort(key.numpy().view(np.uint64), ib)
                order, first = torch.from_numpy(order), _runs(top)
            else:
                skey, order = torch.sort(key, stable=True)
                first = torch.ones(n, dtype=torch.bool, device=dev)
                first[1:] = skey[1:] != skey[:-1]
        else:
            found = _hash_order(h, units) if PACKED_SORT and dev.type == "cpu" else None
            if found is not None:
                order, first = found
            else:
                order = _unit_hash_order(h, units)
                hs, us = h.index_select(0, order), units.ids  # by unit: units keep their ranges
                first = torch.ones(n, dtype=torch.bool, device=dev)
                first[1:] = (hs[1:] != hs[:-1]) | (us[1:] != us[:-1])
        vstart = (torch.from_numpy(np.flatnonzero(first.numpy())) if first.device.type == "cpu"
                  else torch.nonzero(first).flatten())
        vcount = torch.diff(vstart, append=vstart.new_full((1,), n))
        return xyz, lo, units, order, first, vstart, vcount

    def __call__(self, batch: Batch, generator: torch.Generator | None = None):
        xyz, lo, units, order, first, vstart, vcount = self._voxels(batch)
        dev, n = units.device, units.n
        # voxels per unit: each unit's points are a range of positions, its voxels' starts too
        ends = units.starts + units.counts
        per_unit = (torch.searchsorted(vstart, ends) - torch.searchsorted(vstart, units.starts)
                    if n else torch.zeros_like(units.counts))
        inverse = None
        if self.return_inverse:
            inverse = torch.empty(n, dtype=torch.int64, device=dev)
            inverse[order] = torch.cumsum(first.to(torch.int64), 0) - 1
        if self.mode == "train":
            # one uniform draw per voxel of more than one point (a voxel of one has no choice)
            multi = torch.nonzero(vcount > 1).flatten()
            r = rand(multi.shape[0], generator, dev)
            c = vcount.index_select(0, multi)
            pick = vstart.index_add(0, multi, torch.minimum((r * c).to(torch.int64), c - 1))
            return self._out(batch, xyz, order.index_select(0, pick), per_unit, lo, units,
                             inverse)
        # test mode: Pointcept's parts, a Python loop over parts (the largest voxel's count)
        vunit = units.ids.index_select(0, vstart) if n else vstart
        vmax = segment_reduce(vcount, vunit, units.num, "amax")
        parts = []
        for i in range(int(vcount.max()) if n else 1):
            take = vmax[vunit] > i
            idx = order[(vstart + i % vcount)[take]]
            part = self._out(batch, xyz, idx, torch.where(vmax > i, per_unit, 0), lo, units,
                             inverse)
            part["index"] = idx
            parts.append(part)
        return parts

    def _out(self, batch, xyz, idx, counts, lo, units, inverse) -> Batch:
        out = gather(batch, idx, counts, units.n, units, (self.coord, xyz))
        if self.return_grid_coord:   # the kept points' voxels, computed again (no gather)
            kept = get_coord(out, self.coord, self.who)
            gc = torch.empty((idx.shape[0], 3), dtype=torch.int64, device=idx.device)
            for a, m, v in self._columns(kept, lo, counts):
                gc[a:a + m] = v.t()
            out["grid_coord"] = gc
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
        return gather(batch, segment_select(units, key, keep), keep, units.n, units,
                      (self.coord, xyz))


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
