"""The loader core shared by both backends: options, epochs, resume, close.

One epoch is an :class:`~gds_stream.epoch.EpochIterator` (the pipelined iterator contract); a
backend subclasses :class:`Loader` and that iterator. This module imports no backend:
:mod:`gds_stream.backends` chooses one.

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
import zlib
from typing import Any

import numpy as np

from ._hostmem import drain as drain_returned_buffers
from ._lifetime import Closeable, FieldFiles, import_torch
from .epoch import POLL_S, EpochIterator
from .errors import LoaderError
from .format import Dataset, FieldSpec
from .integrity import BlockVerifier
from .options import (DEFAULT_SHUFFLE_WINDOW, STORAGE_OPTIONS, LoaderOptions,
                      check_option_names, open_source, resolve_options)
from .plan import EpochPlan, PlanSpec, shuffle_block_points
from .stats import LoaderStats

log = logging.getLogger(__name__)

__all__ = ["Loader", "EpochIterator", "POLL_S"]
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
    #: How this backend reads, in its own words (subclasses; follows the choice in
    #: :attr:`backend_reason`).
    read_reason: str = ""

    @property
    def backend_reason(self) -> str:
        """Why this backend (set by :func:`gds_stream.backends.open_loader`), then how it reads."""
        return "; ".join(r for r in (self.__dict__.get("_choice_reason", ""), self.read_reason)
                         if r)

    @backend_reason.setter
    def backend_reason(self, reason: str) -> None:
        self._choice_reason = reason

    def __init__(self, dataset: Dataset | str | os.PathLike, **options: Any):
        import_torch()  # before anything refers to this loader (see import_torch)
        self._closed = False
        self._released = False
        self._plan_ahead: EpochPlan | None = None  # the next epoch's plan, drawing ahead
        self._active: weakref.ref[EpochIterator] | None = None
        self._lock = threading.Lock()
        self.files: FieldFiles | None = None
        self.verifier: BlockVerifier | None = None
        storage = {k: options.pop(k) for k in STORAGE_OPTIONS if k in options}
        check_option_names(list(options), extra=())
        self._owns_dataset = not isinstance(dataset, Dataset)
        self.dataset = open_source(dataset, storage)  # a URL: storage_options=, cache_dir=...
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
            self._check_window_mixes()
            self.files = self.dataset.open_files(o.fields, self.plan_spec)  # storage/
            if o.verify_reads:
                self.verifier = BlockVerifier(self.dataset, self.specs, self.files)
        except BaseException:
            self._release_resources()
            raise
        self.epoch = 0
        self._resume_step = 0
        #: The epoch a loaded state dict had completed (its last batch seen), until the next
        #: set_epoch() or iter(): set_epoch() of it resumes it with nothing left to yield.
        self._completed: int | None = None
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

    def _check_window_mixes(self) -> None:
        """Warn when ``shuffle_window`` is too small to mix: a window no larger than a shuffle
        block or a batch draws each batch from one or two blocks, as if there were no window."""
        o, ps = self.options, self.plan_spec
        share = self.dataset.num_points // max(1, o.world_size)
        floor = max(ps.block_points, o.batch_size)
        if not (o.shuffle and o.unit == "points" and 0 < o.shuffle_window <= floor < share):
            return
        what = (f"a shuffle block ({ps.block_points} points)" if ps.block_points >= o.batch_size
                else f"a batch (batch_points={o.batch_size})")
        log.warning("%s: shuffle_window=%d is no larger than %s: each batch then holds points of "
                    "one or two blocks, and what shares a batch barely changes between epochs; "
                    "use a window of many blocks (the default is %d points)", self.dataset.path,
                    o.shuffle_window, what, DEFAULT_SHUFFLE_WINDOW)

    # -- the contract -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (with ``max_batch_points`` it depends on
        the epoch's order: this is the count of the epoch the next ``iter()`` runs)."""
        return self.plan_spec.num_steps(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter()`` runs (shuffle order depends on it).

        After :meth:`load_state_dict`, ``set_epoch`` of the resumed epoch keeps the resume
        position (the usual ``for epoch in range(start, n): loader.set_epoch(epoch)`` loop
        resumes mid-epoch); another epoch drops it, with a warning naming both."""
        epoch = _epoch_value(epoch, "set_epoch()")
        completed, self._completed = self._completed, None
        if completed is not None and epoch == completed and self.epoch == completed + 1 \
                and not self._resume_step:
            # the state dict was saved after the epoch's last batch, and the loop enters that
            # epoch again (for epoch in range(saved["epoch"], n)): it has nothing left to yield
            log.info("%s: epoch %d was complete when the state dict was saved: it yields no "
                     "more batches", self.dataset.path, epoch)
            self.epoch, self._resume_step = epoch, self.plan_spec.num_steps(epoch)
            self._position = (epoch, self._resume_step)
            return
        if self._resume_step and epoch != self.epoch:
            log.warning("%s: set_epoch(%d) drops the resume position loaded by "
                        "load_state_dict() (epoch %d at batch %d): epoch %d starts from its "
                        "first batch", self.dataset.path, epoch, self.epoch, self._resume_step,
                        epoch)
            self._resume_step = 0
        self.epoch = epoch

    def epoch_plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        ahead = self._plan_ahead
        if ahead is not None and ahead.epoch == epoch and ahead.spec is self.plan_spec:
            return ahead
        return EpochPlan(self.plan_spec, epoch)

    def _draw_ahead(self, epoch: int) -> None:
        """Start drawing ``epoch``'s first shuffle-window permutation now, on its own thread
        (the epoch iterator calls this when it takes its last window): the usual next epoch
        then starts without waiting for it. Any other epoch simply builds its own plan."""
        plan = EpochPlan(self.plan_spec, epoch)
        if plan.spec.windowed and plan.num_batches > 0:
            plan.window_plan(0)
            self._plan_ahead = plan

    def __iter__(self) -> "EpochIterator":
        if self._closed:
            raise LoaderError(f"{self.dataset.path}: iter() on a closed loader")
        self._close_active("superseded")
        self._completed = None
        plan = self.epoch_plan()
        start, self._resume_step = self._resume_step, 0
        it = self._make_iterator(plan, start)
        self._active = weakref.ref(it)
        self._position = (plan.epoch, start)
        return it

    def _on_yield(self, epoch: int, yielded: int) -> None:
        # after the batch's reads, before it is handed out: a field file written in place
        # meanwhile fails the batch rather than yield new bytes under the old manifest
        check = getattr(self.files, "check_unchanged", None)
        if check is not None:
            check()
        self._position = (epoch, yielded)

    def _on_epoch_end(self, epoch: int) -> None:
        if self.epoch == epoch:
            self.epoch = epoch + 1
        self._position = (self.epoch, 0)

    def state_dict(self) -> dict[str, Any]:
        """Where the training loop stands: resume with :meth:`load_state_dict`."""
        epoch, done = self._position
        o = self.options
        stamps = getattr(self.files, "stamps", None)
        return {
            "epoch": epoch,
            "batches_done": done,
            # each field file's (size, mtime_ns): a resume onto files written in place since
            # is read with every block checked (load_state_dict)
            **({"files": {k: list(v) for k, v in stamps().items()}} if stamps else {}),
            "config": {
                "num_points": self.dataset.num_points, "num_scans": self.dataset.num_scans,
                "batch_points": o.batch_points, "batch_scans": o.batch_scans,
                "batch_chunks": o.batch_chunks, "max_batch_points": o.max_batch_points,
                "shuffle_window": o.shuffle_window, "num_chunks": self.dataset.num_chunks,
                "fields": list(o.fields), "shuffle": o.shuffle, "seed": o.seed,
                "drop_last": o.drop_last, "rank": o.rank, "world_size": o.world_size,
                "verify_reads": o.verify_reads, "dataset": self._fingerprint(),
            },
        }

    def _fingerprint(self) -> str:
        """crc32 of the dataset's scan and chunk offsets and of the block checksums of the
        fields read: a dataset replaced by another of the same size (other scans, other
        bytes) gives another value, the same data converted again the same one."""
        fp = getattr(self, "_fp", None)
        if fp is None:
            crc = zlib.crc32(np.ascontiguousarray(self.dataset.scan_offsets, "<i8").tobytes())
            crc = zlib.crc32(np.ascontiguousarray(self.dataset.chunk_offsets, "<i8").tobytes(),
                             crc)
            for name in self.options.fields:
                sums = self.dataset.layout(name).checksums
                crc = zlib.crc32(np.asarray(sums, dtype="<u4").tobytes(), crc)
            fp = self._fp = f"{crc:08x}"
        return fp

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` resume at the first batch the saved loop had not seen."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise LoaderError(f"load_state_dict() takes the dict state_dict() returned, got "
                              f"{type(state).__name__}")
        mine = self.state_dict()["config"]
        theirs = state["config"]
        diff = [k for k in mine if k not in _RESUME_FREE and theirs.get(k) != mine[k]
                and (k != "dataset" or "dataset" in theirs)]  # (older state dicts lack it)
        if diff == ["dataset"]:
            raise LoaderError(
                f"{self.dataset.path}: state_dict was saved on another version of this dataset "
                f"(its scans, chunks or the checksums of fields {', '.join(self.options.fields)} "
                f"differ); resuming would not continue the saved epoch: start the epoch again")
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
        self._check_files_since(state.get("files"))
        self._completed = None
        if done == steps:  # saved after the epoch's last batch: the next one is unseen
            self._completed, epoch, done = epoch, epoch + 1, 0
        self.epoch, self._resume_step, self._position = epoch, done, (epoch, done)

    def _check_files_since(self, saved: Any) -> None:
        """Field files whose size or modification time differ from the saved loader's: the same
        bytes copied elsewhere, or a rewrite in place (``cp`` over a file) that the manifest
        cannot show. The resumed loader then checks every block it reads against the manifest's
        crc32 (as ``verify_reads=True``): a rewrite fails at its first changed block, with the
        file named, instead of resuming the epoch on other bytes."""
        stamps = getattr(self.files, "stamps", None)
        if not isinstance(saved, dict) or stamps is None:
            return  # an older state dict, or object storage (versions are checked there)
        changed = [k for k, v in stamps().items()
                   if k in saved and not (isinstance(saved[k], (list, tuple))
                                          and [*saved[k]] == [*v])]
        if changed and self.verifier is None:
            log.warning("%s: the files of fields %s changed (size or modification time) since "
                        "the state dict was saved; the resumed loader checks every block it "
                        "reads against the manifest's checksums", self.dataset.path,
                        ", ".join(changed))
            self.verifier = BlockVerifier(self.dataset, self.specs, self.files)

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
        ahead, self._plan_ahead = self._plan_ahead, None
        if ahead is not None:
            ahead.join()
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
            drain_returned_buffers()
            if self.files is not None:
                self.files.close()
            if getattr(self, "_owns_dataset", False) and getattr(self, "dataset", None) is not None:
                self.dataset.close()

    def _release(self) -> None:
        """Free backend resources kept across epochs (subclasses)."""

    def _deliver(self, batch: dict) -> dict:
        """The batch as the consumer asked for it (``output="cupy"``: CuPy arrays)."""
        if self.options.output == "cupy":
            from .cudaops import to_cupy

            return to_cupy(batch)
        return batch

    def _make_iterator(self, plan: EpochPlan, start: int) -> "EpochIterator":
        raise NotImplementedError

    def __repr__(self) -> str:
        o = self.options
        size = f"{o.batch_option}={o.batch_size}"
        return (f"{type(self).__name__}(backend={self.backend!r}, {self.dataset.path}, {size}, "
                f"fields={list(o.fields)}, device={o.device!r}, shuffle={o.shuffle}, "
                f"rank={o.rank}/{o.world_size}, prefetch={o.prefetch}, "
                f"num_threads={o.num_threads})")
