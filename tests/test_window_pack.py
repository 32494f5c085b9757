"""Shuffle windows on a CPU: the packed-row gather is bit for bit the per-field gather, and the
window permutation (drawn on a thread) is the one its key gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gds_stream import plan as plan_mod
from gds_stream.window import PackedWindow, gather_rows, pack_window

# field sets whose packed rows are 1, 2, 4, 8, 16, 32 and 48 bytes wide
LAYOUTS = {
    1: [("a", torch.uint8, ())],
    2: [("a", torch.uint8, ()), ("b", torch.int8, ())],
    4: [("a", torch.int16, ()), ("b", torch.uint8, ()), ("c", torch.bool, ())],
    8: [("x", torch.float32, ()), ("i", torch.uint16, ()), ("c", torch.uint8, ())],
    16: [("x", torch.float32, ()), ("y", torch.float32, ()), ("z", torch.float32, ()),
         ("intensity", torch.uint16, ()), ("sem_class", torch.uint8, ())],
    32: [("t", torch.float64, ()), ("xyz", torch.float32, (3,)), ("rgb", torch.uint16, (3,)),
         ("k", torch.int8, ())],
    48: [("p", torch.float64, (3,)), ("rgb", torch.uint8, (3,)), ("n", torch.float16, (2,)),
         ("id", torch.int64, ())],
}


def _window(layout, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, dtype, shape in layout:
        top = 2 if dtype == torch.bool else 256  # a bool byte is 0 or 1
        raw = torch.randint(0, top, (n * int(np.prod(shape or (1,))) * dtype.itemsize,),
                            generator=g, dtype=torch.uint8)
        out[name] = raw.view(dtype).view((n, *shape))
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


@pytest.mark.parametrize("width", sorted(LAYOUTS))
def test_packed_gather_is_the_per_field_gather_bit_for_bit(width):
    n = 5000
    window = _window(LAYOUTS[width], n, seed=width)
    if "x" in window:  # NaN payloads and signed zeros move untouched
        window["x"][:4] = torch.tensor([0x7F800001, 0xFFC00123, 0x80000000, 0x7FBFFFFF],
                                       dtype=torch.int64).to(torch.int32).view(torch.float32)
    packed = pack_window(window)
    if len(window) > 1:
        assert isinstance(packed, PackedWindow)
        assert packed.rows.shape == (n, width)
    rows = np.random.default_rng(width).permutation(n)[:1234].astype(np.int32)
    rows[:4] = [0, 1, 2, 3]
    got = gather_rows(packed, rows)
    assert list(got) == list(window)  # the batch keeps the window's field order
    for name, t in window.items():
        assert got[name].is_contiguous()
        assert _same_bits(got[name], t[torch.from_numpy(rows).long()]), name


def test_packed_window_edge_cases():
    one = _window([("x", torch.float32, ())], 100)
    assert pack_window(one) is one  # one field: nothing to pack
    empty = _window(LAYOUTS[16], 0)
    assert pack_window(empty) is empty
    got = gather_rows(empty, np.zeros(0, dtype=np.int32))
    assert all(v.shape[0] == 0 for v in got.values())
    window = _window(LAYOUTS[16], 3)
    got = gather_rows(pack_window(window), np.array([2], dtype=np.int32))
    assert all(_same_bits(got[k], v[2:3]) for k, v in window.items())


@pytest.mark.parametrize("n", [0, 1, 1000, plan_mod._THREAD_ROWS + 17])
def test_window_permutation_is_its_keys_on_any_thread(n):
    key = [7, 3, 1, 0, 99]
    p = plan_mod._Permutation(n, key)
    got = p.result()
    assert np.array_equal(got, plan_mod._permutation(n, key))
    assert np.array_equal(np.sort(got), np.arange(n))
    assert got.dtype == np.int32
    assert np.array_equal(p.result(), got)  # asked again: the same array
    if n > 1000:
        assert not np.array_equal(got, plan_mod._permutation(n, key[:-1] + [98]))


def test_window_permutation_error_reaches_the_caller(monkeypatch):
    def boom(n, key):
        raise MemoryError("no room for the permutation")
    monkeypatch.setattr(plan_mod, "_permutation", boom)
    p = plan_mod._Permutation(plan_mod._THREAD_ROWS, [1])
    with pytest.raises(MemoryError, match="no room"):
        p.result()
