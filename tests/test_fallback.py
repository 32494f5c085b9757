"""The CPU fallback backend against the iterator contract (README, "The contract": nine points), device="cpu".

Every value a loader yields is compared with :meth:`Dataset.read` of the points its plan names
(``loader.epoch_plan(e).batch(i).point_indices()``), so the planner's properties
(``test_plan.py``) carry over to what the consumer actually receives.
"""

from __future__ import annotations

import errno
import gc
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fallback.loader as fb_loader
import gds_stream
from gds_stream.errors import LoaderError
from gds_stream.format import FieldSpec
from fallback import FallbackLoader
from helpers import (DEFAULT_FIELDS, Reference, assert_batch_equal, batch_bytes_equal,
                     error_chain, make_dataset, run_with_timeout, wait_threads)

# Scans of every awkward kind: empty ones, single points, sizes around block/alignment edges.
SCANS = [0, 1, 4096, 131071, 0, 2, 65536, 100000, 3, 0, 77777, 41514]
NAMES = [s.name for s in DEFAULT_FIELDS]
HSET = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fb"), SCANS)


@pytest.fixture(scope="module")
def ref(ds):
    return Reference(ds)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tiny datasets: no points, one point, fewer points than ranks, a few scans."""
    root = tmp_path_factory.mktemp("small")
    out = {}
    for name, sizes in {"empty": [0], "one": [1], "three": [2, 0, 1],
                        "mid": [5000, 0, 17, 1234, 1]}.items():
        d = make_dataset(root, sizes, name=name, seed=len(sizes))
        out[name] = (d, Reference(d))
    return out


def loader(ds, **kw):
    kw.setdefault("device", "cpu")
    return FallbackLoader(ds, **kw)


def epoch_of(ld, epoch=None):
    """Set the epoch (if given), run it to the end, return the list of batches (kept alive)."""
    if epoch is not None:
        ld.set_epoch(epoch)
    return list(ld)


def check_epoch(ld, ref, batches, epoch, where=""):
    plan = ld.epoch_plan(epoch)
    assert len(batches) == plan.num_batches == len(ld), where
    for i, b in enumerate(batches):
        assert_batch_equal(b, ref.batch(ld.options.fields, plan.batch(i)), ref.ds.schema,
                           f"{where} batch {i}")


def pids(batches) -> np.ndarray:
    return np.concatenate([b["pid"].numpy() for b in batches]) if batches else \
        np.zeros(0, dtype=np.int64)


# -- 1-3, 6: values, sharding, determinism, shapes (hypothesis) -------------------------------
@st.composite
def options(draw):
    scan_mode = draw(st.booleans())
    kw = {"batch_scans": draw(st.integers(1, 5))} if scan_mode else \
        {"batch_points": draw(st.integers(5000, 150_000))}
    fields = draw(st.one_of(st.none(), st.lists(st.sampled_from(NAMES), min_size=1,
                                                max_size=len(NAMES), unique=True)))
    kw.update(fields=fields, shuffle=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
              drop_last=draw(st.booleans()), world_size=draw(st.integers(1, 4)),
              prefetch=draw(st.integers(1, 4)), num_threads=draw(st.integers(0, 3)))
    return kw


@HSET
@given(opts=options(), epoch=st.integers(0, 100))
def test_values_equal_planned_reads_on_every_rank(ds, ref, opts, epoch):
    all_pids, steps, kept = [], set(), 0
    scan_mode = "batch_scans" in opts
    units = ds.num_scans if scan_mode else ds.num_points
    if opts["drop_last"] and units < opts["world_size"] * next(iter(opts.values())):
        with pytest.raises(LoaderError, match="yields no batch"):  # refused, not len 0
            loader(ds, rank=0, **opts)
        return
    for r in range(opts["world_size"]):
        with loader(ds, rank=r, **opts) as ld:
            batches = run_with_timeout(lambda: epoch_of(ld, epoch))
            check_epoch(ld, ref, batches, epoch, f"rank {r}")
            steps.add(len(batches))
            want_keys = set(ld.options.fields) | ({"offset"} if "batch_scans" in opts else set())
            assert all(set(b) == want_keys for b in batches)
            first = ld.options.fields[0]
            kept += sum(len(b["offset"]) if scan_mode else len(b[first]) for b in batches)
            if "pid" in ld.options.fields:
                all_pids.append(pids(batches))
    assert len(steps) == 1, f"ranks yielded different numbers of batches: {steps}"
    if all_pids:
        got = np.concatenate(all_pids)
        assert len(np.unique(got)) == len(got), "a point was yielded twice"
        if not opts["drop_last"]:
            assert np.array_equal(np.sort(got), np.arange(ds.num_points))
    units = ds.num_scans if scan_mode else ds.num_points
    size = opts["batch_scans"] if scan_mode else opts["batch_points"]
    dropped = units % (opts["world_size"] * size) if opts["drop_last"] else 0
    assert kept == units - dropped, "drop_last dropped more than the final short batch"


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["empty", "one", "three", "mid"]), scan_mode=st.booleans(),
       batch=st.integers(1, 9), shuffle=st.booleans(), drop_last=st.booleans(),
       world_size=st.integers(1, 4), seed=st.integers(0, 99), epoch=st.integers(0, 5))
def test_tiny_datasets_and_uneven_tails(small, name, scan_mode, batch, shuffle, drop_last,
                                        world_size, seed, epoch):
    """Fewer points/scans than ranks, empty scans, empty last batches: equal steps and exactly
    once still hold, and len(loader) is what every rank yields."""
    d, rf = small[name]
    size = {"batch_scans": batch} if scan_mode else {"batch_points": batch * 97}
    got, steps = [], set()
    units = d.num_scans if scan_mode else d.num_points
    if drop_last and d.num_points > 0 and units < world_size * next(iter(size.values())):
        # No rank would get one full batch: refused, not an empty epoch (len 0).
        with pytest.raises(LoaderError, match="yields no batch"):
            loader(d, drop_last=True, rank=0, world_size=world_size, **size)
        return
    for r in range(world_size):
        ld = loader(d, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=r,
                    world_size=world_size, **size)
        batches = run_with_timeout(lambda: epoch_of(ld, epoch))
        check_epoch(ld, rf, batches, epoch, f"{name} rank {r}")
        steps.add(len(batches))
        got.append(pids(batches))
        ld.close()
    assert len(steps) == 1
    got = np.concatenate(got)
    assert len(np.unique(got)) == len(got)
    if not drop_last:
        assert np.array_equal(np.sort(got), np.arange(d.num_points))


def test_schema_dtypes_and_shapes(ds):
    with loader(ds, batch_scans=3) as ld:
        b = next(iter(ld))
        for s in DEFAULT_FIELDS:
            t = b[s.name]
            assert t.dtype == torch.from_numpy(np.empty(0, s.dtype)).dtype
            assert t.shape == ((b["pid"].shape[0],) if s.components == 1
                               else (b["pid"].shape[0], s.components))
        assert b["rgb"].dtype == torch.uint8 and b["rgb"].shape[1] == 3
        assert b["offset"].dtype == torch.int64
        assert int(b["offset"][-1]) == b["pid"].shape[0]


@pytest.mark.parametrize("scan_mode", [False, True])
def test_two_runs_identical_and_epochs_differ(ds, scan_mode):
    size = {"batch_scans": 2} if scan_mode else {"batch_points": 40_000}
    kw = dict(shuffle=True, seed=11, world_size=2, rank=1, **size)
    with loader(ds, **kw) as a, loader(ds, **kw) as b:
        ea, eb = epoch_of(a, 3), epoch_of(b, 3)
        assert len(ea) == len(eb) > 0
        assert all(batch_bytes_equal(x, y) for x, y in zip(ea, eb))
        e4 = epoch_of(a, 4)
        # the same points on this rank? not necessarily; the order must differ, though
        assert not np.array_equal(pids(ea), pids(e4))
        if not scan_mode:
            # a batch of 40 000 points is permuted within: the chance of equal order is nil
            assert not np.array_equal(ea[0]["pid"].numpy(), e4[0]["pid"].numpy())


def test_no_shuffle_is_file_order(ds):
    with loader(ds, batch_points=33_333, fields=["pid", "rgb"]) as ld:
        for e in (0, 1):
            got = pids(epoch_of(ld, e))
            assert np.array_equal(got, np.arange(ds.num_points))


def test_backends_agree_through_open_loader(ds):
    """open_loader(backend='fallback') and FallbackLoader yield the same bytes."""
    kw = dict(batch_points=50_000, shuffle=True, seed=2, device="cpu")
    a = gds_stream.open_loader(ds, backend="fallback", **kw)
    b = FallbackLoader(ds, **kw)
    try:
        assert a.backend == "fallback"
        assert all(batch_bytes_equal(x, y) for x, y in zip(epoch_of(a), epoch_of(b)))
    finally:
        a.close(), b.close()


# -- 5. ownership and zero copy ---------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("scan_mode", [False, True])
def test_kept_batches_stay_correct(ds, ref, shuffle, scan_mode):
    size = {"batch_scans": 2} if scan_mode else {"batch_points": 30_000}
    with loader(ds, shuffle=shuffle, seed=4, prefetch=2, num_threads=2, **size) as ld:
        e0 = epoch_of(ld, 0)
        e1 = epoch_of(ld, 1)
        check_epoch(ld, ref, e0, 0, "epoch 0")  # checked only after both epochs ran
        check_epoch(ld, ref, e1, 1, "epoch 1")


@pytest.mark.parametrize("scan_mode", [False, True])
def test_zero_copy_one_buffer_per_batch(ds, scan_mode):
    size = {"batch_scans": 3} if scan_mode else {"batch_points": 25_000}
    with loader(ds, shuffle=False, **size) as ld:
        batches = epoch_of(ld)
    ptrs = []
    for b in batches:
        storages = {t.untyped_storage().data_ptr() for t in b.values()}
        assert len(storages) == 1, "fields of one batch live in different buffers"
        base = storages.pop()
        nbytes = next(iter(b.values())).untyped_storage().nbytes()
        for k, t in b.items():
            if t.numel():
                assert base <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() \
                    <= base + nbytes, f"{k} is not inside the batch's buffer"
        ptrs.append(base)
    assert len(set(ptrs)) == len(ptrs), "two batches share a buffer"


# -- 7. stopping early ------------------------------------------------------------------------
def _extra_threads(baseline):
    return [t for t in threading.enumerate() if t not in baseline]


def _assert_joined(baseline):
    left = wait_threads(baseline, 5.0)
    assert not left, f"threads left running: {[t.name for t in left]}"


def _opts():
    return dict(batch_points=20_000, prefetch=4, num_threads=2, shuffle=True, seed=1)


def test_stop_by_break(ds):
    baseline = set(threading.enumerate())
    ld = loader(ds, **_opts())

    def consume():
        for i, _ in enumerate(ld):
            if i == 2:
                assert _extra_threads(baseline), "no worker threads while iterating?"
                break

    consume()
    _assert_joined(baseline)
    assert len(epoch_of(ld)) == len(ld)  # the loader still works, epoch 0 from the start
    ld.close()
    _assert_joined(baseline)


def test_stop_by_close(ds):
    baseline = set(threading.enumerate())
    ld = loader(ds, **_opts())
    it = iter(ld)
    next(it), next(it)
    assert _extra_threads(baseline)
    it.close()
    _assert_joined(baseline)
    it.close()  # a second close is harmless
    with pytest.raises(LoaderError, match="closed"):  # not a finished epoch
        next(it)
    assert ld.stats.inflight == 0 and ld.stats.inflight_bytes == 0
    ld.close()
    ld.close()


def test_stop_by_context_manager_exit(ds):
    baseline = set(threading.enumerate())
    with loader(ds, **_opts()) as ld:
        it = iter(ld)
        next(it)
        assert _extra_threads(baseline)
    _assert_joined(baseline)
    with pytest.raises(LoaderError, match="closed by loader.close"):
        next(it)
    with pytest.raises(LoaderError, match="closed"):
        iter(ld)


def test_stop_by_iterator_context_manager(ds):
    baseline = set(threading.enumerate())
    ld = loader(ds, **_opts())
    with iter(ld) as it:
        next(it)
    _assert_joined(baseline)
    ld.close()


def test_del_loader_mid_epoch(ds, ref):
    """``del loader`` while its iterator is held is not a stop: the iterator keeps its loader
    (``for b in open_loader(...)`` relies on it) and finishes the epoch correctly; dropping the
    iterator too stops and joins everything at once, with no gc pass (no reference cycle)."""
    import weakref

    baseline = set(threading.enumerate())
    ld = loader(ds, **_opts())
    plan, fields = ld.epoch_plan(), ld.options.fields
    it = iter(ld)
    got = [next(it)]
    del ld
    got += list(it)  # no silently short epoch
    assert len(got) == len(plan)
    for i, b in enumerate(got):
        assert_batch_equal(b, ref.batch(fields, plan.batch(i)), ds.schema, f"batch {i}")
    del it
    _assert_joined(baseline)

    ld = loader(ds, **_opts())
    it = iter(ld)
    next(it)
    assert _extra_threads(baseline)
    wl, wi = weakref.ref(ld), weakref.ref(it)
    gc.disable()
    try:
        del ld, it
        assert wl() is None and wi() is None, "a reference cycle keeps the loader alive"
        _assert_joined(baseline)
    finally:
        gc.enable()


def test_stop_by_dropping_the_iterator(ds):
    baseline = set(threading.enumerate())
    ld = loader(ds, **_opts())
    next(iter(ld))  # the iterator is garbage at once
    _assert_joined(baseline)
    ld.close()


def test_stop_by_keyboard_interrupt(ds):
    baseline = set(threading.enumerate())
    ld = loader(ds, **_opts())

    def consume():
        for i, _ in enumerate(ld):
            if i == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consume()
    _assert_joined(baseline)
    ld.close()


def test_new_iter_mid_epoch_closes_the_old_one(ds, ref):
    baseline = set(threading.enumerate())
    opts = _opts()
    ld = loader(ds, **opts)
    it1 = iter(ld)
    next(it1), next(it1)
    it2 = iter(ld)
    with pytest.raises(LoaderError, match="superseded by a newer iter"):
        next(it1)
    # the first iterator's threads are gone: at most the new one's pool remains
    first = next(it2)
    deadline = time.monotonic() + 5
    while len(_extra_threads(baseline)) > opts["num_threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_extra_threads(baseline)) <= opts["num_threads"]
    # the new iterator starts the unfinished epoch from its first batch
    assert_batch_equal(first, ref.batch(ld.options.fields, ld.epoch_plan(0).batch(0)),
                       ds.schema, "restart")
    rest = list(it2)
    assert 1 + len(rest) == len(ld)
    _assert_joined(baseline)
    ld.close()


# -- 7. errors --------------------------------------------------------------------------------
class _Injected:
    """Replaces ``fallback.loader.pread_into``: the k-th call raises ``exc``."""

    def __init__(self, k, exc, real):
        self.k, self.exc, self.real = k, exc, real
        self.calls = 0
        self.lock = threading.Lock()
        self.t = None

    def __call__(self, *a, **kw):
        with self.lock:
            self.calls += 1
            fire = self.calls == self.k
        if fire:
            self.t = time.monotonic()
            raise self.exc
        return self.real(*a, **kw)


@pytest.mark.parametrize("k", [1, 4, 17])
@pytest.mark.parametrize("kind", ["oserror", "runtime"])
@pytest.mark.parametrize("consumer_sleep", [0.0, 0.05])
@pytest.mark.parametrize("window", [0, 30_000])
def test_worker_error_reaches_consumer(ds, monkeypatch, k, kind, consumer_sleep, window):
    exc = OSError(errno.EIO, "injected I/O error") if kind == "oserror" \
        else RuntimeError("injected failure")
    inj = _Injected(k, exc, fb_loader.pread_into)
    monkeypatch.setattr(fb_loader, "pread_into", inj)
    baseline = set(threading.enumerate())
    ld = loader(ds, batch_points=10_000, prefetch=3, num_threads=2, fields=["pid", "x"],
                shuffle=True, seed=9, shuffle_window=window)
    it = iter(ld)

    def consume():
        n = 0
        while True:
            try:
                next(it)
            except StopIteration:
                return n, None, None
            except LoaderError as e:
                return n, e, time.monotonic()
            n += 1
            if consumer_sleep:
                time.sleep(consumer_sleep)

    n, err, t_raise = run_with_timeout(consume, 30)
    assert err is not None, f"epoch ended after {n} batches without an error"
    assert n < len(ld), "a silently short epoch would look like this"
    assert inj.t is not None
    assert t_raise - inj.t < 1.0 + 0.25, f"error surfaced {t_raise - inj.t:.2f} s late"
    assert any(e is exc for e in error_chain(err)), "the injected exception is not chained"
    assert err.__cause__ is not None
    _assert_joined(baseline)
    with pytest.raises(LoaderError, match="failed at batch"):  # stays failed, never "finished"
        next(it)
    assert ld.stats.inflight == 0
    ld.close()


class _SlowFirstBatchFailSecond:
    """Replaces ``pread_into``: each read of batch 0 takes ``delay`` s (like a large batch on slow
    storage), the first read of batch 1 fails at once."""

    def __init__(self, real, pbs, batch_points, delay):
        self.real, self.pbs, self.bp, self.delay = real, pbs, batch_points, delay
        self.lock = threading.Lock()
        self.t = None
        self.exc = OSError(errno.EIO, "injected I/O error in batch 1")

    def __call__(self, fd, view, offset, path=""):
        first_point = offset // self.pbs[os.path.basename(str(path))]
        batch = first_point // self.bp
        if batch == 0:
            time.sleep(self.delay)
        elif batch == 1:
            with self.lock:
                fire, self.t = self.t is None, self.t or time.monotonic()
            if fire:
                raise self.exc
        return self.real(fd, view, offset, path)


def test_worker_error_surfaces_while_an_earlier_batch_is_still_reading(ds, monkeypatch):
    """Contract 7: a failure in *any* worker reaches the consumer within a second, also when the
    consumer is blocked on an earlier batch whose reads take longer than that. Batch 0 is four
    reads of 0.5 s each (2 s in all); batch 1's first read fails at once."""
    fields = ["pid", "x", "y", "label"]
    pbs = {f"{f}.bin": ds.schema[f].point_bytes for f in fields}
    inj = _SlowFirstBatchFailSecond(fb_loader.pread_into, pbs, 10_000, 0.5)
    monkeypatch.setattr(fb_loader, "pread_into", inj)
    baseline = set(threading.enumerate())
    ld = loader(ds, batch_points=10_000, prefetch=2, num_threads=2, fields=fields)
    it = iter(ld)

    def first():
        try:
            next(it)
        except LoaderError as e:
            return e, time.monotonic()
        return None, time.monotonic()

    err, t_raise = run_with_timeout(first, 30)
    assert inj.t is not None
    late = t_raise - inj.t
    assert err is not None and late < 1.0 + 0.25, (
        f"the consumer got {'an error' if err else 'batch 0'} {late:.2f} s after batch 1 "
        f"failed; the contract allows a second")
    assert any(e is inj.exc for e in error_chain(err))
    _assert_joined(baseline)
    ld.close()


def test_ctrl_c_while_waiting_for_a_batch(ds, monkeypatch):
    """SIGINT arriving while the consumer blocks in next(): KeyboardInterrupt (not wrapped),
    every thread joined, the iterator closed."""
    import signal

    main = threading.main_thread().ident
    fired = []

    def interrupt():
        if not fired:
            fired.append(1)
            signal.pthread_kill(main, signal.SIGINT)

    fields = ["pid", "x"]
    pbs = {f"{f}.bin": ds.schema[f].point_bytes for f in fields}
    real = fb_loader.pread_into

    def slow_batch0(fd, view, offset, path=""):
        if offset // pbs[os.path.basename(str(path))] < 10_000:  # a read of batch 0
            interrupt()
            time.sleep(0.3)
        return real(fd, view, offset, path)

    monkeypatch.setattr(fb_loader, "pread_into", slow_batch0)
    assert threading.current_thread() is threading.main_thread()
    baseline = set(threading.enumerate())
    ld = loader(ds, batch_points=10_000, prefetch=3, num_threads=2, fields=fields)
    it = iter(ld)
    with pytest.raises(KeyboardInterrupt):
        next(it)
    assert fired
    _assert_joined(baseline)
    with pytest.raises(LoaderError, match="KeyboardInterrupt"):
        next(it)
    ld.close()


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threaded"])
@pytest.mark.parametrize("when", ["before_iter", "mid_epoch"])
def test_truncated_file_is_an_error_naming_it(tmp_path, when, threads):
    d = make_dataset(tmp_path, [70_000, 30_000, 100_000])
    baseline = set(threading.enumerate())
    ld = loader(d, batch_points=16_384, prefetch=2, fields=["pid", "x", "label"],
                num_threads=threads)
    path = d.field_path("x")
    if when == "before_iter":
        os.truncate(path, 4096)
        it = iter(ld)
    else:
        it = iter(ld)
        next(it)
        os.truncate(path, 100_000 * 4)  # the first 100 000 points of x are still there

    def consume():
        n = 0
        try:
            for _ in it:
                n += 1
        except LoaderError as e:
            return n, e
        return n, None

    n, err = run_with_timeout(consume, 30)
    assert err is not None, f"a truncated file gave a silently short epoch of {n} batches"
    assert "x.bin" in str(err), str(err)
    _assert_joined(baseline)
    ld.close()


# -- 8. bounded memory ------------------------------------------------------------------------
def _slab_bytes(specs, n, perm, scans):
    r = lambda b: -(-b // 4096) * 4096  # noqa: E731
    total = sum(r(n * s.point_bytes) for s in specs) + (r(4 * n) if perm else 0) \
        + (r(8 * scans) if scans is not None else 0)
    return max(total, 4096)


@pytest.mark.parametrize("scan_mode", [False, True])
def test_inflight_bounded_with_slow_consumer(ds, scan_mode):
    size = {"batch_scans": 1} if scan_mode else {"batch_points": 25_000}
    prefetch = 3
    ld = loader(ds, prefetch=prefetch, num_threads=2, shuffle=True, seed=3,
                **size, **({} if scan_mode else {"shuffle_window": 0}))
    plan = ld.epoch_plan()
    largest = max(_slab_bytes(ld.specs, plan.batch(i).num_points, not scan_mode,
                              len(plan.batch(i).scan_sizes) if scan_mode else None)
                  for i in range(len(plan)))

    def consume():
        n = 0
        for _ in ld:
            assert ld.stats.inflight <= prefetch
            time.sleep(0.05)
            n += 1
        return n

    n = run_with_timeout(consume, 30)
    st_ = ld.stats.as_dict()
    assert n == len(ld)
    assert 1 <= st_["max_inflight"] <= prefetch
    assert 0 < st_["max_inflight_bytes"] <= prefetch * largest
    assert st_["inflight"] == 0 and st_["inflight_bytes"] == 0
    assert st_["batches"] == n
    assert st_["points"] == ds.num_points
    ld.close()


def test_traced_memory_bounded_with_slow_consumer(tmp_path):
    """Peak traced memory (numpy buffers are traced) stays within (prefetch + 2) batches plus
    1 MiB while the loader streams a dataset more than 20× that bound."""
    batch_points, prefetch = 32_768, 2
    batch_bytes = batch_points * 8  # one int64 field: 256 KiB, a multiple of 4 KiB
    bound = (prefetch + 2) * batch_bytes + (1 << 20)
    n = 21 * bound // 8 + 12_345
    d = make_dataset(tmp_path, [n // 3, n - n // 3], fields=[FieldSpec("pid", np.dtype("<i8"))])
    assert d.nbytes >= 20 * bound
    ld = loader(d, batch_points=batch_points, prefetch=prefetch, num_threads=2)
    seen = []

    def consume():
        for b in ld:
            seen.append((int(b["pid"][0]), len(b["pid"])))
            time.sleep(0.002)

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        consume()  # in this thread: tracemalloc sees every thread anyway
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ld.close()
    assert sum(k for _, k in seen) == n and seen[0] == (0, batch_points)
    assert peak - base <= bound, f"peak {peak - base} bytes > bound {bound}"


# -- 9. resume --------------------------------------------------------------------------------
RESUME_CASES = [
    dict(batch_points=30_000, shuffle=True, seed=5),
    dict(batch_scans=2, shuffle=True, seed=6, drop_last=True),
    dict(batch_points=45_000, shuffle=False, rank=1, world_size=3, fields=["pid", "rgb"]),
]


@pytest.mark.parametrize("opts", RESUME_CASES, ids=["points", "scans", "rank1of3"])
def test_resume_yields_exactly_the_rest(ds, ref, opts):
    epoch = 2
    with loader(ds, **opts) as full:
        whole = epoch_of(full, epoch)
    n = len(whole)
    assert n >= 3
    for k in sorted({0, 1, n // 2, n - 1, n}):
        a = loader(ds, **opts)
        a.set_epoch(epoch)
        it = iter(a)
        for _ in range(k):
            next(it)
        sd = a.state_dict()
        assert sd["epoch"] == epoch and sd["batches_done"] == k
        a.close()
        b = loader(ds, **opts)
        b.load_state_dict(sd)
        rest = run_with_timeout(lambda: list(b))
        if k < n:
            assert len(rest) == n - k
            assert all(batch_bytes_equal(x, y) for x, y in zip(rest, whole[k:]))
            plan = b.epoch_plan(epoch)
            for i, x in enumerate(rest):
                assert_batch_equal(x, ref.batch(b.options.fields, plan.batch(k + i)),
                                   ds.schema, f"k={k} batch {k + i}")
            assert b.epoch == epoch + 1
        else:  # the saved loop had seen the whole epoch: resume at the next one
            check_epoch(b, ref, rest, epoch + 1, f"k={k}")
            assert b.epoch == epoch + 2
        b.close()


def test_resume_state_is_json_and_counts_yielded_not_prefetched(ds):
    import json

    with loader(ds, batch_points=20_000, prefetch=4) as ld:
        it = iter(ld)
        next(it)
        sd = ld.state_dict()
        assert sd["batches_done"] == 1  # 4 more are in flight, but only one was seen
        assert json.loads(json.dumps(sd)) == sd


@pytest.mark.parametrize("change,word", [
    (dict(seed=6), "seed"), (dict(batch_points=30_001), "batch_points"),
    (dict(shuffle=False), "shuffle"), (dict(fields=["pid"]), "fields"),
    (dict(world_size=2, rank=0), "world_size"), (dict(drop_last=True), "drop_last"),
])
def test_resume_with_other_options_is_an_error(ds, change, word):
    opts = dict(batch_points=30_000, shuffle=True, seed=5)
    with loader(ds, **opts) as a:
        it = iter(a)
        next(it)
        sd = a.state_dict()
    with loader(ds, **{**opts, **change}) as b:
        with pytest.raises(LoaderError, match=word):
            b.load_state_dict(sd)


def test_epoch_advances_and_set_epoch_overrides(ds, ref):
    with loader(ds, batch_points=60_000, shuffle=True, seed=8) as ld:
        assert ld.epoch == 0
        e0 = list(ld)
        check_epoch(ld, ref, e0, 0)
        assert ld.epoch == 1
        assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["batches_done"] == 0
        e1 = list(ld)  # without set_epoch: the next epoch
        check_epoch(ld, ref, e1, 1)
        ld.set_epoch(7)
        e7 = list(ld)
        check_epoch(ld, ref, e7, 7)
        assert ld.epoch == 8
        ld.set_epoch(7)  # the same epoch again is the same batches
        assert all(batch_bytes_equal(x, y) for x, y in zip(e7, list(ld)))


# -- options and backend choice ---------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    (dict(batch_points=10, batch_scans=1), "exactly one of batch_points=, batch_scans= or "
                                           "batch_chunks= (got batch_points, batch_scans)"),
    (dict(), "exactly one of batch_points=, batch_scans= or batch_chunks="),
    (dict(batch_points=0), "batch_points must be a positive integer"),
    (dict(batch_points=True), "batch_points must be a positive integer"),
    (dict(batch_scans=-1), "batch_scans must be a positive integer"),
    (dict(batch_points=10, fields=["pid", "bogus"]), "no field(s) 'bogus'"),
    (dict(batch_points=10, fields=[]), "fields= is empty"),
    (dict(batch_points=10, fields=["x", "x"]), "names a field twice"),
    (dict(batch_points=10, rank=2, world_size=2), "rank=2 and world_size=2"),
    (dict(batch_points=10, rank=-1, world_size=2), "rank=-1"),
    (dict(batch_points=10, rank=0, world_size=0), "world_size=0"),
    (dict(batch_points=10, prefetch=0), "prefetch must be an integer >= 1"),
    (dict(batch_points=10, num_threads=-1), "num_threads must be an integer >= 0 (0: read inline"),
    (dict(batch_points=10, device="meta"), "the fallback supports cpu and cuda"),
])
def test_option_errors(ds, kw, words):
    kw.setdefault("device", "cpu")
    with pytest.raises(LoaderError) as ei:
        FallbackLoader(ds, **kw)
    assert words in str(ei.value)


def test_negative_seed_is_an_option_error_or_works(ds):
    """seed=-1 must not pass option checks and then fail inside iter() with numpy's ValueError:
    either the loader refuses it (LoaderError naming seed) or it runs a full epoch."""
    try:
        ld = FallbackLoader(ds, batch_points=100_000, shuffle=True, seed=-1, device="cpu")
    except LoaderError as e:
        assert "seed" in str(e)
        return
    with ld:
        assert len(run_with_timeout(lambda: list(ld))) == len(ld)


def test_iterator_len_counts_down(ds):
    with loader(ds, batch_points=100_000) as ld:
        it = iter(ld)
        assert len(it) == len(ld) == 5
        next(it), next(it)
        assert len(it) == 3
        it.close()


def test_open_loader_backend_choice(ds):
    with pytest.raises(LoaderError, match="backend must be 'auto', 'gds' or 'fallback', "
                                          "got 'bogus'"):
        gds_stream.open_loader(ds, backend="bogus", batch_points=10, device="cpu")
    for backend in ("auto", "fallback"):
        ld = gds_stream.open_loader(ds, backend=backend, batch_points=100_000, device="cpu")
        try:
            assert ld.backend == "fallback" and isinstance(ld, FallbackLoader)
            assert len(list(ld)) == len(ld)
        finally:
            ld.close()
    # a path works as well as an opened Dataset
    with gds_stream.open_loader(str(ds.path), backend="fallback", batch_scans=4,
                                device="cpu") as ld:
        assert sum(len(b["offset"]) for b in ld) == ds.num_scans


def test_len_is_what_every_rank_yields(ds):
    for ws in (1, 2, 3, 4):
        for drop_last in (False, True):
            counts = []
            for r in range(ws):
                with loader(ds, batch_points=70_000, rank=r, world_size=ws,
                            drop_last=drop_last, fields=["label"]) as ld:
                    counts.append((len(ld), sum(1 for _ in ld)))
            assert len({c for pair in counts for c in pair}) == 1, counts


# -- GPU hygiene (CUDA device) ----------------------------------------------------------------
def _cuda_works() -> bool:
    try:
        return torch.cuda.is_available() and torch.zeros(1, device="cuda").item() == 0
    except Exception:  # noqa: BLE001 - a broken driver is "no CUDA" here
        return False


needs_cuda = pytest.mark.skipif(not _cuda_works(), reason="needs a working CUDA device")


@pytest.mark.parametrize("opts", [dict(batch_points=30_000, shuffle=True, seed=2),
                                  dict(batch_scans=3, shuffle=True, seed=4)],
                         ids=["points", "scans"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_batches_equal_cpu_batches(ds, opts):
    with loader(ds, device="cuda", **opts) as g, loader(ds, **opts) as c:
        got = [{k: v.cpu() for k, v in b.items()} for b in g]
        want = list(c)
    assert len(got) == len(want) == len(c)
    assert all(batch_bytes_equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
@needs_cuda
def test_cuda_reads_never_wait_for_the_consumers_queued_work(ds):
    """Long GPU work queued on the consumer's (legacy default) stream: the loader still hands
    out more batches than its ring has slots — each slot's reuse needs its copy's event, so a
    copy that waited for the consumer's stream would stall the loader until the work ends."""
    prefetch, n = 2, 6
    with loader(ds, device="cuda", batch_points=20_000, prefetch=prefetch,
                num_threads=2) as ld:
        next(iter(ld))  # warm up: CUDA context, ring, allocator
        cons = torch.cuda.current_stream()
        torch.cuda._sleep(int(4e9))  # seconds of GPU time on the consumer's stream
        done = torch.cuda.Event()
        done.record(cons)
        it = iter(ld)
        got = [next(it) for _ in range(n)]
        assert not done.query(), "the loader waited for the consumer's queued work"
        torch.cuda.synchronize()  # the test's own wait, before checking the bytes
        plan, ref = ld.epoch_plan(), Reference(ds)
        for i, b in enumerate(got):
            assert_batch_equal({k: v.cpu() for k, v in b.items()},
                               ref.batch(ld.options.fields, plan.batch(i)), ds.schema,
                               f"batch {i}")


@pytest.mark.parametrize("window", [0, 20_000])
def test_a_failure_in_a_later_batch_surfaces_at_the_next_next(ds, monkeypatch, window):
    """The read of a batch (or window) still in flight fails while the consumer holds the first
    one: the very next next() raises, although the batch it would return was read fine."""
    gate = threading.Event()
    real = fb_loader.pread_into
    ld = loader(ds, batch_points=5_000, prefetch=3, num_threads=2, fields=["pid"],
                shuffle=True, shuffle_window=window, seed=1)
    plan = ld.epoch_plan(0)
    first = plan.window(0)[0].segments if window else plan.batch(0).segments
    if not window:  # the second batch is read fine too: only later reads fail
        first = np.concatenate([first, plan.batch(1).segments])
    ok = [(int(a) * 8, int(b) * 8) for a, b in first]  # pid: 8 bytes a point, offset 0

    def pread(fd, view, offset, path):
        if any(a <= offset < b for a, b in ok):
            return real(fd, view, offset, path)
        gate.wait(5)
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(fb_loader, "pread_into", pread)
    it = iter(ld)
    next(it)
    gate.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            f.done() for _, p, _ in it._inflight for f in p.futures):
        time.sleep(0.01)
    time.sleep(0.1)
    with pytest.raises(LoaderError, match="injected"):
        next(it)
    ld.close()
