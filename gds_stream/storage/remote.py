"""A dataset in object storage (``s3://bucket/prefix``): the same manifest, validation and reads
as a local directory, with objects in place of files.

The snapshot rule holds as for a local dataset: opening reads the manifest and records the size
and ETag of every field object it names; every later read carries that ETag (``If-Match``), so a
dataset replaced since it was opened is read as its old data or refused with a
:class:`DatasetError` naming the object — never the old manifest with new bytes. ``convert -o
s3://...`` writes every upload under a fresh ``data-<id>/`` prefix and the manifest last, so a
reader that fetched one manifest only ever reads the objects that manifest names.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._lifetime import Closeable
from .._manifest import (MANIFEST_ABS_MAX_BYTES, MANIFEST_BASE_BYTES, MANIFEST_DATA_RATIO,
                         parse_manifest, want)
from .._schema import ALIGN, MANIFEST, align_up
from ..errors import BackendUnavailable, DatasetError
from ..format import OPEN_ATTEMPTS, Dataset
from . import split_url
from .s3 import ObjectVersion, S3Client, cancel_on

log = logging.getLogger(__name__)


class ObjectPath(str):
    """A URL that joins like a path (``url / "x.bin"``), for messages and ``field_path``."""

    def __truediv__(self, other: object) -> "ObjectPath":
        return ObjectPath(f"{self.rstrip('/')}/{other}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


class RemoteDataset(Dataset):
    """An opened, validated dataset under an object-store prefix. Use
    :func:`gds_stream.open_dataset` with a URL.

    ``storage_options``: see :mod:`gds_stream.storage.s3` (credentials, region, endpoint, retry
    budget, timeouts); the standard AWS environment supplies what it does not set.
    ``cache_dir`` / ``cache_bytes``: a local block cache shared by every process on the node
    (:mod:`gds_stream.storage.cache`); both or neither.
    """

    #: Reads wait on the network, not a core: loaders default to several reader threads.
    remote = True

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | Path | None = None, cache_bytes: int | None = None):
        self._fds: dict[str, int] = {}
        self._dir_fd = -1
        self._closed = False
        scheme, bucket, prefix = split_url(url)
        self._prefix = prefix
        self.path = ObjectPath(f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else ""))
        self._objects: dict[str, ObjectVersion] = {}
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise DatasetError(f"{self.path}: storage_options must be a dict of settings "
                               f"(endpoint, region, max_retries, ...), got {storage_options!r}")
        self.client = S3Client(bucket, storage_options, scheme)
        self.cache = None
        if (cache_dir is None) != (cache_bytes is None):
            raise DatasetError(f"{self.path}: give cache_dir= and cache_bytes= together (the "
                               f"cache needs a directory and a byte budget)")
        if cache_dir is not None:
            from .cache import BlockCache

            self.cache = BlockCache(cache_dir, cache_bytes)  # type: ignore[arg-type]
        self._manifest: ObjectVersion | None = None
        try:
            self._open()
        except BaseException:
            if self.cache is not None:  # its lock file: not left to the garbage collector
                self.cache.release()
                self.cache = None
            raise

    def _open(self) -> None:
        for attempt in range(OPEN_ATTEMPTS):
            self._objects = {}
            try:
                self._load()
                return
            except DatasetError as exc:
                if self._manifest is None and "no such object" in str(exc):
                    self.client.check_bucket()  # a missing bucket, said as such
                # ``convert --overwrite`` between our manifest read and a field's HEAD (its
                # objects deleted, or the manifest replaced while fetched): open the new one.
                if attempt + 1 == OPEN_ATTEMPTS or not self._manifest_moved():
                    raise
                log.debug("%s: replaced while being opened (%s); opening it again",
                          self.path, exc)

    def key(self, rel: str) -> str:
        return f"{self._prefix}/{rel}" if self._prefix else rel

    # -- hooks of Dataset --------------------------------------------------------------------
    def _read_manifest(self, mpath: Path) -> dict:
        """The manifest object, fetched whole under the bound a local directory of the same
        data would have, then parsed like a local one."""
        meta = self._manifest = self.client.head(self.key(MANIFEST))
        data = self.client.list_sizes(self._prefix) - meta.size
        cap = min(MANIFEST_ABS_MAX_BYTES, MANIFEST_BASE_BYTES + max(0, data) // MANIFEST_DATA_RATIO)
        if meta.size > cap:
            raise DatasetError(f"{mpath}: manifest of {meta.size} bytes is larger than any valid "
                               f"one for this prefix (at most {cap} bytes)")
        raw = bytes(self.client.get(meta, 0, meta.size)) if meta.size else b""
        return parse_manifest(raw, mpath)

    def _manifest_moved(self) -> bool:
        try:
            now = self.client.head(self.key(MANIFEST))
        except DatasetError:
            return False
        return self._manifest is None or now.etag != self._manifest.etag

    def _resolve(self, fname: str, name: object, mpath: Path) -> tuple[str, str]:
        parts = fname.split("/")
        want(not fname.startswith("/") and "\\" not in fname
             and all(p not in ("", ".", "..") for p in parts), mpath,
             f"field {name!r}: file {fname!r} lies outside the dataset prefix (object names are "
             f"relative, without empty, '.' or '..' segments)")
        return fname, str(self.path / fname)

    def _pin(self, rel: str, full: str, name: object, mpath: Path, off: int, expect: int) -> None:
        obj = self._objects.get(rel)
        if obj is None:
            try:
                obj = self.client.head(self.key(rel))
            except DatasetError as exc:
                raise DatasetError(f"{full}: cannot open the object of field {name!r} named by "
                                   f"{mpath}: {exc}") from exc
            self._objects[rel] = obj
        need = off + align_up(expect)
        want(obj.size >= need, full,
             f"object holds {obj.size} bytes, but the manifest needs {need} "
             f"(field {name!r}: offset {off} + {expect} bytes padded to {ALIGN})")

    def _read_into(self, name: str, view: memoryview, offset: int) -> None:
        self.read_object(self.version(name), offset, view)

    def read_object(self, obj: ObjectVersion, offset: int, view: memoryview) -> None:
        """Bytes of ``obj`` at ``offset`` into ``view``: through the cache when there is one."""
        if self.cache is not None:
            self.cache.read_into(self.client, obj, offset, view)
        else:
            self.client.read_into(obj, offset, view)

    # -- public ------------------------------------------------------------------------------
    def version(self, name: str) -> ObjectVersion:
        """The object of field ``name`` as it was opened (key, size, ETag)."""
        if self._closed:
            raise DatasetError(f"{self.field_path(name)}: the dataset is closed; open it again "
                               f"to read field {name!r}")
        return self._objects[self.layout(name).file]

    def fileno(self, name: str) -> int:
        raise DatasetError(f"{self.field_path(name)}: an object-store dataset has no file "
                           f"descriptors; read through open_files() or read()")

    def open_files(self, names: Sequence[str], plan: Any = None) -> "RemoteFiles":
        """The read interface over fields ``names`` for one loader; with a cache, a budget
        smaller than the largest batch of ``plan`` (a ``PlanSpec``) is refused here."""
        if self.cache is not None and plan is not None:
            from ..plan import EpochPlan

            per_point = sum(self.layout(n).spec.point_bytes for n in names)
            need = EpochPlan(plan, 0).max_batch_points() * per_point
            if self.cache.budget < need:
                raise DatasetError(f"{self.path}: cache_bytes={self.cache.budget} is smaller "
                                   f"than one batch ({need} bytes of fields "
                                   f"{', '.join(names)}); give at least that, better a few "
                                   f"epochs' worth")
        return RemoteFiles(self, names)

    def close(self) -> None:
        if not self._closed and self.cache is not None:
            self.cache.release()  # its lock file closes with the last loader reading through it
        self._closed = True


class RemoteFiles(Closeable):
    """The storage read interface over a remote dataset's objects, for one loader."""

    #: Readers of a remote store go through :meth:`read_into` (local ones may use ``fd``).
    remote = True

    def __init__(self, dataset: RemoteDataset, names: Sequence[str]):
        self.client = dataset.client
        self._dataset = dataset
        self._read = dataset.read_object
        self._objects = {n: dataset.version(n) for n in names}
        self._paths = {n: str(dataset.field_path(n)) for n in names}
        self._cache = dataset.cache
        if self._cache is not None:
            self._cache.retain()
        self._closed = False

    def read_into(self, name: str, offset: int, view: memoryview,
                  stop: threading.Event | None = None) -> None:
        """Fill ``view`` from field ``name``'s object at ``offset``; once ``stop`` (the
        loader's stop event) is set, retries are abandoned."""
        if self._closed:
            raise DatasetError(f"{self._paths[name]}: read after the loader was closed")
        with cancel_on(stop):
            self._read(self._objects[name], offset, view)

    def size(self, name: str) -> int:
        return self._objects[name].size

    def identity(self, name: str) -> str:
        return self._objects[name].etag

    def path(self, name: str) -> str:
        return self._paths[name]

    def fd(self, name: str) -> int:
        raise DatasetError(f"{self._paths[name]}: an object has no file descriptor; read it "
                           f"through read_into()")

    def kvikio_unavailable(self) -> str | None:
        """Why KvikIO cannot read these objects (see :mod:`.kvikio_remote`), or None."""
        from .kvikio_remote import unavailable

        return unavailable(self._dataset)

    def open_kvikio(self, name: str, kvikio: Any):
        """Field ``name``'s object opened with ``kvikio.RemoteFile`` (a ``CuFile``-like
        ``pread``), for the GPU-direct backend's ``remote`` route."""
        from .kvikio_remote import KvikioObject

        obj = self._objects[name]
        return KvikioObject(kvikio, self.client.bucket, obj.key, obj.size, self._paths[name])

    def version_check(self, then: Any = None):
        """What the GPU-direct backend runs after each batch's KvikIO reads: every object
        still has its ETag of open (KvikIO sends no ``If-Match``); then ``then.check`` (the
        ``verify_reads`` block verifier), if given."""
        from .kvikio_remote import VersionCheck

        return VersionCheck(self.client, self._objects, then)

    def reopen_path(self, name: str) -> str:
        raise BackendUnavailable(f"{self._paths[name]}: an object has no local path; the "
                                 f"GPU-direct backend opens it with open_kvikio()")

    def close(self) -> None:
        if not self._closed and self._cache is not None:
            self._cache.release()
        self._closed = True

