"""The GPU-direct backend: KvikIO reads planned file ranges into CuPy device buffers.

Per batch and field, one ``kvikio.CuFile.pread`` per planned range, with file offset and size
widened to 4 KiB boundaries (GDS moves only aligned pages directly; the few extra bytes are
sliced off on the device). Through GPUDirect Storage the bytes go from storage to GPU memory by
DMA; in KvikIO's compat mode they go through KvikIO's pinned bounce buffers on its own threads.
Either way nothing is staged in Python, and the batch reaches torch through DLPack, zero copy
(a single-range field is a view of the read buffer).

Synchronisation, explicitly:

* staging buffers come from CuPy's memory pool, allocated on the consumer's current stream; the
  pool may hand back memory that kernels queued on that stream still use, so an event recorded
  right after the allocation must complete before KvikIO writes into it — a submit thread waits
  on it, never the consumer;
* a batch is handed out only after all its reads completed (KvikIO's future resolves after its
  device copies finished), and the device-side slicing, compaction and shuffle are queued on the
  consumer's current stream, so the batch is complete on that stream;
* a yielded buffer is owned by the consumer; the loader never reuses it.

KvikIO settings chosen on purpose (see README): its thread pool (one thread by default, which
starves a fast NVMe or a warm page cache) is sized from ``num_threads``; ``task_size`` (default
1 MiB, the smallest shuffled read) splits large reads across that pool.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BackendUnavailable, DatasetError, LoaderError
from .format import ALIGN, Dataset, align_down, align_up
from .loader import POLL_S, EpochIterator, Loader
from .plan import BatchPlan, EpochPlan, MIN_READ_BYTES

log = logging.getLogger(__name__)

DEFAULT_TASK_SIZE = MIN_READ_BYTES
_GATHER_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@dataclass
class _Read:
    """One aligned pread: ``size`` bytes at ``file_offset`` into staging at ``dev_offset``;
    the wanted bytes start ``skip`` bytes in and are ``nbytes`` long."""

    field: int
    file_offset: int
    size: int
    dev_offset: int
    skip: int
    nbytes: int


@dataclass
class _Pending:
    batch: BatchPlan
    reads: list[_Read]
    staging: Any  # cupy uint8
    ready: Any  # cupy Event recorded after the allocation
    nbytes: int
    futures: list = field(default_factory=list)
    perm: np.ndarray | None = None
    submitted: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    outcomes: dict = field(default_factory=dict)  # read index -> bytes read, or the exception


class GDSLoader(Loader):
    """KvikIO → CuPy → DLPack loader; same options and contract as ``FallbackLoader``.

    Extra keyword: ``task_size`` (bytes, default 1 MiB), KvikIO's unit of parallel work.
    Raises :class:`BackendUnavailable` (with the reason) where the GPU-direct path can't run.
    """

    def __init__(self, dataset: Dataset | str, *, task_size: int = DEFAULT_TASK_SIZE,
                 **options: Any):
        from .capability import probe_gds

        cap = probe_gds()
        if not cap.available:
            raise BackendUnavailable(f"GPU-direct backend unavailable: {cap.reason}")
        super().__init__(dataset, **options)
        import cupy
        import kvikio
        import kvikio.defaults
        import torch

        self._cp, self._torch = cupy, torch
        dev = torch.device(self.options.device)
        if dev.type != "cuda":
            raise LoaderError(f"the GPU-direct backend needs a CUDA device, got "
                              f"device={self.options.device!r}")
        self._device = torch.device("cuda", torch.cuda.current_device() if dev.index is None
                                    else dev.index)
        if not isinstance(task_size, int) or task_size < ALIGN or task_size % ALIGN:
            raise LoaderError(f"task_size must be a positive multiple of {ALIGN}, got {task_size!r}")
        self.task_size = task_size
        self.backend = cap.mode
        self.capability = cap
        n = self.options.num_threads
        if kvikio.defaults.get("num_threads") != n:
            # Process-wide: KvikIO has one thread pool. Growing it is what a fast drive needs.
            kvikio.defaults.set("num_threads", n)
            log.info("KvikIO thread pool set to %d threads", n)
        ds = self.dataset
        self._files = [kvikio.CuFile(ds.field_path(s.name), "r") for s in self.specs]
        log.info("GDSLoader: %s mode%s", self.backend,
                 f" ({cap.reason})" if cap.reason else "")

    def _make_iterator(self, plan: EpochPlan, start: int) -> "_GDSIterator":
        return _GDSIterator(self, plan, start)

    def _release(self) -> None:
        files, self._files = getattr(self, "_files", []), []
        for f in files:
            try:
                f.close()
            except Exception:  # pragma: no cover
                log.debug("CuFile close failed", exc_info=True)


def _submit_loop(q: "queue.Queue[_Pending | None]", stop: threading.Event, files: list,
                 paths: list[str], task_size: int) -> None:
    """The submit thread: waits for each staging buffer's allocation event, then issues its
    preads (and draws the batch's permutation). Holds no reference to the iterator."""
    while not stop.is_set():
        try:
            p = q.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if p is None:
            return
        try:
            p.ready.synchronize()
            for r in p.reads:
                if stop.is_set():
                    break
                view = p.staging[r.dev_offset:r.dev_offset + r.size]
                p.futures.append((r, files[r.field].pread(view, r.size, r.file_offset,
                                                          task_size)))
            p.perm = p.batch.permutation()
        except BaseException as exc:  # travels to the consumer
            p.error = exc
        finally:
            p.submitted.set()


class _GDSIterator(EpochIterator):
    def __init__(self, loader: GDSLoader, plan: EpochPlan, start: int):
        super().__init__(loader, plan, start)
        self._cp, self._torch = loader._cp, loader._torch
        self._device = loader._device
        self._specs = loader.specs
        self._layouts = [loader.dataset.layout(s.name) for s in self._specs]
        self._paths = [str(loader.dataset.field_path(s.name)) for s in self._specs]
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._issued: list[_Pending] = []
        self._thread = threading.Thread(
            # Joined by close(); daemon only so a leaked iterator cannot block interpreter exit.
            target=_submit_loop, name="gds-stream-submit", daemon=True,
            args=(self._queue, self._stop, loader._files, self._paths, loader.task_size))
        self._thread.start()

    def _stream(self):
        """The consumer's current torch stream, as a CuPy stream."""
        ts = self._torch.cuda.current_stream(self._device)
        stream_cls = self._cp.cuda.Stream
        if hasattr(stream_cls, "from_external"):  # CuPy >= 14 (torch streams speak __cuda_stream__)
            return stream_cls.from_external(ts)
        return self._cp.cuda.ExternalStream(ts.cuda_stream, self._device.index)

    # -- reads --------------------------------------------------------------------------------
    def _plan_reads(self, batch: BatchPlan) -> tuple[list[_Read], int]:
        reads, pos = [], 0
        for i, (spec, lay) in enumerate(zip(self._specs, self._layouts)):
            pb = spec.point_bytes
            for a, b in batch.segments:
                lo = lay.offset + int(a) * pb
                hi = lay.offset + int(b) * pb
                alo, ahi = align_down(lo), align_up(hi)
                reads.append(_Read(i, alo, ahi - alo, pos, lo - alo, hi - lo))
                pos += ahi - alo
        return reads, pos

    def _submit(self, batch: BatchPlan) -> _Pending:
        cp = self._cp
        reads, total = self._plan_reads(batch)
        with cp.cuda.Device(self._device.index), self._stream() as s:
            staging = cp.empty(max(total, 1), dtype=cp.uint8)
            ready = cp.cuda.Event(disable_timing=True)
            ready.record(s)
        p = _Pending(batch, reads, staging, ready, total)
        self._issued.append(p)
        self._queue.put(p)
        return p

    def _handle_nbytes(self, handle: _Pending) -> int:
        return handle.nbytes

    def _harvest(self, p: _Pending) -> None:
        """Collect the outcome of every finished read of ``p`` (``get()`` may run only once);
        raise the first failure."""
        if p.error is not None:
            raise p.error
        if not p.submitted.is_set():
            return
        for k, (r, fut) in enumerate(p.futures):
            if k in p.outcomes or not fut.done():
                continue
            try:
                p.outcomes[k] = fut.get()
            except Exception as exc:
                p.outcomes[k] = exc
        for k, got in sorted(p.outcomes.items()):
            r = p.futures[k][0]
            if isinstance(got, BaseException):
                raise DatasetError(f"{self._paths[r.field]}: KvikIO read of {r.size} bytes at "
                                   f"offset {r.file_offset} failed: {got}") from got
            if got != r.size:
                raise DatasetError(f"{self._paths[r.field]}: short read at offset "
                                   f"{r.file_offset}: {got} of {r.size} bytes (file truncated?)")

    def _wait(self, p: _Pending) -> None:
        """Wait for batch ``p``; a failure in *any* in-flight batch is raised at once."""
        delay, last_scan = 1e-5, time.monotonic()
        while True:
            if self._stop.is_set():
                raise LoaderError("loader was closed while waiting for a batch")
            self._harvest(p)
            if p.submitted.is_set() and len(p.outcomes) == len(p.futures):
                return
            if time.monotonic() - last_scan > POLL_S:
                for _, later, _ in self._inflight:
                    self._harvest(later)
                last_scan = time.monotonic()
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    # -- hand-out -----------------------------------------------------------------------------
    def _complete(self, p: _Pending) -> dict:
        self._wait(p)
        self._issued.remove(p)
        cp, torch = self._cp, self._torch
        batch, n = p.batch, p.batch.num_points
        out: dict[str, Any] = {}
        with cp.cuda.Device(self._device.index), self._stream():
            perm = None if p.perm is None else cp.asarray(p.perm)
            by_field: dict[int, list[_Read]] = {}
            for r in p.reads:
                by_field.setdefault(r.field, []).append(r)
            for i, spec in enumerate(self._specs):
                parts = [p.staging[r.dev_offset + r.skip:r.dev_offset + r.skip + r.nbytes]
                         for r in by_field.get(i, [])]
                if not parts:
                    raw = cp.empty(0, dtype=cp.uint8)
                elif len(parts) == 1:
                    raw = parts[0]  # a view of the read buffer: zero copy
                else:
                    raw = cp.concatenate(parts)
                if perm is None:
                    arr = raw.view(spec.dtype)
                else:
                    bits = raw.view(_GATHER_INT[spec.dtype.itemsize]).reshape(n, spec.components)
                    arr = bits[perm].view(spec.dtype)
                arr = arr.reshape(n, spec.components) if spec.components > 1 else arr.reshape(n)
                out[spec.name] = torch.from_dlpack(arr)
            offs = batch.offsets()
            if offs is not None:
                out["offset"] = torch.from_dlpack(cp.asarray(offs))
        return out

    def _shutdown(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        # KvikIO reads cannot be cancelled: let them land before their buffers are freed.
        for p in self._issued:
            for k, (_, fut) in enumerate(p.futures):
                if k in p.outcomes:
                    continue
                try:
                    fut.get()
                except Exception:
                    pass
        self._issued.clear()
