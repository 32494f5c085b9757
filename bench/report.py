"""What the benchmark prints and writes: the environment, the text report, the JSON document.

Owns: :func:`environment` (device, KvikIO mode, versions, dataset, what ran and how), the text
table (:func:`render`: header, checksums, the measurement's verdict, limits, loaders, the torch
DataLoader grid, the KvikIO task-size sweep, goals) and :func:`document` (every number, for
``--json``). Sizes are binary (MiB, GiB); bandwidths are decimal GB/s (10^9 bytes/s).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import numpy as np
import torch

from bench.backbone import FIELDS
from bench.measure import DISTURBED, Device
from gds_stream.format import Dataset

GB = 1e9  # bandwidths: decimal GB/s, as storage and PCIe are quoted
MIB = 1 << 20


def _fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def environment(dev: Device, cap: Any, args: Any, ds: Dataset, nbytes: int, batch: int,
                model_desc: str, cache: Any, grid_cfgs: list[dict], load: dict | None,
                lo_repeat: int, thp: str, gds_mode: dict | None = None) -> dict:
    """``gds_mode``: the gds loader's own ``backend`` and ``backend_reason`` when it ran."""
    def ver(mod):
        v = cap.versions.get(mod)
        if v:
            return v
        try:
            return getattr(__import__(mod), "__version__", "?")
        except Exception:
            return "not installed"

    if gds_mode:
        gds = f"gds loader ran as {gds_mode['backend']}" + (
            f" ({gds_mode['reason']})" if gds_mode.get("reason") else "")
    elif cap.mode == "gds":
        gds = "GDS: KvikIO reads through GPUDirect Storage"
    elif cap.mode == "gds-compat":
        gds = f"gds-compat: KvikIO compat mode ({cap.reason})"
    else:
        gds = f"unavailable: {cap.reason}"
    try:
        cmd = shlex.join(sys.orig_argv)
    except AttributeError:  # Python < 3.10
        cmd = shlex.join([sys.executable, *sys.argv])
    return {
        "device": dev.name(),
        "gpu_direct": gds,
        "gpu_direct_mode": gds_mode["backend"] if gds_mode else cap.mode,
        "gpu_direct_reason": (gds_mode or {}).get("reason") or getattr(cap, "reason", None),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "numpy": np.__version__,
                     "cupy": ver("cupy"), "kvikio": ver("kvikio")},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dataset": {"path": str(ds.path), "points": ds.num_points, "scans": ds.num_scans,
                    "bytes_selected": nbytes, "fields": list(FIELDS)},
        "batch_points": batch,
        "backbone": f"{args.backbone} ({model_desc})",
        "mode": "train" if args.train else "inference",
        "shuffle": bool(args.shuffle),
        "budget_s": args.budget,
        "page_cache": cache.mode,
        "page_cache_check": cache.verdict(),
        "repeat": args.repeat,
        "loader_only_repeat": args.repeat * lo_repeat,
        "torch_cpu_thp": thp,
        "torch_dataloader_grid": grid_cfgs,
        "command": cmd,
        "other_load": load,
    }

def _load_line(load: dict | None) -> str:
    if load is None:
        return "unknown (no /proc/stat)"
    pct = 100 * (load["other_fraction"] + load["steal_fraction"])
    line = (f"other processes used {load['other_cpu_s']:.2f} CPU-s and the hypervisor stole "
            f"{load['steal_cpu_s']:.2f} CPU-s during the {load['wall_s']:.0f} s of timed runs "
            f"({pct:.1f} % of the machine)")
    if load.get("retried_runs"):
        line += (f"; {load['retried_runs']} run(s) repeated because they were disturbed "
                 f"(--retries {load['retries_allowed']})")
    if pct > 100 * DISTURBED:
        line += " — timings may be disturbed; see other% per loader"
    return line


def render(env: dict, limits: dict, rows: list[dict], grid: list[dict], skipped: dict,
           goals: list[dict], bytes_per_point: int, checksum: dict,
           quality: dict | None = None, task_sizes: dict | None = None,
           ratios: list[dict] | None = None) -> str:
    L = []
    L.append("gds-stream benchmark")
    L.append("=" * 20)
    v = env["versions"]
    for k, val in (
            ("device", env["device"]),
            ("GPU-direct", env["gpu_direct"]),
            ("versions", f"torch {v['torch']} (CUDA {v['torch_cuda'] or 'none'}), "
                         f"numpy {v['numpy']}, cupy {v['cupy']}, kvikio {v['kvikio']}, "
                         f"python {v['python']}"),
            ("CPUs", f"{env['cpu_count']} (torch threads {env['torch_threads']})"),
            ("dataset", f"{env['dataset']['path']}: {env['dataset']['points']:,} points, "
                        f"{env['dataset']['scans']} scans, "
                        f"{env['dataset']['bytes_selected'] / MIB:,.1f} MiB in "
                        f"{len(env['dataset']['fields'])} fields ({bytes_per_point} B/point)"),
            ("batch", _batch_line(env)),
            ("backbone", f"{env['backbone']}, {env['mode']}"),
            ("page cache", env["page_cache_check"]),
            ("repeat", _repeat_line(env)),
            ("torch CPU", env["torch_cpu_thp"]),
            ("other load", _load_line(env.get("other_load"))),
            ("command", env["command"]),
    ):
        L.append(f"{k:>11}: {val}")
    L.append("")
    L.append(f"checksums: all equal — {checksum.get('points', 0):,} points, row hash "
             f"{checksum.get('rows')}")
    L.append("")
    L.extend(_quality_lines(quality))
    L.append("limits (measured in this run)")
    for key, label in (("read_warm_bytes_per_s", "read, warm → memory"),
                       ("read_cold_bytes_per_s", "read, cold → memory"),
                       ("read_warm_cached_bytes_per_s", "(read, warm → cache-hot)"),
                       ("h2d_pinned_bytes_per_s", "host→device, pinned"),
                       ("d2d_bytes_per_s", "device→device copy")):
        bw = limits.get(key)
        if bw is None:
            continue
        extra = ""
        k = key.replace("_bytes_per_s", "")
        if key.startswith("read") and k + "_1t_bytes_per_s" in limits:
            extra = (f"  (1 thread {limits[k + '_1t_bytes_per_s'] / 1e9:.2f}, "
                     f"{limits['read_threads']} threads "
                     f"{limits[k + '_nt_bytes_per_s'] / 1e9:.2f} GB/s; best of "
                     f"{limits['read_repeats']})")
        L.append(f"  {label:<24} {bw / GB:8.2f} GB/s = {bw / bytes_per_point / 1e6:9.1f} "
                 f"Mpoints/s{extra}")
    ring = limits.get("read_warm_ring_bytes") or limits.get("read_ring_bytes")
    cached = limits.get("read_cached_chunk_bytes")
    if ring and cached and "read_chunk_bytes" in limits:
        sizes = "/".join(str(c >> 20) for c in limits["read_chunk_bytes"])
        by = [f"{m} {limits[k] / GB:.2f}" for m in limits.get("read_methods", ())
              if (k := f"read_warm_{m.replace('-', '_')}_bytes_per_s") in limits]
        L.append(f"  read → memory: the faster of preadv and a copy out of a numpy.memmap "
                 f"({', '.join(by)} GB/s), {sizes} MiB pieces")
        L.append(f"    into {ring / 2**20:.0f} MiB of reused buffers: every byte lands in "
                 f"memory, as batches do; the goals use it.")
        L.append(f"  read → cache-hot: {cached >> 20} MiB preadv into one {cached >> 20} MiB "
                 f"buffer per thread that stays in the CPU caches (reference only).")
        cut = limits.get("read_warm_passes_min")
        if cut is not None and cut < limits.get("read_repeats", 0):
            L.append(f"  (the limit measurements stopped repeating at their share of the budget: "
                     f"best of {cut} pass(es) at the least)")
    L.append("")
    chunked = bool(env.get("batch_chunks"))
    head = (f"{'loader':<18} {'backend / config':<30} {'wall s':>8} {'±%':>5} {'Mpts/s':>8} "
            + (f"{'chunk/s':>8} " if chunked else "") + f"{'GB/s':>6} "
            f"{'stall s':>8} {'stall%':>6} {'overlap':>7} {'speedup':>7} {'other%':>7} | "
            f"{'ld-only s':>9} {'ld GB/s':>7}")
    L.append("end-to-end (median epoch) | loader-only")
    L.append(head)
    L.append("-" * len(head))
    for r in rows:
        lo = r.get("loader_only") or {}
        pps = r.get("points_per_s")
        sf = r.get("stall_fraction")
        sp = r.get("speedup_vs_sequential")
        L.append(
            f"{r['family']:<18} {r['backend'][:30]:<30} {_fmt(r.get('wall_s'), '8.3f'):>8} "
            f"{_fmt(_pct(r.get('wall_spread')), '5.0f'):>5} "
            f"{_fmt(pps and pps / 1e6, '8.2f'):>8} "
            + (f"{_fmt(r.get('chunks_per_s'), '8.1f'):>8} " if chunked else "")
            + f"{_fmt(r.get('gb_per_s'), '6.3f'):>6} "
            f"{_fmt(r.get('stall_s'), '8.3f'):>8} {_fmt(_pct(sf), '5.1f'):>6} "
            f"{_fmt(r.get('overlap_efficiency'), '7.2f'):>7} "
            f"{_fmt(sp, '6.2f') + ('×' if sp else ''):>7} "
            f"{_other(r):>7} | "
            f"{_fmt(lo.get('wall_s'), '9.4f'):>9} {_fmt(lo.get('gb_per_s'), '7.3f'):>7}")
    for name, why in skipped.items():
        L.append(f"{name:<18} skipped: {why}")
    for r in rows:
        if r["family"] == "gds":
            c = r["config"]
            L.append(f"  gds ran as KvikIO mode {c.get('backend')}"
                     + (f": {c['backend_reason']}" if c.get("backend_reason") else "")
                     + (f" (task_size {c['task_size'] >> 20} MiB)" if c.get("task_size") else ""))
    L.append("")
    L.append("  ±% = (max − min) / median of the end-to-end epochs: differences smaller than "
             "this are noise.")
    L.append("  stall = host seconds blocked in next() (on CUDA a loader whose copy synchronises "
             "also waits there for queued compute);")
    L.append("  overlap = max(compute-only, this loader's loader-only) / wall (1.00 = perfect "
             "overlap);")
    L.append(f"  speedup = median over repetitions of {env.get('speedup_reference', 'sequential')}"
             f" wall / this wall, each pair run back to back (cancels the machine's drift).")
    L.append("  other% = the largest share of the machine that other processes or the hypervisor "
             f"took during one of this loader's end-to-end runs; '!' = a kept run was disturbed "
             f"(> {DISTURBED:.0%}).")
    L.append("  GB/s = 10^9 bytes/s (decimal); sizes are binary (MiB = 2^20 bytes).")
    if any(g["config"].get("zero_copy_views") for g in grid):
        L.append("  torch-dataloader with num_workers=0 on a CPU device yields the memmap views "
                 "themselves: its loader-only")
        L.append("  run reads nothing (the pages are read when the model first touches them), so "
                 "its ld-only numbers are not an I/O floor.")
    if grid:
        L.append("")
        L.append("torch-dataloader grid (median epoch)")
        gh = (f"  {'config':<34} {'wall s':>8} {'GB/s':>7} {'stall%':>7} | {'ld-only s':>9} "
              f"{'ld GB/s':>7}")
        L.append(gh)
        for g in grid:
            lo = g.get("loader_only") or {}
            best = "  ← best" if g.get("best") else ""
            L.append(f"  {g['name']:<34} {_fmt(g.get('wall_s'), '8.3f'):>8} "
                     f"{_fmt(g.get('gb_per_s'), '7.3f'):>7} "
                     f"{_fmt(_pct(g.get('stall_fraction')), '6.1f'):>7} | "
                     f"{_fmt(lo.get('wall_s'), '9.4f'):>9} {_fmt(lo.get('gb_per_s'), '7.3f'):>7}"
                     f"{best}")
    L.extend(_task_size_lines(task_sizes))
    if ratios:
        from bench.seed import ratio_text

        L.append("")
        L.extend(ratio_text(ratios))
    L.append("")
    L.append("goals" + ("" if not quality or quality["verdict"] == "clean" else
                        " (INCONCLUSIVE measurement: see above)"))
    for g in goals:
        L.append(f"  [{g['status']:^13}] {g['goal']}: {g['detail']}")
        if g["status"] == "inconclusive":
            L.append(f"  {'':15} leaning {g['leaning']}, but: " + "; ".join(g["reasons"]))
    if not goals:
        L.append("  (none apply)")
    return "\n".join(L)



def _batch_line(env: dict) -> str:
    k = env.get("batch_chunks")
    if not k:
        return (f"{env['batch_points']:,} points, drop_last=False, 1 rank; "
                + ("gds and fallback shuffled (same seed), the baselines in file order"
                   if env.get("shuffle") else "shuffle=False"))
    d = env["dataset"]
    lo, med, hi = d.get("chunk_points_min_median_max") or (0, 0, 0)
    return (f"{k} whole chunks (~{env['batch_points']:,} points), drop_last=False, 1 rank; "
            f"{d.get('chunks', 0):,} chunks of {d.get('chunk_size', 0):g} m × "
            f"{d.get('chunk_size', 0):g} m, {lo:,}/{med:,}/{hi:,} points (min/median/max); "
            f"every loader reads the library's chunk plan (same chunks, same order"
            + (", shuffled with one seed, a new order each epoch)" if env.get("shuffle")
               else ", file order)"))


def _other(r: dict) -> str:
    v = r.get("other_load_max")
    return _fmt(_pct(v), "5.1f") + ("!" if r.get("disturbed_runs") else " ")


def _repeat_line(env: dict) -> str:
    sched = env.get("schedule") or {}
    done = sched.get("done", env["repeat"]) or env["repeat"]
    lo = env["loader_only_repeat"] // max(1, env["repeat"]) * done
    line = (f"median of {done} end-to-end and {lo} loader-only epochs per loader, after a short "
            f"untimed warm-up pass")
    if sched.get("done") is not None and sched["done"] < sched.get("requested", 0):
        line += f" — ONLY {sched['done']} of {sched['requested']} ran"
        if sched.get("stopped"):
            line += f": {sched['stopped']}"
    if sched.get("cuts"):
        line += "; cut to fit the budget: " + "; ".join(sched["cuts"])
    if env.get("budget_s"):
        line += f"; budget {env['budget_s']:.0f} s"
    return line


def _quality_lines(quality: dict | None) -> list[str]:
    if not quality:
        return []
    if quality["verdict"] == "clean":
        L = ["measurement: clean (no loader beat compute-only beyond noise; other load within "
             "the threshold)"]
    else:
        L = ["measurement: INCONCLUSIVE — speed verdicts below are not trustworthy:"]
        L += [f"  - {why}" for why in quality["reasons"]]
    L += [f"  note: {n}" for n in quality.get("notes", [])]
    return L + [""]


def _task_size_lines(ts: dict | None) -> list[str]:
    if not ts:
        return []
    L = ["", "KvikIO task_size sweep (gds loader-only, median epoch)"]
    if ts.get("skipped"):
        return L + [f"  skipped: {ts['skipped']}"]
    for r in ts.get("rows", []):
        if "error" in r:
            L.append(f"  {r['task_size_mib']:>4} MiB  failed: {r['error']}")
        elif "skipped" in r:
            L.append(f"  {r['task_size_mib']:>4} MiB  skipped: {r['skipped']}")
        else:
            L.append(f"  {r['task_size_mib']:>4} MiB  {r['wall_s']:8.3f} s  {r['gb_per_s']:7.2f} GB/s"
                     f"  (best {r['best_gb_per_s']:.2f} GB/s; {r['backend']})")
    return L


def document(env: dict, limits: dict, bpp: int, num_classes: int, rows: list[dict],
             grid: list[dict], summaries: list[dict], skipped: dict[str, str], checksum: dict,
             cache: Any, goals: list[dict], quality: dict, task_sizes: dict | None,
             elapsed: float) -> dict:
    """Every number of the run, for ``--json``."""
    return {"environment": env, "limits": limits, "bytes_per_point": bpp,
            "num_classes": num_classes, "measurement": quality, "loaders": rows,
            "torch_dataloader_grid": grid, "all_variants": summaries,
            "skipped": {k: {"reason": why} for k, why in skipped.items()},
            "task_sizes": task_sizes,
            "checksum": checksum, "checksums_equal": True,
            "page_cache": {"mode": cache.mode, "drop_method": cache.drop_method,
                           "residency_method": cache.method, "resident_fractions": cache.checks,
                           "worked": cache.worked(), "verdict": cache.verdict()},
            "goals": goals, "elapsed_s": elapsed}
