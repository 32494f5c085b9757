"""What every transform shares: the batch's units, its coordinates, segment ops and the gather.

A batch is ``dict[str, torch.Tensor]``. Its *units* (chunks or scans) are delimited by
``offset`` (int64 cumulative ends, Pointcept's convention); a batch without ``offset`` is one
unit. Every tensor whose first dimension is the batch's point count is a per-point field and is
gathered with the points; ``offset`` is rewritten; the per-unit keys (``chunk``) and the
non-point keys (``inverse``, which indexes a GridSample's output) are carried unchanged.

Nothing here loops over units in Python: per-unit values reach the points by block fills
(numpy's ``repeat`` on a CPU, ``repeat_interleave`` elsewhere), per-unit minima and maxima come
from segmented reductions, per-unit selections from stable sorts. On a CPU, x, y and z pass
between transforms planar (the rows of one (3, n) tensor: each field contiguous), long passes
run in blocks of points (:func:`point_blocks`: temporaries in cache, no fresh megabytes per
batch), and large Gaussian draws are split into streams drawn on the intra-op threads
(:func:`randn`).
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np
import torch

from ..errors import LoaderError

#: Keys that hold one value per unit, not per point: carried unchanged by point selections.
UNIT_KEYS = frozenset({"chunk"})
#: Keys that are neither per point nor per unit: carried unchanged by point selections.
OTHER_KEYS = frozenset({"offset", "inverse"})

Batch = dict


def coord_names(coord: str | Sequence[str], who: str) -> tuple[str, ...]:
    """``("x", "y", "z")`` or one field name holding an (n, 3) tensor; checked at construction."""
    names = (coord,) if isinstance(coord, str) else tuple(coord)
    if len(names) not in (1, 3) or not all(isinstance(n, str) and n for n in names):
        raise LoaderError(f"{who}: coord must be three field names (x, y, z) or one field of "
                          f"shape (n, 3), got {coord!r}")
    return names


def require(batch: Batch, name: str, who: str, param: str) -> torch.Tensor:
    """``batch[name]``, or a :class:`LoaderError` naming the transform and its parameter."""
    try:
        return batch[name]
    except KeyError:
        raise LoaderError(f"{who}: {param} field {name!r} is not in the batch (it has "
                          f"{', '.join(sorted(map(str, batch))) or 'no fields'})") from None


def get_coord(batch: Batch, names: tuple[str, ...], who: str) -> torch.Tensor:
    """The (n, 3) coordinates in their compute dtype (float64 if any field is, else float32)."""
    cols = [require(batch, n, who, "coord") for n in names]
    if len(cols) == 1:
        xyz = cols[0]
        if xyz.dim() != 2 or xyz.shape[1] != 3:
            raise LoaderError(f"{who}: coord field {names[0]!r} must have shape (n, 3), got "
                              f"{tuple(xyz.shape)}")
        dts = [xyz.dtype]
    else:
        if any(c.dim() != 1 or c.shape[0] != cols[0].shape[0] for c in cols):
            raise LoaderError(f"{who}: coord fields {', '.join(names)} must be 1-D of one "
                              f"length, got shapes {[tuple(c.shape) for c in cols]}")
        dts = [c.dtype for c in cols]
    if not all(d.is_floating_point for d in dts):
        raise LoaderError(f"{who}: coord fields must be floating point (a transform writes "
                          f"coordinates back), got {', '.join(str(d) for d in dts)}")
    dt = torch.float64 if torch.float64 in dts else torch.float32
    if len(cols) == 1:
        return xyz.to(dt)
    if all(d == dt for d in dts):
        view = _one_tensor(cols)
        if view is not None:
            return view
    # planar: the three fields as the rows of one (3, n) tensor, seen as (n, 3)
    return torch.stack([c.to(dt) for c in cols], 0).t()


def _one_tensor(cols: list[torch.Tensor]) -> torch.Tensor | None:
    """The (n, 3) tensor whose columns the three 1-D ``cols`` are, as :func:`set_coord` writes
    them — planar (the rows of one (3, n) tensor, strides (1, n)) or row-major (strides (3, 1))
    — used as it is, no stack; ``None`` when they are separate tensors."""
    c0 = cols[0]
    n = c0.shape[0]
    if n < 2:
        return None
    try:
        ptr = c0.untyped_storage().data_ptr()
        if not all(c.device == c0.device and c.untyped_storage().data_ptr() == ptr
                   for c in cols):
            return None
        o = c0.storage_offset()
        for step, stride in ((n, (1,)), (1, (3,))):
            if all(c.stride() == stride and c.storage_offset() == o + i * step
                   for i, c in enumerate(cols)):
                return c0.as_strided((n, 3), (1, n) if step == n else (3, 1), o)
    except (RuntimeError, NotImplementedError):           # tensors without a plain storage
        pass
    return None


def planar(xyz: torch.Tensor) -> bool:
    """Whether the (n, 3) ``xyz`` is laid out planar: its columns contiguous (the rows of a
    (3, n) tensor), the layout :func:`get_coord` makes of three fields."""
    return xyz.dim() == 2 and xyz.shape[1] == 3 and xyz.stride() == (1, xyz.shape[0])


def set_coord(batch: Batch, names: tuple[str, ...], xyz: torch.Tensor) -> Batch:
    """A new batch whose coordinate fields are ``xyz``, each in its own stored dtype. Three
    fields of ``xyz``'s dtype are views of it, no copies: the rows of its (3, n) tensor when it
    is planar (each field contiguous), else the columns of one row-major (n, 3) tensor; the next
    transform's :func:`get_coord` takes that tensor as it is."""
    out = dict(batch)
    if len(names) == 1:
        out[names[0]] = xyz.to(batch[names[0]].dtype)
    elif all(batch[n].dtype == xyz.dtype for n in names):
        if planar(xyz) or xyz.stride() == (3, 1):
            rows = xyz
        else:
            rows = xyz.t().contiguous().t()
        for i, n in enumerate(names):
            out[n] = rows[:, i]
    else:
        for i, n in enumerate(names):
            out[n] = xyz[:, i].to(batch[n].dtype)
    return out


class Units:
    """The units of a batch of ``n`` points: counts, starts and (lazily) each point's unit id."""

    def __init__(self, batch: Batch, n: int, device: torch.device, who: str):
        off = batch.get("offset")
        self.has_offset = off is not None
        if off is None:
            self.counts = torch.tensor([n], dtype=torch.int64, device=device)
        else:
            if off.dim() != 1 or off.dtype != torch.int64:
                raise LoaderError(f"{who}: offset must be a 1-D int64 tensor of cumulative ends, "
                                  f"got {off.dtype} of shape {tuple(off.shape)}")
            off = off.to(device)
            self.counts = torch.diff(off, prepend=off.new_zeros(1))
            last = int(off[-1]) if len(off) else 0
            if last != n:
                raise LoaderError(f"{who}: offset ends at {last} but the batch has {n} points")
        self.n = n
        self.num = int(self.counts.shape[0])
        self.device = device
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self._ids: torch.Tensor | None = None
        self._counts_np: np.ndarray | None = None

    def expand(self, per_unit: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """``per_unit`` (U, ...) repeated for every point of its unit: (n, ...), laid out planar
        (see :func:`planar`) when ``like`` is. On a CPU numpy's ``repeat`` (units are contiguous
        ranges: block fills, ~5x a gather); elsewhere a gather by the (cached) unit ids."""
        if per_unit.device.type == "cpu":
            counts = self._np_counts()
            if like is not None and planar(like) and per_unit.dim() == 2:
                rows = per_unit.t().contiguous().numpy()
                return torch.from_numpy(np.repeat(rows, counts, axis=1)).t()
            return repeat_units(per_unit, counts, self.n)
        if like is not None and planar(like) and per_unit.dim() == 2:
            return per_unit.t().index_select(1, self.ids).t()
        return per_unit.index_select(0, self.ids)

    def _np_counts(self) -> np.ndarray:
        if self._counts_np is None:
            self._counts_np = self.counts.numpy()
        return self._counts_np

    @property
    def ids(self) -> torch.Tensor:
        """Each point's unit index (int64, length n)."""
        if self._ids is None:
            self._ids = torch.repeat_interleave(
                torch.arange(self.num, device=self.device), self.counts, output_size=self.n)
        return self._ids


def repeat_units(per_unit: torch.Tensor, counts, n: int) -> torch.Tensor:
    """``per_unit`` (U, ...) with row u repeated ``counts[u]`` times (a tensor, or a numpy
    array on a CPU): (n, ...). On a CPU numpy's ``repeat`` (block fills); elsewhere torch's."""
    if per_unit.device.type == "cpu":
        c = counts if isinstance(counts, np.ndarray) else counts.numpy()
        return torch.from_numpy(np.repeat(per_unit.contiguous().numpy(), c, axis=0))
    return torch.repeat_interleave(per_unit, counts, dim=0, output_size=n)


#: Points per block of a blocked per-point pass on a CPU (:func:`point_blocks`).
BLOCK = 1 << 17


def point_blocks(per_unit: torch.Tensor, counts: torch.Tensor, n: int, size: int = 0):
    """The points in consecutive blocks, each with its points' per-unit values: yields
    (a, m, pp) for the points [a, a + m), pp (k, m) the row of ``per_unit`` (U, k) of each
    point's unit, transposed. On a CPU blocks of ``size`` (default :data:`BLOCK`) points, pp a
    block fill per unit (numpy's ``repeat``): a pass over the batch in blocks keeps its
    temporaries in cache, and small enough for the allocator to hand back at once — a
    whole-batch temporary is megabytes of fresh pages each time, whose page faults cost as much
    as the arithmetic. Elsewhere one block (``repeat_interleave``)."""
    if per_unit.device.type != "cpu":
        if n:
            yield 0, n, torch.repeat_interleave(per_unit, counts, dim=0, output_size=n).t()
        return
    size = size or BLOCK
    rows = per_unit.t().contiguous().numpy()
    ends = torch.cumsum(counts, 0).numpy()
    starts = ends - counts.numpy()
    for a in range(0, n, size):
        m = min(size, n - a)
        cnt = np.clip(ends, a, a + m) - np.clip(starts, a, a + m)
        yield a, m, torch.from_numpy(np.repeat(rows, cnt, axis=1))


def segment_reduce(values: torch.Tensor, ids: torch.Tensor, num: int, op: str) -> torch.Tensor:
    """Per-segment ``amin``/``amax`` of (n, k) ``values`` grouped by ``ids`` (any order; rows of
    empty segments are 0). For integer values; float coordinates use :func:`segment_bbox`."""
    out = values.new_zeros((num,) + tuple(values.shape[1:]))
    idx = ids.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return out.scatter_reduce(0, idx, values, op, include_self=False)


def segment_bbox(xyz: torch.Tensor, units: Units) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (min, max) of the (n, 3) float coordinates, each (U, 3); 0 for empty units.
    Units are contiguous ranges, so this is a segmented reduction (no scatter): on a CPU numpy's
    ``reduceat`` along each contiguous axis (vectorised; ~4x torch's segment_reduce there),
    elsewhere torch's."""
    nonempty = (units.counts > 0)[:, None]
    zero = torch.zeros((), dtype=xyz.dtype, device=xyz.device)
    if xyz.device.type == "cpu" and units.n > 0:
        flat = planar(xyz)
        x = (xyz.t() if flat else xyz).detach().contiguous().numpy()
        full = torch.nonzero(units.counts).flatten()          # strictly increasing starts < n
        starts = units.starts[full].numpy()
        out = []
        for op in (np.minimum, np.maximum):
            r = xyz.new_zeros((units.num, xyz.shape[1]))
            red = op.reduceat(x, starts, 1 if flat else 0)
            r[full] = torch.from_numpy(red.T if flat else red)
            out.append(r)
        return tuple(out)
    return tuple(torch.where(nonempty, torch.segment_reduce(xyz.contiguous(), op,
                                                            lengths=units.counts, axis=0), zero)
                 for op in ("min", "max"))


def segment_select(units: Units, key: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Indices of the ``keep[u]`` points of smallest ``key`` in each unit u, ordered by unit,
    then by key (ties in point order). ``key``: int64 in [0, 2**32) — packed with the unit id in
    the high bits into one int64 sort key — or float64 (two stable sorts). No loop over units."""
    if key.dtype == torch.int64 and units.num < (1 << 31):
        order = torch.sort(units.ids * (1 << 32) + key, stable=True).indices
    else:
        order = torch.sort(key, stable=True).indices
        if units.num > 1:
            order = order[torch.sort(units.ids[order].to(torch.int32), stable=True).indices]
    # sorted by unit, every unit still occupies its own range of positions
    rank = torch.arange(units.n, device=key.device) - units.expand(units.starts)
    return order[rank < units.expand(keep)]


#: Unsigned dtypes torch cannot index: gathered through the signed view of the same bits.
_SIGNED_VIEW = {getattr(torch, f"uint{b}"): getattr(torch, f"int{b}") for b in (16, 32, 64)
                if hasattr(torch, f"uint{b}")}


def take(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v[idx]`` along the first dimension, for every dtype (uint16/32/64 included)."""
    idx = idx.to(v.device)
    signed = _SIGNED_VIEW.get(v.dtype)
    if signed is None:
        return v.index_select(0, idx)
    return v.view(signed).index_select(0, idx).view(v.dtype)


def gather(batch: Batch, idx: torch.Tensor, counts: torch.Tensor | None, n: int,
           units: Units, coord: tuple[tuple[str, ...], torch.Tensor] | None = None) -> Batch:
    """Every per-point field of ``batch`` (first dimension ``n``) taken at ``idx``; ``offset``
    recomputed from the new per-unit ``counts``; per-unit and other keys carried unchanged.
    ``coord``: (names, xyz) from :func:`get_coord`; three fields of a planar ``xyz``'s dtype are
    gathered as its rows at once and stay planar (the next transform takes them as they are)."""
    rows = None
    if coord is not None:
        names, xyz = coord
        if len(names) == 3 and planar(xyz) and all(batch[c].dtype == xyz.dtype for c in names):
            rows = xyz.t().index_select(1, idx.to(xyz.device))
    out: Batch = {}
    for k, v in batch.items():
        if k == "offset":
            continue
        if rows is not None and k in names:
            out[k] = rows[names.index(k)]
        elif k in UNIT_KEYS or k in OTHER_KEYS or v.dim() == 0 or v.shape[0] != n:
            out[k] = v
        else:
            out[k] = take(v, idx)
    if units.has_offset:
        out["offset"] = torch.cumsum(counts, 0)
    return out


def num_points(batch: Batch, names: tuple[str, ...], who: str) -> int:
    return int(require(batch, names[0], who, "coord").shape[0])


def rand(shape, generator: torch.Generator | None, device, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


#: Values from which a Gaussian draw on a CPU is split into ``RNG_STREAMS`` streams (:func:`randn`).
RNG_SPLIT_MIN = 1 << 18
#: Streams a large Gaussian draw on a CPU is split into: fixed, so the values never depend on
#: the number of threads that draw them.
RNG_STREAMS = 4
_POOL: list = []                          # (pid, executor): a fork gets a pool of its own
_POOL_LOCK = threading.Lock()


def randn(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``out`` (contiguous) filled with N(0, 1) draws from ``generator``, and returned. On a CPU
    a draw of at least ``RNG_SPLIT_MIN`` values is ``RNG_STREAMS`` streams — each a generator
    seeded by one draw from ``generator`` — filling consecutive parts of ``out``, as many at
    once as there are intra-op threads: torch's CPU Gaussian draw runs on one thread, and is
    the largest serial part of the batch's transforms. The values depend only on the
    generator's state and the size, not on the threads."""
    flat = out.view(-1)
    n = flat.shape[0]
    if out.device.type != "cpu" or n < RNG_SPLIT_MIN:
        return torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype,
                           out=out)
    seeds = torch.randint(0, 1 << 62, (RNG_STREAMS,), generator=generator).tolist()
    parts = flat.chunk(RNG_STREAMS)

    def draw(i):
        g = torch.Generator().manual_seed(seeds[i])
        torch.randn(parts[i].shape, generator=g, dtype=out.dtype, out=parts[i])
    workers = min(torch.get_num_threads(), len(parts))
    if workers < 2:
        for i in range(len(parts)):
            draw(i)
        return out
    futures = [_pool().submit(draw, i) for i in range(1, len(parts))]
    draw(0)
    for f in futures:
        f.result()
    return out


def _pool():
    """A small thread pool for :func:`randn`, per process."""
    with _POOL_LOCK:
        if not _POOL or _POOL[0][0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor
            _POOL[:] = [(os.getpid(), ThreadPoolExecutor(RNG_STREAMS - 1,
                                                          thread_name_prefix="gds-randn"))]
        return _POOL[0][1]


def check_range(who: str, param: str, value, lo=None, hi=None, lo_open=False) -> None:
    """A numeric parameter in range, or a LoaderError naming the transform and the parameter."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LoaderError(f"{who}: {param} must be a number, got {value!r}") from None
    if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and v > hi):
        bound = (f"> {lo}" if lo_open else f">= {lo}") if lo is not None else ""
        if hi is not None:
            bound = (bound + " and " if bound else "") + f"<= {hi}"
        raise LoaderError(f"{who}: {param} must be {bound}, got {value!r}")


def check_pair(who: str, param: str, value) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise LoaderError(f"{who}: {param} must be a pair (low, high), got {value!r}") from None
    if not (a <= b):
        raise LoaderError(f"{who}: {param} must be (low, high) with low <= high, got {value!r}")
    return a, b
