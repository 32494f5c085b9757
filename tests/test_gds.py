"""The GPU-direct backend.

Three layers:

* on any machine: the unavailable paths (reason text, ``auto`` falling back, lazy imports);
* on any machine: the GDSLoader's own logic (aligned over-reads, slicing, compaction, shuffle,
  errors, shutdown) driven through a simulated KvikIO/CuPy built on numpy and ``os.preadv`` —
  it checks our code, not KvikIO, and must give the fallback's batches bit for bit;
* marked ``gpu``: the real thing on a CUDA device with cupy and kvikio (``pytest -m gpu``).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import gds_stream
from gds_stream import capability
from gds_stream.errors import BackendUnavailable, LoaderError
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset
from gds_stream.loader import open_loader


# -- a small dataset with several dtypes and scans --------------------------------------------
def _write(path, scan_sizes, seed=0):
    rng = np.random.default_rng(seed)
    specs = [FieldSpec("x", np.dtype("<f4")), FieldSpec("y", np.dtype("<f8")),
             FieldSpec("label", np.dtype("<u2")), FieldSpec("inst", np.dtype("<i4")),
             FieldSpec("rgb", np.dtype("u1"), 3)]
    start = 0
    with DatasetWriter(path, specs) as w:
        for n in scan_sizes:
            w.append({"x": rng.standard_normal(n).astype(np.float32),
                      "y": rng.standard_normal(n),
                      "label": rng.integers(0, 65535, n).astype(np.uint16),
                      "inst": np.arange(start, start + n, dtype=np.int32),
                      "rgb": rng.integers(0, 255, (n, 3)).astype(np.uint8)})
            w.end_scan(f"scan{len(w.sources)}")
            start += n
    return open_dataset(path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("gds") / "ds", [3000, 0, 70_001, 517, 40_000, 1])


# -- unavailable paths (any machine) ----------------------------------------------------------
def test_import_does_not_import_cupy_or_kvikio_or_torch():
    code = ("import sys, gds_stream, gds_stream.format, gds_stream.cli; "
            "bad=[m for m in ('cupy','kvikio','torch') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"imported eagerly: {r.stdout.strip()}"


def test_probe_reason_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    capability.probe_gds.cache_clear()
    try:
        cap = capability.probe_gds()
    finally:
        capability.probe_gds.cache_clear()
    assert cap.mode == "unavailable"
    assert "no CUDA device" in cap.reason


def test_probe_reason_names_the_gpu_extra_when_kvikio_is_missing(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    fake_cupy = types.SimpleNamespace(
        __version__="0-test",
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "kvikio", None)  # import kvikio -> ImportError
    capability.probe_gds.cache_clear()
    try:
        cap = capability.probe_gds()
    finally:
        capability.probe_gds.cache_clear()
    assert cap.mode == "unavailable"
    assert "kvikio is not installed" in cap.reason
    assert "pip install 'gds-stream[gpu]'" in cap.reason
    # the hint must name an extra that exists and holds kvikio
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(d.startswith("kvikio") for d in extras["gpu"])
    assert any(d.startswith("cupy") for d in extras["gpu"])


@pytest.mark.skipif(capability.probe_gds().available, reason="GPU-direct is available here")
def test_backend_gds_raises_with_reason(ds):
    with pytest.raises(BackendUnavailable) as ei:
        open_loader(ds, backend="gds", batch_points=1000)
    assert capability.probe_gds().reason in str(ei.value)
    assert "GPU-direct backend unavailable" in str(ei.value)


@pytest.mark.skipif(capability.probe_gds().available, reason="GPU-direct is available here")
def test_auto_falls_back_with_one_log_line(ds, caplog):
    caplog.set_level("INFO", logger="gds_stream.loader")
    with open_loader(ds, backend="auto", batch_points=1000, task_size=1 << 20) as loader:
        assert loader.backend == "fallback"
    lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "fallback" in lines[0] and capability.probe_gds().reason in lines[0]


# -- the GDSLoader's logic through a simulated KvikIO/CuPy (any machine) -----------------------
class _FakeFuture:
    def __init__(self, fn):
        self._exc, self._val = None, None
        try:
            self._val = fn()
        except BaseException as exc:  # noqa: BLE001 - replayed by get()
            self._exc = exc

    def done(self):
        return True

    def get(self):
        if self._exc is not None:
            raise RuntimeError(f"simulated KvikIO: {self._exc}")
        return self._val


class _FakeCuFile:
    fail_after: int | None = None
    calls = 0

    def __init__(self, path, flags="r"):
        self.fd = os.open(path, os.O_RDONLY)

    def pread(self, buf, size, file_offset, task_size=None):
        assert file_offset % 4096 == 0 and size % 4096 == 0, "reads must be 4 KiB-aligned"
        assert buf.nbytes == size

        def run():
            _FakeCuFile.calls += 1
            if _FakeCuFile.fail_after is not None and _FakeCuFile.calls > _FakeCuFile.fail_after:
                raise OSError(5, "Input/output error (injected)")
            return os.preadv(self.fd, [memoryview(buf)], file_offset)

        return _FakeFuture(run)

    def close(self):
        os.close(self.fd)


class _Ctx:
    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeEvent(_Ctx):
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def simulated_gpu(monkeypatch):
    """cupy ≈ numpy, kvikio.CuFile ≈ preadv, torch's CUDA stream queries stubbed."""
    import torch

    fake_cupy = types.ModuleType("cupy")
    fake_cupy.__version__ = "simulated"
    fake_cupy.uint8 = np.uint8
    fake_cupy.empty, fake_cupy.asarray, fake_cupy.concatenate = np.empty, np.asarray, np.concatenate
    fake_cupy.cuda = types.SimpleNamespace(Device=_Ctx, ExternalStream=_Ctx, Event=_FakeEvent,
                                           Stream=types.SimpleNamespace(from_external=_Ctx))
    fake_kvikio = types.ModuleType("kvikio")
    fake_kvikio.__version__ = "simulated"
    fake_kvikio.CuFile = _FakeCuFile
    settings = {"num_threads": 1}
    fake_kvikio.defaults = types.SimpleNamespace(get=settings.get,
                                                 set=lambda k, v: settings.__setitem__(k, v))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", fake_kvikio.defaults)
    monkeypatch.setattr(capability, "probe_gds",
                        lambda: capability.GDSCapability("gds-compat", "simulated for tests"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0))
    _FakeCuFile.fail_after, _FakeCuFile.calls = None, 0
    yield settings
    _FakeCuFile.fail_after = None


CONFIGS = [
    dict(batch_points=9_999),
    dict(batch_points=9_999, shuffle=True, seed=3),
    dict(batch_points=300_000, shuffle=True, seed=1),
    dict(batch_points=4_096, shuffle=True, rank=1, world_size=3, fields=["label", "x"]),
    dict(batch_points=50_000, drop_last=True, rank=0, world_size=2, fields=["rgb"]),
    dict(batch_scans=2),
    dict(batch_scans=2, shuffle=True, seed=9, rank=1, world_size=2),
    dict(batch_scans=4, shuffle=True, fields=["inst", "y"]),
]


def _collect(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_simulated_gds_matches_fallback_bit_for_bit(ds, simulated_gpu, cfg):
    from gds_stream.gds import GDSLoader
    from fallback import FallbackLoader

    for epoch in (0, 1):
        g = GDSLoader(ds, device="cuda", num_threads=3, **cfg)
        f = FallbackLoader(ds, device="cpu", **cfg)
        g.set_epoch(epoch), f.set_epoch(epoch)
        assert g.backend == "gds-compat" and len(g) == len(f)
        gb, fb = _collect(g), _collect(f)
        assert len(gb) == len(fb) == len(g)
        for a, b in zip(gb, fb):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
                assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
        g.close(), f.close()
    assert simulated_gpu["num_threads"] == 3  # KvikIO's pool sized from num_threads


def _record_allocations(monkeypatch, module, pointer):
    """Wrap ``module.empty`` to remember every (start, end) address range it allocates."""
    ranges, real = [], module.empty

    def empty(*a, **k):
        arr = real(*a, **k)
        ranges.append((pointer(arr), pointer(arr) + arr.nbytes))
        return arr

    monkeypatch.setattr(module, "empty", empty)
    return ranges


def _assert_views_of_one_allocation(batch, ranges):
    """Every field lies inside the newest allocation that contains it (older ranges at the same
    addresses were freed), and all fields of the batch inside the same one."""
    homes = set()
    for name, t in batch.items():
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        home = next((i for i in range(len(ranges) - 1, -1, -1)
                     if ranges[i][0] <= lo < ranges[i][1]), None)
        assert home is not None and hi <= ranges[home][1], f"{name} is not a view of a read buffer"
        homes.add(home)
    assert len(homes) == 1, "fields of one batch come from one staging buffer"


def test_simulated_gds_single_range_fields_are_views_of_the_read_buffer(ds, simulated_gpu,
                                                                         monkeypatch):
    from gds_stream.gds import GDSLoader

    ranges = _record_allocations(monkeypatch, sys.modules["cupy"], lambda a: a.ctypes.data)
    with GDSLoader(ds, device="cuda", batch_points=10_000) as g:
        for b in g:
            _assert_views_of_one_allocation(b, ranges)


def test_simulated_gds_read_error_surfaces_and_threads_stop(ds, simulated_gpu):
    from gds_stream.gds import GDSLoader

    base = set(threading.enumerate())
    _FakeCuFile.fail_after = 7
    g = GDSLoader(ds, device="cuda", batch_points=5_000, prefetch=2)
    with pytest.raises(LoaderError) as ei:
        for _ in g:
            pass
    chain, e = [], ei.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any("Input/output error (injected)" in str(x) for x in chain)
    assert any(str(ds.path) in str(x) for x in chain)
    g.close()
    assert set(threading.enumerate()) <= base


def test_simulated_gds_break_joins_submit_thread(ds, simulated_gpu):
    from gds_stream.gds import GDSLoader

    base = set(threading.enumerate())
    g = GDSLoader(ds, device="cuda", batch_points=3_000)
    for i, _ in enumerate(g):
        assert any(t.name == "gds-stream-submit" for t in threading.enumerate())
        if i == 2:
            break
    gc.collect()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - base and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(threading.enumerate()) - base
    g.close()
    g.close()


def test_simulated_gds_device_must_be_cuda(ds, simulated_gpu):
    from gds_stream.gds import GDSLoader

    with pytest.raises(LoaderError, match="needs a CUDA device"):
        GDSLoader(ds, device="cpu", batch_points=100)


# -- the real thing (GPU) ----------------------------------------------------------------------
def _gpu_reason() -> str | None:
    cap = capability.probe_gds()
    return None if cap.available else cap.reason


def _pool():
    import cupy

    return cupy.get_default_memory_pool()


@pytest.mark.parametrize("cfg", CONFIGS + [
    dict(batch_points=1_000_003, shuffle=True, seed=5),
    dict(batch_points=777, rank=3, world_size=4, fields=["y", "rgb"]),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_bit_identical_to_fallback(ds, cfg):
    import torch

    for epoch in (0, 2):
        with open_loader(ds, backend="gds", device="cuda", **cfg) as g, \
                open_loader(ds, backend="fallback", device="cuda", **cfg) as f:
            g.set_epoch(epoch), f.set_epoch(epoch)
            gb, fb = list(g), list(f)  # keeps every batch: ownership under test too
            torch.cuda.synchronize()
            assert len(gb) == len(fb) == len(g)
            for a, b in zip(gb, fb):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k].is_cuda and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                    assert a[k].cpu().numpy().tobytes() == b[k].cpu().numpy().tobytes(), k
            # ownership: all kept batches still equal the dataset after the epoch
            plan = g.epoch_plan(epoch)
            for i, a in enumerate(gb):
                idx = plan.batch(i).point_indices()
                for k in a:
                    if k != "offset":
                        assert np.array_equal(a[k].cpu().numpy(), ds.read(k)[idx]), k


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_zero_copy_and_mode(ds, monkeypatch):
    import cupy

    ranges = _record_allocations(monkeypatch, cupy, lambda a: a.data.ptr)
    with open_loader(ds, backend="gds", device="cuda", batch_points=20_000) as g:
        assert g.backend in ("gds", "gds-compat")
        assert g.backend == capability.probe_gds().mode
        for b in g:
            _assert_views_of_one_allocation(b, ranges)  # DLPack views of KvikIO's buffer


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_early_stop_leaves_no_threads(ds):
    base = set(threading.enumerate())
    g = open_loader(ds, backend="gds", device="cuda", batch_points=2_000, prefetch=3)
    for i, _ in enumerate(g):
        if i == 3:
            break
    gc.collect()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - base and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(threading.enumerate()) - base
    it = iter(g)
    next(it)
    g.close()
    g.close()
    assert not set(threading.enumerate()) - base


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_error_mid_epoch_surfaces(tmp_path):
    d = _write(tmp_path / "t", [200_000])
    g = open_loader(d, backend="gds", device="cuda", batch_points=10_000, prefetch=2)
    it = iter(g)
    next(it)
    os.truncate(d.field_path("x"), 4096)  # the file shrinks under the open loader
    t0 = time.monotonic()
    with pytest.raises(LoaderError) as ei:
        for _ in it:
            pass
    assert time.monotonic() - t0 < 5
    text = str(ei.value) + str(ei.value.__cause__)
    assert "x.bin" in text
    g.close()


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_device_memory_bounded_by_prefetch(tmp_path):
    import torch

    d = _write(tmp_path / "m", [2_000_000])
    batch, prefetch = 100_000, 3
    per_batch = sum(s.point_bytes for s in d.schema.values()) * batch
    pool = _pool()
    pool.free_all_blocks()
    base = pool.used_bytes()
    peak = 0
    with open_loader(d, backend="gds", device="cuda", batch_points=batch, prefetch=prefetch) as g:
        for b in g:
            torch.cuda.synchronize()
            peak = max(peak, pool.used_bytes() - base)
            time.sleep(0.005)
            del b
    # prefetch batches in flight + the one the loop holds, each with ≤ 8 KiB of alignment slack
    # per field, + a constant for the shuffle/offset scratch
    assert peak <= (prefetch + 1) * (per_batch + 2 * 4096 * len(d.schema)) + (1 << 20), peak
