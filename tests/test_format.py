"""The on-disk format: manifest records (origin, chunks), validation of every manifest claim,
safe reading of manifest and field files, atomic publishing, cleanup after killed writers, and a
manifest fuzz test. Every failure must be a DatasetError (ConversionError when writing)."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gds_stream import _publish
from gds_stream.errors import ConversionError, DatasetError
from gds_stream.format import MANIFEST, DatasetWriter, FieldSpec, open_dataset

FIELDS = (FieldSpec("x", np.dtype("<f4"), 3), FieldSpec("label", np.dtype("<u2")))


def write(out: Path, scans=(5, 0, 7), block_bytes: int = 4096, **kw) -> Path:
    rng = np.random.default_rng(len(scans))
    with DatasetWriter(out, FIELDS, block_bytes=block_bytes, **kw) as w:
        for i, n in enumerate(scans):
            w.append({"x": rng.standard_normal((n, 3)).astype("<f4"),
                      "label": np.arange(n, dtype="<u2")})
            w.end_scan(f"scan{i}")
    return out


def load(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def save(out: Path, doc: object) -> None:
    (out / MANIFEST).write_text(json.dumps(doc))


def refused(out: Path, match: str | None = None) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        ds = open_dataset(out)
        for name in ds.schema:  # a manifest that opens must also read
            ds.read(name)
        ds.verify()
    assert str(out) in str(info.value)
    return info.value


# -- A1: origin ------------------------------------------------------------------------------
def test_origin_round_trip_and_default(tmp_path):
    ds = open_dataset(write(tmp_path / "a", origin=(1.5, -2.0, 1e6)))
    assert ds.origin.dtype == np.float64 and ds.origin.tolist() == [1.5, -2.0, 1e6]
    with pytest.raises(ValueError):
        ds.origin[0] = 3.0  # read-only
    assert open_dataset(write(tmp_path / "b")).origin.tolist() == [0.0, 0.0, 0.0]
    assert "origin" not in load(tmp_path / "b")


def test_origin_set_before_finish(tmp_path):
    out = tmp_path / "ds"
    with DatasetWriter(out, FIELDS) as w:
        w.origin = (1, 2, 3)
        w.set_origin([4.0, 5.0, 6.0])
        w.end_scan("empty")
    assert open_dataset(out).origin.tolist() == [4.0, 5.0, 6.0]


@pytest.mark.parametrize("bad", [(1, 2), (1, 2, float("nan")), (0, 0, float("inf")), "abc"])
def test_writer_refuses_bad_origin(tmp_path, bad):
    with pytest.raises(ConversionError, match="origin"):
        DatasetWriter(tmp_path / "ds", FIELDS, origin=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [[1, 2], [1, 2, "3"], [1, 2, True], "0,0,0", {"x": 1},
                                 [1, 2, 10**400], None])
def test_reader_refuses_bad_origin(tmp_path, bad):
    out = write(tmp_path / "ds")
    doc = load(out)
    doc["origin"] = bad
    save(out, doc)
    refused(out, "origin")


def test_reader_refuses_nan_origin(tmp_path):
    out = write(tmp_path / "ds")
    text = (out / MANIFEST).read_text().replace('"format"', '"origin": [0, NaN, 1], "format"')
    (out / MANIFEST).write_text(text)
    refused(out, "origin")


# -- A2: chunks ------------------------------------------------------------------------------
def write_chunked(out: Path, dims: int = 2) -> Path:
    rng = np.random.default_rng(3)
    with DatasetWriter(out, FIELDS, block_bytes=4096, chunk_size=2.5, chunk_dims=dims) as w:
        for s, sizes in enumerate(([3, 2], [], [4])):
            n = sum(sizes)
            for k, c in enumerate(sizes):  # chunks may be declared before the points
                w.add_chunk(c, (s, k, 0), (0, 0, 0, 1, 1, float(k)))
            w.append({"x": rng.standard_normal((n, 3)).astype("<f4"),
                      "label": np.arange(n, dtype="<u2")})
            w.end_scan(f"scan{s}")
    return out


def test_chunks_round_trip(tmp_path):
    ds = open_dataset(write_chunked(tmp_path / "ds"))
    assert ds.num_chunks == 3 and ds.chunk_size == 2.5 and ds.chunk_dims == 2
    assert ds.chunk_offsets.dtype == np.int64 and ds.chunk_offsets.tolist() == [0, 3, 5, 9]
    assert ds.chunk_scan.tolist() == [0, 0, 2]
    assert ds.chunk_cells.dtype == np.int64 and ds.chunk_cells.tolist() == [[0, 0, 0], [0, 1, 0],
                                                                             [2, 0, 0]]
    assert ds.chunk_bounds.shape == (3, 6) and ds.chunk_bounds[1].tolist() == [0, 0, 0, 1, 1, 1]
    for a in (ds.chunk_offsets, ds.chunk_scan, ds.chunk_cells, ds.chunk_bounds):
        assert not a.flags.writeable


def test_no_chunks(tmp_path):
    ds = open_dataset(write(tmp_path / "ds"))
    assert ds.num_chunks == 0 and ds.chunk_offsets.tolist() == [0]
    assert ds.chunk_bounds.shape == (0, 6) and ds.chunk_cells.shape == (0, 3)
    assert ds.chunk_size == 0.0 and ds.chunk_dims == 0


def test_writer_chunk_errors(tmp_path):
    with pytest.raises(ConversionError, match="without chunk_size"):
        with DatasetWriter(tmp_path / "a", FIELDS) as w:
            w.add_chunk(1, (0, 0, 0), (0,) * 6)
    with pytest.raises(ConversionError, match="chunks of scan 0"):
        with DatasetWriter(tmp_path / "b", FIELDS, chunk_size=1.0) as w:
            w.append({"x": np.zeros((4, 3), "<f4"), "label": np.zeros(4, "<u2")})
            w.add_chunk(3, (0, 0, 0), (0,) * 6)
            w.end_scan("s")
    with DatasetWriter(tmp_path / "c", FIELDS, chunk_size=1.0) as w:
        with pytest.raises(ConversionError, match="bounds"):
            w.add_chunk(1, (0, 0, 0), (1, 0, 0, 0, 0, 0))
        with pytest.raises(ConversionError, match=">= 1"):
            w.add_chunk(0, (0, 0, 0), (0,) * 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


CHUNK_LIES = [
    ("offsets", [0, 3, 5], "from 0 to num_points"),
    ("offsets", [0, 5, 3, 9], "increase strictly"),
    ("offsets", [0, 3, 3, 9], "increase strictly"),
    ("offsets", [0, 2, 6, 9], "inside its scan"),  # chunk 1 spans scans 0..2
    ("offsets", [0, 3, 5, 2**64], "integers"),
    ("scan", [0, 0], "one per chunk"),
    ("scan", [0, 0, 3], "scan >= 3"),
    ("scan", [0, 1, 2], "inside its scan"),
    ("scan", [0, 0, -1], "integers"),
    ("cell", [[0, 0, 0], [0, 1, 0]], "cell"),
    ("cell", [[0, 0, 0], [0, 1], [2, 0, 0]], "cell"),
    ("cell", [[0, 0, 0], [0, 1, 0], [2, 0, 2**63]], "cell"),
    ("bounds", [[0, 0, 0, 1, 1, 1]] * 2, "bounds"),
    ("bounds", [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 0, 0, 1, 1, 1]], "min <= max"),
    ("bounds", [[0, 0, 0, 1, 1, 1]] * 2 + [[0, 0, 0, 1, 1, "1"]], "bounds"),
    ("size", 0, "size"),
    ("size", "1", "size"),
    ("dims", 4, "dims"),
    ("dims", True, "dims"),
]


@pytest.mark.parametrize("key,value,match", CHUNK_LIES)
def test_reader_refuses_lying_chunks(tmp_path, key, value, match):
    out = write_chunked(tmp_path / "ds")
    doc = load(out)
    doc["chunks"][key] = value
    save(out, doc)
    refused(out, match)


def test_reader_refuses_chunks_not_an_object(tmp_path):
    out = write_chunked(tmp_path / "ds")
    doc = load(out)
    doc["chunks"] = [1, 2]
    save(out, doc)
    refused(out, "chunks must be an object")
