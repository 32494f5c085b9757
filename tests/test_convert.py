"""``gds_stream/convert.py``: PLY (binary LE/BE, ASCII), SemanticKITTI and raw inputs read back
bit for bit, chunk boundaries, scans, schema checks, error messages, bounded memory, and
``verify`` finding a single flipped byte in every field.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import tracemalloc

import numpy as np
import plyfile
import pytest
from conftest import PLY_PROPERTIES, SMALL_SCANS

import gds_stream
from gds_stream import ConversionError, DatasetError, open_dataset
from gds_stream.convert import convert
from gds_stream.format import DatasetWriter

# The modules, however the package attribute ``gds_stream.convert`` is bound (``import
# gds_stream.convert as conv`` would give the function once __init__ imports it eagerly).
conv = importlib.import_module("gds_stream.convert")
common = importlib.import_module("gds_stream.convert.common")
ply_mod = importlib.import_module("gds_stream.convert.ply")

FORMATS = ["binary_little_endian", "binary_big_endian", "ascii"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 333 rows, so every test file spans several chunks with a ragged last one."""
    monkeypatch.setattr(common, "CHUNK_ROWS", 333)
    return 333


@pytest.fixture
def small_blocks(monkeypatch):
    """Checksum blocks of 4 KiB, so a few thousand points make several blocks per field."""
    monkeypatch.setattr(common, "DatasetWriter", functools.partial(DatasetWriter, block_bytes=4096))
    return 4096


def assert_same(ds, values, start=0, stop=None):
    """Every field of ``values`` reads back from ``ds`` with the same bytes and the stored
    (little-endian) form of the same dtype."""
    for k, want in values.items():
        got = ds.read(k, start, stop)
        dt = want.dtype.newbyteorder("<") if want.dtype.itemsize > 1 else want.dtype
        assert got.dtype == dt and got.dtype.str[0] in "<|", (k, got.dtype, want.dtype)
        assert got.shape == want.shape, (k, got.shape, want.shape)
        w = np.ascontiguousarray(want, dtype=dt)
        assert np.array_equal(got.view(np.uint8), w.view(np.uint8)), f"field {k} differs"


def no_output_left(parent, name="ds"):
    """Neither the dataset nor a hidden temporary directory of it exists under ``parent``."""
    left = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    return not left


def concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_package_convert_is_the_function():
    assert gds_stream.convert is conv.convert


# -- PLY round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_ply_round_trip_multi_file(tmp_path, make_ply, small_chunks, fmt):
    sizes = [1000, 0, 777, 333]
    parts = [make_ply(tmp_path / f"s{i}.ply", n, fmt, seed=i) for i, n in enumerate(sizes)]
    ds = convert([tmp_path / f"s{i}.ply" for i in range(len(sizes))], tmp_path / "ds",
                 progress=False)
    assert ds.num_points == sum(sizes)
    assert list(ds.scan_offsets) == [0, 1000, 1000, 1777, 2110]
    assert list(ds.schema) == [p for p, _ in PLY_PROPERTIES]
    assert_same(ds, concat(parts))
    for i, n in enumerate(sizes):  # each scan is its file
        assert_same(ds, parts[i], int(ds.scan_offsets[i]), int(ds.scan_offsets[i + 1]))
    assert [s["path"] for s in ds.sources] == [str(tmp_path / f"s{i}.ply") for i in range(4)]
    assert {s["format"] for s in ds.sources} == {"ply"}
    assert {s["ply_format"] for s in ds.sources} == {fmt}
    # stored little-endian whatever the source byte order
    doc = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert {f["name"]: f["dtype"] for f in doc["fields"]}["sem_class"] == "<i4"


@pytest.mark.parametrize("fmt", FORMATS)
def test_ply_elements_before_and_after_are_skipped(tmp_path, make_ply, small_chunks, caplog, fmt):
    """A scalar element before the points is skipped by its size (bytes or lines); a face
    element after them is skipped with one logged warning, and nothing is printed."""
    want = make_ply(tmp_path / "m.ply", 1500, fmt, before=50, faces=20)
    with caplog.at_level(logging.WARNING, logger="gds_stream.convert"):
        ds = convert(tmp_path / "m.ply", tmp_path / "ds", progress=False)
    assert_same(ds, want)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "m.ply" in msg and "'face'" in msg and "vertex_indices" in msg and "'camera'" in msg


def test_skip_warning_once_per_conversion(tmp_path, make_ply, caplog):
    (tmp_path / "in").mkdir()
    for i in range(3):
        make_ply(tmp_path / "in" / f"{i}.ply", 10, faces=2, seed=i)
    with caplog.at_level(logging.WARNING, logger="gds_stream.convert"):
        convert(tmp_path / "in", tmp_path / "ds", progress=False)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_ply_written_by_plyfile_matches_plyfile_read(tmp_path, small_chunks, fmt):
    """Against the reference: files written and read by plyfile itself."""
    rng = np.random.default_rng(7)
    v = np.empty(1234, dtype=[("x", "f8"), ("y", "f8"), ("z", "f4"), ("red", "u1"),
                              ("label", "i2"), ("t", "f8")])
    for k in v.dtype.names:
        dt = v.dtype[k]
        v[k] = rng.standard_normal(len(v)) * 100 if dt.kind == "f" else \
            rng.integers(np.iinfo(dt).min, np.iinfo(dt).max, len(v), endpoint=True)
    faces = np.array([([0, 1, 2],)] * 5, dtype=[("vertex_indices", "i4", (3,))])
    order = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": "="}[fmt]
    plyfile.PlyData([plyfile.PlyElement.describe(v, "vertex"),
                     plyfile.PlyElement.describe(faces, "face")],
                    text=fmt == "ascii", byte_order=order).write(str(tmp_path / "p.ply"))
    ref = plyfile.PlyData.read(str(tmp_path / "p.ply"))["vertex"].data
    ds = convert(tmp_path / "p.ply", tmp_path / "ds", progress=False)
    assert ds.sources[0]["ply_format"] == fmt
    assert_same(ds, {k: np.asarray(ref[k]) for k in ref.dtype.names})


def test_ply_element_selection(tmp_path, small_chunks):
    """The first element with x, y and z is converted unless ``element`` names another."""
    rng = np.random.default_rng(1)
    cam = np.zeros(3, dtype=[("fx", "f4")])
    a = np.empty(500, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    b = np.empty(700, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("w", "u2")])
    for arr in (a, b):
        for k in arr.dtype.names:
            arr[k] = rng.integers(0, 1000, len(arr))
    plyfile.PlyData([plyfile.PlyElement.describe(cam, "camera"),
                     plyfile.PlyElement.describe(a, "first"),
                     plyfile.PlyElement.describe(b, "second")],
                    byte_order="<").write(str(tmp_path / "e.ply"))
    ds = convert(tmp_path / "e.ply", tmp_path / "d1", progress=False)
    assert ds.sources[0]["element"] == "first"
    assert_same(ds, {k: a[k] for k in a.dtype.names})
    ds = convert(tmp_path / "e.ply", tmp_path / "d2", element="second", progress=False)
    assert ds.sources[0]["element"] == "second"
    assert_same(ds, {k: b[k] for k in b.dtype.names})
    with pytest.raises(DatasetError, match=r"e\.ply: element 'camera' has no property 'x'"):
        convert(tmp_path / "e.ply", tmp_path / "d3", element="camera", progress=False)
    with pytest.raises(DatasetError, match=r"no element 'nope'; elements are 'camera', 'first'"):
        convert(tmp_path / "e.ply", tmp_path / "d4", element="nope", progress=False)
    assert no_output_left(tmp_path, "d3") and no_output_left(tmp_path, "d4")


@pytest.mark.parametrize("fmt", ["binary_big_endian", "ascii"])
def test_fields_subset_and_order(tmp_path, make_ply, small_chunks, fmt):
    want = make_ply(tmp_path / "f.ply", 1000, fmt)
    keep = ["sem_class", "x", "intensity"]
    ds = convert(tmp_path / "f.ply", tmp_path / "ds", fields=keep, progress=False)
    assert list(ds.schema) == keep
    assert_same(ds, {k: want[k] for k in keep})


def test_fields_unknown_names_file_and_available(tmp_path, make_ply):
    make_ply(tmp_path / "f.ply", 10)
    with pytest.raises(ConversionError) as ei:
        convert(tmp_path / "f.ply", tmp_path / "ds", fields=["x", "colour"], progress=False)
    msg = str(ei.value)
    assert "f.ply" in msg and "'colour'" in msg and "x, y, z, intensity, sem_class" in msg
    with pytest.raises(ConversionError, match="more than once"):
        convert(tmp_path / "f.ply", tmp_path / "ds", fields=["x", "x"], progress=False)
    assert no_output_left(tmp_path)


def test_ply_without_xyz(tmp_path, make_ply):
    make_ply(tmp_path / "tile_3.ply", 10, properties=[("x", "f4"), ("y", "f4"), ("i", "u1")])
    with pytest.raises(DatasetError, match=r"^\S*tile_3\.ply: element 'vertex' has no property 'z'$"):
        convert(tmp_path / "tile_3.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_ply_list_property_before_the_points_in_binary(tmp_path, make_ply):
    make_ply(tmp_path / "f.ply", 10, faces=3, faces_first=True)
    with pytest.raises(ConversionError, match="'face' comes before 'vertex' and has list property"):
        convert(tmp_path / "f.ply", tmp_path / "ds", progress=False)
    # in ASCII the preceding lines are simply skipped
    want = make_ply(tmp_path / "a.ply", 10, "ascii", faces=3, faces_first=True)
    assert_same(convert(tmp_path / "a.ply", tmp_path / "ds", progress=False), want)


def test_ply_bad_header(tmp_path):
    (tmp_path / "h.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex x\n")
    with pytest.raises(DatasetError, match=r"h\.ply: not a valid PLY header"):
        convert(tmp_path / "h.ply", tmp_path / "ds", progress=False)
    (tmp_path / "n.ply").write_bytes(b"\x00\x01binary")
    with pytest.raises(DatasetError, match=r"n\.ply: not a valid PLY header"):
        convert(tmp_path / "n.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


# -- truncation and malformed rows -------------------------------------------------------------------
def test_truncated_binary_fails_before_anything_is_written(tmp_path, make_ply, monkeypatch):
    make_ply(tmp_path / "a.ply", 100, seed=1)
    make_ply(tmp_path / "b.ply", 100, seed=2)
    data = (tmp_path / "b.ply").read_bytes()
    (tmp_path / "b.ply").write_bytes(data[:-10])
    row = sum(np.dtype(t).itemsize for _, t in PLY_PROPERTIES)

    def no_writer(*a, **k):
        raise AssertionError("a writer was created before every input was validated")

    monkeypatch.setattr(common, "DatasetWriter", no_writer)
    with pytest.raises(DatasetError) as ei:
        convert([tmp_path / "a.ply", tmp_path / "b.ply"], tmp_path / "ds", progress=False)
    msg = str(ei.value)
    assert "b.ply: truncated" in msg
    assert f"promises {100 * row} bytes" in msg and f"only {100 * row - 10} bytes" in msg


@pytest.mark.parametrize("line, problem", [
    ("1 2 3", r"expected 9 values \(x y z intensity sem_class ins_class flag ring gps\) "
              r"for a row of element 'vertex', found 3"),
    ("1 2 3 4 5 6 7 8 9 10", "expected 9 values .* found 10"),
    ("", "expected 9 values .* found 0"),
    ("1.5 2 abc 4 5 6 7 8 9", r"property 'z': 'abc' is not a number"),
    ("1 2 3 4.5 5 6 7 8 9", r"property 'intensity': '4.5' is not an integer \(uint16\)"),
    ("1 2 3 4 5 256 7 8 9", r"property 'ins_class': 256 is out of range for uint8 \(0\.\.255\)"),
])
def test_ascii_malformed_row_names_line(tmp_path, make_ply, small_chunks, line, problem):
    make_ply(tmp_path / "a.ply", 1000, "ascii")
    lines = (tmp_path / "a.ply").read_bytes().split(b"\n")
    header = lines.index(b"end_header") + 1
    bad = header + 700  # 0-based index of the 701st row: in the third chunk of 333
    lines[bad] = line.encode()
    (tmp_path / "a.ply").write_bytes(b"\n".join(lines))
    with pytest.raises(ConversionError, match=rf"a\.ply: line {bad + 1}: {problem}"):
        convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_ascii_truncated(tmp_path, make_ply, small_chunks):
    make_ply(tmp_path / "a.ply", 1000, "ascii")
    lines = (tmp_path / "a.ply").read_bytes().split(b"\n")
    header = lines.index(b"end_header") + 1
    (tmp_path / "a.ply").write_bytes(b"\n".join(lines[:header + 900]) + b"\n")
    with pytest.raises(DatasetError, match=rf"a\.ply: truncated: file ends at line "
                                           rf"{header + 900}, but the header promises 1000 rows "
                                           rf"of element 'vertex' \(found 900\)"):
        convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


# -- SemanticKITTI and raw ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "semantickitti"])
def test_kitti_with_labels(tmp_path, make_kitti, small_chunks, layout):
    paths, want = make_kitti(tmp_path / "seq", [1000, 10, 500], layout=layout)
    ds = convert(tmp_path / "seq", tmp_path / "ds", progress=False)  # a directory: sorted frames
    assert list(ds.schema) == ["x", "y", "z", "remission", "sem_class", "ins_class"]
    assert list(ds.scan_offsets) == [0, 1000, 1010, 1510]
    assert [s["path"] for s in ds.sources] == [str(p) for p in paths]
    assert all(s["format"] == "kitti" and s["labels"].endswith(".label") for s in ds.sources)
    assert_same(ds, want)


def test_kitti_without_labels_and_fields(tmp_path, make_kitti, small_chunks):
    paths, want = make_kitti(tmp_path, [700, 300], labels=False)
    ds = convert(paths, tmp_path / "ds", progress=False)
    assert list(ds.schema) == ["x", "y", "z", "remission"]
    assert_same(ds, want)
    ds = convert(paths, tmp_path / "d2", fields=["z", "x"], format="kitti", progress=False)
    assert_same(ds, {k: want[k] for k in ("z", "x")})


def test_kitti_some_frames_without_labels(tmp_path, make_kitti):
    make_kitti(tmp_path / "seq", [10, 20, 30], labels=[True, False, True], layout="semantickitti")
    with pytest.raises(ConversionError) as ei:
        convert(tmp_path / "seq", tmp_path / "ds", progress=False)
    msg = str(ei.value)
    assert "000001.bin: schema differs from" in msg and "000000.bin" in msg
    assert "lacks sem_class:uint16, ins_class:uint16" in msg and "no .label file" in msg
    assert no_output_left(tmp_path)


def test_kitti_label_count_and_sizes(tmp_path, make_kitti):
    paths, _ = make_kitti(tmp_path, [10])
    np.zeros(9, "<u4").tofile(tmp_path / "000000.label")
    with pytest.raises(DatasetError, match=r"000000\.label: holds 9 labels, but 000000\.bin "
                                           r"holds 10 points"):
        convert(paths, tmp_path / "ds", progress=False)
    (tmp_path / "000000.label").write_bytes(b"\0" * 7)
    with pytest.raises(DatasetError, match=r"000000\.label: 7 bytes is not a multiple of 4"):
        convert(paths, tmp_path / "ds", progress=False)
    (tmp_path / "000000.bin").write_bytes(b"\0" * 17)
    with pytest.raises(DatasetError, match=r"000000\.bin: 17 bytes is not a multiple of 16"):
        convert(paths, tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


@pytest.mark.parametrize("dtype", ["float32", ">f8", "int16", "uint8"])
def test_raw_round_trip(tmp_path, make_raw, small_chunks, dtype):
    fields = ["x", "y", "z", "intensity", "label"]
    a = make_raw(tmp_path / "a.bin", 1000, fields, dtype, seed=1)
    b = make_raw(tmp_path / "b.bin", 400, fields, dtype, seed=2)
    ds = convert([tmp_path / "a.bin", tmp_path / "b.bin"], tmp_path / "ds", raw_fields=fields,
                 raw_dtype=dtype, progress=False)
    assert list(ds.scan_offsets) == [0, 1000, 1400]
    assert {s["format"] for s in ds.sources} == {"raw"}
    assert_same(ds, concat([a, b]))


def test_raw_errors(tmp_path, make_raw):
    make_raw(tmp_path / "a.bin", 10, ["x", "y", "z"])
    with open(tmp_path / "a.bin", "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(DatasetError, match=r"a\.bin: 125 bytes is not a multiple of the record "
                                           r"size 12 \(3 fields × 4 bytes of float32\)"):
        convert(tmp_path / "a.bin", tmp_path / "ds", raw_fields=["x", "y", "z"], progress=False)
    with pytest.raises(ConversionError, match="needs --raw-fields"):
        convert(tmp_path / "a.bin", tmp_path / "ds", format="raw", progress=False)
    with pytest.raises(DatasetError, match="raw-dtype"):
        convert(tmp_path / "a.bin", tmp_path / "ds", raw_fields=["x"], raw_dtype="complex64",
                progress=False)
    assert no_output_left(tmp_path)


# -- inputs, schemas, options ------------------------------------------------------------------------
def test_schema_mismatch_names_both_files_and_difference(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 10, properties=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    make_ply(tmp_path / "b.ply", 10, properties=[("x", "f4"), ("y", "f4"), ("z", "f8")])
    make_ply(tmp_path / "c.ply", 10, properties=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                                 ("i", "u1")])
    with pytest.raises(ConversionError) as ei:
        convert([tmp_path / "a.ply", tmp_path / "b.ply"], tmp_path / "ds", progress=False)
    msg = str(ei.value)
    assert "b.ply: schema differs from" in msg and "a.ply" in msg
    assert "field 'z' is z:float32 in" in msg and "but z:float64 in" in msg
    with pytest.raises(ConversionError, match=r"c\.ply has i:uint8, which \S*a\.ply lacks"):
        convert([tmp_path / "a.ply", tmp_path / "c.ply"], tmp_path / "ds", progress=False)
    # selecting the common fields makes them compatible
    ds = convert([tmp_path / "a.ply", tmp_path / "c.ply"], tmp_path / "ds", fields=["x", "y"],
                 progress=False)
    assert ds.num_points == 20 and ds.num_scans == 2


def test_directory_expansion(tmp_path, make_ply, make_kitti):
    root = tmp_path / "in"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    want = [make_ply(root / "b" / "deep" / "2.ply", 5, seed=2),
            make_ply(root / "a" / "1.ply", 5, seed=1),
            make_ply(root / "b" / "0.ply", 5, seed=0)]
    (root / "notes.txt").write_text("not an input")
    (root / ".hidden.ply").write_text("not even a ply")
    convert(root / "a", root / "old_ds", progress=False)  # a dataset inside: skipped
    ds = convert(root, tmp_path / "ds", format="ply", progress=False)
    assert [s["path"] for s in ds.sources] == [str(root / "a" / "1.ply"),
                                               str(root / "b" / "0.ply"),
                                               str(root / "b" / "deep" / "2.ply")]
    assert_same(ds, concat([want[1], want[2], want[0]]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no \.ply, \.las, \.laz or \.bin files"):
        convert(tmp_path / "empty", tmp_path / "d2", progress=False)


def test_bad_inputs_and_options(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 5)
    with pytest.raises(DatasetError, match=r"nope\.ply: no such file or directory"):
        convert([tmp_path / "a.ply", tmp_path / "nope.ply"], tmp_path / "ds", progress=False)
    (tmp_path / "e.ply").touch()
    with pytest.raises(DatasetError, match=r"e\.ply: empty file \(0 bytes\)"):
        convert(tmp_path / "e.ply", tmp_path / "ds", progress=False)
    (tmp_path / "x.xyz").write_bytes(b"1 2 3\n")
    with pytest.raises(ConversionError, match=r"x\.xyz: cannot tell the format from the "
                                              r"extension '\.xyz'"):
        convert(tmp_path / "x.xyz", tmp_path / "ds", progress=False)
    with pytest.raises(ConversionError, match=r"unknown format 'xyz'; expected one of auto, ply, "
                                              r"las, kitti, raw"):
        convert(tmp_path / "a.ply", tmp_path / "ds", format="xyz", progress=False)
    with pytest.raises(ConversionError, match="no input files"):
        convert([], tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_overwrite(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 5, seed=1)
    want = make_ply(tmp_path / "b.ply", 7, seed=2)
    convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    with pytest.raises(ConversionError, match="not empty; pass --overwrite"):
        convert(tmp_path / "b.ply", tmp_path / "ds", progress=False)
    assert open_dataset(tmp_path / "ds").num_points == 5
    # a failing conversion with overwrite keeps the old dataset
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\n")
    with pytest.raises(DatasetError):
        convert(tmp_path / "bad.ply", tmp_path / "ds", overwrite=True, progress=False)
    assert open_dataset(tmp_path / "ds").num_points == 5
    ds = convert(tmp_path / "b.ply", tmp_path / "ds", overwrite=True, progress=False)
    assert_same(ds, want)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []


def test_error_mid_stream_leaves_nothing(tmp_path, make_ply, small_chunks):
    """A failure after data was written (an ASCII row in the second file) removes the
    temporary directory."""
    make_ply(tmp_path / "a.ply", 1000, "ascii", seed=1)
    make_ply(tmp_path / "b.ply", 1000, "ascii", seed=2)
    text = (tmp_path / "b.ply").read_bytes()
    (tmp_path / "b.ply").write_bytes(text[:-40] + b"oops\n")
    with pytest.raises(ConversionError, match=r"b\.ply: line"):
        convert([tmp_path / "a.ply", tmp_path / "b.ply"], tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


# -- streaming and progress ----------------------------------------------------------------------------
def test_chunks_are_bounded(tmp_path, make_ply, make_kitti, make_raw, monkeypatch):
    """No append gets more than CHUNK_ROWS rows, nor (for wide rows) more than CHUNK_BYTES."""
    monkeypatch.setattr(common, "CHUNK_ROWS", 256)
    monkeypatch.setattr(common, "CHUNK_BYTES", 2048)  # 2048 / 8 B rows = 256; / 24 B rows = 85
    seen = []
    real = DatasetWriter.append

    def spy(self, columns):
        seen.append(len(next(iter(columns.values()))))
        return real(self, columns)

    monkeypatch.setattr(DatasetWriter, "append", spy)
    props = [("x", "f8"), ("y", "f8"), ("z", "f8")]
    for fmt in FORMATS:
        seen.clear()
        make_ply(tmp_path / f"{fmt}.ply", 1000, fmt, properties=props)
        convert(tmp_path / f"{fmt}.ply", tmp_path / fmt, progress=False)
        cap = 85 if fmt != "ascii" else 256
        assert sum(seen) == 1000 and max(seen) <= cap and len(seen) == -(-1000 // cap), fmt
    seen.clear()
    paths, _ = make_kitti(tmp_path / "k", [1000])
    convert(paths, tmp_path / "dk", progress=False)
    assert sum(seen) == 1000 and max(seen) <= 2048 // 20


def test_memory_is_bounded(tmp_path, make_ply, monkeypatch):
    """Converting a file allocates about one chunk, not the file (numpy reports to
    tracemalloc)."""
    monkeypatch.setattr(common, "CHUNK_ROWS", 1 << 14)
    props = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("i", "f4"), ("s", "i4"), ("t", "i4")]
    make_ply(tmp_path / "big.ply", 1 << 20, properties=props, keep=False)  # 24 MiB
    size = (tmp_path / "big.ply").stat().st_size
    tracemalloc.start()
    try:
        convert(tmp_path / "big.ply", tmp_path / "ds", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 8, f"peak {peak} bytes for a {size}-byte file"


def test_progress_bar_goes_to_stderr(tmp_path, make_ply, capsys):
    make_ply(tmp_path / "a.ply", 100)
    convert(tmp_path / "a.ply", tmp_path / "d1", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "convert" in err and "100%" in err
    convert(tmp_path / "a.ply", tmp_path / "d2", progress=False)
    assert capsys.readouterr() == ("", "")
    convert(tmp_path / "a.ply", tmp_path / "d3")  # None: only on a TTY, and capsys is none
    assert capsys.readouterr() == ("", "")


# -- verify ------------------------------------------------------------------------------------------
def test_small_dataset_fixture(small_dataset):
    ds = small_dataset.ds
    assert ds.num_points == sum(SMALL_SCANS) and ds.num_scans == len(SMALL_SCANS)
    assert_same(ds, small_dataset.values)
    assert ds.verify() == []


def test_verify_finds_a_flipped_byte_in_every_field(tmp_path, make_ply, small_blocks):
    want = make_ply(tmp_path / "a.ply", 3000)
    ds = convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    assert ds.verify() == []
    rng = np.random.default_rng(3)
    for name in ds.schema:
        lay = ds.layout(name)
        assert len(lay.checksums) > 1 or lay.nbytes <= small_blocks
        pos = int(rng.integers(0, lay.nbytes))
        path = ds.field_path(name)
        with open(path, "r+b") as f:
            f.seek(lay.offset + pos)
            orig = f.read(1)
            f.seek(lay.offset + pos)
            f.write(bytes([orig[0] ^ 0x10]))
        fresh = open_dataset(tmp_path / "ds")
        bad = fresh.verify()
        fresh.close()
        assert [(b[0], b[1]) for b in bad] == [(name, pos // small_blocks)], name
        with open(path, "r+b") as f:
            f.seek(lay.offset + pos)
            f.write(orig)
    assert open_dataset(tmp_path / "ds").verify() == []
    assert_same(open_dataset(tmp_path / "ds"), want)


def test_ascii_line_length_is_bounded(tmp_path, make_ply, monkeypatch):
    """A file without line breaks (say binary data under an ASCII header) is not read as one
    huge line."""
    monkeypatch.setattr(ply_mod, "MAX_LINE", 64)
    make_ply(tmp_path / "a.ply", 3, "ascii", properties=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    with open(tmp_path / "a.ply", "ab") as f:
        f.write(b"1" * 200)
    text = (tmp_path / "a.ply").read_bytes()
    (tmp_path / "a.ply").write_bytes(text.replace(b"element vertex 3", b"element vertex 4"))
    header = text.split(b"end_header\n")[0].count(b"\n") + 1
    with pytest.raises(ConversionError, match=rf"a\.ply: line {header + 4} is longer than 64 "
                                              rf"bytes"):
        convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


# -- counts that leave rows unread, and trailing elements cut short ---------------------------
@pytest.mark.parametrize("faces", [0, 3])
def test_ascii_rows_past_the_count_are_refused(tmp_path, make_ply, faces):
    """An ASCII vertex count smaller than its rows dropped the rest without a word (a binary one
    was refused); so did one followed by a face element."""
    make_ply(tmp_path / "a.ply", 1000, "ascii", faces=faces)
    data = (tmp_path / "a.ply").read_bytes().replace(b"element vertex 1000", b"element vertex 995")
    (tmp_path / "a.ply").write_bytes(data)
    with pytest.raises(DatasetError, match=r"a\.ply: line \d+ follows the rows the header counts "
                                           r"\(the last element is '(vertex|face)'\); the count "
                                           r"is wrong"):
        convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)
    make_ply(tmp_path / "b.ply", 1000, "ascii", faces=faces)  # whole, plus blank lines: fine
    (tmp_path / "b.ply").write_bytes((tmp_path / "b.ply").read_bytes() + b"\n\n")
    assert convert(tmp_path / "b.ply", tmp_path / "ds", progress=False).num_points == 1000


@pytest.mark.parametrize("fmt", ["binary_little_endian", "ascii"])
def test_a_trailing_element_cut_short_is_refused(tmp_path, make_ply, fmt):
    make_ply(tmp_path / "a.ply", 1000, fmt, faces=0)
    data = (tmp_path / "a.ply").read_bytes().replace(
        b"end_header", b"element camera 1099511627776\nproperty float a\nend_header")
    (tmp_path / "a.ply").write_bytes(data)
    with pytest.raises(DatasetError, match=r"a\.ply: truncated: .*'camera'"):
        convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_kitti_voxel_grids_are_not_scans(tmp_path, make_kitti, caplog):
    """SemanticKITTI's voxels/ folder holds 256×256×32 occupancy grids as .bin files (a
    multiple of 16 bytes): they became a scan of garbage points."""
    paths, want = make_kitti(tmp_path / "k", [1000], layout="semantickitti", labels=False)
    vox = paths[0].parent.parent / "voxels"
    vox.mkdir()
    (vox / paths[0].name).write_bytes(bytes(256 * 256 * 32 // 8))
    with caplog.at_level(logging.WARNING):
        ds = convert(tmp_path / "k", tmp_path / "ds", progress=False)
    assert list(ds.scan_offsets) == [0, 1000]
    assert "skipping 1 SemanticKITTI voxel grid(s) under voxels/" in caplog.text
    with pytest.raises(ConversionError, match="a SemanticKITTI voxel grid"):
        convert(vox / paths[0].name, tmp_path / "ds2", progress=False)


def test_api_option_types(tmp_path, make_ply, make_raw):
    make_ply(tmp_path / "a.ply", 100)
    for kw, message in ((dict(fields="x,y,z"), "fields= takes a list of field names"),
                        (dict(chunk_size=10 ** 400), "--chunk-size must be a finite number")):
        with pytest.raises(ConversionError, match=message):
            convert(tmp_path / "a.ply", tmp_path / "ds", progress=False, **kw)
    ds = convert(tmp_path / "a.ply", tmp_path / "ds", progress=False, chunk_size=np.float32(10))
    assert ds.num_points == 100 and ds.num_chunks >= 1
    cols = make_raw(tmp_path / "r.bin", 50, ["x", "y", "z", "i"])
    ds = convert(tmp_path / "r.bin", tmp_path / "r", progress=False,
                 raw_fields=["x", "y", "z", "i"], raw_dtype=None)  # None: the default, float32
    assert ds.num_points == 50 and np.array_equal(ds.read("i"), cols["i"])


def test_cli_raw_fields_with_an_empty_name_is_refused_in_one_line(tmp_path, make_raw):
    import subprocess
    import sys

    make_raw(tmp_path / "r.bin", 12, ["a", "b", "c", "d"])
    for spec in ("x,y,,z", "x,y,z,"):
        r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "r.bin",
                            "--raw-fields", spec, "-o", "ds", "--no-progress"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "field name '' is not usable" in r.stderr
    assert not (tmp_path / "ds").exists()
