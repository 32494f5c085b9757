"""Spatial chunking of one scan during conversion, with bounded memory, on every core.

Within a scan, every point goes to the grid cell of edge ``size`` it falls in (on x, y — or x,
y, z), cells are ordered along a Morton (Z-order) curve so that neighbouring chunks lie near
each other on disk, and the points of a cell are ordered along a finer Morton curve inside it
(1/1024 of the cell), ties in input order, so a chunk is spatially coherent too. A chunk is one
non-empty cell.

The scan is sorted out of core, in streaming passes over temporary files of column blocks
beside the output (:mod:`._chunkio`), so memory holds slices of rows, the buckets being sorted
and a table of cells, whatever the scan's size:

1. :meth:`ScanChunker.append` (*read*): each slice of rows is checked (finite x, y, z, a cell
   the grid can order), its cells are counted into the cell table, and it is appended to the
   temporary file as it came.
2. :meth:`ScanChunker.write_to`, *sort*: the cells are put in curve order and grouped into
   *buckets* of consecutive cells holding at most ``BUCKET_BYTES`` (rows plus 8 bytes per axis
   each); each slice is split by bucket and written to its bucket's place in a second file
   (skipped when the scan is one bucket).
3. *write*: each bucket is read whole, sorted by one 64-bit key (its cell's curve rank, the
   finer curve, the input position — one vectorised sort), and appended to the dataset writer
   with one :meth:`DatasetWriter.add_chunk` per cell. A single cell larger than a bucket is
   written a slice at a time in input order.

Passes 2 and 3 run on ``WORKERS`` threads (numpy's kernels and the file I/O release the GIL):
slices and buckets are computed in parallel and consumed in order, so the output does not
depend on the number of workers. Memory: at most ``WORKERS + 1`` buckets in flight, each
about twice its rows plus 8 bytes per point (a 64 MiB bucket of 15-byte rows: ~100 MiB).

The cell table holds 8 bytes per axis and one count per cell; a scan whose cells already need a
manifest larger than any reader accepts for the dataset is refused during pass 1, as soon as
the count shows it (see :func:`chunk_limit`).

Disk, temporarily: the scan's rows twice.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .._manifest import MANIFEST_ABS_MAX_BYTES, MANIFEST_BASE_BYTES, MANIFEST_DATA_RATIO, short
from .._schema import align_up
from ..errors import ConversionError
from ..format import FieldSpec
from ._chunkio import (CellIndex, ColumnFile, index_bits, morton, ordered_map, os_failure, pack,
                       pack_floors, spread_bits, unpack)

log = logging.getLogger(__name__)

#: Rows a pass reads or converts at a time.
PASS_ROWS = 1 << 20
#: Rows a bucket holds at most, in bytes of rows plus 8 per axis: what pass 3 sorts at once.
BUCKET_BYTES = 64 << 20
#: Threads that sort slices and buckets (the output does not depend on it).
WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Bits of the Morton code per axis: 3 × 21 = 63 bits (2-D: 2 × 31).
_BITS = {2: 31, 3: 21}
#: Subdivisions of a cell per axis for the order of points inside it.
FINE = 1024
XYZ = ("x", "y", "z")
#: ``spread_bits`` of 0 .. FINE - 1, per dims: the finer curve by table lookup.
_FINE_SPREAD = {d: spread_bits(np.arange(FINE), d) for d in (2, 3)}


def check_options(size: object, dims: object, where: str = "") -> tuple[float, int]:
    """``--chunk-size`` / ``--chunk-dims`` as a float and an int (numpy numbers too), else a
    :class:`ConversionError`."""
    at = f"{where}: " if where else ""
    try:
        value = (float(size) if isinstance(size, numbers.Real) and not isinstance(size, bool)
                 else math.nan)
    except OverflowError:  # an int beyond any float
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise ConversionError(f"{at}--chunk-size must be a finite number > 0, found "
                              f"{short(size)}")
    if isinstance(dims, bool) or not isinstance(dims, numbers.Integral) or int(dims) not in (2, 3):
        raise ConversionError(f"{at}--chunk-dims must be 2 or 3, found {short(dims)}")
    return value, int(dims)


def check_schema(schema: Sequence[FieldSpec], where: object) -> None:
    """Scalar x, y and z in ``schema``, else a :class:`ConversionError` naming ``where``."""
    by_name = {s.name: s for s in schema}
    missing = [a for a in XYZ if a not in by_name]
    if missing:
        raise ConversionError(f"{where}: --chunk-size needs fields x, y and z; the schema has "
                              f"no {', '.join(missing)}")
    for a in XYZ:
        if by_name[a].components != 1:
            raise ConversionError(f"{where}: field {a!r} has {by_name[a].components} "
                                  f"components; spatial chunks need scalar x, y and z")


def _manifest_len(k: int) -> int:
    return len(json.dumps({"chunks": {"size": 1.0, "dims": 2, "offsets": [0] * (k + 1),
                                      "scan": [0] * k, "cell": [[0, 0, 0]] * k,
                                      "bounds": [[0.0] * 6] * k}}, indent=1))


#: Bytes a chunk takes at least in the manifest (as the writer serialises it, with the shortest
#: values a chunk can have).
MANIFEST_BYTES_PER_CHUNK = _manifest_len(2) - _manifest_len(1)


@dataclass
class ChunkLimit:
    """The most chunks a dataset can declare before its manifest must exceed what a reader
    accepts: ``cap`` (an upper bound of the reader's bound) // ``per_chunk``."""

    cap: int
    per_chunk: int = MANIFEST_BYTES_PER_CHUNK
    #: Chunks already declared by earlier scans.
    declared: int = 0

    @property
    def max_chunks(self) -> int:
        return max(0, self.cap // self.per_chunk - self.declared)


def chunk_limit(schema: Sequence[FieldSpec], num_points: int) -> ChunkLimit:
    """The limit for a dataset of ``num_points`` rows of ``schema``: the reader's manifest bound
    grows with the data files (see ``gds_stream._manifest.manifest_cap``), here taken at its
    largest for that many points."""
    data = sum(align_up(num_points * s.dtype.itemsize * s.components) for s in schema)
    data += 1 << 20  # anything else the directory may hold
    cap = MANIFEST_BASE_BYTES + data // MANIFEST_DATA_RATIO
    return ChunkLimit(min(MANIFEST_ABS_MAX_BYTES, cap))


class ScanChunker:
    """Collects one scan's rows, then writes them to a :class:`DatasetWriter` chunk by chunk.

    ``limit``: refuse the scan during :meth:`append` once its cells need more chunks than it
    allows (None: no limit here; the writer still checks the manifest at the end)."""

    def __init__(self, schema: Sequence[FieldSpec], size: float, dims: int, tmp_parent: Path,
                 where: str, limit: ChunkLimit | None = None):
        self.size, self.dims = check_options(size, dims, where)
        check_schema(schema, where)
        self.schema = list(schema)
        self.where = where
        self.limit = limit
        self.width = sum(s.dtype.itemsize * s.components for s in self.schema)
        self.num_points = 0
        self._keys = np.empty((0, dims), dtype=np.int64)
        self._counts = np.empty(0, dtype=np.int64)
        self._buckets_file: ColumnFile | None = None
        self._pending: deque = deque()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=".chunking-", dir=tmp_parent))
        except OSError as exc:
            raise os_failure(tmp_parent, "creating a temporary directory", exc, where) from exc
        try:
            self._rows = ColumnFile(self.tmp / "rows", self.schema, where)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="gds-stream-chunks")

    # -- pass 1 -------------------------------------------------------------------------------
    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Add rows (one array per field). They are copied: the caller may reuse its arrays.
        Slices are checked, counted and written by the workers; an error is raised here (or by
        :meth:`write_to`) for the first failing slice, in input order."""
        n = len(columns[self.schema[0].name])
        if n == 0:
            return
        cols = {}
        for s in self.schema:
            shape = (n,) if s.components == 1 else (n, s.components)
            cols[s.name] = np.array(columns[s.name], dtype=s.dtype, order="C").reshape(shape)
        for a in range(0, n, PASS_ROWS):
            b = min(n, a + PASS_ROWS)
            block = self._rows.reserve(b - a)
            part = {k: v[a:b] for k, v in cols.items()}
            self._pending.append(self._pool.submit(self._pass1, part, block, self.num_points))
            self.num_points += b - a
            while len(self._pending) > WORKERS:
                self._merge(*self._pending.popleft().result())

    def _pass1(self, part: dict[str, np.ndarray], block: tuple[int, int], first: int):
        """One slice: its cells checked and counted (unique rows, counts), its rows written."""
        floors = self._checked_floors(part, first)
        n = block[1]
        lo = np.array([f.min() for f in floors]).astype(np.int64)
        hi = np.array([f.max() for f in floors]).astype(np.int64)
        self._check_grid(hi - lo)
        span = hi - lo + 1
        box = math.prod(int(v) for v in span)
        packed = pack_floors(floors, lo, span, exact=box < 2**53)
        if box <= 4 * n:
            hist = np.bincount(packed, minlength=box)
            uniq = np.flatnonzero(hist)
            counts = hist[uniq]
        else:
            uniq, counts = np.unique(packed, return_counts=True)
        self._rows.write_block(part, block)
        return unpack(uniq, lo, span), counts.astype(np.int64), first + n

    def _checked_floors(self, part: Mapping[str, np.ndarray], first: int) -> list[np.ndarray]:
        """``floor(coordinate / size)`` per chunk axis (float64); a non-finite coordinate (any
        axis: the chunk's bounds hold all three) or a cell beyond the grid is an error naming
        the input and the point."""
        for a in XYZ:
            finite = np.isfinite(part[a])
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                raise ConversionError(f"{self.where}: point {first + bad} has a non-finite {a} "
                                      f"({part[a][bad]}); spatial chunks need finite coordinates")
        floors = []
        for a in XYZ[:self.dims]:
            with np.errstate(all="ignore"):
                f = np.divide(part[a], self.size, dtype=np.float64)
            np.floor(f, out=f)
            if not (-2.0**62 < f.min() and f.max() < 2.0**62):
                bad = int(np.flatnonzero(~(np.abs(f) < 2.0**62))[0])
                raise ConversionError(
                    f"{self.where}: point {first + bad} has {a} = {float(part[a][bad]):g}, whose "
                    f"cell at --chunk-size {self.size:g} is {f[bad]:g}: coordinates too large for "
                    f"the chunk grid; use a larger --chunk-size")
            floors.append(f)
        return floors

    def _merge(self, keys: np.ndarray, counts: np.ndarray, end: int) -> None:
        """Add a slice's cells to the table of cells and their counts (sorted unique rows);
        refuse the scan once they need more chunks than the limit allows."""
        if len(self._keys):
            lo = np.minimum(keys.min(axis=0), self._keys.min(axis=0))
            hi = np.maximum(keys.max(axis=0), self._keys.max(axis=0))
            self._check_grid(hi - lo)
            span = hi - lo + 1
            allp = np.concatenate([pack(self._keys, lo, span), pack(keys, lo, span)])
            allc = np.concatenate([self._counts, counts])
            order = np.argsort(allp, kind="stable")
            allp = allp[order]
            starts = np.flatnonzero(np.concatenate([[True], allp[1:] != allp[:-1]]))
            keys, counts = unpack(allp[starts], lo, span), np.add.reduceat(allc[order], starts)
        self._keys, self._counts = keys, counts
        if self.limit is not None and len(keys) > self.limit.max_chunks:
            need = (len(keys) + self.limit.declared) * self.limit.per_chunk
            raise ConversionError(
                f"{self.where}: --chunk-size {self.size:g} makes at least {len(keys):,} spatial "
                f"chunks of its first {end:,} points; their manifest would take at least "
                f"{need:,} bytes, more than a reader accepts for this dataset "
                f"({self.limit.cap:,}); use a larger --chunk-size")

    def _check_grid(self, extent: np.ndarray) -> None:
        if int(extent.max()) >= 2 ** _BITS[self.dims]:
            raise ConversionError(
                f"{self.where}: {int(extent.max()) + 1} cells of {self.size:g} along one axis are "
                f"more than the chunk grid orders (2**{_BITS[self.dims]}); use a larger "
                f"--chunk-size")

    # -- passes 2 and 3 -----------------------------------------------------------------------
    def write_to(self, writer, on_sort: Callable[[int], None] | None = None,
                 on_write: Callable[[int], None] | None = None) -> int:
        """Sort the scan by cell into ``writer`` (declaring its chunks); returns the number of
        chunks. The caller then ends the scan. ``on_sort`` / ``on_write`` are told the points
        each step of passes 2 and 3 has done (for progress bars)."""
        while self._pending:
            self._merge(*self._pending.popleft().result())
        if self.num_points == 0:
            return 0
        keys, counts = self._keys, self._counts
        lo = keys.min(axis=0)
        span = keys.max(axis=0) - lo + 1
        self._check_grid(span - 1)
        order = np.argsort(morton(keys - lo), kind="stable")
        keys, counts = keys[order], counts[order]
        self._keys = self._counts = None
        plan = _Plan(self, keys, counts, CellIndex(keys, lo, span))
        if len(plan.buckets) == 2:  # one bucket: the rows file is it
            blocks = [(self._rows, self._rows.blocks)]
            if on_sort:
                on_sort(self.num_points)
        else:
            out = plan.distribute(self._pool, on_sort)
            blocks = [(out, [b]) for b in out.blocks]
            self._rows.remove()
        plan.emit(self._pool, writer, blocks, on_write)
        return len(keys)

    def close(self) -> None:
        """Stop the workers and remove the temporary files (idempotent)."""
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for f in (self._rows, self._buckets_file):
            if f is not None:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ScanChunker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Plan:
    """Passes 2 and 3 of one scan: its cells in curve order, their buckets, the cell lookup."""

    def __init__(self, chunker: ScanChunker, keys: np.ndarray, counts: np.ndarray,
                 index: CellIndex):
        self.c = chunker
        self.keys, self.counts, self.index = keys, counts, index
        self.per = max(1, BUCKET_BYTES // (chunker.width + 8 * chunker.dims))
        bounds, n = [0], 0
        for i, k in enumerate(counts.tolist()):
            if n and n + k > self.per:
                bounds.append(i)
                n = 0
            n += k
        bounds.append(len(counts))
        #: Cell index where each bucket starts (and the end).
        self.buckets = np.asarray(bounds, dtype=np.int64)
        self.sizes = np.add.reduceat(counts, self.buckets[:-1])

    def floors(self, cols: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Each row's cell, per axis, as pass 1 computed it (float64)."""
        out = []
        for a in XYZ[:self.c.dims]:
            with np.errstate(all="ignore"):
                f = np.divide(cols[a], self.c.size, dtype=np.float64)
            out.append(np.floor(f, out=f))
        return out

    # -- pass 2 -------------------------------------------------------------------------------
    def distribute(self, pool, on_sort) -> ColumnFile:
        c = self.c
        out = c._buckets_file = ColumnFile(c.tmp / "buckets", c.schema, c.where)
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]) * c.width
        out.blocks = list(zip(starts.tolist(), self.sizes.tolist()))
        bucket_of_rank = np.repeat(np.arange(len(self.sizes), dtype=np.uint64),
                                   np.diff(self.buckets))
        items = [(block, a, min(PASS_ROWS, block[1] - a))
                 for block in c._rows.blocks for a in range(0, block[1], PASS_ROWS)]

        def split(item):
            block, a, n = item
            cols = c._rows.read(block, a, n)
            bucket = bucket_of_rank[self.index.rank(self.floors(cols))]
            lo, hi = int(bucket.min()), int(bucket.max())
            if hi - lo < 4:  # a few buckets (the usual case: slices are local): by masks
                parts = [bucket == b for b in range(lo, hi + 1)]
                sizes = [int(m.sum()) for m in parts]
                present = [b for b, k in zip(range(lo, hi + 1), sizes) if k]
                out_cols = {k: np.concatenate([v[m] for m in parts]) for k, v in cols.items()}
                ends = np.cumsum([k for k in sizes if k])
                return present, [0, *ends[:-1].tolist()], ends.tolist(), out_cols, n
            bits = index_bits(n - 1)
            key = bucket << np.uint64(bits)
            key |= np.arange(n, dtype=np.uint64)
            key.sort()
            bucket = key >> np.uint64(bits)
            order = (key & np.uint64((1 << bits) - 1)).astype(np.intp)
            cut = np.flatnonzero(bucket[1:] != bucket[:-1]) + 1
            first = np.concatenate([[0], cut])
            ends = np.concatenate([cut, [n]])
            return (bucket[first].tolist(), first.tolist(), ends.tolist(),
                    {k: v.take(order, axis=0) for k, v in cols.items()}, n)

        filled = [0] * len(self.sizes)
        for present, first, ends, cols, n in ordered_map(pool, split, items, WORKERS):
            for b, s, e in zip(present, first, ends):
                out.write_rows(out.blocks[b], filled[b], cols, s, e)
                filled[b] += e - s
            if on_sort:
                on_sort(n)
        return out

    # -- pass 3 -------------------------------------------------------------------------------
    def emit(self, pool, writer, blocks, on_write) -> None:
        def sort(b):
            c, e = int(self.buckets[b]), int(self.buckets[b + 1])
            if e - c == 1 and int(self.sizes[b]) > self.per:
                return None  # one cell larger than a bucket: streamed by the consumer
            f, parts = blocks[0] if len(blocks) == 1 else blocks[b]
            return self._sorted(f.read_blocks(parts), c, e)

        for b, done in enumerate(ordered_map(pool, sort, range(len(self.sizes)), WORKERS)):
            c, e = int(self.buckets[b]), int(self.buckets[b + 1])
            if done is None:
                f, parts = blocks[0] if len(blocks) == 1 else blocks[b]
                bounds = self._stream(writer, f, parts, c)
            else:
                cols, bounds = done
                writer.append(cols)
            for k in range(e - c):
                cell = self.keys[c + k].tolist() + [0] * (3 - self.c.dims)
                writer.add_chunk(int(self.counts[c + k]), cell=cell, bounds=bounds[k].tolist())
            if on_write:
                on_write(int(self.sizes[b]))

    def _sorted(self, cols: dict[str, np.ndarray], c: int, e: int):
        """The bucket of cells ``c:e`` sorted by (cell, finer curve, input order), and the
        bounds of each cell's points."""
        ch, dims = self.c, self.c.dims
        n = len(cols["x"])
        fine_bits, idx_bits = 10 * dims, index_bits(n - 1)
        one_key = index_bits(e - c - 1) + fine_bits + idx_bits <= 64
        key = np.empty(n, dtype=np.uint64 if one_key else np.int64)
        lut = _FINE_SPREAD[dims]
        for a in range(0, n, PASS_ROWS):
            b = min(n, a + PASS_ROWS)
            coords = [cols[ax][a:b].astype(np.float64) for ax in XYZ[:dims]]
            floors = [np.floor(v / ch.size) for v in coords]  # as pass 1 computed them
            local = (self.index.rank(floors) - c).astype(np.uint64)
            code = np.zeros(b - a, dtype=np.uint64)
            for d, v in enumerate(coords):
                # as floor((x - cell * size) / size * FINE), clipped, in float64
                v -= floors[d] * ch.size
                v /= ch.size
                v *= FINE
                fine = v.astype(np.int64)
                np.clip(fine, 0, FINE - 1, out=fine)
                code |= lut[fine] << np.uint64(d)
            if one_key:
                k = (local << np.uint64(fine_bits + idx_bits)) | (code << np.uint64(idx_bits))
                k |= np.arange(a, b, dtype=np.uint64)
                key[a:b] = k
            else:  # as many cells as that in one bucket: a stable sort
                key[a:b] = ((local << np.uint64(30)) | code).astype(np.int64)
        if one_key:
            key.sort()
            order = (key & np.uint64((1 << idx_bits) - 1)).astype(np.intp)
        else:
            order = np.argsort(key, kind="stable")
        del key
        out = {k: v.take(order, axis=0) for k, v in cols.items()}
        seg = np.concatenate([[0], np.cumsum(self.counts[c:e])[:-1]])
        lo = [np.minimum.reduceat(out[ax], seg).astype(np.float64) for ax in XYZ]
        hi = [np.maximum.reduceat(out[ax], seg).astype(np.float64) for ax in XYZ]
        return out, np.stack(lo + hi, axis=1)

    def _stream(self, writer, f: ColumnFile, parts, c: int) -> np.ndarray:
        log.info("%s: chunk %s holds %d points, more than a sort bucket; its points keep their "
                 "input order", self.c.where, self.keys[c].tolist(), int(self.counts[c]))
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for block in parts:
            for a in range(0, block[1], PASS_ROWS):
                cols = f.read(block, a, min(PASS_ROWS, block[1] - a))
                writer.append(cols)
                lo = np.minimum(lo, [float(cols[ax].min()) for ax in XYZ])
                hi = np.maximum(hi, [float(cols[ax].max()) for ax in XYZ])
        return np.concatenate([lo, hi])[None, :]
