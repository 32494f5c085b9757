"""A batch's slab: one contiguous buffer (host or device) holding every region of a batch.

Both backends lay a batch out the same way — one region per field, then the within-batch
permutation, then the unit offsets and ids — each region 4 KiB-aligned, so one read or one copy
moves it and views of it are the batch's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .format import FieldSpec

#: Region alignment inside a batch's host/device slab (bytes).
SLAB_ALIGN = 4096
#: Item size → the integer dtype a permutation gather moves values as (bit for bit, any dtype).
GATHER_INT: dict[int, type[np.integer]] = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@dataclass(frozen=True)
class SlabLayout:
    """Where each region of one batch lives inside its contiguous slab (host and device alike):
    one region per field, then the int32 permutation (if any), then the int64 offsets and unit
    ids (unit modes)."""

    field_offsets: tuple[int, ...]
    perm_offset: int
    offsets_offset: int
    nbytes: int

    @staticmethod
    def build(specs: Sequence[FieldSpec], num_points: int, has_perm: bool,
              num_scans: int | None) -> "SlabLayout":
        pos, offs = 0, []
        for s in specs:
            offs.append(pos)
            pos += _round(num_points * s.point_bytes)
        perm = pos
        if has_perm:
            pos += _round(num_points * 4)
        oo = pos
        if num_scans is not None:  # the units' cumulative ends, then their ids
            pos += _round(num_scans * 16)
        return SlabLayout(tuple(offs), perm, oo, max(pos, SLAB_ALIGN))


def _round(n: int) -> int:
    return -(-n // SLAB_ALIGN) * SLAB_ALIGN
