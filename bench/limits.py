"""The machine's measured physical limits, and the page cache the runs depend on.

Owns: the read bandwidth a loader can at best reach (every byte of the dataset's fields landing
in memory, by preadv and by a copy out of a memmap, 1 thread and N threads, the best kept, so
that it bounds every loader that copies its bytes), the cache-hot read for reference,
pinned host→device and device→device copy bandwidth on CUDA, and the page cache (warm it, drop
it, measure how much of the dataset is resident, and say whether warm/cold really held).
Bandwidths are bytes per second; the report prints them as decimal GB/s (10^9 B/s).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from bench.variants import FieldFile, pread_full

log = logging.getLogger("bench.limits")

#: The read limit: preadv calls of each of READ_CHUNKS (best kept) landing in a READ_RING-byte
#: buffer (split between the threads), far larger than any last-level cache, so every byte goes
#: to memory as a loader's do.
READ_CHUNKS = (4 << 20, 16 << 20)
READ_RING = 1 << 30
#: For reference: 4 MiB reads into one buffer per thread that stays in the CPU caches.
CACHED_CHUNK = 4 << 20


def _kvikio():
    try:
        import kvikio

        return kvikio
    except Exception:
        return None


def drop_pages(paths: Sequence[str]) -> str:
    """Ask the kernel to drop the files' pages from the page cache. Returns how.

    ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each whole file after an ``fsync`` (so dirty pages
    are clean and droppable): no root needed, only these files affected. It is advice, not a
    guarantee: pages mapped by any process (a live ``numpy.memmap``, here or elsewhere) or
    locked stay resident, so the benchmark closes its own maps between runs and checks with
    :func:`residency` afterwards. It empties only this kernel's cache: a cache below it (a
    hypervisor's host page cache, a disk controller or network filesystem cache) may still
    serve the "cold" read from RAM, so a cold figure on a VM can be far above the disk's speed.
    """
    kv = _kvikio()
    fn = getattr(kv, "drop_file_page_cache", None) if kv is not None else None
    if fn is not None:
        for p in paths:
            fn(p)
        return "kvikio.drop_file_page_cache"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def residency(paths: Sequence[str]) -> tuple[int | None, int, str]:
    """(resident bytes or None when it can't be measured, file bytes, method)."""
    total = sum(os.stat(p).st_size for p in paths)
    kv = _kvikio()
    fn = getattr(kv, "get_page_cache_info", None) if kv is not None else None
    if fn is not None:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            res = sum(int(fn(p)[0]) for p in paths) * page
            return min(res, total), total, "kvikio.get_page_cache_info"
        except Exception as exc:
            log.debug("kvikio.get_page_cache_info failed: %s", exc)
    exe = shutil.which("fincore")
    if exe is not None:
        try:
            r = subprocess.run([exe, "--bytes", "--noheadings", "--output", "RES", *paths],
                               capture_output=True, text=True, timeout=60, check=True)
            res = sum(int(line.split()[0]) for line in r.stdout.splitlines() if line.strip())
            return res, total, "fincore"
        except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
            log.debug("fincore failed: %s", exc)
    return None, total, "unverified"


def warm_pages(files: Sequence[FieldFile]) -> None:
    buf = memoryview(bytearray(CACHED_CHUNK))
    for ff in files:
        fd = os.open(ff.path, os.O_RDONLY)
        try:
            for off in range(0, ff.nbytes, CACHED_CHUNK):
                n = min(CACHED_CHUNK, ff.nbytes - off)
                pread_full(fd, buf[:n], ff.offset + off)
        finally:
            os.close(fd)


@dataclass
class CacheState:
    mode: str  # warm | cold
    drop_method: str = ""
    checks: list[float | None] = field(default_factory=list)  # resident fraction per run
    method: str = "unverified"

    def record(self, resident: int | None, total: int, method: str) -> float | None:
        self.method = method
        frac = None if resident is None or total == 0 else resident / total
        self.checks.append(frac)
        return frac

    def verdict(self) -> str:
        known = [c for c in self.checks if c is not None]
        if self.mode == "warm":
            if not known:
                return "warm (residency unverified: no kvikio, no fincore)"
            lo = min(known)
            return (f"warm: {lo:.1%} of the dataset resident at the least ({self.method})"
                    + ("" if lo > 0.99 else " — NOT fully warm: RAM too small?"))
        if not known:
            return f"cold via {self.drop_method}: UNVERIFIED (no kvikio, no fincore)"
        hi = max(known)
        ok = hi <= 0.01
        return (f"cold via {self.drop_method}: {'worked' if ok else 'DID NOT WORK'} — at most "
                f"{hi:.1%} of the dataset resident after a drop, over {len(known)} drops "
                f"({self.method})")

    def worked(self) -> bool | None:
        known = [c for c in self.checks if c is not None]
        if self.mode == "warm":
            return None if not known else min(known) > 0.99
        return None if not known else max(known) <= 0.01


def _file_maps(files: Sequence[FieldFile]) -> dict[str, np.memmap]:
    return {ff.path: np.memmap(ff.path, dtype=np.uint8, mode="r") for ff in files}


def read_bandwidth(files: Sequence[FieldFile], chunk: int, bufs: Sequence[np.ndarray],
                   maps: dict[str, np.memmap] | None = None) -> float:
    """Bytes/s moving every byte of the fields into memory in ``chunk``-sized pieces, the chunks
    dealt round-robin to one thread per buffer in ``bufs``: ``preadv`` calls, or with ``maps``
    (``numpy.memmap`` of each file) a memory copy from the mapping, as memmap loaders do. Each
    thread writes into its own reused buffer (successive pieces at successive offsets, wrapping
    around), faulted in before the clock starts so the number is the copy rate, not page-fault
    cost.

    A buffer of one chunk keeps the destination hot in the CPU caches (an upper bound no loader
    that hands out batches can reach); a buffer several times the last-level cache makes every
    byte land in memory, as a loader's batches do — that one is the limit the goals use."""
    threads = len(bufs)
    chunks = []
    fds = {ff.path: os.open(ff.path, os.O_RDONLY) for ff in files}
    try:
        for ff in files:
            for off in range(0, ff.nbytes, chunk):
                chunks.append((ff.path, ff.offset + off, min(chunk, ff.nbytes - off)))
        total = sum(c[2] for c in chunks)

        def work(part, buf):
            pos = 0
            arr = np.frombuffer(buf, dtype=np.uint8) if maps is not None else None
            for path, off, n in part:
                if pos + n > len(buf):
                    pos = 0
                if maps is None:
                    pread_full(fds[path], buf[pos:pos + n], off)
                else:
                    np.copyto(arr[pos:pos + n], maps[path][off:off + n])
                pos += n

        parts = [chunks[i::threads] for i in range(threads)]
        t0 = time.perf_counter()
        if threads == 1:
            work(parts[0], memoryview(bufs[0]))
        else:
            ths = [threading.Thread(target=work, args=(p, memoryview(b)), name=f"bench-read-{i}")
                   for i, (p, b) in enumerate(zip(parts, bufs))]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
        dt = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)
    return total / dt if dt > 0 else float("inf")


#: How the read limit moves bytes: ``preadv`` (as the sequential baseline and gds-stream's
#: fallback do) and a copy out of a ``numpy.memmap`` (as the queue and DataLoader baselines do).
#: The limit is the faster of the two, so that it bounds every loader that copies the bytes.
READ_METHODS = ("preadv", "mmap-copy")


def measure_reads(limits: dict, key: str, files: Sequence[FieldFile], threads: int, reps: int,
                  chunks: Sequence[int], ring_total: int | None,
                  before: Callable[[], None] | None = None, deadline: float | None = None,
                  methods: Sequence[str] = READ_METHODS) -> None:
    """Best of ``reps`` passes (fewer once ``deadline``, a ``time.perf_counter()`` value, has
    passed: at least one) over every chunk size and method, with 1 thread and with ``threads``;
    stores ``key_1t``, ``key_nt`` and their maximum under ``key`` (bytes/s), and per method
    ``key_<method>`` (bytes/s). ``ring_total=None``: one chunk-sized buffer per thread
    (cache-hot)."""
    per_method: dict[str, float] = {}
    passes = []
    for t, suffix in ((1, "1t"), (threads, "nt")):
        best = 0.0
        for chunk in chunks:
            total = sum(-(-ff.nbytes // chunk) * chunk for ff in files)
            # a dataset smaller than the ring lands in distinct memory anyway
            ring = chunk if ring_total is None else max(chunk, min(ring_total, total) // t)
            limits[f"{key}_ring_bytes"] = ring * t
            bufs = [np.ones(ring, dtype=np.uint8) for _ in range(t)]  # faulted in once, reused
            for method in methods:
                # warm: one mapping kept across passes (as a loader keeps its memmaps); cold:
                # a fresh one after each drop (pages mapped by a process can't be dropped)
                maps = _file_maps(files) if method == "mmap-copy" and before is None else None
                done = 0
                for _ in range(reps):
                    if done and deadline is not None and time.perf_counter() > deadline:
                        break
                    if before is not None:
                        before()
                    m = maps
                    if method == "mmap-copy" and before is not None:
                        m = _file_maps(files)
                    bw = read_bandwidth(files, chunk, bufs, m if method == "mmap-copy" else None)
                    del m
                    best = max(best, bw)
                    per_method[method] = max(per_method.get(method, 0.0), bw)
                    done += 1
                passes.append(done)
                del maps
            del bufs
        limits[f"{key}_{suffix}_bytes_per_s"] = best
    limits[f"{key}_bytes_per_s"] = max(limits[f"{key}_1t_bytes_per_s"],
                                       limits[f"{key}_nt_bytes_per_s"])
    for method, bw in per_method.items():
        limits[f"{key}_{method.replace('-', '_')}_bytes_per_s"] = bw
    limits[f"{key}_passes_min"] = min(passes) if passes else 0


def cuda_copy_bandwidth(device: torch.device, pinned: bool, nbytes: int = 256 << 20,
                        iters: int = 10) -> float:
    """Bytes/s of a host(pinned)→device copy (``pinned=True``) or a device→device copy, timed
    with CUDA events on the current stream; median over ``iters``."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if pinned:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.synchronize(device)
    return nbytes / statistics.median(times)



def measure_limits(files: Sequence[FieldFile], paths: Sequence[str], cache: CacheState,
                   repeats: int, cold: bool, device: torch.device | None,
                   allowance_s: float | None = None) -> dict:
    """Every limit of this run: warm read → memory and cache-hot (and cold, after dropping the
    pages before each pass, with ``cold``); pinned H2D and D2D with a CUDA ``device``. After
    ``allowance_s`` seconds every measurement stops repeating (one pass each at the least)."""
    limits: dict = {}
    deadline = None if allowance_s is None else time.perf_counter() + allowance_s
    threads = max(1, min(16, os.cpu_count() or 1))
    reps = max(2, repeats)
    limits.update(read_threads=threads, read_repeats=reps, read_chunk_bytes=list(READ_CHUNKS),
                  read_ring_bytes=READ_RING, read_cached_chunk_bytes=CACHED_CHUNK)
    warm_pages(files)
    limits["read_methods"] = list(READ_METHODS)
    measure_reads(limits, "read_warm", files, threads, reps, READ_CHUNKS, READ_RING,
                  deadline=deadline)
    measure_reads(limits, "read_warm_cached", files, threads, reps, (CACHED_CHUNK,), None,
                  deadline=deadline, methods=("preadv",))

    def drop() -> None:
        cache.drop_method = drop_pages(paths)
        cache.record(*residency(paths))

    if cold:
        measure_reads(limits, "read_cold", files, threads, reps, READ_CHUNKS, READ_RING, drop,
                      deadline=deadline)
    if device is not None and device.type == "cuda":
        limits["h2d_pinned_bytes_per_s"] = cuda_copy_bandwidth(device, pinned=True)
        limits["d2d_bytes_per_s"] = cuda_copy_bandwidth(device, pinned=False)
    return limits
