"""The GPU-direct backend.

Three layers:

* on any machine: the unavailable paths (reason text, ``auto`` falling back, lazy imports);
* on any machine: the GDSLoader's own logic (aligned over-reads into a 4 KiB-aligned slab, both
  read routes, stream ordering, slicing, compaction, shuffle, errors, shutdown) driven through a
  simulated KvikIO and CUDA (streams whose work runs only when an event recorded on them is
  waited for) built on ``os.preadv`` and CPU tensors — it checks our code, not KvikIO, and must
  give the fallback's batches bit for bit;
* marked ``gpu``: the real thing on a CUDA device with kvikio (``pytest -m gpu``); the overlap
  of reads with queued GPU work is in ``test_gpu_overlap.py``.
"""

from __future__ import annotations

import ctypes
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
from gds_stream import open_loader
from helpers import cuda_reason
from simcuda import SimOps


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
    code = ("import sys, gds_stream, gds_stream.format, gds_stream.cli, gds_stream.gds, "
            "gds_stream.cudaops, gds_stream.envcheck, gds_stream.capability, fallback; "
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
    monkeypatch.setitem(sys.modules, "cupy", None)  # not needed: staging is torch memory
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
    assert any(d.startswith("kvikio-cu13") for d in extras["gpu"])
    assert any(d.startswith("cupy-cuda13x") for d in extras["gpu"])


@pytest.mark.skipif(capability.probe_gds().available, reason="GPU-direct is available here")
def test_backend_gds_raises_with_reason(ds):
    with pytest.raises(BackendUnavailable) as ei:
        open_loader(ds, backend="gds", batch_points=1000)
    assert capability.probe_gds().reason in str(ei.value)
    assert "GPU-direct backend unavailable" in str(ei.value)


@pytest.mark.skipif(capability.probe_gds().available, reason="GPU-direct is available here")
def test_auto_falls_back_with_one_log_line(ds, caplog):
    caplog.set_level("INFO", logger="gds_stream")
    with open_loader(ds, backend="auto", batch_points=1000, task_size=1 << 20) as loader:
        assert loader.backend == "fallback"
    lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "fallback" in lines[0] and capability.probe_gds().reason in lines[0]




# -- capability: per-file routes and the env rows (any machine) --------------------------------
class _Handle:
    def __init__(self, direct=True):
        self.direct = direct

    def is_direct_io_supported(self):
        return self.direct


GDS = capability.GDSCapability("gds", "")
COMPAT = capability.GDSCapability("gds-compat", "the nvidia-fs kernel module is not loaded")


def test_file_route_per_file(monkeypatch, tmp_path):
    path = str(tmp_path / "x.bin")
    monkeypatch.setattr(capability, "filesystem_type", lambda p: "ext4")
    monkeypatch.setattr(capability, "cufile_config_path", lambda: "/etc/cufile.json")
    assert capability.file_route(GDS, _Handle(), path) == ("gds", "")
    route, why = capability.file_route(COMPAT, _Handle(), path)
    assert route == "host" and "nvidia-fs" in why
    route, why = capability.file_route(GDS, _Handle(direct=False), path)
    assert route == "host" and path in why and "O_DIRECT" in why
    for fs in ("tmpfs", "overlay", "fuse.sshfs"):
        monkeypatch.setattr(capability, "filesystem_type", lambda p, fs=fs: fs)
        route, why = capability.file_route(GDS, _Handle(), path)
        assert route == "host" and fs in why and path in why
    monkeypatch.setattr(capability, "filesystem_type", lambda p: "xfs")
    monkeypatch.setattr(capability, "cufile_config_path", lambda: "")
    route, why = capability.file_route(GDS, _Handle(), path)
    assert route == "host" and "cufile.json" in why


def test_filesystem_type_and_cufile_config(monkeypatch, tmp_path):
    assert capability.filesystem_type(str(tmp_path)) not in (None, "")
    cfg = tmp_path / "cufile.json"
    cfg.write_text("{}")
    monkeypatch.setenv("CUFILE_ENV_PATH_JSON", str(cfg))
    assert capability.cufile_config_path() == str(cfg)


def test_env_rows_say_what_auto_picks(monkeypatch):
    for cap, want in ((GDS, "gds ("), (COMPAT, "fallback ("),
                      (capability.GDSCapability("unavailable", "no kvikio"), "fallback (")):
        monkeypatch.setattr(capability, "probe_gds", lambda cap=cap: cap)
        rows = dict(capability.environment_report())
        assert rows["backend auto"].startswith(want)
        if cap.reason:
            assert cap.reason in rows["backend auto"] and cap.reason in rows["GPUDirect"]


def test_env_reports_cufiles_allow_compat_mode(monkeypatch):
    """Item 1: ``gds-stream env`` shows cuFile's own allow_compat_mode where KvikIO runs."""
    fake = types.ModuleType("kvikio")
    fake.__version__ = "simulated"
    driver = types.ModuleType("kvikio.cufile_driver")
    driver.get = lambda key: {"allow_compat_mode": False}[key]
    fake.cufile_driver = driver
    monkeypatch.setitem(sys.modules, "kvikio", fake)
    monkeypatch.setitem(sys.modules, "kvikio.cufile_driver", driver)
    monkeypatch.setattr(capability, "probe_gds", lambda: GDS)
    assert dict(capability.environment_report())["cuFile allow_compat_mode"] == "no"
    driver.get = lambda key: True
    assert dict(capability.environment_report())["cuFile allow_compat_mode"] == "yes"
    monkeypatch.setattr(capability, "probe_gds",
                        lambda: capability.GDSCapability("unavailable", "no kvikio"))
    assert "cuFile allow_compat_mode" not in dict(capability.environment_report())


# -- the GDSLoader's logic through a simulated KvikIO and CUDA (any machine) ------------------
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
    fail_submit_at: int | None = None  # the n-th pread raises when submitted
    short_by = 0
    direct = True
    calls = 0
    submits = 0
    ops = None  # the SimOps of the loader being built
    no_gds: set = set()  # field names whose files cannot open with compat mode OFF
    compat_mode = "AUTO"
    targets: set = set()  # type names of the buffers raw_read_async wrote into

    def __init__(self, path, flags="r"):
        # the loader opens the dataset's pinned descriptor as /proc/self/fd/N: name its file
        name = os.path.basename(os.path.realpath(path)).split(".")[0]
        if _FakeCuFile.compat_mode == "OFF" and name in _FakeCuFile.no_gds:
            raise RuntimeError("cuFile handle registration failed (simulated)")
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def _read(self, view, size, file_offset):
        _FakeCuFile.calls += 1
        if _FakeCuFile.fail_after is not None and _FakeCuFile.calls > _FakeCuFile.fail_after:
            raise OSError(5, "Input/output error (injected)")
        return os.preadv(self.fd, [view], file_offset) - _FakeCuFile.short_by

    def pread(self, buf, size, file_offset, task_size=None):
        """Asynchronous like KvikIO's: the read runs on a thread, into the buffer's address
        (no reference to the buffer object is kept, as C code keeps none)."""
        assert isinstance(buf, np.ndarray), "pread gets host memory only"
        assert file_offset % 4096 == 0 and size % 4096 == 0, "reads must be 4 KiB-aligned"
        assert size > 0, "a zero-length read passes a null pointer"
        assert buf.ctypes.data % 4096 == 0, "host buffers start 4 KiB-aligned"
        assert buf.nbytes == size and task_size == 4 << 20
        _FakeCuFile.submits += 1
        if _FakeCuFile.fail_submit_at is not None and \
                _FakeCuFile.submits >= _FakeCuFile.fail_submit_at:
            raise RuntimeError("simulated KvikIO: submit failed")
        addr, ops = buf.ctypes.data, _FakeCuFile.ops
        del buf
        with ops.lock:
            ops.host_writes[addr] = ops.host_writes.get(addr, 0) + 1
        out: dict = {}

        def run():
            time.sleep(0.05)  # still running when a later submit fails
            try:
                view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
                out["n"] = self._read(view, size, file_offset)
            except BaseException as exc:  # noqa: BLE001 - replayed by get()
                out["exc"] = exc
            finally:
                with ops.lock:
                    ops.host_writes[addr] -= 1

        t = threading.Thread(target=run)
        t.start()

        class _Future:
            def get(self):
                t.join()
                if "exc" in out:
                    raise RuntimeError(f"simulated KvikIO: {out['exc']}")
                return out["n"]

        return _Future()

    def raw_read_async(self, buf, raw_stream, size, file_offset, dev_offset):
        ops = _FakeCuFile.ops
        ops.check_bound("cuFileReadAsync")
        _FakeCuFile.targets.add(type(buf).__name__)
        assert size > 0, "a zero-length read passes a null pointer"
        assert file_offset % 4096 == 0 and size % 4096 == 0, "reads must be 4 KiB-aligned"
        assert buf.data_ptr() % 4096 == 0, "device staging starts 4 KiB-aligned"
        assert buf.numel() == size and dev_offset == 0
        stream = ops.registry[raw_stream]
        assert stream in ops.streams, "stream-ordered reads run on the loader's own streams"
        out: dict = {}

        def run():
            try:
                out["n"] = self._read(memoryview(buf.numpy()), size, file_offset)
            except OSError as exc:
                out["exc"] = exc

        stream.put(run)
        mark = len(stream.queue)

        class _StreamFuture:
            def check_bytes_done(self):
                stream.run(mark)  # KvikIO synchronises the stream here
                if "exc" in out:
                    raise RuntimeError(f"simulated cuFile: {out['exc']}")
                return out["n"]

        return _StreamFuture()

    def is_direct_io_supported(self):
        return _FakeCuFile.direct

    def close(self):
        os.close(self.fd)


@pytest.fixture
def simulated_gpu(monkeypatch):
    """kvikio.CuFile ≈ preadv, CUDA streams/events/allocations ≈ ``simcuda.SimOps``; the route
    of each field file is ``routes[field name]`` (default: every file ``gds``)."""
    import torch

    from gds_stream import gds

    fake_kvikio = types.ModuleType("kvikio")
    fake_kvikio.__version__ = "simulated"
    fake_kvikio.CuFile = _FakeCuFile
    fake_kvikio.CompatMode = types.SimpleNamespace(OFF="OFF", ON="ON", AUTO="AUTO")
    settings = {"num_threads": 1}
    registered: list = []

    def get(key):
        return _FakeCuFile.compat_mode if key == "compat_mode" else settings.get(key)

    def set_(key, value):
        if key == "compat_mode":
            _FakeCuFile.compat_mode = value
        else:
            settings[key] = value

    fake_kvikio.defaults = types.SimpleNamespace(get=get, set=set_)
    fake_kvikio.stream_register = lambda raw, flags: registered.append((raw, flags))
    fake_kvikio.stream_deregister = lambda raw: registered.remove(
        next(r for r in registered if r[0] == raw))
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", fake_kvikio.defaults)
    monkeypatch.setattr(capability, "probe_gds", lambda: GDS)
    routes: dict[str, str] = {}

    def file_route(cap, f, path):
        route = routes.get(os.path.basename(path).split(".")[0], "gds")
        return (route, "" if route == "gds" else f"{path}: simulated compat")

    monkeypatch.setattr(capability, "file_route", file_route)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sims: list[SimOps] = []
    opts = {"deferred_consumer": False}

    def make_ops(torch_, device):
        sims.append(SimOps(torch_, device, **opts))
        _FakeCuFile.ops = sims[-1]
        return sims[-1]

    monkeypatch.setattr(gds, "CudaOps", make_ops)
    _FakeCuFile.fail_after, _FakeCuFile.calls, _FakeCuFile.short_by = None, 0, 0
    _FakeCuFile.fail_submit_at, _FakeCuFile.submits, _FakeCuFile.no_gds = None, 0, set()
    _FakeCuFile.compat_mode = "AUTO"
    _FakeCuFile.targets = set()
    yield types.SimpleNamespace(settings=settings, routes=routes, ops=sims, opts=opts,
                                registered=registered)
    _FakeCuFile.fail_after, _FakeCuFile.short_by, _FakeCuFile.fail_submit_at = None, 0, None
    _FakeCuFile.no_gds = set()


CONFIGS = [
    dict(batch_points=9_999),
    dict(batch_points=9_999, shuffle=True, seed=3),
    dict(batch_points=300_000, shuffle=True, seed=1),
    dict(batch_points=4_096, shuffle=True, rank=1, world_size=3, fields=["label", "x"]),
    dict(batch_points=50_000, drop_last=True, rank=0, world_size=2, fields=["rgb"]),
    dict(batch_scans=2),
    dict(batch_scans=2, shuffle=True, seed=9, rank=1, world_size=2),
    dict(batch_scans=4, shuffle=True, fields=["inst", "y"]),
    dict(batch_points=9_999, shuffle=True, seed=2, shuffle_window=0),
    dict(batch_points=7_000, shuffle=True, seed=4, shuffle_window=30_000, rank=1, world_size=2),
    dict(batch_points=5_000, shuffle=True, seed=6, shuffle_window=1, drop_last=True),
]
ROUTES = {"gds": {}, "host": {f: "host" for f in ("x", "y", "label", "inst", "rgb")},
          "mixed": {"y": "host", "rgb": "host"}}


def _cfg_id(c):
    return ",".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_simulated_gds_matches_fallback_bit_for_bit(ds, simulated_gpu, cfg, route):
    _match_fallback(ds, simulated_gpu, cfg, route)


CHUNK_CONFIGS = [
    dict(batch_chunks=3),
    dict(batch_chunks=2, shuffle=True, seed=5, rank=1, world_size=2, fields=["x", "rgb"]),
    dict(batch_chunks=50, max_batch_points=40_000, shuffle=True, seed=1),
    dict(batch_chunks=4, drop_last=True, world_size=3, rank=2),
]


@pytest.fixture(scope="module")
def chunked_ds(tmp_path_factory):
    """Fields like ``ds``'s (and z) in spatial chunks: x, y uniform in [0, 1), cells of 1/6, so
    a 6 × 6 grid of chunks per non-empty scan."""
    import importlib

    chunks = importlib.import_module("gds_stream.convert.chunks")
    root = tmp_path_factory.mktemp("gds-chunks")
    rng = np.random.default_rng(7)
    specs = [FieldSpec("x", np.dtype("<f4")), FieldSpec("y", np.dtype("<f8")),
             FieldSpec("z", np.dtype("<f4")), FieldSpec("label", np.dtype("<u2")),
             FieldSpec("inst", np.dtype("<i4")), FieldSpec("rgb", np.dtype("u1"), 3)]
    start = 0
    with DatasetWriter(root / "ds", specs, chunk_size=1 / 6) as w:
        for s, n in enumerate([50_000, 0, 70_000]):
            cols = {"x": rng.random(n).astype(np.float32), "y": rng.random(n),
                    "z": rng.standard_normal(n).astype(np.float32),
                    "label": rng.integers(0, 65535, n).astype(np.uint16),
                    "inst": np.arange(start, start + n, dtype=np.int32),
                    "rgb": rng.integers(0, 255, (n, 3)).astype(np.uint8)}
            with chunks.ScanChunker(specs, 1 / 6, 2, root, f"s{s}") as ch:
                ch.append(cols)
                ch.write_to(w)
            w.end_scan(f"s{s}")
            start += n
    d = open_dataset(root / "ds")
    assert d.num_chunks == 72
    return d


@pytest.mark.parametrize("route", ["gds", "mixed"])
@pytest.mark.parametrize("cfg", CHUNK_CONFIGS, ids=_cfg_id)
def test_simulated_gds_chunk_batches_match_fallback(chunked_ds, simulated_gpu, cfg, route):
    _match_fallback(chunked_ds, simulated_gpu, cfg, route)


def _match_fallback(ds, simulated_gpu, cfg, route):
    from gds_stream.gds import GDSLoader
    from fallback import FallbackLoader

    simulated_gpu.routes.update(ROUTES[route])
    for epoch in (0, 1):
        g = GDSLoader(ds, device="cuda", num_threads=3, **cfg)
        f = FallbackLoader(ds, device="cpu", **cfg)
        g.set_epoch(epoch), f.set_epoch(epoch)
        fields = cfg.get("fields", list(ds.schema))
        want_backend = "gds" if all(ROUTES[route].get(k, "gds") == "gds" for k in fields) \
            else "gds-compat"
        assert g.backend == want_backend and len(g) == len(f)
        assert (g.backend_reason == "") == (want_backend == "gds")
        g.backend_reason = "chosen by open_loader"  # what open_loader sets is kept in front
        assert g.backend_reason.startswith("chosen by open_loader")
        assert ("simulated compat" in g.backend_reason) == (want_backend == "gds-compat")
        n = 0
        for a, b in zip(g, f):  # batches dropped as they go
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
                assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
            n += 1
        assert n == len(g)
        g.close(), f.close()
    assert simulated_gpu.settings["num_threads"] == 3  # KvikIO's pool sized from num_threads


def test_simulated_gds_stream_discipline(ds, simulated_gpu):
    """Staging is allocated on the loader's stream, never the consumer's; the consumer's stream
    waits on each batch's event; the staging and permutation are record_stream-ed on it."""
    from gds_stream.gds import GDSLoader

    simulated_gpu.routes.update({"y": "host"})
    with GDSLoader(ds, device="cuda", batch_points=20_000, shuffle=True, shuffle_window=0) as g:
        batches = 0
        for _ in g:
            batches += 1
        ops = simulated_gpu.ops[-1]
    assert batches == len(g)
    assert ops.streams and all(s is not ops.consumer for _, _, s in ops.device_allocs[:2])
    staged = [a for a in ops.device_allocs if a[2] is not ops.consumer]
    assert len(staged) == 2 * batches  # one slab + one permutation per batch
    assert len(ops.consumer.waited) == batches
    assert len([r for r in ops.recorded if r[1] is ops.consumer]) == 2 * batches


def _record_allocations(monkeypatch, ops_list):
    """Make every simulated device allocation remember its (start, end) address range."""
    return lambda: [(a, b) for a, b, _ in ops_list[-1].device_allocs]


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


def test_simulated_gds_single_range_fields_are_views_of_the_read_buffer(ds, simulated_gpu):
    """KvikIO reads into a CuPy array over the torch allocation; the batch's fields are views
    of that same memory."""
    from gds_stream.gds import GDSLoader

    with GDSLoader(ds, device="cuda", batch_points=10_000) as g:
        for b in g:
            _assert_views_of_one_allocation(b, _record_allocations(None, simulated_gpu.ops)())
    assert _FakeCuFile.targets == {"SimCupyArray"}


@pytest.mark.parametrize("route", ["gds", "host"])
def test_simulated_gds_read_error_surfaces_and_threads_stop(ds, simulated_gpu, route):
    from gds_stream.gds import GDSLoader

    simulated_gpu.routes.update(ROUTES[route])
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


@pytest.mark.parametrize("route", ["gds", "host"])
def test_simulated_gds_short_read_is_a_dataset_error(ds, simulated_gpu, route):
    from gds_stream.gds import GDSLoader

    simulated_gpu.routes.update(ROUTES[route])
    _FakeCuFile.short_by = 1
    with GDSLoader(ds, device="cuda", batch_points=5_000) as g:
        with pytest.raises(LoaderError) as ei:
            next(iter(g))
    text = str(ei.value) + str(ei.value.__cause__)
    assert "short read" in text and ".bin" in text


def test_simulated_gds_verifier_failure_surfaces(ds, simulated_gpu):
    from gds_stream.gds import GDSLoader

    class Verifier:
        calls = 0

        def check(self, segments):
            Verifier.calls += 1
            assert len(segments)
            if Verifier.calls == 3:
                raise gds_stream.DatasetError(f"{ds.path}/x.bin: block 0: crc mismatch")

    g = GDSLoader(ds, device="cuda", batch_points=5_000, prefetch=2)
    g.verifier = Verifier()
    got = 0
    with pytest.raises(LoaderError, match="crc mismatch"):
        for _ in g:
            got += 1
    # batch 2's check failed: raised at the next() after the submit thread got to it, never
    # after batch 2 was yielded
    assert got in (1, 2)
    g.close()


@pytest.mark.parametrize("route", ["gds", "host"])
def test_simulated_gds_verify_reads_finds_a_changed_file(tmp_path, simulated_gpu, route):
    from gds_stream.gds import GDSLoader

    simulated_gpu.routes.update(ROUTES[route])
    d = _write(tmp_path / "v", [30_000])
    path = d.field_path("label")
    st = os.stat(path)
    with open(path, "r+b") as f:  # flip one byte of the 20 000th label
        f.seek(d.layout("label").offset + 2 * 20_000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as bit rot: the mtime stays
    with GDSLoader(d, device="cuda", batch_points=10_000, verify_reads=True) as g:
        with pytest.raises(LoaderError) as ei:
            for _ in g:
                pass
    text = str(ei.value) + str(ei.value.__cause__)
    assert "crc32" in text and "label" in text


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


def test_simulated_gds_options(ds, simulated_gpu):
    from gds_stream.gds import DEFAULT_TASK_SIZE, GDSLoader

    assert DEFAULT_TASK_SIZE == 4 << 20  # KvikIO's own default, pending a GPU sweep
    with pytest.raises(LoaderError, match="needs a CUDA device"):
        GDSLoader(ds, device="cpu", batch_points=100)
    for bad in (0, 4095, 6000, True, "4M"):
        with pytest.raises(LoaderError, match="task_size"):
            GDSLoader(ds, device="cuda", batch_points=100, task_size=bad)


# -- issue 17 regressions on the simulated CUDA ------------------------------------------------
def test_simulated_gds_file_that_cannot_do_gds_takes_the_host_route(ds, simulated_gpu):
    """Defect 1: opened with compat mode OFF, a file cuFile cannot register raises at open and
    is read on the host route, with the reason; KvikIO's compat setting is restored."""
    from gds_stream.gds import GDSLoader

    _FakeCuFile.no_gds = {"y"}
    with GDSLoader(ds, device="cuda", batch_points=20_000, fields=["x", "y"]) as g:
        assert g.routes == ["gds", "host"] and g.backend == "gds-compat"
        assert "cuFile cannot open it for GPUDirect Storage" in g.route_reason
        assert "y.bin" in g.route_reason
        assert sum(1 for _ in g) == len(g)
    assert _FakeCuFile.compat_mode == "AUTO"


def test_open_loader_reason_never_claims_gds_for_compat_files(ds, simulated_gpu):
    """Item 9: backend_reason of a gds-compat loader does not say it reads through GDS."""
    simulated_gpu.routes.update({"y": "host"})
    with open_loader(ds, backend="gds", device="cuda", batch_points=20_000) as g:
        assert g.backend == "gds-compat"
        assert "every file reads through" not in g.backend_reason
        assert "compat" in g.backend_reason and "y.bin" in g.backend_reason
    simulated_gpu.routes.clear()
    with open_loader(ds, backend="gds", device="cuda", batch_points=20_000) as g:
        assert g.backend == "gds" and "every file reads through" in g.backend_reason
    simulated_gpu.routes.update({"rgb": "host"})
    with open_loader(ds, backend="auto", device="cuda", batch_points=20_000) as g:
        assert g.backend == "gds-compat"
        assert g.backend_reason.startswith("GPUDirect Storage is available; some files")
        assert "rgb.bin" in g.backend_reason


def test_simulated_gds_streams_are_the_loaders_own_bound_and_destroyed(ds, simulated_gpu):
    """Defects 2, 3, 7: the loader's streams are created once (not per epoch), reads run on
    several of them (prefetch batches in flight), every thread issuing cuFile calls bound the
    device first, the streams are registered with cuFile and destroyed at close."""
    from gds_stream.gds import GDSLoader

    g = GDSLoader(ds, device="cuda", batch_points=10_000, prefetch=3)
    ops = simulated_gpu.ops[-1]
    for epoch in (0, 1):
        g.set_epoch(epoch)
        assert sum(1 for _ in g) == len(g)
    assert len(ops.streams) == 3
    used = {a[2] for a in ops.device_allocs if a[2] is not ops.consumer}
    assert used == set(ops.streams)
    assert ops.violations == []
    assert sorted(r for r, _ in simulated_gpu.registered) == sorted(s.handle for s in ops.streams)
    assert all(f == 8 for _, f in simulated_gpu.registered)  # page-aligned reads
    g.close()
    assert ops.live_streams == [] and simulated_gpu.registered == []
    # the pinned ring was freed while its copy streams existed (torch records an event on
    # them at free; on a destroyed stream that aborted the process on an H200)
    assert ops.violations == []


def test_simulated_gds_submit_failure_waits_for_running_reads(ds, simulated_gpu):
    """Defect 6: a pread that raises when submitted leaves no earlier read of the batch
    writing into pinned memory that goes back to the allocator."""
    from gds_stream.gds import GDSLoader

    simulated_gpu.routes.update(ROUTES["host"])
    _FakeCuFile.fail_submit_at = 3
    g = GDSLoader(ds, device="cuda", batch_points=30_000, prefetch=1)
    ops = simulated_gpu.ops[-1]
    with pytest.raises(LoaderError, match="submit failed"):
        for _ in g:
            pass
    # the failure was raised only after every read already submitted into the slot finished
    assert not any(ops.host_writes.values()), "reads still write into the pinned slot"
    g.close()
    gc.collect()
    time.sleep(0.2)
    assert ops.violations == []


@pytest.mark.parametrize("streams", ["own", "blocking"])
def test_simulated_gds_reads_never_wait_for_the_null_stream(ds, simulated_gpu, monkeypatch,
                                                            streams):
    """The CPU analogue of the GPU overlap test, both routes: "training" queued first on the
    consumer's (legacy null) stream never runs while 2 x prefetch batches are read. With
    blocking loader streams (what KvikIO's compat copies use) the model catches the wait."""
    from gds_stream.gds import GDSLoader
    from fallback import FallbackLoader
    import simcuda

    if streams == "blocking":
        def blocking_stream(self):
            s = simcuda.SimStream(self, blocking=True, null=self.null)
            self.streams.append(s)
            return s

        monkeypatch.setattr(simcuda.SimOps, "new_stream", blocking_stream)
    simulated_gpu.opts["deferred_consumer"] = True
    simulated_gpu.routes.update({"y": "host"})
    cfg = dict(batch_points=9_999, shuffle=True, seed=2, shuffle_window=0, prefetch=3)
    with GDSLoader(ds, device="cuda", **cfg) as g, FallbackLoader(ds, device="cpu", **cfg) as f:
        ops = simulated_gpu.ops[-1]
        trained = []
        ops.null.put(lambda: trained.append(1))
        it = iter(g)
        got = [next(it) for _ in range(6)]
        if streams == "blocking":
            assert trained == [1] and ops.null.forced > 0
            return
        assert trained == [] and ops.null.forced == 0
        ops.null.run_all()
        for a, b in zip(got, f):
            for k in a:
                assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


def test_simulated_gds_num_threads_never_shrinks_kvikios_pool(ds, simulated_gpu):
    """Item 9: KvikIO's pool is process-wide; a loader grows it, never shrinks it."""
    from gds_stream.gds import GDSLoader

    simulated_gpu.settings["num_threads"] = 8
    with GDSLoader(ds, device="cuda", batch_points=10_000, num_threads=3):
        pass
    assert simulated_gpu.settings["num_threads"] == 8


def test_simulated_gds_kept_batches_survive_buffer_reuse(ds, simulated_gpu):
    """Ownership on allocators that reuse memory, with a consumer stream that runs late."""
    from gds_stream.gds import GDSLoader
    from fallback import FallbackLoader

    simulated_gpu.opts["deferred_consumer"] = True
    simulated_gpu.routes.update({"y": "host"})
    cfg = dict(batch_points=9_999, shuffle=True, seed=3, shuffle_window=0, prefetch=2)
    with GDSLoader(ds, device="cuda", **cfg) as g, FallbackLoader(ds, device="cpu", **cfg) as f:
        kept = list(g)
        simulated_gpu.ops[-1].consumer.run_all()
        for a, b in zip(kept, f):
            for k in a:
                assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


# -- the real thing (GPU) ----------------------------------------------------------------------
def _gpu_reason() -> str | None:
    reason = cuda_reason()
    if reason is not None:
        return reason
    cap = capability.probe_gds()
    return None if cap.available else cap.reason


def _consumer_streams():
    import torch

    return {"default": torch.cuda.default_stream(), "side": torch.cuda.Stream()}


@pytest.mark.parametrize("stream", ["default", "side"])
@pytest.mark.parametrize("cfg", CONFIGS + [
    dict(batch_points=1_000_003, shuffle=True, seed=5),
    dict(batch_points=777, rank=3, world_size=4, fields=["y", "rgb"]),
], ids=_cfg_id)
@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_bit_identical_to_fallback(ds, cfg, stream):
    """Batches dropped as they go (staging reused), on the default or a side stream, compared
    after ``.cpu()`` on the consumer's stream only (no device-wide synchronize)."""
    import torch

    s = _consumer_streams()[stream]
    for epoch in (0, 2):
        with open_loader(ds, backend="gds", device="cuda", **cfg) as g, \
                open_loader(ds, backend="fallback", device="cuda", **cfg) as f, \
                torch.cuda.stream(s):
            g.set_epoch(epoch), f.set_epoch(epoch)
            plan, n = g.epoch_plan(epoch), 0
            for i, (a, b) in enumerate(zip(g, f)):
                assert a.keys() == b.keys()
                idx = plan.batch(i).point_indices()
                for k in a:
                    assert a[k].is_cuda and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                    got = a[k].cpu().numpy()  # ordered on the consumer's stream
                    assert got.tobytes() == b[k].cpu().numpy().tobytes(), k
                    if k != "offset":
                        assert np.array_equal(got.reshape(len(idx), -1),
                                              ds.read(k)[idx].reshape(len(idx), -1)), k
                n += 1
                # some work of the consumer's own on the batch, on its stream, then drop it
                torch.cuda._sleep(1000)
                del a, b
            assert n == len(g)


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_kept_batches_stay_intact(ds):
    """Ownership: a loop that keeps every batch of an epoch still sees the dataset's values."""
    cfg = dict(batch_points=9_999, shuffle=True, seed=3, prefetch=2)
    with open_loader(ds, backend="gds", device="cuda", **cfg) as g:
        kept = list(g)
        plan = g.epoch_plan(0)
        for i, a in enumerate(kept):
            idx = plan.batch(i).point_indices()
            for k in a:
                assert np.array_equal(a[k].cpu().numpy(), ds.read(k)[idx]), k


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_mode_is_truthful(ds):
    cap = capability.probe_gds()
    with open_loader(ds, backend="gds", device="cuda", batch_points=20_000) as g:
        assert g.backend in ("gds", "gds-compat")
        if cap.mode != "gds":
            assert g.backend == "gds-compat" and g.backend_reason
        assert (g.backend == "gds") == all(r == "gds" for r in g.routes)
        assert (g.route_reason == "") == (g.backend == "gds")
        assert g.route_reason in g.backend_reason and g.backend_reason
        for b in g:
            for t in b.values():
                assert t.is_cuda


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
    """Staging comes from torch's caching allocator: its allocated bytes stay bounded."""
    import torch

    d = _write(tmp_path / "m", [2_000_000])
    batch, prefetch = 100_000, 3
    per_batch = sum(s.point_bytes for s in d.schema.values()) * batch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    peak = 0
    with open_loader(d, backend="gds", device="cuda", batch_points=batch, prefetch=prefetch) as g:
        for b in g:
            peak = max(peak, torch.cuda.memory_allocated() - base)
            del b
    # prefetch batches in flight + the one the loop holds, each with ≤ 8 KiB of alignment slack
    # per field and 4 KiB for the slab's start, + a constant for offsets/permutation scratch
    slack = 2 * 4096 * len(d.schema) + 4096 + 8 * batch
    assert peak <= (prefetch + 1) * (per_batch + slack) + (1 << 20), peak


def _gds_dir_reason() -> str | None:
    if not os.environ.get("GDS_STREAM_TEST_DIR"):
        return ("GDS_STREAM_TEST_DIR is not set: it names a directory on storage that can do "
                "GPUDirect Storage (pytest's tmp dir is often overlay or tmpfs)")
    return _gpu_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_gds_dir_reason() is not None, reason=str(_gds_dir_reason()))
def test_gpu_gds_route_on_gds_storage(tmp_path):
    """On storage that can do GDS, every file takes the ``gds`` route (cuFile proper, compat
    mode OFF), and the batches equal the fallback's."""
    import tempfile

    import torch

    base = os.environ["GDS_STREAM_TEST_DIR"]
    with tempfile.TemporaryDirectory(dir=base, prefix="gds-stream-test-") as root:
        d = _write(os.path.join(root, "ds"), [300_000, 5, 200_000])
        cfg = dict(batch_points=65_536, shuffle=True, seed=2, prefetch=3)
        with open_loader(d, backend="gds", device="cuda", **cfg) as g, \
                open_loader(d, backend="fallback", device="cuda", **cfg) as f:
            assert g.routes == ["gds"] * len(g.routes), g.backend_reason
            assert g.backend == "gds", g.backend_reason
            for a, b in zip(g, f):
                for k in a:
                    assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("backend", ["fallback", "auto"])
def test_output_cupy_needs_a_cuda_device(ds, backend):
    with pytest.raises(LoaderError, match="output='cupy'.*not CUDA"):
        open_loader(ds, backend=backend, device="cpu", batch_points=1000, output="cupy")
    with pytest.raises(LoaderError, match="output must be 'torch' or 'cupy'"):
        open_loader(ds, backend=backend, device="cpu", batch_points=1000, output="numpy")


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU-direct path unavailable: {_gpu_reason()}")
def test_gpu_cupy_staging_is_zero_copy_and_output_cupy(ds, monkeypatch):
    """KvikIO reads into a CuPy array over torch's allocation (data_ptr equality: zero copy,
    one pool), the batch's fields are views of it; output="cupy" yields CuPy arrays with the
    same bytes, over the same memory as the tensors they come from."""
    import cupy
    import torch

    from gds_stream import cudaops

    pairs, fields = [], []
    real = cudaops.CudaOps.as_cupy

    def spy(self, tensor):
        arr = real(self, tensor)
        pairs.append((arr.data.ptr, tensor.data_ptr(), tensor.numel()))
        return arr

    monkeypatch.setattr(cudaops.CudaOps, "as_cupy", spy)
    cfg = dict(batch_points=9_999, shuffle=True, seed=3)
    with open_loader(ds, backend="gds", device="cuda", **cfg) as g, \
            open_loader(ds, backend="gds", device="cuda", output="cupy", **cfg) as c:
        for a, b in zip(g, c):
            for k in a:
                assert isinstance(b[k], cupy.ndarray)
                assert torch.equal(a[k], torch.from_dlpack(b[k])), k
                fields.append(a[k].data_ptr())
    assert pairs and all(x == y for x, y, _ in pairs)
    assert all(any(p <= f < p + n for _, p, n in pairs) for f in fields if f)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gds", "fallback"])
@pytest.mark.skipif(cuda_reason() is not None, reason=str(cuda_reason()))
def test_gpu_windows_gathered_on_changing_streams_stay_intact(ds, backend):
    """Defect 5: each batch of a window is gathered on the stream current at its next(); the
    window's memory must not be reused while a gather on another stream has not run."""
    import torch

    if backend == "gds" and _gpu_reason() is not None:
        pytest.skip(f"GPU-direct path unavailable: {_gpu_reason()}")
    cpm = 1e6  # ~1 ms of cycles per unit below on current GPUs; only ordering matters here
    cfg = dict(batch_points=5_000, shuffle=True, seed=4, shuffle_window=20_000, prefetch=2)
    streams = [torch.cuda.Stream() for _ in range(3)]
    with open_loader(ds, backend=backend, device="cuda", **cfg) as g:
        plan, kept, it = g.epoch_plan(0), [], iter(g)
        for i in range(len(g)):
            s = streams[i % 3]
            with torch.cuda.stream(s):
                torch.cuda._sleep(int(20 * cpm))  # this stream lags: its gather runs late
                kept.append((i, s, next(it)))
        for i, s, b in kept:
            idx = plan.batch(i).point_indices()
            with torch.cuda.stream(s):
                for k, t in b.items():
                    assert np.array_equal(t.cpu().numpy(), ds.read(k)[idx]), (i, k)


@pytest.mark.parametrize("record", [True, False])
def test_simulated_gds_consumer_work_late_needs_record_stream(ds, simulated_gpu, monkeypatch,
                                                              record):
    """The reusing allocator catches a missing record_stream: the consumer queues work on each
    batch and drops it; that work runs late, after the loader reused the freed staging for
    later reads. With record_stream the bytes are right; without it (the model's own check)
    they are not."""
    import torch

    from gds_stream.gds import GDSLoader
    from fallback import FallbackLoader
    import simcuda

    if not record:
        monkeypatch.setattr(simcuda.SimOps, "record_stream", lambda self, t, s: None)
    simulated_gpu.opts["deferred_consumer"] = True
    cfg = dict(batch_points=4_096, prefetch=2)
    results = []
    with GDSLoader(ds, device="cuda", fields=["inst"], **cfg) as g:
        ops = simulated_gpu.ops[-1]
        for b in g:
            src = b["inst"]
            out = torch.empty_like(src)
            addr, n = src.data_ptr(), src.numel() * src.element_size()

            def use(out=out, addr=addr, n=n):  # a kernel holds an address, not a reference
                out.view(torch.uint8).numpy()[:] = np.frombuffer(
                    (ctypes.c_char * n).from_address(addr), np.uint8)

            ops.consumer.put(use)
            results.append(out)
            del b, src
        ops.consumer.run_all()
    with FallbackLoader(ds, device="cpu", fields=["inst"], **cfg) as f:
        same = all(torch.equal(r, w["inst"]) for r, w in zip(results, f))
    assert same == record


def test_plan_reads_never_plans_a_zero_length_read():
    """Item 9: an empty segment is no read (KvikIO would get a null pointer for it)."""
    from gds_stream.gds import _GDSIterator

    spec = types.SimpleNamespace(point_bytes=4)
    it = types.SimpleNamespace(_specs=[spec, spec],
                               _layouts=[types.SimpleNamespace(offset=0),
                                         types.SimpleNamespace(offset=8192)])
    batch = types.SimpleNamespace(segments=np.array([[0, 0], [5, 5], [1024, 1030]]))
    reads, regions, total = _GDSIterator._plan_reads(it, batch)
    assert len(reads) == 2 and all(r.size > 0 and r.nbytes == 24 for r in reads)
    assert total == sum(r.size for r in reads) == 2 * 4096
