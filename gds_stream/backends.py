"""``open_loader``: which backend serves a loader, and why — the only module that knows both.

The rule for ``backend="auto"``: the GPU-direct backend only where KvikIO reads through
GPUDirect Storage proper (:func:`gds_stream.capability.probe_gds` says ``"gds"``: cuFile and the
nvidia-fs driver are there) and the device is CUDA. Everywhere else the CPU fallback: in KvikIO's
compat mode reads are POSIX ``pread`` into pinned bounce buffers plus host→device copies, which is
what the fallback's pinned ring does too (on a non-blocking stream of its own). The choice and
its reason are logged once (INFO) and kept on the loader as ``loader.backend``
("gds" | "gds-compat" | "gds-remote" | "fallback") and ``loader.backend_reason``. A dataset in
object storage on a CUDA device is read by KvikIO's ``RemoteFile`` where KvikIO can read it
(:func:`gds_stream.capability.probe_remote`, :mod:`gds_stream.storage.kvikio_remote`), else by
the fallback through obstore.

``backend="gds"`` forces KvikIO, compat mode included (for testing and comparison), and raises
:class:`BackendUnavailable` with the reason where it cannot run at all; ``backend="fallback"``
always takes the fallback.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import capability
from ._lifetime import import_torch
from .errors import BackendUnavailable, LoaderError
from .format import Dataset
from .loader import Loader
from .options import GDS_ONLY_OPTIONS, check_option_names
from .storage import is_url

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gds", "fallback")


def _gds(dataset: Any, options: dict[str, Any], gds_only: dict[str, Any]) -> Loader:
    from .gds import GDSLoader

    return GDSLoader(dataset, **options, **gds_only)


def _fallback(dataset: Any, options: dict[str, Any]) -> Loader:
    from fallback import FallbackLoader

    return FallbackLoader(dataset, **options)


def _gds_words(loader: Loader, cap: Any) -> str:
    """What the GPU-direct loader really does: GPUDirect Storage only when every file reads
    through it (``loader.backend == "gds"``); the per-file reasons follow in backend_reason."""
    if loader.backend == "gds-remote":
        return _REMOTE_WORDS
    if loader.backend == "gds":
        return "every file reads through GPUDirect Storage (cuFile + nvidia-fs)"
    if cap.mode == "gds":
        return "some files cannot read through GPUDirect Storage and read in compat mode"
    return f"KvikIO runs in compat mode: {cap.reason}"


#: What the GPU-direct backend does with an object-store dataset (see storage/kvikio_remote.py).
_REMOTE_WORDS = ("KvikIO's RemoteFile reads the object ranges (into the pinned ring, then a "
                 "copy on the loader's own stream), each batch's ETags checked after it")


def _compat_words(reason: str) -> str:
    return (f"KvikIO would run in compat mode ({reason}): POSIX reads plus bounce-buffer "
            f"copies, which the fallback's pinned ring does as well")


def open_loader(dataset: Dataset | str | os.PathLike, backend: str = "auto",
                **options: Any) -> Loader:
    """Build a loader over ``dataset`` (a path or an opened :class:`Dataset`).

    ``backend``: ``"auto"`` (GPU-direct only through GPUDirect Storage proper on a CUDA device,
    else the CPU fallback), ``"gds"`` (KvikIO, compat mode included; raises
    :class:`BackendUnavailable` with the reason if it cannot run) or ``"fallback"``. Options:
    see :mod:`gds_stream.options`; ``task_size`` is taken by the GPU-direct backend only;
    ``storage_options``, ``cache_dir``, ``cache_bytes`` configure a dataset given as an
    object-store URL (see :func:`gds_stream.open_dataset`).
    """
    import_torch()  # before a loader exists on this stack (see import_torch)
    if backend not in BACKENDS:
        raise LoaderError(f"backend must be 'auto', 'gds' or 'fallback', got {backend!r}")
    check_option_names(list(options), extra=GDS_ONLY_OPTIONS)
    gds_only = {k: options.pop(k) for k in GDS_ONLY_OPTIONS if k in options}
    device = options.get("device")
    cuda = device is None or str(device).startswith("cuda")
    if backend == "fallback":
        loader, reason = _fallback(dataset, options), "backend='fallback' was requested"
    elif backend == "gds":
        if not cuda:
            raise BackendUnavailable(f"backend='gds' needs a CUDA device, got device={device!r}")
        cap = capability.probe_gds()
        if not cap.available:
            raise BackendUnavailable(f"GPU-direct backend unavailable: {cap.reason}")
        loader = _gds(dataset, options, gds_only)
        reason = "backend='gds' was requested; " + _gds_words(loader, cap)
    else:
        loader, reason = _auto(dataset, options, gds_only, device, cuda)
    loader.backend_reason = reason
    log.info("gds-stream backend: %s (%s)", loader.backend, reason)
    return loader


def _auto(dataset: Any, options: dict[str, Any], gds_only: dict[str, Any], device: Any,
          cuda: bool) -> tuple[Loader, str]:
    if not cuda:
        return _fallback(dataset, options), f"device {str(device)!r} is not CUDA"
    if getattr(dataset, "remote", False) or is_url(dataset):
        return _auto_remote(dataset, options, gds_only)
    cap = capability.probe_gds()
    if cap.mode == "gds":
        try:
            loader = _gds(dataset, options, gds_only)
            return loader, "GPUDirect Storage is available; " + _gds_words(loader, cap)
        except BackendUnavailable as exc:
            return _fallback(dataset, options), f"GPU-direct backend unavailable: {exc}"
    if cap.mode == "gds-compat":
        return _fallback(dataset, options), _compat_words(cap.reason)
    return _fallback(dataset, options), f"GPU-direct backend unavailable: {cap.reason}"


def _auto_remote(dataset: Any, options: dict[str, Any],
                 gds_only: dict[str, Any]) -> tuple[Loader, str]:
    """An object-store dataset on a CUDA device: KvikIO's RemoteFile where it can read it, else
    the fallback's obstore reads."""
    ok, why = capability.probe_remote()
    if ok:
        try:
            return (_gds(dataset, options, gds_only),
                    "object storage on a CUDA device where KvikIO reads remote files; "
                    + _REMOTE_WORDS)
        except BackendUnavailable as exc:
            why = str(exc)
    return (_fallback(dataset, options),
            f"object storage read through obstore by the fallback: KvikIO cannot read it ({why})")
