"""Large host buffers that go back to the OS the moment their last view dies.

glibc serves a ``malloc`` by ``mmap`` only above its *dynamic* threshold, which rises to the size
of every mmapped chunk freed (up to 32 MiB); after a few batches, buffers of a few MiB to 32 MiB
come from thread heaps, and freed ones stay there, fragmented. An anonymous mapping per buffer
has no such heuristic: it is unmapped when the last numpy or torch view is collected.
"""

from __future__ import annotations

import mmap

import numpy as np


def anon_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes`` over its own anonymous mapping (zero-filled lazily)."""
    mm = mmap.mmap(-1, max(int(nbytes), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, dtype=np.uint8, count=int(nbytes))
