"""``gds-stream env --check [DIR]``: does the GPU path really work on this machine?

Writes a dataset of a few hundred MiB into DIR (default: the system's temp directory; choose a
directory on the storage you train from), then reads it through each available route — the
GPU-direct backend (``gds``, where KvikIO runs) and the fallback's pinned ring — first with the
GPU idle, then with the GPU busy (a long kernel queued on the default stream, as a training
step would). For each route it reports how each file was read (GDS or compat), GB/s idle and
busy, and whether the reads completed while the GPU was still busy; then one verdict line to
paste into a bug report. The data arrive on a side stream that waits only on the loader's
events, so "overlapped" means the reads and copies did not wait for the default stream.

On a machine without a usable CUDA device the answer is one line, "no GPU", exit status 0.
The dataset written is removed afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

#: Bytes written and read per route by default.
DEFAULT_MIB = 256
_CHUNK = 16 << 20


@dataclass
class RouteResult:
    """What one route did: ``files`` maps file name → "GDS" or "compat (why)"."""

    route: str
    backend: str = ""
    files: dict[str, str] = field(default_factory=dict)
    idle_gbs: float | None = None
    busy_gbs: float | None = None
    overlapped: bool | None = None
    error: str = ""


def no_gpu_reason() -> str | None:
    """None where a CUDA device works here, else why not (one phrase)."""
    from .capability import _cuda_device_reason

    reason = _cuda_device_reason()
    if reason is not None:
        return reason
    try:
        import torch

        torch.zeros(1, device="cuda")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable device
        return f"the CUDA device does not work ({exc})"
    return None


def run(directory: str | None = None, mib: int = DEFAULT_MIB,
        emit: Callable[[str], None] = lambda line: None) -> tuple[int, list[str]]:
    """Run the check; ``emit`` gets each line as it is known. Returns (exit status, lines)."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        emit(line)

    reason = no_gpu_reason()
    if reason is not None:
        say(f"no GPU: {reason}; there is no GPU path to check on this machine")
        return 0, lines
    from .capability import probe_gds

    cap = probe_gds()
    base = directory or tempfile.gettempdir()
    root = tempfile.mkdtemp(prefix="gds-stream-check-", dir=base)
    try:
        ds = _write_dataset(os.path.join(root, "ds"), mib)
        say(f"data: {mib} MiB in {base}")
        routes = ["gds"] if cap.available else []
        if not cap.available:
            say(f"route gds: not available ({cap.reason})")
        routes.append("fallback")
        results = []
        for route in routes:
            r = _check_route(ds, route)
            results.append(r)
            for line in describe(r):
                say(line)
        say(verdict(results, cap.mode))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0, lines


def _write_dataset(path: str, mib: int):
    from .format import DatasetWriter, FieldSpec, open_dataset

    rng = np.random.default_rng(0)
    left = mib << 20
    with DatasetWriter(path, [FieldSpec("v", np.dtype("u1"))]) as w:
        while left > 0:
            n = min(_CHUNK, left)
            w.append({"v": rng.integers(0, 255, n, dtype=np.uint8)})
            left -= n
        w.end_scan("check")
    return open_dataset(path)


def _check_route(ds, route: str) -> RouteResult:
    import torch

    from .backends import open_loader

    res = RouteResult(route)
    nbytes = ds.num_points  # one byte a point
    cfg = dict(batch_points=_CHUNK, prefetch=4, device="cuda")
    try:
        with open_loader(ds, backend=route, **cfg) as loader:
            res.backend = loader.backend
            names = [os.path.basename(str(ds.field_path(s.name))) for s in loader.specs]
            routes = getattr(loader, "routes", None) or ["host"] * len(names)
            for name, r in zip(names, routes):
                res.files[name] = "GDS" if r == "gds" else (
                    "compat (pinned host memory, our own copy stream)" if route == "fallback"
                    else f"compat ({loader.backend_reason})")
            side = torch.cuda.Stream()
            seconds = _epoch_seconds(torch, loader, side, busy_ms=None)
            res.idle_gbs = nbytes / seconds / 1e9
            busy_ms = max(1000.0, 4e3 * seconds)
            seconds, still_busy = _epoch_seconds(torch, loader, side, busy_ms=busy_ms)
            res.busy_gbs = nbytes / seconds / 1e9
            res.overlapped = still_busy
    except Exception as exc:  # noqa: BLE001 - reported, the other route still runs
        res.error = f"{type(exc).__name__}: {exc}"
        log.debug("env --check: route %s failed", route, exc_info=True)
    return res


def _epoch_seconds(torch, loader, side, busy_ms: float | None):
    """Seconds until a whole epoch is on the GPU (on ``side``, which waits only for the
    loader's events); with ``busy_ms``, a kernel of that length is queued on the default stream
    first, and whether it was still running at the end is returned too."""
    torch.cuda.synchronize()
    _drop_cache(loader)
    if busy_ms is not None:
        torch.cuda._sleep(int(busy_ms * _cycles_per_ms(torch)))
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        for batch in loader:
            del batch
        done = torch.cuda.Event(blocking=True)
        done.record(side)
    done.synchronize()
    seconds = time.perf_counter() - t0
    still_busy = not torch.cuda.default_stream().query() if busy_ms is not None else None
    torch.cuda.synchronize()
    return seconds if busy_ms is None else (seconds, still_busy)


def _drop_cache(loader) -> None:
    """Evict the check's files from the page cache (``posix_fadvise(DONTNEED)``, no root
    needed for clean pages), so every pass reads the storage, as GPUDirect Storage does."""
    for spec in loader.specs:
        path = str(loader.dataset.field_path(spec.name))
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            log.debug("could not evict %s from the page cache", path, exc_info=True)
        finally:
            os.close(fd)


_CPM: list[float] = []


def _cycles_per_ms(torch) -> float:
    if not _CPM:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(50_000_000)
        b.record()
        b.synchronize()
        _CPM.append(50_000_000 / a.elapsed_time(b))
    return _CPM[0]


def describe(r: RouteResult) -> list[str]:
    """The lines of one route."""
    if r.error:
        return [f"route {r.route}: failed: {r.error}"]
    files = ", ".join(f"{k}: {v}" for k, v in r.files.items())
    how = "overlapped" if r.overlapped else "waited for"
    return [f"route {r.route} ({r.backend}): {files}",
            f"route {r.route}: {r.idle_gbs:.2f} GB/s idle, {r.busy_gbs:.2f} GB/s with the GPU "
            f"busy (cold reads); reads {how} the busy GPU"]


def verdict(results: list[RouteResult], mode: str) -> str:
    """One line: does GPUDirect Storage work here, and do reads overlap training?"""
    by = {r.route: r for r in results}
    g, f = by.get("gds"), by.get("fallback")
    parts = []
    if g is None:
        parts.append("GPU-direct unavailable")
    elif g.error:
        parts.append(f"GPU-direct failed ({g.error})")
    elif all(v == "GDS" for v in g.files.values()):
        parts.append(f"GPUDirect Storage works ({g.idle_gbs:.2f} GB/s idle)")
    else:
        parts.append(f"GPU-direct reads in compat mode (KvikIO {mode})")
    for r in (g, f):
        if r is not None and not r.error and not r.overlapped:
            parts.append(f"{r.route} reads WAIT for the busy GPU")
    ok = [r for r in (g, f) if r is not None and not r.error]
    if ok and all(r.overlapped for r in ok):
        parts.append("reads overlap a busy GPU on every route that ran")
    best = max(ok, key=lambda r: r.busy_gbs or 0.0, default=None)
    if best is not None:
        parts.append(f"fastest under load: {best.route} ({best.busy_gbs:.2f} GB/s)")
    return "verdict: " + "; ".join(parts)
