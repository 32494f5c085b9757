"""``python -m bench.compare --transform semseg`` runs tiny in CI (``--smoke``), through a
subprocess, and refuses an unknown preset in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    # one intra-op thread: the smoke run checks that every pipeline runs, not speed, and torch's
    # OpenMP pool spinning on an oversubscribed CI machine makes it 10x slower
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.compare", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_transform_bench_smoke(tmp_path):
    out = tmp_path / "t.json"
    r = _run(["--transform", "semseg", "--smoke", "--workdir", str(tmp_path / "data"),
              "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    names = [row["name"] for row in doc["rows"]]
    assert names == ["gds-stream", "per-sample DataLoader"]
    for row in doc["rows"]:
        assert row["points_per_s"] > 0 and row["train"]["batches"] > 0
        assert 0 <= row["stall_share"] <= 1
    # both pipelines saw every chunk once per epoch and kept (almost) every point: the preset's
    # crop bounds each chunk, GridSample at 5 cm merges few points of ~0.4 point/m² data
    pts = doc["dataset"]["points"]
    for row in doc["rows"]:
        assert 0.5 * pts < row["loader_only"]["out_points"] <= pts
    assert len(doc["grid"]) >= 2 and doc["ratio_points_per_s"] > 0
    assert "ratio gds-stream / best per-sample DataLoader" in r.stdout
    # the preset alone, transform by transform: every step of the preset timed
    each = doc["solo_transform_ms"]
    assert {"ElasticDistortion", "GridSample", "CenterShift 1", "CenterShift 2"} <= set(each)
    assert all(v > 0 for v in each.values()) and doc["solo_preset_ms"] > 0
    assert "per transform (ms): CenterShift 1 " in r.stdout


def test_unknown_transform_preset_is_one_line_exit_2(tmp_path):
    r = _run(["--transform", "nope", "--smoke", "--workdir", str(tmp_path / "data")], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --transform: unknown preset 'nope' (presets: semseg)"]
