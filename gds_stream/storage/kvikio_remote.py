"""Object-store ranges read by KvikIO (``kvikio.RemoteFile``), for the GPU-direct backend on a
CUDA device (:mod:`gds_stream.gds`, route ``remote``).

KvikIO reads a remote object with libcurl on its own C++ thread pool. Its device-memory path
bounces through pinned memory and copies on a CUDA stream it then synchronises — a blocking
stream, which waits for every kernel the training loop queued on PyTorch's legacy default
stream — so the loader asks it for **host** memory (plain HTTP reads, no CUDA call) into its
pinned ring and copies to the device on its own non-blocking stream, exactly like a local
file's ``host`` route.

KvikIO sends no ``If-Match``, so the ETag rule is kept differently: after a batch's reads have
landed and before it is handed out, :class:`VersionCheck` asks the store for every object's
ETag again (one ``HEAD`` per field object and batch); an object replaced before or during the
reads has another ETag by then, and the batch becomes a :class:`DatasetError` naming the object
instead of a batch of mixed bytes.

KvikIO takes its settings from the AWS environment only (``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``);
a dataset opened with ``storage_options`` settings, with ``AWS_REGION`` overriding
``AWS_DEFAULT_REGION``, or with a block cache (whose blocks the loader must read) is read by the
fallback instead, and :func:`unavailable` says why.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import BackendUnavailable
from .s3 import ObjectError

log = logging.getLogger(__name__)


def unavailable(dataset: Any) -> str | None:
    """Why KvikIO cannot read this remote dataset's objects as it was opened, or None."""
    client = dataset.client
    if dataset.cache is not None:
        return (f"{dataset.path} is read through a block cache (cache_dir=), which KvikIO's "
                f"RemoteFile would bypass")
    if client.overrides:
        return (f"{dataset.path} was opened with storage_options "
                f"{', '.join(client.overrides)}, and KvikIO's RemoteFile reads the AWS "
                f"environment only")
    region, default = os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION")
    if not default or (region and region != default):
        return ("KvikIO's RemoteFile takes the region from AWS_DEFAULT_REGION, which is "
                + ("not set" if not default else f"{default!r} while AWS_REGION is {region!r}"))
    return None


class KvikioObject:
    """One field object opened with ``kvikio.RemoteFile.open_s3``, with the ``pread`` of a
    ``CuFile`` (``task_size`` is KvikIO's remote default here: ignored)."""

    def __init__(self, kvikio: Any, bucket: str, key: str, size: int, url: str):
        self.url = url
        try:
            self._file = kvikio.RemoteFile.open_s3(bucket, key, size)
        except Exception as exc:  # noqa: BLE001 - KvikIO raises RuntimeError and friends
            raise BackendUnavailable(f"{url}: KvikIO cannot open the object ({exc})") from exc

    def pread(self, buf: Any, size: int, file_offset: int, task_size: int | None = None) -> Any:
        return self._file.pread(buf, size, file_offset)

    def close(self) -> None:
        self._file.close()


class VersionCheck:
    """The GPU-direct backend's check after each batch (its ``verifier`` slot): every field
    object still has the ETag recorded when the dataset was opened."""

    def __init__(self, client: Any, objects: dict[str, Any], then: Any = None):
        self._client = client
        self._objects = dict(objects)
        self._then = then  # the verify_reads block verifier, checked after the ETags

    def check(self, segments: Any = None) -> None:
        for obj in self._objects.values():
            now = self._client.head(obj.key)
            if now.etag != obj.etag:
                raise ObjectError(f"{self._client.url(obj.key)}: the object changed since the "
                                  f"dataset was opened (ETag {obj.etag}, now {now.etag}); it "
                                  f"was replaced; open the dataset again")
        if self._then is not None:
            self._then.check(segments)
