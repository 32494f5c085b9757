"""One way to stop: ``close()``, reached from ``with``-exit and from garbage collection too."""

from __future__ import annotations

import gc
import os
import sys
import threading
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
        except KeyboardInterrupt:
            # Raised in a finalizer, it would only be printed ("Exception ignored in ..."):
            # the next next() of a loader raises it in the main code instead.
            PENDING_INTERRUPT.append(True)
        except Exception:  # noqa: BLE001 - interpreter shutdown or a half-built object
            pass


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


class FieldFiles(Closeable):
    """Read-only descriptors of some fields' files, opened by (and closed with) one loader.

    Opened when the loader is built, so a file removed, made unreadable or truncated since the
    dataset was opened is a :class:`DatasetError` naming it there, not a raw ``OSError`` later.
    Once open, a descriptor keeps reading the file that was validated even if the path is
    removed or replaced. The loader closes these in ``close()``; the :class:`Dataset`'s own
    descriptors (``Dataset.fileno``) are untouched.
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
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise DatasetError(f"{path}: cannot open field {name!r} for reading: "
                               f"{exc.strerror or exc}") from exc
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
        return self._paths[name]

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)
