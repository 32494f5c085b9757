"""Writing a dataset directory: streamed field files, checksums, optional origin and chunks.

See :class:`DatasetWriter`; publishing, cleanup after killed writers and the rule for what an
output directory may replace (``check_output_dir``) live in ``_publish.py``, which imports nothing
from here.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import _publish
from ._manifest import check_expansion, manifest_cap
from ._publish import check_output_dir, os_failure
from ._schema import (
    ALIGN,
    DEFAULT_BLOCK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MAX_BLOCK_BYTES,
    FieldSpec,
    align_up,
    check_field_name,
)
from .errors import ConversionError, DatasetError

log = logging.getLogger(__name__)

__all__ = ["DatasetWriter", "check_output_dir"]


class _FieldWriter:
    def __init__(self, spec: FieldSpec, path: Path, shown: Path, block_bytes: int):
        self.spec = spec
        self.path = path
        self.shown = shown  # the path the file will have once published (used in messages)
        try:
            self.f = open(path, "wb")
        except OSError as exc:
            raise os_failure(shown, "creating the field file", exc) from exc
        self.nbytes = 0
        self.block_bytes = block_bytes
        self.sums: list[int] = []
        self._crc = 0
        self._in_block = 0

    def write(self, data: memoryview) -> None:
        try:
            self.f.write(data)
        except OSError as exc:
            raise os_failure(self.shown, f"writing {len(data)} bytes", exc) from exc
        self.nbytes += len(data)
        pos = 0
        while pos < len(data):
            take = min(len(data) - pos, self.block_bytes - self._in_block)
            self._crc = zlib.crc32(data[pos:pos + take], self._crc)
            self._in_block += take
            pos += take
            if self._in_block == self.block_bytes:
                self.sums.append(self._crc)
                self._crc, self._in_block = 0, 0

    def finish(self) -> dict:
        if self._in_block:
            self.sums.append(self._crc)
            self._crc, self._in_block = 0, 0
        pad = align_up(self.nbytes) - self.nbytes
        try:
            if pad:
                self.f.write(b"\0" * pad)
            self.f.close()
        except OSError as exc:
            raise os_failure(self.shown, "finishing the field file", exc) from exc
        return {
            "name": self.spec.name,
            "dtype": self.spec.dtype.str,
            "components": self.spec.components,
            "file": self.path.name,
            "offset": 0,
            "nbytes": self.nbytes,
            "checksums": self.sums,
        }


def _origin(values: Sequence[float] | None, where: object) -> list[float] | None:
    if values is None:
        return None
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{where}: origin {values!r} is not 3 numbers") from exc
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ConversionError(f"{where}: origin must be 3 finite numbers, found {values!r}")
    return out


class DatasetWriter:
    """Streams scans into a new dataset directory, atomically.

    Data goes to a hidden temporary directory beside ``out_dir``; only a writer that finishes
    without error moves it into place (see ``_publish``), so a failed conversion never leaves a
    partial dataset that looks valid, a dataset that appeared meanwhile is not replaced unless
    ``overwrite``, and temp directories of killed writers are removed when the next one starts.
    Any failure to write (disk full, ...) is a :class:`ConversionError` naming the output file.
    Use as a context manager::

        with DatasetWriter(out, schema, origin=(ox, oy, oz), chunk_size=50.0) as w:
            w.append({"x": xs, "y": ys, ...})
            w.add_chunk(len(xs), cell=(i, j, 0), bounds=(x0, y0, z0, x1, y1, z1))
            w.end_scan("a.ply")

    ``origin`` (x, y, z, finite) is recorded in the manifest; it can also be set until
    ``finish`` through the ``origin`` attribute or :meth:`set_origin`. With ``chunk_size`` set,
    the dataset is spatially chunked: every point of every scan must belong to a chunk declared
    with :meth:`add_chunk`, in file order (a chunk may be declared before or after its points are
    appended, but :meth:`end_scan` checks that the scan's chunks cover exactly its points).
    """

    def __init__(self, out_dir: str | os.PathLike, schema: Sequence[FieldSpec],
                 overwrite: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 origin: Sequence[float] | None = None, chunk_size: float | None = None,
                 chunk_dims: int = 3):
        self._done = True
        self._writers: list[_FieldWriter] = []
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        if not schema:
            raise ConversionError(f"{self.out_dir}: no fields to write")
        self.schema = list(schema)
        for s in self.schema:
            check_field_name(s.name, str(self.out_dir))
        if not (isinstance(block_bytes, int) and ALIGN <= block_bytes <= MAX_BLOCK_BYTES
                and block_bytes % ALIGN == 0):
            raise ConversionError(f"{self.out_dir}: block_bytes must be a multiple of {ALIGN} "
                                  f"in [{ALIGN}, {MAX_BLOCK_BYTES}], found {block_bytes!r}")
        self.block_bytes = block_bytes
        self._origin = _origin(origin, self.out_dir)
        if chunk_size is not None and not (isinstance(chunk_size, (int, float))
                                           and math.isfinite(chunk_size) and chunk_size > 0):
            raise ConversionError(f"{self.out_dir}: chunk_size must be a finite number > 0, "
                                  f"found {chunk_size!r}")
        if chunk_dims not in (2, 3):
            raise ConversionError(f"{self.out_dir}: chunk_dims must be 2 or 3, found {chunk_dims!r}")
        self.chunk_size = chunk_size
        self.chunk_dims = chunk_dims
        self._chunk_offsets = [0]
        self._chunk_scan: list[int] = []
        self._chunk_cells: list[list[int]] = []
        self._chunk_bounds: list[list[float]] = []
        self.num_points = 0
        self.scan_offsets = [0]
        self.sources: list[dict] = []
        self._scan_points = 0
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            with _publish.parent_lock(self.out_dir.parent, self.out_dir):
                _publish.clean_stale(self.out_dir)
                check_output_dir(self.out_dir, overwrite)
                self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
                self.tmp.mkdir()
            self._done = False
            _publish.write_marker(self.tmp)
            for s in self.schema:
                self._writers.append(_FieldWriter(s, self.tmp / f"{s.name}.bin",
                                                  self.out_dir / f"{s.name}.bin", block_bytes))
        except OSError as exc:
            self.abort()
            raise os_failure(self.out_dir, "preparing the output directory", exc) from exc
        except BaseException:
            self.abort()
            raise

    # -- origin ------------------------------------------------------------------------------
    @property
    def origin(self) -> tuple[float, float, float] | None:
        """The dataset origin recorded in the manifest, or None (readers then see zeros)."""
        return None if self._origin is None else tuple(self._origin)  # type: ignore[return-value]

    @origin.setter
    def origin(self, values: Sequence[float] | None) -> None:
        self._origin = _origin(values, self.out_dir)

    def set_origin(self, values: Sequence[float] | None) -> None:
        """Same as assigning ``origin`` (x, y, z; finite); allowed until :meth:`finish`."""
        self.origin = values

    # -- data --------------------------------------------------------------------------------
    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append rows to the current scan: one array per field, all of the same length."""
        n = None
        for w in self._writers:
            try:
                a = columns[w.spec.name]
            except KeyError:
                raise ConversionError(f"{self.out_dir}: no column for field {w.spec.name!r}") from None
            rows = len(a)
            if n is None:
                n = rows
            elif rows != n:
                raise ConversionError(f"{w.spec.name}: {rows} rows where other fields have {n}")
            want_shape = (rows,) if w.spec.components == 1 else (rows, w.spec.components)
            a = np.ascontiguousarray(a, dtype=w.spec.dtype).reshape(want_shape)
            if rows:
                w.write(memoryview(a.reshape(-1).view(np.uint8)))
        self._scan_points += n or 0

    def add_chunk(self, num_points: int, cell: Sequence[int],
                  bounds: Sequence[float]) -> None:
        """Declare the next ``num_points`` (>= 1) points of the current scan one spatial chunk.

        ``cell`` is its grid cell (i, j, k; k = 0 for 2-D chunking), ``bounds`` the box of its
        points (xmin, ymin, zmin, xmax, ymax, zmax; finite, min <= max).
        """
        if self.chunk_size is None:
            raise ConversionError(f"{self.out_dir}: add_chunk() on a writer without chunk_size")
        if not (isinstance(num_points, (int, np.integer)) and num_points >= 1):
            raise ConversionError(f"{self.out_dir}: a chunk holds >= 1 points, found {num_points!r}")
        try:
            c = [operator.index(v) for v in cell]
            b = [float(v) for v in bounds]
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{self.out_dir}: chunk cell must be 3 integers and bounds 6 "
                                  f"numbers, found {cell!r}, {bounds!r}") from exc
        if len(c) != 3 or not all(-(1 << 63) <= v < (1 << 63) for v in c):
            raise ConversionError(f"{self.out_dir}: chunk cell must be 3 int64 values, found {cell!r}")
        if len(b) != 6 or not all(math.isfinite(v) for v in b) \
                or not all(b[i] <= b[i + 3] for i in range(3)):
            raise ConversionError(f"{self.out_dir}: chunk bounds must be 6 finite numbers "
                                  f"(min <= max), found {bounds!r}")
        self._chunk_offsets.append(self._chunk_offsets[-1] + int(num_points))
        self._chunk_scan.append(len(self.scan_offsets) - 1)
        self._chunk_cells.append(c)
        self._chunk_bounds.append(b)

    def end_scan(self, source: str, **info: object) -> None:
        """Close the current scan, recording where it came from."""
        end = self.num_points + self._scan_points
        if self.chunk_size is not None and self._chunk_offsets[-1] != end:
            raise ConversionError(
                f"{self.out_dir}: the chunks of scan {len(self.scan_offsets) - 1} ({source}) "
                f"end at point {self._chunk_offsets[-1]}, but the scan ends at {end}"
            )
        self.num_points = end
        self.scan_offsets.append(self.num_points)
        self.sources.append({"path": source, "points": self._scan_points, **info})
        self._scan_points = 0

    def _manifest(self, fields: list[dict]) -> dict:
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_points": self.num_points,
            "num_scans": len(self.scan_offsets) - 1,
            "alignment": ALIGN,
            "checksum": {"algorithm": "crc32", "block_bytes": self.block_bytes},
            "fields": fields,
            "sources": self.sources,
            "scan_offsets": self.scan_offsets,
        }
        if self._origin is not None:
            manifest["origin"] = self._origin
        if self.chunk_size is not None:
            manifest["chunks"] = {
                "size": self.chunk_size, "dims": self.chunk_dims,
                "offsets": self._chunk_offsets, "scan": self._chunk_scan,
                "cell": self._chunk_cells, "bounds": self._chunk_bounds,
            }
        return manifest

    def finish(self) -> Path:
        if self._done:
            raise ConversionError(f"{self.out_dir}: finish() on a finished or aborted writer")
        if self._scan_points:
            raise ConversionError(f"{self.out_dir}: finish() with an unfinished scan")
        if len(self.scan_offsets) < 2:
            raise ConversionError(f"{self.out_dir}: finish() before any end_scan(); a dataset "
                                  f"holds at least one (possibly empty) scan")
        fields = [w.finish() for w in self._writers]
        try:
            text = json.dumps(self._manifest(fields), indent=1, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{self.out_dir / MANIFEST}: cannot record the manifest "
                                  f"({exc})") from exc
        cap = manifest_cap(self.tmp)
        if len(text) + 1 > cap:
            chunks = len(self._chunk_offsets) - 1
            hint = (f"{chunks:,} spatial chunks for {self.num_points:,} points are too fine: use "
                    f"a larger chunk size" if chunks else "too many records for its data")
            raise ConversionError(f"{self.out_dir / MANIFEST}: the manifest would take "
                                  f"{len(text) + 1:,} bytes, more than a reader accepts for "
                                  f"this dataset ({cap:,}); {hint}")
        try:  # what a reader would refuse to parse is refused here, naming the cause
            check_expansion(text.encode(), self.out_dir / MANIFEST)
        except DatasetError as exc:
            raise ConversionError(
                f"{exc} (the manifest of {len(self.scan_offsets) - 1:,} scans and "
                f"{len(self._chunk_offsets) - 1:,} chunks: convert fewer files into one "
                f"dataset, or use a larger chunk size)") from None
        try:
            with open(self.tmp / MANIFEST, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise os_failure(self.out_dir / MANIFEST, "writing the manifest", exc) from exc
        try:
            with _publish.parent_lock(self.out_dir.parent, self.out_dir):
                _publish.publish(self.tmp, self.out_dir, self.overwrite)
        except OSError as exc:
            raise os_failure(self.out_dir, "moving the finished dataset into place", exc) from exc
        self._done = True
        log.info("wrote %s: %d points, %d scans", self.out_dir, self.num_points,
                 len(self.scan_offsets) - 1)
        return self.out_dir

    def abort(self) -> None:
        if self._done:
            return
        for w in self._writers:
            if not w.f.closed:
                try:
                    w.f.close()
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
