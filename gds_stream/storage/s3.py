"""S3 and S3-compatible object stores (MinIO, Ceph, R2) through ``obstore`` (Rust
``object_store``: its calls release the GIL, so reader threads fetch ranges in parallel).

Configuration: the standard AWS environment — ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_ENDPOINT_URL`` — each
overridable by a ``storage_options`` dict (keys ``access_key_id``, ``secret_access_key``,
``session_token``, ``region``, ``endpoint``, or any other ``obstore`` S3 config key), plus the
fault handling keys of :data:`DEFAULTS` (``max_retries``, ``retry_backoff_s``,
``retry_max_backoff_s``, ``timeout_s``, ``connect_timeout_s``).

Faults: every request is retried here (``obstore``'s own retries are off, so the last error is
known and named): 5xx, 429, timeouts, resets and short bodies are retried ``max_retries`` times
with exponential backoff and full jitter, then a :class:`DatasetError` names the key, the byte
range and the last error; 403/401 and 404 fail at once naming the key. Every range read carries
``If-Match`` with the ETag recorded when the dataset was opened, so an object replaced since is
an error naming the key, never bytes of two versions in one batch.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

from ..errors import DatasetError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The fault-handling options (``storage_options`` keys) and their defaults.
DEFAULTS: dict[str, float] = {
    "max_retries": 8,            # attempts after the first, per request
    "retry_backoff_s": 0.1,      # first backoff; doubles per attempt, full jitter
    "retry_max_backoff_s": 10.0,  # cap of one backoff
    "timeout_s": 60.0,           # whole request (connect + response + body)
    "connect_timeout_s": 10.0,
}
#: Environment variable -> ``obstore`` S3 config key (later entries win over earlier ones).
ENV = (("AWS_ACCESS_KEY_ID", "access_key_id"), ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
       ("AWS_SESSION_TOKEN", "session_token"), ("AWS_DEFAULT_REGION", "region"),
       ("AWS_REGION", "region"), ("AWS_ENDPOINT_URL", "endpoint"))
_STATUS = re.compile(r"status(?: code)?:? (\d{3})")
#: Per thread: the event that abandons retries (a loader's stop event, see :func:`cancel_on`).
_local = threading.local()


@contextmanager
def cancel_on(stop: threading.Event | None) -> Iterator[None]:
    """Within this block, this thread's requests stop retrying once ``stop`` is set: a backoff
    is cut short and no further attempt starts (the request in flight still ends by itself,
    within ``timeout_s``)."""
    prev = getattr(_local, "stop", None)
    _local.stop = stop
    try:
        yield
    finally:
        _local.stop = prev


@dataclass(frozen=True)
class ObjectVersion:
    """One object as it was when the dataset was opened."""
    key: str
    size: int
    etag: str


class ObjectError(DatasetError):
    """A request failed for good (after the retry budget, or at once for 403/404)."""


#: The smallest value each fault-handling option takes (``timeout_s`` and
#: ``connect_timeout_s`` must be above it), and the largest.
_RANGES: dict[str, tuple[float, float]] = {
    "max_retries": (0, 1_000_000), "retry_backoff_s": (0, 3600), "retry_max_backoff_s": (0, 3600),
    "timeout_s": (0, 86400), "connect_timeout_s": (0, 86400)}
#: ``storage_options`` keys that name the endpoint (``obstore``'s spellings, any case).
_ENDPOINT_KEYS = ("endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url")


def _knob(name: str, value: Any) -> float:
    """A fault-handling option, checked: a finite number in its range (``max_retries`` a whole
    one, the timeouts above 0)."""
    import math

    lo, hi = _RANGES[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok and isinstance(value, str):  # from a config file or the environment
        try:
            value, ok = float(value), True
        except ValueError:
            ok = False
    ok = ok and math.isfinite(value) and lo <= value <= hi
    if ok and name == "max_retries":
        ok = float(value).is_integer()
    if ok and name in ("timeout_s", "connect_timeout_s"):
        ok = value > 0
    if not ok:
        kind = ("a whole number" if name == "max_retries" else "a number of seconds")
        bound = (f"in {lo:,.0f}..{hi:,.0f}" if name not in ("timeout_s", "connect_timeout_s")
                 else f"above 0 and at most {hi:,.0f}")
        raise DatasetError(f"storage_options {name}={value!r} is not usable: {kind} {bound}")
    return float(value)


def _endpoint(config: dict[str, Any]) -> str | None:
    """The endpoint ``config`` names (under any of obstore's spellings), checked to be an
    http(s) URL with a host (obstore panics on some others)."""
    from urllib.parse import urlsplit

    found = [(k, v) for k, v in config.items() if str(k).lower() in _ENDPOINT_KEYS]
    if not found:
        return None
    key, value = found[-1]
    text = str(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - a ValueError when the port is out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DatasetError(f"storage_options {key}={text!r} is not an endpoint URL: expected "
                           f"http://host[:port] or https://host[:port]")
    return text


def _config(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, float]]:
    options = dict(options or {})
    knobs = {k: _knob(k, options.pop(k, v)) for k, v in DEFAULTS.items()}
    config: dict[str, Any] = {}
    for var, key in ENV:
        if os.environ.get(var):
            config[key] = os.environ[var]
    config.update(options)
    return config, knobs


class S3Client:
    """One bucket, shared by a dataset and its loaders' reader threads (thread-safe)."""

    def __init__(self, bucket: str, storage_options: dict[str, Any] | None = None,
                 scheme: str = "s3"):
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError as exc:
            raise DatasetError(f"{scheme}://{bucket}: reading object storage needs obstore: "
                               f"pip install 'gds-stream[s3]' ({exc})") from exc
        self._obs = obstore
        self.bucket, self.scheme = bucket, scheme
        try:
            config, self.knobs = _config(storage_options)
        except DatasetError as exc:
            raise DatasetError(f"{scheme}://{bucket}: {exc}") from None
        #: The settings ``storage_options`` gave beyond the environment (not the fault knobs).
        self.overrides = sorted(set(storage_options or {}) - set(DEFAULTS))
        try:
            endpoint = _endpoint(config) or ""
        except DatasetError as exc:
            raise DatasetError(f"{scheme}://{bucket}: {exc}") from None
        client = {"timeout": timedelta(seconds=self.knobs["timeout_s"]),
                  "connect_timeout": timedelta(seconds=self.knobs["connect_timeout_s"]),
                  "allow_http": endpoint.lower().startswith("http://")}
        retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=1),
                 "backoff": {"init_backoff": timedelta(milliseconds=10),
                             "max_backoff": timedelta(milliseconds=10), "base": 2.0}}
        try:
            self.store = S3Store(bucket, config=config, client_options=client,
                                 retry_config=retry)
            # multipart uploads: each part is retried on its own inside obstore (retrying the
            # whole upload here would send every part again for one part's transient fault)
            k = self.knobs
            parts_retry = {"max_retries": int(k["max_retries"]),
                           "retry_timeout": timedelta(seconds=k["timeout_s"] * (
                               int(k["max_retries"]) + 1)),
                           "backoff": {"init_backoff": timedelta(
                                           seconds=max(k["retry_backoff_s"], 0.001)),
                                       "max_backoff": timedelta(
                                           seconds=max(k["retry_max_backoff_s"], 0.001)),
                                       "base": 2.0}}
            self._upload_store = S3Store(bucket, config=config, client_options=client,
                                         retry_config=parts_retry)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - obstore's family, ValueError, a panic
            raise DatasetError(f"{scheme}://{bucket}: cannot configure the object store "
                               f"({_first_line(exc)})") from exc
        self._lock = threading.Lock()
        #: Requests retried after a transient error, over this client's life.
        self.retries = 0
        self._warned_etag = False

    def url(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    # -- requests, with the retry policy --------------------------------------------------------
    def _call(self, key: str, what: str, fn: Callable[[], T], etag: str | None = None) -> T:
        from obstore.exceptions import (GenericError, NotFoundError, PermissionDeniedError,
                                        PreconditionError, UnauthenticatedError)

        k = self.knobs
        attempts = int(k["max_retries"]) + 1
        last: BaseException | None = None
        stop: threading.Event | None = getattr(_local, "stop", None)
        for attempt in range(attempts):
            if attempt:
                with self._lock:
                    self.retries += 1
                cap = min(k["retry_max_backoff_s"], k["retry_backoff_s"] * 2 ** (attempt - 1))
                pause = random.uniform(0, cap)  # full jitter: ranks never retry in step
                if stop is None:
                    time.sleep(pause)
                elif stop.wait(pause):
                    raise ObjectError(f"{self.url(key)}: {what} abandoned after {attempt} "
                                      f"attempts: the loader was closed") from last
            try:
                return fn()
            except DatasetError:  # decided by fn itself (an object changed): not retried
                raise
            except _LocalFileError as exc:  # the local side (a full disk): no retry helps
                raise exc.error from None
            except PreconditionError as exc:
                if etag is None:  # a request of ours that carried no ETag
                    raise ObjectError(f"{self.url(key)}: {what} failed: a precondition of the "
                                      f"store failed ({_first_line(exc)})") from exc
                raise ObjectError(f"{self.url(key)}: the object changed since the dataset was "
                                  f"opened (ETag {etag} no longer matches; {what}): it was "
                                  f"replaced; open the dataset again") from exc
            except (NotFoundError, FileNotFoundError) as exc:
                gone = " (removed since the dataset was opened)" if etag else ""
                raise ObjectError(f"{self.url(key)}: no such object{gone} (404, {what})") from exc
            except (PermissionDeniedError, UnauthenticatedError) as exc:
                raise ObjectError(f"{self.url(key)}: access denied ({what}): "
                                  f"{_first_line(exc)}; check the credentials "
                                  f"(AWS_ACCESS_KEY_ID, ...) and the bucket policy") from exc
            except (GenericError, _ShortBody, OSError) as exc:
                status = _status(exc)
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    if status in (401, 403):
                        raise ObjectError(f"{self.url(key)}: access denied ({status}, {what}): "
                                          f"{_first_line(exc)}; check the credentials "
                                          f"(AWS_ACCESS_KEY_ID, ...) and the bucket "
                                          f"policy") from exc
                    raise ObjectError(f"{self.url(key)}: {what} failed with status {status}: "
                                      f"{_first_line(exc)}") from exc
                last = exc
                log.debug("%s: %s failed (attempt %d of %d): %s", self.url(key), what,
                          attempt + 1, attempts, _first_line(exc))
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - any other obstore error, or a panic
                raise ObjectError(f"{self.url(key)}: {what} failed: {_first_line(exc)}") from exc
        assert last is not None  # max_retries >= 0 (checked): at least one attempt ran
        why = _plain_reason(last, k)
        raise ObjectError(f"{self.url(key)}: {what} failed {attempts} times; last error: "
                          f"{_first_line(last)}{f' ({why})' if why else ''}") from last

    def head(self, key: str) -> ObjectVersion:
        meta = self._call(key, "HEAD", lambda: self._obs.head(self.store, key))
        etag = str(meta["e_tag"] or "")
        if not etag and not self._warned_etag:
            self._warned_etag = True
            log.warning("%s: the store sent no ETag: an object replaced while a loader reads "
                        "it cannot be told from the one opened (nor a cache block of the old "
                        "one from the new)", self.url(key))
        return ObjectVersion(key, int(meta["size"]), etag)

    def _same_version(self, obj: ObjectVersion, result: Any, what: str) -> None:
        """The response to a read of ``obj`` is of the version opened: a store that ignores
        ``If-Match`` (or a cache in front of it) must not hand out another version's bytes."""
        if not obj.etag:
            return
        meta = getattr(result, "meta", None)
        got = meta.get("e_tag") if isinstance(meta, dict) else None
        if got and str(got) != obj.etag:
            raise ObjectError(f"{self.url(obj.key)}: the object changed since the dataset was "
                              f"opened (ETag {obj.etag}, the response's {got}; {what}): it was "
                              f"replaced; open the dataset again")

    def get(self, obj: ObjectVersion, start: int, end: int) -> Any:
        """Bytes ``[start, end)`` of ``obj`` (a buffer), if it still has the ETag of ``obj``."""
        if end <= start:
            return b""
        what = f"read of bytes {start}..{end}"
        opts: dict[str, Any] = {"range": (start, end)}
        if obj.etag:
            opts["if_match"] = obj.etag

        def fetch() -> Any:
            result = self._obs.get(self.store, obj.key, options=opts)
            self._same_version(obj, result, what)
            data = result.bytes()
            if len(data) != end - start:
                raise _ShortBody(f"the body held {len(data)} bytes, expected {end - start}")
            return data

        return self._call(obj.key, what, fetch, obj.etag)

    def get_to_file(self, obj: ObjectVersion, start: int, end: int, f: Any) -> None:
        """Stream bytes ``[start, end)`` of ``obj`` into the binary file ``f`` (rewritten from
        its start on every attempt), checked against the ETag like :meth:`get`. An ``OSError``
        of ``f`` itself (a full disk) is raised at once, not retried as a network fault."""
        opts: dict[str, Any] = {"range": (start, end)}
        if obj.etag:
            opts["if_match"] = obj.etag

        def fetch() -> None:
            local(f.seek, 0)
            local(f.truncate)
            got = 0
            result = self._obs.get(self.store, obj.key, options=opts)
            self._same_version(obj, result, f"read of bytes {start}..{end}")
            for chunk in result.stream(64 << 10):
                local(f.write, chunk)
                got += len(chunk)
            if got != end - start:
                raise _ShortBody(f"the body held {got} bytes, expected {end - start}")

        self._call(obj.key, f"read of bytes {start}..{end}", fetch, obj.etag)

    def read_into(self, obj: ObjectVersion, offset: int, view: memoryview) -> None:
        if offset + len(view) > obj.size:
            raise ObjectError(f"{self.url(obj.key)}: read of bytes {offset}..{offset + len(view)}"
                              f" runs past the end of the object ({obj.size} bytes)")
        if len(view):
            view[:] = memoryview(self.get(obj, offset, offset + len(view))).cast("B")

    def check_bucket(self) -> None:
        """Raise :class:`ObjectError` if the bucket itself does not exist (a HEAD's 404 cannot
        tell a missing bucket from a missing object; a listing's error body can)."""
        def first() -> None:
            for _ in self._obs.list(self.store, None, chunk_size=1):
                return

        try:
            self._call("", "LIST", first)
        except ObjectError as exc:
            if "NoSuchBucket" in str(exc.__cause__ or "") or "NoSuchBucket" in str(exc):
                raise ObjectError(f"{self.scheme}://{self.bucket}: no such bucket (create it "
                                  f"first, or check the name and the endpoint)") from None
            raise

    def list_sizes(self, prefix: str) -> int:
        """Total bytes of the objects under ``prefix/`` (bounds the manifest, as for a local
        directory)."""
        def total() -> int:
            return sum(int(m["size"]) for page in self._obs.list(self.store, prefix + "/"
                                                                   if prefix else None)
                       for m in page)
        return self._call(prefix or "/", "LIST", total)

    def list_objects(self, prefix: str) -> list[ObjectVersion]:
        """Every object under ``prefix/`` (the whole bucket for an empty prefix), with its size
        and ETag, in key order."""
        def objects() -> list[ObjectVersion]:
            return [ObjectVersion(str(m["path"]), int(m["size"]), str(m.get("e_tag") or ""))
                    for page in self._obs.list(self.store, prefix + "/" if prefix else None)
                    for m in page]
        return sorted(self._call(prefix or "/", "LIST", objects), key=lambda o: o.key)

    def put_file(self, key: str, path: str, multipart_bytes: int) -> str:
        """Upload a local file (multipart above ``multipart_bytes``); returns the new ETag."""
        from pathlib import Path

        size = os.path.getsize(path)
        multipart = size > multipart_bytes
        res = self._call(key, "upload", lambda: self._obs.put(
            self._upload_store if multipart else self.store, key, Path(path),
            use_multipart=multipart, chunk_size=max(5 << 20, multipart_bytes)))
        return str(res.get("e_tag") or "")

    def put_bytes(self, key: str, data: bytes) -> str:
        res = self._call(key, "upload", lambda: self._obs.put(self.store, key, data,
                                                              use_multipart=False))
        return str(res.get("e_tag") or "")

    def delete(self, key: str) -> None:
        self._call(key, "DELETE", lambda: self._obs.delete(self.store, key))


class _LocalFileError(Exception):
    """An ``OSError`` of a local file written during a request: not the network's, so the
    retry policy passes it on at once."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def local(op: Callable[..., T], *args: Any) -> T:
    """``op(*args)`` on a local file; its ``OSError`` is not retried as a network fault."""
    try:
        return op(*args)
    except OSError as exc:
        raise _LocalFileError(exc) from exc


class _ShortBody(Exception):
    """A response body shorter than the range asked for (a cut connection): retried."""


def _status(exc: BaseException) -> int | None:
    m = _STATUS.search(str(exc))
    return int(m.group(1)) if m else None


def _plain_reason(exc: BaseException, knobs: dict) -> str:
    """What a network error's first line leaves out, in plain words, from the detail an
    obstore error carries after it (a timeout and a cut body read alike there)."""
    text = str(exc)
    if "kind: Timeout" in text or "TimedOut" in text:
        return (f"timed out: no whole answer within timeout_s={knobs['timeout_s']:g} s, or no "
                f"connection within connect_timeout_s={knobs['connect_timeout_s']:g} s")
    if "IncompleteBody" in text or "UnexpectedEof" in text:
        return "the connection closed before the whole body arrived"
    if "ConnectionRefused" in text or "Connection refused" in text:
        return "connection refused: is the endpoint up?"
    if "ConnectionReset" in text or "Connection reset" in text:
        return "connection reset by the server"
    if "kind: Connect" in text:
        return "could not connect to the endpoint"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
