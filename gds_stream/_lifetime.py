"""One way to stop: ``close()``, reached from ``with``-exit and from garbage collection too."""

from __future__ import annotations

import errno
import os
from typing import Any, Sequence, TypeVar

from .errors import DatasetError

T = TypeVar("T", bound="Closeable")


class Closeable:
    """Mixin for objects that own threads, descriptors or buffers.

    A subclass implements an idempotent ``close()``; the mixin calls it on context-manager exit
    and when the object is collected. At interpreter shutdown ``close()`` may find modules already
    torn down: errors from ``__del__`` are swallowed (there is no one left to report them to).
    """

    def close(self) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a half-built object
            pass


def fd_limit_hint(exc: BaseException) -> str:
    """What to do when the process ran out of file descriptors ('' for other errors)."""
    if not (isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)):
        return ""
    return ("; an open Dataset holds one descriptor per field file plus one for its directory, "
            "and each loader one per field it reads: close datasets and loaders no longer "
            "needed, or raise the limit (ulimit -n)")


class FieldFiles(Closeable):
    """Read-only descriptors of some fields' files, held by (and closed with) one loader.

    Each is a duplicate (``os.dup``) of the descriptor its :class:`Dataset` opened together with
    the manifest, never a new open of the path: a loader reads the snapshot its dataset was
    opened with, even after the dataset was replaced (``convert --overwrite``) or removed. A
    file cut short in place since the dataset was opened is a :class:`DatasetError` naming it
    here, not a short read later. The loader closes these in ``close()``; the
    :class:`Dataset`'s own descriptors (``Dataset.fileno``) are untouched.
    """

    def __init__(self, dataset: Any, names: Sequence[str]):
        self._fds: dict[str, int] = {}
        self._paths: dict[str, str] = {}
        try:
            for name in names:
                self._open(dataset, name)
        except BaseException:
            self.close()
            raise

    def _open(self, dataset: Any, name: str) -> None:
        lay = dataset.layout(name)
        path = str(dataset.field_path(name))
        pinned = dataset.fileno(name)  # DatasetError once the dataset is closed
        try:
            fd = os.dup(pinned)  # not inheritable, like the original (O_CLOEXEC)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot open field {name!r} for reading: "
                               f"{exc.strerror or exc}{fd_limit_hint(exc)}") from exc
        self._fds[name], self._paths[name] = fd, path
        size = os.fstat(fd).st_size
        need = lay.offset + lay.nbytes
        if size < need:
            raise DatasetError(f"{path}: file holds {size} bytes, but field {name!r} needs "
                               f"{need} (offset {lay.offset} + {lay.nbytes} bytes); it changed "
                               f"since the dataset was opened")

    def fd(self, name: str) -> int:
        return self._fds[name]

    def path(self, name: str) -> str:
        """The field file's path, for messages (its descriptor may read a replaced file)."""
        return self._paths[name]

    def reopen_path(self, name: str) -> str:
        """A path that opens the very file ``fd(name)`` reads, for libraries that open by path
        (KvikIO's ``CuFile``): ``/proc/self/fd/N`` reopens that file even after it was replaced
        or removed. Valid while this object is open."""
        return f"/proc/self/fd/{self._fds[name]}"

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)
