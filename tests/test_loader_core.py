"""Loader-core behaviour: object lifetimes, device-aware defaults, descriptors, files that change
after open, read verification and host memory."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

from gds_stream.backends import open_loader
from gds_stream.errors import DatasetError, LoaderError
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset
from gds_stream.integrity import BlockVerifier
from helpers import fds_under, make_dataset


def _tiny(tmp_path, n=10_000):
    path = tmp_path / "tiny"
    with DatasetWriter(path, [FieldSpec("pid", np.dtype("<i8"))]) as w:
        w.append({"pid": np.arange(n, dtype=np.int64)})
        w.end_scan("gen")
    return path


def test_unnamed_loader_runs_a_full_epoch(tmp_path):
    # The loader object is referenced by nothing but its iterator.
    got = np.concatenate([b["pid"].numpy()
                          for b in open_loader(_tiny(tmp_path), backend="fallback",
                                               device="cpu", batch_points=999)])
    assert np.array_equal(got, np.arange(10_000))


def test_abandoned_iterator_of_unnamed_loader_joins_its_threads(tmp_path):
    base = set(threading.enumerate())
    it = iter(open_loader(_tiny(tmp_path), backend="fallback", device="cpu", batch_points=100,
                          num_threads=2))
    next(it)
    assert set(threading.enumerate()) - base  # workers run
    del it
    gc.collect()
    assert not set(threading.enumerate()) - base


# -- device-aware defaults ----------------------------------------------------------------------
def test_cpu_defaults_leave_torchs_cores_to_torch(tmp_path, monkeypatch):
    import torch

    from gds_stream import options

    path = _tiny(tmp_path)
    for cores, torch_threads, want in ((8, 6, 2), (2, 2, 0), (4, 1, 3), (64, 4, 16), (4, 8, 0)):
        monkeypatch.setattr(options, "_cores", lambda c=cores: c)
        monkeypatch.setattr(torch, "get_num_threads", lambda t=torch_threads: t)
        with open_loader(path, backend="fallback", device="cpu", batch_points=999) as ld:
            got = (ld.options.num_threads, ld.options.prefetch)
            assert got == (want, 2), (cores, torch_threads)
            assert ld.inline_reads == (want == 0)
            assert ("inline" in ld.backend_reason) == (want == 0), ld.backend_reason
    with open_loader(path, backend="fallback", device="cpu", batch_points=999, num_threads=5,
                     prefetch=7) as ld:  # explicit values are respected
        assert (ld.options.num_threads, ld.options.prefetch) == (5, 7)
    monkeypatch.setattr(options, "_cores", lambda: 8)
    assert options.default_num_threads("cuda") == 8 and options.default_prefetch("cuda") == 4
    monkeypatch.setattr(options, "_cores", lambda: 1)
    assert options.default_num_threads("cuda") == 2


# -- file descriptors -----------------------------------------------------------------------------
def _fds(root) -> int:
    return fds_under(root)


def test_loaders_release_the_descriptors_they_opened(tmp_path):
    path = _tiny(tmp_path)
    gc.collect()
    base = _fds(tmp_path)
    for _ in range(50):  # built from a path: the loader opened the dataset and closes it
        with open_loader(path, backend="fallback", device="cpu", batch_points=999) as ld:
            next(iter(ld))
    assert _fds(tmp_path) == base
    ds = open_dataset(path)
    ds.read("pid", 0, 10)  # the Dataset's own descriptor, which stays the Dataset's
    mid = _fds(tmp_path)
    for _ in range(50):  # given a Dataset: the loader closes its own descriptors only
        ld = open_loader(ds, backend="fallback", device="cpu", batch_points=999,
                         verify_reads=True)
        next(iter(ld))
        ld.close()
    assert _fds(tmp_path) == mid
    assert np.array_equal(ds.read("pid", 0, 10), np.arange(10))  # the Dataset still works
    ds.close()
    assert _fds(tmp_path) == base
    for bad in ({"batch_points": 0}, {"bach_points": 9}, {"batch_scans": 9, "drop_last": True}):
        for _ in range(10):  # a refused configuration leaves nothing open
            with pytest.raises(LoaderError):
                open_loader(path, backend="fallback", device="cpu", **bad)
    gc.collect()
    assert _fds(tmp_path) == base
    for _ in range(20):  # dropped without close(): collected at once (no cycle), fds released
        it = iter(open_loader(path, backend="fallback", device="cpu", batch_points=999))
        next(it)
        del it
    assert _fds(tmp_path) == base


# -- files removed, replaced or cut after open ----------------------------------------------------
def test_field_file_removed_before_the_loader_is_built(tmp_path):
    path = _tiny(tmp_path)  # the loader duplicates the dataset's descriptors: its snapshot
    ds = open_dataset(path)
    os.remove(ds.field_path("pid"))
    with open_loader(ds, backend="fallback", device="cpu", batch_points=999) as ld:
        assert np.array_equal(np.concatenate([b["pid"].numpy() for b in ld]), np.arange(10_000))
    ds.close()


def test_field_file_replaced_by_a_shorter_one_before_the_loader_is_built(tmp_path):
    path = _tiny(tmp_path)
    ds = open_dataset(path)
    f = ds.field_path("pid")
    tmp = f.with_suffix(".new")
    tmp.write_bytes(b"\0" * 4096)
    os.replace(tmp, f)
    with open_loader(ds, backend="fallback", device="cpu", batch_points=999) as ld:
        assert np.array_equal(np.concatenate([b["pid"].numpy() for b in ld]), np.arange(10_000))
    os.truncate(f"/proc/self/fd/{ds.fileno('pid')}", 4096)  # cut in place: the snapshot too
    with pytest.raises(DatasetError, match=r"pid\.bin: file holds 4096 bytes.*changed since"):
        open_loader(ds, backend="fallback", device="cpu", batch_points=999)
    ds.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_files_removed_or_replaced_after_the_loader_is_built_keep_reading(tmp_path, how):
    """The loader's descriptors keep the files it validated: a whole, correct epoch."""
    path = _tiny(tmp_path)
    with open_loader(path, backend="fallback", device="cpu", batch_points=999,
                     verify_reads=True) as ld:
        f = ld.dataset.field_path("pid")
        if how == "removed":
            os.remove(f)
        else:
            tmp = f.with_suffix(".new")
            tmp.write_bytes(b"\xff" * f.stat().st_size)
            os.replace(tmp, f)
        got = np.concatenate([b["pid"].numpy() for b in ld])
    assert np.array_equal(got, np.arange(10_000))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_field_file(tmp_path):  # pragma: no cover - CI runs as root
    path = _tiny(tmp_path)
    os.chmod(path / "pid.bin", 0)
    with pytest.raises(DatasetError, match="cannot open the file of field 'pid'"):
        open_loader(path, backend="fallback", device="cpu", batch_points=999)


# -- verify_reads ---------------------------------------------------------------------------------
def _flip(path, offset):
    """Flip a byte as bit rot on the disk would: the file's mtime stays (a write through the
    filesystem would change it, which loaders report as a file written in place)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_reads_finds_a_flipped_byte(tmp_path):
    ds = make_dataset(tmp_path, [30_000, 20_000], block_bytes=64 << 10)
    x = ds.layout("x")
    _flip(ds.field_path("x"), x.offset + 3 * (64 << 10) + 100)  # x block 3: points 49152..
    with open_loader(ds, backend="fallback", device="cpu", batch_points=7_000) as ld:
        assert len(list(ld)) == len(ld)  # without verification the corruption passes
    with open_loader(ds, backend="fallback", device="cpu", batch_points=7_000,
                     verify_reads=True) as ld:
        assert ld.verifier is not None
        it = iter(ld)
        with pytest.raises(LoaderError) as ei:
            for _ in it:
                pass
        assert ld.stats.batches < len(ld)
    cause = ei.value.__cause__
    assert isinstance(cause, DatasetError)
    msg = str(cause)
    assert "x.bin" in msg and "field 'x'" in msg and "block 3 " in msg
    assert f"field bytes {3 * (64 << 10)}..200000" in msg and "expected 0x" in msg  # clipped


def test_block_verifier_blocks_clip_and_threads(tmp_path):
    ds = make_dataset(tmp_path, [10_000], fields=[FieldSpec("pid", np.dtype("<i8"))],
                      block_bytes=16 << 10)  # 2048 points a block, 5 blocks, the last short
    v = BlockVerifier(ds, [ds.schema["pid"]])
    seg = np.array([[0, 1], [2047, 2049], [9_000, 10_000], [5, 5]], dtype=np.int64)
    assert v.blocks(seg, 8).tolist() == [0, 1, 4]
    assert v.blocks(np.zeros((0, 2), np.int64), 8).tolist() == []
    errors = []

    def work():
        try:
            for _ in range(20):
                v.check(np.array([[0, 10_000]], dtype=np.int64))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, name=f"test-verify-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and v.stats()["blocks_checked"] == 4 * 20 * 5
    _flip(ds.field_path("pid"), ds.layout("pid").offset + 80_000 - 1)  # the last byte
    with pytest.raises(DatasetError, match=r"block 4 \(field bytes 65536\.\.80000"):
        v.check(np.array([[9_999, 10_000]], dtype=np.int64))
    v.check(np.array([[0, 8_000]], dtype=np.int64))  # blocks 0-3 are intact
    v.close()


def test_verify_reads_is_not_part_of_the_resume_identity(tmp_path):
    path = _tiny(tmp_path)
    with open_loader(path, backend="fallback", device="cpu", batch_points=999,
                     verify_reads=True) as a:
        it = iter(a)
        next(it), next(it)
        sd = a.state_dict()
    assert sd["config"]["verify_reads"] is True
    with open_loader(path, backend="fallback", device="cpu", batch_points=999) as b:
        b.load_state_dict(sd)
        got = np.concatenate([x["pid"].numpy() for x in b])
    assert np.array_equal(got, np.arange(2 * 999, 10_000))


# -- host memory ----------------------------------------------------------------------------------
def test_in_place_permutation_is_the_plans(tmp_path):
    from fallback.hostmem import permutation_into
    from gds_stream.plan import BatchPlan

    for n in (0, 1, 7, 4096, (1 << 20) + 3):
        for key in ((0, 0, 0, 1), (5, 99, 12345, 0x9E3779B9)):
            b = BatchPlan(0, 0, np.array([[0, n]], dtype=np.int64), None, key)
            out = np.empty(n, dtype=np.int32)
            assert permutation_into(b, out)
            assert np.array_equal(out, b.permutation())
    plain = BatchPlan(0, 0, np.array([[0, 5]], dtype=np.int64), None, None)
    assert not permutation_into(plain, np.empty(5, np.int32))


def _peak_rss(tmp_path, window: int) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    fields = [FieldSpec("pid", np.dtype("<i8")), FieldSpec("x", np.dtype("<f4")),
              FieldSpec("y", np.dtype("<f8")), FieldSpec("label", np.dtype("<u2"))]
    ds = make_dataset(tmp_path, [3_000_000, 3_000_000], fields=fields)
    worker = Path(__file__).with_name("_mem_worker.py")
    r = subprocess.run([sys.executable, str(worker), str(ds.path), "1000000", "2", "shuffle",
                        "2", str(window)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    m["growth"] = (m["peak_kib"] - m["base_kib"]) * 1024
    assert m["batches"] == 12
    return m


def test_peak_rss_with_shuffle_stays_near_prefetch_plus_two_batches(tmp_path):
    """In a fresh process: shuffled epochs (within-batch shuffle, no window) at prefetch=2 grow
    the peak RSS by about 2 slabs + the batch being gathered + the one the loop holds (~4.7
    batches measured); 6 batches is the bound (copies kept alive, or heap retention, measured
    6-10)."""
    m = _peak_rss(tmp_path, 0)
    assert m["growth"] <= 6 * m["batch_bytes"], \
        f"peak RSS grew {m['growth'] / 2**20:.0f} MiB = {m['growth'] / m['batch_bytes']:.1f} batches"


def test_peak_rss_with_a_shuffle_window(tmp_path):
    """With a shuffle window: the window being consumed (packed into rows of 32 bytes for these
    22 bytes a point) and the next one being read, each with its int32 permutation, plus the
    batch being gathered and the one the loop holds; the bound adds two batches of slack
    (measured: 191 MiB of this 221 MiB bound; 154 MiB before windows were packed)."""
    window = 2_000_000
    m = _peak_rss(tmp_path, window)
    point_bytes = m["window_bytes"] // window
    row_bytes = next((w for w in (1, 2, 4, 8, 16) if point_bytes <= w), -(-point_bytes // 16) * 16)
    bound = 2 * window * (row_bytes + 4) + 4 * m["batch_bytes"]
    assert m["growth"] <= bound, \
        f"peak RSS grew {m['growth'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


def test_host_buffers_are_reused_only_after_every_view_died():
    import torch

    from gds_stream import _hostmem

    a = _hostmem.anon_buffer(3 << 20)
    a[:] = 7
    t = torch.from_numpy(a)[10:20]  # a view keeps the buffer
    addr_a = a.ctypes.data
    del a
    gc.collect()
    b = _hostmem.anon_buffer(3 << 20)
    addr_b = b.ctypes.data
    assert addr_b != addr_a and int(t[0]) == 7  # not recycled while the view lives
    del t, b
    gc.collect()
    c = _hostmem.anon_buffer(3 << 20)  # recycled: one of the two, now free
    assert c.ctypes.data in (addr_a, addr_b)
    assert _hostmem.pooled_bytes() <= _hostmem.POOL_BUFFERS * (3 << 20)


def test_host_buffer_pool_hands_back_the_buffer_that_died_last():
    from gds_stream import _hostmem

    _hostmem.drain()
    bufs = [_hostmem.anon_buffer(5 << 20) for _ in range(3)]
    addrs = [b.ctypes.data for b in bufs]
    for i in (2, 0, 1):  # the batches die in this order
        bufs[i] = None
    gc.collect()
    got = [_hostmem.anon_buffer(5 << 20) for _ in range(3)]
    assert [g.ctypes.data for g in got] == [addrs[1], addrs[0], addrs[2]]


def test_host_buffer_pool_is_bounded_in_bytes_and_safe_inside_a_collection():
    from gds_stream import _hostmem

    bufs = [_hostmem.anon_buffer(100 << 20) for _ in range(4)]  # untouched: no RSS
    del bufs
    gc.collect()
    assert _hostmem.pooled_bytes() <= _hostmem.POOL_BYTES
    # a buffer whose last reference is a cycle, collected while the pool's lock is held (the
    # finalizer then runs inside the lock): it must not deadlock
    a = _hostmem.anon_buffer(1 << 20)
    holder = [a]
    holder.append(holder)
    del a, holder
    with _hostmem._lock:
        gc.collect()
    assert _hostmem.pooled_bytes() >= 1 << 20


def test_the_first_abandoned_loader_of_a_process_closes_at_once(tmp_path):
    # torch's first import leaves a reference cycle through frames (torch.fx keeps
    # inspect.currentframe() in a local) whose f_back chain held the loader being built, so its
    # descriptors stayed open until the cyclic collector ran. A fresh process, the collector off.
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import gc, os, sys
        gc.disable()
        sys.path.insert(0, sys.argv[1])
        import gds_stream
        assert "torch" not in sys.modules
        def fds():
            return len(os.listdir("/proc/self/fd"))
        def epoch_start(path):
            it = iter(gds_stream.open_loader(path, batch_points=100, shuffle=True, seed=1))
            return next(it)["pid"].numel()
        for kw in ({}, {}):
            base = fds()
            assert epoch_start(sys.argv[2]) == 100
            print(fds() - base)
    """)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", script, str(root), str(_tiny(tmp_path))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "0"], (r.stdout, r.stderr[-1000:])
