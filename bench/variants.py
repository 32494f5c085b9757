"""The loaders the benchmark compares, each behind one small interface (:class:`Variant`).

Owns: the dataset's field files as (path, offset, size), and every baseline loader —
``sequential`` (blocking preadv), ``queue`` (one prefetch thread), ``torch-dataloader`` (a grid of
``DataLoader`` configurations), gds-stream's own ``fallback`` and ``gds`` through the public
``open_loader``, and ``compute-only`` (batches already resident). ``Variant.epoch()`` returns a
fresh iterator of device batches; nothing here times anything.

Which points make each batch is the ``order``'s (``bench.chunked``): file-order ranges of
``batch`` points by default, or — in spatial-chunk mode — the library's chunk plan, each batch the
concatenation of its chunks' ranges for every field.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from bench.backbone import FIELDS
from bench.chunked import PointOrder
from gds_stream.format import Dataset

POLL_S = 0.05


# -- the dataset's files ----------------------------------------------------------------------
@dataclass(frozen=True)
class FieldFile:
    name: str
    path: str
    offset: int
    nbytes: int
    dtype: np.dtype
    components: int

    @property
    def point_bytes(self) -> int:
        return self.dtype.itemsize * self.components


def field_files(ds: Dataset, fields: Sequence[str]) -> list[FieldFile]:
    out = []
    for f in fields:
        lay = ds.layout(f)
        out.append(FieldFile(f, str(ds.field_path(f)), lay.offset, lay.nbytes, lay.spec.dtype,
                             lay.spec.components))
    return out


def batch_ranges(num_points: int, batch: int) -> list[tuple[int, int]]:
    return [(a, min(a + batch, num_points)) for a in range(0, num_points, batch)]


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


def _shape(ff: FieldFile, n: int) -> tuple[int, ...]:
    return (n,) if ff.components == 1 else (n, ff.components)


def _gather(m: np.ndarray, segs: np.ndarray, copy: bool = True) -> np.ndarray:
    """Rows ``segs`` (k × [start, stop)) of ``m``, concatenated in order; one range is a copy
    of a slice (or, with ``copy=False``, the slice itself)."""
    if len(segs) == 1:
        a, b = int(segs[0, 0]), int(segs[0, 1])
        return np.copy(m[a:b]) if copy else m[a:b]
    return np.concatenate([m[int(a):int(b)] for a, b in segs])


def _memmaps(files: Sequence[FieldFile], num_points: int) -> dict[str, np.memmap]:
    """Whole-field memmaps (mode 'c': readable without torch's non-writable warning)."""
    return {ff.name: np.memmap(ff.path, dtype=ff.dtype, mode="c", offset=ff.offset,
                               shape=_shape(ff, num_points)) for ff in files}


# -- loaders ------------------------------------------------------------------------------------
class Variant:
    """One loader configuration: ``epoch()`` returns a fresh iterator of device batches."""

    family = "?"
    #: The keys every batch holds: the first counts the points, all of them are checksummed.
    fields: tuple[str, ...] = FIELDS

    def __init__(self, name: str, backend: str = "", config: dict | None = None):
        self.name = name
        self.backend = backend
        self.config = config or {}

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SequentialVariant(Variant):
    family = "sequential"

    def __init__(self, files, num_points, batch, device, order=None):
        super().__init__("sequential", "os.preadv, blocking", {"reads": "os.preadv"})
        self.files, self.num_points, self.batch, self.device = files, num_points, batch, device
        self.order = order or PointOrder(num_points, batch)
        self.fds = {ff.name: os.open(ff.path, os.O_RDONLY) for ff in files}

    def epoch(self):
        return self._gen()

    def _gen(self):
        for segs in self.order.epoch_segments():
            n = int((segs[:, 1] - segs[:, 0]).sum())
            out = {}
            for ff in self.files:
                arr = np.empty(_shape(ff, n), dtype=ff.dtype)
                pos = 0
                for a, b in segs.tolist():
                    pread_full(self.fds[ff.name], memoryview(arr[pos:pos + b - a]).cast("B"),
                               ff.offset + a * ff.point_bytes)
                    pos += b - a
                out[ff.name] = torch.from_numpy(arr).to(self.device)
            yield out

    def close(self):
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


class _End:
    pass


@dataclass
class _Failure:
    exc: BaseException


class QueueVariant(Variant):
    """One producer thread copying memmap slices into a ``Queue(maxsize=2)``; pageable H2D in
    the consumer. The memmaps stay open across epochs, as such code keeps them, unless
    ``keep_maps=False`` (``--cold``: pages mapped by a process can't be dropped)."""

    family = "queue"

    def __init__(self, files, num_points, batch, device, keep_maps=True, order=None):
        super().__init__("queue", "thread + Queue(2), memmap copy",
                         {"threads": 1, "maxsize": 2, "memmaps_kept_across_epochs": keep_maps})
        self.files, self.num_points, self.batch, self.device = files, num_points, batch, device
        self.order = order or PointOrder(num_points, batch)
        self.keep_maps = keep_maps
        self._maps: dict[str, np.memmap] | None = None

    def _open_maps(self) -> dict[str, np.memmap]:
        if self._maps is not None:
            return self._maps
        maps = _memmaps(self.files, self.num_points) if self.num_points else {}
        if self.keep_maps:
            self._maps = maps
        return maps

    def close(self):
        self._maps = None

    def epoch(self):
        return self._gen()

    def _gen(self):
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        batches = self.order.epoch_segments()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                maps = self._open_maps()
                for segs in batches:
                    item = {k: _gather(m, segs) for k, m in maps.items()}
                    if not put(item):
                        return
                del maps
                put(_End)
            except BaseException as exc:  # travels to the consumer
                put(_Failure(exc))

        th = threading.Thread(target=produce, name="bench-queue-prefetch", daemon=True)
        th.start()
        try:
            while True:
                try:
                    item = q.get(timeout=POLL_S)
                except queue.Empty:
                    if not th.is_alive() and q.empty():
                        raise RuntimeError("queue producer died without a result") from None
                    continue
                if item is _End:
                    return
                if isinstance(item, _Failure):
                    raise RuntimeError("queue producer failed") from item.exc
                yield {k: torch.from_numpy(v).to(self.device) for k, v in item.items()}
        finally:
            stop.set()
            th.join()


class MemmapBatches(torch.utils.data.Dataset):
    """Map-style dataset: item i is batch i as a dict of ``numpy.memmap`` slices; an item keyed
    by a (k, 2) array of point ranges (chunk mode's sampler) is those ranges concatenated.
    Memmaps are opened lazily in whichever process indexes it (workers included) and never
    pickled."""

    def __init__(self, files: Sequence[FieldFile], num_points: int, batch: int):
        self.files, self.num_points, self.batch = list(files), num_points, batch
        self.ranges = batch_ranges(num_points, batch)
        self._maps: dict[str, np.memmap] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        if self._maps is None or self._pid != os.getpid():
            self._maps, self._pid = _memmaps(self.files, self.num_points), os.getpid()
        if isinstance(i, np.ndarray):
            return {k: _gather(m, i, copy=False) for k, m in self._maps.items()}
        a, b = self.ranges[i]
        return {k: m[a:b] for k, m in self._maps.items()}

    def release(self) -> None:
        self._maps = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = None, -1
        return state


class SegmentSampler(torch.utils.data.Sampler):
    """Chunk mode: each epoch (in the main process) yields the plan's point ranges per batch."""

    def __init__(self, order):
        self.order = order

    def __iter__(self):
        return iter(self.order.epoch_segments())


class TorchDataLoaderVariant(Variant):
    family = "torch-dataloader"

    def __init__(self, files, num_points, batch, device, num_workers, pin_memory,
                 prefetch_factor, persistent, order=None):
        """``persistent=False`` (``--cold``) also closes the main process's memmaps after each
        epoch: pages mapped by a process can't be dropped from the page cache. ``order``
        (chunk mode): batches keyed by the plan's point ranges through a sampler."""
        cfg = {"num_workers": num_workers, "pin_memory": pin_memory,
               "prefetch_factor": prefetch_factor if num_workers else None,
               "persistent_workers": bool(persistent and num_workers),
               # On a CPU device with no workers the batch is the memmap itself: nothing is read
               # until the model touches it, so its loader-only run reads nothing.
               "zero_copy_views": torch.device(device).type == "cpu" and num_workers == 0}
        label = (f"w={num_workers},pin={int(pin_memory)}"
                 + (f",pf={prefetch_factor}" if num_workers else ""))
        super().__init__(f"torch-dataloader[{label}]", f"DataLoader {label}", cfg)
        self.device = device
        self.dataset = MemmapBatches(files, num_points, batch)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, shuffle=False, num_workers=num_workers,
            sampler=None if order is None else SegmentSampler(order),
            pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=cfg["persistent_workers"])
        self.non_blocking = pin_memory
        self.keep_maps = persistent

    def epoch(self):
        return self._gen()

    def _gen(self):
        try:
            for item in self.loader:
                yield {k: v.to(self.device, non_blocking=self.non_blocking)
                       for k, v in item.items()}
        finally:
            if not self.keep_maps:
                self.dataset.release()  # the main process's maps (num_workers=0)

    def close(self):
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None
        self.dataset.release()


class LibraryVariant(Variant):
    """gds-stream's own loaders through the public ``open_loader``, with the loader's own
    defaults (prefetch depth, reader threads: they depend on the device). ``shuffle``/``seed``
    are passed to every library loader alike, so ``gds`` and ``fallback`` read the same order.
    ``task_size`` (bytes) is KvikIO's unit of parallel work, gds only. With ``batch_chunks``
    (chunk mode) ``batch`` is unused and the i-th epoch this variant runs is the loader's epoch i,
    as for the baselines' :class:`bench.chunked.ChunkOrder`."""

    def __init__(self, family: str, path: Path, batch: int, device: torch.device,
                 shuffle: bool = False, seed: int = 0, task_size: int | None = None,
                 name: str | None = None, batch_chunks: int | None = None, **options):
        """``options``: further ``open_loader`` options (e.g. ``stack=``, ``dtype=``)."""
        from gds_stream import open_loader

        self.family = family
        extra = {} if task_size is None else {"task_size": task_size}
        extra.update({"batch_points": batch} if batch_chunks is None
                     else {"batch_chunks": batch_chunks})
        self._epochs = None if batch_chunks is None else 0
        self.loader = open_loader(path, backend=family, fields=list(FIELDS),
                                  device=str(device), shuffle=shuffle, seed=seed,
                                  drop_last=False, rank=0, world_size=1, **extra, **options)
        o = self.loader.options
        backend = str(getattr(self.loader, "backend", family))
        reason = getattr(self.loader, "backend_reason", None)
        cfg = {"backend": backend, "prefetch": getattr(o, "prefetch", None),
               "num_threads": getattr(o, "num_threads", None), "shuffle": shuffle,
               "seed": seed if shuffle else None}
        if reason:
            cfg["backend_reason"] = str(reason)
        if task_size is not None:
            cfg["task_size"] = task_size
        if batch_chunks is not None:
            cfg["batch_chunks"] = batch_chunks
        cfg.update({k: str(v) for k, v in options.items()})
        reads = ("inline reads" if cfg["num_threads"] == 0  # read in next(), no reader thread
                 else f"{cfg['num_threads']} thr")
        label = (f"{backend}, {reads}, prefetch {cfg['prefetch']}"
                 + (", shuffled" if shuffle else ""))
        super().__init__(name or family, label, cfg)

    def epoch(self):
        if self._epochs is not None:
            self.loader.set_epoch(self._epochs)
            self._epochs += 1
        return iter(self.loader)

    def close(self):
        self.loader.close()


class ComputeOnlyVariant(Variant):
    family = "compute-only"

    def __init__(self, ds: Dataset, files, batch, device, order=None):
        """``order`` (chunk mode): the batches of its first epoch."""
        super().__init__("compute-only", "batches resident on the device", {})
        self.batches = []
        for segs in (order or PointOrder(ds.num_points, batch)).epoch_segments():
            self.batches.append({ff.name: torch.from_numpy(np.concatenate(
                [ds.read(ff.name, int(a), int(b)) for a, b in segs])).to(device)
                for ff in files})

    def epoch(self):
        return iter(self.batches)

    def close(self):
        self.batches = []


def tdl_grid(cuda: bool, smoke: bool) -> list[dict]:
    cpus = os.cpu_count() or 1
    workers = [w for w in ((0, 2) if smoke else (0, 2, 4)) if w <= cpus]
    pins = (False, True) if cuda else (False,)
    factors = (2,) if smoke else (2, 4)
    grid = []
    for w in workers:
        for pin in pins:
            for pf in (factors if w else (None,)):
                grid.append({"num_workers": w, "pin_memory": pin, "prefetch_factor": pf})
    return grid

