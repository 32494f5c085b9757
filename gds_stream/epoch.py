"""One epoch of a loader: the pipelined iterator both backends share.

A backend subclasses :class:`EpochIterator` and implements only: start the reads of one planned
batch (``_submit``), wait for them and hand the batch out (``_complete``), and stop everything
it started (``_shutdown``; ``_request_stop`` wakes a consumer blocked in ``_complete`` from
another thread). The core keeps at most ``prefetch`` batches submitted but not yet yielded, so
in-flight memory is bounded by ``prefetch × batch bytes`` plus a constant.

The batch pipeline (:mod:`gds_stream.pipeline`: ``transform=``, ``stack=``) runs where the batch
is produced. On a CPU device with a transform, ``transform_threads`` pipeline threads of this
iterator (``gds-stream-pipeline-*``, :mod:`gds_stream._producer`) take the batches' reads in
turn and transform several batches at once, each on one intra-op thread, queued in step order:
none of it runs in the consumer's ``next()``, and up to ``transform_threads`` batches more than
``prefetch`` are alive. With only ``stack=``, one pipeline thread produces batches one ahead
when the reads are threaded; a loader that reads inline on the consumer's thread (a CPU device
whose cores torch already takes) stacks there too. On CUDA the pipeline is queued on the
backend's own stream (``_on_loader_stream``) and the consumer's stream waits on an event.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from ._lifetime import Closeable, raise_pending_interrupt
from ._producer import POLL_S, EpochEnd as _EpochEnd, Producer
from .errors import BackendUnavailable, LoaderError
from .plan import BatchPlan, EpochPlan

if TYPE_CHECKING:  # pragma: no cover
    from .loader import Loader

__all__ = ["POLL_S", "EpochIterator"]


class EpochIterator(Closeable):
    """One epoch of one loader: keeps ``prefetch`` batches in flight, yields them in order.

    Subclasses implement ``_submit(batch) -> handle``, ``_complete(handle) -> dict`` (may raise:
    the error is wrapped in :class:`LoaderError` with the cause chained), ``_handle_nbytes``,
    ``_shutdown()`` (cancel and join everything; called once, by the thread that owns the
    iterator at that moment), optionally ``_request_stop()`` (thread-safe, non-blocking: make
    a ``_complete`` waiting in another thread return soon) and, on CUDA, ``_on_loader_stream``.
    """

    def __init__(self, loader: "Loader", plan: EpochPlan, start: int):
        # A strong reference: ``for b in open_loader(...)`` keeps the loader alive while its
        # epoch runs. The loader holds only a weak reference back, so there is no cycle and an
        # abandoned iterator is collected (and closed) at once.
        self._owner = loader
        self._stats = loader.stats
        self.plan = plan
        o = loader.options
        self.prefetch = o.prefetch
        self._next_submit = start
        self._yielded = start  # batches handed to the consumer
        self._made = start  # batches produced (ahead of _yielded by the pipeline thread)
        self._inflight: deque[tuple[BatchPlan, Any, int]] = deque()
        self._closed = False
        self._finished = False
        self._why: str | None = None  # why it stopped before the end of its epoch
        self._torn_down = False
        self._state = threading.Lock()
        self._busy = threading.Lock()  # held by the one thread inside __next__ or teardown
        self._pipe = o.pipeline
        self._seed, self._rank = o.seed, o.rank
        self._cuda = str(o.device).startswith("cuda")
        #: Produce batches in pipeline threads: a CPU device with a transform (``transform_threads``
        #: of them), or with a stack and reader threads (one).
        self._threaded = (self._pipe is not None and not self._cuda
                          and (self._pipe.transform is not None
                               or not getattr(loader, "inline_reads", False)))
        self._producer: Producer | None = None
        # Shuffle windows (gds_stream.window): the backend reads windows, the core cuts batches.
        self._windowed = plan.spec.windowed
        self._window: tuple[int, Any, int] | None = None  # (index, tensors, bytes) resident
        self._spare: Any = None  # a consumed packed window, packed into again (CPU)
        if self._windowed:
            self._num_windows = -(-plan.num_batches // plan.spec.window_steps)
            self._next_submit = (plan.window_index(start) if start < plan.num_batches
                                 else self._num_windows)

    def __iter__(self) -> "EpochIterator":
        return self

    def __len__(self) -> int:
        return self.plan.num_batches - self._yielded

    def _fill(self) -> None:
        if self._windowed:  # one window read ahead of the one being consumed
            while not self._inflight and self._next_submit < self._num_windows:
                window = self.plan.window_plan(self._next_submit)
                self._submit_read(window.as_batch())
            return
        while (len(self._inflight) < self.prefetch
               and self._next_submit < self.plan.num_batches):
            self._submit_read(self.plan.batch(self._next_submit))

    def _submit_read(self, batch: BatchPlan) -> None:
        handle = self._submit(batch)
        nbytes = self._handle_nbytes(handle)
        self._stats.submitted(nbytes)
        self._inflight.append((batch, handle, nbytes))
        self._next_submit += 1

    def __next__(self) -> dict:
        raise_pending_interrupt()  # a Ctrl-C that landed in a finalizer of ours
        if not self._busy.acquire(blocking=False):
            if self._closed:  # a close() from another thread is joining the workers: wait
                self._busy.acquire()  # for it, then report the close below
            else:
                raise LoaderError(
                    f"{self._loader_path()}: the iterator of epoch {self.plan.epoch} was used "
                    f"from two threads at once (next() while another next() was running); "
                    f"give each thread its own loader or serialise the calls")
        try:
            return self._owner._deliver(self._next_locked())
        finally:
            self._busy.release()
            if self._closed and not self._torn_down:
                self._teardown_if_idle()

    def _next_locked(self) -> dict:
        if self._closed:
            self._teardown()
            if self._finished:
                raise StopIteration
            raise LoaderError(self._stopped_message())
        try:
            try:
                if self._threaded:
                    if self._producer is None:
                        self._producer = self._start_producer()
                    out = self._producer.take(self)
                else:
                    out = self._produce()
            except _EpochEnd:
                self._finish_epoch()
            # checked before it counts: a batch that fails here was not handed out
            self._owner._on_yield(self.plan.epoch, self._yielded + 1)
            self._yielded += 1
            return out
        except StopIteration:
            raise
        except BaseException as exc:
            closed_meanwhile = self._why is not None
            if isinstance(exc, KeyboardInterrupt):
                self._end("was interrupted by KeyboardInterrupt")
                raise
            self._end(f"failed at batch {self._yielded} ({type(exc).__name__})")
            if closed_meanwhile:
                raise LoaderError(self._stopped_message()) from exc
            if isinstance(exc, (LoaderError, BackendUnavailable)):
                raise
            raise LoaderError(
                f"{self._loader_path()}: batch {self._yielded} of epoch {self.plan.epoch} "
                f"failed: {type(exc).__name__}: {exc}") from exc

    # -- producing batches (the consumer's thread, or the pipeline threads) -------------------
    def _start_producer(self) -> Producer:
        pipe, seed, epoch, rank = self._pipe, self._seed, self.plan.epoch, self._rank
        assert pipe is not None

        def apply(step: int, out: dict, stacked: bool) -> dict:  # holds no iterator
            return pipe.apply(out, seed, epoch, rank, step, stacked)
        transforms = pipe.transform is not None  # else a stack alone: one thread, torch's pool
        workers = self._owner.options.transform_threads if transforms else 1
        return Producer(self, workers, apply, single_thread_ops=transforms)

    def _produce(self) -> dict:
        """The next batch, pipeline applied; :class:`_EpochEnd` after the last one."""
        step, out, stacked = self._produce_raw()
        if self._pipe is not None and not self._cuda:
            out = self._apply(step, out, stacked)
        return out

    def _produce_raw(self) -> tuple[int, dict, bool]:
        """The next batch's step, the batch (on a CPU device without the pipeline applied
        yet: ``stacked`` says whether the read built the stacks) — :class:`_EpochEnd` after
        the last one. The serial part of producing a batch: one thread at a time."""
        step = self._made
        stacked = False
        if self._windowed:
            out = self._produce_windowed(step)
        else:
            self._fill()
            if not self._inflight:
                raise _EpochEnd
            batch, handle, nbytes = self._inflight.popleft()
            ok = False
            try:
                if self._pipe is not None and self._cuda:
                    out = self._on_loader_stream(
                        lambda: self._apply(step, self._complete(handle)))
                else:
                    out = self._complete(handle)
                ok = True
            finally:
                self._stats.retired(nbytes, batch.num_points, yielded=ok)
            # The handle's buffers die here, not after the next batch's buffers are allocated.
            del handle
            self._raise_later_failures()
            self._fill()  # start the next reads before the consumer computes on this batch
            stacked = self._stacked_by_read(batch)
        self._made += 1
        return step, out, stacked

    def _apply(self, step: int, out: dict, stacked: bool = False) -> dict:
        assert self._pipe is not None
        return self._pipe.apply(out, self._seed, self.plan.epoch, self._rank, step, stacked)

    def _stacked_by_read(self, batch: BatchPlan) -> bool:
        """Whether the backend's read of ``batch`` built the ``stack=`` tensors itself (a fused
        read; see :attr:`gds_stream.pipeline.Pipeline.fusable`)."""
        return False

    def _produce_windowed(self, step: int) -> dict:
        """A batch of a windowed epoch: gathered from the resident window, whose successor is
        being read meanwhile."""
        from .window import gather_rows, pack_window

        if step >= self.plan.num_batches:
            raise _EpochEnd
        self._fill()
        index = self.plan.window_index(step)
        # The window is taken (read, packed) before its rows are asked for: its permutation is
        # drawn on another thread meanwhile (EpochPlan.window_plan).
        if self._window is None or self._window[0] != index:
            self._drop_window()
            _, handle, nbytes = self._inflight.popleft()
            try:
                tensors = self._complete(handle)
            except BaseException:
                self._stats.retired(nbytes, 0, yielded=False)
                raise
            if not self._cuda:  # one cache line per point for the random gathers
                tensors = pack_window(tensors, reuse=self._spare)
            self._spare = None
            self._window = (index, tensors, nbytes)
            del handle, tensors  # a packed window's read buffer is free for the next read
            self.plan.forget_window(index - 1)
            if index == self._num_windows - 1:  # the last window: the next epoch's first
                self._owner._draw_ahead(self.plan.epoch + 1)  # permutation meanwhile
            self._fill()  # read the next window while this one is consumed
        self._raise_later_failures()  # the window being read ahead
        batch = self.plan.batch(step)
        assert batch.window is not None and batch.rows is not None
        tensors, rows = self._window[1], batch.rows
        if self._pipe is not None and self._cuda:
            out = self._on_loader_stream(lambda: self._apply(step, gather_rows(tensors, rows)))
        else:  # on a CPU the pipeline is applied by the caller
            out = gather_rows(tensors, rows)
        self._stats.counted(batch.num_points)
        if step + 1 >= batch.window.stop_step:
            self._drop_window()
        return out

    def _finish_epoch(self) -> None:
        """The epoch ran to its end: stop, tell the loader, and end the iteration."""
        self._finished = True
        self._end(None)
        self._owner._on_epoch_end(self.plan.epoch)
        raise StopIteration

    def _drop_window(self, keep: bool = True) -> None:
        """Drop the resident window; a packed one stays as ``_spare``, the memory the next
        window of the epoch is packed into (unless ``keep`` is false: the epoch ends)."""
        if not keep:
            self._spare = None
        if self._window is not None:
            _, tensors, nbytes = self._window
            self._window = None
            if keep and not isinstance(tensors, dict):
                self._spare = tensors
            self._stats.retired(nbytes, 0, yielded=False)

    def _stopped_message(self) -> str:
        why = self._why or "closed"
        where = (f"{self._loader_path()}: the iterator of epoch {self.plan.epoch} stopped after "
                 f"{self._yielded} of {self.plan.num_batches} batches")
        if why == "superseded":
            return (f"{where}: it was superseded by a newer iter(loader), which restarts the "
                    f"epoch; use one iterator per epoch")
        if why.startswith("closed"):
            return f"{where}: it was {why} before the epoch finished"
        return f"{where}: it {why}; start a new iter(loader)"

    def _loader_path(self) -> str:
        return str(self._owner.dataset.path)

    # -- stopping -----------------------------------------------------------------------------
    def _end(self, why: str | None) -> None:
        """Mark closed (first reason wins) and tear down; the caller holds ``_busy``."""
        with self._state:
            if not self._closed:
                self._closed, self._why = True, why
        self._teardown()

    def _request_close(self, why: str) -> None:
        """Close from any thread: tear down now if no ``next()`` is running, else wake it (it
        tears down and raises :class:`LoaderError`)."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            if not self._finished:
                self._why = why
        try:
            self._request_stop()
        finally:
            self._teardown_if_idle()

    def _teardown_if_idle(self) -> None:
        if self._busy.acquire(blocking=False):
            try:
                self._teardown()
            finally:
                self._busy.release()

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        try:
            self._request_stop()
            if self._producer is not None:  # before the backend's threads: it uses them
                self._producer.stop()
            self._shutdown()
        finally:
            while self._inflight:
                _, _, nbytes = self._inflight.popleft()
                self._stats.retired(nbytes, 0, yielded=False)
            self._drop_window(keep=False)
            self.plan.join()
            self._owner._iterator_torn_down()

    def close(self) -> None:
        """Stop every read this iterator started and join its threads. Idempotent. After a
        close before the end of the epoch, ``next()`` raises :class:`LoaderError`."""
        if not hasattr(self, "_state"):  # half-built
            return
        self._request_close("closed by its close() or a with-block exit")

    def _raise_later_failures(self) -> None:
        """Raise the failure of any batch (or window) still in flight, so it surfaces at this
        ``next()`` rather than when its turn comes."""
        for _, handle, _ in self._inflight:
            exc = self._failure(handle)
            if exc is not None:
                raise exc

    # -- backend hooks ------------------------------------------------------------------------
    def _failure(self, handle: Any) -> BaseException | None:
        """The error of an in-flight handle whose work already failed, else None (cheap, must
        not block)."""
        return None

    def _on_loader_stream(self, make: Callable[[], dict]) -> dict:
        """CUDA: run ``make()`` (unpack, gather, transform, stack) queued on the loader's own
        stream, make the consumer's current stream wait on it, and record every returned
        tensor on the consumer's stream. The default runs it on the current stream."""
        return make()

    def _submit(self, batch: BatchPlan) -> Any:
        raise NotImplementedError

    def _complete(self, handle: Any) -> dict:
        raise NotImplementedError

    def _handle_nbytes(self, handle: Any) -> int:
        raise NotImplementedError

    def _request_stop(self) -> None:
        """Wake a consumer blocked in ``_complete`` (thread-safe, must not block)."""

    def _shutdown(self) -> None:
        raise NotImplementedError
