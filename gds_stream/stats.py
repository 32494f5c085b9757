"""Counters of a loader's work in flight, for tests and the benchmark."""

from __future__ import annotations

import threading


class LoaderStats:
    """Counters a test or benchmark can read: peak batches and bytes submitted but not yielded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight = 0
        self.inflight_bytes = 0
        self.max_inflight = 0
        self.max_inflight_bytes = 0
        self.batches = 0
        self.points = 0

    def submitted(self, nbytes: int) -> None:
        with self.lock:
            self.inflight += 1
            self.inflight_bytes += nbytes
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.max_inflight_bytes = max(self.max_inflight_bytes, self.inflight_bytes)

    def retired(self, nbytes: int, points: int, yielded: bool) -> None:
        with self.lock:
            self.inflight -= 1
            self.inflight_bytes -= nbytes
            if yielded:
                self.batches += 1
                self.points += points

    def counted(self, points: int) -> None:
        """A batch cut from a resident read (a shuffle window) was yielded."""
        with self.lock:
            self.batches += 1
            self.points += points

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {k: getattr(self, k) for k in ("inflight", "inflight_bytes", "max_inflight",
                                                  "max_inflight_bytes", "batches", "points")}
