"""Reading ``manifest.json`` safely, and checking the types of the values it holds.

Everything here turns a bad input into a :class:`DatasetError` naming the manifest: a manifest
that is not a regular file (a FIFO, ``/dev/zero``, a directory), one far larger than any real
manifest, invalid or absurdly nested JSON, integers beyond int64, NaN where a coordinate goes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._schema import INT64_LIMIT
from .errors import DatasetError

#: A manifest holds, besides a few fixed keys, one crc32 per checksum block (<= 12 bytes of JSON
#: per block of >= 4 KiB), one offset and one source record per scan (a few hundred bytes), and
#: one record per spatial chunk (<= ~400 bytes). ``BASE`` covers the scans and sources of a
#: dataset of some hundred thousand scans with no data at all; ``PER_DATA_BYTE`` grants one byte
#: of manifest per 64 bytes of data in the directory, which covers the checksums with room to
#: spare and chunks down to ~25 KB of data each (a chunk is a training unit, far larger in
#: practice). ``ABS_MAX`` bounds what parsing may cost whatever the files claim (sparse files
#: can claim anything): Python's JSON objects take a few times the text's size in memory.
MANIFEST_BASE_BYTES = 64 << 20
MANIFEST_DATA_RATIO = 64
MANIFEST_ABS_MAX_BYTES = 1 << 30


def manifest_cap(directory: Path | int) -> int:
    """Largest manifest a dataset in ``directory`` (a path or a directory descriptor) can have,
    from the size of its data files."""
    data = 0
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.is_file():
                        data += entry.stat().st_size
                except (OSError, ValueError):
                    continue
    except (OSError, ValueError):
        pass
    return min(MANIFEST_ABS_MAX_BYTES, MANIFEST_BASE_BYTES + data // MANIFEST_DATA_RATIO)


def read_manifest(path: Path, cap: int, dir_fd: int | None = None) -> dict:
    """The JSON object in ``path``: a regular file of at most ``cap`` bytes, read with a bound.

    With ``dir_fd``, ``path.name`` is opened relative to that directory descriptor (``path``
    then only names the file in messages). The file is opened non-blocking, so a FIFO in its
    place never blocks, and checked with ``fstat`` on the opened descriptor (no window between
    check and read).
    """
    try:
        fd = (os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if dir_fd is None else
              os.open(path.name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file; expected a gds-stream dataset directory") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot open the manifest ({os_reason(exc)})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{path}: the manifest is not a regular file "
                               f"({file_kind(st.st_mode)})")
        if st.st_size > cap:
            raise DatasetError(f"{path}: manifest of {st.st_size} bytes is larger than any valid "
                               f"one for this directory (at most {cap} bytes)")
        chunks: list[bytes] = []
        got = 0
        while got <= cap:
            block = os.read(fd, min(1 << 20, cap + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
        if got > cap:
            raise DatasetError(f"{path}: manifest grew past {cap} bytes while being read")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the manifest ({os_reason(exc)})") from exc
    finally:
        os.close(fd)
    return parse_manifest(b"".join(chunks), path)


def parse_manifest(raw: bytes, path: object) -> dict:
    """The JSON object in a manifest's bytes (``path`` names it in messages)."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise DatasetError(f"{path}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, int digit limit
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# -- typed values --------------------------------------------------------------------------------
def want(cond: bool, path: object, what: str) -> None:
    if not cond:
        raise DatasetError(f"{path}: {what}")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_i64(v: object, lo: int = 0) -> bool:
    """An integer (not a bool) in ``[lo, 2**63)``."""
    return is_int(v) and lo <= v < INT64_LIMIT  # type: ignore[operator]


def is_finite(v: object) -> bool:
    """A JSON number (not a bool) that is finite as a float64."""
    if not (is_int(v) or isinstance(v, float)):
        return False
    try:
        return math.isfinite(float(v))  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float64
        return False


def short(v: object, limit: int = 60) -> str:
    """``repr`` of a manifest value, cut short (a lying value may be megabytes long)."""
    try:
        r = repr(v)
    except (ValueError, RecursionError):  # an int beyond the str-conversion limit
        return f"<{type(v).__name__}>"
    return r if len(r) <= limit else r[:limit] + "…"


def int_list(v: object, path: object, what: str, lo: int = 0) -> np.ndarray:
    """A JSON list of integers in ``[lo, 2**63)`` as a read-only int64 array."""
    want(isinstance(v, list) and all(is_i64(x, lo) for x in v), path,  # type: ignore[union-attr]
         f"{what} must be a list of integers in [{lo}, 2**63), found {short(v)}")
    arr = np.asarray(v, dtype=np.int64).reshape(-1)
    arr.setflags(write=False)
    return arr


def origin_value(v: object, path: object) -> np.ndarray:
    """A dataset origin: three finite numbers, as a read-only float64 array."""
    want(isinstance(v, list) and len(v) == 3 and all(is_finite(x) for x in v), path,
         f"origin must be a list of 3 finite numbers, found {short(v)}")
    arr = np.asarray(v, dtype=np.float64)
    want(bool(np.all(np.isfinite(arr))), path, f"origin {short(v)} is not finite as float64")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class ChunkTable:
    """The ``chunks`` record: spatial chunks, each a contiguous point range inside one scan."""

    size: float
    dims: int
    offsets: np.ndarray  # int64 (n + 1,), 0 .. num_points, strictly increasing
    scan: np.ndarray     # int64 (n,)
    cells: np.ndarray    # int64 (n, 3)
    bounds: np.ndarray   # float64 (n, 6): xmin, ymin, zmin, xmax, ymax, zmax

    @classmethod
    def empty(cls) -> "ChunkTable":
        return cls(0.0, 0, _ro(np.zeros(1, np.int64)), _ro(np.zeros(0, np.int64)),
                   _ro(np.zeros((0, 3), np.int64)), _ro(np.zeros((0, 6), np.float64)))


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def chunk_table(v: object, num_points: int, scan_offsets: np.ndarray, path: object) -> ChunkTable:
    """Validate a manifest's ``chunks`` record against the point count and the scans."""
    want(isinstance(v, dict), path, f"chunks must be an object, found {short(v)}")
    assert isinstance(v, dict)
    size, dims = v.get("size"), v.get("dims")
    want(is_finite(size) and size > 0, path,  # type: ignore[operator]
         f"chunks.size must be a finite number > 0, found {short(size)}")
    want(dims in (2, 3) and is_int(dims), path, f"chunks.dims must be 2 or 3, found {short(dims)}")
    offsets = int_list(v.get("offsets"), path, "chunks.offsets")
    want(len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == num_points, path,
         f"chunks.offsets must run from 0 to num_points={num_points}")
    want(bool(np.all(np.diff(offsets) > 0)), path,
         "chunks.offsets must increase strictly (every chunk holds at least one point)")
    n = len(offsets) - 1
    scan = int_list(v.get("scan"), path, "chunks.scan")
    want(len(scan) == n, path, f"chunks.scan has {len(scan)} entries, expected {n} (one per chunk)")
    num_scans = len(scan_offsets) - 1
    want(bool(np.all(scan < num_scans)), path, f"chunks.scan names a scan >= {num_scans}")
    if n:
        inside = (scan_offsets[scan] <= offsets[:-1]) & (offsets[1:] <= scan_offsets[scan + 1])
        bad = np.flatnonzero(~inside)
        want(len(bad) == 0, path,
             f"chunk {int(bad[0]) if len(bad) else 0} does not lie inside its scan "
             f"{int(scan[bad[0]]) if len(bad) else 0}")
    cells = v.get("cell")
    want(isinstance(cells, list) and len(cells) == n
         and all(isinstance(c, list) and len(c) == 3 and all(is_int(x) and -INT64_LIMIT <= x
                                                              < INT64_LIMIT for x in c)
                 for c in cells), path,
         f"chunks.cell must be a list of {n} [i, j, k] int64 triples")
    bounds = v.get("bounds")
    want(isinstance(bounds, list) and len(bounds) == n
         and all(isinstance(b, list) and len(b) == 6 and all(is_finite(x) for x in b)
                 for b in bounds), path,
         f"chunks.bounds must be a list of {n} [xmin, ymin, zmin, xmax, ymax, zmax] of finite numbers")
    barr = np.asarray(bounds, dtype=np.float64).reshape(n, 6)
    want(bool(np.all(np.isfinite(barr))) and bool(np.all(barr[:, :3] <= barr[:, 3:])), path,
         "chunks.bounds must be finite with min <= max on every axis")
    return ChunkTable(float(size), int(dims), offsets, scan,  # type: ignore[arg-type]
                      _ro(np.asarray(cells, dtype=np.int64).reshape(n, 3)), _ro(barr))
