"""Host buffers whose memory goes back to the OS the moment the last view dies.

Batches are large (tens to hundreds of MiB) and short-lived. Allocated through ``malloc`` (numpy,
torch's CPU allocator), glibc serves them by ``mmap`` only above its *dynamic* threshold, which
rises to the size of every mmapped chunk freed (up to 32 MiB): after the first batches, buffers
of a few MiB to 32 MiB come from the heaps of whichever threads allocated them, and freed ones
stay there, fragmented, so the process's peak grows to several batches beyond the in-flight
ones. An anonymous ``mmap`` per buffer has no such heuristic: ``munmap`` when the last numpy or
torch view is collected. Page faults are the same as for any fresh large ``malloc``.
"""

from __future__ import annotations

import numpy as np

from gds_stream._hostmem import anon_buffer
from gds_stream.plan import BatchPlan

__all__ = ["anon_buffer", "permutation_into"]

#: Points written per step when the permutation is built in place (bounds the temporary).
_ARANGE_STEP = 1 << 20




def permutation_into(batch: BatchPlan, out: np.ndarray) -> bool:
    """Write ``batch.permutation()`` into ``out`` (int32, ``batch.num_points`` long) without the
    int64 temporary ``Generator.permutation`` makes: ``permutation(n)`` *is* ``shuffle`` of
    ``arange(n)``, whose draws do not depend on the dtype (tests compare both). False when the
    batch keeps stream order."""
    if batch.perm_key is None:
        return False
    n = batch.num_points
    if n >= 2**31:  # pragma: no cover - a 2^31-point batch does not fit a slab's int32 region
        out[:] = batch.permutation()
        return True
    for a in range(0, n, _ARANGE_STEP):
        b = min(n, a + _ARANGE_STEP)
        out[a:b] = np.arange(a, b, dtype=np.int32)
    np.random.default_rng(list(batch.perm_key)).shuffle(out)
    return True
