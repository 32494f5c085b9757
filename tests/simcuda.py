"""A CPU model of the CUDA the backends use (``gds_stream.cudaops.CudaOps``), strict enough that
the hazards of stream-ordered code show up as wrong bytes or as recorded violations:

* a stream's queued work runs only when an event recorded on it is waited for (or when a
  stream that waits on it runs); the consumer's stream is immediate by default, or deferred
  (``SimOps(deferred_consumer=True)``: its work, and whatever it waits for, runs at
  ``ops.consumer.run_all()``, i.e. "when the GPU gets to it");
* a legacy null stream: a *blocking* stream's work first runs everything queued on the null
  stream (``null.forced`` counts how often loader work waited for "training");
* allocators that **reuse** memory like torch's: a device block is reused by the next
  allocation on the stream it was allocated on as soon as it is freed, unless ``record_stream``
  put events on other streams that have not run; a pinned block is reused once the copies
  queued out of it ran (torch's host allocator records those events itself). A buffer freed
  while a simulated asynchronous host read still writes into it is a violation
  (``ops.violations``);
* threads: CUDA calls from a thread that did not ``bind()`` first are violations; streams the
  loader creates must be destroyed (``ops.live_streams``), and not before the buffers used on
  them are freed (torch records an event on those streams at free: a violation otherwise).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np


class SimStream:
    def __init__(self, ops, deferred=True, blocking=False, null=None, name="stream"):
        self.ops, self.deferred, self.blocking, self.null = ops, deferred, blocking, null
        self.queue, self.ran, self.name = [], 0, name
        self.lock = threading.RLock()
        self.handle = id(self)
        self.waited: list = []
        self.forced = 0
        self.destroyed = False
        ops.registry[self.handle] = self

    def put(self, fn):
        if self.blocking and self.null is not None:
            mark = len(self.null.queue)
            inner = fn

            def fn():  # noqa: F811 - a blocking stream first waits for the null stream
                if self.null.ran < mark:
                    self.null.forced += 1
                self.null.run(mark)
                inner()
        if self.deferred:
            with self.lock:
                self.queue.append(fn)
        else:
            fn()

    def run(self, upto):
        with self.lock:
            while self.ran < upto:
                fn, self.queue[self.ran] = self.queue[self.ran], None  # ran: references go
                self.ran += 1
                fn()

    def run_all(self):
        self.run(len(self.queue))

    def wait_event(self, ev):
        self.waited.append(ev)
        self.put(ev.synchronize)

    def query(self):
        return self.ran >= len(self.queue)


class SimEvent:
    def __init__(self):
        self.stream, self.mark = None, 0

    def record(self, stream=None):
        self.stream = stream
        self.mark = len(stream.queue) if stream.deferred else 0

    def synchronize(self):
        if self.stream is not None and self.stream.deferred:
            self.stream.run(self.mark)

    def query(self):
        return self.stream is None or not self.stream.deferred or self.stream.ran >= self.mark


class _Block:
    def __init__(self, nbytes, fill):
        self.mem = np.empty(nbytes + 8192, np.uint8)
        skip = (-self.mem.ctypes.data) % 4096
        self.mem = self.mem[skip:skip + nbytes]
        self.mem.fill(fill)
        self.stream = None
        self.pending: list = []  # events that must complete before reuse
        self.recorded: set = set()
        self.copied_on: set = set()  # pinned: the streams its copies ran on
        self.addr = self.mem.ctypes.data

    def reusable(self, stream):
        return self.stream is stream and all(e.query() for e in self.pending)


class SimOps:
    """The backend's CUDA operations on the CPU, with the semantics above."""

    def __init__(self, torch, device=None, *, deferred_consumer=False):
        self.torch, self.device = torch, device
        self.registry: dict = {}
        self.null = SimStream(self, deferred=deferred_consumer, name="null")
        self.consumer = self.null
        self.local = threading.local()
        self.streams, self.recorded, self.device_allocs = [], [], []
        self.violations: list[str] = []
        self.bound = {threading.get_ident()}
        self._dev_free: list[_Block] = []
        self._pin_free: list[_Block] = []
        self._live: dict = {}  # addr -> block of live allocations
        self.host_writes: dict = {}  # addr -> count of asynchronous host reads in flight
        self.lock = threading.Lock()

    # -- threads and streams ------------------------------------------------------------------
    def bind(self):
        self.bound.add(threading.get_ident())

    def check_bound(self, what):
        if threading.get_ident() not in self.bound:
            self.violations.append(f"{what} from thread {threading.current_thread().name} "
                                   f"that never bound the device")

    def new_stream(self):
        self.check_bound("stream creation")
        s = SimStream(self, name=f"loader{len(self.streams)}")
        self.streams.append(s)
        return s

    def destroy_stream(self, stream):
        stream.destroyed = True

    @property
    def live_streams(self):
        return [s for s in self.streams if not s.destroyed]

    def current_stream(self):
        return getattr(self.local, "stream", None) or self.consumer

    def use_stream(self, stream):
        ops = self

        class _Use:
            def __enter__(self):
                self.prev = getattr(ops.local, "stream", None)
                ops.local.stream = stream

            def __exit__(self, *exc):
                ops.local.stream = self.prev

        return _Use()

    def new_event(self):
        return SimEvent()

    def raw_stream(self, stream):
        return stream.handle

    # -- memory -------------------------------------------------------------------------------
    def _alloc(self, free, nbytes, dtype, fill, stream):
        torch = self.torch
        itemsize = torch.empty(0, dtype=dtype).element_size()
        want = max(nbytes * itemsize, 1)
        with self.lock:
            block = next((b for b in free if b.mem.nbytes >= want and
                          (stream is None or b.reusable(stream))
                          and (stream is not None or all(e.query() for e in b.pending))), None)
            if block is not None:
                free.remove(block)
            else:
                block = _Block(want, fill)
            block.stream, block.pending, block.recorded = stream, [], set()
            block.copied_on = set()
            self._live[block.addr] = block
        view = block.mem[:nbytes * itemsize]  # a new object: its death is the free
        weakref.finalize(view, self._free, block, free)
        return torch.from_numpy(view).view(dtype)

    def _free(self, block, free):
        with self.lock:
            self._live.pop(block.addr, None)
            if self.host_writes.get(block.addr):
                self.violations.append("pinned buffer freed while a host read still writes "
                                       "into it")
            gone = [s.name for s in block.recorded | block.copied_on if s.destroyed]
            if gone:  # an event recorded on a destroyed stream: a CUDA error, the process aborts
                self.violations.append(f"buffer freed after stream(s) {gone} it was used on were "
                                       f"destroyed")
            for s in block.recorded:  # torch records an event on each recorded stream at free
                e = SimEvent()
                e.record(s)
                block.pending.append(e)
            free.append(block)

    def device_empty(self, nbytes, dtype):
        self.check_bound("device allocation")
        t = self._alloc(self._dev_free, nbytes, dtype, 0xAB, self.current_stream())
        self.device_allocs.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(),
                                   self.current_stream()))
        return t

    def pinned_empty(self, nbytes, dtype):
        return self._alloc(self._pin_free, nbytes, dtype, 0xCD, None)

    def _block_of(self, t):
        p = t.data_ptr()
        with self.lock:
            for b in self._live.values():
                if b.addr <= p < b.addr + b.mem.nbytes:
                    return b
        return None

    def copy_async(self, dst, src):
        self.check_bound("copy")
        stream = self.current_stream()
        stream.put(lambda: dst.copy_(src))
        b = self._block_of(src)
        if b is not None and b.stream is None:  # pinned source: the host allocator's event
            e = SimEvent()
            e.record(stream)
            b.pending.append(e)
            b.copied_on.add(stream)  # and, when the block is freed, one more on that stream

    def record_stream(self, tensor, stream):
        self.recorded.append((tensor.data_ptr(), stream))
        b = self._block_of(tensor)
        if b is not None and stream is not b.stream:
            b.recorded.add(stream)

    # -- CuPy over torch memory ------------------------------------------------------------------
    def as_cupy(self, tensor):
        return SimCupyArray(tensor)


class SimCupyArray:
    """A stand-in for a CuPy array over torch memory: what KvikIO and DLPack need of it."""

    def __init__(self, t):
        self.t = t

    def __getitem__(self, idx):
        return SimCupyArray(self.t[idx])

    def data_ptr(self):
        return self.t.data_ptr()

    def numel(self):
        return self.t.numel()

    def numpy(self):
        return self.t.numpy()
