"""The GPU-direct backend's submit thread: what one batch's reads are, and how they are queued
on the loader's streams, read into the pinned ring, checked and handed back (see
:mod:`gds_stream.gds` for the routes and the synchronisation rules)."""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DatasetError
from .format import align_up
from .loader import POLL_S
from .plan import BatchPlan
from .ring import PinnedRing


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
    staging: Any  # torch uint8 device tensor, 4 KiB-aligned start (copies, hand-out)
    target: Any  # the same memory as KvikIO's read target (a CuPy array on a GPU)
    perm_dev: Any  # torch int32 device tensor (rows to gather) or None
    nbytes: int
    stream: Any = None  # the loader's stream this batch is read on
    done: Any = None  # blocking event on that stream after all copies/reads
    futures: list = field(default_factory=list)  # (read, stream future) of the gds route
    submitted: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Submitter:
    """The submit thread's work: per batch, start the ``gds`` reads on the batch's stream,
    run the ``host`` reads into a pinned slot and queue their copy, queue the permutation's
    copy, record the batch's event; then, once ``depth`` batches are queued (or nothing else
    is waiting), finish the oldest: wait on its event, check byte counts and checksums. Holds no
    reference to the iterator."""

    def __init__(self, ops: Any, files: list, routes: list[str], paths: list[str],
                 task_size: int, verifier: Any, ring: PinnedRing, depth: int):
        self.ops, self.files, self.routes = ops, files, routes
        self.paths, self.task_size, self.verifier = paths, task_size, verifier
        self.ring, self.depth = ring, depth

    def run(self, q: "queue.Queue[_Pending | None]", stop: threading.Event) -> None:
        self.ops.bind()  # first thing: cuFile calls need the device's context current
        started: collections.deque[_Pending] = collections.deque()
        try:
            while not stop.is_set():
                if started and (len(started) >= self.depth or q.empty()):
                    self._finish(started.popleft())
                    continue
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
                    p.submitted.set()
                else:
                    started.append(p)
        finally:
            for p in started:  # stopping: let queued reads land, report nothing
                if p.done is not None:
                    p.done.synchronize()
                p.submitted.set()

    def submit(self, p: _Pending) -> None:
        try:
            with self.ops.use_stream(p.stream):
                self._start(p)
        except BaseException:
            if p.futures:  # cuFile still uses each future's arguments: let them land
                ev = self.ops.new_event()
                ev.record(p.stream)
                ev.synchronize()
            raise

    def _finish(self, p: _Pending) -> None:
        try:
            p.done.synchronize()  # our own stream only; a blocking event: the thread sleeps
            for r, fut in p.futures:
                try:
                    got = fut.check_bytes_done()
                except Exception as exc:
                    self._raise(r, exc)
                self._check(r, got)
            if self.verifier is not None:
                self.verifier.check(p.batch.segments)
        except BaseException as exc:
            p.error = exc
        finally:
            p.submitted.set()

    def _start(self, p: _Pending) -> None:
        """Queue everything of batch ``p`` on its stream (the current stream here)."""
        torch, stream = self.ops.torch, p.stream
        raw = self.ops.raw_stream(stream)
        for r in p.reads:
            if self.routes[r.field] != "gds":
                continue
            try:
                fut = self.files[r.field].raw_read_async(
                    p.target[r.dev_offset:r.dev_offset + r.size], raw, r.size,
                    r.file_offset, 0)
            except Exception as exc:
                self._raise(r, exc)
            p.futures.append((r, fut))
        hosted = [r for r in p.reads if self.routes[r.field] != "gds"]
        perm = p.batch.permutation()  # within-batch shuffle; windows come here unshuffled
        if not hosted and perm is None:
            p.done = self.ops.new_event()
            p.done.record(stream)
            return
        perm_at = align_up(p.nbytes)
        slot = self.ring.acquire(perm_at + (4 * len(perm) if perm is not None else 0), grow=True)
        event = None
        try:
            slot.wait_free()  # the slot's previous copy has run
            pinned, host = slot.tensor, slot.array
            if hosted:
                self._read_hosted(hosted, host)
                for a, b in _runs([p.regions[i] for i, route in enumerate(self.routes)
                                   if route != "gds"]):
                    self.ops.copy_async(p.staging[a:b], pinned[a:b])
            if perm is not None:
                host[perm_at:perm_at + 4 * len(perm)].view(np.int32)[:] = perm
                self.ops.copy_async(p.perm_dev, pinned[perm_at:perm_at + 4 * len(perm)]
                                    .view(torch.int32))
            event = self.ops.new_event()
            event.record(stream)
        finally:
            self.ring.release(slot, event)  # without a new copy it keeps its last event
        p.done = event

    def _read_hosted(self, hosted: list[_Read], host: np.ndarray) -> None:
        """KvikIO ``pread`` of every ``host``-route read into pinned ``host``; returns only
        when every submitted read finished, whatever failed (no read outlives its buffer)."""
        futures: list = []
        errors: list = []
        try:
            for r in hosted:
                futures.append((r, self.files[r.field].pread(
                    host[r.dev_offset:r.dev_offset + r.size], r.size, r.file_offset,
                    self.task_size)))
        except Exception as exc:
            errors.append((hosted[len(futures)], exc))
        finally:
            for r, fut in futures:  # wait for every submitted read, even after a failure
                try:
                    self._check(r, fut.get())
                except Exception as exc:
                    errors.append((r, exc))
        if errors:
            self._raise(*errors[0])

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
