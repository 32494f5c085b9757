"""The fallback's hand-out on a CPU device: one batch's slab as the batch dict (views, the
within-batch gather, a fused read's column stacks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gds_stream.plan import BatchPlan
from gds_stream.slab import SLAB_ALIGN, SlabLayout, int_rows


_TORCH_DTYPES: dict[str, Any] = {}


def torch_dtype(torch: Any, dt: np.dtype) -> Any:
    key = dt.str
    if key not in _TORCH_DTYPES:
        _TORCH_DTYPES[key] = torch.from_numpy(np.empty(0, dtype=dt)).dtype
    return _TORCH_DTYPES[key]


def gathered_bytes(specs, batch: BatchPlan) -> int:
    """Bytes of a shuffled batch's gathered fields, each region 4 KiB-aligned."""
    return sum(-(-batch.num_points * s.point_bytes // SLAB_ALIGN) * SLAB_ALIGN for s in specs)


def numpy_dtype(torch: Any, dtype: Any) -> np.dtype | None:
    """The numpy dtype of a torch dtype (None where numpy has none, e.g. bfloat16)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except (TypeError, RuntimeError):
        return None


def unpack_slab(torch: Any, slab: Any, specs, layout: SlabLayout, batch: BatchPlan,
                gathered: Any = None, unit_key: str | None = None,
                stack_dtype: Any = None) -> dict:
    """Views of one uint8 slab as the batch dict; with a permutation, one gather per field
    (done on integer views of the same width, so every dtype is moved bit for bit), into
    ``gathered`` (a uint8 tensor of :func:`gathered_bytes`) when given, else new tensors.
    A fused read's stacked tensors (``layout.stacks``, of ``stack_dtype``) are column-major
    views of the slab; the fields not read straight into their columns are cast into them
    here, and no stacked field is handed out on its own."""
    n = batch.num_points
    perm = None
    if batch.perm_key is not None:
        perm = slab[layout.perm_offset:layout.perm_offset + 4 * n].view(torch.int32)
    # The slab viewed once per dtype; each region is then one slice of such a view (cutting
    # the uint8 slab takes three ops a region: slice, dtype view, shape view). Every region
    # starts at a multiple of its element size, and the slab's size is a multiple of 4 KiB.
    typed: dict[Any, tuple[Any, int]] = {}

    def region(off: int, count: int, dtype: Any) -> Any:
        got = typed.get(dtype)
        if got is None:
            v = slab.view(dtype)
            got = typed[dtype] = (v, v.element_size())
        v, size = got
        return v[off // size:off // size + count]

    out = {}
    if layout.stacks:
        stacked = {i for r in layout.stacks for i in r.fields}
        for r in layout.stacks:
            cols = region(r.offset, r.width * n, stack_dtype).view(r.width, n)
            for i, j in r.copies:
                spec, off = specs[i], layout.field_offsets[i]
                raw = region(off, n * spec.components, torch_dtype(torch, spec.dtype))
                k = spec.components
                cols[j:j + k].copy_(raw.view(1, n) if k == 1 else raw.view(n, k).t())
            out[r.key] = cols.t()
        specs_offs = [(s, o) for i, (s, o) in enumerate(zip(specs, layout.field_offsets))
                      if i not in stacked]
    else:
        specs_offs = list(zip(specs, layout.field_offsets))
    pos = 0
    for spec, off in specs_offs:
        if perm is None:
            t = region(off, n * spec.components, torch_dtype(torch, spec.dtype))
            out[spec.name] = t.view(n, spec.components) if spec.components > 1 else t
            continue
        # one integer per point where it fits: torch's fast 1-D gather, bit for bit
        src = int_rows(torch, slab[off:off + n * spec.point_bytes].view(n, spec.point_bytes))
        if gathered is None:
            t = src.index_select(0, perm)
        else:
            nb = n * spec.point_bytes
            t = gathered[pos:pos + nb].view(src.dtype).view(src.shape)
            torch.index_select(src, 0, perm, out=t)
            pos += -(-nb // SLAB_ALIGN) * SLAB_ALIGN
        t = t.view(torch.uint8).view(torch_dtype(torch, spec.dtype))
        out[spec.name] = t.view(n, spec.components) if spec.components > 1 else t.view(n)
    if batch.scan_sizes is not None:
        k, oo = len(batch.scan_sizes), layout.offsets_offset
        out["offset"] = region(oo, k, torch.int64)
        if unit_key is not None:
            out[unit_key] = region(oo + 8 * k, k, torch.int64)
    return out
