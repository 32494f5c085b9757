"""Object storage against a store that misbehaves or is misconfigured: responses of another
version, endpoints that are not URLs, fault options out of range, a missing bucket, a manifest
upload whose answer is lost, multipart parts that fail one at a time."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gds_stream
from gds_stream.errors import DatasetError, LoaderError
from helpers import error_chain, make_dataset
from s3_fixtures import FaultProxy, Faults, bucket, s3_client, s3_server, upload  # noqa: F401

FAST = {"retry_backoff_s": 0.01, "retry_max_backoff_s": 0.05, "timeout_s": 5.0}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("s3hard"), [3000, 5000], seed=5)


def test_a_response_of_another_version_is_refused(local, bucket, s3_server):
    """A store (or a cache in front of it) that ignores If-Match and serves a replaced object:
    the response's ETag differs from the one opened, and the batch fails naming the object."""
    url = f"s3://{bucket}/d"
    upload(local.path, url)
    with FaultProxy(s3_server, Faults(other_etag=True)) as proxy:
        with gds_stream.open_loader(url, backend="fallback", device="cpu", batch_points=2000,
                                    storage_options={"endpoint": proxy.url, **FAST}) as loader:
            with pytest.raises(LoaderError) as info:
                list(loader)
    text = " | ".join(map(str, error_chain(info.value)))
    assert "the object changed since the dataset was opened" in text
    assert f"s3://{bucket}/d/data-" in text


@pytest.mark.parametrize("endpoint", ["localhost:9000", "127.0.0.1:9000", "http://",
                                      "http://127.0.0.1:99999", "not a url", "ftp://h:1"])
def test_an_endpoint_that_is_not_a_url_is_refused_at_once(endpoint):
    with pytest.raises(DatasetError, match=r"s3://bkt: storage_options endpoint=.* is not an "
                                           r"endpoint URL"):
        gds_stream.open_dataset("s3://bkt/ds", storage_options={"endpoint": endpoint})


def test_the_cli_refuses_a_bad_endpoint_in_one_line(tmp_path):
    env = {**os.environ, "AWS_ENDPOINT_URL": "localhost:9000", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    r = subprocess.run([sys.executable, "-m", "gds_stream", "info", "s3://bkt/ds"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "is not an endpoint URL" in r.stderr, r.stderr


@pytest.mark.parametrize("key", ["aws_endpoint", "endpoint_url", "aws_endpoint_url", "ENDPOINT"])
def test_every_spelling_of_an_http_endpoint_allows_http(local, bucket, s3_server, monkeypatch,
                                                        key):
    url = f"s3://{bucket}/d"
    upload(local.path, url)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    endpoint = s3_server.upper() if key == "ENDPOINT" else s3_server  # HTTP://127.0.0.1:...
    ds = gds_stream.open_dataset(url, storage_options={key: endpoint, **FAST})
    assert ds.num_points == local.num_points


@pytest.mark.parametrize("options, message", [
    ({"max_retries": -1}, r"max_retries=-1 is not usable: a whole number in 0\.\.1,000,000"),
    ({"max_retries": 1.5}, r"max_retries=1\.5 is not usable"),
    ({"max_retries": "abc"}, r"max_retries='abc' is not usable"),
    ({"max_retries": float("nan")}, r"max_retries=nan is not usable"),
    ({"timeout_s": None}, r"timeout_s=None is not usable: a number of seconds above 0"),
    ({"timeout_s": float("inf")}, r"timeout_s=inf is not usable"),
    ({"timeout_s": 0}, r"timeout_s=0 is not usable"),
    ({"connect_timeout_s": -1}, r"connect_timeout_s=-1 is not usable"),
    ({"retry_backoff_s": True}, r"retry_backoff_s=True is not usable"),
])
def test_fault_options_out_of_range_are_refused(options, message):
    with pytest.raises(DatasetError, match=r"s3://bkt: storage_options " + message):
        gds_stream.open_dataset("s3://bkt/ds", storage_options=options)


def test_a_missing_bucket_is_said_as_such_before_any_conversion(tmp_path, s3_server):
    with pytest.raises(DatasetError, match=r"s3://no-such-bucket-gds: no such bucket"):
        gds_stream.open_dataset("s3://no-such-bucket-gds/ds", storage_options=FAST)
    called = []
    from gds_stream.storage.upload import convert_to_url

    with pytest.raises(DatasetError, match=r"s3://no-such-bucket-gds: no such bucket"):
        convert_to_url(called.append, "s3://no-such-bucket-gds/ds", False, FAST)
    assert called == []  # nothing was converted first


def test_a_failed_open_keeps_no_cache_lock_open(bucket, tmp_path):
    def locks() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").endswith("/.lock")
            except OSError:
                pass
        return n

    before = locks()
    kept = []
    for _ in range(5):
        try:
            gds_stream.open_dataset(f"s3://{bucket}/nothing", cache_dir=tmp_path / "cache",
                                    cache_bytes=1 << 30, storage_options=FAST)
        except DatasetError as exc:
            kept.append(exc)  # the errors (and their tracebacks) stay alive
    assert len(kept) == 5 and locks() == before


def test_a_manifest_upload_whose_answer_is_lost_is_checked_in_the_store(local, bucket,
                                                                        s3_server, caplog):
    """The manifest PUT reached the store, its answers were cut: the new dataset is live, so
    the upload succeeds (with a warning) and the objects of the one it replaced go."""
    from gds_stream.storage.s3 import S3Client
    from gds_stream.storage.upload import _existing, upload_dir

    def generations() -> set[str]:
        keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=bucket)["Contents"]]
        return {k.split("/")[1] for k in keys if k.split("/")[1].startswith("data-")}

    url = f"s3://{bucket}/d"
    upload(local.path, url)
    old = generations()
    faults = Faults(lose_put_answer="/manifest.json")
    with FaultProxy(s3_server, faults) as proxy, caplog.at_level("WARNING"):
        client = S3Client(bucket, {"endpoint": proxy.url, **FAST, "max_retries": 1})
        upload_dir(client, local.path, "d", _existing(client, "d/manifest.json"))
    assert faults.counts["answer-lost"] >= 1
    assert "the store holds it: the new dataset is live" in caplog.text
    now = generations()
    assert len(now) == 1 and not (now & old)  # the replaced generation was deleted
    assert np.array_equal(gds_stream.open_dataset(url).read("pid"), local.read("pid"))


def test_multipart_parts_are_retried_one_at_a_time(tmp_path, bucket, s3_server, monkeypatch):
    """Every third part upload answers 503 once: each part is retried alone, in the same
    multipart upload, instead of the whole file being sent again."""
    from gds_stream.format import FieldSpec
    from gds_stream.storage import upload as up

    monkeypatch.setattr(up, "MULTIPART_BYTES", 5 << 20)
    ds = make_dataset(tmp_path, [1_500_000], [FieldSpec("a", np.dtype("<f8"))])  # 12 MB
    faults = Faults(part_503_every=3)
    with FaultProxy(s3_server, faults) as proxy:
        from gds_stream.storage.s3 import S3Client

        client = S3Client(bucket, {"endpoint": proxy.url, **FAST})
        up.upload_dir(client, ds.path, "m", None)
    assert faults.counts["503"] >= 1
    assert faults.counts["multipart-create"] == 1  # one upload, its failed part sent again
    assert not s3_client(s3_server).list_multipart_uploads(Bucket=bucket).get("Uploads")
    opened = gds_stream.open_dataset(f"s3://{bucket}/m")
    assert np.array_equal(opened.read("a"), ds.read("a"))
