"""The chunk sort's moving parts: temporary column files, Morton codes and cell keys, the cell →
curve-rank lookup, and an ordered, bounded map over a thread pool (see :mod:`.chunks` for the
passes that use them).

Temporary data is stored as *column blocks*: a block of ``n`` rows is every field's ``n`` values
in turn (``x[0:n]``, then ``y[0:n]``, ...), written with one ``pwritev`` and read back with one
``preadv`` straight into the destination arrays — no record (row) layout to convert to and
from, and no memory map, whose touched pages would count in the process's RSS. Every failing
system call becomes a :class:`ConversionError` naming the temporary file and the input.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ConversionError
from ..format import FieldSpec


def os_failure(path: object, what: str, exc: OSError, where: str) -> ConversionError:
    reason = exc.strerror or str(exc)
    return ConversionError(f"{path}: {what} failed ({reason}) while sorting {where} into "
                           f"spatial chunks (the sort needs the scan's rows twice in "
                           f"temporary space beside the output)")


class ColumnFile:
    """A temporary file of column blocks; ``where`` (the input) is named in its errors."""

    def __init__(self, path: Path, schema: Sequence[FieldSpec], where: str):
        self.path = path
        self.where = where
        self.specs = list(schema)
        self.row_bytes = [s.dtype.itemsize * s.components for s in self.specs]
        self.width = sum(self.row_bytes)
        #: Blocks appended with :meth:`append`: (byte offset, rows).
        self.blocks: list[tuple[int, int]] = []
        self.size = 0
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise os_failure(path, "creating a temporary file", exc, where) from exc

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {s.name: np.empty((n,) if s.components == 1 else (n, s.components), s.dtype)
                for s in self.specs}

    def _views(self, cols: dict[str, np.ndarray], a: int, b: int) -> list[memoryview]:
        return [memoryview(cols[s.name][a:b].reshape(-1).view(np.uint8)) for s in self.specs]

    def _pwritev(self, bufs: list[memoryview], offset: int) -> None:
        try:
            _all_of(os.pwritev, self.fd, bufs, offset, "no progress")
        except OSError as exc:
            raise os_failure(self.path, f"writing {sum(len(b) for b in bufs)} bytes", exc,
                             self.where) from exc

    def _preadv(self, bufs: list[memoryview], offset: int) -> None:
        try:
            _all_of(os.preadv, self.fd, bufs, offset, "the file ended early")
        except OSError as exc:
            raise os_failure(self.path, "reading temporary data", exc, self.where) from exc

    def reserve(self, n: int) -> tuple[int, int]:
        """The place of the next block, of ``n`` rows, at the end of the file."""
        block = (self.size, n)
        self.blocks.append(block)
        self.size += n * self.width
        return block

    def write_block(self, cols: dict[str, np.ndarray], block: tuple[int, int]) -> None:
        """Write the rows of ``cols`` (stored dtypes, contiguous) as ``block``."""
        self._pwritev(self._views(cols, 0, block[1]), block[0])

    def write_rows(self, block: tuple[int, int], start: int, cols: dict[str, np.ndarray],
                   a: int, b: int) -> None:
        """Write rows ``a:b`` of ``cols`` at row ``start`` of ``block`` (laid out in advance)."""
        offset, n = block
        for s, rb, view in zip(self.specs, self.row_bytes, self._views(cols, a, b)):
            self._pwritev([view], offset + start * rb)
            offset += n * rb

    def read(self, block: tuple[int, int], start: int, count: int,
             into: dict[str, np.ndarray] | None = None, at: int = 0) -> dict[str, np.ndarray]:
        """Rows ``start:start + count`` of ``block`` (into ``into[at:]`` when given)."""
        offset, n = block
        cols = self.empty(count) if into is None else into
        views = self._views(cols, at, at + count)
        if start == 0 and count == n:  # the whole block: one call
            self._preadv(views, offset)
        else:
            for rb, view in zip(self.row_bytes, views):
                self._preadv([view], offset + start * rb)
                offset += n * rb
        return cols

    def read_blocks(self, blocks: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
        """The rows of ``blocks``, in order, as one array per field."""
        cols = self.empty(sum(n for _, n in blocks))
        at = 0
        for block in blocks:
            self.read(block, 0, block[1], cols, at)
            at += block[1]
        return cols

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise os_failure(self.path, "removing a temporary file", exc, self.where) from exc


def spread_bits(v: np.ndarray, dims: int) -> np.ndarray:
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
        code |= spread_bits(cells[:, d], dims) << np.uint64(d)
    return code


def pack_floors(floors: Sequence[np.ndarray], lo: np.ndarray, span: np.ndarray,
                   exact: bool) -> np.ndarray:
    """``pack`` of the cells whose per-axis floors (float64) are ``floors``: computed in float64
    where the box is below 2**53 (exact), else through int64."""
    if not exact:
        return pack(np.stack(floors, axis=1).astype(np.int64), lo, span)
    key = floors[0] - float(lo[0])
    for d in range(1, len(floors)):
        key *= float(span[d])
        key += floors[d] - float(lo[d])  # exact: integers below 2**53 at every step
    return key.astype(np.int64)


def unpack(packed: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """The cell rows (int64, (n, dims)) of ``pack``ed keys."""
    keys = np.empty((len(packed), len(span)), dtype=np.int64)
    for d in range(len(span) - 1, -1, -1):
        keys[:, d] = packed % span[d] + lo[d]
        packed = packed // span[d]
    return keys


def index_bits(n: int) -> int:
    return max(1, int(n).bit_length())


def pack(cells: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """One int64 key per cell row, row-major over the box ``lo`` .. ``lo + span``."""
    rel = cells - lo
    key = rel[:, 0].copy()
    for d in range(1, cells.shape[1]):
        key *= span[d]
        key += rel[:, d]
    return key


class CellIndex:
    """Each point's cell as its rank in curve order: a dense table over the cells' box where
    that is small, else a binary search over the packed cells."""

    #: Largest dense table (entries of 4 bytes), and how much sparser than the cells it may be.
    DENSE_MAX = 1 << 24
    DENSE_RATIO = 16

    def __init__(self, keys: np.ndarray, lo: np.ndarray, span: np.ndarray):
        self.lo, self.span = lo, span
        packed = pack(keys, lo, span)
        box = int(np.prod(span.astype(object)))
        if box <= max(self.DENSE_MAX // 64, min(self.DENSE_MAX, self.DENSE_RATIO * len(keys))):
            self.table = np.full(box, -1, dtype=np.int32)
            self.table[packed] = np.arange(len(keys), dtype=np.int32)
            self.sorted = None
        else:
            self.table = None
            self.by_packed = np.argsort(packed)
            self.sorted = packed[self.by_packed]

    def rank(self, floors: Sequence[np.ndarray]) -> np.ndarray:
        """Curve rank (int64) of the cells whose per-axis floors (float64) are ``floors``
        (known cells only)."""
        if self.table is not None:  # a box below 2**24: exact in float64
            key = floors[0] - float(self.lo[0])
            for d in range(1, len(floors)):
                key *= float(self.span[d])
                key += floors[d] - float(self.lo[d])
            return self.table[key.astype(np.intp)].astype(np.int64)
        packed = pack(np.stack(floors, axis=1).astype(np.int64), self.lo, self.span)
        return self.by_packed[np.searchsorted(self.sorted, packed)]


def ordered_map(pool: Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``fn(item)`` for each item, in order, at most ``ahead`` computed ahead of the consumer;
    what is still pending when the consumer stops is cancelled (or awaited, if running)."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                try:
                    f.result()
                except Exception:  # already failing or stopped: the first error wins
                    pass


def _all_of(op, fd: int, bufs: list[memoryview], offset: int, short: str) -> None:
    """``os.pwritev``/``os.preadv`` until every byte of ``bufs`` moved (they may stop short);
    an op that moves nothing raises ``OSError(short)``."""
    bufs = [b for b in bufs if len(b)]
    while bufs:
        done = op(fd, bufs, offset)
        if done <= 0:
            raise OSError(0, short)
        offset += done
        while bufs and done >= len(bufs[0]):
            done -= len(bufs[0])
            bufs.pop(0)
        if bufs and done:
            bufs[0] = bufs[0][done:]
