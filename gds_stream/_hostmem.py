"""Large host buffers for batches: recycled while the process keeps using them, given back to
the OS beyond a small reserve.

Batches are large (tens to hundreds of MiB) and short-lived. Allocated through ``malloc`` (numpy,
torch's CPU allocator), glibc serves them by ``mmap`` only above its *dynamic* threshold, which
rises to the size of every mmapped chunk freed (up to 32 MiB); after a few batches, buffers of a
few MiB to 32 MiB come from thread heaps, and freed ones stay there, fragmented, so a process's
peak grows to several batches beyond the ones alive. Each buffer here is an anonymous mapping of
its own instead, and when the last numpy or torch view of it dies (a weak reference to the
array the views keep alive) it returns to a small pool: the next batch of a similar size reuses it
— no page faults, which on a VM cap filling fresh memory at ~2 GB/s — and whatever the pool cannot
keep is unmapped at once. A buffer is reused only after every view of it died, so a batch the
consumer holds is never written again.

The weak reference's callback is a C function (``deque.append`` of the reference): no Python
code runs when a buffer dies, so a Ctrl-C can never land in (and be swallowed by) a finalizer of
ours — a ``weakref.finalize`` runs Python code, and a ``KeyboardInterrupt`` raised there is only
printed as "Exception ignored". The returned buffers are moved to the pool (or unmapped) by the
next allocation, and by :func:`drain` when a loader closes.

Fresh buffers use ordinary pages. Transparent huge pages (``MADV_HUGEPAGE``) fill a fresh buffer
about 4× faster on the development VM, but where the kernel compacts memory on such a fault
(THP ``defrag`` = ``madvise``, a common default) a fault can stall for milliseconds: measured as
end-to-end epochs of 0.67–0.90 s against 0.32 s in a warm-up-heavy benchmark. Recycling makes
fresh buffers rare anyway.
"""

from __future__ import annotations

import collections
import mmap
import threading
import weakref

import numpy as np

#: Free buffers kept for reuse (the rest are unmapped): enough for a prefetch ring's turnover,
#: and at most this many bytes, so a closed loader's large windows do not stay mapped.
POOL_BUFFERS = 6
POOL_BYTES = 256 << 20
#: A free buffer serves a request of at least this fraction of its size (else a new one).
_FIT = 0.5

_lock = threading.Lock()
_free: list[mmap.mmap] = []
#: Buffers alive, by ``id`` of the weak reference to their array: (reference, mapping).
_live: dict[int, tuple[weakref.ref, mmap.mmap]] = {}
#: Weak references whose array died, appended by the C-level callback without a lock (it may
#: run inside a garbage collection triggered while ``_lock`` is held by the same thread; deque
#: appends are atomic) and drained under the lock.
_returned: collections.deque = collections.deque()


def anon_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes`` over an anonymous mapping of its own (fresh pages are
    zero; a recycled buffer holds old bytes, so fill all of it before use)."""
    nbytes = int(nbytes)
    mm = _take(nbytes)
    if mm is None:
        mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
    ref = weakref.ref(arr, _returned.append)  # a C callback: no Python code when it dies
    _live[id(ref)] = (ref, mm)
    return arr


def _take(nbytes: int) -> mmap.mmap | None:
    with _lock:
        extra = _drain()
        best = None
        # newest first: of the buffers that fit best, the one whose batch died last, the
        # likeliest still in the CPU caches
        for i in range(len(_free) - 1, -1, -1):
            mm = _free[i]
            if nbytes <= len(mm) and nbytes >= _FIT * len(mm) and \
                    (best is None or len(mm) < len(_free[best])):
                best = i
        got = _free.pop(best) if best is not None else None
    _unmap(extra)
    return got


def _drain() -> list[mmap.mmap]:
    """Move returned buffers to the pool (caller holds ``_lock``); return those beyond its
    bounds, newest kept, to unmap outside the lock."""
    while _returned:
        # absent: a Ctrl-C ended anon_buffer() between the reference and its record
        got = _live.pop(id(_returned.popleft()), None)
        if got is not None:
            _free.append(got[1])
    extra = []
    while len(_free) > POOL_BUFFERS or sum(len(m) for m in _free) > POOL_BYTES:
        extra.append(_free.pop(0))
    return extra


def _unmap(buffers: list[mmap.mmap]) -> None:
    for old in buffers:
        try:
            old.close()
        except BufferError:  # pragma: no cover - a view outlived its finalizer
            pass


def drain() -> None:
    """Recycle (or unmap, beyond the pool's bounds) the buffers whose last view died."""
    with _lock:
        extra = _drain()
    _unmap(extra)


def pooled_bytes() -> int:
    """Bytes held by free buffers waiting for reuse."""
    with _lock:
        extra = _drain()
        total = sum(len(m) for m in _free)
    _unmap(extra)
    return total
