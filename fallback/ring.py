"""A ring of pinned host slots for the CUDA side of the fallback.

A slot is handed to the readers only after the CUDA event of its previous host→device copy has
completed (the wait happens in the worker thread that fills it, never in the consumer), so the
ring never overwrites memory a copy still reads.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import numpy as np

from gds_stream.errors import LoaderError

log = logging.getLogger(__name__)


class Slot:
    """One pinned host buffer and the event of the last copy out of it."""

    def __init__(self, nbytes: int):
        import torch

        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
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

    def __init__(self, depth: int, slot_bytes: int):
        self.depth = depth
        self.slot_bytes = slot_bytes
        self._free: deque[Slot] = deque(Slot(slot_bytes) for _ in range(depth))
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
            self._free = deque(Slot(nbytes) for _ in range(self.depth))
            self.slot_bytes = nbytes

    def acquire(self, nbytes: int) -> Slot:
        with self._lock:
            if not self._free:
                raise LoaderError(f"pinned ring exhausted: all {self.depth} slots are in flight")
            slot = self._free.popleft()
        if slot.nbytes < nbytes:
            raise LoaderError(f"batch of {nbytes} bytes exceeds the ring's slots "
                              f"({slot.nbytes} bytes)")
        return slot

    def release(self, slot: Slot, event: Any) -> None:
        slot.event = event
        with self._lock:
            self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)
