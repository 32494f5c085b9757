"""gds_stream.transforms inside the loader (``open_loader(..., transform=...)``): where they run,
that a transformed epoch is a pure function of (seed, epoch, rank, step), and that a resumed
epoch yields exactly the batches of the uninterrupted one."""

from __future__ import annotations

import threading

import pytest
import torch

from bench import datagen
from bench.transform_bench import semseg
from gds_stream.backends import open_loader
from gds_stream.errors import LoaderError
from gds_stream.pipeline import batch_seed
from gds_stream.transforms import Compose, GridSample, RandomRotate, SphereCrop, ToPointcept
from helpers import assert_same_batches, kept_epoch as _epoch, state_after

FIELDS = ["x", "y", "z", "intensity", "sem_class"]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """A DALES-like dataset (metres): 2 scans in 50 chunks of 100 m, ~400 points each."""
    return datagen.generate(tmp_path_factory.mktemp("xform") / "ds", 20_000, chunk_size=100.0,
                            progress=False)


def _loader(path, **kw):
    opts = dict(backend="fallback", device="cpu", batch_chunks=8, fields=FIELDS, shuffle=True,
                seed=5)
    opts.update(kw)
    return open_loader(path, **opts)


def _same(a, b):
    assert a  # never two empty lists
    assert_same_batches(a, b)


def test_preset_runs_in_the_pipeline_thread_and_equals_the_standalone_transform(chunked):
    seen = []
    preset = semseg(lib=True)

    def spy(batch, gen):
        seen.append(threading.current_thread().name)
        return preset(batch, gen)

    with _loader(chunked, num_threads=1, transform=spy) as ld, _loader(chunked) as plain:
        got, raw = _epoch(ld, 2), _epoch(plain, 2)
    assert seen and all(n.startswith("gds-stream-pipeline") for n in seen), seen
    assert len(got) == len(raw) > 2
    for step, (g, r) in enumerate(zip(got, raw)):
        gen = torch.Generator().manual_seed(batch_seed(5, 2, 0, step))
        want = preset(r, gen)
        assert set(g) == {"coord", "feat", "segment", "offset", "grid_coord"}
        for k in want:
            assert torch.equal(g[k], want[k]), k
        assert int(g["offset"][-1]) == len(g["coord"]) and len(g["offset"]) == len(r["chunk"])


@pytest.mark.parametrize("threads", [0, 1])
def test_transformed_epochs_are_deterministic_and_resume_bit_identically(chunked, threads):
    t = Compose([RandomRotate(p=1), GridSample(0.5, return_grid_coord=True), SphereCrop(150),
                 ToPointcept(feat=["coord", "intensity"], segment="sem_class", keep=["chunk"])])
    with _loader(chunked, transform=t, num_threads=threads) as a, \
            _loader(chunked, transform=t, num_threads=threads) as b:
        full = _epoch(a, 1)
        _same(full, _epoch(b, 1))
        other = _epoch(b, 2)
        assert [x["coord"].sum() for x in full] != [x["coord"].sum() for x in other]
    for cut in (1, len(full) - 2):
        with _loader(chunked, transform=t, num_threads=threads) as a:
            state = state_after(a, 1, cut)
        with _loader(chunked, transform=t, num_threads=threads) as b:
            b.load_state_dict(state)
            _same(full[cut:], [{k: v.clone() for k, v in x.items()} for x in b])


def test_points_mode_batches_are_one_unit(chunked):
    with open_loader(chunked, backend="fallback", device="cpu", batch_points=7_000,
                     fields=FIELDS, transform=GridSample(1.0, return_grid_coord=True)) as ld:
        for b in ld:
            assert "offset" not in b
            assert b["grid_coord"].min() == 0
            keys = b["grid_coord"].tolist()
            assert len(set(map(tuple, keys))) == len(keys)       # one point per voxel


def test_a_missing_field_surfaces_at_next_naming_the_transform(chunked):
    with _loader(chunked, transform=GridSample(0.1, coord=("x", "y", "height"))) as ld:
        with pytest.raises(LoaderError, match=r"GridSample: coord field 'height'"):
            next(iter(ld))
