"""A batch's slab: one contiguous buffer (host or device) holding every region of a batch.

Both backends lay a batch out the same way — one region per field, then the within-batch
permutation, then the unit offsets and ids — each region 4 KiB-aligned, so one read or one copy
moves it and views of it are the batch's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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


def int_rows(torch: Any, t: Any) -> Any:
    """``t`` (contiguous, rows along dim 0) as integers that move its rows bit for bit: one
    integer per row when a row is 1, 2, 4 or 8 bytes — a 1-D ``index_select``, torch's fast
    path (the 2-D one costs several times more on a CPU) — else ``(n, k)`` integers of the
    element's size. :func:`from_int_rows` turns a gather of it back."""
    n = int(t.shape[0])
    k = 1
    for d in t.shape[1:]:
        k *= int(d)
    es = t.element_size()
    b = t.reshape(n, k).view(torch.uint8)
    if k * es in GATHER_INT:
        return b.view(torch_int(torch, k * es)).view(n)
    return b.view(torch_int(torch, es))


def from_int_rows(torch: Any, g: Any, dtype: Any, row_shape: tuple[int, ...]) -> Any:
    """The rows gathered from :func:`int_rows` as ``dtype`` of shape ``(m, *row_shape)``."""
    return g.view(torch.uint8).view(dtype).view((int(g.shape[0]), *row_shape))


def torch_int(torch: Any, nbytes: int) -> Any:
    """The signed torch integer dtype of ``nbytes`` bytes."""
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[nbytes]


def _round(n: int) -> int:
    return -(-n // SLAB_ALIGN) * SLAB_ALIGN


def gather_field_rows(rows: Sequence[Any], idx: Any) -> list[Any]:
    """``[r.index_select(0, idx) for r in rows]`` in as few kernel launches as the layout allows.

    ``rows`` are uint8 tensors of shape ``(n, width)``, the fields of one batch as rows of bytes.
    Fields of equal width that lie equally spaced in one buffer — the fields of a single-range
    batch in its slab — are gathered together, one ``index_select`` over a strided
    ``(fields, n, width)`` view; the rest one by one. Bit for bit either way (bytes move)."""
    out: list[Any] = [None] * len(rows)
    groups: dict[int, list[int]] = {}
    for k, r in enumerate(rows):
        groups.setdefault(int(r.shape[1]), []).append(k)
    for width, ks in groups.items():
        for run in _even_runs(rows, ks):
            first = rows[run[0]]
            if len(run) == 1:
                out[run[0]] = first.index_select(0, idx)
                continue
            stride = rows[run[1]].data_ptr() - first.data_ptr()
            both = first.as_strided((len(run), int(first.shape[0]), width), (stride, width, 1))
            gathered = both.index_select(1, idx)
            for j, k in enumerate(run):
                out[k] = gathered[j]
    return out


def _even_runs(rows: Sequence[Any], ks: list[int]) -> list[list[int]]:
    """``ks`` split into runs that can be gathered together: contiguous tensors of one storage,
    in address order, equally spaced without overlap (a run of one otherwise)."""
    solo = [[k] for k in ks if not rows[k].is_contiguous()]
    rest = sorted((k for k in ks if rows[k].is_contiguous()),
                  key=lambda k: (rows[k].untyped_storage().data_ptr(), rows[k].data_ptr()))
    runs: list[list[int]] = []
    for k in rest:
        r = rows[k]
        if runs:
            run = runs[-1]
            last = rows[run[-1]]
            same = last.untyped_storage().data_ptr() == r.untyped_storage().data_ptr()
            step = r.data_ptr() - last.data_ptr()
            size = int(last.shape[0]) * int(last.shape[1])
            want = step if len(run) == 1 else rows[run[1]].data_ptr() - rows[run[0]].data_ptr()
            if same and step >= size and step > 0 and step == want:
                run.append(k)
                continue
        runs.append([k])
    return solo + runs
