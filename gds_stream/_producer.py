"""The pipeline threads of one epoch on a CPU device: they produce batches ahead of the consumer.

Producing a batch is a serial part — submit and complete the reads, in step order (the
iterator's plan, in-flight queue and statistics are not shared between threads) — and, with a
``transform=``, the transform of the batch, which depends only on the batch and its
``(seed, epoch, rank, step)`` generator. With ``transform_threads`` workers, each takes the next
step under one lock (the serial part), transforms it outside the lock, and queues it in step
order: up to that many batches are transformed at once, the consumer gets them in order, the
same batches as with one thread.

A batch's transforms are hundreds of small tensor ops, each dispatched under the GIL for a few
microseconds and too short for torch's intra-op pool to speed up. So each worker runs its ops
on one intra-op thread of its own (OpenMP's per-thread ``omp_set_num_threads``; the consumer's
training step keeps torch's pool) and the workers, one per core, run on every core at once.

A worker holds the iterator only while it takes a step (a weak reference otherwise), so an
abandoned iterator is still collected and closed at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import re
import threading
import weakref
from typing import Any, Callable

from .errors import LoaderError

log = logging.getLogger(__name__)

#: How often a waiting thread re-checks for errors and stop requests (seconds).
POLL_S = 0.05


class EpochEnd(Exception):
    """Raised by ``EpochIterator._produce_raw`` after the epoch's last batch."""


_OMP: list = []


def _omp_set_num_threads() -> Any:
    """libgomp's ``omp_set_num_threads`` of the one torch loaded (None where torch's parallel
    backend is not OpenMP, or none is loaded)."""
    if not _OMP:
        fn = None
        try:
            import torch

            if "parallel backend: OpenMP" in torch.__config__.parallel_info():
                with open("/proc/self/maps") as f:
                    libs = sorted(set(re.findall(r"(/\S*/libgomp[^/\s]*\.so[^/\s]*)", f.read())))
                # torch's own copy (its wheel bundles one) before any other a library loaded
                home = os.path.dirname(os.path.dirname(torch.__file__))
                ours = [p for p in libs if p.startswith(os.path.join(home, "torch"))]
                pick = ours[0] if ours else libs[0] if len(libs) == 1 else None
                if pick is not None:
                    fn = ctypes.CDLL(pick).omp_set_num_threads
                    fn.argtypes, fn.restype = [ctypes.c_int], None
        except (OSError, AttributeError, ImportError):  # pragma: no cover - not Linux/OpenMP
            fn = None
        if fn is None:
            log.debug("transform threads keep torch's intra-op pool: no OpenMP library of "
                      "torch's to set one thread per transform thread with")
        _OMP.append(fn)
    return _OMP[0]


def single_intraop_thread() -> bool:
    """Run the calling thread's torch ops on one intra-op thread (the other threads keep theirs).
    False where that cannot be set per thread (the ops then use torch's pool)."""
    fn = _omp_set_num_threads()
    if fn is None:
        return False
    import torch

    torch.get_num_threads()  # torch's per-thread first-use setup first: it must not undo ours
    fn(1)
    return True


class Producer:
    """``workers`` pipeline threads of one iterator; ``apply(step, batch, stacked)`` is the
    pipeline, run on each batch out of the serial part."""

    def __init__(self, it: Any, workers: int, apply: Callable[[int, dict, bool], dict],
                 single_thread_ops: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.apply = apply
        self.claim = threading.Lock()      # the serial part, and the iterator's shared state
        self.turns = threading.Condition()
        self.claimed = 0                   # turns taken (under ``claim``)
        self.queued = 0                    # turns queued (under ``turns``)
        self.ended = False                 # the epoch's end was taken (under ``claim``)
        ref = weakref.ref(it)
        self.threads = [threading.Thread(
            # Joined by the iterator's teardown; daemon only so a leaked one cannot block exit.
            target=_work, args=(ref, self, single_thread_ops),
            name="gds-stream-pipeline" + (f"-{i}" if workers > 1 else ""), daemon=True)
            for i in range(workers)]
        for t in self.threads:
            t.start()

    def take(self, it: Any) -> dict:
        """The next batch (consumer's thread); a failure of a pipeline thread first."""
        while True:
            if self.error is not None:
                # handed over once (the iterator then stops): its traceback holds the iterator
                err, self.error = self.error, None
                raise err
            try:
                kind, value = self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if it._closed and it._why is not None:
                    raise LoaderError(it._stopped_message()) from None
                if (not any(t.is_alive() for t in self.threads) and self.queue.empty()
                        and self.error is None):
                    raise LoaderError("the pipeline thread stopped unexpectedly") from None
                continue
            if kind == "end":
                raise EpochEnd
            if kind == "error":
                raise value
            return value

    def fail(self, exc: BaseException) -> None:
        with self.turns:
            if self.error is None:
                self.error = exc
            self.halt.set()
            self.turns.notify_all()

    def stop(self) -> None:
        self.halt.set()
        with self.turns:
            self.turns.notify_all()
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join()

    def _queue_in_turn(self, ref: "weakref.ref", turn: int, item: tuple[str, Any]) -> bool:
        with self.turns:
            while self.queued != turn:
                if self.halt.is_set():
                    return False
                self.turns.wait(POLL_S)
        while not self.halt.is_set():
            try:
                self.queue.put(item, timeout=POLL_S)
                break
            except queue.Full:
                it = ref()
                try:
                    if it is not None:  # a read ahead failed: say so at the next next()
                        with self.claim:
                            it._raise_later_failures()
                except BaseException as exc:  # noqa: BLE001 - travels to the consumer
                    self.fail(exc)
                    return False
                finally:
                    del it
        else:
            return False
        with self.turns:
            self.queued += 1
            self.turns.notify_all()
        return True


def _work(ref: "weakref.ref", prod: Producer, single_thread_ops: bool) -> None:
    if single_thread_ops:
        single_intraop_thread()
    while not prod.halt.is_set():
        it = ref()
        if it is None:
            return
        with prod.claim:
            if prod.ended or prod.halt.is_set():
                return
            turn, prod.claimed = prod.claimed, prod.claimed + 1
            try:
                step, out, stacked = it._produce_raw()
                kind = "batch"
            except EpochEnd:
                kind, out, prod.ended = "end", None, True
            except BaseException as exc:  # noqa: BLE001 - travels to the consumer
                prod.fail(exc)
                return
        del it
        if kind == "batch":
            try:
                out = prod.apply(step, out, stacked)
            except BaseException as exc:  # noqa: BLE001 - in its turn: the first failing batch
                kind, out = "error", exc
        if not prod._queue_in_turn(ref, turn, (kind, out)) or kind != "batch":
            if kind == "error":  # queued: the threads with later batches stop
                prod.halt.set()
            return
        del out
