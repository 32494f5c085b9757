"""Test helpers: build small datasets with :class:`DatasetWriter` directly, and compute the batch
a loader must yield from the plan and :meth:`Dataset.read` (the reference read).

Not a conftest: import it explicitly (``from helpers import make_dataset``); pytest puts
``tests/`` on ``sys.path`` (rootdir-relative imports of test modules).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gds_stream.format import Dataset, DatasetWriter, FieldSpec, open_dataset

#: The default schema: every stored kind the format allows that loaders must move bit for bit.
#: ``pid`` is the point's index in the dataset, so a value identifies its point.
DEFAULT_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("pid", np.dtype("<i8")),
    FieldSpec("x", np.dtype("<f4")),
    FieldSpec("y", np.dtype("<f8")),
    FieldSpec("label", np.dtype("<u2")),
    FieldSpec("inst", np.dtype("<i4")),
    FieldSpec("rgb", np.dtype("u1"), 3),
)

#: Rows generated and appended at a time, so big datasets are written with bounded memory.
_CHUNK = 1 << 20


def _column(spec: FieldSpec, start: int, n: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n,) if spec.components == 1 else (n, spec.components)
    if spec.name == "pid":
        ids = np.arange(start, start + n, dtype=np.int64)
        return ids.astype(spec.dtype) if spec.components == 1 else \
            np.repeat(ids[:, None], spec.components, axis=1).astype(spec.dtype)
    dt = spec.dtype
    if dt.kind == "f":
        # Random values whose bit patterns differ point to point (a misplaced row shows).
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def make_dataset(tmp_path: str | Path, scan_sizes: Sequence[int],
                 fields: Iterable[FieldSpec] = DEFAULT_FIELDS, name: str = "ds",
                 seed: int = 0, block_bytes: int | None = None) -> Dataset:
    """Write a dataset of ``len(scan_sizes)`` scans (sizes may be 0) under ``tmp_path/name``
    and open it. Values are random per field (deterministic in ``seed``); a field named
    ``pid`` holds each point's dataset index."""
    specs = list(fields)
    out = Path(tmp_path) / name
    rng = np.random.default_rng(seed)
    kw = {} if block_bytes is None else {"block_bytes": block_bytes}
    start = 0
    with DatasetWriter(out, specs, **kw) as w:
        for i, size in enumerate(scan_sizes):
            done = 0
            while done < size:
                n = min(_CHUNK, size - done)
                w.append({s.name: _column(s, start + done, n, rng) for s in specs})
                done += n
            w.end_scan(f"scan{i}.bin")
            start += size
    ds = open_dataset(out)
    assert ds.num_points == sum(scan_sizes) and ds.num_scans == len(scan_sizes)
    return ds


class Reference:
    """Whole-field arrays of a dataset read once with ``Dataset.read``, to index by a plan."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self._full: dict[str, np.ndarray] = {}

    def field(self, name: str) -> np.ndarray:
        if name not in self._full:
            self._full[name] = self.ds.read(name)
        return self._full[name]

    def batch(self, fields: Sequence[str], batch_plan) -> dict[str, np.ndarray]:
        """What a loader must yield for ``batch_plan``: the planned points, in planned order."""
        idx = batch_plan.point_indices()
        out = {f: self.field(f)[idx] for f in fields}
        offs = batch_plan.offsets()
        if offs is not None:
            out["offset"] = offs
        return out


def assert_batch_equal(got: dict, want: dict[str, np.ndarray], schema: dict[str, FieldSpec],
                       where: str = "") -> None:
    """``got`` (tensors) equals ``want`` (arrays) bit for bit, with the schema's dtypes/shapes."""
    import torch

    assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
    for k, w in want.items():
        t = got[k]
        assert isinstance(t, torch.Tensor), f"{where}: {k} is {type(t).__name__}"
        assert t.device.type == "cpu", f"{where}: {k} on {t.device}"
        a = t.numpy()
        if k == "offset":
            assert a.dtype == np.int64, f"{where}: offset dtype {a.dtype}"
            assert a.shape == w.shape, f"{where}: offset shape {a.shape} != {w.shape}"
        else:
            spec = schema[k]
            assert a.dtype == spec.dtype, f"{where}: {k} dtype {a.dtype} != {spec.dtype}"
            shape = (len(w),) if spec.components == 1 else (len(w), spec.components)
            assert a.shape == shape, f"{where}: {k} shape {a.shape} != {shape}"
        # Compare bytes, so NaN payloads and -0.0 count too.
        assert np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                              np.ascontiguousarray(w).view(np.uint8)), f"{where}: {k} differs"


def batch_bytes_equal(a: dict, b: dict) -> bool:
    """Two yielded batches hold the same keys and the same bytes."""
    import torch

    if set(a) != set(b):
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
               and torch.equal(a[k].contiguous().view(-1).view(torch.uint8),
                               b[k].contiguous().view(-1).view(torch.uint8))
               for k in a)


def kept_epoch(loader, epoch: int = 0) -> list[dict]:
    """Every batch of ``epoch``, cloned (kept past the loader's next batch)."""
    loader.set_epoch(epoch)
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Two lists of batches: the same keys, dtypes and values, batch by batch."""
    import torch

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def state_after(loader, epoch: int, batches: int) -> dict:
    """``loader.state_dict()`` after taking ``batches`` batches of ``epoch``."""
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    it.close()
    return state


def error_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (each once)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def wait_threads(baseline: set[threading.Thread], timeout: float = 5.0) -> list[threading.Thread]:
    """Poll until every live thread was alive at ``baseline``; return the extra ones left."""
    deadline = time.monotonic() + timeout
    while True:
        extra = [t for t in threading.enumerate() if t not in baseline and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.01)


def run_with_timeout(fn, timeout: float = 30.0):
    """Run ``fn()`` in a thread; fail (instead of hanging the suite) if it does not return in
    ``timeout`` seconds. Returns ``fn``'s result or re-raises its exception."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name="test-run-with-timeout", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"hung: did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def cuda_reason() -> str | None:
    """None where a CUDA device really works (an allocation succeeds), else why not: the guard
    of every GPU test (a missing device, not a missing package)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no working CUDA device"
        torch.zeros(1, device="cuda")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable device
        return f"no working CUDA device ({exc})"
    return None


def fds_under(root) -> int:
    """Descriptors this process holds on files under ``root`` (a dataset's directory and files,
    removed ones included): other descriptors — sockets an HTTP client closes when idle, pipes of
    other tests' threads — come and go on their own and are not counted."""
    import os

    n, inside = 0, str(root)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor among them)
            continue
        n += target == inside or target.startswith(inside + os.sep)
    return n
