"""One way to stop: ``close()``, reached from ``with``-exit and from garbage collection too."""

from __future__ import annotations

import errno
import gc
import os
import sys
import threading
from typing import Any, Sequence, TypeVar

from ._manifest import os_reason
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
        except KeyboardInterrupt:
            # Raised in a finalizer, it would only be printed ("Exception ignored in ..."):
            # the next next() of a loader raises it in the main code instead.
            PENDING_INTERRUPT.append(True)
        except Exception:  # noqa: BLE001 - interpreter shutdown or a half-built object
            pass


def fd_limit_hint(exc: BaseException) -> str:
    """What to do when the process ran out of file descriptors ('' for other errors)."""
    if not (isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)):
        return ""
    return ("; an open Dataset holds one descriptor per field file plus one for its directory, "
            "and each loader one per field it reads: close datasets and loaders no longer "
            "needed, or raise the limit (ulimit -n)")


def import_torch() -> Any:
    """``import torch``, collecting the reference cycle its first import leaves behind.

    torch's first import in a process runs ``torch.fx``'s ``wrap()``, which keeps
    ``inspect.currentframe()`` in a local: a cycle through a frame whose ``f_back`` chain reaches
    the frame that imported torch — and, through it, every caller up the stack. Imported while a
    loader is built, that keeps the loader (its threads, descriptors and buffers) alive until the
    cyclic garbage collector happens to run. One collection right after the first import frees
    the cycle while those frames are still running."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    import torch

    gc.collect()
    return torch


#: A Ctrl-C that landed in a ``__del__`` of ours, to raise at the next ``next()`` of a loader.
PENDING_INTERRUPT: list[bool] = []


def raise_pending_interrupt() -> None:
    """Raise the ``KeyboardInterrupt`` a finalizer of ours caught (main thread only)."""
    if PENDING_INTERRUPT and threading.current_thread() is threading.main_thread():
        PENDING_INTERRUPT.clear()
        raise KeyboardInterrupt


def check_stamp(fd: int, stamp: tuple[int, int], path: str, name: str) -> None:
    """Raise :class:`DatasetError` if the file behind ``fd`` no longer has the ``(size,
    mtime_ns)`` it had when its dataset was opened: it was written in place since."""
    st = os.fstat(fd)
    size, mtime = stamp
    if (st.st_size, st.st_mtime_ns) != (size, mtime):
        raise DatasetError(
            f"{path}: the file of field {name!r} was written in place since the dataset was "
            f"opened ({size} bytes then, {st.st_size} now"
            f"{'' if st.st_size != size else ', modified since'}); its bytes no longer match "
            f"the manifest: open the dataset again")


def pread_into(fd: int, view: memoryview, offset: int, path: object = "") -> None:
    """Fill ``view`` (a byte memoryview) from ``fd`` at ``offset``, looping over short reads.

    A short file or a failing read is a :class:`DatasetError` naming ``path``.
    """
    done, total = 0, len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise DatasetError(f"{path}: read of {total - done} bytes at {offset + done} failed "
                               f"({os_reason(exc)})") from exc
        if n == 0:
            raise DatasetError(
                f"{path}: file ended at byte {offset + done}, expected {total - done} more bytes"
            )
        done += n


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
        self._stamps: dict[str, tuple[int, int]] = {}
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
        stamp = getattr(dataset, "stamps", {}).get(lay.file)
        if stamp is not None:
            self._stamps[name] = stamp
            self.check_unchanged((name,))

    def check_unchanged(self, names: Sequence[str] | None = None) -> None:
        """Raise :class:`DatasetError` if a field file was written in place since its dataset
        was opened (its size or modification time differ): ``cp`` over a dataset's files, or
        a writer on them, would otherwise hand out the new bytes under the old manifest, or a
        mix of both. A replacement by rename (``convert --overwrite``) leaves the opened files
        as they were. One ``fstat`` per file."""
        for name in self._stamps if names is None else names:
            check_stamp(self._fds[name], self._stamps[name], self._paths[name], name)

    def stamps(self) -> dict[str, tuple[int, int]]:
        """Each field file's ``(size, mtime_ns)`` when its dataset was opened."""
        return dict(self._stamps)

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
