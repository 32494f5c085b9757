"""Resume in the usual training loop: ``load_state_dict`` then ``set_epoch``."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gds_stream.backends import open_loader
from helpers import make_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume"), [5000, 12_001, 3000],
                        block_bytes=4096)


OPTS = [dict(batch_points=1_000, shuffle=True, seed=3, fields=["pid"]),
        dict(batch_scans=1, shuffle=True, seed=1, fields=["pid"]),
        dict(batch_points=700, shuffle=True, shuffle_window=0, fields=["pid"])]


def _pids(loader):
    return [b["pid"].numpy().copy() for b in loader]


@pytest.mark.parametrize("opts", OPTS, ids=str)
def test_set_epoch_of_the_resumed_epoch_keeps_the_position(ds, opts, caplog):
    with open_loader(ds, backend="fallback", device="cpu", **opts) as ld:
        want = {}
        for e in range(3):
            ld.set_epoch(e)
            want[e] = _pids(ld)
        ld.set_epoch(1)
        it = iter(ld)
        cut = len(want[1]) // 2
        for _ in range(cut):
            next(it)
        ckpt = ld.state_dict()
        it.close()
    with caplog.at_level(logging.WARNING), open_loader(ds, backend="fallback", device="cpu",
                                                       **opts) as ld:
        ld.load_state_dict(ckpt)
        got = {}
        for epoch in range(ckpt["epoch"], 3):  # the usual loop
            ld.set_epoch(epoch)
            got[epoch] = _pids(ld)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(got[1]) == len(want[1]) - cut  # no batch seen before the checkpoint again
    assert all(np.array_equal(a, b) for a, b in zip(got[1], want[1][cut:]))
    assert all(np.array_equal(a, b) for a, b in zip(got[2], want[2]))


def test_set_epoch_of_another_epoch_drops_the_resume_position_with_a_warning(ds, caplog):
    opts = OPTS[0]
    with open_loader(ds, backend="fallback", device="cpu", **opts) as ld:
        ld.set_epoch(2)
        it = iter(ld)
        next(it), next(it)
        ckpt = ld.state_dict()
        it.close()
        ld.set_epoch(0)
        want0 = _pids(ld)
    with caplog.at_level(logging.WARNING), open_loader(ds, backend="fallback", device="cpu",
                                                       **opts) as ld:
        ld.load_state_dict(ckpt)
        ld.set_epoch(0)
        got0 = _pids(ld)
    assert len(got0) == len(want0) and all(np.array_equal(a, b) for a, b in zip(got0, want0))
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1
    assert "set_epoch(0) drops the resume position" in msgs[0]
    assert "epoch 2 at batch 2" in msgs[0]


@pytest.mark.parametrize("change", ["scans", "bytes"])
def test_resume_onto_a_replaced_dataset_of_the_same_size_is_refused(tmp_path, change):
    """The state dict recorded only the point and scan counts: a dataset replaced by one of the
    same counts but other scan sizes (or other values) resumed its epoch from the other plan
    and data without a word. The same data converted again still resumes."""
    import shutil

    from gds_stream.errors import LoaderError

    make_dataset(tmp_path, [5000, 5000, 5000], name="ds")
    opts = dict(batch_scans=1, seed=1, fields=["pid", "x"], device="cpu", backend="fallback")
    with open_loader(tmp_path / "ds", **opts) as ld:
        it = iter(ld)
        next(it)
        state = ld.state_dict()
    shutil.rmtree(tmp_path / "ds")
    make_dataset(tmp_path, [5000, 5000, 5000], name="ds")  # the same data again
    with open_loader(tmp_path / "ds", **opts) as ld:
        ld.load_state_dict(state)
        assert sum(len(b["pid"]) for b in ld) == 10_000
    shutil.rmtree(tmp_path / "ds")
    if change == "scans":
        make_dataset(tmp_path, [7000, 3000, 5000], name="ds")
    else:  # x holds other random values
        make_dataset(tmp_path, [5000, 5000, 5000], name="ds", seed=7)
    with open_loader(tmp_path / "ds", **opts) as ld:
        with pytest.raises(LoaderError, match=rf"{tmp_path / 'ds'}: state_dict was saved on "
                                              rf"another version of this dataset"):
            ld.load_state_dict(state)


def test_resume_onto_a_file_rewritten_in_place_checks_its_blocks(tmp_path, caplog):
    """A cp over a field file between the checkpoint and the resume keeps the manifest, so the
    state dict's fingerprint matched and the resumed epoch read the new bytes after the old
    ones. The files' stamps differ: the resumed loader checks the blocks it reads, so the
    rewrite fails by name; an identical copy (new mtime, same bytes) resumes as before."""
    import os
    import shutil

    from gds_stream.errors import LoaderError
    from gds_stream.format import open_dataset

    make_dataset(tmp_path, [5000, 5000, 5000], name="ds", block_bytes=4096)
    opts = dict(batch_points=2_000, fields=["pid", "x"], device="cpu", backend="fallback")
    with open_loader(tmp_path / "ds", **opts) as ld:
        want = [b["pid"].numpy().copy() for b in ld]
        it = iter(ld)
        next(it), next(it)
        state = ld.state_dict()
    assert set(state["files"]) == {"pid", "x"}
    shutil.copytree(tmp_path / "ds", tmp_path / "copy")  # same bytes, new mtimes
    os.utime(tmp_path / "copy" / open_dataset(tmp_path / "copy").layout("x").file,
             ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="gds_stream"):
        with open_loader(tmp_path / "copy", **opts) as ld:
            ld.load_state_dict(state)
            got = [b["pid"].numpy().copy() for b in ld]
    assert len(got) == len(want) - 2 and all(np.array_equal(g, w) for g, w in zip(got, want[2:]))
    assert "changed (size or modification time) since the state dict was saved" in caplog.text
    # a rewrite in place: the second half of x replaced by other values of the same size
    ds = open_dataset(tmp_path / "ds")
    lay = ds.layout("x")
    path = tmp_path / "ds" / lay.file
    ds.close()
    data = bytearray(path.read_bytes())
    half = lay.offset + lay.nbytes // 2
    data[half:lay.offset + lay.nbytes] = bytes(lay.offset + lay.nbytes - half)
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    with open_loader(tmp_path / "ds", **opts) as ld:
        ld.load_state_dict(state)
        with pytest.raises(LoaderError, match=r"crc32") as info:
            for _ in ld:
                pass
    assert lay.file in str(info.value)
