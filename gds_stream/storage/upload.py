"""Publishing a dataset to object storage: ``convert ... -o s3://bucket/prefix``.

The dataset is converted into a local temporary directory (the ordinary, validated writer),
then its field files are uploaded under a fresh ``data-<id>/`` prefix (multipart above
:data:`MULTIPART_BYTES`), and the manifest, naming those objects, is uploaded **last**: a reader
sees the previous dataset or the new one, never a partial one. With ``overwrite`` the manifest
is replaced last too, then the objects only the previous manifest named are deleted (a reader
still on the previous snapshot then gets a clear error naming the object, never mixed bytes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from .._schema import MANIFEST
from ..errors import ConversionError, DatasetError
from . import split_url

log = logging.getLogger(__name__)

#: Field files larger than this are uploaded in parts of this size (S3 allows 5 MiB..5 GiB
#: parts and 10 000 of them: 64 MiB parts reach 640 GB files).
MULTIPART_BYTES = 64 << 20


def convert_to_url(build: Callable[[Path], Any], url: str, overwrite: bool,
                   storage_options: dict[str, Any] | None = None):
    """Run ``build(local_dir)`` (a local conversion into a temporary directory), upload the
    result to ``url`` and return the dataset opened from there."""
    from .remote import RemoteDataset
    from .s3 import S3Client

    scheme, bucket, prefix = split_url(url)
    client = S3Client(bucket, storage_options, scheme)
    mkey = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    client.check_bucket()  # before any conversion work
    old = _existing(client, mkey)
    if old is not None and not overwrite:
        raise ConversionError(f"{client.url(mkey)}: a dataset is already there; pass --overwrite "
                              f"(overwrite=True) to replace it")
    tmp = Path(tempfile.mkdtemp(prefix="gds-stream-upload-"))
    try:
        build(tmp / "dataset")
        upload_dir(client, tmp / "dataset", prefix, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RemoteDataset(url, storage_options)


def _existing(client, mkey: str) -> dict | None:
    """The manifest already at ``mkey`` (parsed), or None."""
    from .._manifest import parse_manifest

    try:
        meta = client.head(mkey)
    except DatasetError as exc:
        if "no such object" in str(exc):
            return None
        raise
    try:
        return parse_manifest(bytes(client.get(meta, 0, meta.size)), client.url(mkey))
    except DatasetError:
        return {}  # not a valid manifest: replaced like one, nothing of it deleted


def _landed(client, mkey: str, data: bytes) -> bool:
    """Whether the object at ``mkey`` holds exactly ``data`` now."""
    try:
        meta = client.head(mkey)
        return meta.size == len(data) and bytes(client.get(meta, 0, meta.size)) == data
    except DatasetError:
        return False


def upload_dir(client, local: Path, prefix: str, old: dict | None) -> None:
    """Upload the dataset directory ``local`` under ``prefix``: field files first, under a new
    ``data-<id>/``, the manifest last; then delete what only ``old`` named."""
    doc = json.loads((local / MANIFEST).read_bytes())
    gen = f"data-{uuid.uuid4().hex[:16]}"

    def key(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    done: dict[str, str] = {}
    for fd in doc["fields"]:
        rel = fd["file"]
        if rel not in done:
            done[rel] = f"{gen}/{rel}"
            log.info("uploading %s to %s", rel, client.url(key(done[rel])))
            client.put_file(key(done[rel]), os.fspath(local / rel), MULTIPART_BYTES)
        fd["file"] = done[rel]
    manifest = json.dumps(doc).encode()
    try:
        client.put_bytes(key(MANIFEST), manifest)  # last: the dataset appears
    except DatasetError as exc:
        # the request may have reached the store and only its answers been lost: what is
        # there now says whether the new dataset is live (its old objects then go too)
        if not _landed(client, key(MANIFEST), manifest):
            raise
        log.warning("%s: the upload of the manifest reported a failure (%s), but the store "
                    "holds it: the new dataset is live", client.url(key(MANIFEST)), exc)
    stale = {f.get("file") for f in (old or {}).get("fields", []) if isinstance(f, dict)}
    for rel in sorted(r for r in stale - set(done.values()) if isinstance(r, str)):
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            continue  # never delete outside the prefix on a manifest's word
        try:
            client.delete(key(rel))
        except DatasetError as exc:
            log.warning("%s: could not delete the replaced object (%s)", client.url(key(rel)),
                        exc)
