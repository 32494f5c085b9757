"""A dataset is one snapshot: a reader whose dataset is replaced (``convert --overwrite``) keeps
reading the data it opened, consistently, or gets a DatasetError — never the old manifest with
the new bytes. Replacements here are real ones: the same points converted with another chunk
size, so the old manifest's chunk bounds no longer fit the new files' point order."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gds_stream import open_loader
from gds_stream.convert import convert
from gds_stream.errors import DatasetError
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset
from test_gds import simulated_gpu  # noqa: F401 - the simulated KvikIO and CUDA fixture
from helpers import fds_under

N = 20_000
SIZES = (1.0, 2.5)  # ~100 and ~16 chunks over a 10 × 10 square


def _points(path: Path) -> Path:
    rng = np.random.default_rng(7)
    xyz = rng.uniform(0, 10, size=(N, 3)).astype("<f4")
    xyz.tofile(path)
    return path


def _convert(src: Path, out: Path, size: float, overwrite: bool = False) -> None:
    convert(src, out, format="raw", raw_fields=["x", "y", "z"], chunk_size=size,
            overwrite=overwrite, progress=False).close()


def _outside(xyz: np.ndarray, chunk_of_point: np.ndarray, bounds: np.ndarray) -> int:
    """How many points lie outside the bounds the manifest gives their chunk."""
    b = bounds[chunk_of_point]
    return int(np.count_nonzero(np.any((xyz < b[:, :3]) | (xyz > b[:, 3:]), axis=1)))


def _dataset_outside(ds) -> int:
    xyz = np.stack([ds.read(k) for k in "xyz"], axis=1)
    chunk = np.repeat(np.arange(ds.num_chunks), np.diff(ds.chunk_offsets))
    return _outside(xyz, chunk, ds.chunk_bounds)


def _epoch_outside(ld) -> tuple[int, int]:
    """(points outside their chunk's bounds, points) over one epoch of a chunk loader."""
    bounds = ld.dataset.chunk_bounds
    bad = seen = 0
    for b in ld:
        xyz = np.stack([b[k].numpy() for k in "xyz"], axis=1)
        sizes = np.diff(np.concatenate([[0], b["offset"].numpy()]))
        bad += _outside(xyz, np.repeat(b["chunk"].numpy(), sizes), bounds)
        seen += len(xyz)
    return bad, seen


def test_dataset_replaced_after_open_reads_its_own_snapshot(tmp_path):
    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    ds = open_dataset(out)
    old = {k: ds.read(k) for k in "xyz"}
    assert _dataset_outside(ds) == 0
    _convert(src, out, SIZES[1], overwrite=True)  # same points, another order
    with open_dataset(out) as new:
        assert new.num_chunks != ds.num_chunks and _dataset_outside(new) == 0
        assert not np.array_equal(new.read("x"), old["x"])
    # the old Dataset: reads, verify and loaders all see the data it was opened with
    assert all(np.array_equal(ds.read(k), v) for k, v in old.items())
    assert _dataset_outside(ds) == 0
    assert ds.verify() == []
    for shuffle in (False, True):
        with open_loader(ds, backend="fallback", device="cpu", batch_chunks=7,
                         shuffle=shuffle, verify_reads=True) as ld:
            assert _epoch_outside(ld) == (0, N)
    ds.close()
    with pytest.raises(DatasetError, match=r"x\.bin: the dataset is closed"):
        ds.read("x")


def test_loader_built_before_replacement_keeps_reading_its_snapshot(tmp_path):
    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    with open_loader(out, backend="fallback", device="cpu", batch_chunks=5) as ld:
        it = iter(ld)
        first = next(it)
        _convert(src, out, SIZES[1], overwrite=True)
        rest = list(it)
    bounds = ld.dataset.chunk_bounds
    for b in [first, *rest]:
        xyz = np.stack([b[k].numpy() for k in "xyz"], axis=1)
        sizes = np.diff(np.concatenate([[0], b["offset"].numpy()]))
        assert _outside(xyz, np.repeat(b["chunk"].numpy(), sizes), bounds) == 0


_REPLACER = textwrap.dedent("""
    import os, sys, time
    from gds_stream.cli import main
    src, out, stop, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    i = 0
    while not os.path.exists(stop) and time.monotonic() < deadline:
        size = ("1.0", "2.5")[i % 2]
        rc = main(["convert", src, "-o", out, "--format", "raw", "--raw-fields", "x,y,z",
                   "--chunk-size", size, "--overwrite", "--no-progress"])
        assert rc == 0, rc
        i += 1
        with open(stop + ".count", "w") as f:  # how many so far, for the reading side
            f.write(str(i))
    print("replacements", i, flush=True)
""")


def test_loaders_opened_by_path_while_convert_overwrite_replaces_in_a_loop(tmp_path):
    """Loaders opened by path (and from a Dataset held across replacements) while another
    process runs ``convert --overwrite`` with alternating chunk sizes: every epoch is whole and
    consistent, or the open is a DatasetError; both chunkings are seen."""
    src, out, stop = _points(tmp_path / "pts.bin"), tmp_path / "ds", tmp_path / "stop"
    _convert(src, out, SIZES[0])
    held = open_dataset(out)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _REPLACER, str(src), str(out), str(stop),
                             str(time.monotonic() + 60)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    epochs = errors = 0
    sizes_seen = set()
    try:
        deadline = time.monotonic() + 60
        count = tmp_path / "stop.count"

        def replaced_so_far() -> int:
            try:
                return int(count.read_text() or 0)
            except (OSError, ValueError):
                return 0

        # read for as long as the replacer runs: epochs, both chunkings and several
        # replacements, whichever side is faster on this machine
        while (proc.poll() is None and time.monotonic() < deadline
               and not (epochs >= 25 and sizes_seen == set(SIZES)
                        and replaced_so_far() >= 4)):
            try:
                with open_loader(out, backend="fallback", device="cpu", batch_chunks=9,
                                 shuffle=epochs % 2 == 1) as ld:
                    assert _epoch_outside(ld) == (0, N), f"mixed data after {epochs} epochs"
                    sizes_seen.add(ld.dataset.chunk_size)
                    epochs += 1
            except DatasetError:
                errors += 1
            with open_loader(held, backend="fallback", device="cpu", batch_chunks=9) as ld:
                assert _epoch_outside(ld) == (0, N)
    finally:
        stop.touch()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    held.close()
    assert proc.returncode == 0, stderr
    replaced = int(stdout.split()[-1])
    print(f"{epochs} consistent epochs, {errors} refused opens, {replaced} replacements")
    assert replaced >= 4 and epochs >= 25 and sizes_seen == set(SIZES), \
        (replaced, epochs, errors, sizes_seen)


def _fds(root: Path) -> int:
    return fds_under(root)


def test_descriptors_of_a_dataset_with_many_fields(tmp_path):
    """One descriptor per field file plus the directory, held by the Dataset; a loader dups only
    the fields it reads and closes them; closing the Dataset releases the rest."""
    specs = [FieldSpec(f"f{i}", np.dtype("<u2")) for i in range(300)]
    with DatasetWriter(tmp_path / "wide", specs) as w:
        w.append({s.name: np.full(50, i, np.uint16) for i, s in enumerate(specs)})
        w.end_scan("gen")
    base = _fds(tmp_path)
    ds = open_dataset(tmp_path / "wide")
    assert _fds(tmp_path) == base + 301
    for _ in range(20):
        with open_loader(ds, backend="fallback", device="cpu", batch_points=50,
                         fields=["f3", "f299"]) as ld:
            b = next(iter(ld))
            assert _fds(tmp_path) == base + 303
            assert (b["f3"].numpy() == 3).all() and (b["f299"].numpy() == 299).all()
    assert _fds(tmp_path) == base + 301
    ds.close()
    assert _fds(tmp_path) == base
    for _ in range(20):  # opened by path: the loader's Dataset is closed with it
        with open_loader(tmp_path / "wide", backend="fallback", device="cpu", batch_points=50,
                         fields=["f0"]) as ld:
            next(iter(ld))
    assert _fds(tmp_path) == base


def test_reopen_path_reads_the_pinned_file_after_removal(tmp_path):
    """What the GPU-direct backend hands KvikIO (which opens by path) is the snapshot's file."""
    from gds_stream._lifetime import FieldFiles

    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    with open_dataset(out) as ds:
        want = ds.read("x").tobytes()
        with FieldFiles(ds, ["x"]) as files:
            _convert(src, out, SIZES[1], overwrite=True)
            with open(files.reopen_path("x"), "rb") as f:
                assert f.read(len(want)) == want
            assert files.path("x") == str(out / "x.bin")  # messages still name the dataset


def _race(monkeypatch, src: Path, out: Path, times: int) -> list[float]:
    """Make the next ``times`` opens of ``out`` find it replaced (by a real convert
    --overwrite) right after they read its manifest: the old directory's files are gone."""
    from gds_stream import format as fmt

    real, done, busy = fmt.read_manifest, [], []

    def racing(path, cap, dir_fd=None):
        doc = real(path, cap, dir_fd=dir_fd)
        if len(done) < times and not busy:
            busy.append(1)
            size = SIZES[(len(done) + 1) % 2]
            _convert(src, out, size, overwrite=True)  # its own open is not raced
            busy.pop()
            done.append(size)
        return doc

    monkeypatch.setattr(fmt, "read_manifest", racing)
    return done


def test_open_racing_a_replacement_starts_again_on_the_new_directory(tmp_path, monkeypatch):
    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    done = _race(monkeypatch, src, out, times=1)
    with open_dataset(out) as ds:
        assert done == [SIZES[1]] and ds.chunk_size == SIZES[1]
        assert _dataset_outside(ds) == 0 and ds.verify() == []


def test_open_replaced_every_time_is_a_dataset_error(tmp_path, monkeypatch):
    from gds_stream.format import OPEN_ATTEMPTS

    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    done = _race(monkeypatch, src, out, times=100)
    base = _fds(tmp_path)
    with pytest.raises(DatasetError, match=rf"{out}: the dataset was replaced while it was being "
                                           rf"opened, {OPEN_ATTEMPTS} times in a row"):
        open_loader(out, backend="fallback", device="cpu", batch_chunks=3)
    assert len(done) == OPEN_ATTEMPTS and _fds(tmp_path) == base


def test_simulated_gpu_direct_loader_reads_the_snapshot(tmp_path, simulated_gpu):
    """KvikIO opens files by path: the GPU-direct backend hands it the path of the pinned
    descriptor, so a GDS loader built from a replaced Dataset reads the old data too."""
    from gds_stream.gds import GDSLoader

    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    with open_dataset(out) as ds:
        _convert(src, out, SIZES[1], overwrite=True)
        for shuffle in (False, True):
            with GDSLoader(ds, device="cuda", batch_chunks=6, shuffle=shuffle) as ld:
                assert ld.backend == "gds" and _epoch_outside(ld) == (0, N)


def test_a_bad_manifest_that_was_not_replaced_is_refused_at_once(tmp_path, monkeypatch):
    from gds_stream import format as fmt

    src, out = _points(tmp_path / "pts.bin"), tmp_path / "ds"
    _convert(src, out, SIZES[0])
    (out / "y.bin").unlink()
    real, calls = fmt.read_manifest, []
    monkeypatch.setattr(fmt, "read_manifest", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(DatasetError, match=r"y\.bin: no such file \(named by .*manifest\.json"):
        open_dataset(out)
    assert len(calls) == 1  # no retry: the directory at the path is still the one opened


def test_running_out_of_descriptors_says_why(tmp_path):
    """A Dataset holds a descriptor per field file: past the process's limit the error says so
    (run in a subprocess with a low limit)."""
    specs = [FieldSpec(f"f{i}", np.dtype("<u1")) for i in range(40)]
    with DatasetWriter(tmp_path / "wide", specs) as w:
        w.append({s.name: np.zeros(10, np.uint8) for s in specs})
        w.end_scan("gen")
    code = textwrap.dedent(f"""
        import resource
        from gds_stream.errors import DatasetError
        from gds_stream.format import open_dataset
        held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            for _ in range(10):
                held.append(open_dataset({str(tmp_path / "wide")!r}))
        except DatasetError as exc:
            print(len(held), exc)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[0]) >= 1 and "Too many open files" in proc.stdout
    assert "one descriptor per field file plus one for its directory" in proc.stdout
    assert "no longer needed, or raise the limit (ulimit -n)" in proc.stdout


# -- files written in place (not replaced) ---------------------------------------------------
def _aged(out: Path) -> Path:
    """The dataset's files dated an hour back, so a rewrite now changes their mtime whatever
    the filesystem's timestamp granularity."""
    old = time.time_ns() - 3600 * 10**9
    for p in out.iterdir():
        os.utime(p, ns=(old, old))
    return out


@pytest.mark.parametrize("when", ["mid-epoch", "between epochs", "before the loader"])
def test_field_file_written_in_place_is_an_error_not_new_bytes(tmp_path, when):
    """``cp`` of another dataset's file over a field file (same size: the size check cannot see
    it) truncates and rewrites the very inode the snapshot holds: loaders handed out the new
    values under the old manifest, mid-epoch a mix of both, without a word."""
    from gds_stream.errors import LoaderError

    _convert(_points(tmp_path / "a.bin"), tmp_path / "a", 2.5)
    rng = np.random.default_rng(8)
    rng.uniform(0, 10, size=(N, 3)).astype("<f4").tofile(tmp_path / "b.bin")
    _convert(tmp_path / "b.bin", tmp_path / "b", 2.5)
    ds = open_dataset(_aged(tmp_path / "a"))
    if when == "before the loader":
        (tmp_path / "a" / "x.bin").write_bytes((tmp_path / "b" / "x.bin").read_bytes())
        with pytest.raises(DatasetError, match=r"a/x\.bin: the file of field 'x' was written in "
                                               r"place since the dataset was opened"):
            open_loader(ds, device="cpu", batch_points=1000)
        ds.close()  # not left to a garbage collection during a later test's descriptor count
        return
    with open_loader(ds, device="cpu", batch_points=1000, shuffle=False) as ld:
        it = iter(ld)
        first = next(it)["x"].numpy().copy()
        assert np.array_equal(first, ds.read("x", 0, 1000))
        if when == "between epochs":
            for _ in it:
                pass
            it = iter(ld)
        (tmp_path / "a" / "x.bin").write_bytes((tmp_path / "b" / "x.bin").read_bytes())
        with pytest.raises(LoaderError, match=r"a/x\.bin: the file of field 'x' was written in "
                                              r"place since the dataset was opened \(\d+ bytes "
                                              r"then, \d+ now, modified since\)") as info:
            for _ in it:
                pass
        assert isinstance(info.value.__cause__, DatasetError)
        if when == "mid-epoch":  # the batch that failed is the second (index 1), not one more
            assert "batch 1 of epoch 0 failed" in str(info.value), str(info.value)
            assert ld.state_dict()["batches_done"] == 1
    ds.close()


def test_replacement_by_rename_and_removal_of_the_old_files_still_reads(tmp_path):
    """Removing the old files (what ``convert --overwrite`` does after its rename) changes
    their link count and ctime, not their size or mtime: the snapshot keeps reading."""
    _convert(_points(tmp_path / "a.bin"), tmp_path / "a", 2.5)
    ds = open_dataset(_aged(tmp_path / "a"))
    want = ds.read("x")
    with open_loader(ds, device="cpu", batch_points=1000, shuffle=False) as ld:
        it = iter(ld)
        next(it)
        _convert(tmp_path / "a.bin", tmp_path / "a", 1.0, overwrite=True)
        assert not any(p.name.startswith(".a.old") for p in tmp_path.iterdir())
        got = np.concatenate([b["x"].numpy() for b in it])
    assert np.array_equal(got, want[1000:])
    ds.close()
