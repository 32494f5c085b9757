"""Datasets in object storage (issue 19): s3:// URLs opened, streamed and written like a local
directory, against a real S3 protocol server (moto) started by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gds_stream
from gds_stream.errors import DatasetError, LoaderError
from helpers import (batch_bytes_equal, error_chain, kept_epoch, make_dataset,
                     run_with_timeout)
from s3_fixtures import (FaultProxy, Faults, bucket, corrupt_label_object,  # noqa: F401
                         s3_client, s3_server, upload)

ROOT = Path(__file__).resolve().parents[1]
SCANS = [70_000, 0, 130_000, 45_000, 90_000]  # 335 000 points: ~7 MiB over the default fields
FAST = {"retry_backoff_s": 0.01, "retry_max_backoff_s": 0.05, "timeout_s": 5.0}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("s3local"), SCANS, seed=3)


@pytest.fixture
def remote(local, bucket):
    url = f"s3://{bucket}/sets/a"
    upload(local.path, url)
    return url


def _epochs(source, epochs=2, **kw):
    with gds_stream.open_loader(source, backend="fallback", device="cpu", **kw) as ld:
        return [kept_epoch(ld, e) for e in range(epochs)]


def _same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for i, (x, y) in enumerate(zip(ea, eb)):
            assert batch_bytes_equal(x, y), f"batch {i} differs"


# -- opening and reading --------------------------------------------------------------------
def test_importing_gds_stream_does_not_import_obstore():
    code = ("import sys, gds_stream; gds_stream.open_dataset; "
            "sys.exit(1 if 'obstore' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, "import gds_stream imported obstore"


def test_open_dataset_from_url_matches_local(local, remote):
    ds = gds_stream.open_dataset(remote)
    assert str(ds.path) == remote
    assert ds.num_points == local.num_points and ds.num_scans == local.num_scans
    assert ds.schema == local.schema
    assert np.array_equal(ds.scan_offsets, local.scan_offsets)
    for name in local.schema:
        a, b = ds.read(name), local.read(name)
        assert a.tobytes() == b.tobytes(), name
        assert ds.read(name, 1234, 56789).tobytes() == local.read(name, 1234, 56789).tobytes()
    assert ds.verify() == []
    ds.close()
    with pytest.raises(DatasetError, match="closed"):
        ds.read("x", 0, 10)


@pytest.mark.parametrize("kw", [
    dict(batch_points=30_000, shuffle=True, seed=5),
    dict(batch_points=50_000, shuffle=False),
    dict(batch_scans=2, shuffle=True, seed=1),
])
def test_loader_epochs_from_s3_equal_local(local, remote, kw):
    fields = ["pid", "x", "label", "rgb"]
    want = _epochs(local.path, fields=fields, **kw)
    got = _epochs(remote, fields=fields, **kw)
    _same(got, want)
    assert sum(len(b["pid"]) for b in got[0]) == local.num_points


def test_loader_from_url_reads_with_threads_by_default_and_inline_on_request(local, remote):
    """Range requests wait on the network: a remote dataset gets reader threads even where a
    local one would read inline on a CPU whose cores torch takes; inline reads still work."""
    from gds_stream.options import REMOTE_THREADS

    with gds_stream.open_loader(remote, device="cpu", batch_points=50_000) as ld:
        assert ld.options.num_threads >= REMOTE_THREADS
    want = _epochs(local.path, fields=["x", "pid"], batch_points=40_000, shuffle=True, seed=2)
    got = _epochs(remote, fields=["x", "pid"], batch_points=40_000, shuffle=True, seed=2,
                  num_threads=0)
    _same(got, want)


def test_loader_from_url_reports_its_backend(remote):
    with gds_stream.open_loader(remote, device="cpu", batch_points=50_000) as ld:
        assert ld.backend == "fallback"
        assert next(iter(ld))["x"].numel() > 0


def test_unsupported_scheme_and_bad_urls_are_clear():
    with pytest.raises(DatasetError, match="unsupported URL scheme 'gs'"):
        gds_stream.open_dataset("gs://bucket/set")
    with pytest.raises(DatasetError, match="no bucket"):
        gds_stream.open_dataset("s3:///set")
    with pytest.raises(DatasetError, match="'..'"):
        gds_stream.open_dataset("s3://bucket/a/../b")


# -- errors: 404, 403, bad manifests ----------------------------------------------------------
def test_missing_dataset_is_404_naming_the_key(bucket):
    t = time.monotonic()
    with pytest.raises(DatasetError, match=rf"s3://{bucket}/nothing/here/manifest.json: no such "
                                           rf"object \(404"):
        gds_stream.open_dataset(f"s3://{bucket}/nothing/here")
    assert time.monotonic() - t < 5, "a 404 must not be retried"


def test_missing_field_object_names_it(local, bucket, s3_server):
    url = f"s3://{bucket}/d"
    upload(local.path, url)
    cl = s3_client(s3_server)
    keys = [o["Key"] for o in cl.list_objects_v2(Bucket=bucket)["Contents"]]
    victim = next(k for k in keys if k.endswith("label.bin") or "/label" in k)
    cl.delete_object(Bucket=bucket, Key=victim)
    with pytest.raises(DatasetError, match=rf"{victim}.*no such object"):
        gds_stream.open_dataset(url)


def test_access_denied_fails_at_once_naming_the_key(local, bucket, s3_server):
    url = f"s3://{bucket}/d"
    upload(local.path, url)
    faults = Faults(deny=("/d/data-",))
    with FaultProxy(s3_server, faults) as proxy:
        with pytest.raises(DatasetError, match=rf"s3://{bucket}/d/data-.*access denied"):
            gds_stream.open_dataset(url, storage_options={"endpoint": proxy.url, **FAST})
    assert faults.counts["403"] == 1, "a 403 must not be retried"


def test_denied_after_open_is_a_loader_error_at_next(remote, s3_server):
    faults = Faults()
    with FaultProxy(s3_server, faults) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={"endpoint": proxy.url, **FAST})
        faults.deny = ("/data-",)
        with gds_stream.open_loader(ds, backend="fallback", device="cpu", fields=["x"],
                                    batch_points=50_000) as ld:
            with pytest.raises(LoaderError) as ei:
                run_with_timeout(lambda: next(iter(ld)), 30)
    chain = error_chain(ei.value)
    assert any("access denied" in str(e) and "/data-" in str(e) for e in chain), chain


def test_manifest_is_validated_like_a_local_one(local, bucket, s3_server):
    cl = s3_client(s3_server)
    cl.put_object(Bucket=bucket, Key="bad/manifest.json", Body=b"{not json")
    with pytest.raises(DatasetError, match=r"bad/manifest.json: not valid JSON"):
        gds_stream.open_dataset(f"s3://{bucket}/bad")
    url = f"s3://{bucket}/evil"
    upload(local.path, url)
    import json
    doc = json.loads(cl.get_object(Bucket=bucket, Key="evil/manifest.json")["Body"].read())
    doc["fields"][0]["file"] = "../sets/a/x.bin"
    cl.put_object(Bucket=bucket, Key="evil/manifest.json", Body=json.dumps(doc).encode())
    with pytest.raises(DatasetError, match="lies outside the dataset prefix"):
        gds_stream.open_dataset(url)
    doc["fields"][0]["file"] = doc["fields"][1]["file"]  # inside, but far too short:
    doc["fields"][0]["offset"] = 1 << 30
    cl.put_object(Bucket=bucket, Key="evil/manifest.json", Body=json.dumps(doc).encode())
    with pytest.raises(DatasetError, match="but the manifest needs"):
        gds_stream.open_dataset(url)


# -- faults ---------------------------------------------------------------------------------
def test_faults_are_retried_and_every_epoch_is_exact(local, remote, s3_server):
    kw = dict(fields=["pid", "x", "rgb"], batch_points=20_000, shuffle=True, seed=11,
              shuffle_window=40_000, num_threads=4, prefetch=3, epochs=3)
    want = _epochs(local.path, **kw)
    faults = Faults(error503=0.15, reset=0.1, delay=0.1, truncate=0.1, short=0.1, delay_s=0.2,
                    seed=2)
    with FaultProxy(s3_server, faults) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={
            "endpoint": proxy.url, "max_retries": 12, **FAST})
        got = run_with_timeout(lambda: _epochs(ds, **kw), 120)
        retries = ds.client.retries
    _same(got, want)
    for kind in ("503", "reset", "delay", "truncate", "short", "ok"):
        assert faults.counts[kind] > 0, f"no {kind} was injected: {faults.counts}"
    assert retries >= sum(faults.counts[k] for k in ("503", "reset", "truncate", "short"))


def test_a_response_slower_than_the_timeout_is_retried(local, remote, s3_server):
    faults = Faults(delay=0.3, delay_s=1.5, seed=4)
    with FaultProxy(s3_server, faults) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={
            "endpoint": proxy.url, "max_retries": 20, **FAST, "timeout_s": 0.5})
        got = run_with_timeout(lambda: ds.read("x"), 120)
    assert got.tobytes() == local.read("x").tobytes()
    assert faults.counts["delay"] > 0 and ds.client.retries >= faults.counts["delay"]


def test_retry_budget_spent_is_a_clear_error_not_a_hang(remote, s3_server):
    faults = Faults(error503=1.0)
    with FaultProxy(s3_server, faults) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={
            "endpoint": proxy.url, "max_retries": 2, **FAST})
        with gds_stream.open_loader(ds, backend="fallback", device="cpu", fields=["x"],
                                    batch_points=50_000) as ld:
            it = iter(ld)
            with pytest.raises(LoaderError) as ei:
                run_with_timeout(lambda: next(it), 60)
            with pytest.raises(LoaderError):
                next(it)  # and stays failed
    msg = str(ei.value)  # the LoaderError itself names the object, the range and the error
    assert f"{remote}/data-" in msg and "read of bytes" in msg and "failed 3 times" in msg, msg
    assert "503" in msg, msg


@pytest.mark.parametrize("fault", ["timeout", "cut body", "refused"])
def test_a_spent_budget_says_what_the_network_did(remote, s3_server, fault):
    """A stalled answer and a cut body read alike in the error's first line ("request or
    response body error"), a dead endpoint only "error sending request": the message now says
    which, and names the setting for a timeout."""
    import socket

    if fault == "refused":
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(DatasetError, match=r"connection refused") as ei:
            gds_stream.open_dataset(remote, storage_options={
                "endpoint": f"http://127.0.0.1:{port}", "max_retries": 1, **FAST})
        assert remote in str(ei.value)
        return
    faults = (Faults(delay=1.0, delay_s=3.0) if fault == "timeout" else Faults(truncate=1.0))
    with FaultProxy(s3_server, faults) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={
            "endpoint": proxy.url, "max_retries": 1, **FAST, "timeout_s": 1.0})
        with pytest.raises(DatasetError) as ei:
            run_with_timeout(lambda: ds.read("x"), 60)
    msg = str(ei.value)
    assert "read of bytes" in msg and "failed 2 times" in msg, msg
    if fault == "timeout":
        assert "timed out: no whole answer within timeout_s=1 s" in msg, msg
    else:
        assert "the connection closed before the whole body arrived" in msg, msg


# -- replaced objects -------------------------------------------------------------------------
def test_object_replaced_mid_epoch_is_an_error_never_mixed_bytes(local, remote, s3_server):
    kw = dict(fields=["pid", "x"], batch_points=20_000, shuffle=False, prefetch=2,
              num_threads=2)
    want = _epochs(local.path, epochs=1, **kw)[0]
    _, bkt, prefix = gds_stream.storage.split_url(remote)
    cl = s3_client(s3_server)
    key = next(o["Key"] for o in cl.list_objects_v2(Bucket=bkt, Prefix=prefix)["Contents"]
               if o["Key"].endswith("/x.bin") or o["Key"].endswith("x.f32"))
    size = cl.head_object(Bucket=bkt, Key=key)["ContentLength"]
    got = []
    with gds_stream.open_loader(remote, backend="fallback", device="cpu", **kw) as ld:
        it = iter(ld)
        got.append(next(it))
        cl.put_object(Bucket=bkt, Key=key, Body=os.urandom(size))  # same size, other bytes
        with pytest.raises(LoaderError) as ei:
            for b in it:
                got.append(b)
    assert len(got) < len(want), "the epoch ended without noticing the replaced object"
    for i, b in enumerate(got):  # what was handed out came whole from the old version
        assert batch_bytes_equal(b, want[i]), f"batch {i} mixes versions"
    msg = " | ".join(str(e) for e in error_chain(ei.value))
    assert f"{key}: the object changed since the dataset was opened" in msg, msg


# -- writing --------------------------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gds_stream", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          timeout=120)


def test_convert_to_s3_and_back_is_bit_exact(tmp_path, bucket):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((200_000, 4)).astype("<f4")
    src = tmp_path / "cloud.bin"
    rows.tofile(src)
    url = f"s3://{bucket}/conv"
    r = _cli("convert", str(src), "-o", url, "--raw-fields", "x,y,z,intensity",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"wrote {url}:" in r.stdout
    r = _cli("info", url)
    assert r.returncode == 0 and "200,000" in r.stdout, r.stderr
    r = _cli("verify", url, "--no-progress")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    ds = gds_stream.open_dataset(url)
    for j, name in enumerate(["x", "y", "z", "intensity"]):
        assert ds.read(name).tobytes() == np.ascontiguousarray(rows[:, j]).tobytes()
    # again without --overwrite: refused, one line, status 2
    r = _cli("convert", str(src), "-o", url, "--raw-fields", "x,y,z,intensity",
             "--no-progress")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_overwrite_replaces_the_manifest_last_and_drops_the_old_objects(tmp_path, bucket,
                                                                         s3_server):
    a = np.arange(300_000, dtype="<f4").reshape(-1, 3)
    b = -a[:50_000]
    (tmp_path / "a.bin").write_bytes(a.tobytes())
    (tmp_path / "b.bin").write_bytes(b.tobytes())
    url = f"s3://{bucket}/ow"
    fields = ["x", "y", "z"]
    gds_stream.convert(tmp_path / "a.bin", url, raw_fields=fields, progress=False)
    old = gds_stream.open_dataset(url)
    gds_stream.convert(tmp_path / "b.bin", url, raw_fields=fields, progress=False,
                       overwrite=True)
    new = gds_stream.open_dataset(url)
    assert new.read("x").tobytes() == np.ascontiguousarray(b[:, 0]).tobytes()
    keys = {o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=bucket)["Contents"]}
    assert len(keys) == 1 + len(fields), f"old objects left behind: {sorted(keys)}"
    with pytest.raises(DatasetError, match="removed since the dataset was opened"):
        old.read("x", 0, 10)  # the old snapshot is gone: a clear error, never the new bytes


def test_upload_publishes_the_manifest_last(tmp_path, bucket, s3_server, monkeypatch):
    from gds_stream.storage import s3 as s3mod

    order = []
    real_file, real_bytes = s3mod.S3Client.put_file, s3mod.S3Client.put_bytes
    monkeypatch.setattr(s3mod.S3Client, "put_file",
                        lambda self, k, *a: (order.append(k), real_file(self, k, *a))[1])
    monkeypatch.setattr(s3mod.S3Client, "put_bytes",
                        lambda self, k, *a: (order.append(k), real_bytes(self, k, *a))[1])
    (tmp_path / "a.bin").write_bytes(np.ones((1000, 3), "<f4").tobytes())
    gds_stream.convert(tmp_path / "a.bin", f"s3://{bucket}/m", raw_fields=["x", "y", "z"],
                       progress=False)
    assert order[-1] == "m/manifest.json" and len(order) == 4, order


def test_missing_obstore_names_the_extra_that_installs_it(monkeypatch):
    import tomllib

    monkeypatch.setitem(sys.modules, "obstore", None)  # import obstore -> ImportError
    with pytest.raises(DatasetError, match=r"pip install 'gds-stream\[s3\]'"):
        gds_stream.open_dataset("s3://bucket/set")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("obstore") for d in extras["s3"])
    assert "gds_stream.storage" in tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["packages"]


def test_large_field_files_upload_in_parts(tmp_path, bucket, s3_server, monkeypatch):
    from gds_stream.storage import upload as up

    monkeypatch.setattr(up, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part
    rows = np.random.default_rng(1).standard_normal((1_600_000, 2)).astype("<f4")  # 6.4 MB/field
    (tmp_path / "big.bin").write_bytes(rows.tobytes())
    url = f"s3://{bucket}/big"
    gds_stream.convert(tmp_path / "big.bin", url, raw_fields=["a", "b"], progress=False)
    cl = s3_client(s3_server)
    objs = cl.list_objects_v2(Bucket=bucket, Prefix="big/data-")["Contents"]
    assert objs and all(o["ETag"].strip('"').endswith("-2") for o in objs), \
        [o["ETag"] for o in objs]  # two parts each
    ds = gds_stream.open_dataset(url)
    assert ds.read("b").tobytes() == np.ascontiguousarray(rows[:, 1]).tobytes()


def test_bench_compare_source_s3_smoke(tmp_path):
    import json

    r = subprocess.run([sys.executable, "-m", "bench.compare", "--source", "s3", "--smoke",
                        "--workdir", str(tmp_path / "data"), "--json", str(tmp_path / "r.json"),
                        "--range-sizes", "1,2"],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not a cloud link" in r.stdout and "checksums of every batch equal" in r.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["checksums_equal"] and [row["source"] for row in doc["rows"]] == [
        "local", "s3 (no cache)", "s3 (cache warm)"]
    assert doc["cache"]["hits"] > 0
    sweep = doc["range_sweep"]
    assert [row["range_mib"] for row in sweep] == [1, 2]
    assert all(row["no_cache_gb_s"] > 0 and row["cache_cold_gb_s"] > 0 for row in sweep)
    r = subprocess.run([sys.executable, "-m", "bench.compare", "--range-sizes", "1"],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "it goes with --source s3" in r.stderr, r.stderr


def test_cli_refusals_on_urls_are_one_line(bucket):
    for args, pattern in ((["info", f"s3://{bucket}/missing"], "manifest.json: no such object"),
                          (["verify", "gs://b/set", "--no-progress"], "unsupported URL scheme")):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and pattern in r.stderr, r.stderr


def test_verify_finds_a_corrupt_block_in_an_object(local, remote, s3_server):
    r = _cli("verify", remote, "--no-progress")
    assert r.returncode == 0 and f"{remote}: all" in r.stdout and "blocks ok" in r.stdout, r
    key = corrupt_label_object(remote, s3_server)
    r = _cli("verify", remote, "--no-progress")
    assert r.returncode == 1 and f"{key}: field 'label' block 0" in r.stderr, r.stderr


def test_verify_reads_checks_object_blocks(local, remote, s3_server, tmp_path):
    kw = dict(batch_points=50_000, shuffle=True, seed=1)
    _same(_epochs(local, epochs=1, **kw), _epochs(remote, epochs=1, verify_reads=True, **kw))
    key = corrupt_label_object(remote, s3_server)
    for cache in ({}, {"cache_dir": tmp_path / "c", "cache_bytes": 64 << 20}):
        with gds_stream.open_loader(remote, backend="fallback", device="cpu", verify_reads=True,
                                    fields=["label"], batch_points=50_000, **cache) as ld:
            with pytest.raises(LoaderError) as info:
                list(ld)
        assert f"{key}: field 'label' block 0" in " ".join(map(str, error_chain(info.value)))


def test_a_dataset_replaced_while_being_opened_is_opened_again(local, tmp_path, bucket,
                                                                monkeypatch):
    from gds_stream.storage import s3 as s3mod

    url = f"s3://{bucket}/race"
    upload(local.path, url)
    (tmp_path / "b.bin").write_bytes(np.arange(3000, dtype="<f4").tobytes())
    real_head, fired = s3mod.S3Client.head, []

    def head(self, key):
        if "/data-" in key and not fired:  # after the manifest was read: replace the dataset
            fired.append(key)
            gds_stream.convert(tmp_path / "b.bin", url, raw_fields=["x", "y", "z"],
                               progress=False, overwrite=True)
        return real_head(self, key)

    monkeypatch.setattr(s3mod.S3Client, "head", head)
    ds = gds_stream.open_dataset(url)
    assert fired and ds.num_points == 1000 and list(ds.schema) == ["x", "y", "z"]


def test_settings_come_from_the_aws_environment_and_storage_options_win(monkeypatch):
    from gds_stream.storage.s3 import DEFAULTS, _config

    env = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_SESSION_TOKEN": "tok",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-central-1",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config, knobs = _config({"region": "us-west-2", "max_retries": 3})
    assert config == {"access_key_id": "ak", "secret_access_key": "sk", "session_token": "tok",
                      "region": "us-west-2", "endpoint": "http://127.0.0.1:9"}
    assert knobs == {**DEFAULTS, "max_retries": 3.0}
    monkeypatch.delenv("AWS_REGION")
    assert _config(None)[0]["region"] == "eu-west-1"  # AWS_REGION, when set, wins over DEFAULT


def test_close_during_retries_does_not_wait_for_the_retry_budget(remote, s3_server):
    faults = Faults(error503=1.0)
    with FaultProxy(s3_server, faults) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={
            "endpoint": proxy.url, "max_retries": 10_000, "retry_backoff_s": 0.5,
            "retry_max_backoff_s": 2.0, "timeout_s": 5.0})
        ld = gds_stream.open_loader(ds, backend="fallback", device="cpu", fields=["x"],
                                    batch_points=50_000)
        it = iter(ld)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", _catch(lambda: next(it))))
        t.start()
        deadline = time.monotonic() + 60
        while faults.counts["503"] < 3:  # retrying by now
            assert time.monotonic() < deadline, f"no retries seen: {faults.counts}"
            time.sleep(0.01)
        run_with_timeout(ld.close, 60)  # the budget would take hours
        t.join(60)
        assert not t.is_alive()
    assert isinstance(box["r"], LoaderError), box


def _catch(fn):
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        return exc


# -- storage keywords of open_loader ----------------------------------------------------------
def test_open_loader_takes_storage_options_and_a_cache_for_a_url(local, remote, s3_server,
                                                                  tmp_path):
    faults = Faults(error503=0.3)
    with FaultProxy(s3_server, faults) as proxy:
        kw = dict(batch_points=50_000, shuffle=True, seed=4)
        got = _epochs(remote, storage_options={"endpoint": proxy.url, **FAST},
                      cache_dir=tmp_path / "cache", cache_bytes=64 << 20, **kw)
        assert faults.counts["503"] > 0  # the loader really went through the given endpoint
    _same(_epochs(local, **kw), got)
    assert any((tmp_path / "cache").rglob("*")), "no block landed in the cache"


def test_storage_keywords_with_a_local_path_or_an_open_dataset_are_refused(local, remote):
    with pytest.raises(LoaderError, match="apply to object-store URLs"):
        gds_stream.open_loader(local.path, device="cpu", batch_points=1000,
                               storage_options={"region": "x"})
    ds = gds_stream.open_dataset(remote)
    with pytest.raises(LoaderError, match="cache_dir=, cache_bytes=.*already open; pass them "
                                          "to open_dataset"):
        gds_stream.open_loader(ds, device="cpu", batch_points=1000, cache_dir="c",
                               cache_bytes=1 << 30)
    with pytest.raises(DatasetError, match="storage_options must be a dict"):
        gds_stream.open_loader(remote, device="cpu", batch_points=1000,
                               storage_options="endpoint=http://x")


def test_object_store_reads_split_at_the_remote_task_size(local, remote, monkeypatch):
    """Ranged GETs are split at REMOTE_TASK_BYTES (chosen by measurement for object stores),
    not at the local files' TASK_BYTES; the epoch is unchanged."""
    from fallback import loader as fb
    from gds_stream.storage.remote import RemoteFiles

    monkeypatch.setattr(fb, "REMOTE_TASK_BYTES", 64 << 10)
    monkeypatch.setattr(fb, "TASK_BYTES", 1 << 20)
    sizes: list[int] = []
    real = RemoteFiles.read_into

    def spy(self, name, offset, view, stop):
        sizes.append(len(view))
        return real(self, name, offset, view, stop)

    monkeypatch.setattr(RemoteFiles, "read_into", spy)
    want = _epochs(local.path, fields=["x", "pid"], batch_points=200_000)
    got = _epochs(remote, fields=["x", "pid"], batch_points=200_000)
    _same(got, want)
    assert sizes and max(sizes) == 64 << 10


def test_a_column_stack_is_read_straight_into_its_columns_from_s3_too(local, remote):
    import torch

    kw = dict(batch_points=50_000, fields=["pid", "x", "y", "label"], dtype=torch.float64,
              stack={"feat": ["x", "y", "label"]})  # y read into its column, x/label cast
    want = _epochs(local.path, **kw)
    got = _epochs(remote, stack_layout="columns", **kw)
    _same(got, want)
    assert got[0][0]["feat"].shape == (50_000, 3)
