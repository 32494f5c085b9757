"""Spatial chunking of one scan during conversion, with bounded memory.

Within a scan, every point goes to the grid cell of edge ``size`` it falls in (on x, y — or x,
y, z), cells are ordered along a Morton (Z-order) curve so that neighbouring chunks lie near
each other on disk, and the points of a cell are ordered along a finer Morton curve inside it
(1/1024 of the cell), so a chunk is spatially coherent too. A chunk is one non-empty cell.

The scan is sorted out of core, a counting sort in three streaming passes over temporary files
beside the output (same file system), so memory holds one row chunk and a table of cells,
whatever the scan's size:

1. :meth:`ScanChunker.append`: rows (in input order) go to one temporary file per field, each
   row's cell to a cell file; the points of every cell are counted.
2. :meth:`ScanChunker.write_to`: rows are read back a slice at a time and scattered, grouped by
   cell, to their final positions in a second set of temporary files (the cell order is known
   from the counts);
3. the cells are read back in order, a run of cells at a time, sorted inside each cell and
   appended to the dataset writer with one :meth:`DatasetWriter.add_chunk` per cell.

Disk, temporarily: the scan's rows twice plus 8 bytes per point and axis for the cells.
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

#: Rows a pass handles at a time (bounded memory: this many rows of every field).
PASS_ROWS = 1 << 20
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


class ScanChunker:
    """Collects one scan's rows, then writes them to a :class:`DatasetWriter` chunk by chunk."""

    def __init__(self, schema: Sequence[FieldSpec], size: float, dims: int, tmp_parent: Path,
                 where: str):
        if not (isinstance(size, (int, float)) and not isinstance(size, bool)
                and math.isfinite(size) and size > 0):
            raise ConversionError(f"{where}: --chunk-size must be a finite number > 0, "
                                  f"found {size!r}")
        if dims not in (2, 3):
            raise ConversionError(f"{where}: --chunk-dims must be 2 or 3, found {dims!r}")
        names = [s.name for s in schema]
        missing = [a for a in XYZ if a not in names]
        if missing:
            raise ConversionError(f"{where}: spatial chunks need fields x, y and z; the schema "
                                  f"has no {', '.join(missing)}")
        for a in XYZ:
            spec = next(s for s in schema if s.name == a)
            if spec.components != 1:
                raise ConversionError(f"{where}: field {a!r} has {spec.components} components; "
                                      f"spatial chunks need scalar x, y and z")
        self.schema = list(schema)
        self.size = float(size)
        self.dims = dims
        self.where = where
        self.tmp = Path(tempfile.mkdtemp(prefix=".chunking-", dir=tmp_parent))
        self._files = {s.name: open(self.tmp / f"{s.name}.in", "wb") for s in self.schema}
        self._cells = open(self.tmp / "cells.in", "wb")
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
        cells = cells.astype(np.int64)
        uniq, counts = np.unique(cells, axis=0, return_counts=True)
        for c, k in zip(map(tuple, uniq.tolist()), counts.tolist()):
            self._counts[c] = self._counts.get(c, 0) + k
        for s in self.schema:
            a = np.ascontiguousarray(columns[s.name], dtype=s.dtype)
            self._files[s.name].write(memoryview(a.reshape(-1).view(np.uint8)))
        self._cells.write(memoryview(cells.reshape(-1).view(np.uint8)))
        self.num_points += n

    # -- passes 2 and 3 -----------------------------------------------------------------------
    def write_to(self, writer) -> int:
        """Sort the scan by cell into ``writer`` (declaring its chunks); returns the number of
        chunks. The caller then ends the scan."""
        for f in [*self._files.values(), self._cells]:
            f.close()
        n = self.num_points
        if n == 0:
            return 0
        keys = np.array(sorted(self._counts), dtype=np.int64).reshape(-1, self.dims)
        counts = np.array([self._counts[tuple(k)] for k in keys.tolist()], dtype=np.int64)
        lo = keys.min(axis=0)
        span = keys.max(axis=0) - lo
        if int(span.max()) >= 2 ** _BITS[self.dims]:
            raise ConversionError(
                f"{self.where}: {int(span.max()) + 1} cells of {self.size:g} along one axis are "
                f"more than the chunk grid orders (2**{_BITS[self.dims]}); use a larger "
                f"--chunk-size")
        order = np.argsort(morton(keys - lo), kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.concatenate([[0], np.cumsum(counts)])
        # packed cell key -> rank along the curve, for the scatter pass
        dims_span = (span + 1).astype(np.int64)
        packed = self._pack(keys, lo, dims_span)
        by_packed = np.argsort(packed)
        packed_sorted = packed[by_packed]
        self._scatter(n, lo, dims_span, packed_sorted, by_packed, starts)
        self._emit(writer, keys, counts, starts)
        return len(keys)

    def _pack(self, cells: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
        rel = cells - lo
        key = rel[:, 0].copy()
        for d in range(1, self.dims):
            key = key * span[d] + rel[:, d]
        return key

    def _scatter(self, n: int, lo, span, packed_sorted, by_packed, starts) -> None:
        cells_in = np.memmap(self.tmp / "cells.in", dtype=np.int64, mode="r",
                             shape=(n, self.dims))
        outs, ins = {}, {}
        for s in self.schema:
            shape = (n, s.components) if s.components > 1 else (n,)
            ins[s.name] = np.memmap(self.tmp / f"{s.name}.in", dtype=s.dtype, mode="r",
                                    shape=shape)
            outs[s.name] = np.memmap(self.tmp / f"{s.name}.out", dtype=s.dtype, mode="w+",
                                     shape=shape)
        cursor = starts[:-1].copy()
        for a in range(0, n, PASS_ROWS):
            b = min(n, a + PASS_ROWS)
            rank = by_packed[np.searchsorted(packed_sorted,
                                             self._pack(np.asarray(cells_in[a:b]), lo, span))]
            order = np.argsort(rank, kind="stable")
            r = rank[order]
            first = np.concatenate([[True], r[1:] != r[:-1]])
            group_start = np.flatnonzero(first)
            group_len = np.diff(np.concatenate([group_start, [len(r)]]))
            within = np.arange(len(r)) - np.repeat(group_start, group_len)
            pos = cursor[r] + within
            cursor[r[group_start]] += group_len
            for s in self.schema:
                outs[s.name][pos] = ins[s.name][a:b][order]
        for m in outs.values():
            m.flush()
        del outs, ins, cells_in
        for s in self.schema:
            os.remove(self.tmp / f"{s.name}.in")

    def _emit(self, writer, keys: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> None:
        n = int(starts[-1])
        sorted_ = {}
        for s in self.schema:
            shape = (n, s.components) if s.components > 1 else (n,)
            sorted_[s.name] = np.memmap(self.tmp / f"{s.name}.out", dtype=s.dtype, mode="r",
                                        shape=shape)
        c = 0
        while c < len(keys):
            # a run of whole cells of about PASS_ROWS points (at least one cell)
            e = int(np.searchsorted(starts, starts[c] + PASS_ROWS, side="right")) - 1
            e = max(e, c + 1)
            a, b = int(starts[c]), int(starts[e])
            xyz = np.stack([np.asarray(sorted_[ax][a:b], dtype=np.float64) for ax in XYZ], 1)
            cell_of_row = np.repeat(np.arange(c, e), counts[c:e])
            base = keys[cell_of_row][:, :self.dims] * self.size
            fine = np.clip(((xyz[:, :self.dims] - base) / self.size * FINE).astype(np.int64),
                           0, FINE - 1)
            order = np.lexsort((morton(fine), cell_of_row))
            writer.append({s.name: np.asarray(sorted_[s.name][a:b])[order] for s in self.schema})
            seg = starts[c:e] - a
            mins = np.minimum.reduceat(xyz[order], seg, axis=0)
            maxs = np.maximum.reduceat(xyz[order], seg, axis=0)
            for k in range(e - c):
                cell = keys[c + k].tolist() + [0] * (3 - self.dims)
                writer.add_chunk(int(counts[c + k]), cell=cell,
                                 bounds=(*mins[k].tolist(), *maxs[k].tolist()))
            c = e
        del sorted_

    def close(self) -> None:
        """Remove the temporary files (idempotent)."""
        for f in [*self._files.values(), self._cells]:
            if not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ScanChunker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
