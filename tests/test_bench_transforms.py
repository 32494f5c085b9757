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
    assert doc["budget"]["cut"] == {} and "nothing cut" in r.stdout   # the default budget fits


def test_transform_bench_fits_a_tiny_budget(tmp_path):
    """A budget already spent: the two pipelines the comparison needs still run (once each),
    the rest of the grids and the preset alone are cut, and the report says so."""
    out = tmp_path / "t.json"
    r = _run(["--transform", "semseg", "--smoke", "--workdir", str(tmp_path / "data"),
              "--budget", "0.01", "--repeat", "3", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [row["name"] for row in doc["rows"]] == ["gds-stream", "per-sample DataLoader"]
    assert all(row["repeat"] == 1 for row in doc["rows"])
    assert [g["label"] for g in doc["grid"]] == ["w=2"]       # every core first, then cut
    cut = doc["budget"]["cut"]
    assert cut["w=0"].startswith("skipped") and cut["the preset alone"].startswith("skipped")
    assert doc["solo_preset_ms"] is None and "not measured (skipped" in r.stdout
    assert "budget 0 s" in r.stdout and "cut: " in r.stdout


def test_transform_plan_sizes_repetitions_from_the_warm_up():
    from bench.budget import MARGIN, Budget
    from bench.transform_plan import TransformPlan
    now = [0.0]
    plan = TransformPlan(Budget(100.0, clock=lambda: now[0]), repeat=5, tail_epochs=2)
    assert plan.admit("a", essential=False)                  # nothing measured yet
    # room 100 - 2 x 4 x MARGIN = 90 s; each repetition 2 x 4 x MARGIN = 10 s: 5 fit
    assert plan.repetitions("a", 4.0, essential=True) == 5 and "a" not in plan.cut
    now[0] = 80.0                                            # 20 s left, 10 s kept: 1 fits
    assert plan.repetitions("b", 4.0, essential=True) == 1
    assert plan.cut["b"] == "1 of 5 repetitions (budget)"
    now[0] = 85.0                                            # 5 s of room: 3 x 4 x 1.25 = 15
    assert not plan.admit("c", essential=False) and plan.cut["c"].startswith("skipped")
    assert plan.admit("d", essential=True)                   # essential: always
    assert MARGIN == 1.25 and plan.describe()["repeats"] == {"a": 5, "b": 1}


def test_unknown_transform_preset_is_one_line_exit_2(tmp_path):
    r = _run(["--transform", "nope", "--smoke", "--workdir", str(tmp_path / "data")], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --transform: unknown preset 'nope' (presets: semseg)"]


def test_preset_only_times_each_transform(tmp_path):
    """``python -m bench.transform_bench --preset-only``: the preset alone on a resident batch,
    whole and per transform (median and best), as a table and as JSON; bad sizes refused in one
    line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "solo.json"
    r = subprocess.run([sys.executable, "-m", "bench.transform_bench", "--preset-only",
                        "--points", "3000", "--runs", "2", "--json", str(out)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["points"] == 3000 and doc["runs"] == 2 and len(doc["load_average"]) == 3
    names = list(doc["transform_ms"])
    assert names[0] == "CenterShift 1" and names[-1] == "ToPointcept" and "GridSample" in names
    for v in [doc["preset_ms"], *doc["transform_ms"].values()]:
        assert 0 < v["min"] <= v["median"]
    assert "median / best of 2 (ms)" in r.stdout and "ElasticDistortion" in r.stdout
    assert "threaded" not in doc
    r = subprocess.run([sys.executable, "-m", "bench.transform_bench", "--preset-only",
                        "--points", "3000", "--runs", "2", "--threads", "2", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    th = json.loads(out.read_text())["threaded"]
    assert th["threads"] == 2 and sorted(th["batches_per_s"]) == ["1", "2"]
    assert all(len(v) == 3 and min(v) > 0 for v in th["batches_per_s"].values())
    assert "1 thread " in r.stdout and "2 threads " in r.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.transform_bench", "--preset-only",
                          "--threads", "-1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --threads must be >= 0, and is for --device cpu"]
    bad = subprocess.run([sys.executable, "-m", "bench.transform_bench", "--preset-only",
                          "--points", "3"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --points must be >= 16 and --runs >= 1"]
    none = subprocess.run([sys.executable, "-m", "bench.transform_bench"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert none.returncode == 2 and len(none.stderr.strip().splitlines()) == 1
