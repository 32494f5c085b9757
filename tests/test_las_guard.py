"""Hostile LAS/LAZ files, made by patching laspy-written ones: a LAS 1.4 point count that runs
into the EVLRs, non-finite scaled coordinates, points outside the header's bounds, LAZ chunk
tables and chunk sizes that would make lazrs allocate without bound, a lazrs panic. Each is one
clear error (or one warning) naming the file; CLI cases run through a subprocess.
"""

from __future__ import annotations

import shutil
import struct

import laspy
import numpy as np
import pytest

from gds_stream import ConversionError, DatasetError
from gds_stream.convert import convert


def no_output_left(parent, name="ds") -> bool:
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def _points(n=300, version="1.2", point_format=3, extra=(), evlr=False, scale=0.01):
    from laspy.vlrs.vlrlist import VLRList

    hdr = laspy.LasHeader(point_format=point_format, version=version)
    hdr.scales = np.full(3, scale)
    for name, t in extra:
        hdr.add_extra_dim(laspy.ExtraBytesParams(name, t))
    las = laspy.LasData(hdr)
    rng = np.random.default_rng(3)
    las.x, las.y, las.z = rng.random(n) * 10, rng.random(n) * 10, rng.random(n)
    if evlr:
        las.evlrs = VLRList([laspy.VLR("gds-test", 1, "after the points", b"\x7f" * 600)])
    return las


def test_las_1_4_count_running_into_the_evlrs_is_refused(tmp_path):
    """One more record than the point region holds would read the EVLR's bytes as a point."""
    _points(300, "1.4", 6, evlr=True).write(tmp_path / "a.las")
    data = bytearray((tmp_path / "a.las").read_bytes())
    assert struct.unpack_from("<Q", data, 247)[0] == 300
    struct.pack_into("<Q", data, 247, 301)  # the 64-bit point count of LAS 1.4
    struct.pack_into("<I", data, 107, 301)
    (tmp_path / "a.las").write_bytes(bytes(data))
    for xyz in ("auto", "float64"):
        with pytest.raises(DatasetError, match=r"a\.las: the header promises 301 points of 30 "
                                               r"bytes .* but the extended VLRs start at byte"):
            convert(tmp_path / "a.las", tmp_path / "ds", xyz=xyz, progress=False)
    assert no_output_left(tmp_path)
    struct.pack_into("<Q", data, 247, 300)  # the true count converts
    (tmp_path / "a.las").write_bytes(bytes(data))
    assert convert(tmp_path / "a.las", tmp_path / "ds", progress=False).num_points == 300


@pytest.mark.parametrize("xyz", ["auto", "float32", "float64"])
def test_non_finite_coordinates_are_refused_in_every_mode(tmp_path, xyz):
    """Scale 1e300 with offset 1.7e308 overflows x to inf for every point: refused naming the
    file and the first such point."""
    las = _points(200)
    las.x = 200_000.0 + np.arange(200)  # raw X ≥ 2e7: x = X × 1e300 + 1.7e308 overflows
    las.write(tmp_path / "a.las")
    data = bytearray((tmp_path / "a.las").read_bytes())
    struct.pack_into("<d", data, 131, 1e300)  # x scale
    struct.pack_into("<d", data, 155, 1.7e308)  # x offset
    (tmp_path / "a.las").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"a\.las: point 0: x = .* is inf, not a finite "
                                              r"coordinate"):
        convert(tmp_path / "a.las", tmp_path / "ds", xyz=xyz, progress=False)
    assert no_output_left(tmp_path)


def test_non_finite_z_with_2d_chunks_names_the_input_point(tmp_path):
    """--chunk-dims 2 does not bin z, but a non-finite z is still the input's fault: the error
    names the file and point, not a chunk bound of the output."""
    import subprocess
    import sys

    las = _points(200)
    las.z = 300_000.0 + np.arange(200)
    las.write(tmp_path / "a.las")
    data = bytearray((tmp_path / "a.las").read_bytes())
    struct.pack_into("<d", data, 147, 1e300)  # z scale
    struct.pack_into("<d", data, 171, 1.7e308)  # z offset
    (tmp_path / "a.las").write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.las", "-o", "out",
                        "--chunk-size", "5", "--chunk-dims", "2", "--no-progress"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "a.las: point 0: z = " in r.stderr and "not a finite coordinate" in r.stderr


def test_points_outside_the_header_bounds_warn_with_the_count(tmp_path, caplog):
    """Damaged data (or a wrong header): one warning naming the file and the count."""
    las = _points(200)
    las.x[:7] = 50.0  # 7 points beyond the bounds written below
    las.write(tmp_path / "a.laz")
    data = bytearray((tmp_path / "a.laz").read_bytes())
    struct.pack_into("<2d", data, 179, 10.0, 0.0)  # max x, min x
    (tmp_path / "a.laz").write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="gds_stream"):
        ds = convert(tmp_path / "a.laz", tmp_path / "ds", xyz="float64", progress=False)
    assert ds.num_points == 200
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "a.laz: 7 of 200 points lie outside the header's bounds" \
        in warned[0], warned


def _laz_table(path):
    """(offset of the chunk table, the file's bytes) of a laspy-written LAZ."""
    data = bytearray(path.read_bytes())
    start = laspy.read(path).header.offset_to_point_data
    return struct.unpack_from("<q", data, start)[0], data


@pytest.mark.parametrize("patch, message", [
    ("count", "counts 2147483648 chunks"),
    ("into", "chunks;"),
    ("chunk_size", "chunk size 2147483648 points"),
])
def test_laz_chunk_table_is_checked_before_lazrs(tmp_path, patch, message):
    """A chunk table claiming 2³¹ chunks, one pointing into the point data, or a LASzip chunk
    size of 2³¹ points made lazrs allocate tens of GB and abort: refused from the file's size.
    (In a subprocess under a 4 GiB address-space limit, so a regression cannot take the
    machine's memory.)"""
    import resource
    import subprocess
    import sys

    _points(2000).write(tmp_path / "a.laz")
    table, data = _laz_table(tmp_path / "a.laz")
    start = laspy.read(tmp_path / "a.laz").header.offset_to_point_data
    if patch == "count":
        struct.pack_into("<I", data, table + 4, 2**31)
    elif patch == "into":
        struct.pack_into("<q", data, start, start + 60)
    else:
        at = data.index(b"laszip encoded") - 2 + 54 + 12
        struct.pack_into("<I", data, at, 2**31)
    (tmp_path / "a.laz").write_bytes(bytes(data))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.laz", "-o", "out",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "a.laz: " in r.stderr and message in r.stderr, r.stderr
    assert no_output_left(tmp_path, "out")


def _panicking_laz(tmp_path):
    """A LAZ whose flipped chunk-table byte makes lazrs panic (found by flipping each byte)."""
    _points(2000).write(tmp_path / "src.laz")
    table, data = _laz_table(tmp_path / "src.laz")
    for pos in range(table + 8, len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= bit
            (tmp_path / "a.laz").write_bytes(bytes(bad))
            try:
                convert(tmp_path / "a.laz", tmp_path / "probe", progress=False)
            except ConversionError as exc:
                if "PanicException" in str(exc):
                    return str(exc)
            except DatasetError:
                pass
            shutil.rmtree(tmp_path / "probe", ignore_errors=True)
    pytest.fail("no single-bit flip of the chunk table made lazrs panic")


def test_lazrs_panic_is_a_conversion_error(tmp_path):
    """lazrs' PanicException is a BaseException: caught where laspy/lazrs are called, it is a
    ConversionError naming the file, and the CLI prints one line (the Rust panic message that
    lazrs writes to stderr itself included)."""
    import subprocess
    import sys

    message = _panicking_laz(tmp_path)
    assert message.startswith(str(tmp_path / "a.laz") + ": lazrs failed")
    assert no_output_left(tmp_path, "probe")
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.laz", "-o", "out",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [f"gds-stream: error: a.laz: lazrs failed reading the "
                                     f"points after the first 0 points ({message.split('(')[1]}"]
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.laz", "-o", "out",
                        "--no-progress", "-v"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "panicked" in r.stderr  # -v shows what lazrs printed
