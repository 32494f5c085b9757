"""The on-disk dataset format: a directory with ``manifest.json`` and one data file per field.

Layout rules (README, "On-disk format"):

* each field's values are one contiguous little-endian run starting at a 4 KiB-aligned offset of
  its file, and the file is padded with zeros to a 4 KiB multiple, so an aligned over-read of any
  point range never runs past the end of the file;
* a batch of k fields is therefore k large reads, and reading ``x`` never touches the labels;
* stored dtypes are the source's (int labels stay int), only the byte order is normalised;
* every ``block_bytes`` of every field carry a zlib crc32, recomputed by ``verify``;
* optional records: ``origin`` (x, y, z stored relative to it) and ``chunks`` (spatial chunks,
  each a contiguous point range inside one scan). Readers that predate them may ignore them: the
  data layout is the same, so the format version stays 1.

Opening validates every claim of the manifest against the files before anything is read, so a
manifest that lies gives a :class:`~gds_stream.errors.DatasetError`, never a crash, a hang, a huge
allocation or a read past the end.

An opened dataset is one snapshot: the directory is opened once, and the manifest and every field
file are opened relative to that descriptor and kept open, so reads (and loaders, which duplicate
these descriptors) see the files the manifest describes even after the dataset is replaced by
``convert --overwrite`` or removed. An open that races a replacement starts again on the new
directory. A file cut short in place gives a ``DatasetError`` when read.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._lifetime import Closeable, check_stamp, fd_limit_hint, pread_into
from ._manifest import (
    ChunkTable,
    check_disjoint,
    chunk_table,
    file_kind,
    int_list,
    is_i64,
    manifest_cap,
    origin_value,
    os_reason,
    printable,
    read_manifest,
    short,
    want,
)
from ._schema import (
    ALIGN,
    DEFAULT_BLOCK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    KNOWN_VERSIONS,
    MANIFEST,
    MAX_BLOCK_BYTES,
    MAX_COMPONENTS,
    MAX_FIELDS,
    RESERVED_NAMES,
    FieldLayout,
    FieldSpec,
    align_down,
    align_up,
    check_field_name,
    manifest_dtype,
    stored_dtype,
)
from .errors import DatasetError
from .writer import DatasetWriter, check_output_dir

__all__ = [
    "ALIGN", "DEFAULT_BLOCK_BYTES", "FORMAT_NAME", "FORMAT_VERSION", "KNOWN_VERSIONS", "MANIFEST",
    "MAX_BLOCK_BYTES", "MAX_COMPONENTS", "RESERVED_NAMES", "Dataset", "DatasetWriter",
    "FieldLayout", "FieldSpec", "align_down", "align_up", "check_field_name", "check_output_dir",
    "open_dataset", "pread_into", "stored_dtype",
]

log = logging.getLogger(__name__)

#: ``verify`` reads a checksum block in pieces of at most this many bytes.
VERIFY_PIECE = 4 << 20
#: How often ``open_dataset`` starts again when the dataset is replaced while it is being opened.
OPEN_ATTEMPTS = 5
#: Pause before opening again a directory missing between the two renames of a replacement.
REOPEN_PAUSE_S = 0.02


class Dataset(Closeable):
    """An opened, validated dataset directory: one snapshot of it. Use :func:`open_dataset`.

    ``read(field, start, stop)`` is the plain reference read that loaders are tested against.
    Holds one descriptor of the directory and one of each field file until :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self._fds: dict[str, int] = {}  # field file (relative name) -> pinned descriptor
        #: (device, inode) -> the first relative name of that file; each name -> that first one
        self._inodes: dict[tuple[int, int], str] = {}
        self._same_file: dict[str, str] = {}
        self.stamps: dict[str, tuple[int, int]] = {}  # ... -> (size, mtime_ns) when opened
        self._dir_fd = -1
        self.path = Path(path)
        for attempt in range(OPEN_ATTEMPTS):
            self._dir_fd = self._open_dir()
            try:
                self._load()
                return
            except DatasetError as exc:
                moved = _moved(self.path, self._dir_fd)
                self._close_fds()
                if not moved:
                    raise
                if attempt + 1 == OPEN_ATTEMPTS:
                    raise DatasetError(f"{self.path}: the dataset was replaced while it was being "
                                       f"opened, {OPEN_ATTEMPTS} times in a row ({exc})") from exc
                log.debug("%s: replaced while being opened (%s); opening it again", self.path,
                          exc)
            except BaseException:
                self._close_fds()
                raise

    def _open_dir(self) -> int:
        """The directory descriptor that every later open is relative to (the snapshot's root)."""
        for attempt in range(OPEN_ATTEMPTS):
            try:
                return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                hint = _old_hint(self.path)
                if not hint or attempt + 1 == OPEN_ATTEMPTS:
                    raise DatasetError(f"{self.path}: no such directory{hint}") from None
                time.sleep(REOPEN_PAUSE_S)  # a replacement between its two renames
            except NotADirectoryError:
                raise DatasetError(f"{self.path}: not a directory; expected a gds-stream "
                                   f"dataset") from None
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{self.path}: cannot open the dataset "
                                   f"({os_reason(exc)})") from exc
        raise AssertionError("unreachable")

    def _load(self) -> None:
        """Read and validate the manifest and open every field file, all relative to the
        directory descriptor: together they are one snapshot of the dataset."""
        mpath = self.path / MANIFEST
        doc = self._read_manifest(mpath)
        _want = want
        _want(doc.get("format") == FORMAT_NAME, mpath,
              f"format is {short(doc.get('format'))}, expected {FORMAT_NAME!r}")
        version = doc.get("version")
        _want(version in KNOWN_VERSIONS and is_i64(version), mpath,
              f"unknown format version {short(version)}; this gds-stream reads versions "
              f"{', '.join(map(str, KNOWN_VERSIONS))}")
        if "alignment" in doc:
            _want(doc["alignment"] == ALIGN and is_i64(doc["alignment"]), mpath,
                  f"alignment must be {ALIGN}, found {short(doc['alignment'])}")
        n = doc.get("num_points")
        _want(is_i64(n), mpath, f"num_points must be an integer in [0, 2**63), found {short(n)}")
        self.num_points: int = n  # type: ignore[assignment]
        self._validate_scans(doc, mpath)
        ck = doc.get("checksum")
        _want(isinstance(ck, dict) and ck.get("algorithm") == "crc32", mpath,
              f"checksum algorithm must be 'crc32', found {short(ck)}")
        assert isinstance(ck, dict)
        bb = ck.get("block_bytes")
        _want(is_i64(bb, ALIGN) and bb <= MAX_BLOCK_BYTES and bb % ALIGN == 0, mpath,  # type: ignore
              f"checksum block_bytes must be a multiple of {ALIGN} in [{ALIGN}, {MAX_BLOCK_BYTES}], "
              f"found {short(bb)}")
        self.block_bytes: int = bb  # type: ignore[assignment]
        sources = doc.get("sources", [])
        _want(isinstance(sources, list) and all(isinstance(s, dict) for s in sources), mpath,
              f"sources must be a list of objects, found {short(sources)}")
        _want(len(sources) <= self.num_scans, mpath,
              f"sources holds {len(sources)} entries, more than the {self.num_scans} scans")
        self.sources: list[dict] = list(sources)
        self._origin: np.ndarray = origin_value(doc.get("origin", [0.0, 0.0, 0.0]), mpath)
        self._chunks = (chunk_table(doc["chunks"], self.num_points, self.scan_offsets, mpath)
                        if "chunks" in doc else ChunkTable.empty())
        self._layouts: dict[str, FieldLayout] = {}
        fields = doc.get("fields")
        _want(isinstance(fields, list) and len(fields) > 0, mpath,
              "expected a non-empty list of fields")
        assert isinstance(fields, list)
        _want(len(fields) <= MAX_FIELDS, mpath,
              f"the manifest lists {len(fields)} fields; a dataset holds at most {MAX_FIELDS}")
        for i, fd in enumerate(fields):
            lay = self._validate_field(fd, i, mpath)
            _want(lay.spec.name not in self._layouts, mpath,
                  f"field {lay.spec.name!r} appears twice")
            self._layouts[lay.spec.name] = lay
        check_disjoint(self._layouts, mpath, getattr(self, "_same_file", None))

    def _read_manifest(self, mpath: Path) -> dict:
        return read_manifest(mpath, manifest_cap(self._dir_fd), dir_fd=self._dir_fd)

    # -- validation ---------------------------------------------------------------------------
    def _validate_scans(self, doc: dict, mpath: Path) -> None:
        arr = int_list(doc.get("scan_offsets"), mpath, "scan_offsets")
        want(len(arr) >= 2, mpath, "scan_offsets must hold at least two integers")
        want(arr[0] == 0 and arr[-1] == self.num_points, mpath,
             f"scan_offsets must run from 0 to num_points={self.num_points}, "
             f"found {int(arr[0])}..{int(arr[-1])}")
        want(bool(np.all(np.diff(arr) >= 0)), mpath, "scan_offsets must not decrease")
        if "num_scans" in doc:
            want(doc["num_scans"] == len(arr) - 1 and is_i64(doc["num_scans"]), mpath,
                 f"num_scans is {short(doc['num_scans'])}, but scan_offsets holds {len(arr) - 1} scans")
        self.scan_offsets: np.ndarray = arr

    def _validate_field(self, fd: object, i: int, mpath: Path) -> FieldLayout:
        want(isinstance(fd, dict), mpath, f"fields[{i}] must be an object, found {short(fd)}")
        assert isinstance(fd, dict)
        name = fd.get("name")
        check_field_name(name, f"{mpath}: fields[{i}]")  # type: ignore[arg-type]
        want("dtype" in fd, mpath, f"field {name!r}: no dtype")
        dt = manifest_dtype(fd["dtype"], f"{mpath}: field {name!r}")
        comp = fd.get("components", 1)
        want(is_i64(comp, 1) and comp <= MAX_COMPONENTS, mpath,  # type: ignore[operator]
             f"field {name!r}: components must be an integer in 1..{MAX_COMPONENTS}, "
             f"found {short(comp)}")
        spec = FieldSpec(name, dt, comp)  # type: ignore[arg-type]
        fname = fd.get("file")
        want(isinstance(fname, str) and fname != "" and "\0" not in fname, mpath,
             f"field {name!r}: file must be a non-empty string without NUL, found {short(fname)}")
        assert isinstance(fname, str)
        rel, full = self._resolve(fname, name, mpath)
        off = fd.get("offset", 0)
        want(is_i64(off) and off % ALIGN == 0, mpath,  # type: ignore[operator]
             f"field {name!r}: offset must be a multiple of {ALIGN} in [0, 2**63), found {short(off)}")
        nbytes = fd.get("nbytes")
        expect = self.num_points * spec.point_bytes
        want(nbytes == expect and is_i64(nbytes), mpath,
             f"field {name!r}: nbytes is {short(nbytes)}, expected {expect} "
             f"({self.num_points} points × {spec.point_bytes} bytes)")
        self._pin(rel, full, name, mpath, off, expect)  # type: ignore[arg-type]
        sums = fd.get("checksums")
        nblocks = -(-expect // self.block_bytes)
        want(isinstance(sums, list), mpath,
             f"field {name!r}: checksums must be a list, found {short(sums)}")
        assert isinstance(sums, list)
        want(len(sums) == nblocks, mpath,
             f"field {name!r}: expected {nblocks} crc32 checksums "
             f"({expect} bytes in blocks of {self.block_bytes}), found {len(sums)}")
        bad = next((j for j, s in enumerate(sums) if not (is_i64(s) and s < 2**32)), None)
        want(bad is None, mpath,
             f"field {name!r}: checksum {bad} is {short(sums[bad] if bad is not None else None)}, "
             f"expected an integer in [0, 2**32)")
        return FieldLayout(spec, rel, off, expect, tuple(sums))  # type: ignore

    def _resolve(self, fname: str, name: object, mpath: Path) -> tuple[str, str]:
        """``(name relative to the directory, full path)`` of a field's file, which must lie
        inside the dataset directory."""
        root = os.path.realpath(self.path)
        try:
            full = os.path.realpath(os.path.join(root, fname))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{mpath}: field {name!r}: file {short(fname)} cannot be "
                               f"resolved ({os_reason(exc)})") from exc
        want(not os.path.isabs(fname) and os.path.commonpath([root, full]) == root
             and full != root, mpath,
             f"field {name!r}: file {short(fname)} lies outside the dataset directory")
        return os.path.relpath(full, root), full

    def _pin(self, rel: str, full: str, name: object, mpath: Path, off: int, expect: int) -> None:
        """Open the file ``rel`` of field ``name`` relative to the directory descriptor (once per
        file) and check it: a regular file holding the field's ``expect`` bytes at ``off``."""
        full = printable(full)  # a hostile name: escaped, the message stays one line
        fd = self._fds.get(rel)
        if fd is None:
            where = f"the file of field {name!r} named by {mpath}"
            try:
                kind = os.stat(rel, dir_fd=self._dir_fd).st_mode
            except FileNotFoundError:
                raise DatasetError(f"{full}: no such file (named by {mpath}, field "
                                   f"{name!r})") from None
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{full}: cannot stat {where} ({os_reason(exc)})") from exc
            want(stat.S_ISREG(kind), full,
                 f"the file of field {name!r} must be a regular file ({file_kind(kind)})")
            try:
                fd = os.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._dir_fd)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{full}: cannot open {where} ({os_reason(exc)})"
                                   f"{fd_limit_hint(exc)}") from exc
            self._fds[rel] = fd  # closed by close() from here on
            st = os.fstat(fd)
            # two names of one file (a hard link): its fields must not share bytes either
            self._same_file[rel] = self._inodes.setdefault((st.st_dev, st.st_ino), rel)
            self.stamps[rel] = (st.st_size, st.st_mtime_ns)  # an in-place rewrite changes it
            want(stat.S_ISREG(st.st_mode), full,
                 f"the file of field {name!r} must be a regular file ({file_kind(st.st_mode)})")
            os.set_blocking(fd, True)
        size = os.fstat(fd).st_size
        need = off + align_up(expect)
        want(size >= need, full,
             f"file holds {size} bytes, but the manifest needs {need} "
             f"(field {name!r}: offset {off} + {expect} bytes padded to {ALIGN})")

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

    @property
    def origin(self) -> np.ndarray:
        """float64 (3,), read-only: stored x, y, z are relative to it (zeros when none is set)."""
        return self._origin

    # -- spatial chunks (all empty when the dataset has none) ----------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self._chunks.offsets) - 1

    @property
    def chunk_offsets(self) -> np.ndarray:
        """int64 (num_chunks + 1,): chunk c holds points ``[off[c], off[c + 1])``."""
        return self._chunks.offsets

    @property
    def chunk_scan(self) -> np.ndarray:
        """int64 (num_chunks,): the scan each chunk lies in."""
        return self._chunks.scan

    @property
    def chunk_cells(self) -> np.ndarray:
        """int64 (num_chunks, 3): each chunk's grid cell (k is 0 for 2-D chunking)."""
        return self._chunks.cells

    @property
    def chunk_bounds(self) -> np.ndarray:
        """float64 (num_chunks, 6): xmin, ymin, zmin, xmax, ymax, zmax of each chunk's points."""
        return self._chunks.bounds

    @property
    def chunk_size(self) -> float:
        """Edge of a chunk cell (0.0 without chunks)."""
        return self._chunks.size

    @property
    def chunk_dims(self) -> int:
        """2 (x, y cells) or 3 (x, y, z cells); 0 without chunks."""
        return self._chunks.dims

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
        """The read-only descriptor of the field's file, opened with the manifest and kept until
        ``close``: it reads the file this dataset was opened with, even after the dataset is
        replaced or removed. Loaders duplicate it (``os.dup``) rather than open the path again."""
        lay = self.layout(name)
        fd = self._fds.get(lay.file)
        if fd is None:
            raise DatasetError(f"{self.field_path(name)}: the dataset is closed; open it again "
                               f"to read field {name!r}")
        return fd

    def open_files(self, names: Sequence[str], plan: Any = None) -> Any:
        """The storage read interface over fields ``names`` for one loader (closed with it):
        duplicates of this snapshot's descriptors (:mod:`gds_stream.storage`). ``plan``: the
        loader's ``PlanSpec`` (an object store checks its cache budget against a batch)."""
        from .storage.local import LocalFiles

        return LocalFiles(self, names)

    def _read_into(self, name: str, view: memoryview, offset: int) -> None:
        pread_into(self.fileno(name), view, offset, self.field_path(name))

    def byte_range(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """File offset and length of points ``[start, stop)`` of a field."""
        lay = self.layout(name)
        pb = lay.spec.point_bytes
        return lay.offset + start * pb, (stop - start) * pb

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Points ``[start, stop)`` of one field as a new array: shape (n,) or (n, components)."""
        lay = self.layout(name)
        stop = self.num_points if stop is None else stop
        for what, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DatasetError(f"{self.path}: read() {what} must be an integer point index, "
                                   f"got {v!r}")
        start, stop = int(start), int(stop)
        if not (0 <= start <= stop <= self.num_points):
            raise DatasetError(
                f"{self.path}: read of points [{start}, {stop}) is outside [0, {self.num_points})"
            )
        spec = lay.spec
        out = np.empty((stop - start) * spec.components, dtype=spec.dtype)
        off, length = self.byte_range(name, start, stop)
        if length:
            self._read_into(name, memoryview(out).cast("B"), off)
        stamp = getattr(self, "stamps", {}).get(lay.file)
        if stamp is not None:  # after the read: a rewrite before or during it is refused
            check_stamp(self.fileno(name), stamp, str(self.field_path(name)), name)
        return out.reshape(-1, spec.components) if spec.components > 1 else out

    def verify(self, progress: Callable[[int], None] | None = None) -> list[tuple[str, int, int, int]]:
        """Recompute every block checksum. Returns ``(field, block, expected, found)`` mismatches.

        Reads in pieces of at most :data:`VERIFY_PIECE` bytes, whatever the block size.
        """
        bad = []
        buf = np.empty(min(self.block_bytes, VERIFY_PIECE), dtype=np.uint8)
        for name, lay in self._layouts.items():
            if not lay.checksums:
                continue
            for b, expected in enumerate(lay.checksums):
                start = b * self.block_bytes
                end = min(start + self.block_bytes, lay.nbytes)
                crc, pos = 0, start
                while pos < end:
                    view = memoryview(buf)[:min(len(buf), end - pos)]
                    self._read_into(name, view, lay.offset + pos)
                    crc = zlib.crc32(view, crc)
                    pos += len(view)
                if crc != expected:
                    bad.append((name, b, expected, crc))
                if progress is not None:
                    progress(end - start)
        return bad

    def close(self) -> None:
        """Close the dataset's descriptors (idempotent); reads then raise :class:`DatasetError`.
        Loaders built from it keep their own duplicates until they close."""
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        dir_fd, self._dir_fd = getattr(self, "_dir_fd", -1), -1
        for fd in (*fds.values(), *([dir_fd] if dir_fd >= 0 else [])):
            os.close(fd)

    def __repr__(self) -> str:
        fields = ", ".join(s.describe() for s in self.schema.values())
        chunks = f", chunks={self.num_chunks}" if self.num_chunks else ""
        return (f"Dataset({str(self.path)!r}, points={self.num_points}, scans={self.num_scans}"
                f"{chunks}, fields=[{fields}])")


def open_dataset(path: str | os.PathLike, **storage: Any) -> Dataset:
    """Open and validate a dataset directory, or an object-store prefix given as a URL
    (``s3://bucket/prefix``; keywords ``storage_options`` — credentials, endpoint, retry
    budget — and ``cache_dir``/``cache_bytes``, see :mod:`gds_stream.storage`). Raises
    :class:`DatasetError` on any inconsistency."""
    from .storage import is_url, open_remote

    if is_url(path):
        return open_remote(path, **storage)  # type: ignore[arg-type]
    if storage:
        raise DatasetError(f"{path}: {', '.join(storage)} apply to object-store URLs only")
    return Dataset(path)


def _moved(path: Path, dir_fd: int) -> bool:
    """Whether the directory ``dir_fd`` is no longer the one at ``path`` (replaced or removed)."""
    try:
        st = os.fstat(dir_fd)
        now = os.stat(path)
    except (OSError, ValueError):
        return True
    return (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino)


def _old_hint(path: Path) -> str:
    """Where the previous data of an interrupted replacement of ``path`` lies, if anywhere."""
    try:
        olds = sorted(p.name for p in path.parent.iterdir()
                      if p.name.startswith(f".{path.name}.old-"))
    except (OSError, ValueError):
        return ""
    if not olds:
        return ""
    return (f"; a replacement was interrupted and the previous dataset is in {olds[0]} "
            f"(the next convert to this directory restores it)")

