"""The batch pipeline hook: ``transform=``, ``stack=``, ``dtype=`` (gds_stream.pipeline) on both
backends — determinism, resume, stacking, where it runs, errors."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from gds_stream.backends import open_loader
from gds_stream.errors import LoaderError
from gds_stream.pipeline import batch_seed
from helpers import assert_same_batches as _same, kept_epoch as _epoch, make_dataset, state_after
from test_gds import _write, simulated_gpu  # noqa: F401 - the simulated CUDA fixture


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pipe"), [3000, 0, 20_001, 517, 9_000])


def jitter(batch, gen):
    """A random transform: noise on x, a random subset of points dropped."""
    n = batch["x"].shape[0]
    keep = torch.rand(n, generator=gen, device=batch["x"].device) < 0.8
    out = {k: v[keep] for k, v in batch.items() if k not in ("offset", "chunk")}
    out["x"] = out["x"] + torch.randn(out["x"].shape, generator=gen, device=out["x"].device)
    return out


# threaded CPU (num_threads given) and every batch unit
CONFIGS = [
    dict(batch_points=4_000, shuffle=True, seed=3, num_threads=2),
    dict(batch_points=4_000, shuffle=True, seed=3, shuffle_window=0, num_threads=2),
    dict(batch_points=5_000, shuffle=True, seed=3, shuffle_window=12_000, num_threads=2),
    dict(batch_scans=2, shuffle=True, seed=1, num_threads=2),
    dict(batch_points=6_000, num_threads=1),
]


def test_batch_seed_is_a_stable_63_bit_mix():
    seeds = {batch_seed(s, e, r, t) for s in range(3) for e in range(3) for r in range(3)
             for t in range(40)}
    assert len(seeds) == 3 * 3 * 3 * 40  # distinct arguments, distinct seeds
    assert all(0 <= v < 2**63 for v in seeds)
    assert batch_seed(1, 2, 3, 4) == batch_seed(np.int64(1), 2, 3, np.int32(4))
    # pinned: a resumed job on another machine or Python version must draw the same numbers
    assert batch_seed(0, 0, 0, 0) == 3313913236289419115
    assert batch_seed(7, 1, 0, 12) == 8942917368389653366


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_random_transform_is_deterministic_and_resumes_bit_identically(ds, cfg):
    def loader():
        return open_loader(ds, backend="fallback", device="cpu", transform=jitter, **cfg)

    with loader() as a, loader() as b:
        full = _epoch(a, 1)
        _same(full, _epoch(b, 1))
        sums = [float(x["x"].double().sum()) for x in full]
        assert sums != [float(x["x"].double().sum()) for x in _epoch(b, 2)]  # epochs differ
    for cut in (1, len(full) // 2, len(full) - 1):
        with loader() as a:
            state = state_after(a, 1, cut)
        with loader() as b:
            b.load_state_dict(state)
            _same(full[cut:], [{k: v.clone() for k, v in x.items()} for x in b])


def test_stack_shape_dtype_values_and_dropped_sources(ds):
    kw = dict(backend="fallback", device="cpu", batch_scans=2, shuffle=True, seed=2)
    with open_loader(ds, **kw) as plain, open_loader(
            ds, stack={"feat": ["x", "y", "rgb", "label"]}, **kw) as st, open_loader(
            ds, stack={"feat": ["x", "rgb"], "ids": ["pid"]}, dtype=torch.float64,
            **kw) as st64:
        for p, s, s64 in zip(plain, st, st64):
            n = p["x"].shape[0]
            assert s["feat"].shape == (n, 6) and s["feat"].dtype == torch.float32
            want = torch.cat([p["x"].float()[:, None], p["y"].float()[:, None],
                              p["rgb"].float(), p["label"].float()[:, None]], dim=1)
            assert torch.equal(s["feat"], want)
            assert set(s) == {"pid", "inst", "feat", "offset"}  # sources dropped
            assert torch.equal(s["offset"], p["offset"]) and torch.equal(s["pid"], p["pid"])
            assert s64["feat"].dtype == torch.float64 and s64["feat"].shape == (n, 4)
            assert torch.equal(s64["ids"], p["pid"].double()[:, None])


def _pooled(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in one of the host buffers of gds_stream._hostmem alive now."""
    from gds_stream import _hostmem

    lo = t.data_ptr()
    hi = lo + t.untyped_storage().nbytes()
    for _, mm in list(_hostmem._live.values()):
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        if base <= lo and hi <= base + len(mm):
            return True
    return False


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [0, 2])
def test_cpu_stacks_lie_in_recycled_host_buffers(ds, layout, dtype, threads):
    # A batch-sized tensor allocated afresh per batch is faulted in page by page every time;
    # the stack goes into a buffer of the pool, which the batch's death hands back.
    kw = dict(backend="fallback", device="cpu", batch_points=4_000, num_threads=threads)
    with open_loader(ds, **kw) as plain, open_loader(
            ds, stack={"feat": ["x", "rgb", "label"]}, dtype=dtype, stack_layout=layout,
            transform=lambda b, g: b, **kw) as st:
        batches = 0
        for p, s in zip(plain, st):
            f = s["feat"]
            assert f.dtype == dtype and f.shape == (p["x"].shape[0], 5)
            assert f.is_contiguous() == (layout == "rows")
            assert _pooled(f)
            want = torch.cat([p["x"][:, None].to(dtype), p["rgb"].to(dtype),
                              p["label"][:, None].to(dtype)], dim=1)
            assert torch.equal(f, want)
            batches += 1
            del p, s, f
        assert batches == -(-32_518 // 4_000)


def test_transform_then_stack_runs_in_the_pipeline_thread(ds):
    seen = []

    def where(batch, gen):
        seen.append(threading.current_thread().name)
        return {**batch, "x2": batch["x"] * 2}

    with open_loader(ds, backend="fallback", device="cpu", batch_points=5_000, num_threads=2,
                     transform=where, stack={"feat": ["x", "x2"]}) as ld:
        for b in ld:
            assert torch.equal(b["feat"][:, 1], b["feat"][:, 0] * 2)
    assert seen and all(n.startswith("gds-stream-pipeline") for n in seen), seen


def test_transform_error_surfaces_at_next_with_its_cause(ds):
    def boom(batch, gen):
        if int(batch["pid"][0]) > 10_000:
            raise ValueError("bad batch")
        return batch

    with open_loader(ds, backend="fallback", device="cpu", batch_points=4_000, num_threads=2,
                     transform=boom) as ld:
        it = iter(ld)
        got = 0
        with pytest.raises(LoaderError, match="transform boom failed on batch 3 of epoch 0: "
                                              "ValueError: bad batch") as info:
            for _ in it:
                got += 1
        # batches 0-2 came whole; the pipeline thread may reach batch 3 (and fail) before the
        # consumer took batch 2: a failure in flight surfaces at the next next()
        assert isinstance(info.value.__cause__, ValueError) and got <= 3
        with pytest.raises(LoaderError, match=f"failed at batch {got}"):  # batches it yielded
            next(it)


@pytest.mark.parametrize("bad, match", [
    (lambda b, g: [b], "returned a list for batch 0"),
    (lambda b, g: {k: v for k, v in b.items() if k != "x"}, "stack 'feat' needs 'x'"),
])
def test_transform_results_the_stack_cannot_use(ds, bad, match):
    with open_loader(ds, backend="fallback", device="cpu", batch_points=4_000, num_threads=2,
                     transform=bad, stack={"feat": ["x", "y"]}) as ld:
        with pytest.raises(LoaderError, match=match):
            next(iter(ld))


@pytest.mark.parametrize("opts, match", [
    (dict(transform=3), "transform= must be a callable"),
    (dict(stack={"x": ["y"]}), "stack= key 'x' would shadow a field of the dataset"),
    (dict(stack={"offset": ["y"]}), "stack= key 'offset' would shadow a key the loader adds"),
    (dict(stack={"f": "xy"}), r"stack\['f'\] must be a non-empty list"),
    (dict(stack={"f": ["x", "x"]}), "names a field twice"),
    (dict(stack={"f": ["x", "z"]}), r"stack\['f'\] names 'z', not among the loaded fields"),
    (dict(stack=["x"]), "stack= must be a non-empty dict"),
    (dict(dtype=torch.float16), "dtype= is the dtype of the stack= tensors"),
    (dict(stack={"f": ["x"]}, dtype="float32"), "dtype= must be a torch.dtype"),
])
def test_bad_pipeline_options_are_refused_when_the_loader_is_built(ds, opts, match):
    with pytest.raises(LoaderError, match=match):
        open_loader(ds, backend="fallback", device="cpu", batch_points=100, **opts)


def test_abandoned_iterator_with_a_pipeline_joins_its_threads(ds):
    base = set(threading.enumerate())
    ld = open_loader(ds, backend="fallback", device="cpu", batch_points=1_000, num_threads=2,
                     stack={"feat": ["x", "y"]})
    it = iter(ld)
    next(it)
    assert any(t.name == "gds-stream-pipeline" for t in set(threading.enumerate()) - base)
    del it
    gc.collect()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - base and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(threading.enumerate()) - base
    ld.close()


def test_close_from_another_thread_wakes_a_consumer_of_the_pipeline(ds):
    def slow(batch, gen):
        time.sleep(0.2)
        return batch

    ld = open_loader(ds, backend="fallback", device="cpu", batch_points=1_000, num_threads=2,
                     transform=slow)
    it = iter(ld)
    next(it)
    threading.Timer(0.05, ld.close).start()
    with pytest.raises(LoaderError, match="closed by loader.close"):
        for _ in it:
            pass


# -- the GPU-direct backend, on the simulated CUDA of test_gds ----------------------------------
@pytest.fixture(scope="module")
def gds_ds(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("gds-pipe") / "ds", [3000, 0, 20_001, 517])


@pytest.mark.parametrize("cfg", [dict(batch_points=4_000, shuffle=True, seed=5),
                                 dict(batch_points=4_000, shuffle=True, shuffle_window=0),
                                 dict(batch_points=6_000)], ids=str)
def test_simulated_gds_pipeline_matches_the_fallback_on_its_stream(gds_ds, simulated_gpu, cfg):
    from fallback import FallbackLoader
    from gds_stream.gds import GDSLoader

    kw = dict(transform=jitter, stack={"feat": ["x", "y", "rgb"]}, **cfg)
    g = GDSLoader(gds_ds, device="cuda", num_threads=2, **kw)
    f = FallbackLoader(gds_ds, device="cpu", num_threads=2, **kw)
    try:
        want = _epoch(f, 1)
        _same(want, _epoch(g, 1))
        assert want and want[0]["feat"].shape[1] == 5
        ops = simulated_gpu.ops[-1]
        # every batch's tensors were recorded on the consumer's stream after it waited on an
        # event of the loader's stream
        assert ops.streams and len(ops.consumer.waited) >= len(want)
        assert sum(s is ops.consumer for _, s in ops.recorded) >= len(want) * len(want[0])
    finally:
        g.close(), f.close()
