"""The order of the timed runs, their retries, and the budget checks between them.

Owns: :func:`calibrate` (the untimed warm-up pass, timed: each loader's epoch extrapolated from
its first batches), :func:`run_schedule` (every loader once within each repetition, in an order drawn per
repetition by :func:`rep_order`; a disturbed run is repeated while retries allow and the retry plus the
rest of its repetition still fit; a repetition after the first starts only when the slowest
estimate of it still fits) and :func:`sweep_task_sizes` (the gds loader, loader-only, at several
KvikIO task sizes, as many as fit). The estimates and the budget are ``bench.budget``'s.
Everything it decides it says through ``say`` as it goes: one line per loader and repetition,
one per retry with the reason, and one when the budget stops the repetitions.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from bench.backbone import Step
from bench.budget import MARGIN, Budget, Estimates, extrapolate
from bench.measure import Device, RunResult, Stats, disturbance, disturbed, run_epoch
from bench.variants import LibraryVariant, Variant

Say = Callable[[str], None]
__all__ = ["Budget", "ScheduleResult", "calibrate", "run_schedule", "sweep_task_sizes"]


@dataclass
class ScheduleResult:
    requested: int  # repetitions asked for
    done: int  # repetitions completed
    retried: int = 0  # extra attempts spent on disturbed runs
    retries_refused: int = 0  # disturbed runs kept because the budget had no room to rerun them
    stopped: str | None = None  # why repetitions stopped early (the budget), else None
    skipped_runs: dict[str, int] = field(default_factory=dict)  # loader → repetitions skipped


def _timed(v: Variant, dev: Device, step: Callable[[], Step | None], retries: int,
           budget: Budget, prepare: Callable[[], float | None], say: Say, label: str,
           res: ScheduleResult, rest_s: float = 0.0) -> RunResult:
    """One timed run of ``v``, repeated while it was disturbed and retries allow and the
    retry plus ``rest_s`` (the estimated rest of this repetition) still fit in the budget;
    the least disturbed attempt is kept."""
    best: RunResult | None = None
    tries = 0
    for attempt in range(1 + retries):
        tries += 1
        resident = prepare()
        got = run_epoch(v, dev, step())
        got.resident, got.attempts = resident, attempt + 1
        if best is None or disturbance(got) < disturbance(best):
            best = got
        if not disturbed(got) or attempt == retries:
            break
        why = f"other processes took {disturbance(got):.0%} of the machine"
        if not budget.fits(MARGIN * got.wall + rest_s):
            res.retries_refused += 1
            say(f"    {v.name} {label}: disturbed ({why}); no budget left to run it again — "
                f"kept and marked disturbed")
            break
        say(f"    {v.name} {label}: disturbed ({why}); running it again "
            f"(retry {attempt + 1} of {retries})")
    assert best is not None
    res.retried += tries - 1
    return best


def calibrate(variants: Sequence[Variant], dev: Device, make_step: Callable[[], Step],
              num_batches: int, warmup_batches: int,
              prepare: Callable[[], object] = lambda: None) -> Estimates:
    """The untimed warm-up pass, timed: ``warmup_batches`` batches of every loader, end to end
    and loader-only, extrapolated to a full epoch of ``num_batches`` batches (plus the cost of
    preparing a run: the page-cache drop with --cold)."""
    est = Estimates()
    for v in variants:
        for kind in ("e2e", "lo"):
            if kind == "lo" and v.family == "compute-only":
                continue
            t = time.perf_counter()
            prepare()
            extra = time.perf_counter() - t
            r = run_epoch(v, dev, make_step() if kind == "e2e" else None,
                          limit_batches=warmup_batches)
            table = est.e2e if kind == "e2e" else est.lo
            table[v.name] = extra + extrapolate(r.wall, r.first, r.batches, num_batches)
    return est


def run_schedule(variants: Sequence[Variant], stats: dict[str, Stats], dev: Device,
                 make_step: Callable[[], Step], repeat: int, lo_runs: int, retries: int,
                 budget: Budget, say: Say,
                 prepare: Callable[[], float | None] = lambda: None,
                 est: Estimates | None = None,
                 essential: Iterable[str] | None = None) -> ScheduleResult:
    """Fill ``stats`` with up to ``repeat`` repetitions. The first always runs (the plan made
    it fit or said by how much it will not); each later one starts only when its estimate —
    the slowest measured epoch of every loader, times the margin — fits in what is left. Within
    a repetition a loader not in ``essential`` (default: all are) is skipped, and said so, when
    it and the essential loaders still to come no longer fit. ``est`` (from the calibration
    pass) is updated with every measured epoch."""
    res = ScheduleResult(requested=repeat, done=0)
    est = est if est is not None else Estimates()
    names = [v.name for v in variants]
    ess = set(names if essential is None else essential)
    lo_of = {v.name: (lo_runs if v.family != "compute-only" else 0) for v in variants}

    def cost(name: str, lo_done: int = 0) -> float:
        return (est.get(name, "e2e") if lo_done == 0 else 0.0) \
            + max(0, lo_of[name] - lo_done) * est.get(name, "lo")

    def rest(order: Sequence[Variant], i: int, lo_done: int, only_essential: bool = False) -> float:
        """Estimated seconds of ``order[i + 1:]`` plus the current loader's loader-only epochs
        after ``lo_done``, margin included."""
        s = sum(cost(v.name) for v in order[i + 1:] if not only_essential or v.name in ess)
        s += max(0, lo_of[order[i].name] - lo_done) * est.get(order[i].name, "lo")
        return MARGIN * s

    for rep in range(repeat):
        need = MARGIN * sum(cost(n) for n in names)
        if rep and not budget.fits(need):
            res.stopped = (f"the {budget.seconds:.0f} s budget: {budget.elapsed():.0f} s used, "
                           f"another repetition needs ~{need:.0f} s (slowest measured epochs, "
                           f"{MARGIN:.2f}× margin) — stopped after {rep} of {repeat} repetitions")
            say(f"budget: {res.stopped}")
            break
        order = rep_order(variants, rep)
        for i, v in enumerate(order):
            st = stats[v.name]
            if v.name not in ess:
                need_v = MARGIN * cost(v.name) + rest(order, i, lo_of[v.name], True)
                if not budget.fits(need_v):
                    res.skipped_runs[v.name] = res.skipped_runs.get(v.name, 0) + 1
                    say(f"[rep {rep + 1}/{repeat}] {v.name:<34} skipped: ~{need_v:.0f} s with "
                        f"the essential loaders still to come, {max(0.0, budget.left()):.0f} s "
                        f"left in the budget")
                    continue
            e2e = _timed(v, dev, make_step, retries, budget, prepare, say, "end-to-end", res,
                         rest(order, i, 0))
            est.observe(v.name, "e2e", e2e.wall)
            st.runs.append(e2e)
            line = (f"[rep {rep + 1}/{repeat}] {v.name:<34} end-to-end {e2e.wall:7.3f} s "
                    f"(other load {disturbance(e2e):4.0%})")
            if lo_of[v.name] > 0:
                los = []
                for j in range(lo_of[v.name]):
                    r = _timed(v, dev, lambda: None, retries, budget, prepare, say,
                               "loader-only", res, rest(order, i, j + 1))
                    est.observe(v.name, "lo", r.wall)
                    los.append(r)
                st.loader_only.extend(los)
                line += (f", loader-only {statistics.median(r.wall for r in los):7.3f} s "
                         f"(median of {len(los)})")
            say(line)
        res.done = rep + 1
    return res


def rep_order(variants: Sequence[Variant], rep: int) -> list[Variant]:
    """The loaders' order in repetition ``rep``: every loader once (drift hits all alike), in a
    permutation drawn from ``rep`` — a rotation would keep each loader after the same neighbour
    every time (the fallback always ran right after a DataLoader epoch whose worker processes
    had just forked and exited, the sequential loop always after compute-only), so whatever a
    neighbour leaves behind would bias one loader's times. Deterministic per repetition."""
    order = list(variants)
    random.Random(0x5EED + rep).shuffle(order)
    return order


def sweep_task_sizes(path: Path, batch: int, dev: Device, sizes_mib: Sequence[int], runs: int,
                     nbytes: int, shuffle: bool, seed: int, say: Say,
                     batch_chunks: int | None = None, budget: Budget | None = None,
                     epoch_s: float = 0.0) -> list[dict]:
    """The gds loader, loader-only, at each KvikIO ``task_size`` (MiB): median of ``runs``
    epochs after one warm-up epoch. Returns one row per size (``error`` when it could not run,
    ``skipped`` when ``runs + 1`` epochs of ``epoch_s`` seconds no longer fit in ``budget``)."""
    rows = []
    for mib in sizes_mib:
        row: dict = {"task_size_mib": mib}
        need = MARGIN * (runs + 1) * epoch_s
        if budget is not None and not budget.fits(need):
            row["skipped"] = (f"budget: ~{need:.1f} s needed, {max(0.0, budget.left()):.0f} s "
                              f"left")
            rows.append(row)
            say(f"task size {mib} MiB: skipped, {row['skipped']}")
            continue
        try:
            v = LibraryVariant("gds", path, batch, dev.device, shuffle=shuffle, seed=seed,
                               batch_chunks=batch_chunks,
                               task_size=mib << 20, name=f"gds[task_size={mib} MiB]")
        except Exception as exc:  # reported in the table, the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            say(f"task size {mib} MiB: {row['error']}")
            continue
        try:
            run_epoch(v, dev, None)  # warm-up
            walls = [run_epoch(v, dev, None).wall for _ in range(runs)]
            epoch_s = max(epoch_s, *walls)
        finally:
            v.close()
        w = statistics.median(walls)
        row.update(backend=v.backend, wall_s=w, wall_s_runs=walls, gb_per_s=nbytes / w / 1e9,
                   best_gb_per_s=nbytes / min(walls) / 1e9)
        say(f"task size {mib:>3} MiB: loader-only {w:.3f} s = {row['gb_per_s']:.2f} GB/s "
            f"(median of {runs})")
        rows.append(row)
    return rows
