"""Edges of the epoch contract (a rank whose share of the last shuffled batch is empty, a state
dict saved after an epoch's last batch resumed by the usual ``set_epoch`` loop) and of what a
manifest may name."""

from __future__ import annotations

import numpy as np
import pytest

from gds_stream.backends import open_loader
from gds_stream.format import FieldSpec
from helpers import make_dataset


@pytest.mark.parametrize("fields", [
    [FieldSpec("a", np.dtype("<f4")), FieldSpec("b", np.dtype("u1"))],  # 5-byte rows
    [FieldSpec("x", np.dtype("<f4"), 3), FieldSpec("i", np.dtype("<u2")),
     FieldSpec("c", np.dtype("u1"))],  # 15-byte rows (x, y, z, intensity, class)
    [FieldSpec("a", np.dtype("<f8"), 3)] * 1,  # one field: no packed rows
])
@pytest.mark.parametrize("shuffle_window", [None, 0])
def test_every_rank_yields_its_share_of_a_last_batch_too_small_for_all(tmp_path, fields,
                                                                        shuffle_window):
    """4 points, a point per rank per batch, 3 ranks: the last batch holds one point, so two
    ranks get an empty batch there (a shuffled window gathered into an empty batch failed)."""
    ds = make_dataset(tmp_path, [4], fields)
    seen = []
    kw = {} if shuffle_window is None else {"shuffle_window": shuffle_window}
    for rank in range(3):
        with open_loader(ds, backend="fallback", device="cpu", batch_points=1, shuffle=True,
                         seed=4, rank=rank, world_size=3, **kw) as loader:
            batches = list(loader)
        assert len(batches) == 2
        name = fields[0].name
        sizes = [int(b[name].shape[0]) for b in batches]
        assert sizes[0] == 1 and sizes[1] in (0, 1)
        for b in batches:
            assert {k for k in b} == {f.name for f in fields}
            assert all(int(v.shape[0]) == int(b[name].shape[0]) for v in b.values())
        seen.append(sum(sizes))
    assert sum(seen) == 4


def test_a_state_saved_after_the_last_batch_resumes_in_a_set_epoch_loop(tmp_path):
    """A loop that saves after every step saves (epoch, all batches) at an epoch's end; the
    usual resume loop then calls set_epoch(saved epoch): it must not replay that epoch."""
    ds = make_dataset(tmp_path, [10], [FieldSpec("pid", np.dtype("<i8"))])
    opts = dict(backend="fallback", device="cpu", batch_points=4, shuffle=True, seed=0)
    with open_loader(ds, **opts) as loader:
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append([])
            for b in loader:
                epochs[-1].append(b["pid"].tolist())
                if epoch == 0:
                    saved = loader.state_dict()  # after every step
    assert saved["epoch"] == 0 and saved["batches_done"] == 3
    with open_loader(ds, **opts) as loader:  # for epoch in range(saved["epoch"], n)
        loader.load_state_dict(saved)
        got = []
        for epoch in range(saved["epoch"], 2):
            loader.set_epoch(epoch)
            got.append([b["pid"].tolist() for b in loader])
        assert got == [[], epochs[1]]
        assert loader.state_dict()["epoch"] == 2
    with open_loader(ds, **opts) as loader:  # plain iter(): the next epoch at once
        loader.load_state_dict(saved)
        assert [b["pid"].tolist() for b in loader] == epochs[1]
    with open_loader(ds, **opts) as loader:  # set_epoch of the next one: no warning, no replay
        loader.load_state_dict(saved)
        loader.set_epoch(1)
        assert [b["pid"].tolist() for b in loader] == epochs[1]


# -- what a manifest may name -------------------------------------------------------------------
def _manifest(ds_path):
    import json

    return json.loads((ds_path / "manifest.json").read_text())


def test_a_field_name_ending_in_a_newline_is_refused(tmp_path):
    import json

    from gds_stream.errors import DatasetError
    from gds_stream.format import open_dataset

    ds = make_dataset(tmp_path, [5], [FieldSpec("pid", np.dtype("<i8"))])
    ds.close()
    doc = _manifest(ds.path)
    doc["fields"][0]["name"] = "pid\n"
    (ds.path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"field name 'pid\\n' is not usable"):
        open_dataset(ds.path)


def test_a_manifest_that_is_a_symbolic_link_is_refused(tmp_path):
    import os

    from gds_stream.errors import DatasetError
    from gds_stream.format import open_dataset

    ds = make_dataset(tmp_path, [5], [FieldSpec("pid", np.dtype("<i8"))], name="a")
    ds.close()
    (tmp_path / "b").mkdir()
    os.symlink(ds.path / "manifest.json", tmp_path / "b" / "manifest.json")
    with pytest.raises(DatasetError, match=r"b/manifest.json: the manifest is a symbolic link"):
        open_dataset(tmp_path / "b")


def test_two_fields_in_one_file_under_two_names_are_refused(tmp_path):
    """A hard link makes two file names one file: fields on both names share its bytes."""
    import json
    import os

    from gds_stream.errors import DatasetError
    from gds_stream.format import open_dataset

    ds = make_dataset(tmp_path, [100], [FieldSpec("pid", np.dtype("<i8")),
                                        FieldSpec("y", np.dtype("<i8"))])
    ds.close()
    doc = _manifest(ds.path)
    files = {f["name"]: f["file"] for f in doc["fields"]}
    os.unlink(ds.path / files["y"])
    os.link(ds.path / files["pid"], ds.path / files["y"])
    for f in doc["fields"]:  # the copy's checksums: only the overlap may refuse it
        if f["name"] == "y":
            f["checksums"] = next(g for g in doc["fields"] if g["name"] == "pid")["checksums"]
    (ds.path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"fields 'pid' and 'y' overlap"):
        open_dataset(ds.path)


def test_too_many_fields_are_refused_before_any_is_checked(tmp_path):
    import json

    from gds_stream.errors import DatasetError
    from gds_stream.format import open_dataset

    ds = make_dataset(tmp_path, [5], [FieldSpec("pid", np.dtype("<i8"))])
    ds.close()
    doc = _manifest(ds.path)
    doc["fields"] = [dict(doc["fields"][0], name=f"f{i}") for i in range(50_000)]
    (ds.path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"lists 50000 fields; a dataset holds at most 4096"):
        open_dataset(ds.path)


@pytest.mark.parametrize("start, stop", [(0.0, 3), (0, "3"), (None, 3), (True, 3)])
def test_read_with_a_point_index_that_is_not_an_integer_is_a_dataset_error(tmp_path, start,
                                                                            stop):
    from gds_stream.errors import DatasetError

    ds = make_dataset(tmp_path, [5], [FieldSpec("pid", np.dtype("<i8"))])
    with pytest.raises(DatasetError, match=r"read\(\) (start|stop) must be an integer"):
        ds.read("pid", start, stop)
    assert ds.read("pid", np.int64(1), 3).tolist() == [1, 2]
