"""A ring of pinned host slots: the fallback's CUDA path and the GPU-direct ``host`` route.

A slot is handed to the readers only after the CUDA event of its previous host→device copy has
completed (the wait happens in the thread that fills it, never in the consumer), so the ring
never overwrites memory a copy still reads. A slot keeps the event of its last copy until a new
copy replaces it: a slot given back on an error or close path, with nothing new queued out of
it, still makes its next user wait for the copy that is.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from gds_stream.errors import LoaderError

log = logging.getLogger(__name__)


class Slot:
    """One pinned host buffer and the event of the last copy out of it."""

    def __init__(self, nbytes: int, alloc: Callable[[int], Any] | None = None):
        if alloc is None:
            import torch

            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            self.tensor = alloc(nbytes)
        self.array: np.ndarray = self.tensor.numpy()
        self.event: Any = None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def wait_free(self) -> None:
        """Block (in a worker) until the last copy out of this slot has finished. The event is
        a blocking-sync one (``copy_event``), so the thread sleeps in the driver; this waits on
        this slot's own copy only, never on a stream or the device."""
        ev = self.event
        if ev is not None:
            ev.synchronize()


class PinnedRing:
    """``depth`` pinned slots; ``acquire`` never allocates past ``depth``."""

    def __init__(self, depth: int, slot_bytes: int, alloc: Callable[[int], Any] | None = None):
        self.depth = depth
        self.slot_bytes = slot_bytes
        self._alloc = alloc
        self._free: deque[Slot] = deque(Slot(slot_bytes, alloc) for _ in range(depth))
        self._lock = threading.Lock()
        log.debug("pinned ring: %d slots of %d bytes", depth, slot_bytes)

    def reserve(self, nbytes: int) -> None:
        """Make every free slot at least ``nbytes`` large (at epoch start)."""
        if nbytes <= self.slot_bytes:
            return
        with self._lock:
            if len(self._free) != self.depth:
                raise LoaderError("pinned ring resized while batches are in flight")
            for s in self._free:
                s.wait_free()
            self._free = deque(Slot(nbytes, self._alloc) for _ in range(self.depth))
            self.slot_bytes = nbytes

    def acquire(self, nbytes: int, grow: bool = False) -> Slot:
        """A free slot of at least ``nbytes``; with ``grow`` a smaller one is replaced (after
        its last copy completed) by one of ``nbytes`` — the ring then holds at most ``depth``
        slots of the largest batch seen."""
        with self._lock:
            if not self._free:
                raise LoaderError(f"pinned ring exhausted: all {self.depth} slots are in flight")
            slot = self._free.popleft()
        if slot.nbytes < nbytes:
            if not grow:
                raise LoaderError(f"batch of {nbytes} bytes exceeds the ring's slots "
                                  f"({slot.nbytes} bytes)")
            slot.wait_free()
            slot = Slot(nbytes, self._alloc)
            self.slot_bytes = max(self.slot_bytes, nbytes)
        return slot

    def release(self, slot: Slot, event: Any = None) -> None:
        """Give ``slot`` back; ``event``: of a copy just queued out of it. Without one, the
        slot keeps the event of its last copy (nothing new was queued out of it)."""
        if event is not None:
            slot.event = event
        with self._lock:
            self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        """Free every slot's pinned memory now (after its last copy), while the streams its
        copies ran on still exist: torch's pinned-memory allocator records an event on each such
        stream when a block is freed, and on a stream destroyed by then that is a CUDA error
        that aborts the process."""
        with self._lock:
            slots, self._free = list(self._free), deque()
        for s in slots:
            s.wait_free()
            s.tensor = s.array = s.event = None
