"""Whether the measurement can be trusted, and the goals judged against it.

Owns: :func:`assess` (is this run clean? It is not when compute-only — the batches already
resident — ran slower than some loader end-to-end beyond the noise, which no clean run can do,
or when other processes took more than :data:`LOAD_THRESHOLD` of the machine during the timed
runs) and :func:`evaluate_goals`. A goal is ``met`` or ``missed`` only when the measurement is
clean, the runs it compares were not disturbed and its margin is larger than their run-to-run
spread; otherwise it is ``inconclusive`` and says why (and which way it leaned). ``not
evaluated`` means it could not be measured here (e.g. no GPU).
"""

from __future__ import annotations

from typing import Sequence

from bench.measure import paired_speedup

#: Other processes (plus the hypervisor's steal) taking more than this share of the machine
#: over the timed runs make every timing verdict inconclusive.
LOAD_THRESHOLD = 0.10
#: "Beyond noise" needs at least this relative difference even when the spread is smaller;
#: with a single repetition (no spread measured) at least NOISE_UNKNOWN.
NOISE_FLOOR = 0.05
NOISE_UNKNOWN = 0.10

STATUSES = ("met", "missed", "inconclusive", "not evaluated")


def noise(*rows: dict | None) -> float | None:
    """The largest end-to-end spread, (max − min) / median, of the given rows."""
    spreads = [r["wall_spread"] for r in rows if r and r.get("wall_spread") is not None]
    return max(spreads) if spreads else None


def assess(rows: dict[str, dict], load: dict | None, schedule: dict | None = None) -> dict:
    """``{"verdict": "clean" | "inconclusive", "reasons": [...], "notes": [...]}`` for the run
    as a whole. ``rows``: one summary per loader family; ``load``: the other load over the timed
    runs (:func:`bench.measure.other_load`); ``schedule``: requested/done repetitions."""
    reasons: list[str] = []
    short: list[str] = []
    notes: list[str] = []
    c = rows.get("compute-only")
    if c and c.get("wall_s"):
        beaten = []
        for fam, r in rows.items():
            if fam == "compute-only" or not r.get("wall_s"):
                continue
            n = noise(c, r)
            tol = NOISE_UNKNOWN if n is None else max(n, NOISE_FLOOR)
            if c["wall_s"] > r["wall_s"] * (1 + tol):
                beaten.append((fam, f"{fam} {r['wall_s']:.3f} s (−{1 - r['wall_s'] / c['wall_s']:.0%}"
                                    f", noise {tol:.0%})"))
        if beaten:
            reasons.append(f"compute-only (batches already resident) took {c['wall_s']:.3f} s "
                           f"an epoch, slower than end-to-end runs beyond the noise: "
                           + ", ".join(b for _, b in beaten) + " — impossible in a clean run")
            short.append("compute-only slower than " + ", ".join(f for f, _ in beaten))
    if load is not None:
        share = load["other_fraction"] + load["steal_fraction"]
        if share > LOAD_THRESHOLD:
            reasons.append(f"other processes took {share:.1%} of the machine during the timed "
                           f"runs (threshold {LOAD_THRESHOLD:.0%})")
            short.append(f"other load {share:.1%} of the machine")
    if schedule and schedule.get("done", 0) < schedule.get("requested", 0):
        notes.append(f"{schedule['done']} of {schedule['requested']} repetitions ran "
                     f"({schedule.get('stopped') or 'stopped early'})")
    return {"verdict": "inconclusive" if reasons else "clean", "reasons": reasons,
            "summary": "; ".join(short), "notes": notes}


def judge(text: str, met: bool | None, detail: str, quality: dict,
          margin: float | None = None, spread: float | None = None, judged_spread: bool = True,
          rows: Sequence[dict | None] = ()) -> dict:
    """One goal. ``margin`` = measured / threshold (> 1 is better); ``spread`` the run-to-run
    spread of what was compared (None: a single repetition, nothing to judge the margin by);
    ``rows`` the loaders compared (their disturbed runs make the goal inconclusive)."""
    if met is None:
        return {"goal": text, "status": "not evaluated", "detail": detail, "reasons": []}
    raw = "met" if met else "missed"
    reasons = (["the measurement is inconclusive: " + quality["summary"]]
               if quality.get("reasons") else [])
    if judged_spread and margin is not None:
        if spread is None:
            reasons.append("a single repetition: no run-to-run spread to judge the margin by")
        elif abs(margin - 1.0) < spread:
            reasons.append(f"the margin ({margin - 1.0:+.1%}) is within the run-to-run spread "
                           f"({spread:.0%})")
        else:
            detail += f"; margin {margin - 1.0:+.1%}, run-to-run spread {spread:.0%}"
    for r in rows:
        if r and r.get("disturbed_runs"):
            reasons.append(f"{r['family']}: {r['disturbed_runs']} of {len(r['wall_s_runs'])} "
                           f"end-to-end runs disturbed (other load up to "
                           f"{r['other_load_max']:.0%})")
    status = "inconclusive" if reasons else raw
    return {"goal": text, "status": status, "leaning": raw, "detail": detail, "reasons": reasons}


def evaluate_goals(rows: dict[str, dict], limits: dict, cuda: bool, backbone: str, cold: bool,
                   gds_skip: str | None, quality: dict | None = None) -> list[dict]:
    q = quality or {"reasons": []}
    goals = []
    fb, seq = rows.get("fallback"), rows.get("sequential")
    read_bw = limits.get("read_cold_bytes_per_s" if cold else "read_warm_bytes_per_s")
    if not cuda:
        if fb and seq:
            r, sp = paired_speedup(fb, seq)
            goals.append(judge("fallback end-to-end not slower than sequential", r >= 1.0,
                               f"fallback {fb['wall_s']:.3f} s vs sequential {seq['wall_s']:.3f} s "
                               f"(median epochs); paired speedup {r:.3f}×", q, r, sp,
                               rows=(fb, seq)))
        if fb and "loader_only" in fb and read_bw:
            lo = fb["loader_only"]
            got, best = lo["gb_per_s"] * 1e9, lo["best_gb_per_s"] * 1e9
            hot = limits.get("read_warm_cached_bytes_per_s")
            hot_note = (f"; vs the cache-hot read {hot / 1e9:.2f} GB/s it is {got / hot:.0%}"
                        if hot else "")
            goals.append(judge("fallback loader-only ≥ 80 % of the read bandwidth",
                               got >= 0.8 * read_bw,
                               f"{got / 1e9:.2f} GB/s = {got / read_bw:.0%} of "
                               f"{read_bw / 1e9:.2f} GB/s read → memory (median epoch vs the best "
                               f"read pass; best epoch {best / 1e9:.2f} GB/s = "
                               f"{best / read_bw:.0%}){hot_note}", q, got / (0.8 * read_bw),
                               lo.get("wall_spread")))
        return goals
    g = rows.get("gds")
    if g is None:
        why = gds_skip or "gds did not run"
        for text in ("gds ≥ 3× queue (--backbone linear)",
                     "gds ≥ 1.5× best torch-dataloader (--backbone linear)",
                     "gds loader-only ≥ 90 % of min(read, pinned H2D bandwidth)",
                     "balanced: gds wall ≤ 1.05 × max(compute-only, gds loader-only)"):
            goals.append(judge(text, None, f"gds skipped: {why}", q))
        return goals
    note = "" if backbone == "linear" else (f" (measured with --backbone {backbone}; the goal "
                                            f"is stated for linear)")
    qu, t = rows.get("queue"), rows.get("torch-dataloader")
    if qu:
        r, sp = paired_speedup(g, qu)
        goals.append(judge("gds ≥ 3× queue (--backbone linear)", r >= 3.0,
                           f"paired speedup {r:.2f}× (gds {g['wall_s']:.3f} s, queue "
                           f"{qu['wall_s']:.3f} s){note}", q, r / 3.0, sp, rows=(g, qu)))
    if t:
        r, sp = paired_speedup(g, t)
        goals.append(judge("gds ≥ 1.5× best torch-dataloader (--backbone linear)", r >= 1.5,
                           f"paired speedup {r:.2f}× (gds {g['wall_s']:.3f} s, {t['name']} "
                           f"{t['wall_s']:.3f} s){note}", q, r / 1.5, sp, rows=(g, t)))
    h2d = limits.get("h2d_pinned_bytes_per_s")
    if "loader_only" in g and read_bw and h2d:
        lim = min(read_bw, h2d)
        lo = g["loader_only"]
        got, best = lo["gb_per_s"] * 1e9, lo["best_gb_per_s"] * 1e9
        goals.append(judge("gds loader-only ≥ 90 % of min(read, pinned H2D bandwidth)",
                           got >= 0.9 * lim,
                           f"{got / 1e9:.2f} GB/s = {got / lim:.0%} of {lim / 1e9:.2f} GB/s "
                           f"(read {read_bw / 1e9:.2f}, H2D {h2d / 1e9:.2f}; median epoch; "
                           f"best epoch {best / 1e9:.2f} GB/s = {best / lim:.0%})", q,
                           got / (0.9 * lim), lo.get("wall_spread")))
    c = rows.get("compute-only")
    if c and "loader_only" in g:
        floor = max(c["wall_s"], g["loader_only"]["wall_s"])
        goals.append(judge("balanced: gds wall ≤ 1.05 × max(compute-only, gds loader-only)",
                           g["wall_s"] <= 1.05 * floor,
                           f"gds {g['wall_s']:.3f} s vs 1.05 × {floor:.3f} s = "
                           f"{1.05 * floor:.3f} s", q, 1.05 * floor / g["wall_s"], noise(g, c),
                           rows=(g, c)))
    return goals
