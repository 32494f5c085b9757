"""Shuffle windows, on the loader's side: one backend read per window, batches gathered from it.

With ``shuffle_window`` (points mode, shuffle on) the planner groups a rank's steps into windows,
each one contiguous span of the epoch's block-shuffled stream whose points are permuted as a
whole (:meth:`gds_stream.plan.EpochPlan.window`). A backend reads a window exactly like an
unshuffled batch — the same few large, aligned reads, into its own buffers (a pinned slot and a
device slab, or a GPU-direct staging slab) — and the core cuts each batch out of it with one
gather per field on the batch's device, by the plan's rows. The gathered tensors are new: the
consumer owns them, and the window is dropped after its last batch. Both backends read the same
bytes and gather by the same rows, so their batches are bit-identical.

Memory: the window being consumed and the next one, read ahead, each with its int32 row
permutation: ``2 × shuffle_window × (bytes per point + 4)``, plus the batch being gathered and
the batches the consumer holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._hostmem import anon_buffer
from .slab import from_int_rows, gather_field_rows, int_rows

_ALIGN = 4096


def gather_rows(window: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The batch made of ``rows`` of every tensor of ``window`` (torch tensors of one device).

    On CUDA the index goes to the device from pinned memory asynchronously, and the gathers
    run on the current stream, so nothing here waits for the device. On the CPU the batch is
    gathered into one anonymous mapping of its own (freed as soon as the consumer drops it)."""
    import torch

    first = next(iter(window.values()))
    idx = torch.from_numpy(np.ascontiguousarray(rows))
    cuda = first.device.type == "cuda"
    if cuda:
        idx = idx.pin_memory().to(first.device, non_blocking=True)
        # fields of equal width that sit equally spaced in the window's slab: one launch each
        n, m = int(first.shape[0]), len(rows)
        gathered = gather_field_rows(
            [t.reshape(n, -1).view(torch.uint8) for t in window.values()], idx)
        return {name: g.view(t.dtype).view((m, *t.shape[1:]))
                for (name, t), g in zip(window.items(), gathered)}
    sizes = [_aligned(len(rows) * t[:1].numel() * t.element_size()) for t in window.values()]
    buf = torch.from_numpy(anon_buffer(sum(sizes)))
    out, pos = {}, 0
    m = len(rows)
    for name, t in window.items():
        src = int_rows(torch, t)  # one integer per row where it fits: torch's fast 1-D gather
        nbytes = m * src[:1].numel() * src.element_size()
        g = buf[pos:pos + nbytes].view(src.dtype).view((m, *src.shape[1:]))
        torch.index_select(src, 0, idx, out=g)
        pos += _aligned(nbytes)
        out[name] = from_int_rows(torch, g, t.dtype, tuple(t.shape[1:]))
    return out


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
