"""A real S3 protocol server (moto) for the object-storage tests, and a fault-injecting HTTP
proxy to put between a client and it.

Import the fixtures into a test module (``from s3_fixtures import s3_server, bucket``); the
server runs on 127.0.0.1 for the session, ``AWS_*`` in the environment point at it (so
subprocesses started by a test reach it too), and it is stopped at the end.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed "
                                  "(pip install 'moto[server]'; it is in the dev extra)")
pytest.importorskip("obstore", reason="obstore is not installed (pip install 'gds-stream[s3]')")

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """``http://127.0.0.1:PORT`` of a moto S3 server, with ``AWS_*`` set to reach it."""
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*ENV, "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update(ENV, AWS_ENDPOINT_URL=url)
    os.environ.pop("AWS_REGION", None)
    try:
        yield url
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def readme_env(request, buckets=("my-bucket",)) -> dict[str, str]:
    """For the README's "Object storage" examples: a moto server until the test ends, the
    ``buckets`` created, the scratch directory's ``tiles/`` (the test's ``tmp_path``) uploaded
    under ``s3://my-bucket/tiles/`` (the example of object-store inputs), and the ``AWS_*``
    environment that reaches it."""
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    request.addfinalizer(srv.stop)
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    for b in buckets:
        make_bucket(url, b)
    tiles = Path(request.getfixturevalue("tmp_path")) / "tiles"
    for p in sorted(tiles.glob("*")) if "my-bucket" in buckets else ():
        s3_client(url).upload_file(str(p), "my-bucket", f"tiles/{p.name}")
    return {**ENV, "AWS_ENDPOINT_URL": url}


def make_bucket(endpoint: str, name: str | None = None) -> str:
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the session's server."""
    return make_bucket(s3_server)


def upload(local_dataset_path: str | Path, url: str, **storage) -> None:
    """Publish a local dataset directory at ``url`` as ``convert -o URL`` does."""
    from gds_stream.storage import split_url
    from gds_stream.storage.s3 import S3Client
    from gds_stream.storage.upload import upload_dir

    _, bucket, prefix = split_url(url)
    upload_dir(S3Client(bucket, storage or None), Path(local_dataset_path), prefix, None)


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])


def corrupt_label_object(url: str, endpoint: str) -> str:
    """Flip a byte of the ``label`` field's object of the dataset at ``url`` (a new version:
    a dataset opened after this sees the new ETag and the corrupt block); returns its key."""
    from gds_stream.storage import split_url

    _, bkt, prefix = split_url(url)
    cl = s3_client(endpoint)
    key = next(o["Key"] for o in cl.list_objects_v2(Bucket=bkt, Prefix=prefix)["Contents"]
               if o["Key"].endswith("/label.bin"))
    body = bytearray(cl.get_object(Bucket=bkt, Key=key)["Body"].read())
    body[100] ^= 0xFF
    cl.put_object(Bucket=bkt, Key=key, Body=bytes(body))
    return key


# -- the fault-injecting proxy -----------------------------------------------------------------
@dataclass
class Faults:
    """Probabilities per ranged GET (each request draws one outcome), and fixed behaviours."""
    error503: float = 0.0
    reset: float = 0.0
    delay: float = 0.0
    truncate: float = 0.0
    #: A shorter body with a Content-Length that matches it (a server that lies about a range).
    short: float = 0.0
    delay_s: float = 0.3
    #: Path substrings answered 403 (any method).
    deny: tuple[str, ...] = ()
    #: Only ranged GETs of paths holding this are faulted (the field objects, not the manifest).
    only: str = "/data-"
    #: When > 0: bodies of faulted paths go out in 64 KiB pieces this many seconds apart.
    trickle_s: float = 0.0
    seed: int = 0
    #: Ranged GETs of faulted paths answer with another ETag (a store that ignores If-Match
    #: serving a replaced object).
    other_etag: bool = False
    #: When > 0: every this-many-th multipart part upload (PUT ...partNumber=) answers 503.
    part_503_every: int = 0
    #: Path substring of PUTs that reach the store but whose answer is lost (a cut connection).
    lose_put_answer: str = ""
    counts: Counter = field(default_factory=Counter)


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` that fails ranged GETs as
    ``faults`` says: 503 answers, connection resets, delays, bodies cut short."""

    def __init__(self, upstream: str, faults: Faults):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # resets and cuts are the point here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy",
                                        daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def _draw(self) -> str:
        f = self.faults
        with self._lock:
            x = self._rng.random()
        for name, p in (("503", f.error503), ("reset", f.reset), ("delay", f.delay),
                        ("truncate", f.truncate), ("short", f.short)):
            if x < p:
                return name
            x -= p
        return "ok"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        f = self.faults
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        if any(d in h.path for d in f.deny):
            with self._lock:
                f.counts["403"] += 1
            _answer(h, 403, b"<Error><Code>AccessDenied</Code><Message>Access Denied"
                            b"</Message></Error>")
            return
        fault = (self._draw() if h.command == "GET" and "Range" in h.headers
                 and f.only in h.path else "ok")
        if h.command == "PUT" and "partNumber=" in h.path and f.part_503_every:
            with self._lock:
                f.counts["part"] += 1
                fail = f.counts["part"] % f.part_503_every == 0
            if fail:
                fault = "503"
        if h.command == "POST" and h.path.rstrip("=").endswith("?uploads"):
            with self._lock:
                f.counts["multipart-create"] += 1
        with self._lock:
            f.counts[fault] += 1
        if fault == "503":
            _answer(h, 503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request "
                            b"rate.</Message></Error>")
            return
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault == "delay":
            time.sleep(f.delay_s)
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() != "connection"}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if h.command == "PUT" and f.lose_put_answer and f.lose_put_answer in h.path:
            with self._lock:
                f.counts["answer-lost"] += 1
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server",
                                 "date"):
                if (k.lower() == "etag" and f.other_etag and h.command == "GET"
                        and "Range" in h.headers and f.only in h.path):
                    v = '"0123456789abcdef0123456789abcdef"'
                h.send_header(k, v)
        if fault == "short" and len(data) > 1:
            data = data[:len(data) // 2]
        h.send_header("Content-Length", resp.getheader("Content-Length", "0")
                      if h.command == "HEAD" else str(len(data)))
        if fault == "truncate" and len(data) > 1:
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.end_headers()
        if h.command == "HEAD":
            return
        if f.trickle_s > 0 and f.only in h.path:
            for i in range(0, len(data), 64 << 10):
                h.wfile.write(data[i:i + (64 << 10)])
                h.wfile.flush()
                time.sleep(f.trickle_s)
            return
        h.wfile.write(data)


def _answer(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
