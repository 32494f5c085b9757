"""Large host buffers for batches: recycled while the process keeps using them, given back to
the OS beyond a small reserve.

Batches are large (tens to hundreds of MiB) and short-lived. Allocated through ``malloc`` (numpy,
torch's CPU allocator), glibc serves them by ``mmap`` only above its *dynamic* threshold, which
rises to the size of every mmapped chunk freed (up to 32 MiB); after a few batches, buffers of a
few MiB to 32 MiB come from thread heaps, and freed ones stay there, fragmented, so a process's
peak grows to several batches beyond the ones alive. Each buffer here is an anonymous mapping of
its own instead, and when the last numpy or torch view of it dies (a ``weakref.finalize`` on the
array the views keep alive) it returns to a small pool: the next batch of a similar size reuses it
— no page faults, which on a VM cap filling fresh memory at ~2 GB/s — and whatever the pool cannot
keep is unmapped at once. A buffer is reused only after every view of it died, so a batch the
consumer holds is never written again.

Fresh buffers use ordinary pages. Transparent huge pages (``MADV_HUGEPAGE``) fill a fresh buffer
about 4× faster on the development VM, but where the kernel compacts memory on such a fault
(THP ``defrag`` = ``madvise``, a common default) a fault can stall for milliseconds: measured as
end-to-end epochs of 0.67–0.90 s against 0.32 s in a warm-up-heavy benchmark. Recycling makes
fresh buffers rare anyway.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

#: Free buffers kept for reuse (the rest are unmapped): enough for a prefetch ring's turnover.
POOL_BUFFERS = 6
#: A free buffer serves a request of at least this fraction of its size (else a new one).
_FIT = 0.5

_lock = threading.Lock()
_free: list[mmap.mmap] = []


def anon_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes`` over an anonymous mapping of its own (fresh pages are
    zero; a recycled buffer holds old bytes, so fill all of it before use)."""
    nbytes = int(nbytes)
    mm = _take(nbytes)
    if mm is None:
        mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
    weakref.finalize(arr, _give_back, mm)
    return arr


def _take(nbytes: int) -> mmap.mmap | None:
    with _lock:
        best = None
        for i, mm in enumerate(_free):
            if nbytes <= len(mm) and nbytes >= _FIT * len(mm) and \
                    (best is None or len(mm) < len(_free[best])):
                best = i
        return _free.pop(best) if best is not None else None


def _give_back(mm: mmap.mmap) -> None:
    with _lock:
        _free.append(mm)
        extra = _free[:-POOL_BUFFERS] if len(_free) > POOL_BUFFERS else []
        del _free[:len(extra)]
    for old in extra:
        try:
            old.close()
        except BufferError:  # pragma: no cover - a view outlived its finalizer
            pass


def pooled_bytes() -> int:
    """Bytes held by free buffers waiting for reuse."""
    with _lock:
        return sum(len(m) for m in _free)
