"""Inputs in object storage (issue 19): ``convert s3://bucket/tiles/ -o ...`` streams each object
into a local temporary file, one at a time, and converts exactly what the local files give."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gds_stream
from gds_stream.errors import DatasetError
from s3_fixtures import FaultProxy, Faults, bucket, s3_client, s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _put_tree(endpoint: str, bkt: str, local: Path, prefix: str) -> None:
    cl = s3_client(endpoint)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            cl.upload_file(str(p), bkt, f"{prefix}/{p.relative_to(local).as_posix()}")


def _same_data(a, b) -> None:
    assert list(a.schema) == list(b.schema) and a.num_points == b.num_points
    assert (a.scan_offsets == b.scan_offsets).all()
    for name in a.schema:
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    assert np.array_equal(np.asarray(a.origin), np.asarray(b.origin))


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """The temporary directory the conversion stages its inputs in, watched by the test."""
    import tempfile

    tmp = tmp_path / "staging"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture
def tiles(tmp_path, make_las):
    d = tmp_path / "tiles"
    d.mkdir()
    make_las(d / "a.las", 3000, point_format=3, offset=(500_000, 4_000_000, 0), seed=1)
    make_las(d / "b.laz", 2000, point_format=3, offset=(500_000, 4_000_000, 0), seed=2)
    (d / "sub").mkdir()
    make_las(d / "sub" / "c.laz", 1500, point_format=3, offset=(500_000, 4_000_000, 0), seed=3)
    return d


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gds_stream", *args], capture_output=True,
                          text=True, timeout=300, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_prefix_of_las_and_laz_objects_converts_like_the_local_files(tmp_path, tiles, bucket,
                                                                      s3_server, tmpdir_env,
                                                                      monkeypatch):
    _put_tree(s3_server, bucket, tiles, "tiles")
    cl = s3_client(s3_server)
    cl.put_object(Bucket=bucket, Key="tiles/notes.txt", Body=b"not a point cloud")
    cl.put_object(Bucket=bucket, Key="tiles/.hidden.las", Body=b"skipped")
    cl.put_object(Bucket=bucket, Key="tiles/old/manifest.json", Body=b"{}")  # a dataset: skipped
    cl.put_object(Bucket=bucket, Key="tiles/old/data-1/x.bin", Body=bytes(64))
    from gds_stream.storage import s3 as s3mod

    real, staged_at_fetch = s3mod.S3Client.get_to_file, []

    def get_to_file(self, obj, start, end, f):  # what else lies on local disk at each fetch
        on_disk = sorted(p.name for p in tmpdir_env.rglob("*") if p.is_file())
        staged_at_fetch.append((obj.key.rsplit("/", 1)[-1], on_disk))
        return real(self, obj, start, end, f)

    monkeypatch.setattr(s3mod.S3Client, "get_to_file", get_to_file)
    want = gds_stream.convert(tiles, tmp_path / "local", progress=False)
    got = gds_stream.convert(f"s3://{bucket}/tiles/", tmp_path / "from_s3", progress=False)
    _same_data(want, got)
    assert [s["path"] for s in got.sources] == [
        f"s3://{bucket}/tiles/a.las", f"s3://{bucket}/tiles/b.laz",
        f"s3://{bucket}/tiles/sub/c.laz"]
    # fetched to be validated, sampled (the float32 origin) and converted, each time alone:
    # never another input on local disk beside it
    assert len(staged_at_fetch) >= 6, staged_at_fetch
    assert all(on_disk == [name] for name, on_disk in staged_at_fetch), staged_at_fetch
    assert list(tmpdir_env.iterdir()) == []  # the temporary directory is gone
    from gds_stream.convert.remote_inputs import RemoteInputs

    with RemoteInputs() as remote:
        path = remote.expand([f"s3://{bucket}/tiles/a.las"], (".las",))[0]
        assert path.read_bytes()[:4] == b"LASF" and str(path) == f"s3://{bucket}/tiles/a.las"
    with pytest.raises(DatasetError, match=f"s3://{bucket}/tiles/a.las: read after the conv"):
        path.read_bytes()  # never fetched again once the conversion ended
    assert list(tmpdir_env.iterdir()) == []


def test_s3_to_s3_through_the_cli_is_bit_exact_against_a_local_convert(tmp_path, tiles, bucket,
                                                                        s3_server):
    _put_tree(s3_server, bucket, tiles, "tiles")
    r = _cli("convert", f"s3://{bucket}/tiles", "-o", f"s3://{bucket}/set", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"wrote s3://{bucket}/set: 6,500 points in 3 scans" in r.stdout, r.stdout
    want = gds_stream.convert(tiles, tmp_path / "local", progress=False)
    _same_data(want, gds_stream.open_dataset(f"s3://{bucket}/set"))
    r = _cli("verify", f"s3://{bucket}/set", "--no-progress")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_one_key_is_one_file_and_inputs_mix_with_local_paths(tmp_path, tiles, bucket,
                                                             s3_server):
    _put_tree(s3_server, bucket, tiles, "tiles")
    ds = gds_stream.convert([f"s3://{bucket}/tiles/b.laz", tiles / "a.las"], tmp_path / "o",
                            progress=False)
    want = gds_stream.convert([tiles / "b.laz", tiles / "a.las"], tmp_path / "w",
                              progress=False)
    _same_data(want, ds)
    assert [s["path"] for s in ds.sources] == [f"s3://{bucket}/tiles/b.laz",
                                               str(tiles / "a.las")]


def test_storage_options_reach_the_inputs_and_faulty_fetches_are_retried(tmp_path, tiles,
                                                                         bucket, s3_server):
    _put_tree(s3_server, bucket, tiles, "tiles")
    faults = Faults(only="/tiles/", error503=0.3, reset=0.1, truncate=0.1, seed=4)
    with FaultProxy(s3_server, faults) as proxy:
        got = gds_stream.convert(f"s3://{bucket}/tiles/", tmp_path / "o", progress=False,
                                 storage_options={"endpoint": proxy.url, "timeout_s": 10.0,
                                                  "retry_backoff_s": 0.01,
                                                  "retry_max_backoff_s": 0.05})
    assert faults.counts["503"] + faults.counts["reset"] + faults.counts["truncate"] > 0
    _same_data(gds_stream.convert(tiles, tmp_path / "w", progress=False), got)


def test_semantickitti_frames_bring_their_labels(tmp_path, make_kitti, bucket, s3_server):
    paths, _ = make_kitti(tmp_path / "seq", [1000, 10, 500], layout="semantickitti")
    _put_tree(s3_server, bucket, tmp_path / "seq", "kitti/seq")
    want = gds_stream.convert(paths[0].parent, tmp_path / "w", progress=False)
    got = gds_stream.convert(f"s3://{bucket}/kitti/seq/velodyne/", tmp_path / "g",
                             progress=False)
    assert "sem_class" in got.schema
    _same_data(want, got)
    assert got.sources[0]["labels"] == f"s3://{bucket}/kitti/seq/labels/000000.label"


def test_a_bad_object_is_one_line_naming_its_url_and_nothing_is_left(tmp_path, tiles, bucket,
                                                                      s3_server):
    _put_tree(s3_server, bucket, tiles, "tiles")
    s3_client(s3_server).put_object(Bucket=bucket, Key="tiles/zz.las", Body=b"PK\x03\x04" * 64)
    staging = tmp_path / "staging"
    staging.mkdir()
    r = subprocess.run([sys.executable, "-m", "gds_stream", "convert", f"s3://{bucket}/tiles/",
                        "-o", str(tmp_path / "out"), "--no-progress"], capture_output=True,
                       text=True, timeout=300, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(staging)})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and f"s3://{bucket}/tiles/zz.las: not a LAS/LAZ" in line
    assert "gds-stream-inputs" not in line and str(staging) not in line, line
    assert list(staging.iterdir()) == [] and not (tmp_path / "out").exists()


def test_an_empty_prefix_and_one_without_point_clouds_are_clear(tmp_path, bucket, s3_server):
    with pytest.raises(DatasetError, match=f"s3://{bucket}/nothing/: no objects under"):
        gds_stream.convert(f"s3://{bucket}/nothing/", tmp_path / "o", progress=False)
    s3_client(s3_server).put_object(Bucket=bucket, Key="t/readme.txt", Body=b"x")
    with pytest.raises(DatasetError, match=f"s3://{bucket}/t: no .ply, .las, .laz or .bin obj"):
        gds_stream.convert(f"s3://{bucket}/t", tmp_path / "o", progress=False)


def test_ctrl_c_while_fetching_removes_the_temporary_files(tmp_path, tiles, bucket, s3_server,
                                                          tmpdir_env, monkeypatch):
    _put_tree(s3_server, bucket, tiles, "tiles")
    from gds_stream.storage import s3 as s3mod

    real, calls = s3mod.S3Client.get_to_file, []

    def get_to_file(self, obj, start, end, f):
        calls.append(obj.key)
        if len(calls) == 5:  # after the validation: an object half-written
            f.write(b"LASF" + b"\0" * 1000)
            raise KeyboardInterrupt
        return real(self, obj, start, end, f)

    monkeypatch.setattr(s3mod.S3Client, "get_to_file", get_to_file)
    with pytest.raises(KeyboardInterrupt):
        gds_stream.convert(f"s3://{bucket}/tiles/", tmp_path / "o", progress=False)
    assert len(calls) == 5 and list(tmpdir_env.iterdir()) == []
    assert not (tmp_path / "o").exists()


def test_sigint_during_a_fetch_is_exit_130_and_removes_the_temporary_files(tmp_path, tiles,
                                                                          bucket, s3_server):
    _put_tree(s3_server, bucket, tiles, "tiles")
    staging = tmp_path / "staging"
    staging.mkdir()
    with FaultProxy(s3_server, Faults(only="/tiles/", trickle_s=0.5)) as proxy:  # slow bodies
        p = subprocess.Popen(
            [sys.executable, "-m", "gds_stream", "convert", f"s3://{bucket}/tiles/", "-o",
             str(tmp_path / "out"), "--no-progress"], cwd=str(ROOT), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(staging),
                 "AWS_ENDPOINT_URL": proxy.url})
        try:
            deadline = time.monotonic() + 120
            while not any(f.is_file() and f.stat().st_size for f in staging.rglob("*")):
                assert p.poll() is None and time.monotonic() < deadline, p.poll()
                time.sleep(0.02)
            p.send_signal(signal.SIGINT)  # an object half-fetched
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 130 and "gds-stream: interrupted" in err, err
    assert list(staging.iterdir()) == [] and not (tmp_path / "out").exists()


def test_an_object_replaced_between_validation_and_conversion_is_named(tmp_path, tiles, bucket,
                                                                        s3_server, monkeypatch):
    _put_tree(s3_server, bucket, tiles, "tiles")
    from gds_stream.convert import common

    real = common.DatasetWriter.__init__

    def writer_init(self, *a, **kw):  # after every input was validated: replace one
        s3_client(s3_server).upload_file(str(tiles / "a.las"), bucket, "tiles/b.laz")
        real(self, *a, **kw)

    monkeypatch.setattr(common.DatasetWriter, "__init__", writer_init)
    with pytest.raises(DatasetError, match=f"s3://{bucket}/tiles/b.laz: the object changed"):
        gds_stream.convert(f"s3://{bucket}/tiles/", tmp_path / "o", progress=False)


def test_too_little_temporary_space_is_refused_naming_the_object(tmp_path, tiles, bucket,
                                                                  s3_server, monkeypatch):
    import collections

    from gds_stream.convert import remote_inputs

    _put_tree(s3_server, bucket, tiles, "tiles")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(remote_inputs.shutil, "disk_usage", lambda p: usage(1 << 20, 0, 1000))
    with pytest.raises(DatasetError, match=f"s3://{bucket}/tiles/a.las: needs \\d+ bytes of "
                                           f"local temporary space.*point TMPDIR"):
        gds_stream.convert(f"s3://{bucket}/tiles/", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
