"""Inline reads on a CPU device (``num_threads=0``, the default where torch's threads take every
core): the same batches as the threaded path, no thread of ours, kernel read-ahead, errors."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from gds_stream.backends import open_loader
from gds_stream.errors import LoaderError
from helpers import make_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("inline"), [3000, 0, 40_001, 517, 9_000])


CONFIGS = [
    dict(batch_points=7_000),
    dict(batch_points=7_000, shuffle=True, seed=2),
    dict(batch_points=7_000, shuffle=True, seed=2, shuffle_window=0),
    dict(batch_points=4_000, shuffle=True, seed=5, shuffle_window=15_000, rank=1, world_size=2),
    dict(batch_scans=2, shuffle=True, seed=1),
    dict(batch_points=9_000, verify_reads=True, drop_last=True),
]


def _batches(ds, **kw):
    with open_loader(ds, backend="fallback", device="cpu", **kw) as ld:
        ld.set_epoch(3)
        return [dict(b) for b in ld]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_inline_reads_yield_the_threaded_batches_without_a_thread(ds, cfg):
    want = _batches(ds, num_threads=2, **cfg)
    base = set(threading.enumerate())
    got = []
    with open_loader(ds, backend="fallback", device="cpu", num_threads=0, **cfg) as ld:
        assert ld.inline_reads and "inline" in ld.backend_reason
        ld.set_epoch(3)
        for b in ld:
            assert set(threading.enumerate()) == base  # no reader, no pipeline thread
            got.append(b)
    assert len(got) == len(want) and got
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            assert torch.equal(g[k], w[k]), k


def test_inline_reads_transform_in_the_pipeline_threads_and_stack_alone_in_next(ds, monkeypatch):
    """Inline reads (no reader thread): a transform still runs in the loader's pipeline threads
    — which then read inline, in turn — never in next(); a stack alone runs in next()."""
    from gds_stream.pipeline import Pipeline

    names, stacked = [], []

    def where(batch, gen):
        names.append(threading.current_thread().name)
        return batch

    real = Pipeline._stack

    def spy(self, *a, **kw):
        stacked.append(threading.current_thread().name)
        return real(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "_stack", spy)
    with open_loader(ds, backend="fallback", device="cpu", num_threads=0, batch_points=9_000,
                     transform=where, stack={"xy": ["x", "y"]}, transform_threads=2) as ld:
        assert ld.inline_reads
        n = sum(1 for _ in ld)
    assert len(names) == n and all(x.startswith("gds-stream-pipeline-") for x in names), names
    assert len(stacked) == n and all(x.startswith("gds-stream-pipeline-") for x in stacked)
    stacked.clear()
    with open_loader(ds, backend="fallback", device="cpu", num_threads=0, batch_points=9_000,
                     stack={"xy": ["x", "y"]}) as ld:
        n = sum(1 for _ in ld)
    assert stacked == [threading.current_thread().name] * n


def test_inline_reads_ask_the_kernel_for_the_batches_submitted_ahead(ds, monkeypatch):
    hints, reads = [], []
    real_fadvise, real_preadv = os.posix_fadvise, os.preadv

    def fadvise(fd, off, length, advice):
        hints.append((fd, off, length, advice))
        return real_fadvise(fd, off, length, advice)

    def preadv(fd, bufs, off):
        reads.append((fd, off, len(hints)))
        return real_preadv(fd, bufs, off)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    monkeypatch.setattr(os, "preadv", preadv)
    with open_loader(ds, backend="fallback", device="cpu", num_threads=0, prefetch=2,
                     batch_points=10_000, fields=["pid"]) as ld:
        next(iter(ld))
        fd = ld.files.fd("pid")
        base = ld.dataset.layout("pid").offset
    assert all(h[3] == os.POSIX_FADV_WILLNEED for h in hints)
    # both batches submitted before the first read were announced before it
    assert (fd, base, 80_000, os.POSIX_FADV_WILLNEED) in hints[:2]
    assert (fd, base + 80_000, 80_000, os.POSIX_FADV_WILLNEED) in hints[:2]
    assert reads and reads[0][2] >= 2


def test_num_threads_zero_is_for_a_cpu_device(ds):
    with pytest.raises(LoaderError, match="num_threads must be an integer >= 1 on a CUDA device"):
        open_loader(ds, backend="fallback", device="cuda", num_threads=0, batch_points=100)


def test_an_interrupted_inline_read_leaves_a_stopped_iterator(ds, monkeypatch):
    real = os.preadv
    calls = []

    def preadv(fd, bufs, off):
        calls.append(off)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(fd, bufs, off)

    with open_loader(ds, backend="fallback", device="cpu", num_threads=0,
                     batch_points=5_000, fields=["pid"]) as ld:
        it = iter(ld)
        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(KeyboardInterrupt):
            for _ in it:
                pass
        monkeypatch.setattr(os, "preadv", real)
        with pytest.raises(LoaderError, match="interrupted by KeyboardInterrupt"):
            next(it)
        state = ld.state_dict()
        ld.load_state_dict(state)  # resume where the interrupted loop stood
        got = np.concatenate([b["pid"].numpy() for b in ld])
    assert np.array_equal(got, np.arange(state["batches_done"] * 5_000, ds.num_points))


@pytest.mark.parametrize("cfg", [dict(), dict(shuffle=True, seed=3, shuffle_window=0)],
                         ids=["order", "shuffle"])
def test_a_close_during_an_inline_read_fails_that_batch(ds, monkeypatch, cfg):
    """A close() landing while next() reads (from another thread: here from inside the read,
    where next() holds the iterator as it would then) stops the reads; the half-filled batch
    is never handed out."""
    real = os.preadv
    calls = []
    with open_loader(ds, backend="fallback", device="cpu", num_threads=0,
                     batch_points=20_000, **cfg) as ld:
        it = iter(ld)
        first = next(it)

        def preadv(fd, bufs, off):
            calls.append(off)
            if len(calls) == 2:
                it.close()
            return real(fd, bufs, off)

        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(LoaderError, match="closed"):
            next(it)
        monkeypatch.setattr(os, "preadv", real)
        assert ld.state_dict()["batches_done"] == 1
    assert 2 <= len(calls) < len(ds.schema)  # the reads stopped at the close
    assert first["pid"].numel() == 20_000


def test_inline_reads_take_a_batch_buffer_in_next_not_when_submitting(ds):
    """Inline, the batches submitted ahead hold no buffer yet: each is taken in ``next()``,
    so the one the loop dropped last comes back from the pool (warm) instead of one taken
    ``prefetch`` batches earlier; the threaded reader keeps filling its buffers ahead."""
    import gc

    from gds_stream import _hostmem

    def live() -> int:
        gc.collect()
        with _hostmem._lock:
            _hostmem._drain()
        return sum(1 for ref, _ in _hostmem._live.values() if ref() is not None)

    for threads, ahead in ((0, 0), (1, 2)):
        with open_loader(ds.path, backend="fallback", device="cpu", batch_points=10_000,
                         prefetch=2, num_threads=threads) as ld:
            before = live()
            it = iter(ld)
            first = next(it)
            assert live() - before == 1 + ahead, threads  # the batch held (+ the ones ahead)
            del first
            second = next(it)
            assert int(second["x"].shape[0]) == 10_000
            del second
            it.close()


def test_read_ahead_hints_stop_while_batches_fill_at_page_cache_speed(ds, monkeypatch):
    """Inline reads announce the batches submitted ahead until ``WARM_FILLS`` batches in a row
    fill at page-cache speed with none slower this epoch (a hint on cached pages reads nothing
    and costs a walk over them); a slower fill turns them on for the rest of the epoch, and a
    new epoch starts with them on. The batches are the same either way."""
    import fallback.loader as fl

    hinted = []
    real = fl._read_ahead
    monkeypatch.setattr(fl, "_read_ahead",
                        lambda files, specs, seg: hinted.append(int(seg[0][0])) or
                        real(files, specs, seg))
    speed = {"s": 0.0}
    ticks = iter(range(10**9))
    monkeypatch.setattr(fl, "_clock", lambda: next(ticks) * speed["s"])

    def epoch(ld, e):
        hinted.clear()
        ld.set_epoch(e)
        return [b["pid"].clone() for b in ld]

    with open_loader(ds, backend="fallback", device="cpu", num_threads=0, prefetch=2,
                     batch_points=4_000, fields=["pid"]) as ld:
        assert ld.inline_reads
        fast = epoch(ld, 0)               # every fill takes no time: page-cache speed
        n = len(fast)
        assert n >= 10
        # two submitted before the first fill, one more before the second ended the hints
        assert len(hinted) == fl.WARM_FILLS + 1
        speed["s"] = 1e6                  # every fill takes "1e6 s": slower than any disk
        slow = epoch(ld, 0)
        assert len(hinted) == n
        # three fast fills (batches 0-2; 3 and 4 submitted unannounced), then a slow one
        # (batch 3): every batch submitted from then on is announced (5 to the last)
        fills = iter([0.0] * 6 + [0.0, 1e6] + [0.0] * 10**6)  # a fill reads the clock twice
        monkeypatch.setattr(fl, "_clock", lambda: next(fills))
        mixed = epoch(ld, 0)
        assert hinted == [4_000 * i for i in (0, 1, 2, *range(5, n))]
    for a, b, c in zip(fast, slow, mixed):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_read_ahead_hint_state():
    import fallback.loader as fl

    h = fl._Hints()
    assert h.on
    h.filled(10**9, 0.001)                 # 1e12 B/s
    assert h.on                            # one fast fill is not yet a warm run
    h.filled(10**9, 0.001)
    assert not h.on
    h.filled(10**6, 1.0)                   # 1 MB/s: not all in the page cache
    assert h.on
    h.filled(10**9, 0.001)
    h.filled(10**9, 0.001)
    assert h.on                            # on for good once a slow fill was seen
    cold = fl._Hints()
    cold.filled(10**6, 1.0)
    for _ in range(5):
        cold.filled(10**9, 0.001)
    assert cold.on
