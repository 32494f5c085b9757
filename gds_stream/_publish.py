"""Putting a finished dataset directory in place atomically, and cleaning up after killed writers.

A writer builds its dataset in ``.{name}.tmp-{id}`` beside the target and records its owner
(pid, process start time, boot id) in a marker file inside it. Publishing and cleanup run under an
exclusive ``flock`` on the parent directory, which the kernel releases when a writer dies, so no
lock is ever stale and no lock file is left behind.

* ``overwrite=False``: the temp directory is renamed onto the target with
  ``renameat2(RENAME_NOREPLACE)`` (an empty target directory is removed first), so a dataset that
  appeared meanwhile is never replaced: the later writer gets a :class:`ConversionError`.
* ``overwrite=True``: ``renameat2(RENAME_EXCHANGE)`` swaps the new directory and the old one in
  one step; where the filesystem lacks it, the old one is renamed to ``.{name}.old-{id}`` first.
* At the start of a writer, temp directories of writers that are gone are removed, and an
  ``.old-*`` directory whose target is missing (a replacement killed between its two renames) is
  renamed back to the target, with a warning.
* :func:`check_output_dir` is the one rule for what a target may be: checked when a writer
  starts and again, under the lock, when it publishes. ``writer.py`` imports this module, never
  the reverse.

Readers are never disturbed: a dataset is published or replaced by renaming whole directories,
and a reader holds a descriptor of the directory it opened (see ``format.Dataset``), so it keeps
reading that snapshot while the old directory is renamed away and removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from ._schema import MANIFEST
from .errors import ConversionError

log = logging.getLogger(__name__)

MARKER = ".gds-stream-writer.json"
#: A temp directory without a marker (its writer was killed before writing one, or the old data of
#: an exchange) is removed once it has not been modified for this long.
UNMARKED_STALE_S = 600.0
#: How long a writer waits for another one's publish or cleanup of the same parent directory.
LOCK_TIMEOUT_S = 60.0

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2``; False where the libc or the filesystem lacks it, OSError on a real failure."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


# -- what may be replaced ---------------------------------------------------------------------
def os_failure(path: object, what: str, exc: OSError) -> ConversionError:
    reason = exc.strerror or str(exc)
    return ConversionError(f"{path}: {what} failed ({reason})")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite``; refuse a file in its place."""
    try:
        if not os.path.lexists(out_dir):
            return
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir}: exists and is not a directory")
        with os.scandir(out_dir) as it:
            empty = next(it, None) is None
    except OSError as exc:
        raise os_failure(out_dir, "checking the output directory", exc) from exc
    if empty:
        return
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


# -- owners ------------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc can't tell)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    fields = data[data.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else ""


def owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot": _boot_id()}


def owner_alive(rec: object) -> bool:
    """Whether the process a marker names still runs (same boot, same pid, same start time)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int):
        return False
    pid = rec["pid"]
    if rec.get("boot") and _boot_id() and rec["boot"] != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass  # another user's process, which exists
    start = _start_time(pid)
    return not (rec.get("start") and start and rec["start"] != start)


def write_marker(tmp: Path) -> None:
    with open(tmp / MARKER, "w") as f:
        json.dump(owner_record(), f)


def _marker_owner(tmp: Path) -> object:
    try:
        with open(tmp / MARKER, "rb") as f:
            return json.loads(f.read(4096))
    except (OSError, ValueError):
        return None


# -- locking -----------------------------------------------------------------------------------
@contextlib.contextmanager
def parent_lock(parent: Path, target: Path) -> Iterator[None]:
    """Exclusive flock on ``parent`` (released by the kernel if this process dies)."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:  # e.g. a write-only directory: renameat2 alone still refuses
        log.debug("%s: cannot open %s to lock it (%s); going on without the lock", target,
                  parent, exc)
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConversionError(
                        f"{target}: another writer has held {parent} for {LOCK_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.01)
            except OSError as exc:  # a filesystem without flock (ENOLCK, EOPNOTSUPP)
                log.debug("%s: cannot lock %s (%s); going on without the lock", target, parent,
                          exc)
                break
        yield
    finally:
        os.close(fd)  # releases the lock


# -- cleanup -----------------------------------------------------------------------------------
def clean_stale(target: Path) -> None:
    """Remove temp dirs of dead writers of ``target``; bring back an orphaned ``.old-*``.

    Call with :func:`parent_lock` held.
    """
    parent, name = target.parent, target.name
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith(f".{name}.tmp-") and p.is_dir() and not p.is_symlink():
            owner = _marker_owner(p)
            if owner is None:
                try:
                    age = time.time() - p.stat().st_mtime
                except OSError:
                    continue
                if age < UNMARKED_STALE_S:
                    continue
            elif owner_alive(owner):
                continue
            log.info("removing %s, left by a writer that is gone", p)
            shutil.rmtree(p, ignore_errors=True)
    for p in entries:
        if not (p.name.startswith(f".{name}.old-") and p.is_dir() and not p.is_symlink()):
            continue
        if not os.path.lexists(target):
            log.warning("%s: missing after an interrupted replacement; restoring the previous "
                        "dataset from %s", target, p.name)
            try:
                os.rename(p, target)
            except OSError as exc:
                log.warning("%s: could not restore %s (%s)", target, p, exc)
        else:
            log.info("removing %s, the previous data of a finished replacement", p)
            shutil.rmtree(p, ignore_errors=True)


# -- publishing ----------------------------------------------------------------------------------
def publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``target`` (call with :func:`parent_lock` held)."""
    if overwrite:
        check_output_dir(target, overwrite)
    elif os.path.lexists(target):
        try:
            os.rmdir(target)  # an empty directory may be taken over; anything else is refused
        except OSError as exc:
            raise ConversionError(f"{target}: appeared while converting (another convert?); not "
                                  f"replacing it without --overwrite ({exc.strerror})") from exc
    os.unlink(tmp / MARKER)
    if not os.path.lexists(target):
        try:
            done = _renameat2(tmp, target, _RENAME_NOREPLACE)
        except FileExistsError:
            raise ConversionError(f"{target}: appeared while converting (another convert?); not "
                                  f"replacing it without --overwrite") from None
        if not done:
            os.rename(tmp, target)  # under the parent lock: nothing else renames onto it
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous dataset
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
