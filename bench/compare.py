"""Every loader against the same backbone and against the machine's limits, in one run.

    python -m bench.compare [--dataset DIR | --points N] [--backbone mlp|linear] [--train]
                            [--cold] [--shuffle] [--repeat 3] [--budget S] [--json PATH]
                            [--plot PATH] [--task-sizes 1,4,8,16] [--smoke]
                            [--chunk-size S --batch-chunks K] [--layout dales|seed]

Loaders (one rank, the same ``batch_points``, ``drop_last=False``; baselines in file order):

* ``sequential``: blocking ``os.preadv`` of each field's range → ``torch.from_numpy`` →
  ``.to(device)``; the baseline;
* ``queue``: one prefetch thread, ``queue.Queue(maxsize=2)``, ``np.copy`` of ``numpy.memmap``
  slices, pageable ``.to(device)`` — the design gds-stream replaces;
* ``torch-dataloader``: a map-style ``torch.utils.data.Dataset`` whose item i is batch i as
  memmap slices (``batch_size=None``), over a small grid of ``num_workers`` × ``pin_memory`` ×
  ``prefetch_factor``; the best configuration is reported;
* ``fallback``: ``open_loader(backend="fallback")`` with the loader's own defaults;
* ``gds``: ``open_loader(backend="gds")`` (the report states its KvikIO mode and why), or listed
  as skipped with the reason; with ``--shuffle`` it shuffles exactly as ``fallback`` does;
* ``compute-only``: the same batches already resident on the device (the compute floor).

Spatial-chunk mode (``--batch-chunks K``, on a dataset chunked by ``--chunk-size S`` or a chunked
``--dataset``): every batch is K whole chunks. ``fallback`` and ``gds`` run with
``batch_chunks=K``; the baselines and compute-only read the library's own plan (the same chunks
in the same order, shuffled too with ``--shuffle``), each batch the concatenation of its chunks'
point ranges for every field. The table adds chunks/s.

Seed layout (``--layout seed``, ``bench.seed``): the seed project's workload — N × 6 float32 in
one file read by its ``numpy.memmap`` + one thread + ``Queue(2)`` + ``np.copy`` pipeline into a
``Linear(6,64)-ReLU-Linear(64,3)`` backbone — against ``open_loader(backend="fallback",
stack={"feat": [the six fields]}, dtype=torch.float32)`` on the same points, with paired
end-to-end and loader-only ratios.

Each loader also runs loader-only (iterate, touch nothing, synchronise on CUDA at the end: the
I/O floor). Every end-to-end run checksums every point it consumed (exact integer sums of the raw
bits, on the device; independent of order); all checksums must agree before any speed is
printed, else exit 3. A run disturbed by other load, or one where compute-only is not the floor,
gets an INCONCLUSIVE verdict that says why. ``--budget`` bounds the run's wall time, counted
from the process start: the untimed warm-up pass is timed as a calibration, each loader's epoch
extrapolated from it, and the run planned to fit (``bench.budget``): fewer loader-only epochs,
then fewer repetitions, then optional loaders left out — each cut said at the start, every
later repetition and retry re-checked against the measured epochs.

This module is the command line only; the work is in ``variants`` (loaders), ``seed`` (the seed
layout), ``limits`` (physical limits, page cache), ``measure`` (epochs, load, statistics),
``budget`` (the plan), ``schedule`` (repetitions, retries), ``goals`` (verdicts), ``report``
(text, JSON) and ``plot`` (PNG).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # ``python bench/compare.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch's CPU allocator maps every large activation afresh; on a VM the page faults cost ~30 %
# of the backbone's time and most of its run-to-run noise. Transparent huge pages for those
# allocations (torch's own THP_MEM_ALLOC_ENABLE switch, read once when torch first allocates)
# remove both. The same for every loader; set THP_MEM_ALLOC_ENABLE=0 to keep torch's default.
THP_SET_BY_BENCH = "torch" not in sys.modules and "THP_MEM_ALLOC_ENABLE" not in os.environ
if THP_SET_BY_BENCH:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import numpy as np  # noqa: E402

from bench import datagen  # noqa: E402
from bench.chunked import ChunkPlanner, add_chunk_rates, check_chunk_args  # noqa: E402
from bench.backbone import FIELDS, LABEL, ChecksumMismatch, Step, build_backbone  # noqa: E402
from bench.goals import assess, evaluate_goals  # noqa: E402
from bench.limits import CacheState, drop_pages, measure_limits, residency  # noqa: E402
from bench.measure import (Device, Stats, check_results, other_load, paired_speedup,  # noqa: E402
                           summarize, CpuSnapshot)
from bench.plot import plot  # noqa: E402
from bench.report import document, environment, render  # noqa: E402
from bench import seed as seedmod  # noqa: E402
from bench.budget import Budget, plan_runs, process_age  # noqa: E402
from bench.schedule import calibrate, run_schedule, sweep_task_sizes  # noqa: E402
from bench.variants import (ComputeOnlyVariant, LibraryVariant, QueueVariant,  # noqa: E402
                            SequentialVariant, TorchDataLoaderVariant, Variant, field_files,
                            tdl_grid)
from gds_stream.capability import probe_gds  # noqa: E402
from gds_stream.errors import GDSStreamError  # noqa: E402
from gds_stream.format import open_dataset  # noqa: E402

#: Points of the default dataset on a CUDA machine (DALES' size).
GPU_POINTS = 36_831_590
#: Default CPU size (measured: 3.0 M points took 102 s on a 2-vCPU AMD EPYC VM, clean).
CPU_POINTS = 3_500_000
GPU_BATCH = 1_000_000
CPU_BATCH = 250_000
SMOKE_POINTS = 200_000
SMOKE_BATCH = 50_000
#: Default --budget (seconds of wall time for the whole run, dataset generation included).
CPU_BUDGET_S = 180
GPU_BUDGET_S = 900
#: On CPU the loader-only epochs are short (tens of ms) and noisy, so they are sampled this many
#: times per repetition (warm cache only).
LOADER_ONLY_FACTOR = 5
TASK_SIZE_RUNS = 3
#: The untimed warm-up (and calibration) pass: this many batches of every loader, end to end and
#: loader-only; the full epoch's cost is extrapolated from them (see bench.budget).
WARMUP_BATCHES = 3
#: Seconds of the budget kept for the report (and the plot with --plot), and the share of the
#: budget the limit measurements may take before they stop repeating.
REPORT_RESERVE_S, PLOT_RESERVE_S, LIMITS_SHARE = 2.0, 4.0, 0.1
EXIT_MISMATCH = 3
EXIT_USAGE = 2


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lo_factor(args: argparse.Namespace, cuda: bool) -> int:
    return 1 if (args.cold or cuda) else LOADER_ONLY_FACTOR


def thp_state() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            sysmode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        sysmode = "unknown"
    val = os.environ.get("THP_MEM_ALLOC_ENABLE")
    who = "set by the bench" if THP_SET_BY_BENCH else "from the environment"
    if val is None:
        return (f"THP_MEM_ALLOC_ENABLE unset (torch imported before the bench could set it); "
                f"system THP: {sysmode}")
    return f"THP_MEM_ALLOC_ENABLE={val} ({who}); system THP: {sysmode}"


def _mib_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MiB as integers, e.g. 1,4,8,16; got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive MiB values, got {text!r}")
    return vals


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, help="an existing gds-stream dataset with the DALES "
                   "fields (default: generate a DALES-like one under --workdir)")
    p.add_argument("--workdir", type=Path, default=Path("bench/results/data"),
                   help="where generated datasets are cached (default: %(default)s)")
    p.add_argument("--points", type=int, help=f"points of the generated dataset (default "
                   f"{GPU_POINTS:,} with CUDA, {CPU_POINTS:,} on CPU)")
    p.add_argument("--batch-points", type=int, help=f"default {GPU_BATCH:,} with CUDA, "
                   f"{CPU_BATCH:,} on CPU")
    p.add_argument("--backbone", choices=("mlp", "linear"), help="default: mlp (linear with "
                   "--layout seed)")
    p.add_argument("--train", action="store_true", help="a full training step per batch "
                   "(default: inference under no_grad)")
    p.add_argument("--repeat", type=int, help="timed epochs per loader (default 3; 1 with --smoke)")
    p.add_argument("--budget", type=float, help=f"seconds of wall time for the whole run, "
                   f"dataset generation included: the runs are planned from a calibration pass "
                   f"and cut (loader-only epochs, repetitions, then optional loaders) to fit, and "
                   f"the run says what it cut (default {CPU_BUDGET_S} on CPU, {GPU_BUDGET_S} with "
                   f"CUDA)")
    p.add_argument("--cold", action="store_true", help="drop the dataset's pages before every "
                   "timed run with posix_fadvise(DONTNEED) (the kernel's page cache only, "
                   "unmapped pages only) and check with fincore that it worked")
    p.add_argument("--layout", choices=("dales", "seed"), default="dales", help="dales: six "
                   "fields, every loader (default); seed: the seed project's workload, N × 6 "
                   "float32 in one file read by its memmap + thread + Queue(2) pipeline, against "
                   "gds-stream's fallback with stack= (Linear(6,64)-ReLU-Linear(64,3))")
    p.add_argument("--shuffle", action="store_true", help="gds and fallback shuffle (the same "
                   "seed, so the same order); the baselines stay in file order")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default %(default)s)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--plot", type=Path, help="write a PNG here")
    p.add_argument("--task-sizes", type=_mib_list, metavar="MIB,…", help="also run the gds "
                   "loader loader-only at each KvikIO task_size (MiB), e.g. 1,4,8,16 (GPU only)")
    p.add_argument("--smoke", action="store_true", help=f"tiny run of every variant for CI "
                   f"({SMOKE_POINTS:,} points, batch {SMOKE_BATCH:,}, repeat 1, small grid)")
    p.add_argument("--retries", type=int, default=2, help="run a timed epoch again, up to this "
                   "many times, when other processes took > 5 %% of the machine during it "
                   "(default %(default)s; 0: never)")
    p.add_argument("--chunk-size", type=float, metavar="S", help="generate the DALES-like "
                   "dataset spatially chunked on x, y cells of edge S metres (needs "
                   "--batch-chunks)")
    p.add_argument("--batch-chunks", type=int, metavar="K", help="spatial-chunk mode: batches of "
                   "K whole chunks, every loader in the library's chunk order")
    p.add_argument("--no-gds", action="store_true", help="skip the gds loader")
    p.add_argument("--source", choices=("local", "s3"), default="local", help="s3: loader-only "
                   "GB/s from a local S3 server (moto) beside the local files, cold and with "
                   "the cache warm (bench/s3_bench.py)")
    p.add_argument("--range-sizes", type=_mib_list, metavar="MIB,…", help="with --source s3: "
                   "also sweep the range size of a GET (reader task and cache block), e.g. "
                   "1,4,8,16,32, one batch per epoch")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs to stderr")
    p.add_argument("--transform", metavar="PRESET", help="instead: Pointcept's augmentations "
                   "(preset 'semseg') batched in gds-stream vs a per-sample DataLoader (see "
                   "bench.transform_bench)")
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.smoke else 3
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.retries < 0:
        p.error("--retries must be >= 0")
    if args.budget is not None and args.budget <= 0:
        p.error("--budget must be > 0 seconds")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    for name in ("points", "batch_points"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dataset is not None and args.points is not None:
        p.error("--points sizes a generated dataset; it can't be combined with --dataset")
    check_chunk_args(p, args)
    seedmod.check_seed_args(p, args)
    if args.range_sizes and args.source != "s3":
        p.error("--range-sizes sweeps object-store reads; it goes with --source s3")
    if args.backbone is None:
        args.backbone = "linear" if args.layout == "seed" else "mlp"
    return args


def main(argv: Sequence[str] | None = None, from_process_start: bool = False) -> int:
    """``from_process_start``: the budget counts the interpreter's start and imports too (the
    command line; not a call from a longer-lived process)."""
    args = parse_args(argv)
    args.from_process_start = from_process_start
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.source == "s3":
        from bench.s3_bench import run

        return run(args)
    try:
        if args.transform is not None:
            from bench.transform_bench import run
            return run(args)
        return _main(args)
    except ChecksumMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:  # no speeds: a run whose loaders disagree has none worth keeping
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"error": str(exc), "checksums_equal": False},
                                            indent=1) + "\n")
        return EXIT_MISMATCH
    except GDSStreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _build_variants(args, ds, files, batch: int, dev: Device, cap, grid_cfgs: list[dict],
                    skipped: dict[str, str],
                    planner: ChunkPlanner | None = None) -> list[Variant]:
    n = ds.num_points

    def order():  # chunk mode: each loader walks the library's plan epoch by epoch
        return None if planner is None else planner.order()

    variants: list[Variant] = [SequentialVariant(files, n, batch, dev.device, order=order()),
                               QueueVariant(files, n, batch, dev.device, keep_maps=not args.cold,
                                            order=order())]
    for cfg in grid_cfgs:
        variants.append(TorchDataLoaderVariant(files, n, batch, dev.device,
                                               persistent=not args.cold, order=order(), **cfg))
    lib = {"shuffle": args.shuffle, "seed": args.seed, "batch_chunks": args.batch_chunks}
    variants.append(LibraryVariant("fallback", ds.path, batch, dev.device, **lib))
    if args.no_gds:
        skipped["gds"] = "--no-gds"
    elif not cap.available:
        skipped["gds"] = cap.reason
    elif not dev.cuda:
        skipped["gds"] = f"device is {dev.device}, the GPU-direct backend needs CUDA"
    else:
        try:
            variants.append(LibraryVariant("gds", ds.path, batch, dev.device, **lib))
        except GDSStreamError as exc:
            skipped["gds"] = str(exc)
    variants.append(ComputeOnlyVariant(ds, files, batch, dev.device, order=order()))
    return variants


def _main(args: argparse.Namespace) -> int:
    dev = Device(args.device)
    cuda = dev.cuda
    budget = Budget(args.budget or (GPU_BUDGET_S if cuda else CPU_BUDGET_S),
                    reserve=REPORT_RESERVE_S + (PLOT_RESERVE_S if args.plot else 0.0))
    if getattr(args, "from_process_start", False):
        budget.start -= process_age()  # the interpreter's start and the imports count too
    args.budget = budget.seconds
    seed_layout = args.layout == "seed"
    batch = args.batch_points or (SMOKE_BATCH if args.smoke else GPU_BATCH if cuda else CPU_BATCH)
    if args.dataset is not None:
        path = args.dataset
    else:
        points = args.points or (SMOKE_POINTS if args.smoke else GPU_POINTS if cuda else CPU_POINTS)
        path = datagen.ensure(args.workdir, points, chunk_size=args.chunk_size)
    ds = open_dataset(path)
    planner = None
    if args.batch_chunks is not None:
        if ds.num_chunks == 0:
            raise GDSStreamError(f"{ds.path}: --batch-chunks needs a spatially chunked dataset "
                                 f"(gds-stream convert --chunk-size); this one has no chunks")
        planner = ChunkPlanner(ds.path, args.batch_chunks, args.shuffle, args.seed)
        batch = -(-ds.num_points // max(1, len(planner.segments(0))))  # mean points per batch
    missing = [f for f in FIELDS if f not in ds.schema]
    if missing:
        raise GDSStreamError(f"{ds.path}: the benchmark needs fields {', '.join(FIELDS)}; "
                             f"missing {', '.join(missing)}")
    files = field_files(ds, FIELDS)
    paths = sorted({ff.path for ff in files})
    n = ds.num_points
    num_batches = len(planner.segments(0)) if planner is not None else -(-n // batch)
    nbytes = sum(ff.nbytes for ff in files)
    bpp = sum(ff.point_bytes for ff in files)
    if seed_layout:
        progress("writing the seed layout's N × 6 float32 file …")
        seed_path = seedmod.ensure_seed_file(ds)
        seed_ds = open_dataset(seedmod.ensure_seed_dataset(seed_path))
        # what this layout reads: the seed file and its conversion (limits, page-cache state)
        files = field_files(seed_ds, FIELDS)
        paths = sorted({ff.path for ff in files}) + [str(seed_path)]
        num_classes = seedmod.SEED_CLASSES
        bpp = 6 * seedmod.ROW.itemsize
        nbytes = n * bpp
    else:
        lab = ds.read(LABEL) if n else np.zeros(0, np.int32)  # the head's width: every class
        num_classes = int(lab.max()) + 1 if n and lab.max() >= 0 else 1
        del lab
    model_desc = build_backbone(args.backbone, num_classes).describe()
    cap = probe_gds()
    cache = CacheState("cold" if args.cold else "warm")

    progress("measuring limits …")
    limits = measure_limits(files, paths, cache, args.repeat, args.cold, dev.device,
                            allowance_s=LIMITS_SHARE * budget.seconds)

    progress("building loaders …")
    grid_cfgs = [] if seed_layout else tdl_grid(cuda, args.smoke)
    skipped: dict[str, str] = {}
    if seed_layout:
        variants = seedmod.build_variants(seed_ds, seed_path, batch, dev.device, args.cold)
        essential = set(seedmod.ESSENTIAL)
    else:
        variants = _build_variants(args, ds, files, batch, dev, cap, grid_cfgs, skipped,
                                   planner)
        essential = {"sequential", "fallback", "gds", "compute-only"}
    lo_runs = lo_factor(args, cuda)
    fields = variants[0].fields

    def make_step() -> Step:
        return Step(build_backbone(args.backbone, num_classes, device=dev.device), args.train,
                    fields=fields)

    def prepare_run() -> float | None:
        if args.cold:
            cache.drop_method = drop_pages(paths)
            return cache.record(*residency(paths))
        return None

    snap0 = None
    try:
        progress(f"warm-up and calibration ({WARMUP_BATCHES} batches of each loader) …")
        est = calibrate(variants, dev, make_step, num_batches, WARMUP_BATCHES,
                        prepare_run if args.cold else (lambda: None))
        if args.cold:
            cache.checks.clear()
        plan = plan_runs(est, [v.name for v in variants], essential, args.repeat, lo_runs,
                         budget.left())
        tdl = [v for v in variants if v.family == "torch-dataloader"]
        grid_cfgs = [c for c, v in zip(grid_cfgs, tdl) if v.name in plan.keep]
        for v in [v for v in variants if v.name not in plan.keep]:
            skipped[v.name] = plan.dropped[v.name]
            v.close()
        variants = [v for v in variants if v.name in plan.keep]
        stats = {v.name: Stats(v.name, v.family, v.backend, v.config) for v in variants}
        lo_runs = plan.lo_runs
        progress(f"plan: {len(variants)} loaders ({', '.join(v.name for v in variants)}); "
                 f"{args.repeat} repetition(s) requested of 1 end-to-end + {lo_runs} loader-only "
                 f"epoch(s) each (compute-only: end-to-end only), up to {args.retries} retries of "
                 f"a disturbed run; budget {budget.seconds:.0f} s ({budget.elapsed():.0f} s used "
                 f"so far, {budget.reserve:.0f} s kept for the report): {plan.describe()}"
                 + "".join(f"; {k} skipped: {why}" for k, why in skipped.items()))
        if not args.cold:
            cache.record(*residency(paths))
        snap0 = CpuSnapshot.take()
        sched = run_schedule(variants, stats, dev, make_step, args.repeat, lo_runs, args.retries,
                             budget, progress, prepare_run, est, essential)
    finally:
        for v in variants:
            v.close()
        if planner is not None:
            planner.close()
        gc.collect()
    load = other_load(snap0, CpuSnapshot.take())
    if load is not None:
        load["retried_runs"], load["retries_allowed"] = sched.retried, args.retries
        load["retries_refused_for_budget"] = sched.retries_refused

    for v in [v for v in variants if not stats[v.name].runs]:  # the budget skipped every run
        skipped[v.name] = (f"skipped in all {sched.done} repetition(s): the budget had no room "
                           f"for it beside the essential loaders")
        del stats[v.name]
    variants = [v for v in variants if v.name in stats]

    # -- correctness first -----------------------------------------------------------------
    ref_checksum = check_results(list(stats.values()), n)

    task_sizes = None
    if args.task_sizes:
        if "gds" in skipped:
            task_sizes = {"skipped": f"the gds loader did not run: {skipped['gds']}"}
        else:
            progress(f"KvikIO task_size sweep: {args.task_sizes} MiB …")
            task_sizes = {"rows": sweep_task_sizes(ds.path, batch, dev, args.task_sizes,
                                                   TASK_SIZE_RUNS, nbytes, args.shuffle,
                                                   args.seed, progress, args.batch_chunks,
                                                   budget, est.lo.get("gds", 0.0))}

    # -- numbers ---------------------------------------------------------------------------
    compute_wall = stats["compute-only"].wall
    summaries = {name: summarize(st, n, nbytes, compute_wall) for name, st in stats.items()}
    if planner is not None:
        add_chunk_rates(summaries.values(), planner.num_chunks)
    ref_row = summaries[variants[0].name]  # sequential, or the seed pipeline
    for srow in summaries.values():
        if srow.get("wall_s"):
            srow["speedup_vs_sequential"], srow["speedup_spread"] = paired_speedup(srow, ref_row)
    grid = [summaries[v.name] for v in variants if v.family == "torch-dataloader"]
    best = min(grid, key=lambda g: g["wall_s"]) if grid else None
    for g in grid:
        g["best"] = g is best
    rows: list[dict] = []
    by_family: dict[str, dict] = {}
    for v in variants:
        s = summaries[v.name]
        if v.family == "torch-dataloader" and s is not best:
            continue
        rows.append(s)
        by_family[v.family] = s
    if best is not None:
        best["backend"] = f"best of {len(grid)}: " + best["name"].split("[", 1)[1].rstrip("]")
    g_cfg = by_family.get("gds", {}).get("config")
    gds_mode = ({"backend": g_cfg["backend"], "reason": g_cfg.get("backend_reason")}
                if g_cfg else None)
    env = environment(dev, cap, args, ds, nbytes, batch, model_desc, cache, grid_cfgs, load,
                      lo_runs, thp_state(), gds_mode)
    env["layout"] = args.layout
    env["speedup_reference"] = variants[0].name
    env["schedule"] = {"requested": sched.requested, "done": sched.done, "stopped": sched.stopped,
                       "plan": plan.describe(), "cuts": plan.cuts + [
                           f"{k} skipped in {c} repetition(s)"
                           for k, c in sched.skipped_runs.items() if k in stats]}
    if planner is not None:
        env["batch_chunks"] = args.batch_chunks
        env["dataset"].update(chunks=planner.num_chunks, chunk_size=ds.chunk_size,
                              chunk_points_min_median_max=list(planner.chunk_points))
    quality = assess(by_family, load, env["schedule"])
    if seed_layout:
        env["dataset"]["seed_file"] = str(seed_path)
        goals = seedmod.seed_goals(by_family, quality, args.cold)
    else:
        goals = evaluate_goals(by_family, limits, cuda, args.backbone, args.cold,
                               skipped.get("gds"), quality)
    ratios = seedmod.paired_ratios(by_family, seed_layout)
    print(render(env, limits, rows, grid, skipped, goals, bpp, ref_checksum, quality, task_sizes,
                 ratios))
    elapsed = budget.elapsed()
    print(f"\n(total run time {elapsed:.0f} s of a {budget.seconds:.0f} s budget)")
    if args.json:
        doc = document(env, limits, bpp, num_classes, rows, grid, list(summaries.values()),
                       skipped, ref_checksum, cache, goals, quality, task_sizes, elapsed)
        doc["paired_ratios"] = ratios
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if args.plot:
        plot(args.plot, env, rows, limits, quality, skipped)
    ds.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(from_process_start=True))
