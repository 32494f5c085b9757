"""Hostile LAS/LAZ files, made by patching laspy-written ones: a LAS 1.4 point count that runs
into the EVLRs, non-finite scaled coordinates, points outside the header's bounds, LAZ chunk
tables and chunk sizes that would make lazrs allocate without bound, a lazrs panic, point counts
that disagree with each other or with the point data, unknown versions, point formats the
version does not have, EVLRs that do not fit the file, an extra-bytes scale of 0. Each is one
clear error (or one warning) naming the file; CLI cases run through a subprocess.
"""

from __future__ import annotations

import re
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
    struct.pack_into("<I", data, 107, 0)  # (format 6: the legacy count is 0)
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


def _refused_under_4_gib(tmp_path) -> str:
    """``gds-stream convert a.laz -o out`` in ``tmp_path``, in a subprocess under a 4 GiB
    address-space limit (a regression cannot take the machine's memory): refused in one line,
    exit 2; that line."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.laz", "-o", "out",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    return r.stderr


def _laz_table(path):
    """(offset of the chunk table, the file's bytes) of a laspy-written LAZ."""
    data = bytearray(path.read_bytes())
    start = laspy.read(path).header.offset_to_point_data
    return struct.unpack_from("<q", data, start)[0], data


@pytest.mark.parametrize("patch, message", [
    ("count", "counts 2147483648 chunks"),
    ("into", "chunks;"),
    ("chunk_size", "chunk size 2147483648 points"),
    # a writer that could not seek back leaves -1 there and the offset in the last 8 bytes
    ("minus one", "counts 2147483648 chunks"),
])
def test_laz_chunk_table_is_checked_before_lazrs(tmp_path, patch, message):
    """A chunk table claiming 2³¹ chunks, one pointing into the point data, or a LASzip chunk
    size of 2³¹ points made lazrs allocate tens of GB and abort: refused from the file's size.
    (In a subprocess under a 4 GiB address-space limit, so a regression cannot take the
    machine's memory.)"""
    _points(2000).write(tmp_path / "a.laz")
    table, data = _laz_table(tmp_path / "a.laz")
    start = laspy.read(tmp_path / "a.laz").header.offset_to_point_data
    if patch == "count":
        struct.pack_into("<I", data, table + 4, 2**31)
    elif patch == "into":
        struct.pack_into("<q", data, start, start + 60)
    elif patch == "minus one":
        struct.pack_into("<q", data, start, -1)
        data += struct.pack("<q", table)
        struct.pack_into("<I", data, table + 4, 2**31)
    else:
        at = data.index(b"laszip encoded") - 2 + 54 + 12
        struct.pack_into("<I", data, at, 2**31)
    (tmp_path / "a.laz").write_bytes(bytes(data))

    err = _refused_under_4_gib(tmp_path)
    assert "a.laz: " in err and message in err, err
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
    assert r.stderr.splitlines() == [f"gds-stream: error: a.laz: {message.split(': ', 1)[1]}"]
    assert "lazrs failed reading the points (points 0.." in message
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.laz", "-o", "out",
                        "--no-progress", "-v"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "panicked" in r.stderr  # -v shows what lazrs printed


# -- headers that disagree with themselves or with the file ------------------------------------
def _patched(tmp_path, las, suffix=".las", **at):
    """``las`` written to ``a<suffix>`` with ``at``: {offset: packed bytes} patched in."""
    las.write(tmp_path / f"src{suffix}")
    data = bytearray((tmp_path / f"src{suffix}").read_bytes())
    for off, raw in at.items():
        data[int(off):int(off) + len(raw)] = raw
    (tmp_path / f"a{suffix}").write_bytes(bytes(data))
    return tmp_path / f"a{suffix}"


@pytest.mark.parametrize("version, point_format, legacy, count", [
    ("1.2", 3, 150, None),  # half the records: converting 150 dropped the rest silently
    ("1.2", 3, 0, None),
    ("1.4", 6, 0, 299),
    ("1.4", 6, 0, 0),
])
def test_count_smaller_than_the_point_data_is_refused(tmp_path, version, point_format, legacy,
                                                      count):
    at = {"107": struct.pack("<I", legacy)}
    if count is not None:
        at["247"] = struct.pack("<Q", count)
    path = _patched(tmp_path, _points(300, version, point_format), **at)
    n = legacy if count is None else count
    with pytest.raises(DatasetError, match=rf"a\.las: the header counts {n} points, but its "
                                           rf"point data .* holds 300 records of"):
        convert(path, tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_point_data_before_the_evlrs_is_counted_up_to_them(tmp_path):
    """EVLRs after the points are not records: a 1.4 file with them converts, and one record
    fewer in the count is refused."""
    las = _points(300, "1.4", 6, evlr=True)
    ok = _patched(tmp_path, las)
    assert convert(ok, tmp_path / "ds", progress=False).num_points == 300
    path = _patched(tmp_path, las, **{"247": struct.pack("<Q", 299)})
    with pytest.raises(DatasetError, match=r"counts 299 points, .* up to the extended VLRs\) "
                                           r"holds 300 records"):
        convert(path, tmp_path / "d2", progress=False)


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_legacy_and_64_bit_counts_that_disagree_are_refused(tmp_path, suffix):
    """LAS 1.4 keeps a 32-bit legacy count (0 for formats 6-10 or past 2³²) beside the 64-bit
    one; laspy reads only the latter, so a header where they differ was converted silently."""
    path = _patched(tmp_path, _points(300, "1.4", 1), suffix, **{"107": struct.pack("<I", 299)})
    with pytest.raises(DatasetError, match=rf"a\{suffix}: the header's legacy point count 299 "
                                           rf"and its LAS 1.4 point count 300 disagree"):
        convert(path, tmp_path / "ds", progress=False)
    # a legacy count of 0 or of the true count is what writers put there
    for legacy in (0, 300):
        path = _patched(tmp_path, _points(300, "1.4", 1), suffix,
                        **{"107": struct.pack("<I", legacy)})
        ds = convert(path, tmp_path / f"ok{legacy}", progress=False)
        assert ds.num_points == 300


@pytest.mark.parametrize("version, fmt, message", [
    (b"\x03\x00", None, "the header says LAS version 3.0; gds-stream reads LAS 1.0 to 1.4"),
    (b"\x01\x05", None, "the header says LAS version 1.5"),
    (b"\x00\x02", None, "the header says LAS version 0.2"),
    (None, 6, "point format 6 does not exist in LAS 1.2 \\(it has formats 0 to 3\\)"),
    (b"\x01\x00", None, "point format 3 does not exist in LAS 1.0"),
])
@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_unknown_versions_and_formats_outside_the_version_are_refused(tmp_path, version, fmt,
                                                                       message, suffix):
    """laspy reads only the minor version, and reads any format id it knows: LAS 3.0 was read as
    1.0, a LAS 1.2 format-3 file patched to format 6 converted garbage without a word."""
    at = {}
    if version is not None:
        at["24"] = version
    if fmt is not None:
        at["104"] = bytes([fmt | (0x80 if suffix == ".laz" else 0)])
    path = _patched(tmp_path, _points(300, "1.2", 3), suffix, **at)
    with pytest.raises(DatasetError, match=rf"a\{suffix}: {message}"):
        convert(path, tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def _evlr_header_at(path):
    data = bytearray(path.read_bytes())
    return struct.unpack_from("<Q", data, 235)[0], data


@pytest.mark.parametrize("where", ["inside the header", "length past the end", "second past"])
def test_evlrs_that_do_not_fit_the_file_are_refused(tmp_path, where):
    """laspy reads each EVLR's declared length whole: an EVLR placed at byte 0 (its length then
    comes from the header's bytes) or one claiming 2⁶² bytes was a MemoryError, or with less
    of a claim a read of gigabytes."""
    from laspy.vlrs.vlrlist import VLRList

    las = _points(300, "1.4", 6, evlr=True)
    las.evlrs = VLRList([laspy.VLR("gds-test", 1, "one", b"\x01" * 100),
                         laspy.VLR("gds-test", 2, "two", b"\x02" * 100)])
    las.write(tmp_path / "a.las")
    first, data = _evlr_header_at(tmp_path / "a.las")
    if where == "inside the header":
        struct.pack_into("<Q", data, 235, 0)
        message = r"the header places its 2 extended VLRs at byte 0, before the point data"
    elif where == "length past the end":
        struct.pack_into("<Q", data, first + 20, 2**62)
        message = rf"extended VLR 0 of 2 at byte {first} claims {2**62} bytes, more than"
    else:
        struct.pack_into("<Q", data, first + 60 + 100 + 20, 161)
        message = rf"extended VLR 1 of 2 at byte {first + 160} claims 161 bytes"
    (tmp_path / "a.las").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"a\.las: {message}"):
        convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_extra_bytes_scale_of_zero_is_refused(tmp_path):
    """An extra-bytes dimension whose options say "scaled" with a scale of 0 stored every value
    as its offset (all zeros) without a word."""
    las = _points(300, "1.4", 6, extra=[("height", "u2")])
    las.write(tmp_path / "src.las")
    data = bytearray((tmp_path / "src.las").read_bytes())
    at = data.index(b"height\0") - 4  # the extra-bytes record: reserved, type, options, name
    assert data[at + 2] == 3  # u2
    data[at + 3] |= 0x08  # scale present; the scale (at +112) stays 0.0
    assert struct.unpack_from("<d", data, at + 112)[0] == 0.0
    (tmp_path / "a.las").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"a\.las: extra-bytes dimension 'height' has the "
                                           r"scale \[0\.0\]; a scale must be finite and "
                                           r"non-zero"):
        convert(tmp_path / "a.las", tmp_path / "ds", progress=False)


def test_cli_refuses_a_count_smaller_than_the_data_in_one_line(tmp_path):
    import subprocess
    import sys

    _patched(tmp_path, _points(300), **{"107": struct.pack("<I", 100)})
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", "a.las", "-o", "out",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        "gds-stream: error: a.las: the header counts 100 points, but its point data (bytes "
        "227..10427, up to the end of the file) holds 300 records of 34 bytes; the point count "
        "is wrong or the file is damaged"]
    assert no_output_left(tmp_path, "out")


# -- the VLR chain: it must end by the point data, and hold as many VLRs as counted ----------
def _vlr_file(tmp_path, suffix=".las"):
    """A LAS 1.4 file with two VLRs (extra bytes, then a user VLR) and its raw bytes."""
    las = _points(300, "1.4", 6, extra=[("amp", "f4")])
    las.header.vlrs.append(laspy.VLR("gds-test", 7, "a user VLR", b"\x01" * 40))
    las.write(tmp_path / f"src{suffix}")
    data = bytearray((tmp_path / f"src{suffix}").read_bytes())
    return data, struct.unpack_from("<H", data, 94)[0], struct.unpack_from("<II", data, 96)


def _refused_with(tmp_path, data, message, suffix=".las"):
    (tmp_path / f"a{suffix}").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=message) as info:
        convert(tmp_path / f"a{suffix}", tmp_path / "ds", progress=False)
    assert f"a{suffix}: " in str(info.value)
    assert no_output_left(tmp_path)


@pytest.mark.parametrize("patch, message", [
    ("length +100", r"VLR 0 of 2 at byte \d+ \(\d+ bytes\) ends at byte \d+, past the start of "
                    r"the point data"),
    ("length 0", r"the extra-bytes VLR \(VLR 0 of 2 at byte \d+\) holds 0 bytes, not a whole "
                 r"number of 192-byte field descriptions"),
    ("count 0", r"the header counts 0 VLRs, but another one \('LASF_Spec'\) lies at byte 375"),
    ("count 1", r"the header counts 1 VLRs, but another one \('gds-test'\) lies at byte"),
    ("points 20 early", r"VLR 1 of 2 at byte \d+ \(\d+ bytes\) ends at byte \d+, past the start"),
    ("header size 400", r"is not a VLR header|ends at byte"),
])
def test_a_damaged_vlr_chain_is_refused(tmp_path, patch, message):
    """laspy skips a VLR it cannot place and reads on: the CRS and the extra-bytes fields were
    lost, or the VLRs converted as points, without a word."""
    data, header_size, (offset, count) = _vlr_file(tmp_path)
    length_at = header_size + 20
    length = struct.unpack_from("<H", data, length_at)[0]
    if patch == "length +100":
        struct.pack_into("<H", data, length_at, length + 100)
    elif patch == "length 0":
        struct.pack_into("<H", data, length_at, 0)
    elif patch.startswith("count"):
        struct.pack_into("<I", data, 100, int(patch.split()[1]))
    elif patch == "points 20 early":
        struct.pack_into("<I", data, 96, offset - 20)
    else:
        struct.pack_into("<H", data, 94, 400)
    _refused_with(tmp_path, data, message)


def test_padding_between_the_vlrs_and_the_points_is_accepted(tmp_path):
    data, _, (offset, _) = _vlr_file(tmp_path)
    padded = data[:offset] + bytes(200) + data[offset:]
    struct.pack_into("<I", padded, 96, offset + 200)
    (tmp_path / "a.las").write_bytes(bytes(padded))
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    src = laspy.read(tmp_path / "src.las")
    assert ds.num_points == 300 and "amp" in ds.schema
    assert np.array_equal(ds.read("amp"), np.asarray(src["amp"]))


@pytest.mark.parametrize("count", [0, 60_000, 100_000])
def test_a_laz_count_its_chunk_table_disproves_is_refused(tmp_path, count):
    """3 chunks of 50,000 points hold over 100,000: a header promising fewer converted them
    silently (an empty dataset for a count of 0)."""
    path = _patched(tmp_path, _points(123_457), ".laz", **{"107": struct.pack("<I", count)})
    with pytest.raises(DatasetError, match=rf"a\.laz: the header counts {count} points, but its "
                                           rf"LAZ chunk table counts 3 chunks of 50000 points, "
                                           rf"so the file holds at least 100001"):
        convert(path, tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


def test_auto_converts_again_as_float64_when_later_points_leave_stale_header_bounds(tmp_path,
                                                                                    caplog):
    """Header bounds that hold the first points (the sample auto checks) but not later ones:
    auto had decided float32 on them and refused mid-file with "pass --xyz float64"; it now
    converts again as float64, with a warning. ``--xyz float32`` still refuses."""
    hdr = laspy.LasHeader(point_format=1, version="1.2")
    hdr.scales = np.full(3, 0.001)
    hdr.offsets = np.array([500_000.0, 4_000_000.0, 0.0])
    las = laspy.LasData(hdr)
    rng = np.random.default_rng(5)
    n = 20_000
    x = 500_000 + rng.random(n) * 1000
    x[12_000:] += 300_000  # a second strip 300 km east, after the sample
    las.x, las.y, las.z = x, 4_000_000 + rng.random(n) * 1000, 100 + rng.random(n) * 50
    las.write(tmp_path / "src.las")
    data = bytearray((tmp_path / "src.las").read_bytes())
    struct.pack_into("<d", data, 179, 501_000.0)  # max x: the first strip's only
    (tmp_path / "a.las").write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.schema["x"].dtype == np.float64
    src = laspy.read(tmp_path / "a.las")
    for c in "xyz":
        assert np.array_equal(ds.read(c), np.asarray(src[c])), c
    assert "converting again with x, y, z as absolute float64" in caplog.text
    with pytest.raises(ConversionError, match="pass --xyz float64"):
        convert(tmp_path / "a.las", tmp_path / "ds32", xyz="float32", progress=False)
    assert no_output_left(tmp_path, "ds32")


def test_a_laz_count_past_its_points_says_which_points_failed(tmp_path):
    """lazrs runs out of data in the last chunk: the message said "after the first 0 points"
    (whole batches are read at once); it names the points being read and the count."""
    path = _patched(tmp_path, _points(3000), ".laz", **{"107": struct.pack("<I", 3001)})
    with pytest.raises(DatasetError, match=r"a\.laz: reading the points \(points 0\.\.3,000 of "
                                           r"the 3,001 the header promises\) failed .*its header "
                                           r"counts more points than it holds"):
        convert(path, tmp_path / "ds", progress=False)
    assert no_output_left(tmp_path)


# -- variable-size LAZ chunks (COPC), and the files lazrs writes without points ---------------
def _variable_laz(path, chunks=(30_000, 50_000, 20_000), table=None):
    """A LAZ of ``sum(chunks)`` points in chunks of those sizes (a variable-size chunk table, as
    COPC writes), its table replaced by ``table`` [(points, bytes), ...] when given."""
    import io

    import lazrs

    n = sum(chunks)
    las = _points(n)
    out = io.BytesIO()
    las.write(out, do_compress=True, laz_backend=laspy.LazBackend.Lazrs)
    data = bytearray(out.getvalue())
    header_size, = struct.unpack_from("<H", data, 94)
    points_at, n_vlrs = struct.unpack_from("<II", data, 96)
    vlr = lazrs.LazVlr.new_for_compression(las.header.point_format.id, 0, True)
    record = bytes(vlr.record_data())
    at = header_size
    for _ in range(n_vlrs):  # the LASzip VLR, now saying "variable chunks"
        length, = struct.unpack_from("<H", data, at + 20)
        if data[at + 2:at + 18].rstrip(b"\0") == b"laszip encoded":
            assert length == len(record)
            data[at + 54:at + 54 + length] = record
        at += 54 + length
    raw = las.points.array.tobytes()
    size = las.points.array.dtype.itemsize
    buf = io.BytesIO()
    buf.write(bytes(data[:points_at]))
    comp = lazrs.LasZipCompressor(buf, vlr)
    parts, s = [], 0
    for c in chunks:
        parts.append(raw[s * size:(s + c) * size])
        s += c
    comp.compress_chunks(parts)
    comp.done()
    out_bytes = bytearray(buf.getvalue())
    if table is not None:
        at, = struct.unpack_from("<q", out_bytes, points_at)
        del out_bytes[at:]
        tb = io.BytesIO()
        lazrs.write_chunk_table(tb, table, vlr)
        out_bytes += tb.getvalue()
    path.write_bytes(bytes(out_bytes))
    return las


def test_variable_size_chunks_convert_whole(tmp_path):
    las = _variable_laz(tmp_path / "a.laz")
    ds = convert(tmp_path / "a.laz", tmp_path / "ds", progress=False, xyz="float64")
    assert ds.num_points == 100_000
    assert np.array_equal(ds.read("x"), np.asarray(las.x))
    assert np.array_equal(ds.read("intensity"), np.asarray(las.intensity))


def _table(tmp_path):
    """The (points, bytes) entries of the chunk table of ``_variable_laz``'s file."""
    import lazrs

    path = tmp_path / "ok.laz"
    _variable_laz(path)
    data = path.read_bytes()
    points_at, = struct.unpack_from("<I", data, 96)
    at = data.index(b"laszip encoded") - 2
    vlr = lazrs.LazVlr(data[at + 54:at + 54 + struct.unpack_from("<H", data, at + 20)[0]])
    with open(path, "rb") as f:
        f.seek(points_at)
        return [(int(p), int(b)) for p, b in lazrs.read_chunk_table(f, vlr)]


@pytest.mark.parametrize("edit, message", [
    # lazrs allocates a chunk's points before decoding them: 2³⁰ of them aborted the process
    (lambda t: [(2**30, t[0][1])] + t[1:], r"LAZ chunk 0 of \d+ claims 1073741824 points"),
    (lambda t: [(t[0][0] - 10_000, t[0][1])] + t[1:],
     r"the header counts 100000 points, but the LAZ chunk table.s \d+ chunks hold 90000"),
])
def test_variable_size_chunk_tables_are_checked_before_lazrs(tmp_path, edit, message):
    """(In a subprocess under a 4 GiB address-space limit, so a regression cannot take the
    machine's memory.)"""
    _variable_laz(tmp_path / "a.laz", table=edit(_table(tmp_path)))

    err = _refused_under_4_gib(tmp_path)
    assert "a.laz: " in err and re.search(message, err), err
    assert no_output_left(tmp_path, "out")


@pytest.mark.parametrize("backend", ["Lazrs", "LazrsParallel"])
@pytest.mark.parametrize("version, point_format", [("1.2", 3), ("1.4", 6)])
def test_a_laz_of_no_points_converts_whatever_lazrs_wrote(tmp_path, backend, version,
                                                          point_format):
    """lazrs's single-threaded writer leaves one empty chunk in a file of no points, its
    parallel one none: both are valid."""
    las = laspy.LasData(laspy.LasHeader(version=version, point_format=point_format))
    las.write(tmp_path / "a.laz", laz_backend=getattr(laspy.LazBackend, backend))
    ds = convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    assert ds.num_points == 0


@pytest.mark.parametrize("user", ["", " "])
def test_a_vlr_with_an_empty_user_id_is_accepted(tmp_path, user):
    las = _points(50)
    las.vlrs.append(laspy.VLR(user, 1, "desc", b"abc"))
    las.write(tmp_path / "a.las")
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.num_points == 50


def _crs_file(tmp_path, vlr):
    las = _points(50)
    las.vlrs.append(vlr)
    las.write(tmp_path / "src.las")
    return bytearray((tmp_path / "src.las").read_bytes())


def _vlr_length_at(data, user: bytes, record: int) -> int:
    header_size, = struct.unpack_from("<H", data, 94)
    _, n = struct.unpack_from("<II", data, 96)
    at = header_size
    for _ in range(n):
        length, = struct.unpack_from("<H", data, at + 20)
        if (data[at + 2:at + 18].rstrip(b"\0"), struct.unpack_from("<H", data, at + 18)[0]) \
                == (user, record):
            return at + 20
        at += 54 + length
    raise AssertionError("no such VLR")


WKT = ('PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",'
       '6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
       'PROJECTION["Transverse_Mercator"],PARAMETER["central_meridian",15],UNIT["metre",1],'
       'AUTHORITY["EPSG","32633"]]')


@pytest.mark.parametrize("damage, message", [
    ("extra bytes 191", r"the extra-bytes VLR \(VLR 0 of 1 at byte \d+\) holds 191 bytes"),
    ("wkt cut", r"the OGC WKT CRS \(VLR \d of \d at byte \d+, \d+ bytes\) is cut short"),
    ("wkt not utf-8", r"the OGC WKT CRS \(VLR \d of \d at byte \d+\) is not UTF-8 text"),
    ("geokeys short", r"the GeoTIFF key directory \(VLR \d of \d at byte \d+\) holds 16 bytes "
                      r"for 5 keys \(needs 48\)"),
])
def test_damaged_vlrs_laspy_would_drop_are_refused(tmp_path, damage, message):
    """laspy drops an extra-bytes, WKT or GeoTIFF-keys VLR it cannot parse with only a warning
    (the extra fields then convert as one unnamed byte array, the CRS is lost or cut short); a
    length cut to what still fits before the points got past the VLR chain's checks."""
    if damage == "extra bytes 191":
        las = _points(50, extra=[("amp", "f4")])
        las.write(tmp_path / "src.las")
        data = bytearray((tmp_path / "src.las").read_bytes())
        struct.pack_into("<H", data, _vlr_length_at(data, b"LASF_Spec", 4), 191)
    elif damage.startswith("wkt"):
        from laspy.vlrs.known import WktCoordinateSystemVlr

        data = _crs_file(tmp_path, WktCoordinateSystemVlr(WKT))
        at = _vlr_length_at(data, b"LASF_Projection", 2112)
        length, = struct.unpack_from("<H", data, at)
        if damage == "wkt cut":
            struct.pack_into("<H", data, at, length - 60)
        else:
            data[at + 34 + 5] = 0xFF  # a byte no UTF-8 text holds
    else:
        from laspy.vlrs.known import GeoKeyDirectoryVlr

        vlr = GeoKeyDirectoryVlr()
        data = _crs_file(tmp_path, vlr)
        at = _vlr_length_at(data, b"LASF_Projection", 34735)
        struct.pack_into("<H", data, at, 16)
        struct.pack_into("<H", data, at + 34 + 6, 5)  # five keys, in 16 bytes
    _refused_with(tmp_path, data, message)


def test_a_whole_wkt_crs_is_accepted(tmp_path):
    from laspy.vlrs.known import WktCoordinateSystemVlr

    data = _crs_file(tmp_path, WktCoordinateSystemVlr(WKT))
    (tmp_path / "a.las").write_bytes(bytes(data))
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.num_points == 50 and ds.sources[0]["crs_wkt"] == WKT


def test_an_extra_bytes_type_laspy_cannot_size_is_a_dataset_error(tmp_path):
    las = _points(50, "1.4", 6, extra=[("amp", "f4")])
    las.write(tmp_path / "src.las")
    data = bytearray((tmp_path / "src.las").read_bytes())
    at = _vlr_length_at(data, b"LASF_Spec", 4) + 34  # the first description
    data[at + 2] = 0  # data type 0 ("undocumented bytes") ...
    data[at + 3] = 0  # ... with no size in its options: laspy divides by zero
    _refused_with(tmp_path, data, r"reading the point format's dimensions failed "
                                  r"\(ZeroDivisionError")


def test_an_unreadable_file_is_a_dataset_error_naming_it(tmp_path, monkeypatch):
    from gds_stream.convert import las as las_module

    (tmp_path / "a.las").write_bytes(b"LASF" + bytes(400))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(las_module, "is_las", lambda path: False)
    monkeypatch.setattr(las_module, "open", refuse, raising=False)
    with pytest.raises(DatasetError, match=r"a\.las: cannot read the file \(Permission denied\)"):
        convert(tmp_path / "a.las", tmp_path / "ds", progress=False, format="las")
    assert no_output_left(tmp_path)


def test_a_georeferenced_file_of_no_points_converts_without_a_warning(tmp_path, caplog):
    hdr = laspy.LasHeader(point_format=3, version="1.2")
    hdr.offsets = np.array([500_000.0, 4_000_000.0, 0.0])
    laspy.LasData(hdr).write(tmp_path / "a.las")
    with caplog.at_level("WARNING"):
        ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False)
    assert ds.num_points == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_a_pass_over_every_point_before_writing_shows_progress(tmp_path, capsys):
    """Header bounds left at zero: every point is read for its bounds before anything is
    written, with a bar of its own."""
    las = _points(5000)
    las.header.offsets = np.array([500_000.0, 4_000_000.0, 0.0])
    las.x = las.x + 500_000
    las.y = las.y + 4_000_000
    las.write(tmp_path / "src.las")
    data = bytearray((tmp_path / "src.las").read_bytes())
    data[179:227] = bytes(48)  # max/min x, y, z
    (tmp_path / "a.las").write_bytes(bytes(data))
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=True)
    assert ds.num_points == 5000
    assert "bounds a.las" in capsys.readouterr().err
