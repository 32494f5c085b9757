"""The loader core shared by both backends: options, epochs, resume, the pipelined iterator.

A backend subclasses :class:`Loader` and :class:`EpochIterator` and implements only three things:
start the reads of one planned batch (``_submit``), wait for them and hand the batch out
(``_complete``), and stop everything it started (``_shutdown``). The core keeps at most
``prefetch`` batches submitted but not yet yielded, so in-flight memory is bounded by
``prefetch × batch bytes`` plus a constant, whatever the dataset size.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import BackendUnavailable, LoaderError
from .format import Dataset, FieldSpec, open_dataset
from .plan import BatchPlan, EpochPlan, PlanSpec, shuffle_block_points

log = logging.getLogger(__name__)

#: How often a waiting consumer re-checks for errors and stop requests (seconds).
POLL_S = 0.05
#: Options only the GPU-direct backend takes (ignored when ``auto`` falls back).
GDS_ONLY_OPTIONS = ("task_size",)
#: Region alignment inside a batch's host/device slab (bytes).
SLAB_ALIGN = 4096


def default_num_threads() -> int:
    return max(2, min(16, os.cpu_count() or 2))


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as exc:
        raise LoaderError(f"RANK/WORLD_SIZE environment is not an integer: {exc}") from exc


@dataclass(frozen=True)
class LoaderOptions:
    """Resolved options, identical for both backends."""

    batch_points: int | None
    batch_scans: int | None
    fields: tuple[str, ...]
    device: str
    shuffle: bool
    seed: int
    drop_last: bool
    prefetch: int
    num_threads: int
    rank: int
    world_size: int

    @property
    def scan_mode(self) -> bool:
        return self.batch_scans is not None

    @property
    def batch_size(self) -> int:
        return self.batch_scans if self.scan_mode else self.batch_points  # type: ignore[return-value]


def resolve_options(ds: Dataset, *, batch_points: int | None = None,
                    batch_scans: int | None = None, fields: Sequence[str] | None = None,
                    device: Any = None, shuffle: bool = False, seed: int = 0,
                    drop_last: bool = False, prefetch: int = 4, num_threads: int | None = None,
                    rank: int | None = None, world_size: int | None = None) -> LoaderOptions:
    """Check and complete loader options; a bad one is a :class:`LoaderError` naming it."""
    if (batch_points is None) == (batch_scans is None):
        raise LoaderError("give exactly one of batch_points= or batch_scans=")
    for name, v in (("batch_points", batch_points), ("batch_scans", batch_scans)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)
                              or v < 1):
            raise LoaderError(f"{name} must be a positive integer, got {v!r}")
    if fields is None:
        fields = tuple(ds.schema)
    else:
        fields = tuple(fields)
        if not fields:
            raise LoaderError(f"{ds.path}: fields= is empty; choose from {', '.join(ds.schema)}")
        missing = [f for f in fields if f not in ds.schema]
        if missing:
            raise LoaderError(f"{ds.path}: no field(s) {', '.join(map(repr, missing))}; "
                              f"fields are {', '.join(ds.schema)}")
        if len(set(fields)) != len(fields):
            raise LoaderError(f"fields= names a field twice: {fields}")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise LoaderError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(prefetch, int) or prefetch < 1:
        raise LoaderError(f"prefetch must be an integer >= 1, got {prefetch!r}")
    num_threads = default_num_threads() if num_threads is None else num_threads
    if not isinstance(num_threads, int) or num_threads < 1:
        raise LoaderError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    if rank is None or world_size is None:
        r, w = _dist_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank={rank} and world_size={world_size}: need 0 <= rank < world_size")
    return LoaderOptions(
        batch_points=None if batch_points is None else int(batch_points),
        batch_scans=None if batch_scans is None else int(batch_scans),
        fields=fields, device=device, shuffle=bool(shuffle), seed=int(seed),
        drop_last=bool(drop_last), prefetch=prefetch, num_threads=num_threads,
        rank=int(rank), world_size=int(world_size),
    )


@dataclass(frozen=True)
class SlabLayout:
    """Where each region of one batch lives inside its contiguous slab (host and device alike):
    one region per field, then the int32 permutation (if any), then the int64 offsets (if any)."""

    field_offsets: tuple[int, ...]
    perm_offset: int
    offsets_offset: int
    nbytes: int

    @staticmethod
    def build(specs: Sequence[FieldSpec], num_points: int, has_perm: bool,
              num_scans: int | None) -> "SlabLayout":
        pos, offs = 0, []
        for s in specs:
            offs.append(pos)
            pos += _round(num_points * s.point_bytes)
        perm = pos
        if has_perm:
            pos += _round(num_points * 4)
        oo = pos
        if num_scans is not None:
            pos += _round(num_scans * 8)
        return SlabLayout(tuple(offs), perm, oo, max(pos, SLAB_ALIGN))


def _round(n: int) -> int:
    return -(-n // SLAB_ALIGN) * SLAB_ALIGN


class Loader:
    """Base of both backends: epochs, ``len``, ``set_epoch``, resume, close, context manager."""

    #: Set by subclasses: "fallback", "gds" or "gds-compat".
    backend: str = "?"

    def __init__(self, dataset: Dataset | str | os.PathLike, **options: Any):
        self.dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
        self.options = resolve_options(self.dataset, **options)
        o = self.options
        self.specs: tuple[FieldSpec, ...] = tuple(self.dataset.schema[f] for f in o.fields)
        self.plan_spec = PlanSpec(
            num_points=self.dataset.num_points, scan_offsets=self.dataset.scan_offsets,
            batch_size=o.batch_size, scan_mode=o.scan_mode, shuffle=o.shuffle, seed=o.seed,
            drop_last=o.drop_last, rank=o.rank, world_size=o.world_size,
            block_points=shuffle_block_points([s.point_bytes for s in self.specs]),
        )
        self.epoch = 0
        self._resume_step = 0
        self._position = (0, 0)  # (epoch, batches yielded) of the latest iterator
        self._active: weakref.ref[EpochIterator] | None = None
        self._closed = False
        self.stats = LoaderStats()

    # -- the contract -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.plan_spec.num_steps()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter()`` runs (shuffle order depends on it)."""
        self.epoch = int(epoch)
        self._resume_step = 0

    def epoch_plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(self.plan_spec, self.epoch if epoch is None else epoch)

    def __iter__(self) -> "EpochIterator":
        if self._closed:
            raise LoaderError("iter() on a closed loader")
        self._close_active()
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
                "fields": list(o.fields), "shuffle": o.shuffle, "seed": o.seed,
                "drop_last": o.drop_last, "rank": o.rank, "world_size": o.world_size,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` resume at the first batch the saved loop had not seen."""
        mine = self.state_dict()["config"]
        theirs = state.get("config", {})
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            raise LoaderError(
                "state_dict was saved with different options: "
                + ", ".join(f"{k}={theirs.get(k)!r} (now {mine[k]!r})" for k in diff))
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise LoaderError(f"state_dict batches_done={done} outside 0..{len(self)}")
        if done == len(self):
            epoch, done = epoch + 1, 0
        self.epoch, self._resume_step, self._position = epoch, done, (epoch, done)

    # -- lifetime -----------------------------------------------------------------------------
    def _close_active(self) -> None:
        it = self._active() if self._active is not None else None
        if it is not None:
            it.close()
        self._active = None

    def close(self) -> None:
        """Stop and join everything this loader started. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_active()
        self._release()

    def _release(self) -> None:
        """Free backend resources kept across epochs (subclasses)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _make_iterator(self, plan: EpochPlan, start: int) -> "EpochIterator":
        raise NotImplementedError

    def __repr__(self) -> str:
        o = self.options
        size = f"batch_scans={o.batch_scans}" if o.scan_mode else f"batch_points={o.batch_points}"
        return (f"{type(self).__name__}(backend={self.backend!r}, {self.dataset.path}, {size}, "
                f"fields={list(o.fields)}, device={o.device!r}, shuffle={o.shuffle}, "
                f"rank={o.rank}/{o.world_size})")


class LoaderStats:
    """Counters a test or benchmark can read: peak batches and bytes submitted but not yielded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight = 0
        self.inflight_bytes = 0
        self.max_inflight = 0
        self.max_inflight_bytes = 0
        self.batches = 0
        self.points = 0

    def submitted(self, nbytes: int) -> None:
        with self.lock:
            self.inflight += 1
            self.inflight_bytes += nbytes
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.max_inflight_bytes = max(self.max_inflight_bytes, self.inflight_bytes)

    def retired(self, nbytes: int, points: int, yielded: bool) -> None:
        with self.lock:
            self.inflight -= 1
            self.inflight_bytes -= nbytes
            if yielded:
                self.batches += 1
                self.points += points

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {k: getattr(self, k) for k in ("inflight", "inflight_bytes", "max_inflight",
                                                  "max_inflight_bytes", "batches", "points")}


class EpochIterator:
    """One epoch of one loader: keeps ``prefetch`` batches in flight, yields them in order.

    Subclasses implement ``_submit(batch) -> handle``, ``_complete(handle) -> dict`` (may raise:
    the error is wrapped in :class:`LoaderError` with the cause chained), ``_handle_nbytes`` and
    ``_shutdown()`` (cancel and join everything; called once).
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
        self._lock = threading.Lock()

    def __iter__(self) -> "EpochIterator":
        return self

    def __len__(self) -> int:
        return self.plan.num_batches - self._yielded

    def _fill(self) -> None:
        while (len(self._inflight) < self.prefetch
               and self._next_submit < self.plan.num_batches):
            batch = self.plan.batch(self._next_submit)
            handle = self._submit(batch)
            nbytes = self._handle_nbytes(handle)
            self._stats.submitted(nbytes)
            self._inflight.append((batch, handle, nbytes))
            self._next_submit += 1

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        try:
            self._fill()
            if not self._inflight:
                self._finish()
                raise StopIteration
            batch, handle, nbytes = self._inflight.popleft()
            ok = False
            try:
                out = self._complete(handle)
                ok = True
            finally:
                self._stats.retired(nbytes, batch.num_points, yielded=ok)
            self._yielded += 1
            self._owner._on_yield(self.plan.epoch, self._yielded)
            self._fill()  # start the next reads before the consumer computes on this batch
            return out
        except StopIteration:
            raise
        except BaseException as exc:
            self.close()
            if isinstance(exc, (LoaderError, BackendUnavailable, KeyboardInterrupt)):
                raise
            raise LoaderError(
                f"{self._loader_path()}: batch {self._yielded} of epoch {self.plan.epoch} "
                f"failed: {type(exc).__name__}: {exc}") from exc

    def _loader_path(self) -> str:
        return str(self._owner.dataset.path)

    def _finish(self) -> None:
        self.close()
        self._owner._on_epoch_end(self.plan.epoch)

    def close(self) -> None:
        """Stop every read this iterator started and join its threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._shutdown()
        finally:
            while self._inflight:
                _, _, nbytes = self._inflight.popleft()
                self._stats.retired(nbytes, 0, yielded=False)

    def __enter__(self) -> "EpochIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass

    # -- backend hooks ------------------------------------------------------------------------
    def _submit(self, batch: BatchPlan) -> Any:
        raise NotImplementedError

    def _complete(self, handle: Any) -> dict:
        raise NotImplementedError

    def _handle_nbytes(self, handle: Any) -> int:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError


def open_loader(dataset: Dataset | str | os.PathLike, backend: str = "auto",
                **options: Any) -> Loader:
    """Build a loader. ``backend``: ``"auto"`` (GPU-direct when CUDA, cupy and kvikio work,
    else the CPU fallback, saying why in one log line), ``"gds"`` (raise
    :class:`BackendUnavailable` with the reason if it can't run) or ``"fallback"``."""
    if backend not in ("auto", "gds", "fallback"):
        raise LoaderError(f"backend must be 'auto', 'gds' or 'fallback', got {backend!r}")
    gds_only = {k: options.pop(k) for k in GDS_ONLY_OPTIONS if k in options}
    if backend in ("auto", "gds"):
        device = options.get("device")
        if backend == "auto" and device is not None and not str(device).startswith("cuda"):
            log.info("gds-stream backend: fallback (device %s is not CUDA)", device)
        else:
            from .gds import GDSLoader

            try:
                loader = GDSLoader(dataset, **options, **gds_only)
                log.info("gds-stream backend: %s", loader.backend)
                return loader
            except BackendUnavailable as exc:
                if backend == "gds":
                    raise
                log.info("gds-stream backend: fallback (GPU-direct unavailable: %s)", exc)
    from fallback import FallbackLoader

    return FallbackLoader(dataset, **options)
