"""Loader-core behaviour that is easy to get wrong around object lifetimes."""

from __future__ import annotations

import gc
import threading

import numpy as np

from gds_stream.format import DatasetWriter, FieldSpec
from gds_stream.backends import open_loader


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
    it = iter(open_loader(_tiny(tmp_path), backend="fallback", device="cpu", batch_points=100))
    next(it)
    assert set(threading.enumerate()) - base  # workers run
    del it
    gc.collect()
    assert not set(threading.enumerate()) - base
