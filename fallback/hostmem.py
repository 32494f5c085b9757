"""Host memory of the fallback's CPU path: batch buffers and the in-place permutation.

Buffers come from :func:`gds_stream._hostmem.anon_buffer`: each an anonymous mapping of its own
(not ``malloc``, whose heaps keep freed multi-MiB batches fragmented and let a process's peak
creep up), recycled through a small pool — at most 6 buffers and 256 MiB — once every numpy or
torch view of it died, so the next batch of a similar size reuses it without page faults; what
the pool cannot keep is unmapped. A buffer is reused only after its last view died, so a batch
the consumer holds is never written again. :func:`permutation_into` writes a batch's
within-batch permutation into its slab without an int64 temporary.
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
