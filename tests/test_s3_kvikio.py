"""Object storage on a CUDA device (issue 19): KvikIO's ``RemoteFile`` reads the ranges where
KvikIO can read remote files, never on a CPU-only machine; the choice is in
``loader.backend_reason``. Through the simulated CUDA and KvikIO of ``test_gds`` (any machine)
and, marked ``gpu``, for real."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import gds_stream
from gds_stream import capability
from gds_stream.errors import BackendUnavailable, LoaderError
from helpers import batch_bytes_equal, error_chain, make_dataset
from s3_fixtures import (bucket, corrupt_label_object, s3_client, s3_server,  # noqa: F401
                         upload)
from test_gds import simulated_gpu  # noqa: F401 - the fixture

SCANS = [40_000, 0, 90_000, 25_000]


class _FakeRemoteFile:
    """``kvikio.RemoteFile`` against the test's S3 server: ranged GETs without ``If-Match``
    (KvikIO sends none), into host memory only (what the loader must ask for)."""

    opened: list = []
    reads = 0

    def __init__(self, bucket_name, key, nbytes):
        self._bucket, self._key, self._nbytes = bucket_name, key, nbytes
        _FakeRemoteFile.opened.append(key)

    @classmethod
    def open_s3(cls, bucket_name, object_name, nbytes=None):
        return cls(bucket_name, object_name, nbytes)

    def pread(self, buf, size, file_offset=0):
        import os

        assert isinstance(buf, np.ndarray), "RemoteFile reads into host memory only"
        assert file_offset + size <= self._nbytes, "read past the object's end"
        body = s3_client(os.environ["AWS_ENDPOINT_URL"]).get_object(
            Bucket=self._bucket, Key=self._key,
            Range=f"bytes={file_offset}-{file_offset + size - 1}")["Body"].read()
        buf[:len(body)] = np.frombuffer(body, np.uint8)
        _FakeRemoteFile.reads += 1

        class _Future:
            def get(self):
                return len(body)

        return _Future()

    def close(self):
        pass


@pytest.fixture
def remote_kvikio(simulated_gpu, monkeypatch):  # noqa: F811
    kvikio = sys.modules["kvikio"]
    monkeypatch.setattr(kvikio, "RemoteFile", _FakeRemoteFile, raising=False)
    monkeypatch.setattr(kvikio, "is_remote_file_available", lambda: True, raising=False)
    _FakeRemoteFile.opened, _FakeRemoteFile.reads = [], 0
    return kvikio


@pytest.fixture
def cpu_fallback(monkeypatch):
    """``auto``'s fallback built on the CPU (the simulated CUDA serves the GPU-direct backend
    only): what is tested is which backend ``auto`` chooses, and why."""
    from gds_stream import backends

    real = backends._fallback
    monkeypatch.setattr(backends, "_fallback",
                        lambda ds, options: real(ds, {**options, "device": "cpu"}))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("kvikio-remote"), SCANS, seed=5)


@pytest.fixture
def remote(local, bucket):  # noqa: F811
    url = f"s3://{bucket}/sets/k"
    upload(local.path, url)
    return url


@pytest.mark.parametrize("kw", [dict(batch_points=30_000, shuffle=True, seed=2),
                                dict(batch_scans=1, shuffle=True, seed=1, fields=["x"])])
def test_auto_reads_through_kvikio_remote_file_and_matches_the_fallback(local, remote,
                                                                       remote_kvikio, kw):
    with gds_stream.open_loader(remote, device="cuda", num_threads=2, **kw) as g, \
            gds_stream.open_loader(local, backend="fallback", device="cpu", **kw) as f:
        assert g.backend == "gds-remote", g.backend_reason
        assert "KvikIO's RemoteFile reads the object ranges" in g.backend_reason
        for epoch in (0, 1):
            g.set_epoch(epoch), f.set_epoch(epoch)
            got, want = list(g), list(f)
            assert len(got) == len(want) == len(g)
            for i, (a, b) in enumerate(zip(got, want)):
                assert batch_bytes_equal({k: v.cpu() for k, v in a.items()}, b), i
    assert _FakeRemoteFile.reads > 0 and all("/data-" in k for k in _FakeRemoteFile.opened)


def test_an_object_replaced_mid_epoch_is_an_error_never_mixed_bytes(local, remote, s3_server,
                                                                    remote_kvikio):  # noqa: F811
    _, bkt, prefix = gds_stream.storage.split_url(remote)
    cl = s3_client(s3_server)
    key = next(o["Key"] for o in cl.list_objects_v2(Bucket=bkt, Prefix=prefix)["Contents"]
               if o["Key"].endswith("/x.bin"))
    kw = dict(batch_points=20_000, fields=["x"])
    want = list(gds_stream.open_loader(local, backend="fallback", device="cpu", **kw))
    with gds_stream.open_loader(remote, device="cuda", num_threads=2, prefetch=1, **kw) as g:
        assert g.backend == "gds-remote"
        it = iter(g)
        first = next(it)
        body = bytearray(cl.get_object(Bucket=bkt, Key=key)["Body"].read())
        body[:] = bytes(len(body))  # same size, other bytes: only the ETag tells
        cl.put_object(Bucket=bkt, Key=key, Body=bytes(body))
        with pytest.raises(LoaderError) as info:
            for i, b in enumerate(it, 1):  # batches read before the swap are still whole
                assert batch_bytes_equal({k: v.cpu() for k, v in b.items()}, want[i]), i
    assert batch_bytes_equal({k: v.cpu() for k, v in first.items()}, want[0])
    assert f"{key}: the object changed since the dataset was opened" in " ".join(
        map(str, error_chain(info.value)))


def test_verify_reads_runs_after_the_etag_check(remote, s3_server, remote_kvikio):
    key = corrupt_label_object(remote, s3_server)
    with gds_stream.open_loader(remote, device="cuda", num_threads=2, verify_reads=True,
                                fields=["label"], batch_points=30_000) as g:
        assert g.backend == "gds-remote"
        with pytest.raises(LoaderError) as info:
            list(g)
    assert f"{key}: field 'label' block 0" in " ".join(map(str, error_chain(info.value)))


def test_a_cache_or_storage_options_keep_the_fallback_and_say_why(remote, tmp_path,
                                                                   remote_kvikio, cpu_fallback):
    with gds_stream.open_loader(remote, device="cuda", batch_points=30_000,
                                cache_dir=tmp_path / "c", cache_bytes=64 << 20) as ld:
        assert ld.backend == "fallback"
        assert "block cache (cache_dir=), which KvikIO's RemoteFile would bypass" in \
            ld.backend_reason
    with pytest.raises(BackendUnavailable, match="storage_options region.*AWS "
                                                 "environment only"):
        gds_stream.open_loader(remote, backend="gds", device="cuda", batch_points=30_000,
                               storage_options={"region": "us-east-1"})
    assert _FakeRemoteFile.opened == []


def test_kvikio_without_remote_support_or_a_cpu_device_never_opens_a_remote_file(
        remote, remote_kvikio, cpu_fallback, monkeypatch):
    with gds_stream.open_loader(remote, device="cpu", batch_points=30_000) as ld:
        assert ld.backend == "fallback" and "is not CUDA" in ld.backend_reason
    monkeypatch.setattr(remote_kvikio, "is_remote_file_available", lambda: False)
    with gds_stream.open_loader(remote, device="cuda", batch_points=30_000) as ld:
        assert ld.backend == "fallback"
        assert "built without remote-file support" in ld.backend_reason
    with pytest.raises(BackendUnavailable, match="KvikIO cannot read remote files: kvikio "
                                                 "simulated was built without remote-file"):
        gds_stream.open_loader(remote, backend="gds", device="cuda", batch_points=30_000)
    assert _FakeRemoteFile.opened == []


def test_the_remote_probe_is_false_without_cuda(monkeypatch):
    monkeypatch.setattr(capability, "probe_gds",
                        lambda: capability.GDSCapability("unavailable", "no CUDA device"))
    assert capability.probe_remote() == (False, "no CUDA device")


def test_env_says_how_object_storage_is_read(remote_kvikio, monkeypatch):
    row = dict(capability.environment_report())["object storage"]
    assert row.startswith("KvikIO's RemoteFile on a CUDA device"), row
    monkeypatch.setattr(remote_kvikio, "is_remote_file_available", lambda: False)
    row = dict(capability.environment_report())["object storage"]
    assert row.startswith("the fallback through obstore (KvikIO's RemoteFile unavailable: "
                          "kvikio simulated was built without remote-file support"), row


def _gpu_remote_reason() -> str | None:
    ok, why = capability.probe_remote()
    return None if ok else why


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_remote_reason() is not None,
                    reason=f"KvikIO remote reads unavailable: {_gpu_remote_reason()}")
def test_gpu_kvikio_remote_file_matches_the_fallback(local, remote):
    kw = dict(batch_points=30_000, shuffle=True, seed=3)
    with gds_stream.open_loader(remote, device="cuda", **kw) as g, \
            gds_stream.open_loader(local, backend="fallback", device="cpu", **kw) as f:
        assert g.backend == "gds-remote", g.backend_reason
        for a, b in zip(g, f):
            assert batch_bytes_equal({k: v.cpu() for k, v in a.items()}, b)
