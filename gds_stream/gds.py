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

Which route each file takes is decided per file when the loader opens it: a file for the
``gds`` route is opened with KvikIO's compat mode **OFF** (:func:`capability.open_cufile`), so a
file that cannot do GDS (a failed O_DIRECT open or cuFile registration, which under ``AUTO``
would silently switch it to compat, ``cpp/src/compat_mode_manager.cpp``) raises at open and is
reopened for the ``host`` route, the reason in ``backend_reason``. ``loader.backend`` is "gds"
only when every file takes the ``gds`` route ("gds-compat" otherwise). Whether the ``gds`` route
beats the ``host`` route, and by how much reads overlap training on a real GPU, is measured by
``gds-stream env --check`` and the GPU tests; no GPU run has happened yet.

Streams and threads: the loader owns ``min(prefetch, 4)`` non-blocking streams of its own
(:mod:`gds_stream.cudaops`, not torch's pool), created once and destroyed in ``close()``; batch
*i* is read on stream *i* mod that number, so up to ``prefetch`` batches are in flight (the
submit thread waits for a batch only when ``prefetch`` batches are queued). The submit thread
binds the device before its first CUDA or cuFile call (KvikIO's ``read_async`` pushes no
context). The ``host`` route reads into a ring of ``prefetch`` pinned slots (a slot is refilled
only after the event of its previous copy completed), not into per-batch pinned allocations.
Zero-length ranges are never read.

Memory and synchronisation, explicitly:

* staging (and the device copy of the shuffle permutation) comes from torch's caching
  allocator — one device pool for the whole job; KvikIO reads into a CuPy array over that
  memory, the batch is views of the torch allocation (``record_stream`` works only on memory
  torch's allocator handed out) — allocated *on the batch's stream*, so the
  allocator hands out only blocks no queued consumer work still uses (blocks the consumer freed
  are returned after the events ``record_stream`` left);
* the loader's stream never waits on the consumer's stream; the consumer's stream waits on the
  batch's event (``wait_event``, device side) when the batch is handed out, and the staging slab
  is ``record_stream``-ed on the consumer's stream;
* host waits use events created with ``blocking=True`` (the thread sleeps, no spinning);
* slicing, compaction and the shuffle gather (one ``index_select`` of uint8 rows per field,
  bit-exact for every dtype) are queued on the consumer's current stream;
* a yielded batch is owned by the consumer; the loader never writes into it again.

KvikIO settings: its thread pool is process-wide; a loader grows it to ``num_threads`` (never
shrinks it: resizing waits for every running read of every loader); it serves the ``host``
route's ``pread`` only (``cuFileReadAsync`` on the ``gds`` route uses no KvikIO thread).
``task_size`` (default 4 MiB, KvikIO's own) splits a ``host``-route read into pool tasks.
``verify_reads`` re-reads the blocks a batch touches from the file and checks their checksums:
it proves the file, not the bytes that reached the GPU.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import numpy as np

from .errors import BackendUnavailable, LoaderError
from .format import ALIGN, Dataset, align_down, align_up
from .loader import POLL_S, EpochIterator, Loader
from .ring import PinnedRing
from ._gds_submit import _Pending, _Read, _Submitter
from .slab import gather_field_rows
from .plan import BatchPlan, EpochPlan

log = logging.getLogger(__name__)

DEFAULT_TASK_SIZE = 4 << 20


#: At most this many streams of its own per loader (batches in flight share them round-robin).
MAX_STREAMS = 4
#: cuFile stream flag: every offset and size given on the stream is 4 KiB-aligned.
_STREAM_PAGE_ALIGNED = 8


def CudaOps(torch: Any, device: Any) -> Any:  # noqa: N802 - a factory tests swap
    from .cudaops import CudaOps as Ops

    return Ops(torch, device)


class GDSLoader(Loader):
    """KvikIO → torch loader; same options and contract as ``FallbackLoader``.

    Extra keyword: ``task_size`` (bytes, default 4 MiB), KvikIO's unit of parallel work.
    ``backend`` is "gds" when every file reads through GPUDirect Storage, "gds-remote" for
    a dataset in object storage (``kvikio.RemoteFile``, see
    :mod:`gds_stream.storage.kvikio_remote`), else "gds-compat"; ``backend_reason`` says why.
    Raises :class:`BackendUnavailable` (with the reason) where the GPU-direct path can't run.
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
        self._ops = CudaOps(torch, self._device)
        self._ops.bind()  # cuFile opens and registrations below need the device's context
        n = self.options.num_threads
        if (kvikio.defaults.get("num_threads") or 0) < n:
            # Process-wide: KvikIO has one pool; grown only (a resize waits for every running
            # read of every loader), never shrunk under another loader.
            kvikio.defaults.set("num_threads", n)
            log.info("KvikIO thread pool grown to %d threads", n)
        ds = self.dataset
        self._files: list = []
        self.routes: list[str] = []
        reasons: list[str] = []
        remote = getattr(self.files, "remote", False)  # object storage: kvikio.RemoteFile
        why_not = None
        if remote:
            ok, why_not = capability.probe_remote()
            why_not = (self.files.kvikio_unavailable() if ok  # type: ignore[union-attr]
                       else f"KvikIO cannot read remote files: {why_not}")
        if why_not:
            self.close()
            raise BackendUnavailable(why_not)
        for s in self.specs:
            path = str(ds.field_path(s.name))
            if remote:  # read into the pinned ring like the host route (storage/kvikio_remote)
                try:
                    f, route, why = self.files.open_kvikio(s.name, kvikio), "remote", ""
                except BaseException:
                    self.close()  # the objects opened so far too
                    raise
            else:  # the pinned snapshot, opened again through its descriptor (KvikIO: paths)
                f, route, why = capability.open_for_route(
                    cap, kvikio, path, open_path=self.files.reopen_path(s.name))
            self._files.append(f)
            self.routes.append(route)
            if why and why not in reasons:
                reasons.append(why)
        self.backend = ("gds" if all(r == "gds" for r in self.routes)
                        else "gds-remote" if remote else "gds-compat")
        if remote:  # KvikIO sends no If-Match: every batch's objects are checked after it
            self.verifier = self.files.version_check(self.verifier)
        #: Why some files are not read through GPUDirect Storage ("" when all are).
        self.route_reason = self.read_reason = "; ".join(reasons)
        log.debug("GDSLoader: %s (routes %s)%s", self.backend, self.routes,
                  f": {self.route_reason}" if self.route_reason else "")
        # The loader's own streams (not torch's pool), kept for its life, destroyed in close().
        self._streams = [self._ops.new_stream()
                         for _ in range(min(self.options.prefetch, MAX_STREAMS))]
        self._registered = [self._ops.raw_stream(st) for st in self._streams
                            if "gds" in self.routes and _stream_register(kvikio, self._ops, st)]
        ops = self._ops
        self._ring = PinnedRing(self.options.prefetch, 0,
                                lambda nbytes: ops.pinned_empty(nbytes, torch.uint8))

    def _make_iterator(self, plan: EpochPlan, start: int) -> "_GDSIterator":
        return _GDSIterator(self, plan, start)

    def _release(self) -> None:
        streams, self._streams = self.__dict__.get("_streams", []), []
        for st in streams:  # our own streams only: queued reads land before files close
            ev = self._ops.new_event()
            ev.record(st)
            ev.synchronize()
        files, self._files = getattr(self, "_files", []), []
        for f in files:
            try:
                f.close()
            except Exception:  # pragma: no cover
                log.debug("CuFile close failed", exc_info=True)
        ring, self._ring = self.__dict__.get("_ring"), None
        if ring is not None:  # its pinned memory goes before the streams its copies ran on
            ring.close()
        if streams:
            import kvikio

            for raw in self.__dict__.get("_registered", []):
                try:
                    kvikio.stream_deregister(raw)
                except Exception:  # pragma: no cover
                    log.debug("stream_deregister failed", exc_info=True)
            for st in streams:
                self._ops.destroy_stream(st)


def _stream_register(kvikio: Any, ops: Any, stream: Any) -> bool:
    """Tell cuFile that every read on ``stream`` is page-aligned (it may then skip its own
    alignment handling); False where this KvikIO/cuFile cannot."""
    try:
        kvikio.stream_register(ops.raw_stream(stream), _STREAM_PAGE_ALIGNED)
        return True
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("cuFile stream_register failed: %s", exc)
        return False


class _GDSIterator(EpochIterator):
    def __init__(self, loader: GDSLoader, plan: EpochPlan, start: int):
        super().__init__(loader, plan, start)
        self._ops, self._torch = loader._ops, loader._torch
        self._specs = loader.specs
        self._unit_key = loader.unit_key
        self._layouts = [loader.dataset.layout(s.name) for s in self._specs]
        self._paths = [str(loader.dataset.field_path(s.name)) for s in self._specs]
        self._streams = loader._streams
        self._routes = loader.routes
        self._turn = 0
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        submitter = _Submitter(self._ops, loader._files, loader.routes, self._paths,
                               loader.task_size, getattr(loader, "verifier", None),
                               loader._ring, max(1, self.prefetch))
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
                if b <= a:  # nothing to read: never a zero-length read (null pointer)
                    continue
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
        stream = self._streams[self._turn % len(self._streams)]
        self._turn += 1
        with self._ops.use_stream(stream):  # the allocator orders it on that stream
            raw = self._ops.device_empty(total + ALIGN, torch.uint8)
            skip = (-raw.data_ptr()) % ALIGN
            staging = raw[skip:skip + total]
            perm_dev = (self._ops.device_empty(batch.num_points, torch.int32)
                        if batch.perm_key is not None else None)
        target = self._ops.as_cupy(staging) if any(r == "gds" for r in self._routes) \
            else staging
        p = _Pending(batch, reads, regions, staging, target, perm_dev, total, stream)
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
        # The batch is views of the torch allocation KvikIO wrote through the CuPy array (the
        # same memory), not a DLPack import of it: torch's record_stream ignores memory its
        # allocator did not hand out, so an imported tensor could not be recorded on the
        # streams that use it later (window gathers, the consumer's own streams).
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
        stream = self._streams[0]  # one of ours; make() waits for the batch's read event on it
        with ops.use_stream(stream):
            out = make()
            done = ops.new_event()
            done.record(stream)
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
        # Reads already queued on our streams must land before their buffers go back to the
        # pool; this waits for our own streams only.
        for st in self._streams:
            ev = self._ops.new_event()
            ev.record(st)
            ev.synchronize()


def _torch_dtype(torch: Any, dtype: np.dtype) -> Any:
    """The torch dtype with the same bytes as a stored numpy dtype (little-endian stored)."""
    return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
