"""``stack_layout="columns"``: the stacked tensor column-major, and the fallback's fused read on a
CPU device (each stacked field read straight into its column, the others cast into theirs) —
the same values as the row-major stack on every path, the fused read where it applies and only
there, ownership, resume, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gds_stream.backends import open_loader
from gds_stream.errors import LoaderError
from gds_stream.format import FieldSpec
from gds_stream.pipeline import Pipeline
from gds_stream.slab import SlabLayout
from helpers import assert_same_batches as _same, kept_epoch as _epoch, make_dataset, state_after
from test_gds import _write, simulated_gpu  # noqa: F401 - the simulated CUDA fixture

#: Stored dtypes a stack meets: one equal to the stack's dtype (read straight into its column),
#: the rest cast, a 3-component field, a field in two stacks.
FIELDS = (FieldSpec("pid", np.dtype("<i8")), FieldSpec("x", np.dtype("<f4")),
          FieldSpec("y", np.dtype("<f4")), FieldSpec("z", np.dtype("<f8")),
          FieldSpec("label", np.dtype("<u2")), FieldSpec("inst", np.dtype("<i4")),
          FieldSpec("cls", np.dtype("u1")), FieldSpec("rgb", np.dtype("u1"), 3))


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stackcols"), [3000, 0, 20_001, 517, 9_000],
                        FIELDS)


STACKS = [
    ({"feat": ["x", "y", "z", "label", "inst", "cls"]}, torch.float32),
    ({"feat": ["rgb", "x", "inst"], "xy": ["y", "x"]}, torch.float32),  # x in two stacks
    ({"feat": ["x", "z", "rgb"]}, torch.float64),  # z straight, x cast up
    ({"ids": ["pid", "inst"]}, torch.int64),
    ({"feat": ["x", "y"]}, torch.bfloat16),  # no numpy dtype: every column cast
]
CONFIGS = [
    dict(batch_points=4_000),  # file order: the fused read (inline reads)
    dict(batch_points=4_000, num_threads=2),  # the fused read in reader threads
    dict(batch_scans=2),  # scans: offsets beside the stack
    dict(batch_scans=1, verify_reads=True),  # a scan of 0 points is a batch of 0
    dict(batch_points=7_000, fields=["x", "inst", "z", "cls", "label", "rgb", "y", "pid"],
         num_threads=1),  # the fields in another order than stored
    dict(batch_points=4_000, shuffle=True, seed=3, shuffle_window=0),  # within-batch gather
    dict(batch_points=5_000, shuffle=True, seed=3),  # shuffle windows
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("stack,dtype", STACKS, ids=lambda v: str(v))
def test_columns_hold_the_row_stack_values_column_major(ds, stack, dtype, cfg):
    kw = dict(backend="fallback", device="cpu", stack=stack, dtype=dtype, **cfg)
    with open_loader(ds, **kw) as rows, open_loader(ds, stack_layout="columns", **kw) as cols:
        want = _epoch(rows, 1)
        cols.set_epoch(1)
        got = []
        for b in cols:  # the layout as yielded (a clone may change strides)
            for key in stack:
                assert b[key].t().is_contiguous()
                assert b[key].shape[0] < 2 or not b[key].is_contiguous()
            got.append({k: v.clone() for k, v in b.items()})
    assert len(got) == len(want) > 1
    for w, g in zip(want, got):
        assert set(g) == set(w)
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
            assert torch.equal(g[k], w[k]), k
        for key in stack:
            assert w[key].is_contiguous()


def _no_pipeline_stack(monkeypatch):
    calls = []
    real = Pipeline._stack

    def spy(self, batch, epoch, step):
        calls.append(step)
        return real(self, batch, epoch, step)

    monkeypatch.setattr(Pipeline, "_stack", spy)
    return calls


@pytest.mark.parametrize("cfg,fused", [
    (dict(batch_points=4_000), True),
    (dict(batch_points=4_000, num_threads=2), True),
    (dict(batch_scans=2), True),
    (dict(batch_points=4_000, shuffle=True, shuffle_window=0), False),  # gathered batches
    (dict(batch_points=4_000, shuffle=True), False),  # batches cut from windows
    (dict(batch_points=4_000, transform=lambda b, g: b), False),  # stack after the transform
], ids=str)
def test_the_fused_read_builds_the_stack_where_it_applies(ds, monkeypatch, cfg, fused):
    calls = _no_pipeline_stack(monkeypatch)
    with open_loader(ds, backend="fallback", device="cpu", stack={"feat": ["x", "inst"]},
                     stack_layout="columns", **cfg) as ld:
        n = len(_epoch(ld, 0))
    assert calls == ([] if fused else list(range(n)))


def test_a_fused_read_puts_each_matching_field_in_its_column():
    specs = [s for s in FIELDS]
    n = 1000
    lay = SlabLayout.build(specs, n, False, None, (("feat", ("x", "inst", "y")),),
                           np.dtype("<f4"), 4)
    (r,) = lay.stacks
    idx = {s.name: i for i, s in enumerate(specs)}
    assert r.width == 3 and r.col_bytes == 4000  # columns back to back
    assert r.offset % 4096 == 0
    assert lay.field_offsets[idx["x"]] == r.offset  # read into column 0
    assert lay.field_offsets[idx["y"]] == r.offset + 8000  # and y into column 2
    assert r.copies == ((idx["inst"], 1),)  # int32 is read beside, then cast
    others = [lay.field_offsets[i] for i, s in enumerate(specs) if s.name not in ("x", "y")]
    assert all(o + 4000 <= r.offset or o >= r.offset + 12_000 for o in others)
    assert lay.perm_offset >= r.offset + 12_000


def test_fused_batches_are_never_written_again(ds):
    with open_loader(ds, backend="fallback", device="cpu", batch_points=4_000, prefetch=2,
                     stack={"feat": ["x", "inst"]}, stack_layout="columns") as ld:
        held = []
        for b in ld:
            held.append((b["feat"], b["feat"].clone()))
        assert len(held) > 4
        for live, copy in held:
            assert torch.equal(live, copy)


@pytest.mark.parametrize("cfg", [dict(batch_points=4_000), dict(batch_scans=2)], ids=str)
def test_fused_read_resumes_bit_identically(ds, cfg):
    def loader():
        return open_loader(ds, backend="fallback", device="cpu", stack={"f": ["x", "cls"]},
                           stack_layout="columns", **cfg)

    with loader() as a:
        full = _epoch(a, 2)
    for cut in (1, len(full) // 2):
        with loader() as a:
            state = state_after(a, 2, cut)
        with loader() as b:
            b.load_state_dict(state)
            _same(full[cut:], [{k: v.clone() for k, v in x.items()} for x in b])


@pytest.mark.parametrize("opts,match", [
    (dict(stack={"f": ["x"]}, stack_layout="diagonal"),
     "stack_layout= must be one of 'rows', 'columns', got 'diagonal'"),
    (dict(stack_layout="columns"), "stack_layout='columns' is the layout of the stack= tensors"),
])
def test_stack_layout_errors(ds, opts, match):
    with pytest.raises(LoaderError, match=match):
        open_loader(ds, backend="fallback", device="cpu", batch_points=100, **opts)


def test_stack_layout_none_is_the_default(ds):
    with open_loader(ds, backend="fallback", device="cpu", batch_points=5_000,
                     stack={"f": ["x", "y"]}, stack_layout=None) as ld:
        assert ld.options.pipeline.layout == "rows"
        assert next(iter(ld))["f"].is_contiguous()
    with open_loader(ds, backend="fallback", device="cpu", batch_points=5_000,
                     stack_layout=None) as ld:
        assert ld.options.pipeline is None


def test_simulated_gds_stacks_columns_on_its_stream(tmp_path, simulated_gpu):
    """On CUDA the stack runs on the loader's stream (no fused read): the same values,
    column-major."""
    from fallback import FallbackLoader
    from gds_stream.gds import GDSLoader

    path = _write(tmp_path / "ds", [3000, 0, 20_001, 517])
    kw = dict(batch_points=6_000, stack={"feat": ["x", "y", "rgb"]})
    g = GDSLoader(path, device="cuda", num_threads=2, stack_layout="columns", **kw)
    f = FallbackLoader(path, device="cpu", num_threads=2, **kw)
    try:
        want, got = _epoch(f, 1), _epoch(g, 1)
        _same(want, got)
        g.set_epoch(1)
        assert all(b["feat"].shape[1] == 5 and b["feat"].t().is_contiguous() for b in g)
    finally:
        g.close(), f.close()
