"""Inputs in object storage: ``gds-stream convert s3://bucket/tiles/ -o ...``.

An input URL names one object (``s3://bucket/tiles/a.laz``) or a prefix: every object under it
whose name ends in one of the format's extensions, sorted and filtered like a local directory
(hidden names and gds-stream datasets below the prefix skipped). A URL ending in ``/`` is always
a prefix.

The readers of every format need a seekable local file (laspy, lazrs, the PLY header parser), so
each object is streamed into a local temporary file when a reader first opens it, **one input at
a time**: opening another input removes the previous one first, so local disk holds at most one
input object (and its SemanticKITTI ``.label``) whatever the number of inputs. The conversion's
validate-everything-first rule holds unchanged: an object is fetched while it is validated and
again when it is converted (LAS/LAZ: also when the float32 origin is placed from a sample of its
points). Every fetch carries the ETag seen when the input was listed, so an object replaced in
between is an error naming it, never a dataset made of two versions. The temporary directory is
removed on success, on any error and on Ctrl-C.

The staged file names itself by its URL (:class:`_Staged`): every message a reader raises, and
the source file a manifest records, say ``s3://bucket/tiles/a.laz``, never the temporary path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._schema import MANIFEST
from ..errors import ConversionError, DatasetError
from ..storage import is_url, split_url
from .common import expand

log = logging.getLogger(__name__)

_PathBase = type(Path())


class _Staged(_PathBase):  # type: ignore[misc, valid-type]
    """A local temporary path that names itself by its object-store URL.

    ``os.fspath`` (so ``open``, ``stat``, laspy) gives the local file, fetched first if it is
    not there; ``str``/f-strings give the URL. Each input gets its own subclass (:func:`_staged`)
    holding the mapping as class attributes, so paths derived from it (``with_suffix``,
    ``parent / "labels"``) map and fetch too."""

    _stage_root = ""
    _url_base = ""
    #: ``(client, ObjectVersion, local path)``: what this input fetches.
    _fetch_list: list = []
    _stager: Any = None

    def __fspath__(self) -> str:
        self._stager.ensure(type(self))
        return _PathBase.__str__(self)

    def __str__(self) -> str:
        s = _PathBase.__str__(self)
        if s == self._stage_root or s.startswith(self._stage_root + os.sep):
            return self._url_base + s[len(self._stage_root):].replace(os.sep, "/")
        return s


def _staged(local: Path, root: Path, base: str, fetch: list, stager: "RemoteInputs") -> _Staged:
    cls = type("StagedPath", (_Staged,), {"_stage_root": str(root), "_url_base": base,
                                          "_fetch_list": fetch, "_stager": stager})
    return cls(local)


def _ext_words(exts: Sequence[str]) -> str:
    return ", ".join(exts[:-1]) + " or " + exts[-1] if len(exts) > 1 else exts[0]


def _head_if_there(client, key: str):
    """The object at ``key``, or None where there is none (any other failure raises)."""
    try:
        return client.head(key)
    except DatasetError as exc:
        if "no such object" in str(exc):
            return None
        raise


class RemoteInputs(contextlib.AbstractContextManager):
    """The inputs of one conversion, local paths and URLs, with the staging of the URLs.

    ``expand`` replaces :func:`.common.expand` (local paths as there, URLs as staged paths that
    fetch themselves when opened). Closing removes every temporary file."""

    def __init__(self, storage_options: dict[str, Any] | None = None):
        self._options = storage_options
        self._clients: dict[tuple[str, str], Any] = {}
        self._tmp: Path | None = None
        self._count = 0
        self._current: type | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- expansion ------------------------------------------------------------------------------
    def expand(self, inputs: Iterable[str | os.PathLike], exts: tuple[str, ...]) -> list[Path]:
        out: list[Path] = []
        for item in inputs:
            out += self._expand_url(str(item), exts) if is_url(item) else expand([item], exts)
        if not out:
            raise ConversionError("no input files given")
        return out

    def _client(self, scheme: str, bucket: str):
        from ..storage.s3 import S3Client

        if (scheme, bucket) not in self._clients:
            self._clients[scheme, bucket] = S3Client(bucket, self._options, scheme)
        return self._clients[scheme, bucket]

    def _expand_url(self, url: str, exts: tuple[str, ...]) -> list[Path]:
        scheme, bucket, key = split_url(url)
        client = self._client(scheme, bucket)
        if key and not url.endswith("/"):
            one = _head_if_there(client, key)
            if one is not None:
                return [self._input(client, one, None)]
        objects = client.list_objects(key)
        rel = {o.key[len(key) + 1:] if key else o.key: o for o in objects}
        datasets = {r.rsplit("/", 1)[0] + "/" for r in rel if r.endswith("/" + MANIFEST)}
        listed = (key, {o.key for o in objects})
        found = []
        for r, obj in rel.items():
            parts = r.split("/")
            if any(p.startswith(".") for p in parts) or not parts[-1].lower().endswith(exts):
                continue
            inside = next((d for d in datasets if r.startswith(d)), None)
            if inside is not None:
                log.info("%s/%s: skipping a gds-stream dataset", url.rstrip("/"), inside[:-1])
                continue
            found.append((parts, obj))
        if not found:
            what = "no objects" if not objects else f"no {_ext_words(exts)} objects"
            raise DatasetError(f"{url}: {what} under this prefix")
        return [self._input(client, obj, listed) for _, obj in sorted(found, key=lambda t: t[0])]

    def _input(self, client, obj, listed: tuple[str, set[str]] | None) -> Path:
        """The staged path of ``obj`` (not fetched yet): ``<tmp>/<n>/<parent>/<name>``, which
        names itself ``scheme://bucket/<grandparent>/<parent>/<name>``. ``listed``: the prefix
        ``obj`` was listed under and every key found there (None: ``obj`` was named alone)."""
        from ..storage.s3 import ObjectVersion

        self._count += 1
        parts = obj.key.split("/")
        root = self._dir() / str(self._count)
        tail = parts[-2:]
        base = client.url("/".join(parts[:-2])).rstrip("/")
        fetch = [(client, obj, root.joinpath(*tail))]
        if parts[-1].lower().endswith(".bin"):  # a SemanticKITTI frame's labels, where present
            stem = parts[-1][:-4]
            cands = [(tail[:-1] + [stem + ".label"])]
            if len(tail) == 2 and tail[0] == "velodyne":
                cands.append(["labels", stem + ".label"])
            for cand in cands:
                key = "/".join(parts[:-2] + cand)
                label: ObjectVersion | None = None
                if listed is not None and key in listed[1]:
                    label = client.head(key)
                elif listed is None or not key.startswith(listed[0] + "/" if listed[0] else ""):
                    label = _head_if_there(client, key)  # not listed: look it up
                if label is not None:
                    fetch.append((client, label, root.joinpath(*cand)))
        return _staged(root.joinpath(*tail), root, base, fetch, self)

    def _dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="gds-stream-inputs-"))
        return self._tmp

    # -- staging --------------------------------------------------------------------------------
    def ensure(self, staged: type) -> None:
        """Make the input ``staged`` (a :class:`_Staged` subclass) present on local disk,
        removing the one present before."""
        with self._lock:
            if self._current is staged:
                return
            fetch = staged._fetch_list
            url = fetch[0][0].url(fetch[0][1].key)
            if self._closed:
                raise ConversionError(f"{url}: read after the conversion that fetched it ended")
            self._drop()
            local = fetch[0][2].parent
            local.mkdir(parents=True, exist_ok=True)
            need, free = sum(obj.size for _, obj, _ in fetch), shutil.disk_usage(local).free
            if need > free:
                raise ConversionError(f"{url}: needs {need} bytes of local temporary space to be "
                                      f"read, and {local} has {free} free; point TMPDIR at a "
                                      f"larger disk")
            self._current = staged  # from here on, _drop removes what was written
            for client, obj, dest in fetch:
                dest.parent.mkdir(parents=True, exist_ok=True)
                log.info("fetching %s (%d bytes)", client.url(obj.key), obj.size)
                try:
                    with open(dest, "wb") as f:
                        client.get_to_file(obj, 0, obj.size, f)
                except BaseException:
                    self._drop()
                    raise

    def _drop(self) -> None:
        current, self._current = self._current, None
        for _, _, dest in (current._fetch_list if current is not None else ()):
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()

    def close(self) -> None:
        self._closed, self._current = True, None
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
