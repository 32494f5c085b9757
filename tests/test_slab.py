"""Slab helpers: rows as integers for torch's fast 1-D gather, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gds_stream.slab import from_int_rows, int_rows


@pytest.mark.parametrize("dtype, row", [
    ("u1", ()), ("<i2", ()), ("<f4", ()), ("<f8", ()), ("u1", (3,)), ("<f4", (2,)),
    ("<f4", (3,)), ("<u2", (4,)), ("<f8", (2,)), ("i1", (2, 2)),
])
def test_int_rows_gather_moves_rows_bit_for_bit(dtype, row):
    rng = np.random.default_rng(0)
    n = 1000
    raw = rng.integers(0, 256, size=n * int(np.prod(row, dtype=int)) * np.dtype(dtype).itemsize,
                       dtype=np.uint8)  # any bit pattern, NaN payloads included
    arr = raw.view(np.dtype(dtype)).reshape((n, *row))
    t = torch.from_numpy(arr)
    src = int_rows(torch, t)
    rowbytes = arr[:1].nbytes
    assert src.dim() == (1 if rowbytes in (1, 2, 4, 8) else 2)  # the fast path where it fits
    idx = torch.from_numpy(rng.permutation(n)[:600].astype(np.int32))
    got = from_int_rows(torch, src.index_select(0, idx), t.dtype, tuple(t.shape[1:]))
    assert got.shape == (600, *row) and got.dtype == t.dtype
    assert np.array_equal(got.numpy().view(np.uint8), arr[idx.numpy()].view(np.uint8))
    empty = int_rows(torch, t[:0])
    assert empty.shape[0] == 0
