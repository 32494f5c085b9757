"""The CPU fallback backend: worker threads ``preadv`` planned ranges into host buffers.

* CPU device: each batch is read into a fresh host buffer that is handed out through DLPack, so a
  yielded batch is never written again (contract point 5) and there is no copy beyond the read.
  With ``num_threads=0`` (the default where torch's threads take every core) the reads run
  inline, in ``next()`` on the consumer's thread — the same plan, buffers and ownership — and
  the kernel reads the batches submitted ahead in the background (``posix_fadvise(WILLNEED)``,
  until batches fill at page-cache speed with none slower in the epoch: :class:`_Hints`):
  on a CPU nothing runs asynchronously to hide a reader thread behind, so a thread of ours would
  only compete with the training step for its cores. Inline, a batch's buffer is taken in
  ``next()`` too, not when it is submitted: the buffer of the batch the loop dropped last comes
  back warm from the pool, as a plain loop's would.
* CUDA device: batches are read into a ring of ``prefetch`` pinned slots; each slot is copied to a
  new device buffer on a side stream, the consumer's current stream waits on that copy's event,
  and a slot is refilled only after the event of its previous copy completed.

The within-batch shuffle is one gather on the consumer's device, by the plan's permutation,
which travels inside the same slab (one host→device copy per batch).

GPU hygiene (:mod:`gds_stream.cudaops`): the copy stream is the loader's own, created
``cudaStreamNonBlocking`` outside torch's stream pool (a pooled stream can be the training loop's
or NCCL's) and destroyed in ``close()``, so a host→device copy never waits for work the training
loop queued; worker threads bind the device before their first CUDA call; copy events are created
``blocking=True``, so a worker waiting for a slot to be free sleeps instead of spinning a core; a
slot keeps its last copy's event on every path (error, ``break``, close) until a new copy replaces
it; nothing here synchronises the device or a stream — the only waits are on this loader's own
copy events.

Host memory (CPU device): ``prefetch`` slabs in flight (a slab is the batch's fields, each
rounded to 4 KiB, plus 4 bytes a point of permutation when shuffling; with a fused column stack
the stacked tensor, its fields of the stack's dtype read into their columns, the others read
beside theirs and cast into them, see :class:`gds_stream.slab.StackRegion`), plus, when
shuffling, the gathered batch being handed out; slabs and gathered batches live in anonymous
mappings returned to the OS as soon as their last view is collected (:mod:`fallback.hostmem`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gds_stream._lifetime import pread_into
from gds_stream.errors import DatasetError, LoaderError
from gds_stream.format import Dataset
from gds_stream.integrity import BlockVerifier
from gds_stream.loader import POLL_S, EpochIterator, Loader
from gds_stream.slab import SlabLayout
from gds_stream.plan import BatchPlan, EpochPlan

from .hostmem import anon_buffer, permutation_into
from .ring import PinnedRing, Slot
from .unpack import gathered_bytes, numpy_dtype, unpack_slab

log = logging.getLogger(__name__)

#: Reads are grouped into (and large ones split into) worker tasks of about this size.
TASK_BYTES = 8 << 20
#: The same for an object store, where each task is one ranged GET: 16 MiB read 1.23× faster
#: than 8 MiB from a local S3 server, 32 MiB no faster (README, "Object storage").
REMOTE_TASK_BYTES = 16 << 20


@dataclass
class _Pending:
    batch: BatchPlan
    layout: SlabLayout
    host: np.ndarray | None  # uint8 view of the slab (inline reads: taken in next())
    slot: Slot | None
    futures: list[cf.Future] = field(default_factory=list)
    #: Inline reads: what ``_complete`` needs to take the slab and fill it there.
    inline: "_FillSpec | None" = None


def _read(reads: list[tuple[Any, str, memoryview, int]], stop: threading.Event,
          slot: Slot | None) -> None:
    """Worker task: a few positioned reads into the batch's slab, in order. Holds no reference
    to the iterator, so an abandoned iterator is collected (and closed) at once."""
    if slot is not None:
        slot.wait_free()
    for src, path, view, offset in reads:
        if stop.is_set():
            return
        try:
            if isinstance(src, int):  # a local file's descriptor
                pread_into(src, view, offset, path)
            else:  # (reader, field): an object store, through gds_stream.storage
                src[0].read_into(src[1], offset, view, stop)
        except OSError as exc:
            raise DatasetError(f"{path}: read of {len(view)} bytes at offset {offset} failed: "
                               f"{exc}") from exc


@dataclass(frozen=True)
class _FillSpec:
    """What filling a slab needs of its iterator, without the iterator itself (a task that
    held the iterator would keep an abandoned one alive in a cycle)."""

    specs: Any
    files: list
    task_bytes: int
    verifier: BlockVerifier | None
    stop: threading.Event
    #: Every field is a local file (read by descriptor), none an object store's.
    local: bool = False


def _read_inline(p: _Pending, fs: _FillSpec) -> None:
    """Inline reads (in ``next()``): the batch's slab, then its reads in order — straight
    from each field's file where the batch is local files in file order, else its tasks (the
    verification and metadata tasks, an object store's ranged reads)."""
    host = p.host = anon_buffer(p.layout.nbytes)
    batch = p.batch
    if (fs.verifier is not None or batch.perm_key is not None or batch.scan_sizes is not None
            or not fs.local):
        for fn, args in _tasks(p, fs):
            fn(*args)
        return
    # local files in file order: the reads themselves, no tasks to group them into
    mv = memoryview(host)
    for fd, path, dst, off, length in _ranges(p, fs):
        if fs.stop.is_set():
            return
        pread_into(fd, mv[dst:dst + length], off, path)


def _ranges(p: _Pending, fs: _FillSpec):
    """Batch ``p``'s reads in order: (source, path, offset in the slab, offset in the file,
    bytes), one per field and segment."""
    segments = p.batch.segments.tolist()
    for spec, (src, path, base), dst in zip(fs.specs, fs.files, p.layout.field_offsets):
        pb = spec.point_bytes
        for a, b in segments:
            length = (b - a) * pb
            yield src, path, dst, base + a * pb, length
            dst += length


def _tasks(p: _Pending, fs: _FillSpec) -> list[tuple[Any, tuple]]:
    """The worker tasks that fill batch ``p``'s slab: its reads, grouped into tasks of about
    ``fs.task_bytes`` (few enough that the pool's per-task overhead stays small, large ones
    split so several threads share a big batch), the verification, the metadata."""
    batch, layout, host, slot = p.batch, p.layout, p.host, p.slot
    mv = memoryview(host)
    out: list[tuple[Any, tuple]] = []
    task: list[tuple[Any, str, memoryview, int]] = []
    task_bytes = 0
    for src, path, dst, off, length in _ranges(p, fs):
        for c in range(0, length, fs.task_bytes):
            m = min(fs.task_bytes, length - c)
            task.append((src, path, mv[dst + c:dst + c + m], off + c))
            task_bytes += m
            if task_bytes >= fs.task_bytes:
                out.append((_read, (task, fs.stop, slot)))
                task, task_bytes = [], 0
    if task:
        out.append((_read, (task, fs.stop, slot)))
    if fs.verifier is not None:
        out.append((_verify, (fs.verifier, batch.segments, fs.stop)))
    if batch.perm_key is not None or batch.scan_sizes is not None:
        out.append((_fill_meta, (batch, layout, host, fs.stop, slot)))
    return out


def _verify(verifier: BlockVerifier, segments: np.ndarray, stop: threading.Event) -> None:
    """Worker task: recompute the checksum blocks a batch touches (``verify_reads=True``)."""
    if not stop.is_set():
        verifier.check(segments)


def _fill_meta(batch: BatchPlan, layout: SlabLayout, host: np.ndarray, stop: threading.Event,
               slot: Slot | None) -> None:
    """Worker task: the permutation and scan offsets of a batch, written into its slab."""
    if stop.is_set():
        return
    if slot is not None:
        slot.wait_free()
    n = batch.num_points
    permutation_into(batch, host[layout.perm_offset:layout.perm_offset + 4 * n].view(np.int32))
    offs = batch.offsets()
    if offs is not None:
        host[layout.offsets_offset:layout.offsets_offset + offs.nbytes] = offs.view(np.uint8)
        ids = np.asarray(batch.units, dtype=np.int64)
        at = layout.offsets_offset + offs.nbytes
        host[at:at + ids.nbytes] = ids.view(np.uint8)


def _read_reason(o: Any, inline: bool, cuda: bool) -> str:
    if cuda:
        return f"{o.num_threads} reader threads into a pinned ring, copies on a side stream"
    if not inline:
        return f"{o.num_threads} reader thread(s) ahead of the consumer"
    import torch

    from gds_stream.options import _cores

    why = (f"torch's {torch.get_num_threads()} threads take all {_cores()} cores, so a reader "
           f"thread would only compete with the training step" if o.num_threads == 0 else "")
    return ("reads inline in next() on the consumer's thread (num_threads=0), the kernel "
            "reading the next batches ahead" + (f": {why}" if why else ""))


#: Inline reads: a batch filled at less than this many bytes a second was not all in the page
#: cache (or its reads had to wait); the read-ahead hints then stay on for the rest of the epoch.
SLOW_FILL_BYTES_PER_S = 2e9
#: Inline reads: after this many batches in a row filled faster than that, with none slower in
#: the epoch, the hints stop — the data is in the page cache, and a hint on cached pages is a
#: walk over them that reads nothing (~1.6 ms an epoch of 4 M points, 8 % of its reads).
WARM_FILLS = 2
#: The clock a batch's fill is timed with (tests replace it).
_clock = time.perf_counter


class _Hints:
    """When inline reads ask the kernel to read ahead: on from an epoch's start, off once
    ``WARM_FILLS`` batches in a row were filled at page-cache speed with none slower, on again
    for good (this epoch) at the first slower one. The first batch of a cold epoch cannot be
    read ahead of itself, so a cold epoch keeps its hints from its first batch on."""

    def __init__(self) -> None:
        self.on = True
        self._fast = 0
        self._slow_seen = False

    def filled(self, nbytes: int, seconds: float) -> None:
        if self._slow_seen:
            return
        if nbytes >= seconds * SLOW_FILL_BYTES_PER_S:
            self._fast += 1
            if self._fast >= WARM_FILLS:
                self.on = False
        else:
            self._slow_seen = True
            self.on = True


def _read_ahead(files: list[tuple[int, str, int]], specs: Any, segments: np.ndarray) -> None:
    """Ask the kernel to read a batch's ranges into the page cache in the background."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:  # pragma: no cover - not POSIX
        return
    for spec, (fd, _, base) in zip(specs, files):
        if not isinstance(fd, int):  # an object store's reader: no page cache to warm
            continue
        pb = spec.point_bytes
        for a, b in segments.tolist():
            try:
                advise(fd, base + a * pb, (b - a) * pb, os.POSIX_FADV_WILLNEED)
            except OSError:  # a hint only: the read itself reports real errors
                return


def cuda_ops(torch: Any, device: Any) -> Any:
    """The CUDA operations of the copy path (tests swap in a CPU model)."""
    from gds_stream.cudaops import CudaOps

    return CudaOps(torch, device)


class FallbackLoader(Loader):
    """numpy/preadv + threaded prefetch ring; same options and contract as every loader."""

    backend = "fallback"

    def __init__(self, dataset: Dataset | str, **options: Any):
        super().__init__(dataset, **options)
        import torch

        self._device = torch.device(self.options.device)
        self._cuda = self._device.type == "cuda"
        if self._cuda:
            if not torch.cuda.is_available():
                raise LoaderError(f"device={self.options.device!r} but CUDA is not available "
                                  f"(torch {torch.__version__}); use device='cpu'")
            if self._device.index is None:
                self._device = torch.device("cuda", torch.cuda.current_device())
            self._ops = cuda_ops(torch, self._device)
            self._copy_stream = self._ops.new_stream()  # the loader's own, destroyed in close()
        elif self._device.type != "cpu":
            raise LoaderError(f"device={self.options.device!r}: the fallback supports cpu and cuda")
        self._ring: PinnedRing | None = None
        #: Reads inline in ``next()`` (a CPU device with ``num_threads=0``), no thread of ours.
        self.inline_reads = not self._cuda and self.options.num_threads == 0
        self.read_reason = _read_reason(self.options, self.inline_reads, self._cuda)
        log.debug("%r: %s", self, self.read_reason)

    def _make_iterator(self, plan: EpochPlan, start: int) -> "_FallbackIterator":
        if self._cuda:
            import torch

            o = self.options
            units = o.batch_size if o.scan_mode else None
            if plan.spec.windowed:  # the reads are windows (unshuffled), one ahead
                cap = SlabLayout.build(self.specs, plan.max_window_points(), False, None).nbytes
                depth = 2
            else:
                cap = SlabLayout.build(self.specs, plan.max_batch_points(),
                                       o.shuffle and not o.scan_mode, units).nbytes
                depth = o.prefetch
            if self._ring is None or self._ring.depth != depth:
                ops = self._ops
                self._ring = PinnedRing(depth, cap, lambda n: ops.pinned_empty(n, torch.uint8))
            self._ring.reserve(cap)
        return _FallbackIterator(self, plan, start)

    def _release(self) -> None:
        ring, self._ring = self.__dict__.get("_ring"), None
        if ring is not None:  # its pinned memory goes before the stream its copies ran on
            ring.close()
        stream, self.__dict__["_copy_stream"] = self.__dict__.get("_copy_stream"), None
        if stream is not None:
            self._ops.destroy_stream(stream)


class _FallbackIterator(EpochIterator):
    def __init__(self, loader: FallbackLoader, plan: EpochPlan, start: int):
        super().__init__(loader, plan, start)
        import torch

        self._torch = torch
        ds = loader.dataset
        self._specs = loader.specs
        files = loader.files
        assert files is not None
        self._files = [((files, s.name) if getattr(files, "remote", False) else files.fd(s.name),
                        files.path(s.name), ds.layout(s.name).offset)
                       for s in self._specs]
        self._task_bytes = REMOTE_TASK_BYTES if getattr(files, "remote", False) else TASK_BYTES
        self._verifier = loader.verifier
        self._scan_mode = loader.options.scan_mode
        self._unit_key = loader.unit_key
        self._device = loader._device
        self._cuda = loader._cuda
        self._ring = loader._ring
        self._copy_stream = loader._copy_stream if self._cuda else None
        self._ops = loader._ops if self._cuda else None
        self._stop = threading.Event()
        #: What filling a slab needs (the same for every batch of the epoch).
        self._fill_spec = _FillSpec(self._specs, self._files, self._task_bytes, self._verifier,
                                    self._stop, all(isinstance(f[0], int) for f in self._files))
        self._inline = loader.inline_reads
        #: Inline reads: whether batches submitted now are announced to the kernel.
        self._hints = _Hints()
        #: A fused stack (``stack_layout="columns"`` without a transform, CPU device, batches
        #: in file order): each stacked field is read straight into its column of the slab.
        pipe = loader.options.pipeline
        self._fuse = (pipe is not None and pipe.fusable and not self._cuda
                      and not plan.spec.windowed)
        self._stack = pipe.stack if self._fuse else ()
        self._stack_torch = pipe.dtype if self._fuse else None
        self._stack_np = numpy_dtype(torch, pipe.dtype) if self._fuse else None
        self._stack_itemsize = (torch.empty(0, dtype=pipe.dtype).element_size()
                                if self._fuse else 0)
        #: Slab layouts by (points, permuted, units, fused).
        self._layouts: dict[tuple, SlabLayout] = {}
        self._pool = None if self._inline else cf.ThreadPoolExecutor(
            loader.options.num_threads, thread_name_prefix="gds-stream-fallback",
            # workers wait on copy events: bind the device first (CUDA only)
            initializer=self._ops.bind if self._cuda else None)

    # -- reads --------------------------------------------------------------------------------
    def _stacked_by_read(self, batch: BatchPlan) -> bool:
        return self._fuse and batch.perm_key is None

    def _submit(self, batch: BatchPlan) -> _Pending:
        n = batch.num_points
        fused = self._stacked_by_read(batch)
        key = (n, batch.perm_key is not None,
               None if batch.scan_sizes is None else len(batch.scan_sizes), fused)
        layout = self._layouts.get(key)
        if layout is None:  # batches of an epoch mostly share one size: built once
            if len(self._layouts) >= 64:
                self._layouts.clear()
            layout = self._layouts[key] = SlabLayout.build(
                self._specs, n, key[1], key[2], self._stack if fused else (), self._stack_np,
                self._stack_itemsize)
        if self._inline:
            # Reads run in next(), and so does taking their buffer: the buffer of the batch the
            # loop dropped last comes back warm from the pool (taken here, prefetch batches
            # ahead, it would be a colder one). The kernel reads ahead meanwhile.
            p = _Pending(batch, layout, None, None, inline=self._fill_spec)
            if self._hints.on:
                _read_ahead(self._files, self._specs, batch.segments)
            return p
        if self._cuda:
            assert self._ring is not None
            slot = self._ring.acquire(layout.nbytes)
            host = slot.array[:layout.nbytes]
        else:
            slot = None
            host = anon_buffer(layout.nbytes)
        p = _Pending(batch, layout, host, slot)
        assert self._pool is not None  # reader threads (inline reads returned above)
        p.futures.extend(self._pool.submit(fn, *args) for fn, args in _tasks(p, self._fill_spec))
        return p

    def _handle_nbytes(self, handle: _Pending) -> int:
        return handle.layout.nbytes

    def _wait(self, p: _Pending) -> None:
        """Wait for batch ``p``; a failure in *any* in-flight batch is raised at once.
        Inline reads run here, on the calling thread."""
        fill, p.inline = p.inline, None
        if fill is not None:
            t0 = _clock()
            _read_inline(p, fill)
            self._hints.filled(p.layout.nbytes, _clock() - t0)
            if self._stop.is_set():  # a close() from another thread cut the reads short
                raise LoaderError("loader was closed while waiting for a batch")
        pending = set(p.futures)
        while pending:
            done, pending = cf.wait(pending, timeout=POLL_S, return_when=cf.FIRST_EXCEPTION)
            for f in done:
                exc = f.exception()
                if exc is not None:
                    raise exc
            if self._stop.is_set():
                raise LoaderError("loader was closed while waiting for a batch")
            if pending:
                self._raise_later_failures()

    def _failure(self, handle: _Pending) -> BaseException | None:
        for f in handle.futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                return f.exception()
        return None

    # -- hand-out -----------------------------------------------------------------------------
    def _complete(self, p: _Pending) -> dict:
        torch = self._torch
        try:
            self._wait(p)
        except BaseException:
            if p.slot is not None and self._ring is not None:
                self._ring.release(p.slot)  # keeps the event of the slot's last copy
                p.slot = None
            raise
        if self._cuda:
            assert p.slot is not None and self._ring is not None
            ops = self._ops
            with ops.use_stream(self._copy_stream):
                slab = ops.device_empty(p.layout.nbytes, torch.uint8)
                ops.copy_async(slab, p.slot.tensor[:p.layout.nbytes])
                event = ops.new_event()
                event.record(self._copy_stream)
            slot, p.slot = p.slot, None
            self._ring.release(slot, event)
            consumer = ops.current_stream()
            consumer.wait_event(event)
            ops.record_stream(slab, consumer)
        else:
            slab = torch.from_dlpack(p.host)
            if p.batch.perm_key is not None:
                # The gathered batch goes to a buffer of its own; the slab dies on return.
                out = torch.from_numpy(anon_buffer(gathered_bytes(self._specs, p.batch)))
                return unpack_slab(torch, slab, self._specs, p.layout, p.batch, out,
                                   self._unit_key)
        return unpack_slab(torch, slab, self._specs, p.layout, p.batch,
                           unit_key=self._unit_key, stack_dtype=self._stack_torch)

    def _on_loader_stream(self, make: Any) -> dict:
        """CUDA: the batch pipeline (unpack, gather, transform, stack) queued on the copy
        stream after the batch's copy; the consumer's stream waits on its event."""
        ops = self._ops
        consumer = ops.current_stream()
        with ops.use_stream(self._copy_stream):
            out = make()
            done = ops.new_event()
            done.record(self._copy_stream)
        consumer.wait_event(done)
        for t in out.values():
            ops.record_stream(t, consumer)
        return out

    def _request_stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        # A slot whose reads were cancelled goes back to the ring with the event of its last
        # copy (of a batch already yielded, maybe still queued): its next user waits for it.
        if self._ring is not None:
            for _, p, _ in self._inflight:
                if p.slot is not None:
                    slot, p.slot = p.slot, None
                    self._ring.release(slot)
                # the pinned memory is the ring's to free (at the loader's close, while the
                # copy stream exists), not this iterator's whenever it is collected
                p.host = None
