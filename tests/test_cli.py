"""The ``gds-stream`` command line, through a subprocess (``python -m gds_stream``): convert, info
and verify outputs; every bad input is one line on stderr with exit status 2 and no traceback
(``--debug`` shows it), and a failed conversion leaves no directory behind.
"""

from __future__ import annotations

import functools
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from gds_stream.convert import convert
from gds_stream.format import DatasetWriter

# The converter's shared module (``import gds_stream.convert`` would give the function,
# since the package binds its name once __init__ imports it eagerly).
common = importlib.import_module("gds_stream.convert.common")


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gds_stream", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2, exactly one line on stderr, no traceback, and ``words`` in it."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    line = lines[0]
    assert line.startswith("gds-stream: error: "), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def nothing_left(parent, name="out") -> bool:
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def dataset(tmp_path, make_ply):
    """A dataset converted by the CLI from two PLY files."""
    make_ply(tmp_path / "a.ply", 1200, seed=1)
    make_ply(tmp_path / "b.ply", 300, "ascii", seed=2)
    proc = cli("convert", tmp_path / "a.ply", tmp_path / "b.ply", "-o", tmp_path / "ds",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "ds"


def edit_manifest(ds, change) -> None:
    path = ds / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


# -- success -----------------------------------------------------------------------------------------
def test_a_reader_that_leaves_early_is_no_error(dataset):
    """``gds-stream info DS | head -1``: the pipe closes before the output is written; the
    command ends quietly with 141 (128 + SIGPIPE, as a shell reports it), no error line."""
    proc = subprocess.Popen([sys.executable, "-m", "gds_stream", "info", str(dataset)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write fails
    try:
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, err
    finally:
        proc.stderr.close()
    assert err == ""


def test_convert_then_info(dataset):
    proc = cli("info", dataset)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "points   1,500" in out and "scans    2" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[5:]}
    assert rows["x"] == ["float32", "1", "4", "6,000"]
    assert rows["z"] == ["float64", "1", "8", "12,000"]
    assert rows["sem_class"][0] == "int32" and rows["ins_class"][0] == "uint8"
    assert proc.stderr == ""


def test_convert_prints_a_summary(tmp_path, make_kitti):
    paths, _ = make_kitti(tmp_path / "seq", [100, 50], layout="semantickitti")
    proc = cli("convert", tmp_path / "seq", "-o", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "150 points in 2 scans" in proc.stdout and proc.stderr == ""
    proc = cli("verify", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0 and "blocks ok" in proc.stdout


def test_convert_raw_and_fields(tmp_path, make_raw):
    make_raw(tmp_path / "r.bin", 100, ["x", "y", "z", "t"], "float64")
    proc = cli("convert", tmp_path / "r.bin", "-o", tmp_path / "out", "--raw-fields", "x,y,z,t",
               "--raw-dtype", "float64", "--fields", "t,x", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    info = cli("info", tmp_path / "out").stdout
    assert "t      float64" in info and "x      float64" in info and "\ny " not in info


def test_overwrite(tmp_path, make_ply, dataset):
    make_ply(tmp_path / "c.ply", 10)
    proc = cli("convert", tmp_path / "c.ply", "-o", dataset, "--no-progress")
    assert_error(proc, str(dataset), "not empty", "--overwrite")
    assert "1,500" in cli("info", dataset).stdout
    proc = cli("convert", tmp_path / "c.ply", "-o", dataset, "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "points   10\n" in cli("info", dataset).stdout
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")] == []


def test_verify_reports_field_and_block(tmp_path, make_ply, monkeypatch):
    monkeypatch.setattr(common, "DatasetWriter", functools.partial(DatasetWriter, block_bytes=4096))
    make_ply(tmp_path / "a.ply", 5000)
    ds = convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    lay = ds.layout("intensity")  # 10,000 bytes: blocks 0, 1, 2
    with open(ds.field_path("intensity"), "r+b") as f:
        f.seek(lay.offset + 5000)
        b = f.read(1)
        f.seek(lay.offset + 5000)
        f.write(bytes([b[0] ^ 1]))
    proc = cli("verify", tmp_path / "ds", "--no-progress")
    assert proc.returncode == 1
    assert "field 'intensity' block 1 " in proc.stderr and "1 corrupt block" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- bad inputs: exit 2, one line, nothing left -------------------------------------------------------
def test_missing_file(tmp_path):
    proc = cli("convert", tmp_path / "nope.ply", "-o", tmp_path / "out")
    assert_error(proc, "nope.ply", "no such file")
    assert nothing_left(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.ply").touch()
    assert_error(cli("convert", tmp_path / "e.ply", "-o", tmp_path / "out"), "e.ply", "empty file")
    assert nothing_left(tmp_path)


def test_ply_without_xyz(tmp_path, make_ply):
    make_ply(tmp_path / "tile_3.ply", 10, properties=[("x", "f4"), ("y", "f4"), ("s", "u1")])
    line = assert_error(cli("convert", tmp_path / "tile_3.ply", "-o", tmp_path / "out"))
    assert line.endswith("tile_3.ply: element 'vertex' has no property 'z'")
    assert nothing_left(tmp_path)


def test_truncated_binary_ply(tmp_path, make_ply):
    make_ply(tmp_path / "t.ply", 100, properties=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    data = (tmp_path / "t.ply").read_bytes()
    (tmp_path / "t.ply").write_bytes(data[:-100])
    proc = cli("convert", tmp_path / "t.ply", "-o", tmp_path / "out")
    assert_error(proc, "t.ply", "truncated", "promises 1200 bytes", "only 1100 bytes")
    assert nothing_left(tmp_path)


def test_ascii_ply_malformed_row(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 50, "ascii", properties=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    lines = (tmp_path / "a.ply").read_text().split("\n")
    at = lines.index("end_header") + 10
    lines[at] = "1.0 2.0 three"
    (tmp_path / "a.ply").write_text("\n".join(lines))
    # the error comes mid-stream: --no-progress keeps the (forced) bar out of stderr
    proc = cli("convert", tmp_path / "a.ply", "-o", tmp_path / "out", "--no-progress")
    assert_error(proc, "a.ply", f"line {at + 1}", "property 'z'", "'three' is not a number")
    assert nothing_left(tmp_path)


def test_kitti_label_count_differs(tmp_path, make_kitti):
    paths, _ = make_kitti(tmp_path / "seq", [20], layout="semantickitti")
    np.zeros(19, "<u4").tofile(tmp_path / "seq" / "labels" / "000000.label")
    proc = cli("convert", tmp_path / "seq", "-o", tmp_path / "out")
    assert_error(proc, "000000.label", "19 labels", "20 points")
    assert nothing_left(tmp_path)


def test_raw_size_not_a_multiple(tmp_path):
    (tmp_path / "r.bin").write_bytes(b"\0" * 30)
    proc = cli("convert", tmp_path / "r.bin", "-o", tmp_path / "out", "--raw-fields", "x,y,z,i")
    assert_error(proc, "r.bin", "30 bytes", "record size 16")
    proc = cli("convert", tmp_path / "r.bin", "-o", tmp_path / "out", "--format", "raw")
    assert_error(proc, "--raw-fields")
    assert nothing_left(tmp_path)


def test_unknown_format(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 5)
    proc = cli("convert", tmp_path / "a.ply", "-o", tmp_path / "out", "--format", "xyz")
    assert_error(proc, "unknown format 'xyz'", "auto, ply, las, kitti, raw")
    proc = cli("convert", tmp_path / "a.ply", "-o", tmp_path / "out", "--format", "las")
    assert_error(proc, "a.ply: not a LAS/LAZ file", "signature 'LASF'")
    (tmp_path / "a.xyz").write_text("1 2 3\n")
    proc = cli("convert", tmp_path / "a.xyz", "-o", tmp_path / "out")
    assert_error(proc, "a.xyz", "extension '.xyz'")
    assert nothing_left(tmp_path)


def test_schema_mismatch(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 5, properties=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    make_ply(tmp_path / "b.ply", 5, properties=[("x", "f8"), ("y", "f4"), ("z", "f4")])
    proc = cli("convert", tmp_path / "a.ply", tmp_path / "b.ply", "-o", tmp_path / "out")
    assert_error(proc, "b.ply: schema differs from", "a.ply", "'x' is x:float32", "x:float64")
    assert nothing_left(tmp_path)


def test_manifest_path_outside(dataset):
    edit_manifest(dataset, lambda d: d["fields"][0].update(file="../x.bin"))
    (dataset.parent / "x.bin").write_bytes(b"\0" * 8192)
    for cmd in ("info", "verify"):
        assert_error(cli(cmd, dataset), "manifest.json", "'../x.bin'", "outside the dataset")


def test_manifest_claims_more_bytes(dataset):
    edit_manifest(dataset, lambda d: d["fields"][0].update(offset=1 << 20))
    assert_error(cli("info", dataset), "x.bin", "file holds", "the manifest needs")


def test_data_file_shorter_than_manifest(dataset):
    with open(dataset / "y.bin", "r+b") as f:
        f.truncate(100)
    assert_error(cli("verify", dataset), "y.bin", "file holds 100 bytes", "the manifest needs")


def test_unknown_version(dataset):
    edit_manifest(dataset, lambda d: d.update(version=99))
    assert_error(cli("info", dataset), "manifest.json", "unknown format version 99")


def test_not_a_dataset(tmp_path):
    assert_error(cli("info", tmp_path / "nope"), "nope", "no such directory")


def test_debug_shows_traceback(tmp_path):
    proc = cli("--debug", "convert", tmp_path / "nope.ply", "-o", tmp_path / "out")
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr and "DatasetError" in proc.stderr
    assert "nope.ply: no such file" in proc.stderr
    assert nothing_left(tmp_path)


# -- options anywhere, help, wording -----------------------------------------------------------------
def test_debug_and_verbose_after_the_subcommand(tmp_path, make_ply):
    proc = cli("convert", tmp_path / "nope.ply", "-o", tmp_path / "out", "--debug")
    assert "Traceback" in proc.stderr and "nope.ply: no such file" in proc.stderr
    make_ply(tmp_path / "a.ply", 10)
    proc = cli("convert", tmp_path / "a.ply", "-o", tmp_path / "out", "-v", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "INFO gds_stream.convert" in proc.stderr
    proc = cli("info", tmp_path / "out", "--verbose")
    assert proc.returncode == 0 and "points   10" in proc.stdout


def test_help_lists_options_and_formats():
    top = cli("--help").stdout
    assert "--debug" in top and "--verbose" in top and "may also follow the subcommand" in top
    conv_help = cli("convert", "--help").stdout
    for word in ("LAS", "LAZ", "COPC", "--xyz", "--debug", "--verbose", "float64"):
        assert word in conv_help, word
    for cmd in ("info", "verify"):
        text = cli(cmd, "--help").stdout
        assert "dataset directory (holding manifest.json)" in text and "--debug" in text, cmd


def test_one_scan_is_singular(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 1)
    proc = cli("convert", tmp_path / "a.ply", "-o", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "1 point in 1 scan," in proc.stdout


def test_verify_clips_the_range_to_the_field(tmp_path, make_ply, monkeypatch):
    monkeypatch.setattr(common, "DatasetWriter", functools.partial(DatasetWriter, block_bytes=4096))
    make_ply(tmp_path / "a.ply", 5000)
    ds = convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    lay = ds.layout("intensity")  # 10,000 bytes: the last block is bytes 8192..10000
    with open(ds.field_path("intensity"), "r+b") as f:
        f.seek(lay.offset + 9000)
        b = f.read(1)
        f.seek(lay.offset + 9000)
        f.write(bytes([b[0] ^ 1]))
    proc = cli("verify", tmp_path / "ds", "--no-progress")
    assert proc.returncode == 1
    assert "block 2 (bytes 8192..10000 of the field)" in proc.stderr
    assert "1 corrupt block\n" in proc.stderr


# -- LAS / LAZ ---------------------------------------------------------------------------------------
WKT = 'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84"],AUTHORITY["EPSG","32633"]]'


def test_las_convert_and_info_show_origin_and_crs(tmp_path, make_las):
    make_las(tmp_path / "a.laz", 500, point_format=6, version="1.4", scale=0.001,
             offset=(500000.0, 5000000.0, 100.0), wkt=WKT)
    proc = cli("convert", tmp_path / "a.laz", "-o", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "500 points in 1 scan" in proc.stdout
    info = cli("info", tmp_path / "out").stdout
    assert "origin   500000.0, 5000000.0, 100.0" in info
    assert "crs      WGS 84 / UTM zone 33N (EPSG:32633)" in info
    rows = {line.split()[0]: line.split()[1:] for line in info.splitlines() if line.strip()}
    assert rows["x"][0] == "float32" and rows["classification"][0] == "uint8"


def test_las_xyz_auto_float32_and_float64(tmp_path, make_las):
    """A 200 km tile at 1 mm: the default converts as float64 with one warning line saying why;
    --xyz float32 refuses in one line; --xyz float64 converts silently."""
    make_las(tmp_path / "a.laz", 500, scale=0.001, offset=(500000.0, 5000000.0, 0.0),
             spread=100_000.0, epsg_geokey=32633)
    proc = cli("convert", tmp_path / "a.laz", "-o", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "a.laz: point " in lines[0], proc.stderr
    assert "storing x, y, z as absolute float64" in lines[0]
    info = cli("info", tmp_path / "out").stdout
    assert "origin" not in info and "crs      GeoTIFF keys (EPSG:32633)" in info
    rows = {line.split()[0]: line.split()[1:] for line in info.splitlines() if line.strip()}
    assert rows["x"][0] == rows["z"][0] == "float64"
    proc = cli("convert", tmp_path / "a.laz", "-o", tmp_path / "o32", "--xyz", "float32",
               "--no-progress")
    assert_error(proc, "a.laz: point", "--xyz float64")
    assert nothing_left(tmp_path, "o32")
    proc = cli("convert", tmp_path / "a.laz", "-o", tmp_path / "o64", "--xyz", "float64",
               "--no-progress")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_las_bad_input_is_one_line(tmp_path):
    (tmp_path / "a.laz").write_bytes(b"LASF" + b"\0" * 400)
    assert_error(cli("convert", tmp_path / "a.laz", "-o", tmp_path / "out"), "a.laz")
    assert nothing_left(tmp_path)


def test_info_survives_odd_crs_records_in_sources(tmp_path, make_ply):
    """sources are free-form in a manifest: odd CRS records are shown or skipped, never a crash."""
    import json
    import subprocess
    import sys

    from gds_stream import convert

    make_ply(tmp_path / "a.ply", 10)
    convert(tmp_path / "a.ply", tmp_path / "ds", progress=False)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    m["sources"][0]["crs_geokeys"] = [[[1], 2, 3, 4], "x", 5]
    m["sources"].append({"path": "b", "points": 0, "crs_geokeys": 7})
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "gds_stream", "info", str(tmp_path / "ds")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 2), r.stderr
    assert "Traceback" not in r.stderr


# -- the one-line rule, --version, misspelt options, CRS codes ------------------------------------
def _laz(tmp_path, name="a.laz", n=2000):
    import laspy

    hdr = laspy.LasHeader(point_format=3, version="1.2")
    hdr.scales = np.full(3, 0.01)
    las = laspy.LasData(hdr)
    rng = np.random.default_rng(0)
    las.x, las.y, las.z = rng.random(n) * 100, rng.random(n) * 100, rng.random(n)
    las.write(tmp_path / name)
    return tmp_path / name


def test_laspy_log_lines_do_not_leak(tmp_path):
    """A LASzip VLR naming an unknown item: laspy logs ``ERROR laspy.lasreader: ...`` before
    failing; the refusal is still one line, and -v shows laspy's line."""
    path = _laz(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(b"laszip encoded") - 2 + 54 + 34  # the first item's type
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    assert_error(cli("convert", path, "-o", tmp_path / "out", "--no-progress"), "a.laz: ",
                 "is unknown")
    assert nothing_left(tmp_path)
    proc = cli("convert", path, "-o", tmp_path / "out", "--no-progress", "-v")
    assert proc.returncode == 2 and "ERROR laspy.lasreader" in proc.stderr


def test_tiny_chunk_size_is_one_line(tmp_path):
    """--chunk-size 5e-324 overflows numpy's divide (a RuntimeWarning): still one line."""
    path = _laz(tmp_path, "a.las", 100)
    assert_error(cli("convert", path, "-o", tmp_path / "out", "--chunk-size", "5e-324",
                     "--no-progress"), "a.las")
    assert nothing_left(tmp_path)


def test_version():
    from gds_stream import __version__

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gds-stream {__version__}"


def test_misspelt_option_gets_the_subcommands_usage_and_a_suggestion(tmp_path):
    proc = cli("convert", tmp_path / "a.las", "-o", tmp_path / "out", "--chunk-szie", "25")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: gds-stream convert ")
    assert "--chunk-size S" in proc.stderr
    assert "--chunk-szie (did you mean --chunk-size?)" in proc.stderr.splitlines()[-1]
    proc = cli("verify", tmp_path, "--no-progess")
    assert proc.stderr.startswith("usage: gds-stream verify ")
    assert "(did you mean --no-progress?)" in proc.stderr


FOOT = ('PROJCS["NAD83 / Ohio North (ftUS)",GEOGCS["NAD83",DATUM["North_American_Datum_1983",'
        'SPHEROID["GRS 1980",6378137,298.257222101,AUTHORITY["EPSG","7019"]],'
        'AUTHORITY["EPSG","6269"]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],'
        'AUTHORITY["EPSG","4269"]],PROJECTION["Lambert_Conformal_Conic_2SP"],'
        'UNIT["US survey foot",0.3048006096012192,AUTHORITY["EPSG","9003"]]%s]')
COMPOUND = ('COMPD_CS["UTM 33N + NAVD88",PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84"],'
            'UNIT["metre",1,AUTHORITY["EPSG","9001"]],AUTHORITY["EPSG","32633"]],'
            'VERT_CS["NAVD88 height",VERT_DATUM["North American Vertical Datum 1988",2005],'
            'UNIT["metre",1,AUTHORITY["EPSG","9001"]],AUTHORITY["EPSG","5703"]]]')


@pytest.mark.parametrize("wkt, code", [
    (FOOT % "", None),
    (FOOT % ',AUTHORITY["EPSG","3734"]', "3734"),
    (COMPOUND, "32633"),
])
def test_info_shows_the_crs_own_epsg_code_never_a_units(tmp_path, make_las, wkt, code):
    make_las(tmp_path / "a.las", 10, point_format=6, version="1.4", wkt=wkt)
    proc = cli("convert", tmp_path / "a.las", "-o", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    crs = [ln for ln in cli("info", tmp_path / "out").stdout.splitlines()
           if ln.startswith("crs")]
    assert len(crs) == 1
    assert "9003" not in crs[0] and "9001" not in crs[0] and "5703" not in crs[0], crs
    pyproj = importlib.util.find_spec("pyproj") is not None
    if code is not None:
        assert crs[0].endswith(f"(EPSG:{code})"), crs
    elif not pyproj:  # pyproj may identify a code the WKT does not carry
        assert "EPSG" not in crs[0], crs
