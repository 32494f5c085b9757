"""Synthetic benchmark rows, environments and loaders shared by the bench test modules (invented
numbers: the reporting, verdict, plot and budget logic is tested without timing anything)."""

from __future__ import annotations

import torch

from bench.backbone import FIELDS


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


def _cpu_rows(compute_wall=2.0, spread=0.02):
    return {"sequential": _row("sequential", 4.0, 3.5, spread=spread),
            "fallback": _row("fallback", 3.0, 0.25, spread=spread),
            "compute-only": _row("compute-only", compute_wall, spread=spread)}


CPU_LIMITS = {"read_warm_bytes_per_s": 3.0e9}


QUIET = {"other_fraction": 0.01, "steal_fraction": 0.0}


def _env():
    return {"device": "CPU: test", "gpu_direct": "-", "versions": {
        "python": "3", "torch": "2", "torch_cuda": None, "numpy": "2", "cupy": "-",
        "kvikio": "-"}, "cpu_count": 2, "torch_threads": 2,
        "dataset": {"path": "d", "points": 3_500_000, "scans": 4, "bytes_selected": 84_000_000,
                    "fields": list(FIELDS)}, "batch_points": 250_000,
        "backbone": "mlp (6→64→9)", "mode": "inference", "page_cache": "warm",
        "page_cache_check": "warm", "repeat": 3, "loader_only_repeat": 15, "torch_cpu_thp": "-",
        "other_load": None, "command": "python -m bench.compare --plot x.png"}


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
