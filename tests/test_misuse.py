"""Misuse never looks like a finished epoch: superseded iterators, close() from another thread,
two threads in one iterator, option types and names, configurations that yield nothing."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

import fallback.loader as fb_loader
from fallback import FallbackLoader
from gds_stream.backends import open_loader
from gds_stream.errors import LoaderError
from gds_stream.format import FieldSpec
from helpers import make_dataset, run_with_timeout, wait_threads

PID = [FieldSpec("pid", np.dtype("<i8"))]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("mis"), [40_000, 0, 30_000, 14_000], fields=PID)


def loader(ds, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_points", 4_000)
    kw.setdefault("num_threads", 2)
    return FallbackLoader(ds, **kw)


@pytest.fixture
def slow_reads(monkeypatch):
    """Every read takes 20 ms, so an epoch (21 batches) takes long enough to interrupt."""
    real = fb_loader.pread_into

    def slow(*a, **kw):
        time.sleep(0.02)
        return real(*a, **kw)

    monkeypatch.setattr(fb_loader, "pread_into", slow)


# -- a second iter(loader) --------------------------------------------------------------------
def test_superseded_iterator_raises_instead_of_ending(ds):
    base = set(threading.enumerate())
    with loader(ds) as ld:
        old = iter(ld)
        next(old)
        new = iter(ld)
        with pytest.raises(LoaderError, match="superseded by a newer iter"):
            next(old)
        with pytest.raises(LoaderError, match="superseded"):  # and it stays so
            next(old)
        assert sum(len(b["pid"]) for b in new) == ds.num_points
    assert not wait_threads(base)


# -- close() from another thread while the consumer iterates -----------------------------------
@pytest.mark.parametrize("closer", ["iterator", "loader"])
def test_close_from_another_thread_is_an_error_not_an_end(ds, slow_reads, closer):
    base = set(threading.enumerate())
    ld = loader(ds, prefetch=2)
    it = iter(ld)
    seen = []
    started = threading.Event()

    def consume():
        try:
            for b in it:
                seen.append(len(b["pid"]))
                started.set()
        except LoaderError as e:
            return e
        return None

    t = threading.Thread(target=lambda: box.append(consume()), name="test-consumer")
    box: list = []
    t.start()
    assert started.wait(10)
    (it if closer == "iterator" else ld).close()
    t.join(10)
    assert not t.is_alive()
    err = box[0]
    assert err is not None, f"the epoch looked finished after {len(seen)} of {len(ld)} batches"
    assert len(seen) < len(ld)
    assert "closed" in str(err)
    assert not wait_threads(base)
    assert ld.stats.inflight == 0
    ld.close()


def test_close_after_the_epoch_or_after_break_is_silent(ds):
    with loader(ds) as ld:
        it = iter(ld)
        assert len(list(it)) == len(ld)
        it.close()
        ld.close()  # nothing raised
        with pytest.raises(StopIteration):  # a finished epoch stays finished
            next(it)
    with loader(ds) as ld:
        for i, _ in enumerate(ld):
            if i == 2:
                break
        ld.close()


# -- two threads in one iterator --------------------------------------------------------------
def test_two_threads_calling_next_at_once(ds, monkeypatch):
    gate, inside = threading.Event(), threading.Event()
    real = fb_loader.pread_into

    def gated(*a, **kw):
        inside.set()
        gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(fb_loader, "pread_into", gated)
    with loader(ds, prefetch=1, num_threads=1) as ld:
        it = iter(ld)
        first: list = []
        t = threading.Thread(target=lambda: first.append(next(it)), name="test-next-1")
        t.start()
        assert inside.wait(10)  # thread 1 is inside next(), waiting for its read
        try:
            with pytest.raises(LoaderError, match="used from two threads at once"):
                next(it)
        finally:
            gate.set()
            t.join(10)
        assert len(first) == 1 and np.array_equal(first[0]["pid"].numpy(), np.arange(4000))
        # the iterator is still usable from one thread: nothing lost, nothing repeated
        rest = np.concatenate([b["pid"].numpy() for b in it])
        assert np.array_equal(rest, np.arange(4000, ds.num_points))


# -- option types and names -------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("rank", "1"), ("rank", 1.5), ("rank", True), ("world_size", 2.0), ("world_size", False),
    ("seed", 1.0), ("seed", "3"), ("prefetch", 2.5), ("prefetch", True),
    ("num_threads", "4"), ("batch_points", 10.0), ("batch_points", np.float32(8)),
    ("shuffle", 1), ("shuffle", "yes"), ("drop_last", None), ("verify_reads", 0),
])
def test_option_types(ds, name, value):
    kw = {"rank": 0, "world_size": 2} if name in ("rank", "world_size") else {}
    kw[name] = value
    with pytest.raises(LoaderError) as ei:
        open_loader(ds, backend="fallback", device="cpu",
                    **({"batch_points": 100} | kw))
    assert name in str(ei.value) and repr(value) in str(ei.value)


def test_numpy_integers_and_bools_are_accepted(ds):
    with open_loader(ds, backend="fallback", device="cpu", batch_points=np.int64(20_000),
                     rank=np.int32(1), world_size=np.uint8(2), seed=np.int64(3),
                     prefetch=np.int16(2), num_threads=np.int64(1),
                     shuffle=np.bool_(True)) as ld:
        o = ld.options
        assert (o.batch_points, o.rank, o.world_size, o.seed, o.prefetch, o.num_threads) == \
            (20_000, 1, 2, 3, 2, 1)
        assert all(type(v) is int for v in (o.batch_points, o.rank, o.seed, o.prefetch))
        assert o.shuffle is True
        assert len(list(ld)) == len(ld)


@pytest.mark.parametrize("build", ["open_loader", "class"])
def test_misspelt_option_names_open_loader_and_suggests(ds, build):
    with pytest.raises(LoaderError) as ei:
        if build == "open_loader":
            open_loader(ds, backend="fallback", device="cpu", bach_points=100)
        else:
            FallbackLoader(ds, device="cpu", bach_points=100)
    msg = str(ei.value)
    assert "open_loader()" in msg and "'bach_points'" in msg and "did you mean 'batch_points'" \
        in msg
    with pytest.raises(LoaderError, match="unknown option 'zzz'; options are .*batch_points"):
        open_loader(ds, backend="fallback", zzz=1, batch_points=10)


# -- configurations that yield nothing --------------------------------------------------------
def test_config_that_yields_no_batch_is_refused(tmp_path):
    d = make_dataset(tmp_path, [5, 6, 7], fields=PID)
    with pytest.raises(LoaderError) as ei:
        loader(d, batch_points=None, batch_scans=10, drop_last=True)
    msg = str(ei.value)
    assert "batch_scans=10 with drop_last=True yields no batch" in msg
    assert "3 scans" in msg and "lower batch_scans to at most 3" in msg
    with pytest.raises(LoaderError, match="set drop_last=False"):
        loader(d, batch_points=100, drop_last=True, rank=0, world_size=2)
    with loader(d, batch_points=None, batch_scans=10) as ld:  # without drop_last: one batch
        assert len(ld) == 1 and len(next(iter(ld))["offset"]) == 3


def test_empty_dataset_warns_and_yields_nothing(tmp_path, caplog):
    d = make_dataset(tmp_path, [0, 0], fields=PID)
    caplog.set_level(logging.WARNING, logger="gds_stream.loader")
    with loader(d, batch_points=100) as ld:
        assert len(ld) == 0 and run_with_timeout(lambda: list(ld)) == []
    assert any("holds no points" in r.getMessage() for r in caplog.records)


def test_next_during_another_threads_close_reports_the_close(ds, monkeypatch):
    """close() in thread B is joining the workers when thread A calls next(): A waits for
    the close and gets "closed", not "used from two threads"."""
    real = fb_loader._FallbackIterator._shutdown
    joining = threading.Event()

    def slow_shutdown(self):
        joining.set()
        time.sleep(0.3)
        real(self)

    monkeypatch.setattr(fb_loader._FallbackIterator, "_shutdown", slow_shutdown)
    with loader(ds) as ld:
        it = iter(ld)
        next(it)
        t = threading.Thread(target=it.close, name="test-closer")
        t.start()
        assert joining.wait(10)
        with pytest.raises(LoaderError, match="closed by its close"):
            next(it)
        t.join(10)


def test_epochs_state_dicts_devices_and_field_names_are_checked(tmp_path):
    from gds_stream import open_loader
    from helpers import make_dataset

    ds = make_dataset(tmp_path, [500, 300])
    ld = open_loader(ds, backend="fallback", device="cpu", batch_points=100, shuffle=True)
    for bad in (-1, 1.7, "2", True, None):
        with pytest.raises(LoaderError, match="epoch must be an integer >= 0"):
            ld.set_epoch(bad)
    good = ld.state_dict()
    for bad in (None, [], {"epoch": 0}, {**good, "epoch": -1}, {**good, "epoch": "x"},
                {**good, "batches_done": None}):
        with pytest.raises(LoaderError):
            ld.load_state_dict(bad)
    ld.load_state_dict(good)
    ld.close()
    with pytest.raises(LoaderError, match="not a torch device"):
        open_loader(ds, backend="fallback", device="foo", batch_points=10)
    for bad in ([["x"]], [1]):
        with pytest.raises(LoaderError, match="names"):
            open_loader(ds, backend="fallback", device="cpu", batch_points=10, fields=bad)


@pytest.mark.parametrize("name, meant", [("batch_size", "batch_points"),
                                         ("num_workers", "num_threads"),
                                         ("prefetch_factor", "prefetch")])
def test_names_from_other_loaders_suggest_ours(ds, name, meant):
    # difflib alone suggested 'batch_scans' for batch_size
    with pytest.raises(LoaderError, match=f"unknown option '{name}'; did you mean '{meant}'"):
        open_loader(ds, backend="fallback", device="cpu", **{name: 10})
