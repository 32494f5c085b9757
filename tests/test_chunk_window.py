"""Loaders over spatial chunks (``batch_chunks``, ``max_batch_points``) and shuffle windows
(``shuffle_window``), on the CPU fallback, against the plan and the dataset: the contract
(exactly once, equal steps, determinism, ownership, resume) and the options' errors. The GPU-direct
backend is compared with the fallback bit for bit in ``tests/test_gds.py``."""

from __future__ import annotations

import importlib
import threading

import numpy as np
import pytest

from gds_stream import open_loader
from gds_stream.errors import LoaderError
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset
from helpers import Reference, make_dataset, wait_threads

chunks = importlib.import_module("gds_stream.convert.chunks")

SPECS = [FieldSpec("x", np.dtype("<f4")), FieldSpec("y", np.dtype("<f4")),
         FieldSpec("z", np.dtype("<f8")), FieldSpec("pid", np.dtype("<i8")),
         FieldSpec("rgb", np.dtype("u1"), 3)]


@pytest.fixture(scope="module")
def cds(tmp_path_factory):
    """Three scans (one empty) in chunks of 10 × 10 units over a 60 × 40 area."""
    root = tmp_path_factory.mktemp("chunked")
    rng = np.random.default_rng(11)
    start = 0
    with DatasetWriter(root / "ds", SPECS, chunk_size=10.0) as w:
        for s, n in enumerate([20_000, 0, 13_001]):
            cols = {"x": (rng.random(n) * 60).astype(np.float32),
                    "y": (rng.random(n) * 40).astype(np.float32), "z": rng.random(n),
                    "pid": np.arange(start, start + n, dtype=np.int64),
                    "rgb": rng.integers(0, 255, (n, 3)).astype(np.uint8)}
            with chunks.ScanChunker(SPECS, 10.0, 2, root, f"s{s}") as ch:
                ch.append(cols)
                ch.write_to(w)
            w.end_scan(f"s{s}")
            start += n
    return open_dataset(root / "ds")


def _epoch(ld, epoch=0):
    ld.set_epoch(epoch)
    return list(ld)


def _chunk_of(ds):
    return np.repeat(np.arange(ds.num_chunks), np.diff(ds.chunk_offsets))


# -- chunk batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_chunk_batches_are_whole_chunks_in_stored_order(cds, shuffle):
    ref = Reference(cds)
    offs = cds.chunk_offsets
    with open_loader(cds, backend="fallback", device="cpu", batch_chunks=5, shuffle=shuffle,
                     seed=3) as ld:
        batches = _epoch(ld)  # kept: ownership
        assert len(batches) == len(ld) == -(-cds.num_chunks // 5)
        seen = []
        for b in batches:
            ids = b["chunk"].numpy()
            assert b["chunk"].dtype.is_floating_point is False and len(ids) <= 5
            sizes = offs[ids + 1] - offs[ids]
            assert np.array_equal(b["offset"].numpy(), np.cumsum(sizes))
            want = np.concatenate([np.arange(offs[c], offs[c + 1]) for c in ids])
            assert np.array_equal(b["pid"].numpy(), ref.field("pid")[want])
            assert np.array_equal(b["rgb"].numpy(), ref.field("rgb")[want])
            assert np.array_equal(b["x"].numpy().view(np.uint32),
                                  ref.field("x")[want].view(np.uint32))
            seen += ids.tolist()
        assert sorted(seen) == list(range(cds.num_chunks))
        assert (seen == sorted(seen)) != shuffle
        if shuffle:
            again = [c for b in _epoch(ld, 1) for c in b["chunk"].tolist()]
            assert again != seen


def test_chunk_batches_across_ranks_and_packing(cds):
    offs = cds.chunk_offsets
    for mbp in (None, 1_500):
        lds = [open_loader(cds, backend="fallback", device="cpu", batch_chunks=4,
                           max_batch_points=mbp, shuffle=True, seed=1, rank=r, world_size=3)
               for r in range(3)]
        for epoch in (0, 1):
            for ld in lds:
                ld.set_epoch(epoch)
            steps = [len(ld) for ld in lds]  # this epoch's count (packing depends on it)
            per_rank = [[b["chunk"].numpy() for b in _epoch(ld, epoch)] for ld in lds]
            assert len({len(p) for p in per_rank}) == 1, "ranks must have equal steps"
            assert [len(p) for p in per_rank] == steps
            ids = np.concatenate([i for p in per_rank for i in p])
            assert sorted(ids.tolist()) == list(range(cds.num_chunks))
            if mbp is not None:
                for p in per_rank:
                    for i in p:
                        assert len(i) <= 4
                        assert len(i) <= 1 or (offs[i + 1] - offs[i]).sum() <= mbp
        for ld in lds:
            ld.close()


def test_chunk_resume_mid_epoch(cds):
    kw = dict(backend="fallback", device="cpu", batch_chunks=3, shuffle=True, seed=4)
    with open_loader(cds, **kw) as ld:
        ld.set_epoch(2)
        full = [b["chunk"].tolist() for b in ld]
    with open_loader(cds, **kw) as ld:
        ld.set_epoch(2)
        it = iter(ld)
        for _ in range(5):
            next(it)
        state = ld.state_dict()
        it.close()
    with open_loader(cds, **kw) as ld2:
        ld2.load_state_dict(state)
        rest = [b["chunk"].tolist() for b in ld2]
    assert rest == full[5:]


def test_batch_chunks_needs_a_chunked_dataset(tmp_path):
    ds = make_dataset(tmp_path, [1000])
    with pytest.raises(LoaderError, match="no chunks; convert the inputs with .*--chunk-size"):
        open_loader(ds, backend="fallback", device="cpu", batch_chunks=2)


@pytest.mark.parametrize("kw, message", [
    (dict(batch_points=10, max_batch_points=5), "goes with batch_scans= or batch_chunks="),
    (dict(batch_scans=1, shuffle_window=100), "goes with\nbatch_points="),
    (dict(batch_points=10, shuffle_window=-1), "shuffle_window must be an integer >= 0"),
    (dict(batch_points=10, shuffle_window=1.5), "shuffle_window must be an integer"),
    (dict(batch_scans=1, max_batch_points=0), "max_batch_points must be a positive integer"),
    (dict(batch_chunks=2, batch_scans=1), "exactly one of"),
])
def test_chunk_and_window_option_errors(tmp_path, kw, message):
    ds = make_dataset(tmp_path, [1000, 200])
    with pytest.raises(LoaderError) as e:
        open_loader(ds, backend="fallback", device="cpu", **kw)
    assert message.replace("\n", " ") in str(e.value)


# -- shuffle windows --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("window"), [50_000, 0, 33_333, 7])


@pytest.mark.parametrize("window", [1, 9_000, 25_000, 1 << 22])
@pytest.mark.parametrize("world_size", [1, 2])
def test_window_epochs_match_the_plan_exactly_once(wds, window, world_size):
    ref = Reference(wds)
    got = []
    for rank in range(world_size):
        with open_loader(wds, backend="fallback", device="cpu", batch_points=4_000,
                         shuffle=True, seed=8, shuffle_window=window, rank=rank,
                         world_size=world_size) as ld:
            assert ld.options.shuffle_window == window
            plan = ld.epoch_plan(1)
            batches = _epoch(ld, 1)  # kept: ownership
            assert len(batches) == len(ld) == plan.num_batches
            for i, b in enumerate(batches):
                want = ref.batch(["pid", "x", "rgb"], plan.batch(i))
                assert np.array_equal(b["pid"].numpy(), want["pid"])
                assert np.array_equal(b["rgb"].numpy(), want["rgb"])
                assert b["x"].numpy().tobytes() == want["x"].tobytes()
                got.append(b["pid"].numpy())
            # the window being consumed and the one read ahead
            assert ld.stats.max_inflight <= 2 and ld.stats.inflight == 0
            assert ld.stats.points == sum(len(b["pid"]) for b in batches)
    allp = np.concatenate(got)
    assert np.array_equal(np.sort(allp), np.arange(wds.num_points))


def test_window_is_the_default_shuffle_and_mixes_across_epochs(wds):
    with open_loader(wds, backend="fallback", device="cpu", batch_points=1_000,
                     shuffle=True, seed=2) as ld:
        assert ld.options.shuffle_window > 0
        e0 = [set(b["pid"].tolist()) for b in _epoch(ld, 0)]
        e1 = [set(b["pid"].tolist()) for b in _epoch(ld, 1)]
    # a batch of epoch 1 shares few points with any one batch of epoch 0
    best = max(max(len(a & b) for b in e0) for a in e1)
    assert best < 100


def test_window_resume_mid_window(wds):
    kw = dict(backend="fallback", device="cpu", batch_points=3_000, shuffle=True, seed=5,
              shuffle_window=10_000)
    with open_loader(wds, **kw) as ld:
        full = [b["pid"].numpy() for b in _epoch(ld, 3)]
    with open_loader(wds, **kw) as ld:
        ld.set_epoch(3)
        it = iter(ld)
        for _ in range(4):  # 4 batches: inside the second window
            next(it)
        state = ld.state_dict()
        it.close()
    with open_loader(wds, **kw) as ld2:
        ld2.load_state_dict(state)
        rest = [b["pid"].numpy() for b in ld2]
    assert len(rest) == len(full) - 4
    assert all(np.array_equal(a, b) for a, b in zip(rest, full[4:]))


def test_window_early_stop_joins_threads(wds):
    base = set(threading.enumerate())
    ld = open_loader(wds, backend="fallback", device="cpu", batch_points=2_000, shuffle=True,
                     shuffle_window=20_000, num_threads=2)
    for i, _ in enumerate(ld):
        if i == 6:
            break
    ld.close()
    assert not wait_threads(base)
    assert ld.stats.inflight == 0 and ld.stats.inflight_bytes == 0


# -- grouped gathers --------------------------------------------------------------------------
def test_gather_field_rows_groups_equally_spaced_fields_bit_for_bit():
    import torch

    from gds_stream.slab import gather_field_rows

    n, rng = 1000, np.random.default_rng(0)
    slab = torch.from_numpy(rng.integers(0, 256, 64 * 1024, dtype=np.uint8))
    # three 4-byte fields 8 KiB apart (one group), a 2-byte and a 3-byte field, and a 4-byte
    # field elsewhere at another spacing (gathered alone)
    views = [slab[0:4000].view(n, 4), slab[8192:12192].view(n, 4), slab[16384:20384].view(n, 4),
             slab[24576:26576].view(n, 2), slab[28672:31672].view(n, 3),
             slab[40000:44000].view(n, 4)]
    idx = torch.from_numpy(rng.permutation(n)[:700].astype(np.int32))
    got = gather_field_rows(views, idx)
    for v, g in zip(views, got):
        assert torch.equal(g, v.index_select(0, idx))
    assert got[0].untyped_storage().data_ptr() == got[1].untyped_storage().data_ptr()


def test_gather_field_rows_leaves_uneven_or_separate_fields_alone():
    import torch

    from gds_stream.slab import _even_runs

    def runs(*views):
        return _even_runs(list(views), list(range(len(views))))

    a = torch.zeros(100, dtype=torch.uint8)
    b = torch.zeros(100, dtype=torch.uint8)
    assert runs(a.view(25, 4), b.view(25, 4)) in ([[0], [1]], [[1], [0]])  # two buffers
    s = torch.zeros(1000, dtype=torch.uint8)
    assert runs(s[0:100].view(25, 4), s[100:200].view(25, 4)) == [[0, 1]]
    assert runs(s[0:100].view(25, 4), s[50:150].view(25, 4)) == [[0], [1]]  # overlap
    assert runs(s[0:100].view(25, 4), s[200:300].view(25, 4),
                s[300:400].view(25, 4)) == [[0, 1], [2]]  # uneven: the first two together


# -- a window too small to mix ----------------------------------------------------------------
@pytest.mark.parametrize("window, batch, warned", [
    (32_768, 1_000, "no larger than a shuffle block"),     # one block: 262,144 points of x
    (300_000, 400_000, "no larger than a batch (batch_points=400000)"),
    (1 << 22, 100_000, None),                               # the default mixes
    (0, 1_000, None),                                       # explicitly off: the user's choice
    (2_000_000, 1_000, None),                               # the window holds the whole share
])
def test_a_window_too_small_to_mix_is_warned_about(tmp_path, caplog, window, batch, warned):
    import logging

    path = tmp_path / "ds"
    with DatasetWriter(path, [FieldSpec("x", np.dtype("<f4"))]) as w:
        w.append({"x": np.zeros(1_200_000, np.float32)})
        w.end_scan("gen")
    with caplog.at_level(logging.WARNING):
        open_loader(path, backend="fallback", device="cpu", batch_points=batch, shuffle=True,
                    shuffle_window=window).close()
    msgs = [r.getMessage() for r in caplog.records if "shuffle_window" in r.getMessage()]
    if warned is None:
        assert not msgs
    else:
        assert len(msgs) == 1 and warned in msgs[0] and f"shuffle_window={window}" in msgs[0]
