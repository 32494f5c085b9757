"""The planner (``gds_stream/plan.py``): the iterator contract's ordering, sharding and shuffle
rules, checked as properties over sizes, scans (including empty ones), batch sizes, ranks and
options. Pure: no I/O, no loader.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gds_stream.format import ALIGN
from gds_stream.plan import MIN_READ_BYTES, EpochPlan, PlanSpec, shuffle_block_points
from _mixing import pairs_shared

SETTINGS = settings(max_examples=75, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- strategies -------------------------------------------------------------------------------
@st.composite
def scan_sizes(draw, max_points=5000):
    """Scan sizes (zeros allowed) whose total is at most ``max_points``."""
    k = draw(st.integers(1, 40))
    sizes = draw(st.lists(st.one_of(st.just(0), st.integers(0, max_points)),
                          min_size=k, max_size=k))
    total, out = 0, []
    for s in sizes:
        s = min(s, max_points - total)
        out.append(s)
        total += s
    return out


@st.composite
def specs(draw, scan_mode=None, shuffle=None, drop_last=None, world_size=None):
    """A PlanSpec for rank 0 (tests build the other ranks with :func:`for_rank`)."""
    sizes = draw(scan_sizes())
    mode = draw(st.booleans()) if scan_mode is None else scan_mode
    # at most ~100 batches per epoch keeps an example fast; small batches stay reachable on
    # small datasets
    units = len(sizes) if mode else sum(sizes)
    lo = max(1, -(-units // 100))
    if mode:
        bs = draw(st.integers(lo, max(lo, len(sizes) + 2)))
    else:
        bs = draw(st.one_of(st.integers(lo, lo + 64), st.integers(lo, max(lo, 6000))))
    return PlanSpec(
        num_points=int(sum(sizes)),
        scan_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        batch_size=bs,
        scan_mode=mode,
        shuffle=draw(st.booleans()) if shuffle is None else shuffle,
        seed=draw(st.integers(0, 2**32 - 1)),
        drop_last=draw(st.booleans()) if drop_last is None else drop_last,
        rank=0,
        world_size=draw(st.integers(1, 4)) if world_size is None else world_size,
        block_points=draw(st.sampled_from([1, 7, 64, 100, 512, 4096])),
    )


def for_rank(spec: PlanSpec, rank: int) -> PlanSpec:
    return PlanSpec(**{**spec.__dict__, "rank": rank})


def plans(spec: PlanSpec, epoch: int) -> list[EpochPlan]:
    return [EpochPlan(for_rank(spec, r), epoch) for r in range(spec.world_size)]


def units_of(spec: PlanSpec) -> int:
    return spec.num_units


def batch_units(spec: PlanSpec, b) -> int:
    return len(b.scan_sizes) if spec.scan_mode else b.num_points


def stream(spec: PlanSpec, epoch: int) -> list:
    """The epoch's batches in stream order: step by step, rank by rank."""
    ps = plans(spec, epoch)
    return [ps[r].batch(s) for s in range(ps[0].num_batches) for r in range(spec.world_size)]


def pre_perm_indices(b) -> np.ndarray:
    """A batch's points in segment order (before the within-batch permutation)."""
    if len(b.segments) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, c, dtype=np.int64) for a, c in b.segments])


# -- 1. exactly once, disjoint, drop_last -----------------------------------------------------
@SETTINGS
@given(spec=specs(), epoch=st.integers(0, 1000))
def test_exactly_once_and_disjoint(spec, epoch):
    ps = plans(spec, epoch)
    per_rank = []
    for p in ps:
        idx = [p.batch(i).point_indices() for i in range(p.num_batches)]
        got = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        assert len(np.unique(got)) == len(got), "a point appears twice on one rank"
        per_rank.append(got)
    allp = np.concatenate(per_rank)
    assert len(np.unique(allp)) == len(allp), "ranks' shares overlap"
    assert allp.min(initial=0) >= 0 and allp.max(initial=-1) < spec.num_points
    if not spec.drop_last:
        assert np.array_equal(np.sort(allp), np.arange(spec.num_points))


@SETTINGS
@given(spec=specs(), epoch=st.integers(0, 1000))
def test_units_kept_and_dropped(spec, epoch):
    """drop_last=False keeps every unit (scans too, empty ones included); drop_last=True drops
    exactly ``U mod (W·B)`` units — fewer than W·B, and none when the stream divides evenly."""
    ps = plans(spec, epoch)
    kept = sum(batch_units(spec, p.batch(i)) for p in ps for i in range(p.num_batches))
    u, wb = units_of(spec), spec.world_size * spec.batch_size
    if spec.drop_last:
        assert u - kept == u % wb
        assert 0 <= u - kept < wb
    else:
        assert kept == u


@SETTINGS
@given(spec=specs(drop_last=True), epoch=st.integers(0, 1000))
def test_drop_last_drops_the_stream_tail(spec, epoch):
    """What drop_last drops is the end of the epoch's stream: with the same seed and epoch,
    drop_last=False's stream starts with drop_last=True's stream."""
    full = PlanSpec(**{**spec.__dict__, "drop_last": False})
    short = [pre_perm_indices(b) for b in stream(spec, epoch)]
    long = [pre_perm_indices(b) for b in stream(full, epoch)]
    short = np.concatenate(short) if short else np.zeros(0, dtype=np.int64)
    long = np.concatenate(long) if long else np.zeros(0, dtype=np.int64)
    assert np.array_equal(long[:len(short)], short)


# -- 2. equal steps, batch sizes --------------------------------------------------------------
@SETTINGS
@given(spec=specs(), epoch=st.integers(0, 1000))
def test_equal_steps_and_batch_sizes(spec, epoch):
    ps = plans(spec, epoch)
    n = spec.num_steps()
    for p in ps:
        assert p.num_batches == len(p) == n
        assert len(list(p)) == n
        with pytest.raises(IndexError):
            p.batch(n)
        for i in range(n):
            b = p.batch(i)
            k = batch_units(spec, b)
            assert k <= spec.batch_size
            if i < n - 1 or spec.drop_last:
                assert k == spec.batch_size, f"batch {i} of {n} is short ({k})"
            assert b.step == i and b.epoch == epoch
            assert len(b.point_indices()) == b.num_points
        if n:
            assert p.max_batch_points() == max(p.batch(i).num_points for i in range(n))


def test_num_steps_formula_examples():
    def spec(n, bs, ws, drop):
        return PlanSpec(n, np.array([0, n], dtype=np.int64), bs, False, False, 0, drop, 0, ws, 8)

    assert spec(10, 3, 2, False).num_steps() == 2   # 6 + 4 -> ceil(10/6)
    assert spec(10, 3, 2, True).num_steps() == 1
    assert spec(12, 3, 2, True).num_steps() == 2
    assert spec(1, 3, 4, False).num_steps() == 1    # ranks 1..3 get an empty last batch
    assert spec(0, 3, 4, False).num_steps() == 0
    p = [EpochPlan(for_rank(spec(1, 3, 4, False), r), 0) for r in range(4)]
    assert [pl.batch(0).num_points for pl in p] == [1, 0, 0, 0]


# -- 3. determinism, file order, shuffle ------------------------------------------------------
def _same_batch(a, b) -> bool:
    return (np.array_equal(a.segments, b.segments)
            and (a.scan_sizes is None) == (b.scan_sizes is None)
            and (a.scan_sizes is None or np.array_equal(a.scan_sizes, b.scan_sizes))
            and a.perm_key == b.perm_key
            and np.array_equal(a.point_indices(), b.point_indices()))


@SETTINGS
@given(spec=specs(), epoch=st.integers(0, 1000))
def test_deterministic(spec, epoch):
    for r in range(spec.world_size):
        s1, s2 = for_rank(spec, r), for_rank(PlanSpec(**{**spec.__dict__}), r)
        p1, p2 = EpochPlan(s1, epoch), EpochPlan(s2, epoch)
        assert p1.num_batches == p2.num_batches
        for i in range(p1.num_batches):
            assert _same_batch(p1.batch(i), p2.batch(i))
            assert _same_batch(p1.batch(i), p1.batch(i))  # asking twice changes nothing


@SETTINGS
@given(spec=specs(shuffle=False), epoch=st.integers(0, 1000))
def test_no_shuffle_is_file_order(spec, epoch):
    """shuffle=False: the stream is the file's point order (whatever the epoch), no permutation,
    and in scan mode the scans come in file order."""
    bs = stream(spec, epoch)
    idx = [b.point_indices() for b in bs]
    got = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    assert np.array_equal(got, np.arange(len(got)))
    for b in bs:
        assert b.perm_key is None and b.permutation() is None
    if spec.scan_mode:
        sizes = [s for b in bs for s in b.scan_sizes]
        assert sizes == list(np.diff(spec.scan_offsets)[:len(sizes)])


@SETTINGS
@given(spec=specs(shuffle=True, scan_mode=False), epoch=st.integers(0, 1000))
def test_shuffle_moves_whole_blocks(spec, epoch):
    """Out-of-core shuffle: before the within-batch permutation, the epoch's stream is the blocks
    of ``block_points`` consecutive points in some order, each block read front to back."""
    bs = stream(spec, epoch)
    pre = [pre_perm_indices(b) for b in bs]
    s = np.concatenate(pre) if pre else np.zeros(0, dtype=np.int64)
    bp = spec.block_points
    if len(s) > 1:
        brk = np.nonzero(s[1:] != s[:-1] + 1)[0]
        # a break only where one block ends (or the last, short block ends) and another starts
        ends_block = ((s[brk] + 1) % bp == 0) | (s[brk] == spec.num_points - 1)
        assert ends_block.all()
        assert (s[brk + 1] % bp == 0).all()
    for b in bs:  # the within-batch permutation is a permutation of the batch's points
        perm = b.permutation()
        if b.num_points:
            assert perm is not None and perm.dtype == np.int32
            assert np.array_equal(np.sort(perm), np.arange(b.num_points))
            assert np.array_equal(np.sort(b.point_indices()), np.sort(pre_perm_indices(b)))


@settings(max_examples=40, deadline=None)
@given(nblocks=st.integers(16, 60), block_points=st.sampled_from([1, 3, 16, 40]),
       extra=st.integers(0, 39), batch=st.integers(1, 200), ws=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 10_000), drop_last=st.booleans())
def test_shuffle_differs_between_epochs_points(nblocks, block_points, extra, batch, ws, seed,
                                               epoch, drop_last):
    """With ≥ 16 blocks the chance two epochs share a block order is < 1/16! ≈ 5e-14."""
    n = nblocks * block_points + min(extra, block_points - 1)
    batch = max(batch, n // 100)  # keep an example to ~100 steps
    spec = PlanSpec(n, np.array([0, n], dtype=np.int64), batch, False, True, seed, drop_last, 0,
                    ws, block_points)
    assume(spec.num_steps() > 0)

    def order(e):
        return np.concatenate([b.point_indices() for b in stream(spec, e)])

    a, b = order(epoch), order(epoch + 1)
    assert len(a) == len(b)
    assert not np.array_equal(a, b)
    # and the same epoch again is the same order
    assert np.array_equal(a, order(epoch))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=20, max_size=60), batch=st.integers(1, 5),
       ws=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 10_000))
def test_shuffle_differs_between_epochs_scans(sizes, batch, ws, seed, epoch):
    """≥ 20 non-empty scans: the chance of one scan order twice is < 1/20! ≈ 4e-19."""
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    spec = PlanSpec(int(offs[-1]), offs, batch, True, True, seed, False, 0, ws, 4096)

    def order(e):
        """The epoch's scans in stream order, each named by its first point."""
        out = []
        for b in stream(spec, e):
            idx, ends = b.point_indices(), b.offsets()
            if len(ends) == 0:  # a rank's empty last batch
                continue
            out += [int(idx[lo]) for lo in np.concatenate([[0], ends[:-1]])]
        return out

    a, b = order(epoch), order(epoch + 1)
    assert sorted(a) == sorted(b) == list(offs[:-1])
    assert a != b
    assert a == order(epoch)


# -- 4. scan mode keeps scans whole -----------------------------------------------------------
@SETTINGS
@given(spec=specs(scan_mode=True), epoch=st.integers(0, 1000))
def test_scan_mode_keeps_scans_whole(spec, epoch):
    offs_file = spec.scan_offsets
    sizes_file = np.diff(offs_file)
    start_of = {int(offs_file[i]): int(sizes_file[i]) for i in range(len(sizes_file))
                if sizes_file[i] > 0}
    seen_nonempty = []
    n_scans = 0
    for p in plans(spec, epoch):
        for i in range(p.num_batches):
            b = p.batch(i)
            assert b.perm_key is None and b.permutation() is None
            offs = b.offsets()
            assert offs is not None and offs.dtype == np.int64
            assert np.array_equal(offs, np.cumsum(b.scan_sizes))
            assert (offs[-1] if len(offs) else 0) == b.num_points
            idx = b.point_indices()
            n_scans += len(b.scan_sizes)
            for lo, hi in zip(np.concatenate([[0], offs[:-1]]), offs):
                chunk = idx[lo:hi]
                if len(chunk) == 0:
                    continue
                first = int(chunk[0])
                assert first in start_of, f"scan chunk starts mid-scan at point {first}"
                assert start_of[first] == len(chunk), "a scan was split"
                assert np.array_equal(chunk, np.arange(first, first + len(chunk)))
                seen_nonempty.append(first)
    assert len(set(seen_nonempty)) == len(seen_nonempty)
    if not spec.drop_last:
        assert n_scans == len(sizes_file)
        assert sorted(seen_nonempty) == sorted(start_of)


# -- 5. shuffle block size --------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(pbs=st.lists(st.integers(1, 4096 * 8), min_size=1, max_size=8))
def test_shuffle_block_points(pbs):
    bp = shuffle_block_points(pbs)
    assert bp % ALIGN == 0 and bp > 0
    assert bp * min(pbs) >= MIN_READ_BYTES         # the smallest field's read is >= 1 MiB
    for pb in pbs:                                  # every field's block is 4 KiB-aligned
        assert (bp * pb) % ALIGN == 0
    assert (bp - ALIGN) * min(pbs) < MIN_READ_BYTES  # and no larger than it needs to be


def test_shuffle_block_points_examples():
    assert shuffle_block_points([1]) == 1 << 20
    assert shuffle_block_points([4, 8, 2]) == 1 << 19
    assert shuffle_block_points([3]) == 352256      # ceil(2**20 / 3) = 349526, up to 4096


# -- 5. shuffle windows (points mode) ---------------------------------------------------------
@st.composite
def window_specs(draw, drop_last=None):
    n = draw(st.integers(0, 6000))
    ws = draw(st.integers(1, 4))
    lo = max(1, -(-n // 100))
    bs = draw(st.integers(lo, max(lo, 700)))
    return PlanSpec(
        num_points=n, scan_offsets=np.array([0, n], dtype=np.int64), batch_size=bs,
        scan_mode=False, shuffle=True, seed=draw(st.integers(0, 2**32 - 1)),
        drop_last=draw(st.booleans()) if drop_last is None else drop_last, rank=0,
        world_size=ws, block_points=draw(st.sampled_from([1, 7, 64, 512, 4096])),
        shuffle_window=draw(st.integers(1, 3000)),
    )


@SETTINGS
@given(spec=window_specs(), epoch=st.integers(0, 1000))
def test_window_exactly_once_equal_steps(spec, epoch):
    ps = plans(spec, epoch)
    n = spec.num_steps()
    got = []
    for p in ps:
        assert p.num_batches == n
        for i in range(n):
            b = p.batch(i)
            assert b.window is not None and b.rows is not None
            assert b.num_points == len(b.rows) == p.step_points(i)
            if i < n - 1 or spec.drop_last:
                assert b.num_points == spec.batch_size
            assert b.window.first_step <= i < b.window.stop_step
            assert b.window.stop_step - b.window.first_step <= spec.window_steps
            got.append(b.point_indices())
    allp = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
    assert len(np.unique(allp)) == len(allp), "a point appears twice"
    wb = spec.world_size * spec.batch_size
    if spec.drop_last:
        assert spec.num_points - len(allp) == spec.num_points % wb
    else:
        assert np.array_equal(np.sort(allp), np.arange(spec.num_points))


@SETTINGS
@given(spec=window_specs(), epoch=st.integers(0, 1000))
def test_window_reads_are_the_rank_share_in_few_ranges(spec, epoch):
    """A window is one contiguous span of the rank's stream: its reads are whole shuffle blocks
    except at its two ends, and each batch's rows index into it."""
    for p in plans(spec, epoch):
        seen = set()
        for i in range(p.num_batches):
            b = p.batch(i)
            w = b.window
            if w.index in seen:
                continue
            seen.add(w.index)
            segs = w.segments
            nblocks = -(-w.num_points // spec.block_points) + 1
            assert len(segs) <= nblocks + 1
            assert w.num_points == sum(p.step_points(t) for t in range(w.first_step, w.stop_step))
            rows = np.concatenate([p.batch(t).rows for t in range(w.first_step, w.stop_step)])
            assert np.array_equal(np.sort(rows), np.arange(w.num_points))


def _epoch_batches(spec: PlanSpec, epoch: int) -> list[np.ndarray]:
    p = EpochPlan(spec, epoch)
    return [p.batch(i).point_indices() for i in range(p.num_batches)]


def test_window_mixes_like_a_random_permutation():
    """Over two epochs, the fraction of point pairs that share a batch both times. For a full
    random permutation it is about ((B-1)/(N-1))²; blocks of bp points read whole add about
    bp·N/S² of that (S: the window), here 1/4. The bound: within 2× of the random figure,
    where batches cut from blocks alone (no window) share ~N/B = 64× more."""
    n, bp, b, win = 1 << 16, 4096, 1024, 1 << 15
    base = dict(num_points=n, scan_offsets=np.array([0, n], dtype=np.int64), batch_size=b,
                scan_mode=False, shuffle=True, seed=3, drop_last=False, rank=0, world_size=1,
                block_points=bp)
    random_pairs = ((b - 1) / (n - 1)) ** 2
    windowed = PlanSpec(**base, shuffle_window=win)
    got = np.mean([pairs_shared(_epoch_batches(windowed, e), _epoch_batches(windowed, e + 1), n)
                   for e in range(3)])
    assert got < 2 * random_pairs, (got, random_pairs)
    blocks_only = PlanSpec(**base)
    old = pairs_shared(_epoch_batches(blocks_only, 0), _epoch_batches(blocks_only, 1), n)
    assert old > 20 * random_pairs


def test_window_changes_the_order_of_a_dataset_smaller_than_a_block():
    spec = PlanSpec(1000, np.array([0, 1000], dtype=np.int64), 1, False, True, 0, False, 0, 1,
                    4096, shuffle_window=4096)
    e0 = np.concatenate(_epoch_batches(spec, 0))
    e1 = np.concatenate(_epoch_batches(spec, 1))
    assert sorted(e0) == sorted(e1) == list(range(1000))
    assert not np.array_equal(e0, e1)


# -- 6. unit ids and packed unit batches ------------------------------------------------------
@SETTINGS
@given(spec=specs(scan_mode=True), epoch=st.integers(0, 1000))
def test_unit_ids_match_segments(spec, epoch):
    for p in plans(spec, epoch):
        for i in range(p.num_batches):
            b = p.batch(i)
            offs = spec.scan_offsets
            assert np.array_equal(b.scan_sizes, offs[b.units + 1] - offs[b.units])
            want = np.concatenate([np.arange(offs[u], offs[u + 1]) for u in b.units]) \
                if len(b.units) else np.zeros(0, dtype=np.int64)
            assert np.array_equal(b.point_indices(), want)


@st.composite
def packed_specs(draw):
    spec = draw(specs(scan_mode=True))
    return PlanSpec(**{**spec.__dict__, "max_batch_points": draw(st.integers(1, 3000))})


@SETTINGS
@given(spec=packed_specs(), epoch=st.integers(0, 1000))
def test_packed_batches(spec, epoch):
    ps = plans(spec, epoch)
    n = spec.num_steps(epoch)
    seen = []
    for p in ps:
        assert p.num_batches == n, "ranks must have the same number of steps"
        for i in range(n):
            b = p.batch(i)
            assert len(b.units) <= spec.batch_size
            if len(b.units) > 1:
                assert b.num_points <= spec.max_batch_points
            seen.extend(b.units.tolist())
    assert len(seen) == len(set(seen))
    units = spec.num_units
    if not spec.drop_last:
        assert sorted(seen) == list(range(units))
    else:
        # only the final round of packed batches (fewer than world_size of them) is dropped
        bins = len(_all_bins(spec, epoch))
        assert len(seen) == sum(len(u) for u in _all_bins(spec, epoch)[:bins - bins % spec.world_size])


def _all_bins(spec: PlanSpec, epoch: int) -> list[list[int]]:
    p = EpochPlan(spec, epoch)
    return [p._order[a:c].tolist() for a, c in zip(p._bins[:-1], p._bins[1:])]


def test_packing_examples():
    sizes = [5, 5, 20, 1, 1, 1, 3]
    spec = PlanSpec(sum(sizes), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), 2,
                    True, False, 0, False, 0, 1, 8, max_batch_points=10)
    got = [EpochPlan(spec, 0).batch(i).units.tolist() for i in range(spec.num_steps())]
    assert got == [[0, 1], [2], [3, 4], [5, 6]]
