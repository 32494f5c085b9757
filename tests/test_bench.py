"""The benchmark (bench/): the smoke run of every loader variant, the checksum that guards it,
the verdict logic, the plot and the time budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a program beside the package, not installed
    sys.path.insert(0, str(ROOT))

from bench.backbone import FIELDS, Checksum, ChecksumMismatch, compare_checksums  # noqa: E402
from bench.goals import STATUSES  # noqa: E402
LOADERS = ("sequential", "queue", "torch-dataloader", "fallback", "compute-only")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    # --retries 0: on a busy CI machine retries only cost time (the retry path is unit-tested)
    cmd = [sys.executable, "-m", "bench.compare", "--smoke", "--retries", "0", "--task-sizes", "1,4",
           "--json", str(tmp / "r.json"),
           "--plot", str(tmp / "r.png"), "--workdir", str(tmp)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    doc = json.loads((tmp / "r.json").read_text()) if proc.returncode == 0 else None
    return tmp, proc, doc


def test_smoke_exits_zero_and_prints_the_table(smoke):
    _, proc, _ = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "checksums: all equal" in out
    for name in LOADERS:
        assert name in out
    assert "goals" in out
    # correctness is printed before any speed
    assert out.index("checksums: all equal") < out.index("limits (measured")


def test_json_has_every_loader_and_its_loader_only_run(smoke):
    _, proc, doc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in doc["loaders"]}
    for name in LOADERS:
        assert name in rows, f"{name} missing from {sorted(rows)}"
    if "gds" not in rows:
        assert doc["skipped"]["gds"]["reason"], "gds neither ran nor says why it was skipped"
    points = doc["environment"]["dataset"]["points"]
    for name, r in rows.items():
        assert r["wall_s"] > 0 and r["points_per_s"] > 0 and r["gb_per_s"] > 0, name
        assert 0 <= r["stall_fraction"] <= 1.0 + 1e-9, name
        if name == "compute-only":
            continue
        lo = r["loader_only"]
        assert lo["wall_s"] > 0 and lo["points_per_s"] > 0, name
        assert all(p == points for p in lo["points"]), name
        assert r["overlap_efficiency"] > 0, name
    # the whole torch DataLoader grid ran, and one is marked best
    grid = doc["torch_dataloader_grid"]
    assert len(grid) >= 2 and sum(bool(g["best"]) for g in grid) == 1
    assert all("loader_only" in g for g in grid)
    assert any(g["config"]["num_workers"] > 0 for g in grid)


def test_all_checksums_equal_and_cover_the_dataset(smoke):
    _, proc, doc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert doc["checksums_equal"] is True
    ref = doc["checksum"]
    assert ref["points"] == doc["environment"]["dataset"]["points"] == 200_000
    for v in doc["all_variants"]:
        for cs in v["checksums"]:
            assert cs == ref, v["name"]


def test_plot_is_a_png(smoke):
    tmp, proc, _ = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = (tmp / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_task_size_sweep_runs_on_a_gpu_or_says_why_not(smoke):
    _, proc, doc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    ts = doc["task_sizes"]
    if "gds" in doc["skipped"]:
        assert doc["skipped"]["gds"]["reason"] in ts["skipped"]
        assert "KvikIO task_size sweep" in proc.stdout and "skipped" in proc.stdout
    else:
        assert [r["task_size_mib"] for r in ts["rows"]] == [1, 4]
        assert all(r.get("gb_per_s", 0) > 0 for r in ts["rows"]), ts


def test_the_run_says_its_plan_and_a_progress_line_per_loader(smoke):
    _, proc, doc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "plan: " in err and "budget" in err and "1 repetition(s)" in err
    for name in LOADERS:
        assert any(line.startswith("[rep 1/1] " + name) for line in err.splitlines()), name


def test_gds_shuffles_exactly_like_fallback(monkeypatch):
    from types import SimpleNamespace

    import bench.compare as compare

    made = []

    def fake(family, path, batch, device, **kw):
        made.append((family, kw))
        return compare.Variant(family)

    monkeypatch.setattr(compare, "LibraryVariant", fake)
    for name in ("SequentialVariant", "QueueVariant", "ComputeOnlyVariant"):
        monkeypatch.setattr(compare, name, lambda *a, **k: compare.Variant("x"))
    cuda = SimpleNamespace(cuda=True, device="cuda:0")
    ds = SimpleNamespace(num_points=10, path="p")
    for argv, want in ((["--shuffle", "--seed", "7"],
                        {"shuffle": True, "seed": 7, "batch_chunks": None}),
                       ([], {"shuffle": False, "seed": 0, "batch_chunks": None}),
                       (["--shuffle", "--chunk-size", "50", "--batch-chunks", "3"],
                        {"shuffle": True, "seed": 0, "batch_chunks": 3})):
        made.clear()
        compare._build_variants(compare.parse_args(argv), ds, [], 5, cuda,
                                SimpleNamespace(available=True, reason=""), [], {})
        assert made == [("fallback", want), ("gds", want)]


def test_limits_and_goals_are_reported(smoke):
    _, proc, doc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert doc["limits"]["read_warm_bytes_per_s"] > 0
    if torch.cuda.is_available():
        assert doc["limits"]["h2d_pinned_bytes_per_s"] > 0
    assert doc["goals"] and all(g["status"] in STATUSES for g in doc["goals"])
    assert doc["measurement"]["verdict"] in ("clean", "inconclusive")


# -- the checksum itself ------------------------------------------------------------------------
def _batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {f: torch.rand(n, generator=g) for f in FIELDS[:4]}
    b.update({f: torch.randint(-1, 9, (n,), generator=g, dtype=torch.int32) for f in FIELDS[4:]})
    return b


def _sum(batches) -> dict:
    cs = Checksum(FIELDS, "cpu")
    for b in batches:
        cs.update(b)
    return cs.result()


def test_checksum_is_order_independent_within_the_epoch():
    b = _batch(1000)
    perm = torch.randperm(1000)
    shuffled = {k: v[perm] for k, v in b.items()}
    halves = [{k: v[:400] for k, v in b.items()}, {k: v[400:] for k, v in b.items()}]
    assert _sum([b]) == _sum([shuffled]) == _sum(halves[::-1])


def test_checksum_ties_the_fields_of_a_point_together():
    b = _batch(1000)
    mixed = {k: v.clone() for k, v in b.items()}
    # swap x between two points: every per-field sum is unchanged, the row hash is not
    mixed["x"][[3, 7]] = mixed["x"][[7, 3]]
    a, m = _sum([b]), _sum([mixed])
    assert a["fields"] == m["fields"] and a["rows"] != m["rows"]


def test_checksum_mismatch_names_the_loaders():
    good = _sum([_batch(500)])
    bad = _sum([_batch(500, seed=1)])
    short = _sum([{k: v[:499] for k, v in _batch(500).items()}])
    compare_checksums({"sequential": good, "fallback": dict(good)})  # equal: no error
    with pytest.raises(ChecksumMismatch) as err:
        compare_checksums({"sequential": good, "fallback": good, "queue": bad, "gds": short})
    msg = str(err.value)
    assert "queue" in msg and "gds" in msg and "fallback differs" not in msg
    assert "points 499 vs 500" in msg


def test_check_results_rejects_a_short_loader_only_run():
    from bench.measure import RunResult, Stats, check_results

    cs = _sum([_batch(100)])
    ok = Stats("sequential", "sequential", "", {}, [RunResult(1.0, 0.1, 100, 1, cs)],
               [RunResult(0.1, 0.1, 100, 1, None)])
    short = Stats("queue", "queue", "", {}, [RunResult(1.0, 0.1, 100, 1, cs)],
                  [RunResult(0.1, 0.1, 90, 1, None)])
    assert check_results([ok], 100) == cs
    with pytest.raises(ChecksumMismatch, match="queue loader-only run 1: 90 points"):
        check_results([ok, short], 100)


def test_script_form_runs():
    proc = subprocess.run([sys.executable, "bench/compare.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--smoke" in proc.stdout and "--cold" in proc.stdout


# -- the GPU-only reporting paths, fed synthetic numbers (they can't run on a CPU machine) ----
def _row(family, wall, lo_wall=None, name=None, spread=0.02):
    nbytes = 24 * 36_831_590
    runs = [wall * (1 - spread / 2), wall, wall * (1 + spread / 2)]
    r = {"name": name or family, "family": family, "backend": family, "config": {},
         "wall_s": wall, "wall_s_runs": runs, "wall_spread": spread,
         "points_per_s": 36_831_590 / wall,
         "gb_per_s": nbytes / wall / 1e9, "stall_s": 0.1 * wall, "stall_fraction": 0.1,
         "speedup_vs_sequential": 1.0, "other_load_max": 0.0}
    if lo_wall is not None:
        r["loader_only"] = {"wall_s": lo_wall, "gb_per_s": nbytes / lo_wall / 1e9,
                            "wall_s_runs": [lo_wall] * 3, "wall_spread": spread,
                            "best_gb_per_s": nbytes / lo_wall / 1e9 * 1.05,
                            "points_per_s": 36_831_590 / lo_wall}
        r["overlap_efficiency"] = 0.9
    return r


def test_gpu_goals_are_evaluated_with_their_numbers():
    from bench.goals import evaluate_goals

    rows = {"sequential": _row("sequential", 4.0, 3.5), "queue": _row("queue", 3.0, 2.5),
            "torch-dataloader": _row("torch-dataloader", 1.2, 1.0, "torch-dataloader[w=4]"),
            "fallback": _row("fallback", 0.9, 0.8), "gds": _row("gds", 0.5, 0.45),
            "compute-only": _row("compute-only", 0.3)}
    limits = {"read_warm_bytes_per_s": 2.0e9, "h2d_pinned_bytes_per_s": 25e9}
    goals = {g["goal"]: g for g in evaluate_goals(rows, limits, True, "linear", False, None)}
    assert goals["gds ≥ 3× queue (--backbone linear)"]["status"] == "met"  # 6×
    assert goals["gds ≥ 1.5× best torch-dataloader (--backbone linear)"]["status"] == "met"
    lo = goals["gds loader-only ≥ 90 % of min(read, pinned H2D bandwidth)"]
    assert lo["status"] == "met" and "of 2.00 GB/s" in lo["detail"]  # 1.96 GB/s = 98 %
    bal = goals["balanced: gds wall ≤ 1.05 × max(compute-only, gds loader-only)"]
    assert bal["status"] == "missed" and "1.05 × 0.450 s" in bal["detail"]  # 0.5 > 0.4725
    mlp = evaluate_goals(rows, limits, True, "mlp", False, None)
    assert "stated for linear" in mlp[0]["detail"]
    skipped = evaluate_goals({k: v for k, v in rows.items() if k != "gds"}, limits, True,
                             "linear", False, "cupy is not installed")
    assert skipped and all(g["status"] == "not evaluated" and "cupy is not installed" in
                           g["detail"] for g in skipped)


def test_render_and_plot_with_a_gds_row(tmp_path):
    from bench.plot import plot
    from bench.report import render

    rows = [_row("sequential", 4.0, 3.5), _row("gds", 0.5, 0.45), _row("compute-only", 0.3)]
    rows[1]["backend"] = "gds-compat"
    env = {"device": "NVIDIA H100 80GB HBM3 (cuda:0, 79 GiB)", "gpu_direct": "gds-compat: x",
           "versions": {"python": "3", "torch": "2", "torch_cuda": "13.0", "numpy": "2",
                        "cupy": "14", "kvikio": "26"},
           "cpu_count": 16, "torch_threads": 16,
           "dataset": {"path": "d", "points": 36_831_590, "scans": 4,
                       "bytes_selected": 24 * 36_831_590, "fields": ["x"] * 6},
           "batch_points": 1_000_000, "backbone": "linear (6→64→9)", "mode": "inference",
           "page_cache": "warm", "page_cache_check": "warm", "repeat": 3,
           "loader_only_repeat": 15, "torch_cpu_thp": "-", "other_load": None, "command": "c"}
    limits = {"read_warm_bytes_per_s": 10e9, "read_warm_1t_bytes_per_s": 5e9,
              "read_warm_nt_bytes_per_s": 10e9, "read_threads": 16, "read_repeats": 3,
              "h2d_pinned_bytes_per_s": 25e9, "d2d_bytes_per_s": 1.5e12}
    text = render(env, limits, rows, [], {}, [], 24, {"points": 36_831_590, "rows": 1})
    assert "gds-compat" in text and "host→device, pinned" in text and "device→device" in text
    plot(tmp_path / "g.png", env, rows, limits, None, {})
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_speedup_cancels_drift():
    from bench.measure import paired_speedup

    # the machine slows down 2× over the run; the loader is 10 % faster in every pair
    ref = {"wall_s": 2.0, "wall_s_runs": [1.0, 2.0, 4.0]}
    row = {"wall_s": 1.8, "wall_s_runs": [0.9, 1.8, 3.6]}
    r, spread = paired_speedup(row, ref)
    assert r == pytest.approx(1 / 0.9) and spread == pytest.approx(0.0)
    r, spread = paired_speedup({"wall_s": 1.0, "wall_s_runs": [1.0]}, ref)  # unpaired
    assert r == 2.0 and spread is None


def test_a_loader_that_consumes_other_points_fails_the_run_before_any_speed(
        tmp_path, monkeypatch, capsys):
    import bench.compare as compare
    import bench.schedule as schedule

    real = schedule.run_epoch

    def corrupting(variant, dev, step, limit_batches=None):
        r = real(variant, dev, step, limit_batches)
        if variant.family == "queue" and r.checksum is not None:
            r.checksum = dict(r.checksum, fields=dict(r.checksum["fields"], z=0))
        return r

    monkeypatch.setattr(schedule, "run_epoch", corrupting)
    rc = compare.main(["--smoke", "--retries", "0", "--workdir", str(tmp_path),
                       "--json", str(tmp_path / "r.json"), "--no-gds"])
    out, err = capsys.readouterr()
    assert rc == compare.EXIT_MISMATCH
    assert "queue" in err and "field z" in err
    assert "GB/s" not in out and "Mpts/s" not in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["checksums_equal"] is False and "queue" in doc["error"]


# -- verdicts: a measurement that can't be trusted says so (synthetic numbers) -----------------
def _cpu_rows(compute_wall=2.0, spread=0.02):
    return {"sequential": _row("sequential", 4.0, 3.5, spread=spread),
            "fallback": _row("fallback", 3.0, 0.25, spread=spread),
            "compute-only": _row("compute-only", compute_wall, spread=spread)}


CPU_LIMITS = {"read_warm_bytes_per_s": 3.0e9}
QUIET = {"other_fraction": 0.01, "steal_fraction": 0.0}


def test_a_clean_run_gives_firm_verdicts():
    from bench.goals import assess, evaluate_goals

    rows = _cpu_rows()
    q = assess(rows, QUIET)
    assert q == {"verdict": "clean", "reasons": [], "summary": "", "notes": []}
    goals = evaluate_goals(rows, CPU_LIMITS, False, "mlp", False, None, q)
    assert [g["status"] for g in goals] == ["met", "met"]  # 1.33×; 3.54 GB/s ≥ 80 % of 3.0


def test_compute_only_slower_than_a_loader_makes_every_verdict_inconclusive():
    from bench.goals import assess, evaluate_goals

    rows = _cpu_rows(compute_wall=7.56)  # slower than fallback (3.0 s) and sequential (4.0 s)
    q = assess(rows, QUIET)
    assert q["verdict"] == "inconclusive"
    assert any("compute-only" in r and "fallback" in r for r in q["reasons"])
    goals = evaluate_goals(rows, CPU_LIMITS, False, "mlp", False, None, q)
    assert goals and all(g["status"] == "inconclusive" for g in goals)
    assert goals[0]["leaning"] == "met"
    assert "compute-only slower than sequential, fallback" in goals[0]["reasons"][0]
    assert "impossible in a clean run" in q["reasons"][0]


def test_compute_only_a_little_slower_within_noise_is_not_flagged():
    from bench.goals import assess

    rows = _cpu_rows(compute_wall=3.25, spread=0.10)  # 8 % over fallback, spread 10 %
    assert assess(rows, QUIET)["verdict"] == "clean"
    rows = _cpu_rows(compute_wall=3.25, spread=0.0)  # the same, but beyond a 5 % floor
    assert assess(rows, QUIET)["verdict"] == "inconclusive"


def test_other_load_above_the_threshold_makes_the_run_inconclusive():
    from bench.goals import LOAD_THRESHOLD, assess, evaluate_goals

    busy = {"other_fraction": 0.40, "steal_fraction": 0.03}
    q = assess(_cpu_rows(), busy)
    assert q["verdict"] == "inconclusive" and "43.0%" in q["reasons"][0]
    goals = evaluate_goals(_cpu_rows(), CPU_LIMITS, False, "mlp", False, None, q)
    assert all(g["status"] == "inconclusive" for g in goals)
    edge = {"other_fraction": LOAD_THRESHOLD - 0.01, "steal_fraction": 0.0}
    assert assess(_cpu_rows(), edge)["verdict"] == "clean"


def test_a_margin_smaller_than_the_spread_is_inconclusive_not_met():
    from bench.goals import assess, evaluate_goals

    rows = _cpu_rows(spread=0.74)
    rows["fallback"] = _row("fallback", 3.8, 0.25, spread=0.74)
    rows["fallback"]["wall_s_runs"] = [2.0, 3.8, 5.0]  # paired with sequential's 3.96/4.0/4.04
    q = assess(rows, QUIET)
    goals = {g["goal"]: g for g in evaluate_goals(rows, CPU_LIMITS, False, "mlp", False, None, q)}
    g = goals["fallback end-to-end not slower than sequential"]
    assert g["status"] == "inconclusive" and "within the run-to-run spread" in g["reasons"][0]


def test_a_disturbed_row_or_a_single_repetition_is_inconclusive():
    from bench.goals import assess, evaluate_goals

    rows = _cpu_rows()
    rows["fallback"]["disturbed_runs"], rows["fallback"]["other_load_max"] = 2, 0.43
    goals = evaluate_goals(rows, CPU_LIMITS, False, "mlp", False, None, assess(rows, QUIET))
    assert goals[0]["status"] == "inconclusive" and "2 of 3" in goals[0]["reasons"][0]
    one = _cpu_rows()
    for r in one.values():
        r["wall_s_runs"], r["wall_spread"] = r["wall_s_runs"][:1], None
    goals = evaluate_goals(one, CPU_LIMITS, False, "mlp", False, None, assess(one, QUIET))
    assert goals[0]["status"] == "inconclusive" and "single repetition" in goals[0]["reasons"][0]


def test_the_report_prints_the_inconclusive_verdict_and_why():
    from bench.goals import assess, evaluate_goals
    from bench.report import render

    rows = _cpu_rows(compute_wall=7.56)
    q = assess(rows, {"other_fraction": 0.43, "steal_fraction": 0.0})
    goals = evaluate_goals(rows, CPU_LIMITS, False, "mlp", False, None, q)
    text = render(_env(), CPU_LIMITS, list(rows.values()), [], {}, goals, 24,
                  {"points": 1, "rows": 1}, q)
    assert "measurement: INCONCLUSIVE" in text and "43.0%" in text
    assert "[inconclusive ]" in text and "leaning met" in text
    assert text.index("checksums: all equal") < text.index("measurement: INCONCLUSIVE")


# -- the plot: built through the function, checked by its elements ---------------------------
def _env():
    return {"device": "CPU: test", "gpu_direct": "-", "versions": {
        "python": "3", "torch": "2", "torch_cuda": None, "numpy": "2", "cupy": "-",
        "kvikio": "-"}, "cpu_count": 2, "torch_threads": 2,
        "dataset": {"path": "d", "points": 3_500_000, "scans": 4, "bytes_selected": 84_000_000,
                    "fields": list(FIELDS)}, "batch_points": 250_000,
        "backbone": "mlp (6→64→9)", "mode": "inference", "page_cache": "warm",
        "page_cache_check": "warm", "repeat": 3, "loader_only_repeat": 15, "torch_cpu_thp": "-",
        "other_load": None, "command": "python -m bench.compare --plot x.png"}


def test_plot_has_linear_epoch_times_a_compute_floor_and_the_read_limit(tmp_path):
    import matplotlib.pyplot as plt

    from bench.goals import assess
    from bench.plot import build_figure, plot

    rows = list(_cpu_rows().values())
    rows[1]["disturbed_runs"], rows[1]["other_load_max"] = 1, 0.2
    fig = build_figure(_env(), rows, CPU_LIMITS, assess(_cpu_rows(), QUIET), {"gds": "no GPU"})
    try:
        e2e, lo = fig.axes[0], fig.axes[1]
        assert e2e.get_xscale() == "linear" and "seconds per epoch" in e2e.get_xlabel()
        gids = {a.get_gid() for ax in fig.axes for a in ax.get_children()} | {
            t.get_gid() for t in fig.texts}
        assert {"e2e:sequential", "e2e:fallback", "e2e:compute-only", "floor",
                "lo:sequential", "lo:fallback", "read-limit", "verdict", "command"} <= gids
        assert "lo:compute-only" not in gids
        floor = next(a for a in e2e.get_lines() if a.get_gid() == "floor")
        assert floor.get_xdata()[0] == pytest.approx(2.0)
        limit = next(a for a in lo.get_lines() if a.get_gid() == "read-limit")
        assert limit.get_xdata()[0] == 100 and "3.00 GB/s" in limit.get_label()
        bars = {p.get_gid(): p for p in lo.patches}
        fb_pct = 100 * rows[1]["loader_only"]["gb_per_s"] * 1e9 / 3.0e9
        assert bars["lo:fallback"].get_width() == pytest.approx(min(fb_pct, 150))
        e2e_bars = {p.get_gid(): p for p in e2e.patches}
        assert e2e_bars["e2e:fallback"].get_hatch() == "xx"  # disturbed
        assert e2e_bars["e2e:sequential"].get_hatch() is None
        texts = [t.get_text() for t in fig.texts]
        assert "clean measurement" in texts and any("--plot x.png" in t for t in texts)
        assert "CPU: test" in fig._suptitle.get_text()
        assert any("DISTURBED" in t.get_text() for t in e2e.texts)
    finally:
        plt.close(fig)
    bad = assess(_cpu_rows(compute_wall=7.56), QUIET)
    fig = build_figure(_env(), list(_cpu_rows(compute_wall=7.56).values()), CPU_LIMITS, bad, {})
    try:
        assert any(t.get_text().startswith("INCONCLUSIVE") for t in fig.texts)
    finally:
        plt.close(fig)
    plot(tmp_path / "p.png", _env(), rows, CPU_LIMITS, bad, {})
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# -- the budget: a tiny one stops the repetitions and says so ---------------------------------
class _Tiny:
    """A loader of three small CPU batches."""

    family = "tiny"

    def __init__(self, name):
        self.name, self.backend, self.config = name, name, {}

    def epoch(self):
        return iter([{f: torch.ones(10, dtype=torch.int32 if f in FIELDS[4:] else torch.float32)
                      for f in FIELDS} for _ in range(3)])

    def close(self):
        pass


def test_a_tiny_budget_stops_repeating_and_says_so():
    from bench.backbone import Step, build_backbone
    from bench.measure import Device, Stats
    from bench.schedule import Budget, run_schedule

    variants = [_Tiny("a"), _Tiny("b")]
    stats = {v.name: Stats(v.name, v.family, v.backend, {}) for v in variants}
    said: list[str] = []
    res = run_schedule(variants, stats, Device("cpu"),
                       lambda: Step(build_backbone("linear", 2), False), repeat=3, lo_runs=2,
                       retries=2, budget=Budget(0.0), say=said.append)
    assert (res.requested, res.done) == (3, 1) and "1 of 3 repetitions" in res.stopped
    assert any(s.startswith("budget:") for s in said)
    assert sum("[rep 1/3]" in s for s in said) == 2  # a progress line per loader
    assert all(len(st.runs) == 1 and len(st.loader_only) == 2 for st in stats.values())
    from bench.goals import assess
    q = assess({}, None, {"requested": 3, "done": 1, "stopped": res.stopped})
    assert "1 of 3 repetitions ran" in q["notes"][0]
    full = run_schedule(variants, {v.name: Stats(v.name, v.family, v.backend, {})
                                   for v in variants}, Device("cpu"),
                        lambda: Step(build_backbone("linear", 2), False), 3, 1, 0,
                        Budget(600.0), said.append)
    assert full.done == 3 and full.stopped is None


def test_a_disturbed_run_is_retried_saying_why_unless_the_budget_is_spent(monkeypatch):
    import bench.schedule as schedule
    from bench.backbone import Step, build_backbone
    from bench.measure import Device, Stats

    real = schedule.run_epoch

    def busy(variant, dev, step, limit_batches=None):
        r = real(variant, dev, step, limit_batches)
        r.other = {"other_fraction": 0.4, "steal_fraction": 0.0}
        return r

    monkeypatch.setattr(schedule, "run_epoch", busy)
    monkeypatch.setattr(schedule, "disturbed", lambda r: True)
    for budget, retried, refused in ((600.0, 2, 0), (0.0, 0, 1)):
        said: list[str] = []
        v = _Tiny("a")
        stats = {"a": Stats("a", v.family, v.backend, {})}
        res = schedule.run_schedule([v], stats, Device("cpu"),
                                    lambda: Step(build_backbone("linear", 2), False), 1, 0, 2,
                                    schedule.Budget(budget), said.append)
        assert (res.retried, res.retries_refused) == (retried, refused)
        assert len(stats["a"].runs) == 1  # the least disturbed attempt is the one kept
        if retried:
            assert sum("disturbed (other processes took 40% of the machine); running it again"
                       in s for s in said) == 2
        else:
            assert any("no budget left to run it again" in s for s in said)


# -- spatial-chunk mode ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunk_smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-chunks")
    cmd = [sys.executable, "-m", "bench.compare", "--smoke", "--retries", "0", "--points", "60000",
           "--chunk-size", "100", "--batch-chunks", "4", "--shuffle", "--seed", "5",
           "--json", str(tmp / "c.json"), "--workdir", str(tmp)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    doc = json.loads((tmp / "c.json").read_text()) if proc.returncode == 0 else None
    return proc, doc


def test_chunk_smoke_runs_every_loader_on_whole_chunks(chunk_smoke):
    proc, doc = chunk_smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "checksums: all equal" in out and "chunk/s" in out
    assert out.index("checksums: all equal") < out.index("limits (measured")
    assert "4 whole chunks" in out and "same chunks, same order" in out
    env = doc["environment"]
    assert env["batch_chunks"] == 4 and env["shuffle"] is True
    ds = env["dataset"]
    assert ds["points"] == 60_000 and ds["chunk_size"] == 100.0
    assert ds["chunks"] == 50  # 2 tiles of 500 m × 500 m in 100 m cells
    rows = {r["family"]: r for r in doc["loaders"]}
    for name in LOADERS:
        r = rows[name]
        assert r["chunks_per_s"] == pytest.approx(ds["chunks"] / r["wall_s"]), name
        if name != "compute-only":
            lo = r["loader_only"]
            assert lo["chunks_per_s"] == pytest.approx(ds["chunks"] / lo["wall_s"]), name
    assert rows["fallback"]["config"]["batch_chunks"] == 4
    for v in doc["all_variants"]:
        for cs in v["checksums"]:
            assert cs == doc["checksum"] and cs["points"] == 60_000, v["name"]


@pytest.fixture(scope="module")
def chunked_ds(tmp_path_factory):
    from bench import datagen

    tmp = tmp_path_factory.mktemp("chunked-data")
    return (datagen.ensure(tmp, 20_000, progress=False, chunk_size=125.0),
            datagen.ensure(tmp, 20_000, progress=False))


def test_baselines_read_the_library_plan_batch_for_batch(chunked_ds):
    """Every baseline, epoch after epoch, yields exactly the fallback loader's batches."""
    from bench.chunked import ChunkPlanner
    from bench.variants import (ComputeOnlyVariant, LibraryVariant, QueueVariant,
                                SequentialVariant, TorchDataLoaderVariant, field_files)
    from gds_stream.format import open_dataset

    ds = open_dataset(chunked_ds[0])
    files = field_files(ds, FIELDS)
    n, cpu = ds.num_points, torch.device("cpu")
    planner = ChunkPlanner(ds.path, 3, shuffle=True, seed=9)
    b = 1_000  # the point mode's batch: unused where an order is given
    lib = LibraryVariant("fallback", ds.path, b, cpu, shuffle=True, seed=9, batch_chunks=3)
    base = [SequentialVariant(files, n, b, cpu, order=planner.order()),
            QueueVariant(files, n, b, cpu, order=planner.order()),
            TorchDataLoaderVariant(files, n, b, cpu, 0, False, None, True,
                                   order=planner.order())]
    compute = ComputeOnlyVariant(ds, files, b, cpu, order=planner.order())
    offs = ds.chunk_offsets
    try:
        orders = []
        for epoch in (0, 1):
            want = list(lib.epoch())
            units = planner.units(epoch)
            assert [b["chunk"].tolist() for b in want] == [u.tolist() for u in units]
            assert sum(len(b["x"]) for b in want) == n
            for b, u in zip(want, units):
                assert len(b["x"]) == int((offs[u + 1] - offs[u]).sum())
            orders.append([c for u in units for c in u.tolist()])
            others = [list(v.epoch()) for v in base]
            if epoch == 0:
                others.append(list(compute.epoch()))
            for got in others:
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    for f in FIELDS:
                        assert torch.equal(g[f], w[f]), f
        assert orders[0] != orders[1] and sorted(orders[0]) == list(range(ds.num_chunks))
    finally:
        for v in (lib, *base, compute):
            v.close()
        planner.close()
        ds.close()


def test_the_chunked_set_holds_the_same_points_as_the_plain_one(chunked_ds):
    from bench.datagen import SCHEMA
    from gds_stream.format import open_dataset

    sums = []
    for path in chunked_ds:
        ds = open_dataset(path)
        cs = Checksum(FIELDS, torch.device("cpu"))
        cs.update({f: torch.from_numpy(ds.read(f)) for f in FIELDS})
        sums.append((cs.result(), ds.num_chunks))
        ds.close()
    assert sums[0][0] == sums[1][0] and sums[0][1] > 1 and sums[1][1] == 0
    assert list(open_dataset(chunked_ds[0]).schema.values()) == list(SCHEMA)


@pytest.mark.parametrize("argv, message", [
    (["--chunk-size", "50"], "give both"),
    (["--batch-chunks", "4"], "needs a chunked dataset"),
    (["--batch-chunks", "0", "--chunk-size", "50"], "--batch-chunks must be >= 1"),
    (["--batch-chunks", "2", "--chunk-size", "-1"], "finite number > 0"),
    (["--batch-chunks", "2", "--chunk-size", "nan"], "finite number > 0"),
    (["--batch-chunks", "2", "--chunk-size", "50", "--dataset", "d"], "with --dataset"),
    (["--batch-chunks", "2", "--chunk-size", "50", "--batch-points", "9"], "give one"),
])
def test_chunk_options_that_do_not_fit_are_usage_errors(argv, message, capsys):
    import bench.compare as compare

    with pytest.raises(SystemExit) as exc:
        compare.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_chunks_on_an_unchunked_dataset_is_one_clear_error(chunked_ds):
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--dataset",
                           str(chunked_ds[1]), "--batch-chunks", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs a spatially chunked dataset" in proc.stderr
    assert str(chunked_ds[1]) in proc.stderr and "Traceback" not in proc.stderr


# -- the budget, planned from measured costs (invented costs, a fake clock: no timing) ---------
def _est(e2e: dict, lo: dict):
    from bench.budget import Estimates

    return Estimates(dict(e2e), dict(lo))


def test_extrapolate_takes_the_start_cost_once():
    from bench.budget import extrapolate

    # 3 batches took 2.5 s, 1.5 s of it until the first was done: 0.5 s a batch after that
    assert extrapolate(2.5, 1.5, 3, 10) == pytest.approx(1.5 + 0.5 * 9)
    assert extrapolate(0.4, 0.4, 1, 10) == pytest.approx(4.0)  # one batch: no start cost known
    assert extrapolate(0.4, 0.1, 3, 1) == pytest.approx(0.4)


def test_a_plan_that_fits_cuts_nothing():
    from bench.budget import MARGIN, plan_runs

    est = _est({"a": 1.0, "b": 2.0}, {"a": 0.1, "b": 0.2})
    plan = plan_runs(est, ["a", "b"], {"a"}, repeat=3, lo_runs=5, left_s=100.0)
    assert (plan.repeat, plan.lo_runs, plan.keep, plan.dropped, plan.cuts) == (
        3, 5, ["a", "b"], {}, [])
    assert plan.rep_s == pytest.approx(MARGIN * (3.0 + 5 * 0.3))
    assert plan.overrun_s == 0 and plan.describe().startswith("3 of 3 repetition(s)")


def test_the_plan_cuts_loader_only_epochs_before_repetitions():
    from bench.budget import MARGIN, plan_runs

    est = _est({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    # 3 repetitions with 5 loader-only epochs need 3 × 12 s × margin; with 2 they need 3 × 6 s
    left = 3 * 6.0 * MARGIN + 0.1
    plan = plan_runs(est, ["a", "b"], {"a", "b"}, repeat=3, lo_runs=5, left_s=left)
    assert (plan.repeat, plan.lo_runs) == (3, 2)
    assert plan.cuts == ["loader-only epochs per repetition 5 → 2"]


def test_the_plan_cuts_repetitions_and_says_how_many_fit():
    from bench.budget import MARGIN, plan_runs

    est = _est({"a": 10.0}, {"a": 0.0})
    plan = plan_runs(est, ["a"], {"a"}, repeat=9, lo_runs=1, left_s=4 * 10.0 * MARGIN + 1)
    assert plan.repeat == 4 and plan.cuts == ["repetitions 9 → 4"]
    assert "4 of 9 repetition(s) expected to fit" in plan.describe()


def test_the_plan_leaves_out_the_dearest_optional_loaders_and_never_an_essential_one():
    from bench.budget import MARGIN, plan_runs

    est = _est({"seq": 1.0, "fb": 1.0, "tdl-4": 8.0, "tdl-2": 5.0, "queue": 1.0}, {})
    names = ["seq", "queue", "tdl-2", "tdl-4", "fb"]
    plan = plan_runs(est, names, {"seq", "fb"}, repeat=3, lo_runs=1, left_s=8.5 * MARGIN)
    # one repetition of everything needs 16 s: dropping tdl-4 (8 s) leaves 8 s, which fits
    assert plan.keep == ["seq", "queue", "tdl-2", "fb"] and list(plan.dropped) == ["tdl-4"]
    assert "left out to fit the budget" in plan.dropped["tdl-4"]
    assert plan.repeat == 1 and plan.overrun_s == 0
    assert plan.cuts == ["repetitions 3 → 1", "1 loader(s) left out: tdl-4"]
    # nothing fits, not even the essentials once: they run once and the overrun is stated
    tight = plan_runs(est, names, {"seq", "fb"}, repeat=3, lo_runs=1, left_s=1.0)
    assert tight.keep == ["seq", "fb"] and tight.repeat == 1
    assert tight.overrun_s == pytest.approx(2.0 * MARGIN - 1.0)
    assert "NOT EVEN ONE repetition" in tight.describe()
    assert tight.describe().startswith("0 of 3")


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fake_epochs(monkeypatch, clock, walls, disturbed_names=()):
    """run_epoch replaced: each call advances ``clock`` by ``walls(name, kind, call)``."""
    import bench.schedule as schedule
    from bench.measure import RunResult

    calls = {"n": 0}

    def fake(variant, dev, step, limit_batches=None):
        calls["n"] += 1
        kind = "e2e" if step is not None else "lo"
        w = walls(variant.name, kind, calls["n"])
        clock.t += w
        other = ({"other_fraction": 0.4, "steal_fraction": 0.0}
                 if variant.name in disturbed_names else None)
        return RunResult(w, 0.0, 30, 3, {"points": 30} if step is not None else None,
                         other=other)

    monkeypatch.setattr(schedule, "run_epoch", fake)
    monkeypatch.setattr(schedule, "disturbed", lambda r: r.other is not None)
    return calls


def test_a_machine_that_slows_down_stops_the_repetitions_inside_the_budget(monkeypatch):
    """The calibration said 1 s a loader; from the second repetition on every epoch takes 4 s.
    The run must stop before a repetition that no longer fits — and end within the budget."""
    from bench.budget import Budget
    from bench.measure import Device, Stats
    from bench.schedule import run_schedule

    clock = _Clock()
    slow = {"on": False}

    def walls(name, kind, call):
        return 4.0 if slow["on"] else 1.0

    _fake_epochs(monkeypatch, clock, walls)
    variants = [_Tiny("a"), _Tiny("b")]
    stats = {v.name: Stats(v.name, v.family, v.backend, {}) for v in variants}
    est = _est({"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0})
    budget = Budget(30.0, clock=clock)
    said: list[str] = []

    def say(s):
        said.append(s)
        if s.startswith("[rep 1/"):
            slow["on"] = True  # everything after the first loader of repetition 1 is slow

    res = run_schedule(variants, stats, Device("cpu"), lambda: None, repeat=9, lo_runs=0,
                       retries=0, budget=budget, say=say, est=est)
    assert budget.elapsed() <= budget.seconds
    # rep 1: 1 + 4 s; rep 2 needs 1.25 × 8 = 10 s: fits (25 left) → 13 s; rep 3: fits (17 left)
    # → 21 s; rep 4 needs 10 s, 9 left: stop
    assert res.done == 3 and "stopped after 3 of 9 repetitions" in res.stopped
    assert any(s.startswith("budget:") for s in said)


def test_a_retry_that_would_push_the_repetition_over_the_budget_is_refused(monkeypatch):
    from bench.budget import Budget
    from bench.measure import Device, Stats
    from bench.schedule import run_schedule

    clock = _Clock()
    _fake_epochs(monkeypatch, clock, lambda name, kind, call: 2.0, disturbed_names=("a",))
    variants = [_Tiny("a"), _Tiny("b"), _Tiny("c")]
    stats = {v.name: Stats(v.name, v.family, v.backend, {}) for v in variants}
    est = _est({"a": 2.0, "b": 2.0, "c": 2.0}, {})
    # after a's 2 s: 8 s left; the rest of the repetition needs 1.25 × 4 = 5 s; a retry
    # (1.25 × 2 = 2.5 s) would fit beside it once (7.5 ≤ 8) but not twice (after it: 6 left)
    budget = Budget(10.0, clock=clock)
    said: list[str] = []
    res = run_schedule(variants, stats, Device("cpu"), lambda: None, repeat=1, lo_runs=0,
                       retries=3, budget=budget, say=said.append, est=est)
    assert (res.retried, res.retries_refused, res.done) == (1, 1, 1)
    assert any("running it again (retry 1 of 3)" in s for s in said)
    assert any("no budget left to run it again" in s for s in said)
    assert budget.elapsed() <= budget.seconds


def test_plot_labels_stay_inside_their_panels_and_the_axis_fits_the_longest_bar():
    """A disturbed 13 s bar once got a 25 s axis, and a label ran off the plot."""
    import matplotlib.pyplot as plt

    from bench.goals import assess
    from bench.plot import build_figure

    rows = list(_cpu_rows().values())
    rows[0] = _row("sequential", 13.0, 0.02, spread=0.04)
    rows[0]["disturbed_runs"], rows[0]["other_load_max"] = 2, 0.31
    rows[1]["loader_only"]["gb_per_s"] = 3.3  # 110 % of the limit: above it, and said so
    rows.insert(2, _row("torch-dataloader", 12.0, 0.0004, name="torch-dataloader[w=0,pin=0]"))
    rows[2]["config"] = {"zero_copy_views": True}
    rows[2]["loader_only"]["gb_per_s"] = 200.0  # far off the axis
    fig = build_figure(_env(), rows, CPU_LIMITS, assess(_cpu_rows(), QUIET), {"gds": "no GPU"})
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        whole = fig.bbox
        for t in fig.texts + [t for ax in fig.axes for t in ax.texts + [ax.title]]:
            if not t.get_text():
                continue
            bb = t.get_window_extent(r)
            assert whole.x0 - 1 <= bb.x0 and bb.x1 <= whole.x1 + 1, t.get_text()
        for ax in fig.axes[:2]:
            box = ax.get_window_extent(r)
            labels = [t for t in ax.texts if (t.get_gid() or "").startswith("label:")]
            assert labels
            right = max(t.get_window_extent(r).x1 for t in labels)
            for t in labels:
                bb = t.get_window_extent(r)
                assert box.x0 - 1 <= bb.x0 and bb.x1 <= box.x1 + 1, t.get_text()
            # tight: the rightmost label ends near the right edge (no half-empty axis)
            assert right >= box.x1 - 0.15 * box.width
        e2e, lo = fig.axes[0], fig.axes[1]
        assert 13.0 * 1.0 < e2e.get_xlim()[1] < 13.0 * 1.6
        fb = next(t for t in lo.texts if t.get_gid() == "label:fallback")
        assert "110 %" in fb.get_text() and "above the measured limit" in fb.get_text()
    finally:
        plt.close(fig)


# -- the seed project's workload (--layout seed) -------------------------------------------------
SEED_LOADERS = ("seed-pipeline", "fallback-stack", "fallback-loopstack", "compute-only")


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
    goal = doc["goals"][0]
    assert goal["goal"] == f"fallback with stack= end-to-end ≥ 1.00× the seed pipeline ({cache})"
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


@pytest.mark.parametrize("extra, message", [
    (["--shuffle"], "--shuffle is for the default layout"),
    (["--train"], "--train is for the default layout"),
    (["--backbone", "mlp"], "Linear(6,64)-ReLU-Linear(64,3)"),
])
def test_seed_layout_refuses_what_the_seed_pipeline_cannot_do(extra, message):
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--layout", "seed", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_an_optional_loader_is_skipped_mid_repetition_when_the_machine_slowed_down(monkeypatch):
    """Calibrated at 1 s each, the first loader takes 3 s: the estimates of the loaders not yet
    measured grow with it, the optional one no longer fits beside the essential one still to
    come, and is skipped (said so) instead of overrunning the budget."""
    from bench.budget import Budget
    from bench.measure import Device, Stats
    from bench.schedule import run_schedule

    clock = _Clock()
    _fake_epochs(monkeypatch, clock, lambda name, kind, call: 3.0)
    variants = [_Tiny("a"), _Tiny("b"), _Tiny("c")]
    stats = {v.name: Stats(v.name, v.family, v.backend, {}) for v in variants}
    est = _est({"a": 1.0, "b": 1.0, "c": 1.0}, {})
    budget = Budget(10.0, clock=clock)
    said: list[str] = []
    res = run_schedule(variants, stats, Device("cpu"), lambda: None, repeat=3, lo_runs=0,
                       retries=0, budget=budget, say=said.append, est=est,
                       essential={"a", "c"})
    assert res.skipped_runs == {"b": 1} and res.done == 1
    assert [len(stats[n].runs) for n in "abc"] == [1, 0, 1]
    assert any(s.startswith("[rep 1/3] b") and "skipped" in s for s in said)
    assert est.get("b", "e2e") == pytest.approx(3.0)  # scaled by the measured slowdown
    assert budget.elapsed() <= budget.seconds


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_the_budget_counts_from_the_process_start():
    from bench.budget import process_age

    age = process_age()
    assert age > 0.0  # this interpreter started (and imported torch) before the call
