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
class StackRegion:
    """One ``stack=`` tensor built in the slab (a fused read): ``width`` columns of the stack's
    dtype back to back, column ``j`` at ``offset + j * col_bytes``; the fields read straight
    into their column have no region of their own, ``copies`` lists the others as (field index,
    first column), read into their own region and cast into their columns after the read."""

    key: str
    offset: int
    width: int
    col_bytes: int
    copies: tuple[tuple[int, int], ...]
    fields: tuple[int, ...]  # every field stacked into it, in column order


@dataclass(frozen=True)
class SlabLayout:
    """Where each region of one batch lives inside its contiguous slab (host and device alike):
    one region per field, then the column-major ``stack=`` tensors of a fused read (if any),
    then the int32 permutation (if any), then the int64 offsets and unit ids (unit modes).
    A field read straight into a stack column has that column as its region."""

    field_offsets: tuple[int, ...]
    perm_offset: int
    offsets_offset: int
    nbytes: int
    stacks: tuple[StackRegion, ...] = ()

    @staticmethod
    def build(specs: Sequence[FieldSpec], num_points: int, has_perm: bool,
              num_scans: int | None, stack: Sequence[tuple[str, Sequence[str]]] = (),
              stack_dtype: np.dtype | None = None, stack_itemsize: int = 0) -> "SlabLayout":
        """``stack``/``stack_dtype``/``stack_itemsize``: lay out the stacked tensors of a fused
        read too (``stack_dtype`` None: no field is read straight into a column, every one is
        cast into it)."""
        n = num_points
        index = {s.name: i for i, s in enumerate(specs)}
        uses: dict[str, int] = {}
        for _, names in stack:
            for name in names:
                uses[name] = uses.get(name, 0) + 1
        direct: dict[int, tuple[int, int]] = {}  # field -> (stack, column) it is read into
        for k, (_, names) in enumerate(stack):
            j = 0
            for name in names:
                s = specs[index[name]]
                if (s.components == 1 and stack_dtype is not None and s.dtype == stack_dtype
                        and uses[name] == 1):
                    direct[index[name]] = (k, j)
                j += s.components
        pos, offs = 0, [0] * len(specs)
        for i, s in enumerate(specs):
            if i not in direct:
                offs[i] = pos
                pos += _round(n * s.point_bytes)
        regions = []
        col = n * stack_itemsize  # columns back to back: the (n, width) view's .t() is dense
        for k, (key, names) in enumerate(stack):
            j, copies = 0, []
            for name in names:
                i = index[name]
                if direct.get(i) == (k, j):
                    offs[i] = pos + j * col
                else:
                    copies.append((i, j))
                j += specs[i].components
            regions.append(StackRegion(key, pos, j, col, tuple(copies),
                                       tuple(index[name] for name in names)))
            pos += _round(j * col)
        perm = pos
        if has_perm:
            pos += _round(num_points * 4)
        oo = pos
        if num_scans is not None:  # the units' cumulative ends, then their ids
            pos += _round(num_scans * 16)
        return SlabLayout(tuple(offs), perm, oo, max(pos, SLAB_ALIGN), tuple(regions))


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
