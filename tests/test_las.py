"""LAS / LAZ input: every point format and version laspy writes, compressed or not, round-trips
(integers exact, coordinates within half the scale); extra bytes, several files, chunk
boundaries; georeferenced coordinates stored as float32 relative to the dataset origin, the
float32-bound refusal and ``xyz="float64"``; CRS recorded and compared; bad inputs are one clear
error with nothing left behind.
"""

from __future__ import annotations

import importlib
import re
import shutil
import struct
import tracemalloc

import laspy
import numpy as np
import pytest

from conftest import LAS_FORMATS
from gds_stream import ConversionError, DatasetError
from gds_stream.convert import convert

common = importlib.import_module("gds_stream.convert.common")

UTM = (500000.0, 5000000.0, 200.0)
STANDARD_XYZ = ("X", "Y", "Z")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 128 points, so every test file spans several chunks with a ragged last one."""
    monkeypatch.setattr(common, "CHUNK_ROWS", 128)
    return 128


def no_output_left(parent, name="ds") -> bool:
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def origin_of(ds) -> np.ndarray:
    return np.asarray(getattr(ds, "origin", np.zeros(3)), dtype=np.float64)


def assert_las_equal(ds, las, start=0, scale=None):
    """Every dimension of ``las`` reads back from ``ds``: integers and floats exact, bit fields
    as uint8, coordinates (origin + stored value) within half the scale."""
    n = len(las.points)
    origin = origin_of(ds)
    scales = las.header.scales if scale is None else np.full(3, scale)
    for j, c in enumerate("xyz"):
        got = ds.read(c, start, start + n).astype(np.float64) + origin[j]
        want = np.asarray(las[c], dtype=np.float64)
        assert np.max(np.abs(got - want), initial=0) <= scales[j] / 2, c
    for dim in las.point_format.dimensions:
        if dim.name in STANDARD_XYZ:
            continue
        name = dim.name.lower().replace(" ", "_")
        got = ds.read(name, start, start + n)
        if dim.dtype is None:
            assert got.dtype == np.uint8, name
            want = np.asarray(las[dim.name], dtype=np.uint8)
        else:
            want = np.asarray(las.points.array[dim.name])
            base = dim.dtype.base if dim.dtype.subdtype is not None else dim.dtype
            assert got.dtype == base.newbyteorder("<") or got.dtype == base, (name, got.dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert np.array_equal(got, want), f"dimension {dim.name} differs"


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".las", ".laz"])
@pytest.mark.parametrize("version,point_format", LAS_FORMATS)
def test_every_point_format_round_trips(tmp_path, make_las, small_chunks, version, point_format,
                                        suffix):
    las = make_las(tmp_path / f"a{suffix}", 500, point_format=point_format, version=version,
                   seed=point_format)
    ds = convert(tmp_path / f"a{suffix}", tmp_path / "ds", progress=False)
    assert ds.num_points == 500 and ds.num_scans == 1
    assert ds.schema["x"].dtype == np.float32
    assert ds.schema["intensity"].dtype == np.uint16
    assert ds.schema["return_number"].dtype == np.uint8
    assert ds.schema["classification"].dtype == np.uint8
    assert_las_equal(ds, las)
    src = ds.sources[0]
    assert src["format"] == "las" and src["point_format"] == point_format
    assert src["las_version"] == version and src["compressed"] == (suffix == ".laz")


def test_las_1_0_is_read(tmp_path, make_las):
    """laspy does not write LAS 1.0; a 1.1 file of point format 1 differs only in its version."""
    las = make_las(tmp_path / "a.las", 100, point_format=1, version="1.1")
    data = bytearray((tmp_path / "a.las").read_bytes())
    data[25] = 0  # version minor
    (tmp_path / "a.las").write_bytes(bytes(data))
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.sources[0]["las_version"] == "1.0"
    assert_las_equal(ds, las)


def test_dimension_types_are_kept(tmp_path, make_las):
    make_las(tmp_path / "a.las", 10, point_format=8, version="1.4")
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    types = {k: s.dtype.name for k, s in ds.schema.items()}
    assert types["gps_time"] == "float64" and types["scan_angle"] == "int16"
    assert types["red"] == types["nir"] == "uint16" and types["number_of_returns"] == "uint8"
    assert list(ds.schema)[:3] == ["x", "y", "z"]


def test_extra_bytes_scalar_and_array(tmp_path, make_las, small_chunks):
    extra = [("my dim", "u2"), ("Range", "f4"), ("normal", "3f8"), ("pair", "2i1")]
    las = make_las(tmp_path / "a.laz", 700, point_format=6, version="1.4", extra=extra)
    ds = convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    assert ds.schema["my_dim"].dtype == np.uint16 and ds.schema["range"].dtype == np.float32
    assert ds.schema["normal"].components == 3 and ds.schema["normal"].dtype == np.float64
    assert ds.schema["pair"].components == 2 and ds.schema["pair"].dtype == np.int8
    assert_las_equal(ds, las)


def test_fields_select_dimensions(tmp_path, make_las):
    las = make_las(tmp_path / "a.las", 100)
    ds = convert(tmp_path / "a.las", tmp_path / "ds", fields=["x", "y", "z", "intensity"],
                 progress=False)
    assert list(ds.schema) == ["x", "y", "z", "intensity"]
    assert np.array_equal(ds.read("intensity"), las.intensity)
    with pytest.raises(ConversionError, match=r"a\.las: no LAS dimension 'nir'.*intensity"):
        convert(tmp_path / "a.las", tmp_path / "d2", fields=["x", "nir"], progress=False)


def test_several_files_are_scans(tmp_path, make_las, small_chunks):
    sizes = (300, 0, 450)
    written = [make_las(tmp_path / f"t{i}.laz", n, seed=i) for i, n in enumerate(sizes)]
    ds = convert(tmp_path, tmp_path / "ds", progress=False)
    assert ds.scan_offsets.tolist() == [0, 300, 300, 750]
    assert [s["path"] for s in ds.sources] == [str(tmp_path / f"t{i}.laz") for i in range(3)]
    for las, start in zip(written, (0, 300, 300)):
        assert_las_equal(ds, las, start)


def test_auto_detects_las_by_signature(tmp_path, make_las):
    las = make_las(tmp_path / "a.las", 50)
    shutil.copy(tmp_path / "a.las", tmp_path / "scan.bin")
    ds = convert(tmp_path / "scan.bin", tmp_path / "ds", progress=False)
    assert ds.sources[0]["format"] == "las"
    assert_las_equal(ds, las)


def test_copc_is_recognised(tmp_path, make_las):
    """laspy cannot write COPC; a LAZ 1.4 file carrying the COPC info VLR (user "copc", record 1)
    is read as the LAZ it is and recorded as COPC."""
    las = make_las(tmp_path / "a.laz", 200, point_format=6, version="1.4")
    las.header.vlrs.insert(0, laspy.VLR("copc", 1, "copc info", b"\0" * 160))
    las.write(str(tmp_path / "a.copc.laz"))
    las = laspy.read(str(tmp_path / "a.copc.laz"))
    ds = convert(tmp_path / "a.copc.laz", tmp_path / "ds", progress=False)
    assert ds.sources[0]["copc"] is True
    assert_las_equal(ds, las)
    plain = convert(tmp_path / "a.laz", tmp_path / "d2", progress=False)
    assert plain.sources[0]["copc"] is False


def test_memory_is_bounded(tmp_path, make_las, monkeypatch):
    """Converting a LAZ allocates about one chunk of columns, not the file's points."""
    monkeypatch.setattr(common, "CHUNK_ROWS", 1 << 12)
    make_las(tmp_path / "big.laz", 200_000, point_format=1, version="1.2")
    points_bytes = 200_000 * (3 * 4 + 25)
    tracemalloc.start()
    try:
        convert(tmp_path / "big.laz", tmp_path / "ds", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < points_bytes / 4, f"peak {peak} bytes for {points_bytes} bytes of points"


# -- coordinates ---------------------------------------------------------------------------------
def test_georeferenced_float32_relative_to_origin(tmp_path, make_las, small_chunks):
    las = make_las(tmp_path / "a.laz", 2000, scale=0.001, offset=UTM, spread=2000.0)
    ds = convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    origin = origin_of(ds)
    assert ds.schema["x"].dtype == np.float32
    assert np.all(origin % 100 == 0) and abs(origin[0] - UTM[0]) <= 2100
    assert abs(origin[1] - UTM[1]) <= 2100
    # What float32 could not hold absolutely (~0.03 m at 500 km) holds relative to the origin.
    x = np.asarray(las.x)
    assert np.max(np.abs(x.astype(np.float32).astype(np.float64) - x)) > 0.0005
    assert_las_equal(ds, las)


def test_local_coordinates_need_no_origin(tmp_path, make_las):
    make_las(tmp_path / "a.las", 100, scale=0.01, spread=50.0)
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert not origin_of(ds).any()


def test_float32_bound_is_checked_on_every_point(tmp_path, make_las):
    """A tile 200 km wide at scale 0.001 cannot be float32 within 0.5 mm of any one origin:
    --xyz float32 refuses."""
    make_las(tmp_path / "a.laz", 1000, scale=0.001, offset=UTM, spread=100_000.0)
    with pytest.raises(ConversionError, match=r"a\.laz: point \d+: x = .*--xyz float64"):
        convert(tmp_path / "a.laz", tmp_path / "ds", xyz="float32", progress=False)
    assert no_output_left(tmp_path)


def test_auto_falls_back_to_float64_with_one_warning(tmp_path, make_las, caplog):
    """The same tile converts by default: float64, absolute, and one warning saying why."""
    las = make_las(tmp_path / "a.laz", 1000, scale=0.001, offset=UTM, spread=100_000.0)
    with caplog.at_level("WARNING", logger="gds_stream"):
        ds = convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    assert ds.schema["x"].dtype == np.float64 and not origin_of(ds).any()
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert re.search(r"a\.laz: point \d+: x = .* from the dataset origin",
                     warned[0].getMessage())
    assert "float32 cannot hold it within half the scale (0.0005)" in warned[0].getMessage()
    for c in "xyz":
        assert np.array_equal(ds.read(c), np.asarray(las[c])), c


def test_auto_float64_for_a_tiny_scale(tmp_path, make_las):
    """A scale of 1.16e-6 (as in some real files) cannot be float32 over a 100 m tile."""
    las = make_las(tmp_path / "a.las", 500, scale=1.16e-6, spread=100.0)
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.schema["x"].dtype == np.float64
    assert np.array_equal(ds.read("x"), np.asarray(las.x))
    with pytest.raises(ConversionError, match=r"a\.las: point \d+: "):
        convert(tmp_path / "a.las", tmp_path / "d2", xyz="float32", progress=False)


def test_auto_keeps_float32_where_every_point_holds(tmp_path, make_las, caplog):
    """Bounds alone cannot prove a 1e-6 scale over 300 m, but points quantised to 1/64 m are
    all held by float32: auto reads them once and keeps float32, silently."""
    make_las(tmp_path / "a.las", 500, scale=1e-6, spread=150.0)
    las = laspy.read(tmp_path / "a.las")
    for c in "XYZ":  # multiples of 1/64 m (2**-6), exact in float32 at this extent
        las[c] = np.round(np.asarray(las[c]) / 15625) * 15625
    las.write(tmp_path / "a.las")
    las = laspy.read(tmp_path / "a.las")
    with caplog.at_level("WARNING", logger="gds_stream"):
        ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.schema["x"].dtype == np.float32
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert_las_equal(ds, las)


@pytest.mark.parametrize("xyz", ["auto", "float32"])
def test_negative_scale_uses_its_magnitude(tmp_path, xyz):
    """A negative scale is valid LAS: float32 holds x within half its magnitude."""
    hdr = laspy.LasHeader(point_format=3, version="1.2")
    hdr.scales = np.array([-0.01, 0.01, -0.001])
    hdr.offsets = np.array([1000.0, 0.0, 0.0])
    las = laspy.LasData(hdr)
    rng = np.random.default_rng(0)
    las.X, las.Y, las.Z = (rng.integers(0, 10_000, 300) for _ in range(3))
    las.update_header()
    las.write(tmp_path / "a.las")
    back = laspy.read(tmp_path / "a.las")
    ds = convert(tmp_path / "a.las", tmp_path / "ds", xyz=xyz, progress=False)
    assert ds.schema["x"].dtype == np.float32
    for j, c in enumerate("xyz"):
        got = ds.read(c).astype(np.float64) + origin_of(ds)[j]
        assert np.abs(got - np.asarray(back[c])).max() <= abs(hdr.scales[j]) / 2, c


@pytest.mark.parametrize("xyz", ["auto", "float32"])
def test_header_bounds_that_lie_place_the_origin_from_the_points(tmp_path, make_las, caplog,
                                                                 xyz):
    """Bounds claiming a small local tile far from the points: the origin comes from the points
    read (one warning with the count), and every point round-trips as float32."""
    make_las(tmp_path / "a.las", 100, scale=0.001, offset=UTM)
    data = bytearray((tmp_path / "a.las").read_bytes())
    data[179:227] = struct.pack("<6d", 1.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # max/min x, y, z
    (tmp_path / "a.las").write_bytes(bytes(data))
    las = laspy.read(tmp_path / "a.las")
    with caplog.at_level("WARNING", logger="gds_stream"):
        ds = convert(tmp_path / "a.las", tmp_path / "ds", xyz=xyz, progress=False)
    assert ds.schema["x"].dtype == np.float32
    assert abs(origin_of(ds)[0] - UTM[0]) < 200 and abs(origin_of(ds)[1] - UTM[1]) < 200
    assert_las_equal(ds, las)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "a.las: 100 of 100 points lie outside the header's bounds" \
        in warned[0], warned


def test_float32_still_checks_points_beyond_the_sample(tmp_path, make_las, monkeypatch):
    """Header bounds that hold the first points but not a far one later: --xyz float32 refuses
    naming that point."""
    from gds_stream.convert import las_xyz

    monkeypatch.setattr(las_xyz, "SAMPLE_POINTS", 10)
    hdr = laspy.LasHeader(point_format=3, version="1.2")
    hdr.scales, hdr.offsets = np.full(3, 0.001), np.array(UTM)
    las = laspy.LasData(hdr)
    x = np.full(100, UTM[0] + 5.0)
    x[50] = UTM[0] + 90_000.123
    las.x, las.y, las.z = x, np.full(100, UTM[1]), np.full(100, UTM[2])
    las.write(tmp_path / "a.las")
    data = bytearray((tmp_path / "a.las").read_bytes())
    data[179:195] = struct.pack("<2d", UTM[0] + 10.0, UTM[0])  # max x, min x: the first points
    (tmp_path / "a.las").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"a\.las: point 50: x = .*outside the header's "
                                              r"bounds.*--xyz float64"):
        convert(tmp_path / "a.las", tmp_path / "ds", xyz="float32", progress=False)
    assert no_output_left(tmp_path)


def test_xyz_float64_keeps_absolute_coordinates(tmp_path, make_las):
    las = make_las(tmp_path / "a.laz", 1000, scale=0.001, offset=UTM, spread=100_000.0)
    ds = convert(tmp_path / "a.laz", tmp_path / "ds", xyz="float64", progress=False)
    assert ds.schema["x"].dtype == np.float64 and not origin_of(ds).any()
    for c in "xyz":
        assert np.array_equal(ds.read(c), np.asarray(las[c])), c


def test_xyz_option_is_checked(tmp_path, make_las, make_ply):
    make_las(tmp_path / "a.las", 10)
    with pytest.raises(ConversionError, match="--xyz 'float16'"):
        convert(tmp_path / "a.las", tmp_path / "ds", xyz="float16", progress=False)
    make_ply(tmp_path / "b.ply", 10)
    for xyz in ("float32", "float64"):
        with pytest.raises(ConversionError, match=r"b\.ply keeps its own stored types"):
            convert(tmp_path / "b.ply", tmp_path / "ds", xyz=xyz, progress=False)
    assert convert(tmp_path / "b.ply", tmp_path / "ds", progress=False).num_points == 10


# -- CRS and mixing ------------------------------------------------------------------------------
WKT_A = 'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84"],AUTHORITY["EPSG","32633"]]'
WKT_B = 'PROJCS["WGS 84 / UTM zone 32N",GEOGCS["WGS 84"],AUTHORITY["EPSG","32632"]]'


def test_crs_is_recorded(tmp_path, make_las):
    make_las(tmp_path / "a.las", 10, point_format=6, version="1.4", wkt=WKT_A)
    make_las(tmp_path / "b.las", 10, epsg_geokey=32633)
    ds = convert(tmp_path / "a.las", tmp_path / "d1", progress=False)
    assert ds.sources[0]["crs_wkt"] == WKT_A
    ds = convert(tmp_path / "b.las", tmp_path / "d2", progress=False)
    assert [3072, 0, 1, 32633] in ds.sources[0]["crs_geokeys"]


@pytest.mark.parametrize("second", [{"wkt": WKT_B}, {}])
def test_crs_mismatch_names_both_files(tmp_path, make_las, second):
    make_las(tmp_path / "a.las", 10, point_format=6, version="1.4", wkt=WKT_A)
    make_las(tmp_path / "b.las", 10, point_format=6, version="1.4", **second)
    with pytest.raises(ConversionError, match=r"b\.las: coordinate reference system differs "
                                              r"from .*a\.las"):
        convert([tmp_path / "a.las", tmp_path / "b.las"], tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_point_formats_with_other_dimensions_are_refused(tmp_path, make_las):
    make_las(tmp_path / "a.las", 10, point_format=3)
    make_las(tmp_path / "b.las", 10, point_format=1)
    with pytest.raises(ConversionError, match=r"b\.las: schema differs from .*a\.las.*red"):
        convert([tmp_path / "a.las", tmp_path / "b.las"], tmp_path / "ds", progress=False)
    # Selecting the dimensions both have makes them compatible.
    ds = convert([tmp_path / "a.las", tmp_path / "b.las"], tmp_path / "ds",
                 fields=["x", "y", "z", "intensity", "gps_time"], progress=False)
    assert ds.num_points == 20


def test_las_and_ply_do_not_mix(tmp_path, make_las, make_ply):
    make_ply(tmp_path / "a.ply", 10, properties=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    make_las(tmp_path / "b.las", 10)
    a, b = tmp_path / "a.ply", tmp_path / "b.las"
    for order in ([a, b], [b, a]):
        with pytest.raises(ConversionError, match=r"b\.las: LAS/LAZ input cannot share a dataset "
                                                  r"with .*a\.ply \(ply input\)"):
            convert(order, tmp_path / "ds", fields=["x", "y", "z"], progress=False)
        assert no_output_left(tmp_path)


# -- bad input -----------------------------------------------------------------------------------
def test_not_a_las_file(tmp_path):
    (tmp_path / "a.las").write_bytes(b"PLY? no, just some bytes" * 10)
    with pytest.raises(DatasetError, match=r"a\.las: not a LAS/LAZ file: expected the "
                                           r"signature 'LASF'"):
        convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_garbage_after_signature(tmp_path):
    (tmp_path / "a.las").write_bytes(b"LASF" + b"\xff" * 50)
    with pytest.raises(DatasetError, match=r"a\.las: not a readable LAS/LAZ file"):
        convert(tmp_path / "a.las", tmp_path / "ds", progress=False)


def test_truncated_las_fails_before_writing(tmp_path, make_las):
    make_las(tmp_path / "a.las", 100)
    make_las(tmp_path / "b.las", 100, seed=1)
    data = (tmp_path / "b.las").read_bytes()
    (tmp_path / "b.las").write_bytes(data[:-50])
    with pytest.raises(DatasetError, match=r"b\.las: truncated: the header promises 100 points"):
        convert([tmp_path / "a.las", tmp_path / "b.las"], tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_laz(tmp_path, make_las, cut):
    make_las(tmp_path / "a.laz", 5000)
    data = (tmp_path / "a.laz").read_bytes()
    (tmp_path / "a.laz").write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(DatasetError, match=r"a\.laz: "):
        convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_damaged_chunk_table(tmp_path, make_las):
    """The LAZ chunk table's offset (the first 8 bytes of the point data) points elsewhere."""
    las = make_las(tmp_path / "a.laz", 5000)
    start = las.header.offset_to_point_data
    data = bytearray((tmp_path / "a.laz").read_bytes())
    data[start:start + 8] = struct.pack("<q", len(data) - 3)
    (tmp_path / "a.laz").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"a\.laz: "):
        convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_header_point_count_that_lies(tmp_path, make_las, suffix):
    make_las(tmp_path / f"a{suffix}", 1000)
    data = bytearray((tmp_path / f"a{suffix}").read_bytes())
    data[107:111] = struct.pack("<I", 1500)  # legacy point count of a LAS 1.2 header
    (tmp_path / f"a{suffix}").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"a\{suffix}: .*"):
        convert(tmp_path / f"a{suffix}", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_lying_header_bounds_fall_back_to_the_offsets(tmp_path):
    """Some writers leave the header bounds at zero: the origin then comes from the offsets,
    and every point still round-trips within half the scale."""
    import laspy

    from gds_stream import convert

    hdr = laspy.LasHeader(point_format=1, version="1.2")
    hdr.scales = np.array([0.001, 0.001, 0.001])
    hdr.offsets = np.array([500000.0, 5000000.0, 0.0])
    las = laspy.LasData(hdr)
    rng = np.random.default_rng(0)
    las.x = 500000.0 + rng.random(1000) * 300
    las.y = 5000000.0 + rng.random(1000) * 300
    las.z = rng.random(1000) * 50
    path = tmp_path / "zero-bounds.las"
    las.write(path)
    with open(path, "r+b") as f:  # zero the six bound doubles (max x, min x, ...) at byte 179
        f.seek(179)
        f.write(b"\0" * 48)
    ds = convert(path, tmp_path / "ds", progress=False)
    assert ds.origin[0] != 0 and ds.origin[1] != 0
    back = laspy.read(path)
    for j, k in enumerate("xyz"):
        got = ds.read(k).astype(np.float64) + ds.origin[j]
        assert np.abs(got - np.asarray(back[k])).max() <= 0.0005


def _small_las(path, version="1.2", point_format=3, extra=()):
    import laspy

    hdr = laspy.LasHeader(point_format=point_format, version=version)
    for e in extra:
        hdr.add_extra_dim(e)
    las = laspy.LasData(hdr)
    rng = np.random.default_rng(1)
    las.x, las.y, las.z = rng.random(500) * 10, rng.random(500) * 10, rng.random(500)
    return las, hdr


@pytest.mark.parametrize("where, value, message", [
    (100, (2**31).to_bytes(4, "little"), "counts 2147483648 VLRs"),
    (131, np.float64(0).tobytes(), "scale"),
    (131, np.float64(np.nan).tobytes(), "scale"),
    (96, (10**9).to_bytes(4, "little"), "points start at byte 1000000000"),
])
def test_lying_header_fields_are_refused_before_reading(tmp_path, where, value, message):
    """A VLR count the file cannot hold (laspy would build records without bound), an unusable
    scale, points beyond the end: one line naming the file, fast, nothing written."""
    import subprocess
    import sys

    las, _ = _small_las(tmp_path / "a.las")
    las.write(tmp_path / "a.las")
    raw = bytearray((tmp_path / "a.las").read_bytes())
    raw[where:where + len(value)] = value
    (tmp_path / "a.las").write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.las", "-o", "out",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr and "a.las" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_scaled_extra_bytes_are_stored_as_their_scaled_values(tmp_path):
    import laspy

    from gds_stream import convert

    las, _ = _small_las(tmp_path / "a.las", "1.4", 6, [
        laspy.ExtraBytesParams("Amplitude", "u2", scales=np.array([0.01]),
                               offsets=np.array([1.0])),
        laspy.ExtraBytesParams("plain", "i2")])
    las.Amplitude = np.linspace(1.0, 600.0, 500)
    las.plain = np.arange(500, dtype=np.int16)
    las.write(tmp_path / "a.las")
    back = laspy.read(tmp_path / "a.las")
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.schema["amplitude"].dtype == np.float64
    assert np.array_equal(ds.read("amplitude"), np.asarray(back["Amplitude"], dtype=np.float64))
    assert ds.schema["plain"].dtype == np.dtype("<i2")
    assert np.array_equal(ds.read("plain"), np.asarray(back["plain"]))
    rec = ds.sources[0]["scaled_extra_bytes"]["amplitude"]
    assert rec == {"stored_dtype": "<u2", "scale": [0.01], "offset": [1.0]}
