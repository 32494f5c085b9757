"""The GPU-direct backend: KvikIO reads planned file ranges into torch device memory.

Per batch and field, one read per planned range, with file offset and size widened to 4 KiB
boundaries (GDS moves only aligned pages directly; the few extra bytes are dropped on the
device). All reads of a batch land in one staging slab whose start is 4 KiB-aligned.

**No read waits for training.** ``kvikio.CuFile.pread`` on device memory cannot be used:
``FileHandle::pread`` (kvikio ``cpp/src/file_handle.cpp``) calls
``cuStreamSynchronize(nullptr)`` — the legacy null stream, which is PyTorch's default stream —
before its cuFile reads, and Python cannot turn that off; in compat mode its POSIX path
(``cpp/src/detail/posix_io.cpp``) copies each bounce buffer on a per-thread stream created with
``CU_STREAM_DEFAULT`` (``cpp/src/detail/stream.cpp``), a blocking stream, which also waits for
every kernel queued on the null stream. Each file therefore takes one of two routes:

* ``gds`` (GPUDirect Storage proper: cuFile handle registered, nvidia-fs present, a cuFile
  config so KvikIO does not downgrade async reads): ``CuFile.raw_read_async`` on a
  non-blocking stream of ours, i.e. ``cuFileReadAsync`` ordered on that stream only;
* ``host`` (every other case, compat mode included): ``CuFile.pread`` into pinned host memory
  — ``FileHandle::pread`` takes its host branch (``is_host_memory``: plain POSIX reads on
  KvikIO's thread pool, no CUDA call) — then our own non-blocking host→device copy of the slab
  on the same non-blocking stream.

Which route each file takes is decided per file by :func:`capability.file_route`, and
``loader.backend`` is "gds" only when every file takes the ``gds`` route ("gds-compat" with
``backend_reason`` otherwise). Whether the ``gds`` route beats the ``host`` route, and by how
much reads overlap training on a real GPU, is measured by the GPU tests and the shared stream
probe; those numbers are pending a GPU run.

Memory and synchronisation, explicitly:

* staging (and the device copy of the shuffle permutation) comes from torch's caching
  allocator — one device pool for the whole job — allocated *on the loader's stream*, so the
  allocator hands out only blocks no queued consumer work still uses (blocks the consumer freed
  are returned after the events ``record_stream`` left);
* the loader's stream never waits on the consumer's stream; the consumer's stream waits on the
  batch's event (``wait_event``, device side) when the batch is handed out, and the staging slab
  is ``record_stream``-ed on the consumer's stream;
* host waits use events created with ``blocking=True`` (the thread sleeps, no spinning);
* slicing, compaction and the shuffle gather (one ``index_select`` of uint8 rows per field,
  bit-exact for every dtype) are queued on the consumer's current stream;
* a yielded batch is owned by the consumer; the loader never writes into it again.

KvikIO settings: its thread pool is sized from ``num_threads``; ``task_size`` defaults to
4 MiB (KvikIO's own default) until a GPU sweep chooses.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BackendUnavailable, DatasetError, LoaderError
from .format import ALIGN, Dataset, align_down, align_up
from .loader import POLL_S, EpochIterator, Loader
from .slab import gather_field_rows
from .plan import BatchPlan, EpochPlan

log = logging.getLogger(__name__)

DEFAULT_TASK_SIZE = 4 << 20


class _CudaOps:
    """The few CUDA operations the backend uses, in one place (tests swap in a CPU model)."""

    def __init__(self, torch: Any, device: Any):
        self.torch, self.device = torch, device

    def new_stream(self) -> Any:
        return self.torch.cuda.Stream(device=self.device)  # torch creates non-blocking streams

    def current_stream(self) -> Any:
        return self.torch.cuda.current_stream(self.device)

    def use_stream(self, stream: Any) -> Any:
        return self.torch.cuda.stream(stream)

    def new_event(self) -> Any:
        return self.torch.cuda.Event(blocking=True)

    def device_empty(self, nbytes: int, dtype: Any) -> Any:
        return self.torch.empty(nbytes, dtype=dtype, device=self.device)

    def pinned_empty(self, nbytes: int, dtype: Any) -> Any:
        return self.torch.empty(nbytes, dtype=dtype, pin_memory=True)

    def copy_async(self, dst: Any, src: Any) -> None:
        dst.copy_(src, non_blocking=True)

    def record_stream(self, tensor: Any, stream: Any) -> None:
        tensor.record_stream(stream)

    def raw_stream(self, stream: Any) -> int:
        return stream.cuda_stream


@dataclass
class _Read:
    """One aligned read: ``size`` bytes at ``file_offset`` into the slab at ``dev_offset``;
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
    regions: list[tuple[int, int]]  # per field: [start, end) of its reads in the slab
    staging: Any  # torch uint8 device tensor, 4 KiB-aligned start
    perm_dev: Any  # torch int32 device tensor (rows to gather) or None
    nbytes: int
    done: Any = None  # blocking event on the loader's stream after all copies/reads
    submitted: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class GDSLoader(Loader):
    """KvikIO → torch loader; same options and contract as ``FallbackLoader``.

    Extra keyword: ``task_size`` (bytes, default 4 MiB), KvikIO's unit of parallel work.
    ``backend`` is "gds" when every file reads through GPUDirect Storage, else "gds-compat";
    ``backend_reason`` says why. Raises :class:`BackendUnavailable` (with the reason) where the
    GPU-direct path can't run.
    """

    def __init__(self, dataset: Dataset | str, *, task_size: int = DEFAULT_TASK_SIZE,
                 **options: Any):
        from . import capability

        cap = capability.probe_gds()
        if not cap.available:
            raise BackendUnavailable(f"GPU-direct backend unavailable: {cap.reason}")
        super().__init__(dataset, **options)
        import kvikio
        import kvikio.defaults
        import torch

        self._torch = torch
        dev = torch.device(self.options.device)
        if dev.type != "cuda":
            raise LoaderError(f"the GPU-direct backend needs a CUDA device, got "
                              f"device={self.options.device!r}")
        self._device = torch.device("cuda", torch.cuda.current_device() if dev.index is None
                                    else dev.index)
        if (not isinstance(task_size, int) or isinstance(task_size, bool) or task_size < ALIGN
                or task_size % ALIGN):
            raise LoaderError(f"task_size must be a positive multiple of {ALIGN}, got {task_size!r}")
        self.task_size = task_size
        self.capability = cap
        self._ops = _CudaOps(torch, self._device)
        n = self.options.num_threads
        if kvikio.defaults.get("num_threads") != n:
            # Process-wide: KvikIO has one thread pool. Growing it is what a fast drive needs.
            kvikio.defaults.set("num_threads", n)
            log.info("KvikIO thread pool set to %d threads", n)
        ds = self.dataset
        self._files: list = []
        self.routes: list[str] = []
        reasons: list[str] = []
        for s in self.specs:
            path = str(ds.field_path(s.name))
            f = kvikio.CuFile(path, "r")
            self._files.append(f)
            route, why = capability.file_route(cap, f, path)
            self.routes.append(route)
            if why and why not in reasons:
                reasons.append(why)
        self.backend = "gds" if all(r == "gds" for r in self.routes) else "gds-compat"
        #: Why some files are not read through GPUDirect Storage ("" when all are).
        self.route_reason = "; ".join(reasons)
        log.debug("GDSLoader: %s (routes %s)%s", self.backend, self.routes,
                  f": {self.route_reason}" if self.route_reason else "")

    @property
    def backend_reason(self) -> str:
        """Why this backend (as ``open_loader`` chose it), and why files read in compat mode."""
        return "; ".join(r for r in (self.__dict__.get("_choice_reason", ""),
                                     self.__dict__.get("route_reason", "")) if r)

    @backend_reason.setter
    def backend_reason(self, reason: str) -> None:
        self._choice_reason = reason

    def _make_iterator(self, plan: EpochPlan, start: int) -> "_GDSIterator":
        return _GDSIterator(self, plan, start)

    def _release(self) -> None:
        files, self._files = getattr(self, "_files", []), []
        for f in files:
            try:
                f.close()
            except Exception:  # pragma: no cover
                log.debug("CuFile close failed", exc_info=True)


class _Submitter:
    """The submit thread's work: per batch, start the ``gds`` reads on the loader's stream,
    run the ``host`` reads into pinned memory and queue their copy, queue the permutation's
    copy, record the batch's event, check byte counts and checksums. Holds no reference to the
    iterator."""

    def __init__(self, ops: _CudaOps, stream: Any, files: list, routes: list[str],
                 paths: list[str], task_size: int, verifier: Any):
        self.ops, self.stream, self.files, self.routes = ops, stream, files, routes
        self.paths, self.task_size, self.verifier = paths, task_size, verifier

    def run(self, q: "queue.Queue[_Pending | None]", stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                p = q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if p is None:
                return
            try:
                self.submit(p)
            except BaseException as exc:  # travels to the consumer
                p.error = exc
            finally:
                p.submitted.set()

    def submit(self, p: _Pending) -> None:
        stream_futures: list = []
        try:
            with self.ops.use_stream(self.stream):
                self._start(p, stream_futures)
        except BaseException:
            if stream_futures:  # cuFile still uses each future's arguments: let them land
                ev = self.ops.new_event()
                ev.record(self.stream)
                ev.synchronize()
            raise
        if stream_futures:
            p.done.synchronize()  # our own stream only; a blocking event: the thread sleeps
            for r, fut in stream_futures:
                try:
                    got = fut.check_bytes_done()
                except Exception as exc:
                    self._raise(r, exc)
                self._check(r, got)
        if self.verifier is not None:
            self.verifier.check(p.batch.segments)

    def _start(self, p: _Pending, stream_futures: list) -> None:
        """Queue everything of batch ``p`` on the loader's stream (the current stream here)."""
        torch = self.ops.torch
        for r in p.reads:
            if self.routes[r.field] != "gds":
                continue
            try:
                fut = self.files[r.field].raw_read_async(
                    p.staging[r.dev_offset:r.dev_offset + r.size],
                    self.ops.raw_stream(self.stream), r.size, r.file_offset, 0)
            except Exception as exc:
                self._raise(r, exc)
            stream_futures.append((r, fut))
        hosted = [r for r in p.reads if self.routes[r.field] != "gds"]
        if hosted:
            pinned = self.ops.pinned_empty(p.nbytes, torch.uint8)
            host = pinned.numpy()
            futures = [(r, self.files[r.field].pread(
                host[r.dev_offset:r.dev_offset + r.size], r.size, r.file_offset,
                self.task_size)) for r in hosted]
            errors = []
            for r, fut in futures:  # collect every outcome: no read outlives its buffer
                try:
                    self._check(r, fut.get())
                except Exception as exc:
                    errors.append((r, exc))
            if errors:
                self._raise(*errors[0])
            for a, b in _runs([p.regions[i] for i, route in enumerate(self.routes)
                               if route != "gds"]):
                self.ops.copy_async(p.staging[a:b], pinned[a:b])
        perm = p.batch.permutation()  # within-batch shuffle; windows come here unshuffled
        if perm is not None:
            src = self.ops.pinned_empty(len(perm), torch.int32)
            src.numpy()[:] = perm
            self.ops.copy_async(p.perm_dev, src)
        p.done = self.ops.new_event()
        p.done.record(self.stream)

    def _check(self, r: _Read, got: int) -> None:
        if got != r.size:
            raise DatasetError(f"{self.paths[r.field]}: short read at offset {r.file_offset}: "
                               f"{got} of {r.size} bytes (file truncated?)")

    def _raise(self, r: _Read, exc: BaseException) -> None:
        if isinstance(exc, DatasetError):
            raise exc
        raise DatasetError(f"{self.paths[r.field]}: KvikIO read of {r.size} bytes at offset "
                           f"{r.file_offset} failed: {exc}") from exc


def _runs(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge adjacent [start, end) slab regions (sorted by start) into maximal runs."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(regions):
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _GDSIterator(EpochIterator):
    def __init__(self, loader: GDSLoader, plan: EpochPlan, start: int):
        super().__init__(loader, plan, start)
        self._ops, self._torch = loader._ops, loader._torch
        self._specs = loader.specs
        self._unit_key = loader.unit_key
        self._layouts = [loader.dataset.layout(s.name) for s in self._specs]
        self._paths = [str(loader.dataset.field_path(s.name)) for s in self._specs]
        self._stream = self._ops.new_stream()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        submitter = _Submitter(self._ops, self._stream, loader._files, loader.routes,
                               self._paths, loader.task_size, getattr(loader, "verifier", None))
        self._thread = threading.Thread(
            # Joined by close(); daemon only so a leaked iterator cannot block interpreter exit.
            target=submitter.run, name="gds-stream-submit", daemon=True,
            args=(self._queue, self._stop))
        self._thread.start()

    # -- reads --------------------------------------------------------------------------------
    def _plan_reads(self, batch: BatchPlan) -> tuple[list[_Read], list[tuple[int, int]], int]:
        reads, regions, pos = [], [], 0
        for i, (spec, lay) in enumerate(zip(self._specs, self._layouts)):
            pb, first = spec.point_bytes, pos
            for a, b in batch.segments:
                lo = lay.offset + int(a) * pb
                hi = lay.offset + int(b) * pb
                alo, ahi = align_down(lo), align_up(hi)
                reads.append(_Read(i, alo, ahi - alo, pos, lo - alo, hi - lo))
                pos += ahi - alo
            regions.append((first, pos))
        return reads, regions, pos

    def _submit(self, batch: BatchPlan) -> _Pending:
        torch = self._torch
        reads, regions, total = self._plan_reads(batch)
        with self._ops.use_stream(self._stream):  # the allocator orders it on our stream
            raw = self._ops.device_empty(total + ALIGN, torch.uint8)
            skip = (-raw.data_ptr()) % ALIGN
            staging = raw[skip:skip + total]
            perm_dev = (self._ops.device_empty(batch.num_points, torch.int32)
                        if batch.perm_key is not None else None)
        p = _Pending(batch, reads, regions, staging, perm_dev, total)
        self._queue.put(p)
        return p

    def _handle_nbytes(self, handle: _Pending) -> int:
        return handle.nbytes

    def _wait(self, p: _Pending) -> None:
        while not p.submitted.wait(POLL_S):
            if self._stop.is_set():
                raise LoaderError("loader was closed while waiting for a batch")
            if not self._thread.is_alive():
                raise LoaderError("the GPU-direct submit thread stopped unexpectedly")
        if p.error is not None:
            raise p.error

    # -- hand-out -----------------------------------------------------------------------------
    def _complete(self, p: _Pending) -> dict:
        self._wait(p)
        torch, ops = self._torch, self._ops
        consumer = ops.current_stream()
        consumer.wait_event(p.done)  # device side: the host does not wait
        ops.record_stream(p.staging, consumer)
        perm = p.perm_dev
        if perm is not None:
            ops.record_stream(perm, consumer)
        batch, n = p.batch, p.batch.num_points
        by_field: dict[int, list[_Read]] = {}
        for r in p.reads:
            by_field.setdefault(r.field, []).append(r)
        out: dict[str, Any] = {}
        raws = []
        for i, spec in enumerate(self._specs):
            parts = [p.staging[r.dev_offset + r.skip:r.dev_offset + r.skip + r.nbytes]
                     for r in by_field.get(i, [])]
            if not parts:
                raws.append(p.staging[:0])
            elif len(parts) == 1:
                raws.append(parts[0])  # a view of the staging slab: zero copy
            else:
                raws.append(torch.cat(parts))
        if perm is not None and n:
            # one gather per group of equally sized, equally spaced fields (the slab's layout)
            rows = gather_field_rows([r.view(n, s.point_bytes)
                                      for r, s in zip(raws, self._specs)], perm)
            raws = [r.reshape(-1) for r in rows]
        for spec, raw in zip(self._specs, raws):
            arr = raw.view(_torch_dtype(torch, spec.dtype))
            out[spec.name] = arr.reshape(n, spec.components) if spec.components > 1 \
                else arr.reshape(n)
        offs = batch.offsets()
        if offs is not None:
            k = len(offs)
            host = ops.pinned_empty(2 * k, torch.int64)
            host.numpy()[:k] = offs
            host.numpy()[k:] = np.asarray(batch.units, dtype=np.int64)
            dev = ops.device_empty(2 * k, torch.int64)
            ops.copy_async(dev, host)  # on the consumer's stream, from pinned memory
            out["offset"] = dev[:k]
            if self._unit_key is not None:
                out[self._unit_key] = dev[k:]
        return out

    def _failure(self, handle: _Pending) -> BaseException | None:
        return handle.error if handle.submitted.is_set() else None

    def _on_loader_stream(self, make: Any) -> dict:
        """The batch pipeline (unpack, gather, transform, stack) queued on our stream."""
        ops = self._ops
        consumer = ops.current_stream()
        with ops.use_stream(self._stream):
            out = make()
            done = ops.new_event()
            done.record(self._stream)
        consumer.wait_event(done)
        for t in out.values():
            ops.record_stream(t, consumer)
        return out

    def _request_stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        # Reads already queued on our stream must land before their buffers go back to the
        # pool; this waits for our own stream only.
        ev = self._ops.new_event()
        ev.record(self._stream)
        ev.synchronize()


def _torch_dtype(torch: Any, dtype: np.dtype) -> Any:
    """The torch dtype with the same bytes as a stored numpy dtype (little-endian stored)."""
    return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
