"""The benchmark's verdicts: a measurement that can't be trusted says so (synthetic numbers)."""

from __future__ import annotations

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a program beside the package, not installed
    sys.path.insert(0, str(ROOT))

from bench_synthetic import CPU_LIMITS, QUIET, _cpu_rows, _env, _row  # noqa: E402


# -- verdicts: a measurement that can't be trusted says so (synthetic numbers) -----------------


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
