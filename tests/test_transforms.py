"""gds_stream.transforms against a per-sample numpy reference of Pointcept's semantics.

The reference (``bench.pointcept_ref``) transforms one unit at a time, as Pointcept's DataLoader
workers do; the batched transforms must give, unit by unit, exactly its result (deterministic
transforms, up to float32 rounding where arithmetic differs) or hold its invariants (random
ones). The benchmark's baseline runs the same reference, so what these tests prove equal is what
the benchmark compares.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import pointcept_ref as ref
from gds_stream.errors import LoaderError
from gds_stream.transforms import (CenterShift, Compose, ElasticDistortion, GridSample,
                                   NormalizeColor, RandomDropout, RandomFlip, RandomJitter,
                                   RandomRotate, RandomScale, SphereCrop, ToPointcept)

EXTRA_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.float32, torch.float64, torch.bool, torch.uint16)


def make_batch(sizes, seed=0, extent=(4.0, 4.0, 2.0), dtype=torch.float32, offset=True):
    """A batch of units of ``sizes`` points: x, y, z, one field of every dtype, a (n, 2) field,
    ``point_id`` (the point's index) and ``chunk``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    b = {c: (torch.rand(n, generator=g, dtype=torch.float64) * e + 10 * i).to(dtype)
         for i, (c, e) in enumerate(zip("xyz", extent))}
    for dt in EXTRA_DTYPES:
        b[f"f_{str(dt).split('.')[-1]}"] = (torch.arange(n) % 7).to(dt)
    b["pair"] = torch.stack([torch.arange(n), -torch.arange(n)], 1)
    b["point_id"] = torch.arange(n)
    if offset:
        b["offset"] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
        b["chunk"] = torch.arange(100, 100 + len(sizes))
    return b


def units_of(batch):
    """Per unit: (start, numpy coord (n, 3))."""
    off = batch.get("offset", torch.tensor([len(batch["x"])]))
    ends = off.tolist()
    starts = [0] + ends[:-1]
    xyz = torch.stack([batch[c] for c in "xyz"], 1).numpy()
    return [(s, xyz[s:e]) for s, e in zip(starts, ends)]


def out_units(batch):
    return units_of(batch)


def check_consistent(src, out):
    """Every per-point field of ``out`` is the source field at ``out['point_id']``."""
    ids = out["point_id"]
    for k, v in src.items():
        if k in ("offset", "chunk"):
            continue
        assert torch.equal(out[k], v[ids]), k
    if "offset" in src:
        assert int(out["offset"][-1]) == len(ids)
        assert torch.equal(out["chunk"], src["chunk"])
        # every point stays in its own unit
        unit_src = torch.repeat_interleave(torch.arange(len(src["offset"])),
                                           torch.diff(src["offset"], prepend=torch.zeros(1, dtype=torch.int64)))
        unit_out = torch.repeat_interleave(torch.arange(len(out["offset"])),
                                           torch.diff(out["offset"], prepend=torch.zeros(1, dtype=torch.int64)))
        assert torch.equal(unit_src[ids], unit_out)


SIZES = [(50, 1, 0, 300, 7), (1,), (0, 0), (200,), (0,), (1, 1, 1)]


# -- deterministic transforms: equal to the reference -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("apply_z", [True, False])
def test_center_shift_equals_reference(dtype, apply_z):
    b = make_batch((50, 1, 0, 300, 7), dtype=dtype)
    out = CenterShift(apply_z=apply_z)(b)
    for (s, xyz), (_, got) in zip(units_of(b), out_units(out)):
        if len(xyz):
            want = ref.CenterShift(apply_z)({"coord": xyz.copy()}, None)["coord"]
            np.testing.assert_array_equal(got, want)
    assert out["x"].dtype == dtype and torch.equal(out["f_uint8"], b["f_uint8"])


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_rotate_fixed_angle_equals_reference(axis):
    b = make_batch((50, 1, 0, 300))
    out = RandomRotate(angle=[0.3, 0.3], axis=axis, always_apply=True)(b)
    for (s, xyz), (_, got) in zip(units_of(b), out_units(out)):
        if len(xyz):
            want = ref.RandomRotate([0.3, 0.3], axis=axis, always_apply=True)(
                {"coord": xyz.copy()}, np.random.default_rng(0))["coord"]
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * 30)


def test_rotate_fixed_center_and_p0():
    b = make_batch((30, 20))
    out = RandomRotate(angle=[0.5, 0.5], center=(1, 2, 3), axis="z", p=1)(b)
    for (s, xyz), (_, got) in zip(units_of(b), out_units(out)):
        want = ref.RandomRotate([0.5, 0.5], center=(1, 2, 3), p=1)(
            {"coord": xyz.copy()}, np.random.default_rng(0))["coord"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    same = RandomRotate(p=0)(b, torch.Generator().manual_seed(1))
    assert all(torch.equal(same[c], b[c]) for c in "xyz")


@pytest.mark.parametrize("aniso", [False, True])
def test_scale_fixed_equals_reference(aniso):
    b = make_batch((50, 3))
    out = RandomScale(scale=[1.5, 1.5], anisotropic=aniso)(b)
    xyz = units_of(b)[0][1]
    want = ref.RandomScale([1.5, 1.5], aniso)({"coord": xyz.copy()},
                                              np.random.default_rng(0))["coord"]
    np.testing.assert_allclose(out_units(out)[0][1], want, rtol=1e-6)


def test_normalize_color_equals_reference():
    b = make_batch((10, 5))
    for c in ("red", "green", "blue"):
        b[c] = torch.randint(0, 256, (15,), dtype=torch.int32).to(torch.uint8)
    out = NormalizeColor()(b)
    color = torch.stack([b[c] for c in ("red", "green", "blue")], 1).numpy()
    want = ref.NormalizeColor()({"coord": None, "color": color}, None)["color"]
    got = torch.stack([out[c] for c in ("red", "green", "blue")], 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-7)
    assert out["red"].dtype == torch.float32


@pytest.mark.parametrize("hash_", ["fnv", "ravel"])
@pytest.mark.parametrize("sizes", SIZES)
def test_grid_sample_test_parts_equal_reference(hash_, sizes):
    b = make_batch(sizes, extent=(0.3, 0.3, 0.2))          # several points per voxel
    parts = GridSample(0.1, hash=hash_, mode="test", return_grid_coord=True)(b)
    assert isinstance(parts, list) and parts
    refs = []
    for s, xyz in units_of(b):
        r = ref.GridSample(0.1, hash_, "test", return_grid_coord=True)({"coord": xyz.copy()}, None)
        refs.append((s, r))
    assert len(parts) == max(len(r) for _, r in refs)
    for i, part in enumerate(parts):
        check_consistent(b, part)
        assert torch.equal(part["index"], part["point_id"])
        counts = torch.diff(part["offset"], prepend=torch.zeros(1, dtype=torch.int64)).tolist()
        ends = part["offset"].tolist()
        for u, (s, r) in enumerate(refs):
            got = part["index"][ends[u] - counts[u]:ends[u]].numpy()
            if i < len(r) and len(r[i]["index"]):
                np.testing.assert_array_equal(got, r[i]["index"] + s)
                np.testing.assert_array_equal(
                    part["grid_coord"][ends[u] - counts[u]:ends[u]].numpy(), r[i]["grid_coord"])
            else:
                assert counts[u] == 0                        # an empty part for this unit


@pytest.mark.parametrize("hash_", ["fnv", "ravel"])
@pytest.mark.parametrize("sizes", SIZES)
def test_grid_sample_train_one_point_per_voxel(hash_, sizes):
    b = make_batch(sizes, extent=(0.3, 0.3, 0.2))
    out = GridSample(0.1, hash=hash_, return_grid_coord=True, return_inverse=True)(
        b, torch.Generator().manual_seed(3))
    check_consistent(b, out)
    ends = out["offset"].tolist()
    starts = [0] + ends[:-1]
    for (s, xyz), a, e in zip(units_of(b), starts, ends):
        if not len(xyz):
            assert a == e
            continue
        grid, order, count = ref.GridSample(0.1, hash_).voxels({"coord": xyz.copy()})
        voxels = grid[order[np.cumsum(np.insert(count, 0, 0)[:-1])]]
        # exactly the reference's voxels, in the reference's order, one point each
        np.testing.assert_array_equal(out["grid_coord"][a:e].numpy(), voxels)
        kept = out["point_id"][a:e].numpy() - s
        np.testing.assert_array_equal(grid[kept], voxels)           # each from its voxel
        inv = out["inverse"][s:s + len(xyz)].numpy()
        np.testing.assert_array_equal(out["grid_coord"][inv].numpy(), grid)



@pytest.mark.parametrize("hash_", ["fnv", "ravel"])
def test_grid_sample_more_than_256_units(hash_):
    """Past 256 units the unit sort key widens (uint8 -> int16): still the reference's voxels,
    order and parts, unit by unit."""
    sizes = tuple([4] * 300 + [0, 9])
    test_grid_sample_train_one_point_per_voxel(hash_, sizes)
    test_grid_sample_test_parts_equal_reference(hash_, sizes)

def test_grid_sample_choice_is_uniform_chi_square():
    """4 points in each of 2000 voxels (two units): the chosen point's rank in its voxel is
    uniform (chi-square, 3 degrees of freedom, p = 0.001 bound 16.27; seed fixed)."""
    v = 1000
    base = torch.arange(v, dtype=torch.float64).repeat_interleave(4) + 0.5
    one = {"x": base, "y": torch.zeros(4 * v, dtype=torch.float64) + 0.5,
           "z": torch.zeros(4 * v, dtype=torch.float64) + 0.5}
    b = {k: torch.cat([t, t]) for k, t in one.items()}
    b["offset"] = torch.tensor([4 * v, 8 * v])
    b["point_id"] = torch.arange(8 * v)
    out = GridSample(1.0)(b, torch.Generator().manual_seed(1234))
    assert len(out["x"]) == 2 * v
    rank = (out["point_id"] % 4).numpy()
    observed = np.bincount(rank, minlength=4)
    chi2 = ((observed - 2 * v / 4) ** 2 / (2 * v / 4)).sum()
    assert chi2 < 16.27, observed


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("rate", [None, 0.5])
def test_sphere_crop_center_equals_reference(sizes, rate):
    b = make_batch(sizes)
    t = SphereCrop(point_max=5, sample_rate=rate, mode="center")
    out = t(b)
    if out is not b:
        check_consistent(b, out)
    ends = out["offset"].tolist()
    starts = [0] + ends[:-1]
    for (s, xyz), a, e in zip(units_of(b), starts, ends):
        r = ref.SphereCrop(5, rate, "center")({"coord": xyz.copy(),
                                               "id": np.arange(len(xyz))}, None)
        np.testing.assert_array_equal(out["point_id"][a:e].numpy() - s, r["id"])


def test_sphere_crop_random_keeps_the_nearest():
    b = make_batch((400, 3, 0, 250))
    out = SphereCrop(point_max=100)(b, torch.Generator().manual_seed(5))
    check_consistent(b, out)
    ends = out["offset"].tolist()
    starts = [0] + ends[:-1]
    assert [e - a for a, e in zip(starts, ends)] == [100, 3, 0, 100]
    for (s, xyz), a, e in zip(units_of(b), starts, ends):
        if len(xyz) <= 100:
            continue
        kept = out["point_id"][a:e].numpy() - s
        center = xyz[kept[0]]                                 # the nearest point is the centre
        d = ((xyz - center) ** 2).sum(1)
        assert d[kept[0]] == 0
        dropped = np.setdiff1d(np.arange(len(xyz)), kept)
        assert d[kept].max() <= d[dropped].min()
        assert np.all(np.diff(d[kept]) >= -1e-6)            # nearest first


# -- random transforms: invariants ----------------------------------------------------------

def _pairwise(xyz):
    return np.sqrt(((xyz[:, None] - xyz[None]) ** 2).sum(-1))


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_random_rotate_preserves_distances(axis):
    b = make_batch((40, 1, 0, 60), dtype=torch.float64)
    out = RandomRotate(axis=axis, p=1)(b, torch.Generator().manual_seed(2))
    changed = 0
    for (_, xyz), (_, got) in zip(units_of(b), out_units(out)):
        np.testing.assert_allclose(_pairwise(got), _pairwise(xyz), atol=1e-9)
        changed += len(xyz) > 1 and not np.allclose(got, xyz)
    assert changed == 2


def test_flip_scale_jitter_invariants():
    b = make_batch((40, 30), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    f = RandomFlip(p=1)(b, g)
    assert torch.equal(f["x"], -b["x"]) and torch.equal(f["y"], -b["y"])
    assert torch.equal(f["z"], b["z"])
    s = RandomScale(scale=[0.5, 2.0])(b, g)
    for (_, xyz), (_, got) in zip(units_of(b), out_units(s)):
        ratio = got / xyz
        np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-12)
        assert 0.5 <= ratio[0, 0] <= 2.0
    j = RandomJitter(sigma=0.05, clip=0.02)(b, g)
    d = torch.stack([j[c] - b[c] for c in "xyz"])
    assert d.abs().max() <= 0.02 + 1e-12 and d.abs().max() > 0.019   # clipped, not all zero


def test_random_dropout_counts_and_consistency():
    b = make_batch((100, 1, 0, 57, 10))
    out = RandomDropout(dropout_ratio=0.2, dropout_application_ratio=1.0)(
        b, torch.Generator().manual_seed(0))
    check_consistent(b, out)
    counts = torch.diff(out["offset"], prepend=torch.zeros(1, dtype=torch.int64)).tolist()
    assert counts == [80, 0, 0, 45, 8]
    assert len(set(out["point_id"].tolist())) == len(out["point_id"])
    assert RandomDropout(dropout_application_ratio=0.0)(b) is b


def test_elastic_equals_reference_with_the_same_noise():
    """One unit: the batched distortion equals the reference fed the very noise the transform
    drew (the generator's stream: one uniform for the 0.95 draw, then one N×3 grid per pass)."""
    b = make_batch((500,), dtype=torch.float64, extent=(3.0, 2.0, 1.0))
    params = [[0.2, 0.4], [0.8, 1.6]]
    out = ElasticDistortion(params)(b, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert torch.rand(1, generator=g, dtype=torch.float64) < 0.95
    xyz = units_of(b)[0][1].copy()
    for gran, mag in params:
        dims = ((xyz - xyz.min(0)).max(0) // gran).astype(int) + 3
        noise = torch.randn((int(np.prod(dims)), 3), generator=g).numpy().reshape(*dims, 3)
        xyz = ref.elastic_distortion(xyz, gran, mag, None, noise=noise)
    np.testing.assert_allclose(units_of(out)[0][1], xyz, atol=1e-5)
    assert not np.allclose(units_of(out)[0][1], units_of(b)[0][1])


def test_elastic_per_unit_and_bounded():
    b = make_batch((300, 1, 0, 200))
    out = ElasticDistortion()(b, torch.Generator().manual_seed(0))
    d = torch.stack([out[c] - b[c] for c in "xyz"], 1)
    assert torch.isfinite(d).all() and d.abs().max() < 1.0 and d.abs().max() > 0
    assert torch.equal(out["offset"], b["offset"])


# -- the batch as a whole ---------------------------------------------------------------------

def test_batch_without_offset_is_one_unit():
    b = make_batch((120,), offset=False)
    with_off = make_batch((120,))
    a = CenterShift()(b)
    c = CenterShift()(with_off)
    assert "offset" not in a and all(torch.equal(a[k], c[k]) for k in "xyz")
    g = GridSample(0.5)(b, torch.Generator().manual_seed(0))
    assert "offset" not in g
    h = GridSample(0.5)(with_off, torch.Generator().manual_seed(0))
    assert torch.equal(g["point_id"], h["point_id"])


def test_empty_batch_passes_through_every_transform():
    b = make_batch((0, 0))
    t = Compose([CenterShift(), RandomRotate(p=1), RandomScale(), RandomFlip(), RandomJitter(),
                 ElasticDistortion(), GridSample(0.1, return_grid_coord=True), SphereCrop(3),
                 RandomDropout(dropout_application_ratio=1), ToPointcept(segment="f_uint8")])
    out = t(b, torch.Generator().manual_seed(0))
    assert out["coord"].shape == (0, 3) and out["offset"].tolist() == [0, 0]
    assert out["grid_coord"].shape == (0, 3)


def test_same_generator_same_batch_different_seed_differs():
    t = Compose([CenterShift(), RandomRotate(), RandomScale(), RandomFlip(), RandomJitter(),
                 ElasticDistortion(), GridSample(0.05), SphereCrop(200), RandomDropout()])
    b = make_batch((300, 250, 5))
    one = t(b, torch.Generator().manual_seed(11))
    two = t(b, torch.Generator().manual_seed(11))
    other = t(b, torch.Generator().manual_seed(12))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) if one[k].shape == other[k].shape else False
                   for k in one)


def test_to_pointcept():
    b = make_batch((20, 10))
    b = GridSample(0.2, return_grid_coord=True)(b, torch.Generator().manual_seed(0))
    out = ToPointcept(feat=["coord", "f_uint16", "pair"], segment="f_uint8", keep=["chunk"])(b)
    n = len(b["x"])
    assert out["coord"].dtype == torch.float32 and out["coord"].shape == (n, 3)
    assert out["feat"].shape == (n, 6) and out["feat"].dtype == torch.float32
    assert out["segment"].dtype == torch.int64 and torch.equal(out["offset"], b["offset"])
    assert torch.equal(out["grid_coord"], b["grid_coord"]) and "chunk" in out
    solo = ToPointcept(segment=None)(make_batch((7,), offset=False))
    assert solo["offset"].tolist() == [7] and "segment" not in solo
    # the transforms pass x, y, z planar; a model gets every tensor row-major, as it expects
    moved = ToPointcept(segment=None)(RandomScale()(make_batch((30, 12))))
    assert moved["coord"].stride() == (3, 1)
    assert all(v.is_contiguous() for v in (out | moved).values())


# -- bad parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, words", [
    (lambda: GridSample(0), ("GridSample", "grid_size")),
    (lambda: GridSample(-1.0), ("GridSample", "grid_size")),
    (lambda: GridSample(0.1, hash="md5"), ("GridSample", "hash")),
    (lambda: GridSample(0.1, mode="val"), ("GridSample", "mode")),
    (lambda: SphereCrop(0), ("SphereCrop", "point_max")),
    (lambda: SphereCrop(10, mode="all"), ("SphereCrop", "mode")),
    (lambda: SphereCrop(10, sample_rate=2), ("SphereCrop", "sample_rate")),
    (lambda: RandomJitter(clip=0), ("RandomJitter", "clip")),
    (lambda: RandomRotate(axis="w"), ("RandomRotate", "axis")),
    (lambda: RandomRotate(p=2), ("RandomRotate", "p")),
    (lambda: RandomScale(scale=[2, 1]), ("RandomScale", "scale")),
    (lambda: RandomDropout(dropout_ratio=1.5), ("RandomDropout", "dropout_ratio")),
    (lambda: ElasticDistortion([[0, 1]]), ("ElasticDistortion", "distortion_params")),
    (lambda: CenterShift(coord=("x", "y")), ("CenterShift", "coord")),
])
def test_bad_parameters_raise_at_construction(make, words):
    with pytest.raises(LoaderError) as e:
        make()
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("t, words", [
    (GridSample(0.1, coord=("x", "y", "height")), ("GridSample", "coord", "height")),
    (SphereCrop(5, coord=("a", "y", "z")), ("SphereCrop", "coord", "'a'")),
    (NormalizeColor(), ("NormalizeColor", "color", "red")),
    (ToPointcept(segment="classification"), ("ToPointcept", "segment", "classification")),
    (ToPointcept(feat=["nope"], segment=None), ("ToPointcept", "feat", "nope")),
])
def test_missing_field_is_a_loader_error(t, words):
    with pytest.raises(LoaderError) as e:
        t(make_batch((5, 5)))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_offset_and_integer_coords_are_loader_errors():
    b = make_batch((5, 5))
    b["offset"] = torch.tensor([5, 9])
    with pytest.raises(LoaderError, match="offset ends at 9"):
        CenterShift()(b)
    b = make_batch((5,))
    b["x"] = b["x"].to(torch.int32)
    with pytest.raises(LoaderError, match="floating point"):
        RandomScale()(b)


def test_elastic_unequal_units_equal_reference_with_the_same_noise(monkeypatch):
    """Units of very different extent take the end-to-end layout (grids one after another in
    the generator's stream); each unit still equals the reference fed its own noise."""
    small = make_batch((60,), dtype=torch.float64, extent=(0.5, 0.5, 0.5), seed=1)
    big = make_batch((400,), dtype=torch.float64, extent=(30.0, 30.0, 3.0), seed=2)
    b = {c: torch.cat([small[c], big[c]] + [small[c] * k for k in range(2, 6)]) for c in "xyz"}
    b["offset"] = torch.tensor([60, 460, 520, 580, 640, 700])
    gran, mag = 0.2, 0.4
    from gds_stream.transforms import elastic
    assert elastic.DENSE_RATIO < 6           # 6 units padded to the big one's grid: end to end
    calls = []
    flat = elastic._flat_noise
    monkeypatch.setattr(elastic, "_flat_noise", lambda *a: calls.append(1) or flat(*a))
    out = ElasticDistortion([[gran, mag]])(b, torch.Generator().manual_seed(3))
    assert calls == [1]                                       # the end-to-end layout ran
    g = torch.Generator().manual_seed(3)
    assert (torch.rand(6, generator=g, dtype=torch.float64) < 0.95).all()
    units = units_of(b)
    dims = [((xyz - xyz.min(0)).max(0) // gran).astype(int) + 3 for _, xyz in units]
    noise = torch.randn((sum(int(np.prod(d)) for d in dims), 3), generator=g).numpy()
    at = 0
    for (s, xyz), d, (_, got) in zip(units, dims, units_of(out)):
        k = int(np.prod(d))
        want = ref.elastic_distortion(xyz.copy(), gran, mag, None,
                                      noise=noise[at:at + k].reshape(*d, 3))
        at += k
        np.testing.assert_allclose(got, want, atol=1e-5)



def dense_draw(g: torch.Generator, dims, dmax) -> np.ndarray:
    """The padded (U, D0, D1, D2, 3) noise block as ElasticDistortion draws it: (D2, 3) values
    for each (x, y) row of each unit's own grid, in the order (unit, x, y); 0 elsewhere."""
    rows = [(u, x, y) for u, d in enumerate(dims) for x in range(dmax[0]) for y in range(dmax[1])
            if x < d[0] and y < d[1]]
    drawn = torch.randn((len(rows), dmax[2], 3), generator=g).numpy()
    noise = np.zeros((len(dims), *dmax, 3), np.float32)
    for (u, x, y), v in zip(rows, drawn):
        noise[u, x, y] = v
    return noise


@pytest.mark.parametrize("image_rows", [None, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elastic_dense_units_equal_reference_with_the_same_noise(monkeypatch, dtype, image_rows):
    """Units of similar extent share one padded noise block (drawn as (U, D0, D1, D2, 3)) and
    are sampled together (one image for the batch, or with ``IMAGE_ROWS`` 0 one image per unit
    and padded point rows): each unit still equals the reference fed its own corner of the
    block, also units of one point (the smallest grid) and an empty unit, and a unit the 0.95
    draw skips is unchanged."""
    sizes = (400, 1, 0, 300, 250)
    b = make_batch(sizes, dtype=dtype, extent=(3.0, 2.5, 1.2), seed=5)
    gran, mag = 0.4, 1.6
    from gds_stream.transforms import elastic
    calls = []
    dense = elastic._dense_noise
    monkeypatch.setattr(elastic, "_dense_noise", lambda *a: calls.append(1) or dense(*a))
    if image_rows is not None:
        monkeypatch.setattr(elastic, "IMAGE_ROWS", image_rows)
    seed = next(s for s in range(100) if not bool(
        (torch.rand(5, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
         < 0.95)[4]) and bool((torch.rand(5, generator=torch.Generator().manual_seed(s),
                                          dtype=torch.float64) < 0.95)[:4].all()))
    out = ElasticDistortion([[gran, mag], [2 * gran, mag]])(b, torch.Generator().manual_seed(seed))
    assert calls == [1, 1]                                    # the padded layout ran, twice
    g = torch.Generator().manual_seed(seed)
    apply = (torch.rand(5, generator=g, dtype=torch.float64) < 0.95).tolist()
    units = [xyz.astype(np.float64 if dtype == torch.float64 else np.float32).copy()
             for _, xyz in units_of(b)]
    for gr in (gran, 2 * gran):
        dims = [((x - x.min(0)).max(0) // gr).astype(int) + 3 if len(x) else np.array([3, 3, 3])
                for x in units]
        dims = [d if a else np.zeros(3, int) for d, a in zip(dims, apply)]
        dmax = np.max(dims, 0)
        noise = dense_draw(g, dims, dmax)
        for u, (x, d) in enumerate(zip(units, dims)):
            if apply[u] and len(x):
                units[u] = ref.elastic_distortion(x, gr, mag, None,
                                                  noise=noise[u, :d[0], :d[1], :d[2]])
    for u, ((_, got), want) in enumerate(zip(units_of(out), units)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == torch.float64
                                   else 2e-5)
    _, skipped = units_of(out)[4]
    assert np.array_equal(skipped, units_of(b)[4][1])


# -- the package ------------------------------------------------------------------------------

def test_importing_gds_stream_does_not_import_the_transforms():
    import subprocess
    import sys
    code = ("import sys, gds_stream; assert 'gds_stream.transforms' not in sys.modules; "
            "assert 'torch' not in sys.modules; t = gds_stream.transforms.GridSample(0.1); "
            "assert 'cupy' not in sys.modules and 'kvikio' not in sys.modules; print(t.grid_size)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0.1", r.stderr


# -- CUDA: the same sets as the CPU ----------------------------------------------------------

@pytest.mark.gpu
def test_cuda_gives_the_cpu_results():
    from helpers import cuda_reason
    reason = cuda_reason()
    if reason:
        pytest.skip(reason)
    b = make_batch((500, 1, 0, 3000, 40), extent=(0.6, 0.6, 0.3))
    cb = {k: v.cuda() for k, v in b.items()}
    for t in (CenterShift(), GridSample(0.1, mode="test", return_grid_coord=True),
              GridSample(0.1, hash="ravel", mode="test"), SphereCrop(100, mode="center"),
              RandomRotate(angle=[0.2, 0.2], always_apply=True)):
        want, got = t(b), t(cb)
        for w, g in zip(*(x if isinstance(x, list) else [x] for x in (want, got))):
            assert w.keys() == g.keys()
            for k in w:
                if w[k].is_floating_point():
                    torch.testing.assert_close(g[k].cpu(), w[k], rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(g[k].cpu(), w[k]), (t, k)
    # random ones: the same voxel set, one point each, every field consistent, on the device
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = GridSample(0.1, return_grid_coord=True)(cb, gen)
    ref_out = GridSample(0.1, return_grid_coord=True)(b, torch.Generator().manual_seed(0))
    assert torch.equal(out["grid_coord"].cpu(), ref_out["grid_coord"])
    assert torch.equal(out["offset"].cpu(), ref_out["offset"])
    check_consistent(b, {k: v.cpu() for k, v in out.items()})
    full = Compose([RandomRotate(), RandomScale(), RandomFlip(), RandomJitter(),
                    ElasticDistortion(), SphereCrop(200), RandomDropout()])(cb, gen)
    check_consistent(b, {k: v.cpu() for k, v in full.items() if k not in "xyz"} | {
        c: b[c][full["point_id"].cpu()] for c in "xyz"})


def test_coordinates_pass_between_transforms_as_one_tensor():
    """A transform writes x, y, z as the rows of one (3, n) tensor (planar: each field
    contiguous); the next one takes that tensor as it is (no stack), and the values are those
    of separate fields."""
    from gds_stream.transforms._batch import get_coord
    b = make_batch((40, 0, 25))
    out = RandomScale(scale=[2, 2])(b)
    base = get_coord(out, ("x", "y", "z"), "t")
    assert all(out[c].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
               and out[c].is_contiguous() for c in "xyz")
    sep = {k: (v.clone() if k in "xyz" else v) for k, v in out.items()}
    assert get_coord(sep, ("x", "y", "z"), "t").untyped_storage().data_ptr() != \
        sep["x"].untyped_storage().data_ptr()                 # separate fields: stacked
    for t in (CenterShift(), RandomRotate(angle=[0.3, 0.3], always_apply=True),
              GridSample(0.5, return_grid_coord=True)):
        a, c = t(out, torch.Generator().manual_seed(1)), t(sep, torch.Generator().manual_seed(1))
        assert all(torch.equal(a[k], c[k]) for k in c), t
    assert torch.equal(torch.stack([out[c] for c in "xyz"], 1),
                       torch.stack([b[c] * 2 for c in "xyz"], 1))


def test_elastic_keeps_scratch_buffers_only_up_to_a_bound(monkeypatch):
    """The noise block's buffers are kept per thread between batches, up to a bound: a larger
    block gets fresh buffers and leaves the kept ones as they were."""
    from gds_stream.transforms import elastic
    monkeypatch.setattr(elastic, "_SCRATCH", __import__("threading").local())
    small = elastic._scratch(1000, torch.device("cpu"))
    assert elastic._scratch(500, torch.device("cpu"))[0] is small[0]        # kept, reused
    monkeypatch.setattr(elastic, "SCRATCH_KEEP_FLOATS", 4000)
    big = elastic._scratch(5000, torch.device("cpu"))
    assert big[0].numel() >= 5000 and big[0] is not small[0]
    assert elastic._SCRATCH.bufs[0] is small[0]                             # not kept
    b = make_batch((300, 200))
    monkeypatch.setattr(elastic, "SCRATCH_KEEP_FLOATS", 0)                  # always fresh
    fresh = ElasticDistortion()(b, torch.Generator().manual_seed(2))
    monkeypatch.setattr(elastic, "SCRATCH_KEEP_FLOATS", 1 << 24)
    kept = ElasticDistortion()(b, torch.Generator().manual_seed(2))
    assert all(torch.equal(fresh[c], kept[c]) for c in "xyz")
