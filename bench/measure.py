"""Timing: one epoch, the other load on the machine, statistics over repetitions.

Owns: the device wrapper, :func:`run_epoch` (wall, stall, points, checksum, and the CPU other
processes took meanwhile), :class:`Stats` and :func:`summarize` (medians, spreads, loader-only
numbers per loader), :func:`check_results` (every checksum equal before any speed) and
:func:`paired_speedup`. The round-robin schedule with its time budget lives in
``bench.schedule``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from bench.backbone import FIELDS, Checksum, ChecksumMismatch, Step, compare_checksums
from bench.variants import Variant

#: A run during which other processes (or the hypervisor) took more than this share of the
#: machine is disturbed and, with --retries, run again (kept: the least disturbed attempt).
DISTURBED = 0.05
#: /proc/stat counts in 10 ms ticks: shorter runs can't be judged.
DISTURBED_MIN_WALL_S = 0.3


# -- device ---------------------------------------------------------------------------------
class Device:
    def __init__(self, spec: str | None):
        if spec is None:
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(spec)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit(f"--device {spec}: CUDA is not available "
                                 f"(torch {torch.__version__})")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise SystemExit(f"--device {spec}: expected cpu or cuda[:N]")
        self.device = dev
        self.cuda = dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def name(self) -> str:
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            return f"{p.name} (cuda:{self.device.index}, {p.total_memory / 2**30:.0f} GiB)"
        return f"CPU: {cpu_model()}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

# -- other load on the machine ----------------------------------------------------------------
@dataclass
class CpuSnapshot:
    busy: float  # machine-wide busy CPU seconds (user+nice+system+irq+softirq), from /proc/stat
    steal: float  # CPU seconds the hypervisor took away
    own: float  # this process and its reaped children
    wall: float

    @staticmethod
    def take() -> "CpuSnapshot | None":
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        t = os.times()
        return CpuSnapshot((v[0] + v[1] + v[2] + v[5] + v[6]) / hz,
                           (v[7] if len(v) > 7 else 0) / hz,
                           t.user + t.system + t.children_user + t.children_system
                           + _live_children_cpu(hz),
                           time.perf_counter())


def _live_children_cpu(hz: int) -> float:
    """CPU seconds of this process's live children (DataLoader workers), from /proc."""
    me, total = os.getpid(), 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after the command: state(3) ppid(4) ... utime(14) stime(15)
        if len(rest) > 13 and int(rest[1]) == me:
            total += int(rest[11]) + int(rest[12])
    return total / hz


def other_load(a: CpuSnapshot | None, b: CpuSnapshot | None) -> dict | None:
    """CPU used by other processes (and stolen by the hypervisor) between two snapshots."""
    if a is None or b is None or b.wall <= a.wall:
        return None
    wall, cpus = b.wall - a.wall, os.cpu_count() or 1
    other = max(0.0, (b.busy - a.busy) - (b.own - a.own))
    steal = max(0.0, b.steal - a.steal)
    return {"wall_s": wall, "other_cpu_s": other, "steal_cpu_s": steal,
            "other_fraction": other / (wall * cpus), "steal_fraction": steal / (wall * cpus)}


# -- running ----------------------------------------------------------------------------------
@dataclass
class RunResult:
    wall: float
    stall: float
    points: int
    batches: int
    checksum: dict | None
    resident: float | None = None
    other: dict | None = None  # other processes' CPU during this run (see other_load)
    attempts: int = 1
    first: float = 0.0  # seconds until the first batch was done (the epoch's start cost)


def disturbance(r: "RunResult") -> float:
    if r.other is None:
        return 0.0
    return r.other["other_fraction"] + r.other["steal_fraction"]


def disturbed(r: "RunResult") -> bool:
    return r.wall >= DISTURBED_MIN_WALL_S and disturbance(r) > DISTURBED


def run_epoch(variant: Variant, dev: Device, step: Step | None,
              limit_batches: int | None = None) -> RunResult:
    """One epoch (or its first ``limit_batches``). ``step=None`` is loader-only: touch nothing.
    Stall is host time spent getting the next batch (iterator creation included). On CUDA
    the loop synchronises only at the start and the end, so the clock reads finished work."""
    fields = getattr(variant, "fields", FIELDS)
    cs = Checksum(fields, dev.device) if step is not None else None
    points = batches = 0
    first = 0.0
    dev.sync()
    snap = CpuSnapshot.take()
    t0 = time.perf_counter()
    it = variant.epoch()
    stall = time.perf_counter() - t0
    try:
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                stall += time.perf_counter() - t
                break
            stall += time.perf_counter() - t
            points += int(batch[fields[0]].shape[0])
            batches += 1
            if step is not None:
                step(batch)
                cs.update(batch)
            del batch
            if batches == 1:
                first = time.perf_counter() - t0
            if limit_batches is not None and batches >= limit_batches:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    dev.sync()
    wall = time.perf_counter() - t0
    other = other_load(snap, CpuSnapshot.take())
    return RunResult(wall, stall, points, batches, cs.result() if cs is not None else None,
                     other=other, first=first)


@dataclass
class Stats:
    name: str
    family: str
    backend: str
    config: dict
    runs: list[RunResult] = field(default_factory=list)
    loader_only: list[RunResult] = field(default_factory=list)

    @staticmethod
    def _median(rs: list[RunResult], attr: str) -> float | None:
        return statistics.median(getattr(r, attr) for r in rs) if rs else None

    @property
    def wall(self) -> float | None:
        return self._median(self.runs, "wall")

    @property
    def stall(self) -> float | None:
        return self._median(self.runs, "stall")

    @property
    def lo_wall(self) -> float | None:
        return self._median(self.loader_only, "wall")


def spread(xs: Sequence[float]) -> float | None:
    """(max − min) / median: how far apart the timed epochs of one loader fell."""
    if len(xs) < 2:
        return None
    med = statistics.median(xs)
    return (max(xs) - min(xs)) / med if med > 0 else None


def max_other(rs: Sequence[RunResult]) -> float | None:
    """Largest share of the machine other processes (or the hypervisor) took during a run."""
    vals = [r.other["other_fraction"] + r.other["steal_fraction"] for r in rs if r.other]
    return max(vals) if vals else None


def summarize(st: Stats, num_points: int, nbytes: int, compute_wall: float | None) -> dict:
    d: dict[str, Any] = {"name": st.name, "family": st.family, "backend": st.backend,
                         "config": st.config}
    w = st.wall
    if w is not None:
        d.update({
            "wall_s": w, "wall_s_runs": [r.wall for r in st.runs],
            "wall_spread": spread([r.wall for r in st.runs]),
            "points_per_s": num_points / w, "gb_per_s": nbytes / w / 1e9,
            "stall_s": st.stall, "stall_s_runs": [r.stall for r in st.runs],
            "stall_fraction": st.stall / w if w > 0 else None,
            "speedup_vs_sequential": None,  # filled in paired, once every loader ran
            "checksums": [r.checksum for r in st.runs],
            "resident_before_runs": [r.resident for r in st.runs],
            "other_load_runs": [r.other for r in st.runs],
            "other_load_max": max_other(st.runs),
            "disturbed_runs": sum(disturbed(r) for r in st.runs),
        })
    lw = st.lo_wall
    if lw is not None:
        d["loader_only"] = {
            "wall_s": lw, "wall_s_runs": [r.wall for r in st.loader_only],
            "points_per_s": num_points / lw, "gb_per_s": nbytes / lw / 1e9,
            "best_gb_per_s": nbytes / min(r.wall for r in st.loader_only) / 1e9,
            "wall_spread": spread([r.wall for r in st.loader_only]),
            "stall_s": statistics.median(r.stall for r in st.loader_only),
            "points": [r.points for r in st.loader_only],
            "resident_before_runs": [r.resident for r in st.loader_only],
            "other_load_max": max_other(st.loader_only),
        }
    if w is not None and st.family != "compute-only" and compute_wall is not None and lw:
        d["overlap_efficiency"] = max(compute_wall, lw) / w
    return d


def check_results(stats: Sequence[Stats], num_points: int) -> dict:
    """Every end-to-end run's checksum equal (reference: sequential's first run) and every
    loader-only run counting every point. Raises :class:`ChecksumMismatch`."""
    results = {}
    for st in stats:
        for i, r in enumerate(st.runs):
            results[f"{st.name} (run {i + 1})"] = r.checksum
    ref = next(iter(results), None)
    compare_checksums(results, ref)
    short = [f"{st.name} loader-only run {i + 1}: {r.points} points"
             for st in stats for i, r in enumerate(st.loader_only) if r.points != num_points]
    if ref is not None and results[ref]["points"] != num_points:
        short.insert(0, f"{ref}: {results[ref]['points']} points")
    if short:
        raise ChecksumMismatch(f"loaders did not yield the dataset's {num_points} points: "
                               + "; ".join(short))
    return results[ref] if ref is not None else {}


def paired_speedup(row: dict, ref: dict) -> tuple[float, float | None]:
    """How many times faster ``row`` ran than ``ref``: the median over repetitions of
    ref.wall[i] / row.wall[i]. The round-robin runs the two close together in time within a
    repetition, so the pairing cancels the machine's slow drift. Also returns the spread of
    the paired ratios, (max − min) / median; ratio of medians when the runs don't pair up."""
    a, b = row.get("wall_s_runs") or [], ref.get("wall_s_runs") or []
    if len(a) == len(b) and a and all(x > 0 for x in a):
        ratios = [y / x for x, y in zip(a, b)]
        return statistics.median(ratios), spread(ratios)
    return ref["wall_s"] / row["wall_s"], None
