"""Loader options: names, types, device-aware defaults; checked once, the same for both backends.

Every integer option must be a real integer (Python or numpy; ``bool`` is refused, so is ``1.5``
and ``"1"``) and every flag a real ``bool``; a wrong one is a :class:`LoaderError` naming the option
and the value. An unknown keyword names ``open_loader`` and suggests the closest option.

Defaults depend on the device (``None`` means "the default"; explicit values are respected):

* CPU device: ``num_threads = max(0, cores - torch.get_num_threads())`` — torch's intra-op pool
  already uses ``torch.get_num_threads()`` cores for the training step, and reader threads
  competing with it for those cores slow both down. ``0`` (the default where torch takes every
  core) reads inline: each batch is read in ``next()`` on the consumer's thread, with the kernel
  reading the next batches ahead (``posix_fadvise(WILLNEED)``), no thread of ours at all. And
  ``prefetch = 2``: a deeper queue only pushes batches out of the CPU caches before the consumer
  touches them.
* CUDA device: ``num_threads = min(16, max(2, cores))`` (reads overlap GPU compute, the host
  cores are the readers') and ``prefetch = 4``.
* CPU device with a ``transform``: ``transform_threads = min(MAX_TRANSFORM_THREADS, cores)``
  threads transform whole batches at once, each on one intra-op thread
  (:func:`default_transform_threads`, :mod:`gds_stream._producer`); on CUDA the option is refused
  (the transform is queued on the loader's own stream).
* A dataset in object storage (``s3://``): at least ``REMOTE_THREADS`` reader threads on either
  device — a range request waits on the network, not on a core, so reading inline would
  serialise the round trips.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import LoaderError
from .format import Dataset
from .pipeline import Pipeline, make_pipeline

#: Every option the core takes (both backends), with its default.
CORE_OPTIONS: dict[str, Any] = {
    "batch_points": None, "batch_scans": None, "fields": None, "device": None,
    "shuffle": False, "seed": 0, "drop_last": False, "prefetch": None, "num_threads": None,
    "rank": None, "world_size": None, "verify_reads": False,
    "batch_chunks": None, "max_batch_points": None, "shuffle_window": None,
    "transform": None, "stack": None, "dtype": None, "stack_layout": "rows", "output": "torch",
    "transform_threads": None,
}
#: Names other libraries use, and the option meant (DataLoader's ``batch_size`` counts samples:
#: here a batch is counted in points).
_ALIASES = {"batch_size": "batch_points", "num_workers": "num_threads",
            "prefetch_factor": "prefetch"}
#: What a batch holds: torch tensors, or CuPy arrays (CUDA only) for RAPIDS pipelines.
OUTPUTS = ("torch", "cupy")
#: Options only the GPU-direct backend takes (ignored when ``auto`` falls back).
GDS_ONLY_OPTIONS = ("task_size",)
#: Options of the dataset an object-store URL opens (see :func:`open_source`).
STORAGE_OPTIONS = ("storage_options", "cache_dir", "cache_bytes")
_FLAGS = ("shuffle", "drop_last", "verify_reads")

#: Points permuted together in a shuffled points-mode epoch (see :mod:`gds_stream.plan`).
DEFAULT_SHUFFLE_WINDOW = 1 << 22
_BATCH = ("batch_points", "batch_scans", "batch_chunks")

CPU_PREFETCH = 2
CUDA_PREFETCH = 4
MAX_THREADS = 16


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Reader threads, at least, for a dataset in object storage (requests in flight at once).
REMOTE_THREADS = 8


def default_num_threads(device_type: str = "cuda") -> int:
    """Reader threads when ``num_threads`` is not given (see the module docstring)."""
    cores = _cores()
    if device_type == "cpu":
        import torch

        return max(0, min(MAX_THREADS, cores - torch.get_num_threads()))
    return max(2, min(MAX_THREADS, cores))


#: Most transform threads by default (each holds a batch being transformed).
MAX_TRANSFORM_THREADS = 4


def default_transform_threads() -> int:
    """Transform threads when ``transform_threads`` is not given (CPU device): one per core, at
    most ``MAX_TRANSFORM_THREADS``. A batch's transforms are a few hundred small tensor ops,
    too short for torch's intra-op pool to speed up (they are the same speed on one thread) and
    each dispatched under the GIL for a few microseconds: whole batches on single-threaded
    workers, one per core, transform ~1.6x as many points a second on two cores as one thread
    does."""
    return max(1, min(MAX_TRANSFORM_THREADS, _cores()))


def default_prefetch(device_type: str) -> int:
    return CPU_PREFETCH if device_type == "cpu" else CUDA_PREFETCH


def check_option_names(names: Sequence[str], extra: Sequence[str] = GDS_ONLY_OPTIONS) -> None:
    """An unknown keyword is a :class:`LoaderError` naming ``open_loader`` and the closest
    option."""
    known = sorted(set(CORE_OPTIONS) | set(extra) | set(STORAGE_OPTIONS))
    for name in names:
        if name in known:
            continue
        close = ([_ALIASES[name]] if name in _ALIASES
                 else difflib.get_close_matches(name, known, n=1, cutoff=0.6))
        hint = f"did you mean {close[0]!r}?" if close else f"options are {', '.join(known)}"
        raise LoaderError(f"open_loader() got an unknown option {name!r}; {hint}")


def open_source(dataset: Dataset | str | os.PathLike, storage: Mapping[str, Any]) -> Dataset:
    """The dataset a loader reads: ``dataset`` itself, or the one its path or URL opens.
    ``storage`` (``storage_options``, ``cache_dir``, ``cache_bytes``) configures an
    object-store URL; with a local path or an already opened dataset it is a
    :class:`LoaderError` saying where it goes instead."""
    from .format import open_dataset
    from .storage import is_url

    names = ", ".join(f"{k}=" for k in storage)
    if isinstance(dataset, Dataset):
        if storage:
            raise LoaderError(f"{dataset.path}: {names} configure how a URL is opened, and this "
                              f"dataset is already open; pass them to open_dataset()")
        return dataset
    if storage and not is_url(dataset):
        raise LoaderError(f"{dataset}: {names} apply to object-store URLs (s3://bucket/prefix) "
                          f"only; a local dataset is read from its files directly")
    return open_dataset(dataset, **storage)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int(name: str, v: object, minimum: int | None = None, words: str = "") -> int:
    words = words or (f"an integer >= {minimum}" if minimum is not None else "an integer")
    if not _is_int(v):
        raise LoaderError(f"{name} must be {words}, got {v!r} ({type(v).__name__})")
    if minimum is not None and int(v) < minimum:  # type: ignore[arg-type]
        raise LoaderError(f"{name} must be {words}, got {v!r}")
    return int(v)  # type: ignore[arg-type]


def _flag(name: str, v: object) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise LoaderError(f"{name} must be True or False, got {v!r} ({type(v).__name__})")
    return bool(v)


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
    verify_reads: bool = False
    batch_chunks: int | None = None
    max_batch_points: int | None = None
    shuffle_window: int = 0
    #: transform=/stack=/dtype=, checked (:mod:`gds_stream.pipeline`); None: nothing to do.
    pipeline: Pipeline | None = None
    output: str = "torch"
    #: CPU device with a transform: the loader threads that transform batches (each whole
    #: batches, on one intra-op thread of its own), handed out in order.
    transform_threads: int = 1

    @property
    def unit(self) -> str:
        """What a batch is made of: "points", "scans" or "chunks"."""
        if self.batch_chunks is not None:
            return "chunks"
        return "scans" if self.batch_scans is not None else "points"

    @property
    def scan_mode(self) -> bool:
        """Batches of whole units (scans or chunks), with ``offset``."""
        return self.unit != "points"

    @property
    def batch_option(self) -> str:
        return {"points": "batch_points", "scans": "batch_scans", "chunks": "batch_chunks"}[
            self.unit]

    @property
    def batch_size(self) -> int:
        size = getattr(self, self.batch_option)
        assert size is not None
        return size


def resolve_options(ds: Dataset, options: Mapping[str, Any]) -> LoaderOptions:
    """Check and complete loader options; a bad one is a :class:`LoaderError` naming it."""
    check_option_names(list(options), extra=())
    o = {**CORE_OPTIONS, **options}
    given = [k for k in _BATCH if o[k] is not None]
    if len(given) != 1:
        raise LoaderError("give exactly one of batch_points=, batch_scans= or batch_chunks="
                          + (f" (got {', '.join(given)})" if given else ""))
    for name in _BATCH:
        if o[name] is not None:
            o[name] = _int(name, o[name], 1, "a positive integer")
    if o["batch_chunks"] is not None and ds.num_chunks == 0:
        raise LoaderError(
            f"{ds.path}: batch_chunks= needs a spatially chunked dataset, and this one has no "
            f"chunks; convert the inputs with `gds-stream convert ... --chunk-size S` "
            f"(gds_stream.convert(..., chunk_size=S)), S the chunk edge in coordinate units")
    mbp = o["max_batch_points"]
    if mbp is not None:
        if o["batch_points"] is not None:
            raise LoaderError("max_batch_points= packs whole scans or chunks; it goes with "
                              "batch_scans= or batch_chunks=, not batch_points=")
        mbp = _int("max_batch_points", mbp, 1, "a positive integer")
    window = o["shuffle_window"]
    if window is not None:
        if o["batch_points"] is None:
            raise LoaderError("shuffle_window= mixes points across batches; it goes with "
                              "batch_points=, not with batches of whole scans or chunks")
        window = _int("shuffle_window", window, 0, "an integer >= 0 (points; 0: off)")
    else:
        window = DEFAULT_SHUFFLE_WINDOW if o["batch_points"] is not None else 0
    fields = o["fields"]
    if fields is None:
        fields = tuple(ds.schema)
    else:
        if isinstance(fields, str):
            raise LoaderError(f"fields= must be a list of field names, got the string {fields!r}")
        fields = tuple(fields)
        bad = [f for f in fields if not isinstance(f, str)]
        if bad:
            raise LoaderError(f"fields= must name fields by their names (strings), got {bad[0]!r}")
        if not fields:
            raise LoaderError(f"{ds.path}: fields= is empty; choose from {', '.join(ds.schema)}")
        missing = [f for f in fields if f not in ds.schema]
        if missing:
            raise LoaderError(f"{ds.path}: no field(s) {', '.join(map(repr, missing))}; "
                              f"fields are {', '.join(ds.schema)}")
        if len(set(fields)) != len(fields):
            raise LoaderError(f"fields= names a field twice: {fields}")
    device = o["device"]
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import torch

        dev_type = torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as exc:
        raise LoaderError(f"device={device!r} is not a torch device ({exc}); use 'cpu', 'cuda' "
                          f"or 'cuda:N'") from None
    device = str(device)
    if o["output"] not in OUTPUTS:
        raise LoaderError(f"output must be 'torch' or 'cupy', got {o['output']!r}")
    if o["output"] == "cupy" and dev_type != "cuda":
        raise LoaderError(f"output='cupy' gives CuPy arrays on a CUDA device; device={device!r} "
                          f"is not CUDA (use output='torch')")
    flags = {k: _flag(k, o[k]) for k in _FLAGS}
    seed = _int("seed", o["seed"], 0)
    prefetch = default_prefetch(dev_type) if o["prefetch"] is None else \
        _int("prefetch", o["prefetch"], 1)
    if o["num_threads"] is None:
        num_threads = default_num_threads(dev_type)
        if getattr(ds, "remote", False):  # object storage: reads wait on the network
            num_threads = max(num_threads, REMOTE_THREADS)
    elif dev_type == "cpu":
        num_threads = _int("num_threads", o["num_threads"], 0,
                           "an integer >= 0 (0: read inline in next())")
    else:
        num_threads = _int("num_threads", o["num_threads"], 1,
                           "an integer >= 1 on a CUDA device (0, inline reads, is for the CPU)")
    rank, world_size = o["rank"], o["world_size"]
    for name, v in (("rank", rank), ("world_size", world_size)):
        if v is not None:
            _int(name, v)
    if rank is None or world_size is None:
        r, w = _dist_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank={rank} and world_size={world_size}: need 0 <= rank < world_size")
    pipeline = make_pipeline(str(ds.path), tuple(ds.schema), fields, o["transform"],
                             o["stack"], o["dtype"], o["stack_layout"])
    transform_threads = 1
    if o["transform_threads"] is not None:
        if dev_type != "cpu":
            raise LoaderError(f"transform_threads={o['transform_threads']!r} is for a CPU device; "
                              f"on {device!r} the transform is queued on the loader's own stream")
        transform_threads = _int("transform_threads", o["transform_threads"], 1)
    elif dev_type == "cpu":
        transform_threads = default_transform_threads()
    return LoaderOptions(
        pipeline=pipeline, batch_points=o["batch_points"], batch_scans=o["batch_scans"],
        batch_chunks=o["batch_chunks"], max_batch_points=mbp, shuffle_window=window,
        fields=fields, output=o["output"],
        device=device, seed=seed, prefetch=prefetch, num_threads=num_threads,
        rank=int(rank), world_size=int(world_size), transform_threads=transform_threads,
        **flags,
    )
