"""The wall-time budget of a benchmark run, planned from measured costs.

Owns: :class:`Budget` (seconds since the start of the run, minus a reserve kept for the report,
on an injectable clock), :class:`Estimates` (seconds per end-to-end and loader-only epoch of each
loader: first extrapolated from the calibration pass, then replaced by the slowest measured
epoch) and :func:`plan_runs` (pure: how many loader-only epochs per repetition, how many
repetitions and which loaders fit in what is left, and what was cut and why). The schedule
(``bench.schedule``) re-checks every repetition and every retry against the same estimates, so
a machine that slows down mid-run cuts repetitions instead of overrunning the budget.

Nothing here sleeps or times anything itself: every decision is a function of the numbers it is
given, and the unit tests feed it invented ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

#: Estimates are multiplied by this before they are compared with what is left: other load can
#: slow the later runs down (a run planned for 180 s took 218 s on a busy machine: +21 %).
MARGIN = 1.25


@dataclass
class Budget:
    """``seconds`` of wall time for the whole run, counted from ``start`` on ``clock``;
    ``reserve`` seconds of it are kept for what follows the timed runs (report, plot)."""

    seconds: float
    clock: Callable[[], float] = time.perf_counter
    start: float | None = None
    reserve: float = 0.0

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds still available to timed work (the reserve excluded)."""
        return self.seconds - self.reserve - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


def extrapolate(wall: float, first: float, batches: int, total_batches: int) -> float:
    """Seconds for an epoch of ``total_batches``, from a partial one that took ``wall`` for
    ``batches`` batches, ``first`` of it until the first batch was done (the start cost:
    threads, worker processes, the first read)."""
    if batches <= 0:
        return wall
    if batches == 1 or total_batches <= 1:
        return wall * max(1, total_batches)
    per = max(0.0, wall - first) / (batches - 1)
    return first + per * (total_batches - 1)


def process_age() -> float:
    """Seconds since this process started (so a budget counts the interpreter's start and the
    imports too), from /proc; 0.0 where that can't be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Estimates:
    """Seconds per epoch for each loader: ``e2e[name]`` end to end, ``lo[name]`` loader-only
    (absent for a loader without a loader-only run), first from the calibration pass.
    :meth:`observe` replaces a loader's estimate by its slowest measured epoch, and scales the
    estimates of epochs not measured yet by how much slower than calibrated the latest measured
    epoch ran (the machine got busier), never below the calibration."""

    e2e: dict[str, float] = field(default_factory=dict)
    lo: dict[str, float] = field(default_factory=dict)
    measured: set[tuple[str, str]] = field(default_factory=set)
    slowdown: float = 1.0
    calibrated: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, table in (("e2e", self.e2e), ("lo", self.lo)):
            for name, v in table.items():
                self.calibrated.setdefault((name, kind), v)

    def observe(self, name: str, kind: str, wall: float) -> None:
        table = self.e2e if kind == "e2e" else self.lo
        key = (name, kind)
        cal = self.calibrated.get(key)
        if cal:
            self.slowdown = max(1.0, wall / cal)
        table[name] = max(table[name], wall) if key in self.measured else wall
        self.measured.add(key)

    def get(self, name: str, kind: str) -> float:
        table = self.e2e if kind == "e2e" else self.lo
        v = table.get(name, 0.0)
        return v if (name, kind) in self.measured else v * self.slowdown

    def loader(self, name: str, lo_runs: int) -> float:
        """One loader's share of a repetition: one end-to-end and ``lo_runs`` loader-only."""
        return self.get(name, "e2e") + lo_runs * self.get(name, "lo")

    def repetition(self, names: Iterable[str], lo_runs: int, margin: float = MARGIN) -> float:
        return margin * sum(self.loader(n, lo_runs) for n in names)


@dataclass
class RunPlan:
    requested: int  # repetitions asked for
    repeat: int  # repetitions expected to fit (at least 1)
    lo_runs: int  # loader-only epochs per loader and repetition
    keep: list[str]  # loaders that run, in order
    dropped: dict[str, str]  # loaders left out, and why
    rep_s: float  # estimated seconds of one repetition (margin included)
    left_s: float  # seconds that were left to plan in
    cuts: list[str] = field(default_factory=list)  # what was cut, one phrase each
    overrun_s: float = 0.0  # > 0: even the minimum is expected to exceed the budget by this

    def describe(self) -> str:
        fit = 0 if self.overrun_s > 0 else self.repeat
        line = (f"{fit} of {self.requested} repetition(s) expected to fit "
                f"(~{self.rep_s:.1f} s each, estimated from the calibration pass with a "
                f"{MARGIN:.2f}× margin; {max(0.0, self.left_s):.0f} s left)")
        if self.cuts:
            line += "; cut to fit: " + "; ".join(self.cuts)
        if self.overrun_s > 0:
            line += (f"; NOT EVEN ONE repetition of the essential loaders fits: running one "
                     f"anyway, expected to exceed the budget by ~{self.overrun_s:.0f} s")
        return line


def plan_runs(est: Estimates, names: Sequence[str], essential: Iterable[str], repeat: int,
              lo_runs: int, left_s: float, margin: float = MARGIN) -> RunPlan:
    """What fits in ``left_s`` seconds, cutting in this order until it does:

    1. fewer loader-only epochs per repetition (down to 1);
    2. fewer repetitions (down to 1);
    3. leave out non-essential loaders, the most expensive first, until one repetition fits;
    4. if even the essential loaders do not fit once, plan one repetition of them anyway and
       say by how much it is expected to overrun (a run that measures nothing is no use).
    """
    keep, lo, ess = list(names), lo_runs, set(essential)
    cuts: list[str] = []

    def fit() -> tuple[int, float]:
        r = est.repetition(keep, lo, margin)
        return (repeat if r <= 0 else int(max(0.0, left_s) // r)), r

    n, r = fit()
    while n < repeat and lo > 1:
        lo -= 1
        n, r = fit()
    if lo < lo_runs:
        cuts.append(f"loader-only epochs per repetition {lo_runs} → {lo}")
    if n >= 1:
        rep = min(n, repeat)
        if rep < repeat:
            cuts.append(f"repetitions {repeat} → {rep}")
        return RunPlan(repeat, rep, lo, keep, {}, r, left_s, cuts)
    if repeat > 1:
        cuts.append(f"repetitions {repeat} → 1")
    dropped: dict[str, str] = {}
    for name in sorted((k for k in keep if k not in ess), key=lambda k: -est.loader(k, lo)):
        keep.remove(name)
        dropped[name] = (f"left out to fit the budget (~{margin * est.loader(name, lo):.1f} s a "
                         f"repetition)")
        n, _ = fit()
        if n >= 1:
            break
    if dropped:
        cuts.append(f"{len(dropped)} loader(s) left out: {', '.join(dropped)}")
    n, r = fit()
    return RunPlan(repeat, 1, lo, keep, dropped, r, left_s, cuts,
                   overrun_s=0.0 if n >= 1 else r - max(0.0, left_s))
