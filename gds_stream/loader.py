"""The loader core shared by both backends: options, epochs, resume, the pipelined iterator.

A backend subclasses :class:`Loader` and :class:`EpochIterator` and implements only three things:
start the reads of one planned batch (``_submit``), wait for them and hand the batch out
(``_complete``), and stop everything it started (``_shutdown``; ``_request_stop`` wakes a
consumer blocked in ``_complete`` from another thread). The core keeps at most ``prefetch``
batches submitted but not yet yielded, so in-flight memory is bounded by ``prefetch × batch
bytes`` plus a constant, whatever the dataset size.

This module imports no backend: :mod:`gds_stream.backends` chooses one.

Misuse never looks like a finished epoch: an iterator stopped before the end of its epoch — by
``close()`` (its own or the loader's, from any thread), by a newer ``iter(loader)``, by an error
or by Ctrl-C — raises :class:`LoaderError` saying so at every later ``next()``; two threads
calling ``next()`` on one iterator at once get a :class:`LoaderError` instead of sharing batches.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from typing import Any

import numpy as np

from ._lifetime import Closeable, FieldFiles
from .errors import BackendUnavailable, LoaderError
from .format import Dataset, FieldSpec, open_dataset
from .integrity import BlockVerifier
from .options import LoaderOptions, check_option_names, resolve_options
from .plan import BatchPlan, EpochPlan, PlanSpec, shuffle_block_points
from .stats import LoaderStats

log = logging.getLogger(__name__)

#: How often a waiting consumer re-checks for errors and stop requests (seconds).
POLL_S = 0.05
#: state_dict config keys that do not change the batches (resume may change them).
_RESUME_FREE = ("verify_reads",)


def _epoch_value(epoch: object, where: str) -> int:
    if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
        raise LoaderError(f"{where}: the epoch must be an integer >= 0, got {epoch!r}")
    return int(epoch)


class Loader(Closeable):
    """Base of both backends: epochs, ``len``, ``set_epoch``, resume, close, context manager.

    Resources: a loader built from a path opens (and in ``close()`` closes) its
    :class:`Dataset`; every loader opens its own descriptors of the selected fields'
    files (:attr:`files`) and closes them in ``close()`` — a :class:`Dataset` passed in is
    left as it was.
    """

    #: Set by subclasses: "fallback", "gds" or "gds-compat".
    backend: str = "?"
    #: Why this backend: set by :func:`gds_stream.backends.open_loader`.
    backend_reason: str = "built directly, not through open_loader"

    def __init__(self, dataset: Dataset | str | os.PathLike, **options: Any):
        self._closed = False
        self._released = False
        self._active: weakref.ref[EpochIterator] | None = None
        self._lock = threading.Lock()
        self.files: FieldFiles | None = None
        self.verifier: BlockVerifier | None = None
        check_option_names(list(options), extra=())
        self._owns_dataset = not isinstance(dataset, Dataset)
        self.dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
        try:
            self.options: LoaderOptions = resolve_options(self.dataset, options)
            o = self.options
            self.specs: tuple[FieldSpec, ...] = tuple(self.dataset.schema[f] for f in o.fields)
            units = (self.dataset.chunk_offsets if o.unit == "chunks"
                     else self.dataset.scan_offsets)
            self.plan_spec = PlanSpec(
                num_points=self.dataset.num_points, scan_offsets=units,
                batch_size=o.batch_size, scan_mode=o.scan_mode, shuffle=o.shuffle, seed=o.seed,
                drop_last=o.drop_last, rank=o.rank, world_size=o.world_size,
                block_points=shuffle_block_points([s.point_bytes for s in self.specs]),
                shuffle_window=o.shuffle_window, max_batch_points=o.max_batch_points,
            )
            #: The batch key of the unit ids ("chunk" in chunk mode), or None.
            self.unit_key: str | None = "chunk" if o.unit == "chunks" else None
            self._check_yields_batches()
            self.files = self.dataset.open_files(o.fields, self.plan_spec)  # storage/
            if o.verify_reads:
                self.verifier = BlockVerifier(self.dataset, self.specs, self.files)
        except BaseException:
            self._release_resources()
            raise
        self.epoch = 0
        self._resume_step = 0
        self._position = (0, 0)  # (epoch, batches yielded) of the latest iterator
        self.stats = LoaderStats()

    def _check_yields_batches(self) -> None:
        """A configuration whose epochs are empty is refused (an empty dataset only warns)."""
        if self.plan_spec.num_steps() > 0:
            return
        o, ds = self.options, self.dataset
        if ds.num_points == 0:
            log.warning("%s: the dataset holds no points; every epoch yields no batch "
                        "(len(loader) == 0)", ds.path)
            return
        unit, opt = o.unit, o.batch_option
        units, w = self.plan_spec.num_units, o.world_size
        per_rank = units // w
        ranks = f" over world_size={w} ranks" if w > 1 else ""
        fix = (f"lower {opt} to at most {per_rank} or set drop_last=False" if per_rank >= 1
               else "set drop_last=False (every rank then gets a short batch)")
        raise LoaderError(
            f"{ds.path}: {opt}={o.batch_size} with drop_last=True yields no batch: the dataset "
            f"has {units} {unit}{ranks}, fewer than one full batch per rank "
            f"({o.batch_size * w} needed); {fix}")

    # -- the contract -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (with ``max_batch_points`` it depends on
        the epoch's order: this is the count of the epoch the next ``iter()`` runs)."""
        return self.plan_spec.num_steps(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter()`` runs (shuffle order depends on it)."""
        self.epoch = _epoch_value(epoch, "set_epoch()")
        self._resume_step = 0

    def epoch_plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(self.plan_spec, self.epoch if epoch is None else epoch)

    def __iter__(self) -> "EpochIterator":
        if self._closed:
            raise LoaderError(f"{self.dataset.path}: iter() on a closed loader")
        self._close_active("superseded")
        plan = self.epoch_plan()
        start, self._resume_step = self._resume_step, 0
        it = self._make_iterator(plan, start)
        self._active = weakref.ref(it)
        self._position = (plan.epoch, start)
        return it

    def _on_yield(self, epoch: int, yielded: int) -> None:
        self._position = (epoch, yielded)

    def _on_epoch_end(self, epoch: int) -> None:
        if self.epoch == epoch:
            self.epoch = epoch + 1
        self._position = (self.epoch, 0)

    def state_dict(self) -> dict[str, Any]:
        """Where the training loop stands: resume with :meth:`load_state_dict`."""
        epoch, done = self._position
        o = self.options
        return {
            "epoch": epoch,
            "batches_done": done,
            "config": {
                "num_points": self.dataset.num_points, "num_scans": self.dataset.num_scans,
                "batch_points": o.batch_points, "batch_scans": o.batch_scans,
                "batch_chunks": o.batch_chunks, "max_batch_points": o.max_batch_points,
                "shuffle_window": o.shuffle_window, "num_chunks": self.dataset.num_chunks,
                "fields": list(o.fields), "shuffle": o.shuffle, "seed": o.seed,
                "drop_last": o.drop_last, "rank": o.rank, "world_size": o.world_size,
                "verify_reads": o.verify_reads,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` resume at the first batch the saved loop had not seen."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise LoaderError(f"load_state_dict() takes the dict state_dict() returned, got "
                              f"{type(state).__name__}")
        mine = self.state_dict()["config"]
        theirs = state["config"]
        diff = [k for k in mine if k not in _RESUME_FREE and theirs.get(k) != mine[k]]
        if diff:
            raise LoaderError(
                "state_dict was saved with different options: "
                + ", ".join(f"{k}={theirs.get(k)!r} (now {mine[k]!r})" for k in diff))
        epoch = _epoch_value(state.get("epoch"), "state_dict['epoch']")
        done = state.get("batches_done")
        if not isinstance(done, (int, np.integer)) or isinstance(done, bool):
            raise LoaderError(f"state_dict['batches_done'] must be an integer, got {done!r}")
        done = int(done)
        steps = self.plan_spec.num_steps(epoch)
        if not 0 <= done <= steps:
            raise LoaderError(f"state_dict batches_done={done} outside 0..{steps}")
        if done == steps:
            epoch, done = epoch + 1, 0
        self.epoch, self._resume_step, self._position = epoch, done, (epoch, done)

    # -- lifetime -----------------------------------------------------------------------------
    def _close_active(self, why: str) -> "EpochIterator | None":
        it = self._active() if self._active is not None else None
        self._active = None
        if it is not None:
            it._request_close(why)
        return it

    def close(self) -> None:
        """Stop and join everything this loader started, close what it opened. Idempotent.

        Called from another thread while an epoch runs, the consumer's next ``next()`` raises
        :class:`LoaderError`; descriptors are closed once that iterator's threads are joined."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        it = self._close_active("closed by loader.close()")
        if it is None or it._torn_down:
            self._release_resources()

    def _iterator_torn_down(self) -> None:
        """An iterator joined its threads: release what a closed loader still holds."""
        if self._closed:
            self._release_resources()

    def _release_resources(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self._release()
        finally:
            if self.files is not None:
                self.files.close()
            if getattr(self, "_owns_dataset", False) and getattr(self, "dataset", None) is not None:
                self.dataset.close()

    def _release(self) -> None:
        """Free backend resources kept across epochs (subclasses)."""

    def _make_iterator(self, plan: EpochPlan, start: int) -> "EpochIterator":
        raise NotImplementedError

    def __repr__(self) -> str:
        o = self.options
        size = f"{o.batch_option}={o.batch_size}"
        return (f"{type(self).__name__}(backend={self.backend!r}, {self.dataset.path}, {size}, "
                f"fields={list(o.fields)}, device={o.device!r}, shuffle={o.shuffle}, "
                f"rank={o.rank}/{o.world_size}, prefetch={o.prefetch}, "
                f"num_threads={o.num_threads})")


class EpochIterator(Closeable):
    """One epoch of one loader: keeps ``prefetch`` batches in flight, yields them in order.

    Subclasses implement ``_submit(batch) -> handle``, ``_complete(handle) -> dict`` (may raise:
    the error is wrapped in :class:`LoaderError` with the cause chained), ``_handle_nbytes``,
    ``_shutdown()`` (cancel and join everything; called once, by the thread that owns the
    iterator at that moment) and optionally ``_request_stop()`` (thread-safe, non-blocking: make
    a ``_complete`` waiting in another thread return soon).
    """

    def __init__(self, loader: Loader, plan: EpochPlan, start: int):
        # A strong reference: ``for b in open_loader(...)`` keeps the loader alive while its
        # epoch runs. The loader holds only a weak reference back, so there is no cycle and an
        # abandoned iterator is collected (and closed) at once.
        self._owner = loader
        self._stats = loader.stats
        self.plan = plan
        self.prefetch = loader.options.prefetch
        self._next_submit = start
        self._yielded = start
        self._inflight: deque[tuple[BatchPlan, Any, int]] = deque()
        self._closed = False
        self._finished = False
        self._why: str | None = None  # why it stopped before the end of its epoch
        self._torn_down = False
        self._state = threading.Lock()
        self._busy = threading.Lock()  # held by the one thread inside __next__ or teardown
        # Shuffle windows (gds_stream.window): the backend reads windows, the core cuts batches.
        self._windowed = plan.spec.windowed
        self._window: tuple[int, dict, int] | None = None  # (index, tensors, bytes) resident
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
                window, _ = self.plan.window(self._next_submit)
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
        if not self._busy.acquire(blocking=False):
            if self._closed:  # a close() from another thread is joining the workers: wait
                self._busy.acquire()  # for it, then report the close below
            else:
                raise LoaderError(
                    f"{self._loader_path()}: the iterator of epoch {self.plan.epoch} was used "
                    f"from two threads at once (next() while another next() was running); "
                    f"give each thread its own loader or serialise the calls")
        try:
            return self._next_locked()
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
            self._fill()
            if self._windowed:
                return self._next_windowed()
            if not self._inflight:
                self._finish_epoch()
            batch, handle, nbytes = self._inflight.popleft()
            ok = False
            try:
                out = self._complete(handle)
                ok = True
            finally:
                self._stats.retired(nbytes, batch.num_points, yielded=ok)
            # The handle's buffers die here, not after the next batch's buffers are allocated.
            del handle
            self._raise_later_failures()
            self._yielded += 1
            self._owner._on_yield(self.plan.epoch, self._yielded)
            self._fill()  # start the next reads before the consumer computes on this batch
            return out
        except StopIteration:
            raise
        except BaseException as exc:
            closed_meanwhile = self._why is not None
            if isinstance(exc, KeyboardInterrupt):
                self._end("interrupted by KeyboardInterrupt")
                raise
            self._end(f"failed at batch {self._yielded} ({type(exc).__name__})")
            if closed_meanwhile:
                raise LoaderError(self._stopped_message()) from exc
            if isinstance(exc, (LoaderError, BackendUnavailable)):
                raise
            raise LoaderError(
                f"{self._loader_path()}: batch {self._yielded} of epoch {self.plan.epoch} "
                f"failed: {type(exc).__name__}: {exc}") from exc

    def _finish_epoch(self) -> None:
        """The epoch ran to its end: stop, tell the loader, and end the iteration."""
        self._finished = True
        self._end(None)
        self._owner._on_epoch_end(self.plan.epoch)
        raise StopIteration

    def _next_windowed(self) -> dict:
        """The next batch of a windowed epoch: gathered from the resident window, whose
        successor is being read meanwhile."""
        from .window import gather_rows

        step = self._yielded
        if step >= self.plan.num_batches:
            self._finish_epoch()
        batch = self.plan.batch(step)
        assert batch.window is not None and batch.rows is not None
        if self._window is None or self._window[0] != batch.window.index:
            self._drop_window()
            _, handle, nbytes = self._inflight.popleft()
            try:
                tensors = self._complete(handle)
            except BaseException:
                self._stats.retired(nbytes, 0, yielded=False)
                raise
            self._window = (batch.window.index, tensors, nbytes)
            self._fill()  # read the next window while this one is consumed
        self._raise_later_failures()  # the window being read ahead
        out = gather_rows(self._window[1], batch.rows)
        self._stats.counted(batch.num_points)
        if step + 1 >= batch.window.stop_step:
            self._drop_window()
        self._yielded += 1
        self._owner._on_yield(self.plan.epoch, self._yielded)
        return out

    def _drop_window(self) -> None:
        if self._window is not None:
            _, _, nbytes = self._window
            self._window = None
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
            self._shutdown()
        finally:
            while self._inflight:
                _, _, nbytes = self._inflight.popleft()
                self._stats.retired(nbytes, 0, yielded=False)
            self._drop_window()
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
