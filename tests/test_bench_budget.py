"""The benchmark's time budget: the plan from measured costs and the schedule's checks (invented
costs and a fake clock: no timed assertion), and one tiny run through the command line."""

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

from bench_synthetic import _Tiny  # noqa: E402


# -- the budget: a tiny one stops the repetitions and says so ---------------------------------
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


def test_a_budget_too_small_for_anything_says_so_and_runs_only_the_essential_loaders(tmp_path):
    """The command line: a 1 s budget is spent before the calibration ends (the interpreter's
    start counts). The run says at the start that it will overrun and by about how much, leaves
    out every optional loader with the reason, and still reports the essential ones."""
    proc = subprocess.run([sys.executable, "-m", "bench.compare", "--smoke", "--retries", "0",
                           "--budget", "1", "--points", "60000", "--workdir", str(tmp_path),
                           "--json", str(tmp_path / "b.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = next(line for line in proc.stderr.splitlines() if line.startswith("plan: "))
    assert "NOT EVEN ONE repetition of the essential loaders fits" in plan
    assert "expected to exceed the budget by" in plan and "left out" in plan
    doc = json.loads((tmp_path / "b.json").read_text())
    assert {r["family"] for r in doc["loaders"]} == {"sequential", "fallback", "compute-only"}
    for name in ("queue", "torch-dataloader[w=0,pin=0]"):
        assert "left out to fit the budget" in doc["skipped"][name]["reason"]
    assert "queue" in proc.stdout and "left out to fit the budget" in proc.stdout


def test_repetition_orders_vary_each_loaders_neighbour():
    """Every loader runs once a repetition, and over the repetitions of a run each loader runs
    after more than one neighbour (a rotation kept the same neighbour every time)."""
    from bench.schedule import rep_order

    names = ["sequential", "queue", "tdl0", "tdl2", "tdl4", "fallback", "compute-only"]
    orders = [rep_order(names, rep) for rep in range(9)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [rep_order(names, rep) for rep in range(9)]  # deterministic
    for name in names:
        before = {o[o.index(name) - 1] if o.index(name) else None for o in orders}
        assert len(before) >= 3, (name, before)
    assert len({o[0] for o in orders}) >= 3  # not always the same loader first
