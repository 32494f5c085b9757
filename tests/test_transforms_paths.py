"""The transforms' CPU fast paths give exactly what their general paths give.

On a CPU, GridSample orders voxels by packed numpy sorts (the FNV order as a two-digit radix
sort; ravel keys with the point's index in the low bits) where other devices take torch's stable
sorts; ElasticDistortion samples in blocks of points spread over several grid_sample images;
large Gaussian draws are split into streams drawn on several threads; the coordinates pass
between transforms planar (the rows of one (3, n) tensor). Each fast path is
checked against the general one, bit for bit, on batches with many units, empty units and
voxels of several points.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gds_stream.transforms import (Compose, ElasticDistortion, GridSample, RandomJitter,
                                   RandomRotate, RandomScale, SphereCrop)
from gds_stream.transforms import _batch, elastic, sampling
from tests.test_transforms import check_consistent, dense_draw, make_batch

SIZES = (300, 0, 1, 250, 40, 0, 170)


def _equal(a, b):
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
        return
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tie_share", [0.0, 2.0])
@pytest.mark.parametrize("hash_", ["fnv", "ravel"])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_grid_sample_packed_sorts_equal_torch_sorts(monkeypatch, hash_, mode, tie_share):
    """The packed numpy sorts (ties of the high hash digit sorted apart, or a second digit)
    and torch's stable sorts give the same voxels, order, picks, parts, ``inverse`` and
    ``grid_coord``: bit-identical batches from the same generator."""
    monkeypatch.setattr(sampling, "TIE_SHARE", tie_share)
    b = make_batch(SIZES, extent=(0.6, 0.5, 0.3), seed=4)        # ~4 points per voxel
    t = GridSample(0.1, hash=hash_, mode=mode, return_inverse=True, return_grid_coord=True)
    fast = t(b, torch.Generator().manual_seed(9))
    monkeypatch.setattr(sampling, "PACKED_SORT", False)
    slow = t(b, torch.Generator().manual_seed(9))
    _equal(fast, slow)
    if mode == "train":
        check_consistent(b, fast)
        assert len(fast["x"]) < sum(SIZES)                       # voxels of several points


def _units(sizes):
    off = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    return _batch.Units({"offset": off}, int(off[-1]), torch.device("cpu"), "t")


@pytest.mark.parametrize("tie_share", [0.0, 0.25, 2.0])
def test_hash_order_equals_unit_hash_order_on_ties_in_either_digit(monkeypatch, tie_share):
    """Hashes crafted to tie in the high digit (with different low bits), in the low digit
    (different high bits), exactly (one voxel, in one unit and across units), and with the top
    bit set (negative as int64): the packed order (high-digit ties sorted apart, or a second
    digit) and its voxel starts equal the torch order's."""
    monkeypatch.setattr(sampling, "TIE_SHARE", tie_share)
    g = torch.Generator().manual_seed(1)
    sizes = [700, 0, 1, 523, 300]
    units = _units(sizes)
    n = units.n
    ib = (n - 1).bit_length()
    high = torch.randint(0, 6, (n,), generator=g) << (64 - 8)       # few high digits
    low = torch.randint(0, 40, (n,), generator=g)                   # few low digits
    h = high | low | (torch.randint(0, 3, (n,), generator=g) << ib)  # bits across the split
    h[::7] = h[3]                                                   # one hash, many units
    h[10:20] = -5                                                   # top bit set
    order, first = sampling._hash_order(h, units)
    want = sampling._unit_hash_order(h, units)
    assert torch.equal(order, want)
    hs, us = h[want], units.ids
    want_first = torch.ones(n, dtype=torch.bool)
    want_first[1:] = (hs[1:] != hs[:-1]) | (us[1:] != us[:-1])
    assert torch.equal(first, want_first)
    assert int(first.sum()) < n                                     # there were voxels of many


@pytest.mark.parametrize("keep", [1 << 22, 4])
def test_packed_sort_keeps_equal_keys_in_index_order(monkeypatch, keep):
    """Also past the index array a thread keeps (``ARANGE_KEEP``: then a fresh one)."""
    monkeypatch.setattr(sampling, "ARANGE_KEEP", keep)
    top = np.array([5, 1, 5, 0, 1, 5], dtype=np.uint64)
    order, hi = sampling._packed_sort(top.copy(), 3)
    assert order.tolist() == [3, 1, 4, 0, 2, 5] and hi.tolist() == [0, 1, 1, 5, 5, 5]


@pytest.mark.parametrize("size", [1, 3, 64, 0])
def test_point_blocks_cover_the_points_with_their_units_values(size):
    counts = torch.tensor([5, 0, 1, 0, 130, 2])
    per = torch.arange(12, dtype=torch.float32).view(6, 2)
    n = int(counts.sum())
    blocks = list(_batch.point_blocks(per, counts, n, size))
    assert [a for a, _, _ in blocks] == list(range(0, n, size or _batch.BLOCK))
    assert sum(m for _, m, _ in blocks) == n
    got = torch.cat([pp for _, _, pp in blocks], 1)
    assert torch.equal(got, torch.repeat_interleave(per, counts, dim=0).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elastic_blocks_and_images_do_not_change_the_result(monkeypatch, dtype):
    """Sampling in one block on one image, or in blocks of 1000 points each spread over 3
    images (padded rows included), gives the same coordinates, bit for bit; so does a skipped
    unit's (the 0.95 draw) row of the block."""
    b = make_batch((2500, 0, 1, 1800, 700), dtype=dtype, extent=(3.0, 2.5, 1.2), seed=6)
    t = ElasticDistortion([[0.4, 1.6], [0.8, 3.2]])
    monkeypatch.setattr(elastic, "IMAGE_BLOCK", 1 << 20)
    monkeypatch.setattr(elastic, "_images", lambda: 1)
    whole = [t(b, torch.Generator().manual_seed(s)) for s in range(4)]
    monkeypatch.setattr(elastic, "IMAGE_BLOCK", 1000)
    monkeypatch.setattr(elastic, "_images", lambda: 3)
    monkeypatch.setattr(elastic, "MIN_IMAGE_POINTS", 100)
    blocked = [t(b, torch.Generator().manual_seed(s)) for s in range(4)]
    for w, k in zip(whole, blocked):
        _equal(w, k)
    assert not torch.equal(whole[0]["x"], b["x"])


def test_coordinates_row_major_or_planar_or_separate_give_the_same_batches():
    """x, y, z as separate fields, as the rows of one (3, n) tensor (what a transform writes)
    or as the columns of one row-major (n, 3) tensor: each taken without a stack where it is
    one tensor, and every transform gives the same values."""
    b = make_batch((60, 0, 45))
    xyz = torch.stack([b[c] for c in "xyz"], 1)
    p, r = xyz.t().contiguous(), xyz.clone()
    planar = dict(b, **{c: p[i] for i, c in enumerate("xyz")})
    rows = dict(b, **{c: r[:, i] for i, c in enumerate("xyz")})
    for layout in (planar, rows):
        got = _batch.get_coord(layout, ("x", "y", "z"), "t")
        assert got.untyped_storage().data_ptr() == layout["x"].untyped_storage().data_ptr()
        assert torch.equal(got, xyz)
    t = Compose([RandomRotate(center=[0, 0, 0], p=1), RandomScale(anisotropic=True),
                 ElasticDistortion(), GridSample(0.3), SphereCrop(40)])
    outs = [t(x, torch.Generator().manual_seed(2)) for x in (b, planar, rows)]
    for o in outs[1:]:
        _equal(outs[0], o)
    assert _batch.planar(_batch.get_coord(outs[0], ("x", "y", "z"), "t"))


def test_large_gaussian_draws_split_into_streams_independent_of_threads(monkeypatch):
    """A CPU draw of at least RNG_SPLIT_MIN values is RNG_STREAMS streams seeded from the
    generator: the same values on one thread or several, again from the same seed, different
    streams in each part; smaller draws are torch's own from the generator."""
    monkeypatch.setattr(_batch, "RNG_SPLIT_MIN", 1000)
    threads = torch.get_num_threads()
    draws = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            draws.append(_batch.randn(torch.empty(4003), torch.Generator().manual_seed(5)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(draws[0], d) for d in draws[1:])
    parts = draws[0].chunk(_batch.RNG_STREAMS)
    assert len(parts) == _batch.RNG_STREAMS and not torch.equal(parts[0][:900], parts[1][:900])
    assert abs(float(draws[0].mean())) < 0.1 and abs(float(draws[0].std()) - 1) < 0.1
    small = _batch.randn(torch.empty(999), torch.Generator().manual_seed(5))
    assert torch.equal(small, torch.randn(999, generator=torch.Generator().manual_seed(5)))
    jit = [RandomJitter(sigma=1.0, clip=10.0)(make_batch((700, 0, 400)),
                                                torch.Generator().manual_seed(1))
           for _ in range(2)]
    _equal(jit[0], jit[1])


def test_elastic_keeps_half_empty_padded_blocks_dense(monkeypatch):
    """Chunks of a batch differ in extent (rotated squares, partial chunks at a scan's edge):
    a padded block 3.6x the units' own grids still takes the padded layout (~5x cheaper a cell
    than grids end to end), which used to be refused past 2x."""
    g = torch.Generator().manual_seed(0)
    r = 10 / 2 ** 0.5
    big = torch.tensor([[r, 0.0], [-r, 0.0], [0.0, r], [0.0, -r]])    # a 10 m square at 45°
    xy = [torch.cat([big, (torch.rand(200, 2, generator=g) - 0.5) * 7])]
    xy += [torch.rand(100, 2, generator=g) * 5 for _ in range(5)]       # five 5 m squares
    xy = torch.cat(xy)
    n = len(xy)
    b = {"x": xy[:, 0].contiguous(), "y": xy[:, 1].contiguous(),
         "z": torch.rand(n, generator=g), "offset": torch.tensor([204, 304, 404, 504, 604, 704])}
    calls = []
    dense = elastic._dense_noise
    monkeypatch.setattr(elastic, "_dense_noise", lambda *a: calls.append(1) or dense(*a))
    out = ElasticDistortion([[0.1, 0.2]])(b, torch.Generator().manual_seed(4))
    assert calls == [1] and torch.isfinite(out["x"]).all() and not torch.equal(out["x"], b["x"])


def _box_sums(x: np.ndarray) -> np.ndarray:
    """Pointcept's smoothing of one unit's (D0, D1, D2, 3) noise without the ÷ 3s: x[i - 1] +
    x[i] + x[i + 1] along x, y, z, twice over, zero beyond the grid's ends."""
    for _ in range(2):
        for a in range(3):
            p = np.pad(x, [(1, 1) if b == a else (0, 0) for b in range(4)])
            n = x.shape[a]
            x = sum(np.take(p, np.arange(k, k + n), axis=a) for k in range(3))
    return x


@pytest.mark.parametrize("band_max", [None, 0])
def test_elastic_noise_block_products_equal_box_passes(monkeypatch, band_max):
    """The padded noise block's smoothing — three batched products with per-unit banded
    matrices, or (``BAND_MAX`` 0, large grids) slice passes — equals Pointcept's six box passes
    on each unit's own corner of the draw, within float32 rounding, units shorter than the
    block along every axis included; with the products the padding and a skipped unit (dims 0)
    come out 0."""
    if band_max is not None:
        monkeypatch.setattr(elastic, "BAND_MAX", band_max)
    dev = torch.device("cpu")
    dims = torch.tensor([[7, 5, 4], [3, 6, 3], [0, 0, 0], [7, 6, 4], [4, 3, 5]], device=dev)
    dmax = [7, 6, 5]
    got = elastic._dense_noise(dims, dmax, torch.Generator().manual_seed(3), dev).cpu()
    raw = dense_draw(torch.Generator().manual_seed(3), dims.tolist(), dmax)
    assert not raw[2].any() and not raw[1, 3:].any() and not raw[4, :, 3:].any()
    for u, d in enumerate(dims.tolist()):
        own = got[u, :d[0], :d[1], :d[2]].numpy()
        if d[0]:
            want = _box_sums(raw[u, :d[0], :d[1], :d[2]].astype(np.float64))
            np.testing.assert_allclose(own, want, rtol=0, atol=1e-4 * np.abs(want).max())
        pad = got[u].clone()
        pad[:d[0], :d[1], :d[2]] = 0
        assert band_max == 0 or not pad.any(), u


def test_elastic_band_matrices_kept_between_batches_stay_equal_and_bounded(monkeypatch):
    """The CPU's filter matrices are kept per (cells, block length) between batches, read only;
    batch after batch of other lengths they still equal torch's, and the kept bytes never pass
    the bound (the cache starts again)."""
    monkeypatch.setattr(elastic, "_BANDS", {})
    monkeypatch.setattr(elastic, "_BANDS_BYTES", [0])
    monkeypatch.setattr(elastic, "BANDS_KEEP_BYTES", 20_000)
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        dmax = torch.randint(3, 20, (3,), generator=g)
        dims = torch.minimum(torch.randint(0, 20, (4, 3), generator=g), dmax)
        got = elastic._band_mats(dims, dmax.tolist(), torch.float32)
        want = [elastic._bands(dims[:, a], int(d), torch.float32) for a, d in enumerate(dmax)]
        want[2] = torch.stack([torch.kron(m, torch.eye(3)) for m in want[2]])
        for gm, w in zip(got, want):
            assert torch.equal(gm, w)
        assert 0 < elastic._BANDS_BYTES[0] <= 20_000
        assert sum(m.nbytes for m in elastic._BANDS.values()) == elastic._BANDS_BYTES[0]
    assert not next(iter(elastic._BANDS.values())).flags.writeable


def test_elastic_band_matrices_from_numpy_equal_torch():
    """On a CPU the noise block's filter matrices are built by numpy; they equal torch's (the
    other devices' path) exactly: units of every length up to the block's, a skipped one (0)."""
    dims = torch.tensor([[7, 5, 4], [3, 6, 3], [0, 0, 0], [7, 6, 5], [4, 3, 5]])
    dmax = [7, 6, 5]
    got = elastic._band_mats(dims, dmax, torch.float32)
    want = [elastic._bands(dims[:, a], d, torch.float32) for a, d in enumerate(dmax)]
    want[2] = torch.stack(
        [torch.kron(m, torch.eye(3)) for m in want[2]])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    assert got[0][2].abs().sum() == 0 and got[0][0, 0, 0] == 2 and got[0][0, 6, 6] == 2
    assert got[0][1, 2, 2] == 2 and got[0][1, 3, 3] == 0 and got[0][1, 1, 1] == 3
