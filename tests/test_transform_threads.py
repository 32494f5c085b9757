"""``transform_threads``: on a CPU device a transform runs in that many pipeline threads, each on
one intra-op thread of its own, batches handed out in step order — the same batches whatever the
number, the first failing batch reported first, every thread joined by ``close()``."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bench import datagen
from bench.transform_bench import semseg
from gds_stream.backends import open_loader
from gds_stream.errors import LoaderError
from helpers import assert_same_batches, kept_epoch, state_after

FIELDS = ["x", "y", "z", "intensity", "sem_class"]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """A DALES-like dataset (metres): 2 scans in 50 chunks of 100 m, ~400 points each."""
    return datagen.generate(tmp_path_factory.mktemp("tthreads") / "ds", 20_000,
                            chunk_size=100.0, progress=False)


def _loader(path, **kw):
    opts = dict(backend="fallback", device="cpu", batch_chunks=6, fields=FIELDS, shuffle=True,
                seed=3, transform=semseg(lib=True))
    opts.update(kw)
    return open_loader(path, **opts)


@pytest.mark.parametrize("reads", [0, 1])
def test_any_number_of_transform_threads_yields_the_same_batches(chunked, reads):
    with _loader(chunked, transform_threads=1, num_threads=reads) as one:
        want = kept_epoch(one, 1)
    assert len(want) > 4
    for k in (2, 3):
        with _loader(chunked, transform_threads=k, num_threads=reads) as ld:
            assert ld.options.transform_threads == k
            assert_same_batches(kept_epoch(ld, 1), want)


def test_resume_with_transform_threads_yields_the_uninterrupted_batches(chunked):
    with _loader(chunked, transform_threads=3) as ld:
        full = kept_epoch(ld, 2)
    for cut in (1, len(full) - 1):
        with _loader(chunked, transform_threads=3) as ld:
            state = state_after(ld, 2, cut)
        with _loader(chunked, transform_threads=2) as ld:
            ld.load_state_dict(state)
            assert_same_batches(kept_epoch(ld, 2), full[cut:])


@pytest.mark.parametrize("user_set", [False, True])
def test_each_transform_thread_runs_its_ops_on_one_intra_op_thread(chunked, user_set):
    """Also when the training script set torch's thread count itself (torch then applies it to
    each new thread on first use)."""
    before = torch.get_num_threads()
    if user_set:
        torch.set_num_threads(before)
    seen = []
    preset = semseg(lib=True)

    def spy(batch, gen):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return preset(batch, gen)

    main = torch.get_num_threads()
    with _loader(chunked, transform=spy, transform_threads=2) as ld:
        n = len(kept_epoch(ld, 0))
    assert len(seen) == n and {name for name, _ in seen} <= {"gds-stream-pipeline-0",
                                                            "gds-stream-pipeline-1"}
    from gds_stream._producer import _omp_set_num_threads
    if _omp_set_num_threads() is not None:  # torch on OpenMP: set per thread
        assert {k for _, k in seen} == {1}
    assert torch.get_num_threads() == main  # the consumer's pool is untouched


def test_the_first_failing_batch_is_reported_even_when_a_later_one_fails_first(chunked):
    def boom(batch, gen):
        step = int(batch["chunk"][0])
        if step == order[2]:
            time.sleep(0.3)  # batch 2 fails last, after batch 3 (in another thread) failed
            raise ValueError("batch two")
        if step == order[3]:
            raise ValueError("batch three")
        return batch

    with _loader(chunked, transform=None) as plain:  # each batch's first chunk id
        order = [int(b["chunk"][0]) for b in kept_epoch(plain, 0)]
    with _loader(chunked, transform=boom, transform_threads=3) as ld:
        it, got = iter(ld), 0
        with pytest.raises(LoaderError, match="failed on batch 2 of epoch 0: ValueError: "
                                              "batch two"):
            for _ in it:
                got += 1
        assert got == 2


def test_close_mid_epoch_joins_every_transform_thread(chunked):
    ld = _loader(chunked, transform_threads=3)
    it = iter(ld)
    next(it)
    assert sum(t.name.startswith("gds-stream-pipeline") for t in threading.enumerate()) == 3
    ld.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("gds-stream-pipeline")]


@pytest.mark.parametrize("value, match", [
    (0, "transform_threads must be an integer >= 1, got 0"),
    (True, "transform_threads must be an integer >= 1, got True"),
    ("2", "transform_threads must be an integer >= 1, got '2'"),
])
def test_bad_transform_threads_are_refused_by_name(chunked, value, match):
    with pytest.raises(LoaderError, match=match):
        _loader(chunked, transform_threads=value)


def test_transform_threads_is_for_a_cpu_device(chunked):
    with pytest.raises(LoaderError, match="transform_threads=2 is for a CPU device"):
        _loader(chunked, device="cuda", transform_threads=2)
