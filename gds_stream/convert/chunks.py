"""Spatial chunking of one scan during conversion, with bounded memory.

Within a scan, every point goes to the grid cell of edge ``size`` it falls in (on x, y — or x,
y, z), cells are ordered along a Morton (Z-order) curve so that neighbouring chunks lie near
each other on disk, and the points of a cell are ordered along a finer Morton curve inside it
(1/1024 of the cell), so a chunk is spatially coherent too. A chunk is one non-empty cell.

The scan is sorted out of core, in three streaming passes over temporary files beside the output
(same file system), with positioned reads and appends only — no memory maps, whose touched pages
would count in the process's RSS — so memory holds a slice of rows and a table of cells, whatever
the scan's size:

1. :meth:`ScanChunker.append`: each row (every field, and its cell) goes, in input order, to one
   temporary file of fixed-size records; the points of every cell are counted.
2. :meth:`ScanChunker.write_to`: the cells are put in curve order and grouped into *buckets* of
   consecutive cells holding at most ``BUCKET_BYTES`` of records; the records are read back a
   slice at a time and appended to their bucket's file.
3. each bucket is read whole, sorted by cell and finer curve, and appended to the dataset writer
   with one :meth:`DatasetWriter.add_chunk` per cell. (A single cell larger than a bucket is
   written a slice at a time in input order.)

Disk, temporarily: the scan's records twice (each field, plus 8 bytes per axis).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConversionError
from ..format import FieldSpec

log = logging.getLogger(__name__)

#: Rows a pass reads or converts at a time.
PASS_ROWS = 1 << 20
#: Records a bucket holds at most (bytes): what pass 3 sorts in memory at once.
BUCKET_BYTES = 64 << 20
#: Bits of the Morton code per axis: 3 × 21 = 63 bits (2-D: 2 × 31).
_BITS = {2: 31, 3: 21}
#: Subdivisions of a cell per axis for the order of points inside it.
FINE = 1024
XYZ = ("x", "y", "z")


def _spread(v: np.ndarray, dims: int) -> np.ndarray:
    """Spread the bits of ``v`` (uint64) so that ``dims`` codes interleave."""
    v = v.astype(np.uint64)
    if dims == 2:
        masks = [(16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                 (2, 0x3333333333333333), (1, 0x5555555555555555)]
        v &= np.uint64(0x7FFFFFFF)
    else:
        masks = [(32, 0x001F00000000FFFF), (16, 0x001F0000FF0000FF), (8, 0x100F00F00F00F00F),
                 (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249)]
        v &= np.uint64(0x1FFFFF)
    for shift, mask in masks:
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton(cells: np.ndarray) -> np.ndarray:
    """Morton codes (uint64) of non-negative integer cells, shape (n, dims)."""
    dims = cells.shape[1]
    code = np.zeros(len(cells), dtype=np.uint64)
    for d in range(dims):
        code |= _spread(cells[:, d], dims) << np.uint64(d)
    return code


def _take(rec: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``rec[order]`` for records, moved as rows of bytes (much faster than a structured take)."""
    rows = rec.view(np.uint8).reshape(len(rec), rec.dtype.itemsize)
    return rows[order].view(rec.dtype).reshape(len(order))


def _count_cells(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``cells`` (int64, (n, dims)) and how often each occurs — through one
    int64 key per row where the slice's extent allows (a 1-D sort, several times faster than
    ``np.unique(axis=0)``)."""
    lo = cells.min(axis=0)
    span = cells.max(axis=0) - lo + 1
    if float(np.prod(span.astype(np.float64))) >= 2.0**62:
        return np.unique(cells, axis=0, return_counts=True)
    uniq, counts = np.unique(_pack(cells, lo, span), return_counts=True)
    out = np.empty((len(uniq), cells.shape[1]), dtype=np.int64)
    for d in range(cells.shape[1] - 1, -1, -1):
        out[:, d] = uniq % span[d] + lo[d]
        uniq = uniq // span[d]
    return out, counts


def _pack(cells: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """One int64 key per cell row, row-major over the box ``lo`` .. ``lo + span``."""
    rel = cells - lo
    key = rel[:, 0].copy()
    for d in range(1, cells.shape[1]):
        key = key * span[d] + rel[:, d]
    return key


def check_options(size: object, dims: object, where: str = "") -> None:
    """``--chunk-size`` / ``--chunk-dims`` usable, else a :class:`ConversionError`."""
    at = f"{where}: " if where else ""
    if not (isinstance(size, (int, float)) and not isinstance(size, bool)
            and math.isfinite(size) and size > 0):
        raise ConversionError(f"{at}--chunk-size must be a finite number > 0, found {size!r}")
    if dims not in (2, 3):
        raise ConversionError(f"{at}--chunk-dims must be 2 or 3, found {dims!r}")


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


class ScanChunker:
    """Collects one scan's rows, then writes them to a :class:`DatasetWriter` chunk by chunk."""

    def __init__(self, schema: Sequence[FieldSpec], size: float, dims: int, tmp_parent: Path,
                 where: str):
        check_options(size, dims, where)
        check_schema(schema, where)
        self.schema = list(schema)
        self.size = float(size)
        self.dims = dims
        self.where = where
        fields = [(s.name, s.dtype, (s.components,)) if s.components > 1 else (s.name, s.dtype)
                  for s in self.schema]
        self.record = np.dtype(fields + [("\0cell", "<i8", (dims,))])
        self.tmp = Path(tempfile.mkdtemp(prefix=".chunking-", dir=tmp_parent))
        self._rows = open(self.tmp / "rows", "wb")
        self._counts: dict[tuple[int, ...], int] = {}
        self.num_points = 0

    # -- pass 1 -------------------------------------------------------------------------------
    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        n = len(columns[self.schema[0].name])
        if n == 0:
            return
        xyz = [np.asarray(columns[a], dtype=np.float64) for a in XYZ[:self.dims]]
        for a, v in zip(XYZ, xyz):
            if not np.isfinite(v).all():
                bad = int(np.flatnonzero(~np.isfinite(v))[0])
                raise ConversionError(f"{self.where}: point {self.num_points + bad} has a "
                                      f"non-finite {a} ({v[bad]}); spatial chunks need finite "
                                      f"coordinates")
        cells = np.stack([np.floor(v / self.size) for v in xyz], axis=1)
        if np.abs(cells).max(initial=0) >= 2**62:
            raise ConversionError(f"{self.where}: coordinates too large for --chunk-size "
                                  f"{self.size:g}")
        rec = np.empty(n, dtype=self.record)
        rec["\0cell"] = cells
        cells = rec["\0cell"]
        uniq, counts = _count_cells(cells)
        for c, k in zip(map(tuple, uniq.tolist()), counts.tolist()):
            self._counts[c] = self._counts.get(c, 0) + k
        for s in self.schema:
            rec[s.name] = columns[s.name]
        self._rows.write(memoryview(rec.view(np.uint8)))
        self.num_points += n

    # -- passes 2 and 3 -----------------------------------------------------------------------
    def write_to(self, writer) -> int:
        """Sort the scan by cell into ``writer`` (declaring its chunks); returns the number of
        chunks. The caller then ends the scan."""
        self._rows.close()
        if self.num_points == 0:
            return 0
        keys = np.array(sorted(self._counts), dtype=np.int64).reshape(-1, self.dims)
        counts = np.array([self._counts[tuple(k)] for k in keys.tolist()], dtype=np.int64)
        self._counts = {}
        lo = keys.min(axis=0)
        span = keys.max(axis=0) - lo
        if int(span.max()) >= 2 ** _BITS[self.dims]:
            raise ConversionError(
                f"{self.where}: {int(span.max()) + 1} cells of {self.size:g} along one axis are "
                f"more than the chunk grid orders (2**{_BITS[self.dims]}); use a larger "
                f"--chunk-size")
        order = np.argsort(morton(keys - lo), kind="stable")
        keys, counts = keys[order], counts[order]
        buckets = self._buckets(counts)
        self._distribute(keys, lo, span + 1, buckets)
        self._emit(writer, keys, counts, buckets, lo, span + 1)
        return len(keys)

    def _buckets(self, counts: np.ndarray) -> np.ndarray:
        """Cell index where each bucket starts (and the end): consecutive cells of at most
        ``BUCKET_BYTES`` of records, a larger cell alone."""
        per = max(1, BUCKET_BYTES // self.record.itemsize)
        bounds, n = [0], 0
        for i, c in enumerate(counts.tolist()):
            if n and n + c > per:
                bounds.append(i)
                n = 0
            n += c
        bounds.append(len(counts))
        return np.asarray(bounds, dtype=np.int64)

    def _read(self, path: Path, first: int, count: int) -> np.ndarray:
        return np.fromfile(path, dtype=self.record, count=count,
                           offset=first * self.record.itemsize)

    def _distribute(self, keys, lo, span, buckets) -> None:
        """Pass 2: every record to the file of its bucket (appends, a slice at a time)."""
        packed = _pack(keys, lo, span)
        by_packed = np.argsort(packed)
        packed_sorted = packed[by_packed]
        bucket_of_cell = np.repeat(np.arange(len(buckets) - 1), np.diff(buckets))
        rows = self.tmp / "rows"
        for a in range(0, self.num_points, PASS_ROWS):
            rec = self._read(rows, a, min(PASS_ROWS, self.num_points - a))
            rank = by_packed[np.searchsorted(packed_sorted,
                                             _pack(rec["\0cell"], lo, span))]
            bucket = bucket_of_cell[rank]
            order = np.argsort(bucket, kind="stable")
            rec, bucket = _take(rec, order), bucket[order]
            cut = np.flatnonzero(np.diff(bucket)) + 1
            for part in np.split(np.arange(len(rec)), cut):
                with open(self.tmp / f"bucket-{int(bucket[part[0]])}", "ab") as f:
                    f.write(memoryview(rec[part[0]:part[-1] + 1].view(np.uint8)))
        os.remove(rows)

    def _emit(self, writer, keys: np.ndarray, counts: np.ndarray, buckets: np.ndarray,
              lo: np.ndarray, span: np.ndarray) -> None:
        """Pass 3: each bucket sorted by cell, then by the finer curve, into the writer."""
        per = max(1, BUCKET_BYTES // self.record.itemsize)
        for b in range(len(buckets) - 1):
            c, e = int(buckets[b]), int(buckets[b + 1])
            path = self.tmp / f"bucket-{b}"
            total = int(counts[c:e].sum())
            if e - c == 1 and total > per:  # one huge cell: in slices, input order
                log.info("%s: chunk %s holds %d points, more than a sort bucket; its points "
                         "keep their input order", self.where, keys[c].tolist(), total)
                for a in range(0, total, per):
                    rec = self._read(path, a, min(per, total - a))
                    writer.append({s.name: rec[s.name] for s in self.schema})
                self._declare(writer, keys[c:e], counts[c:e], self._bounds_of(path, total))
                os.remove(path)
                continue
            rec = self._read(path, 0, total)
            os.remove(path)
            # each record's cell, as its index among the bucket's cells (curve order)
            packed = _pack(keys[c:e], lo, span)
            srt = np.argsort(packed)
            local = srt[np.searchsorted(packed[srt], _pack(rec["\0cell"], lo, span))]
            xyz = np.stack([rec[ax].astype(np.float64) for ax in XYZ], 1)
            base = keys[c + local][:, :self.dims] * self.size
            fine = np.clip(((xyz[:, :self.dims] - base) / self.size * FINE).astype(np.int64),
                           0, FINE - 1)
            # one int64 key: the cell's place in the bucket, then the finer curve (<= 30 bits)
            order = np.argsort((local.astype(np.int64) << 30) | morton(fine).astype(np.int64),
                               kind="stable")
            rec, xyz = _take(rec, order), xyz[order]
            writer.append({s.name: rec[s.name] for s in self.schema})
            seg = np.concatenate([[0], np.cumsum(counts[c:e])[:-1]])
            bounds = np.concatenate([np.minimum.reduceat(xyz, seg, axis=0),
                                     np.maximum.reduceat(xyz, seg, axis=0)], axis=1)
            self._declare(writer, keys[c:e], counts[c:e], bounds)

    def _bounds_of(self, path: Path, total: int) -> np.ndarray:
        per = max(1, BUCKET_BYTES // self.record.itemsize)
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for a in range(0, total, per):
            rec = self._read(path, a, min(per, total - a))
            xyz = np.stack([rec[ax].astype(np.float64) for ax in XYZ], 1)
            lo, hi = np.minimum(lo, xyz.min(0)), np.maximum(hi, xyz.max(0))
        return np.concatenate([lo, hi])[None, :]

    def _declare(self, writer, keys: np.ndarray, counts: np.ndarray, bounds: np.ndarray) -> None:
        for k in range(len(keys)):
            cell = keys[k].tolist() + [0] * (3 - self.dims)
            writer.add_chunk(int(counts[k]), cell=cell, bounds=bounds[k].tolist())

    def close(self) -> None:
        """Remove the temporary files (idempotent)."""
        if not self._rows.closed:
            self._rows.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ScanChunker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
