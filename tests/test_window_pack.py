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


# -- the loader: permutations drawn ahead, and every thread joined ------------------------------
def _perm_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "gds-stream-permutation"]


def _windowed_dataset(tmp_path):
    from helpers import make_dataset

    from gds_stream.format import FieldSpec

    fields = [FieldSpec("x", np.dtype("<f4")), FieldSpec("label", np.dtype("<u2"))]
    n = 3 * plan_mod._THREAD_ROWS + 123  # windows large enough to draw on a thread
    return make_dataset(tmp_path, [n], fields=fields), n


def test_next_epochs_permutation_is_drawn_ahead_and_equals_a_fresh_plan(tmp_path):
    import gds_stream
    from gds_stream.plan import EpochPlan

    ds, n = _windowed_dataset(tmp_path)
    window = 2 * plan_mod._THREAD_ROWS
    with gds_stream.open_loader(ds.path, device="cpu", batch_points=10_000, shuffle=True,
                                seed=5, shuffle_window=window) as ld:
        first = [b["x"].clone() for b in ld]
        ahead = ld._plan_ahead
        assert ahead is not None and ahead.epoch == 1  # started while epoch 0 ran
        ld.set_epoch(1)
        assert ld.epoch_plan() is ahead
        second = [b["x"].clone() for b in ld]
        fresh = EpochPlan(ld.plan_spec, 1)
        assert [b.point_indices().tolist() for b in ahead] == \
            [b.point_indices().tolist() for b in fresh]
        ld.set_epoch(7)  # an epoch nobody drew ahead: a plan of its own
        assert ld.epoch_plan() is not ld._plan_ahead and ld.epoch_plan().epoch == 7
    assert sum(len(b) for b in first) == sum(len(b) for b in second) == n
    assert not torch.equal(torch.cat(first), torch.cat(second))
    assert not _perm_threads()  # close() joined every permutation thread


def test_leaving_mid_epoch_and_exiting_is_clean(tmp_path):
    """A permutation thread may be drawing when the program ends: the process still exits 0
    without an abort from a thread inside torch at teardown."""
    import subprocess
    import sys
    from pathlib import Path

    ds, _ = _windowed_dataset(tmp_path)
    code = (f"import gds_stream\n"
            f"ld = gds_stream.open_loader({str(ds.path)!r}, device='cpu', batch_points=1000,"
            f" shuffle=True, shuffle_window={2 * plan_mod._THREAD_ROWS})\n"
            f"it = iter(ld)\nnext(it)\n")
    root = Path(__file__).resolve().parent.parent
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "terminate called" not in r.stderr
