"""The order of the timed runs, their retries and the time budget that bounds them.

Owns: :class:`Budget` (seconds since the start of the benchmark, and whether the next piece of
work still fits), :func:`run_schedule` (round-robin over the loaders within each repetition,
one loader later each repetition; a disturbed run is repeated while retries and budget allow;
a repetition starts only if it is expected to fit in the budget, and the first always runs) and
:func:`sweep_task_sizes` (the gds loader, loader-only, at several KvikIO task sizes).
Everything it decides it says through ``say`` as it goes: one line per loader and repetition,
one per retry with the reason, and one when the budget stops the repetitions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from bench.backbone import Step
from bench.measure import Device, RunResult, Stats, disturbance, disturbed, run_epoch
from bench.variants import LibraryVariant, Variant

Say = Callable[[str], None]


@dataclass
class Budget:
    """``seconds`` of wall time for the whole benchmark, counted from ``start``
    (``time.perf_counter()``)."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


@dataclass
class ScheduleResult:
    requested: int  # repetitions asked for
    done: int  # repetitions completed
    retried: int = 0  # extra attempts spent on disturbed runs
    retries_refused: int = 0  # disturbed runs kept because the budget had no room to rerun them
    stopped: str | None = None  # why repetitions stopped early (the budget), else None


def _timed(v: Variant, dev: Device, step: Callable[[], Step | None], retries: int,
           budget: Budget, prepare: Callable[[], float | None], say: Say, label: str,
           res: ScheduleResult) -> RunResult:
    """One timed run of ``v``, repeated while it was disturbed and retries and budget allow;
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
        if not budget.fits(got.wall):
            res.retries_refused += 1
            say(f"    {v.name} {label}: disturbed ({why}); no budget left to run it again — "
                f"kept and marked disturbed")
            break
        say(f"    {v.name} {label}: disturbed ({why}); running it again "
            f"(retry {attempt + 1} of {retries})")
    assert best is not None
    res.retried += tries - 1
    return best


def run_schedule(variants: Sequence[Variant], stats: dict[str, Stats], dev: Device,
                 make_step: Callable[[], Step], repeat: int, lo_runs: int, retries: int,
                 budget: Budget, say: Say,
                 prepare: Callable[[], float | None] = lambda: None) -> ScheduleResult:
    """Fill ``stats`` with ``repeat`` repetitions (fewer when the budget runs out: a repetition
    starts only when the slowest one so far still fits in what is left)."""
    res = ScheduleResult(requested=repeat, done=0)
    durations: list[float] = []
    for rep in range(repeat):
        if durations and not budget.fits(max(durations)):
            res.stopped = (f"the {budget.seconds:.0f} s budget: {budget.elapsed():.0f} s used, "
                           f"a repetition takes ~{max(durations):.0f} s — stopped after "
                           f"{rep} of {repeat} repetitions")
            say(f"budget: {res.stopped}")
            break
        t_rep = time.perf_counter()
        shift = rep % len(variants)
        # Round-robin within a repetition, so drift hits every loader alike, starting one loader
        # later each time, so no loader always runs first, last or after the same neighbour.
        for v in list(variants[shift:]) + list(variants[:shift]):
            st = stats[v.name]
            e2e = _timed(v, dev, make_step, retries, budget, prepare, say, "end-to-end", res)
            st.runs.append(e2e)
            line = (f"[rep {rep + 1}/{repeat}] {v.name:<34} end-to-end {e2e.wall:7.3f} s "
                    f"(other load {disturbance(e2e):4.0%})")
            if v.family != "compute-only" and lo_runs > 0:
                los = [_timed(v, dev, lambda: None, retries, budget, prepare, say,
                              "loader-only", res) for _ in range(lo_runs)]
                st.loader_only.extend(los)
                line += (f", loader-only {statistics.median(r.wall for r in los):7.3f} s "
                         f"(median of {len(los)})")
            say(line)
        durations.append(time.perf_counter() - t_rep)
        res.done = rep + 1
    return res


def sweep_task_sizes(path: Path, batch: int, dev: Device, sizes_mib: Sequence[int], runs: int,
                     nbytes: int, shuffle: bool, seed: int, say: Say,
                     batch_chunks: int | None = None) -> list[dict]:
    """The gds loader, loader-only, at each KvikIO ``task_size`` (MiB): median of ``runs``
    epochs after one warm-up epoch. Returns one row per size (``error`` when it could not run)."""
    rows = []
    for mib in sizes_mib:
        row: dict = {"task_size_mib": mib}
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
        finally:
            v.close()
        w = statistics.median(walls)
        row.update(backend=v.backend, wall_s=w, wall_s_runs=walls, gb_per_s=nbytes / w / 1e9,
                   best_gb_per_s=nbytes / min(walls) / 1e9)
        say(f"task size {mib:>3} MiB: loader-only {w:.3f} s = {row['gb_per_s']:.2f} GB/s "
            f"(median of {runs})")
        rows.append(row)
    return rows
