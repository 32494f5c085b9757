"""Spatial chunking of a scan (``gds_stream/convert/chunks.py``): the same multiset of rows,
every point inside its chunk's cell, cells along a Morton curve, chunks recorded in the
manifest, bounded passes, and clear errors."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from gds_stream.errors import ConversionError
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset

chunks = importlib.import_module("gds_stream.convert.chunks")

SCHEMA = [FieldSpec("x", np.dtype("<f4")), FieldSpec("y", np.dtype("<f4")),
          FieldSpec("z", np.dtype("<f8")), FieldSpec("label", np.dtype("u1")),
          FieldSpec("rgb", np.dtype("<u2"), 3)]


def _scan(n: int, seed: int, extent: float = 100.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": (rng.random(n) * extent - extent / 3).astype(np.float32),
        "y": (rng.random(n) * extent).astype(np.float32),
        "z": rng.random(n) * extent / 10,
        "label": rng.integers(0, 255, n, dtype=np.uint8),
        "rgb": rng.integers(0, 65535, (n, 3), dtype=np.uint16),
    }


def _convert(tmp_path, scans, size, dims, pieces=3):
    out = tmp_path / "ds"
    with DatasetWriter(out, SCHEMA, chunk_size=size, chunk_dims=dims) as w:
        for i, cols in enumerate(scans):
            with chunks.ScanChunker(SCHEMA, size, dims, tmp_path, f"scan{i}") as ch:
                n = len(cols["x"])
                for part in np.array_split(np.arange(n), pieces):
                    ch.append({k: v[part] for k, v in cols.items()})
                ch.write_to(w)
            w.end_scan(f"scan{i}")
    return open_dataset(out)


def _rows(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Rows as a sortable structured array (bit patterns of every field)."""
    parts = [cols["x"].view(np.uint32), cols["y"].view(np.uint32), cols["z"].view(np.uint64),
             cols["label"].astype(np.uint64), *[cols["rgb"][:, j].astype(np.uint64)
                                                 for j in range(3)]]
    return np.sort(np.rec.fromarrays(parts))


@pytest.mark.parametrize("bucket_bytes", [64 << 20, 20_000])
@pytest.mark.parametrize("dims", [2, 3])
def test_chunked_scans_keep_every_row_and_each_point_lies_in_its_cell(tmp_path, monkeypatch,
                                                                     dims, bucket_bytes):
    monkeypatch.setattr(chunks, "PASS_ROWS", 700)  # several slices per pass
    monkeypatch.setattr(chunks, "BUCKET_BYTES", bucket_bytes)  # one bucket, or many
    scans = [_scan(5000, 1), _scan(0, 2), _scan(1234, 3)]
    size = 12.5
    ds = _convert(tmp_path, scans, size, dims)
    assert ds.num_points == 6234 and ds.num_scans == 3
    assert ds.chunk_size == size and ds.chunk_dims == dims
    offs = ds.chunk_offsets
    assert offs[0] == 0 and offs[-1] == ds.num_points and np.all(np.diff(offs) >= 1)
    got = {k: ds.read(k) for k in ds.schema}
    for s, cols in enumerate(scans):
        a, b = ds.scan_offsets[s], ds.scan_offsets[s + 1]
        assert np.array_equal(_rows({k: v[a:b] for k, v in got.items()}), _rows(cols))
        mine = np.flatnonzero(ds.chunk_scan == s)
        if b > a:
            assert offs[mine[0]] == a and offs[mine[-1] + 1] == b
    xyz = np.stack([got["x"].astype(np.float64), got["y"].astype(np.float64), got["z"]], 1)
    for c in range(ds.num_chunks):
        p = xyz[offs[c]:offs[c + 1]]
        cell = np.floor(p[:, :dims] / size).astype(np.int64)
        assert (cell == ds.chunk_cells[c][:dims]).all(), f"chunk {c} holds a point of another cell"
        assert np.array_equal(ds.chunk_bounds[c], np.concatenate([p.min(0), p.max(0)]))
    # one chunk per non-empty cell of each scan
    for s, cols in enumerate(scans):
        if len(cols["x"]):
            v = np.stack([cols[a].astype(np.float64) for a in "xyz"[:dims]], 1)
            cells = np.unique(np.floor(v / size).astype(np.int64), axis=0)
            assert (ds.chunk_scan == s).sum() == len(cells)


def test_cells_follow_the_morton_curve(tmp_path):
    ds = _convert(tmp_path, [_scan(3000, 5)], 10.0, 2)
    cells = ds.chunk_cells[:, :2]
    codes = chunks.morton(cells - cells.min(0))
    assert np.all(np.diff(codes.astype(np.int64)) > 0)


def test_morton_interleaves_bits():
    assert chunks.morton(np.array([[1, 0], [0, 1], [1, 1], [2, 0]])).tolist() == [1, 2, 3, 4]
    assert chunks.morton(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])).tolist() == \
        [1, 2, 4, 7]
    big = (1 << 21) - 1
    assert chunks.morton(np.array([[big, big, big]])).tolist() == [(1 << 63) - 1]


def test_points_inside_a_chunk_are_in_curve_order(tmp_path):
    ds = _convert(tmp_path, [_scan(4000, 7, extent=30.0)], 20.0, 2)
    assert ds.num_chunks > 1
    xy = np.stack([ds.read("x").astype(np.float64), ds.read("y").astype(np.float64)], 1)
    for c in range(ds.num_chunks):
        a, b = ds.chunk_offsets[c], ds.chunk_offsets[c + 1]
        base = ds.chunk_cells[c][:2] * 20.0
        fine = np.clip(((xy[a:b] - base) / 20.0 * chunks.FINE).astype(np.int64), 0,
                       chunks.FINE - 1)
        assert np.all(np.diff(chunks.morton(fine).astype(np.int64)) >= 0)


@pytest.mark.parametrize("size", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_chunk_size(tmp_path, size):
    with pytest.raises(ConversionError, match="chunk-size"):
        chunks.ScanChunker(SCHEMA, size, 2, tmp_path, "in.ply")


def test_schema_without_xyz_and_non_finite_points(tmp_path):
    with pytest.raises(ConversionError, match="no z"):
        chunks.ScanChunker(SCHEMA[:2], 1.0, 2, tmp_path, "in.ply")
    cols = _scan(10, 0)
    cols["y"][4] = np.nan
    with chunks.ScanChunker(SCHEMA, 1.0, 2, tmp_path, "in.ply") as ch:
        with pytest.raises(ConversionError, match="in.ply: point 4 has a non-finite y"):
            ch.append(cols)  # checked by a worker: raised by a later call at the latest
            ch.write_to(None)
    assert not list(tmp_path.glob(".chunking-*")), "temporary files left behind"


def test_grid_too_fine_is_refused_while_reading(tmp_path):
    """In pass 1, by the slice that makes the grid too large: nothing is sorted first."""
    cols = _scan(10, 0)
    cols["x"][0], cols["x"][1] = -3e9, 3e9
    with chunks.ScanChunker(SCHEMA, 1.0, 3, tmp_path, "in.ply") as ch:
        with pytest.raises(ConversionError, match="in.ply: .* more than the chunk grid orders "
                                                  r"\(2\*\*21\); use a larger --chunk-size"):
            ch.append(cols)
            ch._merge(*ch._pending.popleft().result())  # as the next append does
    with chunks.ScanChunker(SCHEMA, 1.0, 3, tmp_path, "in.ply") as ch:
        ch.append({k: v[:1] for k, v in cols.items()})  # -3e9 alone is fine
        ch.append({k: v[1:] for k, v in cols.items()})  # 3e9 in a later slice is not
        with pytest.raises(ConversionError, match="more than the chunk grid orders"):
            for future in list(ch._pending):
                ch._merge(*future.result())


# -- through convert() and the CLI ------------------------------------------------------------
def test_convert_with_chunks_and_point_ids_recovers_the_input(tmp_path, make_ply):
    from gds_stream import convert

    props = (("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "u2"))
    cols = [make_ply(tmp_path / f"t{i}.ply", n, properties=props, seed=i)
            for i, n in enumerate((3000, 1700))]
    ds = convert([tmp_path / "t0.ply", tmp_path / "t1.ply"], tmp_path / "ds", progress=False,
                 chunk_size=0.5, chunk_dims=3, point_ids=True)
    assert ds.num_chunks > 2 and ds.chunk_dims == 3 and "point_id" in ds.schema
    assert ds.schema["point_id"].dtype == np.dtype("<u8")
    for s, want in enumerate(cols):
        a, b = ds.scan_offsets[s], ds.scan_offsets[s + 1]
        pid = ds.read("point_id", a, b).astype(np.int64)
        assert sorted(pid) == list(range(b - a))
        for k in ("x", "y", "z", "intensity"):
            got = np.empty_like(want[k])
            got[pid] = ds.read(k, a, b)
            assert np.array_equal(got.view(np.uint8), want[k].view(np.uint8))


def test_point_ids_without_chunks_are_file_order(tmp_path, make_ply):
    from gds_stream import convert

    make_ply(tmp_path / "a.ply", 500)
    ds = convert(tmp_path / "a.ply", tmp_path / "ds", progress=False, point_ids=True)
    assert ds.num_chunks == 0
    assert np.array_equal(ds.read("point_id"), np.arange(500, dtype=np.uint64))


def _cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gds_stream", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_chunked_convert_and_info(tmp_path, make_ply):
    make_ply(tmp_path / "a.ply", 4000)
    r = _cli("convert", "a.ply", "-o", "ds", "--chunk-size", "0.75", "--no-progress",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "spatial chunks" in r.stdout
    r = _cli("info", "ds", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("chunks"))
    assert "2-D cells of 0.75" in line and "median" in line


@pytest.mark.parametrize("args, message", [
    (["--chunk-size", "0"], "--chunk-size must be a finite number > 0"),
    (["--chunk-size", "-2"], "--chunk-size must be a finite number > 0"),
    (["--chunk-size", "nan"], "--chunk-size must be a finite number > 0"),
    (["--chunk-size", "1", "--fields", "x,y,intensity"], "needs fields x, y and z"),
])
def test_cli_bad_chunk_options(tmp_path, make_ply, args, message):
    make_ply(tmp_path / "a.ply", 100)
    r = _cli("convert", "a.ply", "-o", "ds", "--no-progress", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_non_finite_coordinates(tmp_path):
    from conftest import _make_raw

    cols = _make_raw(tmp_path / "a.bin", 50, ["x", "y", "z"])
    arr = np.stack([cols[k] for k in "xyz"], 1)
    arr[7, 2] = np.inf
    arr.astype(np.float32).tofile(tmp_path / "a.bin")
    r = _cli("convert", "a.bin", "-o", "ds", "--raw-fields", "x,y,z", "--chunk-size", "1",
             "--chunk-dims", "3", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2
    assert "point 7 has a non-finite z" in r.stderr
    assert not (tmp_path / "ds").exists()


def test_a_cell_larger_than_a_bucket_keeps_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks, "BUCKET_BYTES", 10_000)  # ~250 records
    cols = _scan(3000, 9, extent=5.0)
    cols["x"] = np.abs(cols["x"])
    ds = _convert(tmp_path, [cols], 100.0, 2)
    assert ds.num_chunks == 1
    assert np.array_equal(ds.read("label"), cols["label"])
    xyz = np.stack([cols["x"].astype(np.float64), cols["y"].astype(np.float64), cols["z"]], 1)
    assert np.array_equal(ds.chunk_bounds[0], np.concatenate([xyz.min(0), xyz.max(0)]))


def test_chunked_conversion_memory_is_bounded_by_its_slices_not_the_scan(tmp_path):
    """In a fresh process, with small slices: converting a 64 MB scan into chunks grows the peak
    RSS by less than the scan (measured 42 MiB: slices, sort buffers, the cell table); memory
    maps of the 128 MB of temporary records, whose touched pages count in the RSS, would add
    them all (a 2 GB scan once peaked at 6 GB that way)."""
    import json
    import subprocess
    import sys

    n = 4_000_000
    rng = np.random.default_rng(0)
    arr = rng.random((n, 4), dtype=np.float32) * 100
    arr.tofile(tmp_path / "scan.bin")
    del arr
    code = f"""
import importlib, json, sys
common = importlib.import_module("gds_stream.convert.common")
chunks = importlib.import_module("gds_stream.convert.chunks")
common.CHUNK_ROWS = chunks.PASS_ROWS = 1 << 18
chunks.BUCKET_BYTES = 4 << 20
from gds_stream import convert
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
base = kib("VmRSS")
ds = convert({str(tmp_path / "scan.bin")!r}, {str(tmp_path / "ds")!r}, raw_fields=["x", "y", "z", "i"],
             chunk_size=2.0, progress=False)
print(json.dumps({{"growth": (kib("VmHWM") - base) * 1024, "chunks": ds.num_chunks}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["chunks"] == 2500
    assert m["growth"] < n * 16, f"peak RSS grew {m['growth'] / 2**20:.0f} MiB"


def test_chunks_too_fine_for_a_readable_manifest_are_refused_before_publishing(tmp_path,
                                                                            monkeypatch):
    """The writer checks the manifest against the reader's bound before publishing, so a
    conversion never leaves a dataset that cannot be opened."""
    _manifest = importlib.import_module("gds_stream._manifest")
    writer = importlib.import_module("gds_stream.writer")
    monkeypatch.setattr(writer, "manifest_cap", lambda d: 4096)  # as if the bound were tiny
    with pytest.raises(ConversionError, match=r"spatial chunks for 2,000 points are too fine"):
        _convert(tmp_path, [_scan(2000, 1)], 5.0, 2)
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    assert _manifest.manifest_cap(tmp_path) >= _manifest.MANIFEST_BASE_BYTES


# -- parallel passes, resources, refusals (issues: speed, full disk, too many chunks) ----------
@pytest.mark.parametrize("workers", [1, 3])
def test_output_does_not_depend_on_the_number_of_workers(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(chunks, "PASS_ROWS", 900)
    monkeypatch.setattr(chunks, "BUCKET_BYTES", 30_000)  # many buckets: passes 2 and 3 run
    scans = [_scan(6000, 11), _scan(2500, 12, extent=40.0)]
    files = {}
    for w in (2, workers):
        monkeypatch.setattr(chunks, "WORKERS", w)
        ds = _convert(tmp_path / f"w{w}", scans, 7.5, 2)
        files[w] = {k: ds.read(k).tobytes() for k in ds.schema}
        files[w]["chunks"] = (ds.chunk_offsets.tobytes(), ds.chunk_cells.tobytes(),
                              ds.chunk_bounds.tobytes())
    assert files[workers] == files[2]


def test_a_full_disk_during_the_sort_names_the_temporary_file_and_the_input(tmp_path, make_ply,
                                                                           monkeypatch):
    from gds_stream import convert

    io = importlib.import_module("gds_stream.convert._chunkio")
    make_ply(tmp_path / "a.ply", 3000)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "pwritev", full)
    with pytest.raises(ConversionError) as err:
        convert(tmp_path / "a.ply", tmp_path / "ds", progress=False, chunk_size=1.0)
    msg = str(err.value)
    assert ".chunking-" in msg and "rows: writing" in msg and "No space left on device" in msg
    assert f"while sorting {tmp_path / 'a.ply'} into spatial chunks" in msg
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_manifest_bytes_per_chunk_is_a_lower_bound_of_the_writers_manifest(tmp_path):
    """The early refusal relies on it: a chunk never takes fewer bytes in the manifest."""
    size = {}
    for k, cell, bound in ((1, 0, 0.0), (201, 0, 0.0), (300, -12345, 489123.4375)):
        out = tmp_path / f"m{k}"
        with DatasetWriter(out, SCHEMA, chunk_size=1.0, chunk_dims=2) as w:
            w.append(_scan(k, 0))
            for _ in range(k):
                w.add_chunk(1, cell=(cell, cell, 0), bounds=[bound] * 6)
            w.end_scan("s")
        size[k] = (out / "manifest.json").stat().st_size
        assert size[k] >= k * chunks.MANIFEST_BYTES_PER_CHUNK
    assert (size[201] - size[1]) / 200 >= chunks.MANIFEST_BYTES_PER_CHUNK


def test_too_many_chunks_are_refused_while_reading_with_bounded_memory(tmp_path):
    """Every point its own cell: refused by the first slices that show it, not after sorting
    (before: 3.8 GB for 2 M points, then the writer's refusal after 37 s)."""
    import subprocess
    import sys

    n = 2_000_000
    rng = np.random.default_rng(0)
    (rng.random((n, 3), dtype=np.float32) * 1000).tofile(tmp_path / "scan.bin")
    code = f"""
import resource, sys
from gds_stream.cli import main
rc = main(["convert", {str(tmp_path / "scan.bin")!r}, "-o", {str(tmp_path / "ds")!r},
           "--raw-fields", "x,y,z", "--chunk-size", "0.001", "--no-progress"])
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(rc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "scan.bin: --chunk-size 0.001 makes at least" in r.stderr
    assert "more than a reader accepts for this dataset" in r.stderr
    first = int(r.stderr.split("chunks of its first ")[1].split(" points")[0].replace(",", ""))
    assert first < n, "refused only after reading every point"
    peak = int(r.stdout.split("peak ")[1])
    assert peak < 600 << 20, f"peak RSS {peak / 2**20:.0f} MiB"
    assert not (tmp_path / "ds").exists()


def test_cli_non_finite_z_with_2d_chunks_names_the_input_point(tmp_path):
    from conftest import _make_raw

    cols = _make_raw(tmp_path / "a.bin", 50, ["x", "y", "z"])
    arr = np.stack([cols[k] for k in "xyz"], 1)
    arr[9, 2] = np.nan
    arr.astype(np.float32).tofile(tmp_path / "a.bin")
    r = _cli("convert", "a.bin", "-o", "ds", "--raw-fields", "x,y,z", "--chunk-size", "1",
             "--chunk-dims", "2", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gds-stream: error: a.bin: point 9 has a non-finite z (nan); spatial chunks need finite "
        "coordinates"]


@pytest.mark.parametrize("size", ["5e-324", "1e-300", "1e-12"])
def test_cli_absurdly_small_chunk_size_is_one_line(tmp_path, make_ply, size):
    make_ply(tmp_path / "a.ply", 2000)
    r = _cli("convert", "a.ply", "-o", "ds", "--chunk-size", size, "--no-progress",
             cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Warning" not in r.stderr and "use a larger --chunk-size" in r.stderr
    assert r.stderr.startswith("gds-stream: error: a.ply: ")
    assert not (tmp_path / "ds").exists()


def test_progress_shows_each_phase_with_its_own_bar(tmp_path, make_ply, monkeypatch, capfd):
    from gds_stream import convert

    monkeypatch.setattr(chunks, "BUCKET_BYTES", 20_000)  # several buckets: pass 2 runs
    make_ply(tmp_path / "a.ply", 3000)
    make_ply(tmp_path / "b.ply", 2000, seed=1)
    convert([tmp_path / "a.ply", tmp_path / "b.ply"], tmp_path / "ds", progress=True,
            chunk_size=0.2)
    err = capfd.readouterr().err
    finals = {}
    for piece in err.replace("\r", "\n").splitlines():
        name = piece.split(":")[0].strip()
        if name in ("read", "sort", "write") and "%" in piece:
            finals[name] = piece
    assert set(finals) == {"read", "sort", "write"}, err[-2000:]
    assert all("100%" in v for v in finals.values()), finals
    assert "5.00k/5.00k" in finals["sort"] and "5.00k/5.00k" in finals["write"]
