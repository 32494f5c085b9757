"""Where a dataset's bytes come from: local files or an object store, behind one read interface.

Backends read a field's bytes through a *field reader* (one per loader, closed with it):

* ``read_into(name, offset, view)`` fills the byte memoryview ``view`` from the field file of
  field ``name`` at byte ``offset`` (the file's offset, not the field's), or raises
  :class:`~gds_stream.errors.DatasetError` naming the file and the range;
* ``size(name)`` is the file's size in bytes, ``identity(name)`` what pins the version read
  (device and inode of a local file, the ETag of an object), ``path(name)`` its name for messages.

Local readers also expose ``fd(name)`` (a duplicate of the snapshot's descriptor): the fallback
reads local files with positioned reads on it and the GPU-direct backend reopens it for KvikIO;
readers with ``remote = True`` are read only through ``read_into`` (or, by the GPU-direct
backend, through the KvikIO objects their ``open_kvikio`` returns).

:mod:`.local` reads the descriptors a local :class:`~gds_stream.format.Dataset` pinned;
:mod:`.s3` reads objects through ``obstore`` (imported only when an ``s3://`` URL is opened, so
``import gds_stream`` never imports it); :mod:`.remote` is the dataset opened from a URL and
:mod:`.cache` its local block cache; :mod:`.upload` publishes a converted dataset to a URL;
:mod:`.kvikio_remote` is how the GPU-direct backend reads objects with KvikIO's ``RemoteFile`` on
a CUDA device. Object-store *inputs* of a conversion are staged by
:mod:`gds_stream.convert.remote_inputs`.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import DatasetError

__all__ = ["SCHEMES", "is_url", "split_url", "open_remote"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

#: URL schemes an object-store dataset may be opened from.
SCHEMES = ("s3",)


def is_url(path: object) -> bool:
    """Whether ``path`` names an object-store location (``s3://bucket/prefix``) rather than a
    local path. Any ``scheme://`` string counts, so an unsupported scheme is refused clearly."""
    return isinstance(path, str) and _URL.match(path) is not None


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)`` of ``scheme://bucket/prefix`` (prefix without slashes at
    either end, possibly empty)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise DatasetError(f"{url}: unsupported URL scheme {scheme!r}; gds-stream reads "
                           f"{', '.join(s + '://' for s in SCHEMES)} URLs and local paths")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DatasetError(f"{url}: no bucket in the URL; expected {scheme}://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise DatasetError(f"{url}: the prefix must not hold empty, '.' or '..' segments")
    return scheme.lower(), bucket, prefix


def open_remote(url: str | os.PathLike, **storage: Any):
    """Open the dataset at an object-store URL (see :class:`.remote.RemoteDataset`)."""
    from .remote import RemoteDataset

    return RemoteDataset(str(url), **storage)
