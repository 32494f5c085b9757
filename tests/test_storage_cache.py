"""The local block cache of object-store reads (issue 19, "Local cache"): exact epochs under a
budget smaller than the dataset, later epochs served locally, processes sharing one directory,
and a process killed mid-fetch leaving nothing half-read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gds_stream
from gds_stream.errors import DatasetError
from gds_stream.storage import cache as cache_mod
from helpers import batch_bytes_equal, make_dataset, run_with_timeout
from s3_fixtures import FaultProxy, Faults, bucket, s3_server, upload  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCANS = [60_000, 140_000, 0, 100_000]  # 300 000 points
BLOCK = 256 << 10
KW = dict(fields=["pid", "x", "rgb"], batch_points=25_000, shuffle=True, seed=7,
          shuffle_window=50_000, num_threads=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cachelocal"), SCANS, seed=5)


@pytest.fixture
def remote(local, bucket):
    url = f"s3://{bucket}/c"
    upload(local.path, url)
    return url


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(cache_mod, "CACHE_BLOCK_BYTES", BLOCK)


def _epochs(source, epochs=2, **kw):
    out = []
    with gds_stream.open_loader(source, backend="fallback", device="cpu", **kw) as ld:
        for e in range(epochs):
            ld.set_epoch(e)
            out.append([{k: v.clone() for k, v in b.items()} for b in ld])
    return out


def _same(a, b):
    assert [len(e) for e in a] == [len(e) for e in b]
    for ea, eb in zip(a, b):
        for i, (x, y) in enumerate(zip(ea, eb)):
            assert batch_bytes_equal(x, y), f"batch {i} differs"


def _cached_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*/*"))


def test_budget_below_two_blocks_is_an_error_at_open(remote, tmp_path, small_blocks):
    with pytest.raises(DatasetError, match=r"cache_bytes=1000 is smaller than 2 cache blocks"):
        gds_stream.open_dataset(remote, cache_dir=tmp_path / "c", cache_bytes=1000)
    with pytest.raises(DatasetError, match="give cache_dir= and cache_bytes= together"):
        gds_stream.open_dataset(remote, cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="apply to object-store URLs only"):
        gds_stream.open_dataset(tmp_path, cache_dir=tmp_path / "c", cache_bytes=1 << 30)


def test_budget_smaller_than_one_batch_is_an_error_at_open(remote, tmp_path, small_blocks):
    ds = gds_stream.open_dataset(remote, cache_dir=tmp_path / "c", cache_bytes=4 * BLOCK)
    with pytest.raises(DatasetError, match=r"cache_bytes=1048576 is smaller than one batch "
                                           r"\(1500000 bytes of fields pid, x, rgb\)"):
        gds_stream.open_loader(ds, backend="fallback", device="cpu",
                               **{**KW, "batch_points": 100_000})
    with gds_stream.open_loader(ds, backend="fallback", device="cpu", **KW) as ld:
        assert len(ld) > 0  # 25 000 points a batch (375 000 bytes) fit


def test_budget_smaller_than_the_dataset_evicts_and_every_epoch_is_exact(
        local, remote, tmp_path, small_blocks):
    want = _epochs(local.path, epochs=3, **KW)
    budget = 4 * BLOCK  # 1 MiB; the three fields hold ~5.7 MB
    ds = gds_stream.open_dataset(remote, cache_dir=tmp_path / "c", cache_bytes=budget)
    got = run_with_timeout(lambda: _epochs(ds, epochs=3, **KW), 120)
    _same(got, want)
    st = ds.cache.stats()
    assert st["evictions"] > 0 and st["misses"] > 0, st
    assert _cached_bytes(tmp_path / "c") <= budget
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_a_warm_cache_serves_later_epochs_without_the_server(local, remote, tmp_path,
                                                             s3_server, small_blocks):
    want = _epochs(local.path, epochs=2, **KW)
    with FaultProxy(s3_server, Faults()) as proxy:
        ds = gds_stream.open_dataset(remote, storage_options={"endpoint": proxy.url,
                                                              "max_retries": 0},
                                     cache_dir=tmp_path / "c", cache_bytes=64 << 20)
        first = _epochs(ds, epochs=1, **KW)
    # the server is unreachable from here on: every read must come from the cache
    later = run_with_timeout(lambda: _epochs(ds, epochs=2, **KW), 60)
    _same(first, want[:1])
    _same(later, want)
    assert ds.cache.stats()["hits"] > 0


def test_a_replaced_object_never_hits_the_old_blocks(tmp_path, bucket, small_blocks):
    a = np.arange(600_000, dtype="<f4").reshape(-1, 3)
    (tmp_path / "a.bin").write_bytes(a.tobytes())
    (tmp_path / "b.bin").write_bytes((-a).tobytes())
    url = f"s3://{bucket}/r"
    c = dict(cache_dir=tmp_path / "c", cache_bytes=64 << 20)
    gds_stream.convert(tmp_path / "a.bin", url, raw_fields=["x", "y", "z"], progress=False)
    assert gds_stream.open_dataset(url, **c).read("x").tobytes() == a[:, 0].copy().tobytes()
    gds_stream.convert(tmp_path / "b.bin", url, raw_fields=["x", "y", "z"], progress=False,
                       overwrite=True)
    assert gds_stream.open_dataset(url, **c).read("x").tobytes() == (-a[:, 0]).tobytes()


def _worker(url, cdir, budget, epochs, out, endpoint=None):
    args = [sys.executable, str(ROOT / "tests" / "_s3_cache_worker.py"), url, str(cdir),
            str(budget), str(BLOCK), str(epochs), str(out)] + ([endpoint] if endpoint else [])
    return subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _expected(local, epochs):
    kw = {**KW, "fields": ["pid", "x"]}
    return [(np.concatenate([b["pid"].numpy() for b in e]),
             np.concatenate([b["x"].numpy() for b in e]))
            for e in _epochs(local.path, epochs, **kw)]


def test_two_processes_share_one_cache_directory(local, remote, tmp_path):
    cdir, budget = tmp_path / "shared", 6 * BLOCK  # below the dataset: both evict
    procs = [_worker(remote, cdir, budget, 2, tmp_path / f"p{k}.npz") for k in range(2)]
    for p in procs:
        try:
            _, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a cache-sharing process hung")
        assert p.returncode == 0, err[-3000:]
    want = _expected(local, 2)
    for k in range(2):
        r = np.load(tmp_path / f"p{k}.npz")
        for e, (pid, x) in enumerate(want):
            assert np.array_equal(r[f"pid{e}"], pid), f"process {k} epoch {e}: points differ"
            assert r[f"x{e}"].tobytes() == x.tobytes(), f"process {k} epoch {e}: bytes differ"
        assert int(r["evictions"]) > 0
    assert _cached_bytes(cdir) <= budget


def test_a_process_killed_mid_fetch_leaves_nothing_half_read(local, remote, tmp_path,
                                                             s3_server):
    cdir = tmp_path / "k"
    faults = Faults(trickle_s=0.05)  # 64 KiB per 50 ms: a 256 KiB block takes 0.2 s
    with FaultProxy(s3_server, faults) as proxy:
        p = _worker(remote, cdir, 64 << 20, 1, tmp_path / "never.npz", proxy.url)
        try:
            deadline = time.monotonic() + 60
            while not any(f.stat().st_size > 0 for f in cdir.glob(".tmp-*")):
                assert p.poll() is None, p.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "no block fetch started"
                time.sleep(0.01)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
    left = list(cdir.glob(".tmp-*"))
    assert left, "expected the killed fetch's temporary file"
    published = list(cdir.glob("*/*"))
    # a new process on the same cache: removes the dead fetch's file, reads exact bytes
    p = _worker(remote, cdir, 64 << 20, 2, tmp_path / "after.npz")
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    assert not list(cdir.glob(".tmp-*")), "the half-fetched block was not removed"
    r = np.load(tmp_path / "after.npz")
    for e, (pid, x) in enumerate(_expected(local, 2)):
        assert np.array_equal(r[f"pid{e}"], pid) and r[f"x{e}"].tobytes() == x.tobytes()
    assert int(r["hits"]) > 0 or not published


class _SlowClient:
    """An object store whose GETs take 0.2 s (every other thread misses the block meanwhile),
    recording each one's range; ``fail_first``: the first GET fails."""

    def __init__(self, data: bytes, fail_first: bool = False):
        import threading

        self.data, self.fail_first = data, fail_first
        self.gets: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def url(self, key):
        return f"s3://b/{key}"

    def get_to_file(self, obj, start, end, f):
        with self.lock:
            self.gets.append((start, end))
            first = len(self.gets) == 1
        time.sleep(0.2)
        if first and self.fail_first:
            raise OSError("connection reset")
        f.write(self.data[start:end])


def _cache_and_object(tmp_path, data):
    from types import SimpleNamespace

    return (cache_mod.BlockCache(tmp_path / "cache", 8 * BLOCK, block_bytes=BLOCK),
            SimpleNamespace(key="o", etag="e1", size=len(data)))


def test_threads_missing_the_same_block_fetch_it_once(tmp_path):
    """Reader threads of one process whose ranges fall in one uncached block: one GET, the
    others wait for it and read the block from the cache (they used to download it each)."""
    import threading

    data = np.random.default_rng(3).integers(0, 256, 3 * BLOCK, dtype=np.uint8).tobytes()
    client = _SlowClient(data)
    cache, obj = _cache_and_object(tmp_path, data)
    reads = [(BLOCK + 1000 * i, 5000) for i in range(6)] + [(0, 100)]  # 6 in block 1, 1 in 0
    outs = [bytearray(n) for _, n in reads]
    threads = [threading.Thread(target=cache.read_into, args=(client, obj, off, memoryview(out)))
               for (off, _), out in zip(reads, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(client.gets) == [(0, BLOCK), (BLOCK, 2 * BLOCK)]
    for (off, n), out in zip(reads, outs):
        assert bytes(out) == data[off:off + n]
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 5
    cache.close()


def test_a_failed_fetch_lets_a_waiting_thread_fetch_the_block_itself(tmp_path):
    import threading

    data = bytes(range(256)) * (BLOCK // 256)
    client = _SlowClient(data, fail_first=True)
    cache, obj = _cache_and_object(tmp_path, data)
    outs, errors = [bytearray(64) for _ in range(2)], []

    def read(out):
        try:
            cache.read_into(client, obj, 10, memoryview(out))
        except DatasetError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=read, args=(o,)) for o in outs]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    assert len(client.gets) == 2 and len(errors) == 1 and "connection reset" in str(errors[0])
    assert sum(bytes(o) == data[10:74] for o in outs) == 1
    cache.close()


@pytest.mark.parametrize("damage", ["flipped", "cut short", "empty"])
def test_a_damaged_cache_block_is_fetched_again(local, remote, tmp_path, small_blocks, damage,
                                                caplog):
    """A block damaged on disk was served as it was (flipped bytes: wrong batches in every
    later epoch and loader; a cut one: every loader failed until the directory was removed by
    hand). Each block ends with its crc32, checked once per process: a damaged one is a miss."""
    want = _epochs(local.path, epochs=1, **KW)
    c = dict(cache_dir=tmp_path / "c", cache_bytes=64 << 20)
    _same(_epochs(remote, epochs=1, **c, **KW), want)
    blocks = sorted((tmp_path / "c").glob("*/*"))
    assert [b.stat().st_size for b in blocks if b.name == "00000000"] == \
        [BLOCK + 4] * len({b.parent for b in blocks})  # a whole first block and its crc32
    victim = blocks[0]
    data = bytearray(victim.read_bytes())
    size = len(data)
    if damage == "flipped":
        data[100:108] = bytes(b ^ 0xFF for b in data[100:108])  # same size
    else:
        data = data[:len(data) // 2] if damage == "cut short" else bytearray()
    victim.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="gds_stream"):
        for _ in range(2):  # a fresh process's view each time: new loaders, new datasets
            _same(_epochs(remote, epochs=1, **c, **KW), want)
    assert "fetching it again" in caplog.text and str(victim) in caplog.text
    assert victim.stat().st_size == size  # fetched again whole


def test_close_releases_the_cache_directory_lock_file(remote, tmp_path, small_blocks):
    def cache_fds():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "c")):
                    out.append(fd)
            except OSError:
                pass
        return out

    ld = gds_stream.open_loader(remote, backend="fallback", device="cpu",
                                cache_dir=tmp_path / "c", cache_bytes=64 << 20, **KW)
    next(iter(ld))
    assert cache_fds()
    ld.close()
    assert cache_fds() == []  # the loader is still referenced: nothing waits for the GC
    ds = gds_stream.open_dataset(remote, cache_dir=tmp_path / "c", cache_bytes=64 << 20)
    with gds_stream.open_loader(ds, backend="fallback", device="cpu", **KW) as ld:
        ds.close()  # the loader still reads through the dataset's cache
        assert sum(len(b["pid"]) for b in ld) == sum(SCANS)
    assert cache_fds() == []


def test_a_full_cache_disk_fails_at_once_naming_the_cache(remote, tmp_path, small_blocks,
                                                          monkeypatch):
    """No space for a cache block is the local disk's fault: it was retried as a network
    fault (9 downloads of one block, 12 s) and blamed the object."""
    import builtins
    import errno

    from gds_stream.storage import s3 as s3_mod

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(cache_mod, "open", lambda *a, **k: Full(builtins.open(*a, **k)),
                        raising=False)
    gets = []
    real = s3_mod.S3Client.get_to_file
    monkeypatch.setattr(s3_mod.S3Client, "get_to_file",
                        lambda self, *a: (gets.append(a[1]), real(self, *a))[1])
    t0 = time.monotonic()
    with pytest.raises(gds_stream.LoaderError,
                       match=rf"{tmp_path / 'c'}: cannot write a cache block for s3://.*"
                             rf"\(No space left on device\)"):
        _epochs(remote, epochs=1, cache_dir=tmp_path / "c", cache_bytes=64 << 20, **KW)
    assert time.monotonic() - t0 < 30
    assert len(gets) <= 4  # one GET per block being fetched (two reader threads), no retries


def test_a_fetch_of_a_process_we_cannot_see_is_never_removed(tmp_path):
    """A process in another PID namespace (another container on one cache volume) has a pid
    that means nothing here: its fetch's temporary file is kept while it holds the file's
    lock, and removed once the lock is free (the process gone)."""
    import fcntl

    cdir = tmp_path / "c"
    cdir.mkdir()
    with open("/proc/sys/kernel/pid_max") as f:
        ghost = int(f.read())  # pids run below pid_max: no process here has this one
    live, dead = cdir / f".tmp-{ghost}-aaaa", cdir / f".tmp-{ghost}-bbbb"
    live.write_bytes(b"x" * 100)
    dead.write_bytes(b"y" * 100)
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as the other process's fetch holds it
        cache = cache_mod.BlockCache(cdir, 64 << 20)
        try:
            assert live.exists(), "a fetch in progress was removed"
            assert not dead.exists(), "a fetch nobody makes any more was kept"
        finally:
            cache.close()


@pytest.mark.parametrize("budget, ok", [(2.5e9, True), (np.int64(1 << 30), True),
                                        ("8G", False), (1.5e8 + 0.5, False), (True, False)])
def test_cache_bytes_takes_whole_numbers_however_written(tmp_path, budget, ok):
    if ok:
        cache = cache_mod.BlockCache(tmp_path / "c", budget)
        assert cache.budget == int(budget)
        cache.close()
    else:
        with pytest.raises(DatasetError, match=r"cache_bytes=.* is not a number of bytes"):
            cache_mod.BlockCache(tmp_path / "c", budget)
