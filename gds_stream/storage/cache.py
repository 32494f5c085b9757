"""The local block cache of object-store reads (``cache_dir=``, ``cache_bytes=``).

Objects are cached in blocks of :data:`CACHE_BLOCK_BYTES` (the last one shorter), one file per
block under ``cache_dir/<object>/<block>``, where ``<object>`` hashes the URL *and the ETag*: a
replaced object never hits the blocks of its previous version.

* **Atomic**: a block is streamed into ``.tmp-<pid>-<id>`` in the cache directory and renamed onto
  its name only once complete, so a reader never sees a half-written block; temporary files of
  processes that died (a killed run) are removed by the next cache that opens the directory.
* **Shared**: every process and rank on a node may use one directory. A reader holds a shared
  ``flock`` on a block while copying from it; eviction runs under the directory's exclusive lock
  (``.lock``) and takes an exclusive, non-blocking lock on each block it removes, so a block in
  use is skipped, never removed under a reader. Threads of one process missing the same block
  fetch it once (the others wait for that fetch, then read the block); two processes missing
  it both fetch it (both checked against the same ETag) and the second rename replaces the
  first with equal bytes.
* **Bounded**: after each new block the least recently used blocks (a hit refreshes a block's
  mtime) are evicted until the directory holds at most ``cache_bytes``; only blocks being read
  at that instant (at most one per reader thread) can keep it above the budget, briefly. A read
  never waits for space, so no budget can deadlock; one below :data:`MIN_BLOCKS` blocks is
  refused when the dataset is opened, one below a loader's largest batch when the loader is.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

log = logging.getLogger(__name__)

#: Bytes per cached block, one ranged GET each: large enough that a cold read is a few large
#: GETs, small enough that a budget of some GB holds hundreds of blocks to choose evictions
#: from. Chosen by ``python -m bench.compare --source s3 --range-sizes ...`` (README, "Object
#: storage"): cold-cache epochs read 1.6x (file order) and 1.3x (shuffled) faster than with
#: 8 MiB blocks; 32 MiB gained nothing more in file order.
CACHE_BLOCK_BYTES = 16 << 20
#: The smallest budget, in blocks: below it nothing read could be kept for the next epoch.
MIN_BLOCKS = 2
#: A temporary file older than this is removed even if its pid lives (pid reuse).
STALE_TMP_S = 3600.0
_LOCK = ".lock"
#: Each block file ends with the crc32 of its bytes (little-endian), checked the first time a
#: process reads the block: a block damaged on disk is fetched again, never handed out.
_CRC_BYTES = 4
_CHECK_PIECE = 4 << 20


class BlockCache:
    """One cache directory as seen by this process (thread-safe)."""

    def __init__(self, directory: str | os.PathLike, budget: int,
                 block_bytes: int | None = None):
        self.dir = Path(directory)
        self.block_bytes = int(block_bytes or CACHE_BLOCK_BYTES)
        if isinstance(budget, float) and budget.is_integer():
            budget = int(budget)  # 2.5e9 bytes: a whole number, written as a float
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise DatasetError(f"{self.dir}: cache_bytes={budget!r} is not a number of bytes "
                               f"(a whole number, e.g. 8 << 30)")
        budget = int(budget)
        if budget < MIN_BLOCKS * self.block_bytes:
            raise DatasetError(f"{self.dir}: cache_bytes={budget!r} is smaller than "
                               f"{MIN_BLOCKS} cache blocks of {self.block_bytes} bytes; give at "
                               f"least {MIN_BLOCKS * self.block_bytes} (better: a few epochs' "
                               f"worth of the fields you read)")
        self.budget = budget
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DatasetError(f"{self.dir}: cannot use the cache directory "
                               f"({exc.strerror or exc})") from exc
        self._mutex = threading.Lock()
        #: Holders of this cache (its dataset, each loader's files): the directory's lock file
        #: is closed when the last one releases it.
        self._users = 1
        #: Blocks whose crc32 this process has checked (a damaged one is fetched again).
        self._checked: set[Path] = set()
        #: Blocks being fetched by a thread of this process: another thread missing the same
        #: block waits for that fetch instead of downloading it a second time.
        self._fetching: dict[Path, threading.Event] = {}
        self.hits = self.misses = self.evictions = 0
        with self._dir_lock():
            self._remove_stale_tmp()

    # -- reads ---------------------------------------------------------------------------------
    def read_into(self, client: Any, obj: Any, offset: int, view: memoryview) -> None:
        """Fill ``view`` with bytes ``[offset, offset + len(view))`` of object ``obj``."""
        pos, total, bb = 0, len(view), self.block_bytes
        while pos < total:
            b = (offset + pos) // bb
            start, end = b * bb, min(b * bb + bb, obj.size)
            lo = offset + pos - start
            n = min(total - pos, end - start - lo)
            self._read_block(client, obj, b, end - start, lo, view[pos:pos + n])
            pos += n

    def _block_path(self, client: Any, obj: Any, b: int) -> Path:
        h = hashlib.sha256(f"{client.url(obj.key)}\0{obj.etag}".encode()).hexdigest()[:32]
        return self.dir / h / f"{b:08d}"

    def _read_block(self, client: Any, obj: Any, b: int, size: int, lo: int,
                    out: memoryview) -> None:
        path = self._block_path(client, obj, b)
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            if fd < 0:
                # a miss: one thread of this process fetches the block, the others wait for it
                # and read it from the cache (or, should that fetch fail or the block be
                # evicted meanwhile, try again themselves)
                with self._mutex:
                    ahead = self._fetching.get(path)
                    if ahead is None:
                        done = self._fetching[path] = threading.Event()
                if ahead is not None:
                    ahead.wait()
                    continue
                try:
                    self._fetch(client, obj, b, size, path, lo, out)
                finally:
                    with self._mutex:
                        del self._fetching[path]
                    done.set()
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # held while copying: eviction skips this block
                damage = self._damage(fd, path, size)
                if damage is None:
                    got = os.preadv(fd, [out], lo)
                    if got != len(out):
                        raise DatasetError(f"{path}: short read from the cache ({got} of "
                                           f"{len(out)} bytes)")
                    try:
                        os.utime(fd)  # most recently used
                    except OSError:
                        pass
            finally:
                os.close(fd)
            if damage is None:
                break
            # a damaged block is a miss: dropped and fetched again (the object is the one
            # opened: its ETag names the block's directory)
            log.warning("%s: cache block %s; fetching it again", client.url(obj.key), damage)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        with self._mutex:
            self.hits += 1

    def _damage(self, fd: int, path: Path, size: int) -> str | None:
        """``None`` if the block file ``fd`` holds ``size`` bytes and their crc32 trailer (the
        bytes checked once per process), else what is wrong with it."""
        held = os.fstat(fd).st_size
        if held != size + _CRC_BYTES:
            return (f"{path} holds {held} bytes, expected {size + _CRC_BYTES} (cut short, "
                    f"damaged, or written by an older version)")
        with self._mutex:
            if path in self._checked:
                return None
        crc = _crc_of(fd, size)
        trailer = os.pread(fd, _CRC_BYTES, size)
        if trailer != crc.to_bytes(_CRC_BYTES, "little"):
            return f"{path} has crc32 {crc:#010x}, its trailer says {trailer.hex()} (damaged)"
        with self._mutex:
            self._checked.add(path)
        return None

    def _fetch(self, client: Any, obj: Any, b: int, size: int, path: Path, lo: int,
               out: memoryview) -> None:
        start = b * self.block_bytes
        tmp = self.dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb+") as f:
                # held until the file is renamed or removed: another process (in another PID
                # namespace too, where our pid means nothing) sees the fetch is alive
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                client.get_to_file(obj, start, start + size, f)
                f.flush()
                got = os.preadv(f.fileno(), [out], lo)
                if got != len(out):
                    raise DatasetError(f"{tmp}: short read of a block just written")
                f.seek(size)
                f.write(_crc_of(f.fileno(), size).to_bytes(_CRC_BYTES, "little"))
            path.parent.mkdir(exist_ok=True)
            try:
                os.replace(tmp, path)  # published whole, or not at all
            except FileNotFoundError:  # removed as stale by another process: not published
                log.debug("%s: removed before it was published; the block stays uncached", tmp)
        except OSError as exc:
            raise DatasetError(f"{self.dir}: cannot write a cache block for "
                               f"{client.url(obj.key)} ({exc.strerror or exc})") from exc
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        with self._mutex:
            self.misses += 1
        self._evict()

    # -- eviction --------------------------------------------------------------------------------
    def _dir_lock(self):
        cache = self

        class _Held:
            def __enter__(self):
                fcntl.flock(cache._lock_fd, fcntl.LOCK_EX)

            def __exit__(self, *exc):
                fcntl.flock(cache._lock_fd, fcntl.LOCK_UN)

        return _Held()

    def blocks(self) -> list[tuple[int, int, Path]]:
        """``(mtime_ns, size, path)`` of every published block."""
        out = []
        for sub in os.scandir(self.dir):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime_ns, st.st_size, Path(e.path)))
        return out

    def _evict(self) -> None:
        with self._mutex, self._dir_lock():
            entries = sorted(self.blocks())
            total = sum(s for _, s, _ in entries)
            for _, size, path in entries:
                if total <= self.budget:
                    break
                if self._remove_unused(path):
                    total -= size
                    self.evictions += 1
            if total > self.budget:
                log.debug("%s: %d bytes cached over a budget of %d: the rest is in use",
                          self.dir, total, self.budget)

    @staticmethod
    def _remove_unused(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # another process evicted it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # a reader is copying from it
            raise
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        return True

    def _remove_stale_tmp(self) -> None:
        """Remove the temporary files of fetches no process is making any more: a fetch holds
        an exclusive lock on its file while it writes (released when its process dies, whatever
        PID namespace it ran in). A file whose lock is free is removed when its pid is gone from
        this namespace, or after :data:`STALE_TMP_S` whatever its pid. (A fetch whose file went
        in the instant between its creation and its lock still hands out its bytes; it only
        does not publish the block.)"""
        now = time.time()
        for e in os.scandir(self.dir):
            if not e.name.startswith(".tmp-"):
                continue
            try:
                fd = os.open(e.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # renamed or removed meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a fetch in progress, maybe of a process we cannot see
                try:
                    keep = (_alive(int(e.name.split("-")[1]))
                            and now - os.fstat(fd).st_mtime < STALE_TMP_S)
                except (ValueError, IndexError, OSError):
                    keep = False
                if not keep:
                    try:
                        os.unlink(e.path)
                        log.info("%s: removed a block a stopped process left half-fetched",
                                 e.path)
                    except FileNotFoundError:
                        pass
            finally:
                os.close(fd)

    def stats(self) -> dict[str, int]:
        with self._mutex:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}

    def retain(self) -> None:
        """One more holder (a loader's files); each calls :meth:`release` once."""
        with self._mutex:
            self._users += 1

    def release(self) -> None:
        """A holder is done: the last one closes the directory's lock file."""
        with self._mutex:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.close()

    def close(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _crc_of(fd: int, size: int) -> int:
    """crc32 of the first ``size`` bytes of ``fd`` (read in pieces)."""
    crc, pos, buf = 0, 0, bytearray(max(1, min(size, _CHECK_PIECE)))
    while pos < size:
        n = os.preadv(fd, [memoryview(buf)[:min(len(buf), size - pos)]], pos)
        if n <= 0:
            break  # a file cut meanwhile: its crc cannot match
        crc = zlib.crc32(memoryview(buf)[:n], crc)
        pos += n
    return crc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
