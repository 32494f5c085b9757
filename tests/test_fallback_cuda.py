"""The fallback's CUDA path on the CPU model of CUDA (``simcuda``), and the CUDA operations
both backends share (``gds_stream.cudaops``) against fake CUDA bindings."""

from __future__ import annotations

import gc

import threading
import types

import numpy as np
import pytest
import torch

import fallback.loader as fb_loader
from fallback import FallbackLoader
from gds_stream import cudaops
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset
from simcuda import SimOps


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("fbcuda") / "ds"
    with DatasetWriter(path, [FieldSpec("v", np.dtype("<u4"))]) as w:
        w.append({"v": rng.integers(0, 2**32 - 1, 40_000, dtype=np.uint32)})
        w.end_scan("s")
    return open_dataset(path)


@pytest.fixture
def sim(monkeypatch):
    made: list[SimOps] = []

    def make(torch_, device):
        made.append(SimOps(torch_, device, deferred_consumer=True))
        return made[-1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fb_loader, "cuda_ops", make)
    return made


def test_break_keeps_the_pending_copy_event_of_a_slot(ds, sim, monkeypatch):
    """Defect 4: a slot whose refill was cancelled by close() keeps the event of the copy still
    queued out of it, so a new epoch cannot overwrite it before that copy of an already
    yielded batch has run."""
    hold = {"on": True}
    real_read = fb_loader._read

    def held_read(reads, stop, slot):
        if hold["on"] and held_read.calls > 0:  # the first batch reads; later ones wait
            stop.wait(5)
        held_read.calls += 1
        return real_read(reads, stop, slot)

    held_read.calls = 0
    monkeypatch.setattr(fb_loader, "_read", held_read)
    cfg = dict(batch_points=10_000, prefetch=2, num_threads=1)
    g = FallbackLoader(ds, device="cuda", **cfg)
    ops = sim[-1]
    it = iter(g)
    b0 = next(it)  # its copy is queued on the copy stream; the GPU "has not got to it"
    it.close()
    hold["on"] = False
    it = iter(g)  # a new epoch refills the slots
    next(it), next(it)
    ops.consumer.run_all()  # now the GPU runs what was queued
    want = ds.read("v")[:10_000]
    assert np.array_equal(b0["v"].numpy(), want)
    g.close()
    assert ops.live_streams == [] and ops.violations == []


def test_copy_stream_is_the_loaders_own_and_workers_bind(ds, sim):
    """Defects 2 and 3 for the fallback: one stream of the loader's own, destroyed at close;
    every worker thread binds the device before waiting on copy events."""
    before = {t.ident for t in threading.enumerate()}
    g = FallbackLoader(ds, device="cuda", batch_points=5_000, prefetch=3, num_threads=2)
    ops = sim[-1]
    for epoch in (0, 1):
        g.set_epoch(epoch)
        got = list(g)
        ops.consumer.run_all()
        assert b"".join(b["v"].numpy().tobytes() for b in got) == ds.read("v").tobytes()
    assert len(ops.streams) == 1 and ops.live_streams == ops.streams
    assert ops.bound - before, "the workers never bound the device"
    g.close()
    assert ops.live_streams == [] and ops.violations == []


def test_close_frees_the_pinned_ring_before_destroying_the_copy_stream(ds, sim):
    """torch's pinned-memory allocator records an event on every stream a block was copied on
    when the block is freed; a ring still referenced (an iterator the loop kept) freed after
    close() destroyed the copy stream aborted the process (CUDA error: invalid device
    context, seen on an H200)."""
    g = FallbackLoader(ds, device="cuda", batch_points=5_000, prefetch=3, num_threads=2)
    ops = sim[-1]
    it = iter(g)
    got = [next(it) for _ in range(3)]
    ops.consumer.run_all()
    assert len(got) == 3
    g.close()
    del got
    gc.collect()
    assert ops.live_streams == [] and ops.violations == []
    del it
    gc.collect()
    assert ops.violations == []


# -- gds_stream.cudaops against fake bindings -------------------------------------------------
class _FakeRuntime:
    kind = "fake"

    def __init__(self):
        self.created, self.destroyed, self.devices = [], [], []

    def set_device(self, index):
        self.devices.append((threading.get_ident(), index))

    def create_stream(self):
        h = 0x1000 + len(self.created)
        self.created.append(h)
        return h, lambda: self.destroyed.append(h)


def test_cudaops_streams_do_not_come_from_torchs_pool(monkeypatch):
    rt = _FakeRuntime()
    monkeypatch.setattr(cudaops, "_RUNTIME", rt)
    pool = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: pool.append(1))
    monkeypatch.setattr(torch.cuda, "device", lambda d: types.SimpleNamespace(
        __enter__=lambda *a: None, __exit__=lambda *a: None))

    class _External:
        def __init__(self, handle, device=None):
            self.cuda_stream = handle

    class _Ctx:
        def __init__(self, d):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *a):
            return None

    monkeypatch.setattr(torch.cuda, "device", _Ctx)
    monkeypatch.setattr(torch.cuda, "ExternalStream", _External)
    ops = cudaops.CudaOps(torch, torch.device("cuda", 1))
    a, b = ops.new_stream(), ops.new_stream()
    assert not pool, "a stream from torch's pool can be the training loop's"
    assert (a.cuda_stream, b.cuda_stream) == tuple(rt.created)
    ops.destroy_stream(a)
    ops.destroy_stream(a)  # once only
    assert rt.destroyed == [a.cuda_stream]
    t = threading.Thread(target=ops.bind)
    t.start()
    t.join()
    assert rt.devices == [(t.ident, 1)]


def test_cudaops_runtime_without_any_binding_says_none(monkeypatch):
    rt = cudaops._Runtime.__new__(cudaops._Runtime)
    rt.kind, rt._api = "none", None
    assert rt.create_stream() is None


def test_reads_never_wait_for_work_queued_on_the_null_stream(ds, sim):
    """The CPU analogue of the GPU overlap test: "training" queued first on the consumer's
    (legacy null) stream never runs while the loader reads and copies 2 x prefetch batches."""
    g = FallbackLoader(ds, device="cuda", batch_points=4_000, prefetch=2, num_threads=2)
    ops = sim[-1]
    trained = []
    ops.null.put(lambda: trained.append(1))  # the training step, queued first
    it = iter(g)
    got = [next(it) for _ in range(4)]
    assert trained == [] and ops.null.forced == 0, "the loader waited for the training step"
    ops.null.run_all()
    assert trained == [1]
    assert b"".join(b["v"].numpy().tobytes() for b in got) == ds.read("v")[:16_000].tobytes()
    g.close()
