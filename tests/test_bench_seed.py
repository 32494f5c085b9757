"""The seed project's workload as a benchmark layout (``--layout seed``), run tiny through a
subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a program beside the package, not installed
    sys.path.insert(0, str(ROOT))

from bench.backbone import FIELDS  # noqa: E402


# -- the seed project's workload (--layout seed) -------------------------------------------------
SEED_LOADERS = ("seed-pipeline", "fallback-stack", "fallback-stack-cols", "fallback-loopstack",
                "compute-only")


@pytest.fixture(scope="module", params=["warm", "cold"])
def seed_smoke(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"bench-seed-{request.param}")
    cmd = [sys.executable, "-m", "bench.compare", "--layout", "seed", "--smoke", "--retries", "0",
           "--points", "120000", "--json", str(tmp / "s.json"), "--workdir", str(tmp)]
    if request.param == "cold":
        cmd.append("--cold")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    doc = json.loads((tmp / "s.json").read_text()) if proc.returncode == 0 else None
    return request.param, proc, doc


def test_seed_layout_runs_the_seed_pipeline_beside_stack_and_reports_paired_ratios(seed_smoke):
    cache, proc, doc = seed_smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "checksums: all equal" in out and "backbone: linear (6→64→3)" in out
    rows = {r["family"]: r for r in doc["loaders"]}
    assert sorted(rows) == sorted(SEED_LOADERS)
    for v in doc["all_variants"]:  # every loader yielded the same N × 6 float32 rows
        for cs in v["checksums"]:
            assert cs == doc["checksum"] and cs["points"] == 120_000
            assert list(cs["fields"]) == ["feat"]
    assert "'feat': ['x', 'y', 'z', 'intensity', 'sem_class', 'ins_class']" in \
        rows["fallback-stack"]["config"]["stack"]
    assert doc["environment"]["speedup_reference"] == "seed-pipeline"
    ratio = next(r for r in doc["paired_ratios"] if r["row"] == "fallback-stack")
    assert ratio["reference"] == "seed-pipeline"
    assert ratio["end_to_end"]["median"] > 0 and len(ratio["loader_only"]["pairs"]) >= 1
    assert "fallback-stack vs seed-pipeline end-to-end: paired median" in out
    assert "fallback-stack vs seed-pipeline loader-only: paired median" in out
    assert rows["fallback-stack-cols"]["config"]["stack_layout"] == "columns"
    assert "fallback-stack-cols vs seed-pipeline end-to-end: paired median" in out
    goals = [g["goal"] for g in doc["goals"]]
    assert goals == [f"fallback with stack= end-to-end ≥ 1.00× the seed pipeline ({cache})",
                     f'fallback with stack=, stack_layout="columns" end-to-end ≥ 1.00× the '
                     f'seed pipeline ({cache})']
    if cache == "cold":
        assert doc["page_cache"]["drop_method"] == "posix_fadvise(DONTNEED)"
        assert doc["environment"]["dataset"]["seed_file"] and doc["page_cache"]["worked"] in (
            True, None)  # None: no fincore to check with


def test_the_seed_file_holds_the_datasets_points_as_float32_rows(tmp_path):
    import numpy as np

    from bench import datagen
    from bench.seed import ensure_seed_file
    from gds_stream.format import open_dataset

    ds = open_dataset(datagen.ensure(tmp_path, 3_000, progress=False))
    try:
        path = ensure_seed_file(ds)
        rows = np.fromfile(path, dtype="<f4").reshape(-1, 6)
        want = np.stack([ds.read(f).astype(np.float32) for f in FIELDS], axis=1)
        assert rows.shape == (3_000, 6) and np.array_equal(rows, want)
        mtime = path.stat().st_mtime_ns
        assert ensure_seed_file(ds) == path and path.stat().st_mtime_ns == mtime  # reused
    finally:
        ds.close()


def test_our_loaders_read_the_seed_file_converted_six_float32_fields_of_the_same_bytes(tmp_path):
    import numpy as np

    from bench import datagen
    from bench.seed import ensure_seed_dataset, ensure_seed_file
    from gds_stream.format import open_dataset

    ds = open_dataset(datagen.ensure(tmp_path, 3_000, progress=False))
    try:
        seed = ensure_seed_file(ds)
        rows = np.fromfile(seed, dtype="<f4").reshape(-1, 6)
        out = ensure_seed_dataset(seed)
        conv = open_dataset(out)
        try:
            assert list(conv.schema) == list(FIELDS)
            for j, f in enumerate(FIELDS):
                got = conv.read(f)
                assert got.dtype == np.float32 and np.array_equal(got, rows[:, j])
        finally:
            conv.close()
        mtime = (out / "manifest.json").stat().st_mtime_ns
        assert ensure_seed_dataset(seed) == out
        assert (out / "manifest.json").stat().st_mtime_ns == mtime  # reused while up to date
        rows[:, 3] += 1  # a rewritten seed file: the dataset follows it
        rows.tofile(seed)
        ensure_seed_dataset(seed)
        conv = open_dataset(out)
        try:
            assert np.array_equal(conv.read("intensity"), rows[:, 3])
        finally:
            conv.close()
    finally:
        ds.close()


@pytest.mark.parametrize("extra, message", [
    (["--shuffle"], "--shuffle is for the default layout"),
    (["--train"], "--train is for the default layout"),
    (["--backbone", "mlp"], "Linear(6,64)-ReLU-Linear(64,3)"),
])
def test_seed_layout_refuses_what_the_seed_pipeline_cannot_do(extra, message):
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--layout", "seed", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
