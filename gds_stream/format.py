"""The on-disk dataset format: a directory with ``manifest.json`` and one data file per field.

Layout rules (see ``DESIGN.md``):

* each field's values are one contiguous little-endian run starting at a 4 KiB-aligned offset of
  its file, and the file is padded with zeros to a 4 KiB multiple, so an aligned over-read of any
  point range never runs past the end of the file;
* a batch of k fields is therefore k large reads, and reading ``x`` never touches the labels;
* stored dtypes are the source's (int labels stay int), only the byte order is normalised;
* every ``block_bytes`` of every field carry a zlib crc32, recomputed by ``verify``.

Opening validates every claim of the manifest against the files before anything is read, so a
manifest that lies gives a :class:`~gds_stream.errors.DatasetError`, never a crash, a huge
allocation or a read past the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import ConversionError, DatasetError

log = logging.getLogger(__name__)

FORMAT_NAME = "gds-stream"
FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
MANIFEST = "manifest.json"
ALIGN = 4096
DEFAULT_BLOCK_BYTES = 4 << 20
#: Upper bounds that keep a lying manifest from asking for absurd allocations.
MAX_COMPONENTS = 4096
MAX_MANIFEST_BYTES = 512 << 20
#: Names a batch dict already uses, so no field may take them.
RESERVED_NAMES = frozenset({"offset"})
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ALLOWED_KINDS = "iuf"


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def align_down(n: int, a: int = ALIGN) -> int:
    return (n // a) * a


def check_field_name(name: str, where: str) -> None:
    """Raise :class:`DatasetError` unless ``name`` can be a field (and a file) name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DatasetError(
            f"{where}: field name {name!r} is not usable; expected letters, digits and '_' "
            f"(at most 64, not starting with a digit)"
        )
    if name in RESERVED_NAMES:
        raise DatasetError(f"{where}: field name {name!r} is reserved for batch metadata")


def stored_dtype(dtype: np.dtype | str, where: str = "dtype") -> np.dtype:
    """The little-endian form of a numeric dtype, or :class:`DatasetError` if it can't be stored."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DatasetError(f"{where}: {dtype!r} is not a numpy dtype") from exc
    if dt.kind not in _ALLOWED_KINDS or dt.itemsize > 8 or dt.subdtype is not None:
        raise DatasetError(
            f"{where}: dtype {dt.str!r} cannot be stored; expected an int, uint or float scalar"
        )
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


@dataclass(frozen=True)
class FieldSpec:
    """One field of a schema: its name, stored dtype and number of components per point."""

    name: str
    dtype: np.dtype
    components: int = 1

    @property
    def point_bytes(self) -> int:
        """Bytes one point takes in this field."""
        return self.dtype.itemsize * self.components

    def describe(self) -> str:
        comp = f"×{self.components}" if self.components != 1 else ""
        return f"{self.name}:{self.dtype.name}{comp}"


@dataclass(frozen=True)
class FieldLayout:
    """Where a field lives on disk, and the crc32 of each of its blocks."""

    spec: FieldSpec
    file: str
    offset: int
    nbytes: int
    checksums: tuple[int, ...]


def _read_json(path: Path) -> dict:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file; expected a gds-stream dataset directory") from None
    if size > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{path}: manifest of {size} bytes is larger than any valid one")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _want(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise DatasetError(f"{path}: {what}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Dataset:
    """An opened, validated dataset directory. Use :func:`open_dataset`.

    ``read(field, start, stop)`` is the plain reference read that loaders are tested against.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            if self.path.exists():
                raise DatasetError(f"{self.path}: not a directory; expected a gds-stream dataset")
            raise DatasetError(f"{self.path}: no such directory")
        mpath = self.path / MANIFEST
        doc = _read_json(mpath)
        _want(doc.get("format") == FORMAT_NAME, mpath,
              f"format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
        version = doc.get("version")
        _want(version in KNOWN_VERSIONS, mpath,
              f"unknown format version {version!r}; this gds-stream reads versions "
              f"{', '.join(map(str, KNOWN_VERSIONS))}")
        n = doc.get("num_points")
        _want(_is_int(n) and n >= 0, mpath, f"num_points must be an integer >= 0, found {n!r}")
        self.num_points: int = n
        self._validate_scans(doc, mpath)
        ck = doc.get("checksum", {})
        _want(isinstance(ck, dict) and ck.get("algorithm") == "crc32", mpath,
              f"checksum algorithm must be 'crc32', found {ck!r}")
        bb = ck.get("block_bytes")
        _want(_is_int(bb) and bb > 0 and bb % ALIGN == 0, mpath,
              f"checksum block_bytes must be a positive multiple of {ALIGN}, found {bb!r}")
        self.block_bytes: int = bb
        self.sources: list[dict] = list(doc.get("sources", []))
        self._layouts: dict[str, FieldLayout] = {}
        fields = doc.get("fields")
        _want(isinstance(fields, list) and len(fields) > 0, mpath,
              "expected a non-empty list of fields")
        for i, fd in enumerate(fields):
            lay = self._validate_field(fd, i, mpath)
            _want(lay.spec.name not in self._layouts, mpath,
                  f"field {lay.spec.name!r} appears twice")
            self._layouts[lay.spec.name] = lay
        self._fds: dict[str, int] = {}

    # -- validation ---------------------------------------------------------------------------
    def _validate_scans(self, doc: dict, mpath: Path) -> None:
        offs = doc.get("scan_offsets")
        _want(isinstance(offs, list) and len(offs) >= 2 and all(_is_int(o) for o in offs), mpath,
              "scan_offsets must be a list of at least two integers")
        arr = np.asarray(offs, dtype=np.int64)
        _want(arr[0] == 0 and arr[-1] == self.num_points, mpath,
              f"scan_offsets must run from 0 to num_points={self.num_points}, "
              f"found {int(arr[0])}..{int(arr[-1])}")
        _want(bool(np.all(np.diff(arr) >= 0)), mpath, "scan_offsets must not decrease")
        self.scan_offsets: np.ndarray = arr
        self.scan_offsets.setflags(write=False)

    def _validate_field(self, fd: object, i: int, mpath: Path) -> FieldLayout:
        _want(isinstance(fd, dict), mpath, f"fields[{i}] must be an object")
        assert isinstance(fd, dict)
        name = fd.get("name")
        check_field_name(name, f"{mpath}: fields[{i}]")  # type: ignore[arg-type]
        where = f"{mpath}: field {name!r}"
        dt = stored_dtype(fd.get("dtype"), where)  # type: ignore[arg-type]
        _want(dt.byteorder in "<|=", mpath, f"field {name!r}: dtype must be little-endian")
        comp = fd.get("components", 1)
        _want(_is_int(comp) and 1 <= comp <= MAX_COMPONENTS, mpath,
              f"field {name!r}: components must be an integer in 1..{MAX_COMPONENTS}, "
              f"found {comp!r}")
        spec = FieldSpec(name, dt, comp)
        fname = fd.get("file")
        _want(isinstance(fname, str) and fname != "", mpath,
              f"field {name!r}: file must be a non-empty string")
        root = os.path.realpath(self.path)
        full = os.path.realpath(os.path.join(root, fname))
        _want(not os.path.isabs(fname) and os.path.commonpath([root, full]) == root
              and full != root, mpath,
              f"field {name!r}: file {fname!r} lies outside the dataset directory")
        off = fd.get("offset", 0)
        _want(_is_int(off) and off >= 0 and off % ALIGN == 0, mpath,
              f"field {name!r}: offset must be a multiple of {ALIGN}, found {off!r}")
        nbytes = fd.get("nbytes")
        expect = self.num_points * spec.point_bytes
        _want(nbytes == expect, mpath,
              f"field {name!r}: nbytes is {nbytes!r}, expected {expect} "
              f"({self.num_points} points × {spec.point_bytes} bytes)")
        try:
            size = os.stat(full).st_size
        except FileNotFoundError:
            raise DatasetError(f"{full}: no such file (named by {mpath}, field {name!r})") from None
        need = off + align_up(expect)
        _want(size >= need, Path(full),
              f"file holds {size} bytes, but the manifest needs {need} "
              f"(field {name!r}: offset {off} + {expect} bytes padded to {ALIGN})")
        sums = fd.get("checksums")
        nblocks = -(-expect // self.block_bytes)
        _want(isinstance(sums, list) and len(sums) == nblocks
              and all(_is_int(s) and 0 <= s < 2**32 for s in sums), mpath,
              f"field {name!r}: expected {nblocks} crc32 checksums, "
              f"found {len(sums) if isinstance(sums, list) else sums!r}")
        return FieldLayout(spec, os.path.relpath(full, root), off, expect, tuple(sums))

    # -- public API ---------------------------------------------------------------------------
    @property
    def schema(self) -> dict[str, FieldSpec]:
        """Ordered field name → :class:`FieldSpec` (stored dtype and components)."""
        return {k: v.spec for k, v in self._layouts.items()}

    @property
    def num_scans(self) -> int:
        return len(self.scan_offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes of point data over all fields (without padding)."""
        return sum(v.nbytes for v in self._layouts.values())

    def layout(self, name: str) -> FieldLayout:
        try:
            return self._layouts[name]
        except KeyError:
            raise DatasetError(
                f"{self.path}: no field {name!r}; fields are {', '.join(self._layouts)}"
            ) from None

    def field_path(self, name: str) -> Path:
        return self.path / self.layout(name).file

    def fileno(self, name: str) -> int:
        """A read-only descriptor of the field's file, opened once and kept until ``close``."""
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self.field_path(name), os.O_RDONLY)
            self._fds[name] = fd
        return fd

    def byte_range(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """File offset and length of points ``[start, stop)`` of a field."""
        lay = self.layout(name)
        pb = lay.spec.point_bytes
        return lay.offset + start * pb, (stop - start) * pb

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Points ``[start, stop)`` of one field as a new array: shape (n,) or (n, components)."""
        lay = self.layout(name)
        stop = self.num_points if stop is None else stop
        if not (0 <= start <= stop <= self.num_points):
            raise DatasetError(
                f"{self.path}: read of points [{start}, {stop}) is outside [0, {self.num_points})"
            )
        spec = lay.spec
        out = np.empty((stop - start) * spec.components, dtype=spec.dtype)
        off, length = self.byte_range(name, start, stop)
        pread_into(self.fileno(name), memoryview(out).cast("B"), off, self.field_path(name))
        return out.reshape(-1, spec.components) if spec.components > 1 else out

    def verify(self, progress: Callable[[int], None] | None = None) -> list[tuple[str, int, int, int]]:
        """Recompute every block checksum. Returns ``(field, block, expected, found)`` mismatches."""
        bad = []
        buf = np.empty(self.block_bytes, dtype=np.uint8)
        for name, lay in self._layouts.items():
            fd = self.fileno(name)
            for b, want in enumerate(lay.checksums):
                n = min(self.block_bytes, lay.nbytes - b * self.block_bytes)
                view = memoryview(buf)[:n]
                pread_into(fd, view, lay.offset + b * self.block_bytes, self.field_path(name))
                got = zlib.crc32(view)
                if got != want:
                    bad.append((name, b, want, got))
                if progress is not None:
                    progress(n)
        return bad

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        fields = ", ".join(s.describe() for s in self.schema.values())
        return (f"Dataset({str(self.path)!r}, points={self.num_points}, scans={self.num_scans}, "
                f"fields=[{fields}])")


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open and validate a dataset directory (raises :class:`DatasetError` on any inconsistency)."""
    return Dataset(path)


def pread_into(fd: int, view: memoryview, offset: int, path: object = "") -> None:
    """Fill ``view`` (a byte memoryview) from ``fd`` at ``offset``, looping over short reads."""
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise DatasetError(
                f"{path}: file ended at byte {offset + done}, expected {total - done} more bytes"
            )
        done += n


# -- writing -------------------------------------------------------------------------------------
class _FieldWriter:
    def __init__(self, spec: FieldSpec, path: Path, block_bytes: int):
        self.spec = spec
        self.path = path
        self.f = open(path, "wb")
        self.nbytes = 0
        self.block_bytes = block_bytes
        self.sums: list[int] = []
        self._crc = 0
        self._in_block = 0

    def write(self, data: memoryview) -> None:
        self.f.write(data)
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
        pad = align_up(self.nbytes) - self.nbytes
        if pad:
            self.f.write(b"\0" * pad)
        self.f.close()
        return {
            "name": self.spec.name,
            "dtype": self.spec.dtype.str,
            "components": self.spec.components,
            "file": self.path.name,
            "offset": 0,
            "nbytes": self.nbytes,
            "checksums": self.sums,
        }


class DatasetWriter:
    """Streams scans into a new dataset directory, atomically.

    Data goes to a hidden temporary directory beside ``out_dir``; only a writer that finishes
    without error renames it into place, so a failed conversion never leaves a partial dataset
    that looks valid. Use as a context manager::

        with DatasetWriter(out, schema) as w:
            w.append({"x": xs, "y": ys, ...}); w.end_scan("a.ply")
    """

    def __init__(self, out_dir: str | os.PathLike, schema: Sequence[FieldSpec],
                 overwrite: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES):
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir, overwrite)
        if not schema:
            raise ConversionError(f"{self.out_dir}: no fields to write")
        self.schema = list(schema)
        for s in self.schema:
            check_field_name(s.name, str(self.out_dir))
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.num_points = 0
        self.scan_offsets = [0]
        self.sources: list[dict] = []
        self._writers: list[_FieldWriter] = []
        try:
            for s in self.schema:
                self._writers.append(_FieldWriter(s, self.tmp / f"{s.name}.bin", block_bytes))
        except BaseException:
            self._done = False
            self.abort()
            raise
        self.block_bytes = block_bytes
        self._scan_points = 0
        self._done = False

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append rows to the current scan: one array per field, all of the same length."""
        n = None
        for w in self._writers:
            a = columns[w.spec.name]
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

    def end_scan(self, source: str, **info: object) -> None:
        """Close the current scan, recording where it came from."""
        self.num_points += self._scan_points
        self.scan_offsets.append(self.num_points)
        self.sources.append({"path": source, "points": self._scan_points, **info})
        self._scan_points = 0

    def finish(self) -> Path:
        if self._scan_points:
            raise ConversionError(f"{self.out_dir}: finish() with an unfinished scan")
        fields = [w.finish() for w in self._writers]
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
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
            os.rename(self.tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out_dir)
        self._done = True
        log.info("wrote %s: %d points, %d scans", self.out_dir, self.num_points,
                 len(self.scan_offsets) - 1)
        return self.out_dir

    def abort(self) -> None:
        if self._done:
            return
        for w in self._writers:
            if not w.f.closed:
                w.f.close()
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


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite``; refuse a file in its place."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise ConversionError(
                    f"{out_dir}: output directory is not empty; pass --overwrite "
                    f"(overwrite=True) to replace it"
                )
            if not (out_dir / MANIFEST).is_file():
                raise ConversionError(
                    f"{out_dir}: refusing to overwrite a non-empty directory that holds no "
                    f"{MANIFEST} (it is not a gds-stream dataset)"
                )
