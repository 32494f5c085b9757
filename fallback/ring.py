"""The pinned ring lives in :mod:`gds_stream.ring` (both backends use it)."""

from gds_stream.ring import PinnedRing, Slot

__all__ = ["PinnedRing", "Slot"]
