"""``python -m bench.compare --transform semseg``: Pointcept's augmentation pipeline, two ways.

* ``gds-stream``: ``open_loader(..., batch_chunks=K, transform=preset)`` — the batched
  transforms run inside the loader's pipeline (CPU: its worker thread; CUDA: its own stream) on
  whole batches of chunks;
* ``per-sample DataLoader``: what Pointcept-style training runs today — a ``torch.utils.data``
  ``DataLoader`` whose item is one chunk (read field by field), transformed one sample at a time by
  the numpy reference (:mod:`bench.pointcept_ref`) in its workers and collated Pointcept-style
  (concatenated, ``offset``), over a grid of ``num_workers``; the best configuration is reported.

Both read the library's chunk plan (the same chunks in each batch, the same order) and deliver
the same dict (``coord``, ``feat`` = coord + intensity, ``segment``, ``grid_coord``, ``offset``).
Reported per pipeline: transformed points/s (input points of the epoch / wall time, loader
only), and in a training loop (a small per-point MLP, SGD) the epoch's wall time and its stall —
the time ``next()`` kept the loop waiting. ``compute-only`` runs the same steps on batches
already transformed and resident: the floor. The run is planned to fit ``--budget`` like the
rest of the comparison (:mod:`bench.transform_plan`: the pipelines the ratio needs first, the
rest of both grids and the preset alone (:mod:`bench.transform_solo`; alone, in seconds:
``python -m bench.transform_bench --preset-only``) while the budget lasts, cuts reported).
Transforms are random, so the two pipelines' outputs are not comparable point for point; the
tests prove each transform equal to the reference unit by unit.

The preset (semseg), on the DALES-like data in metres (aerial, about 7 points/m², chunks of
50 m): CenterShift(apply_z) · RandomRotate(z, ±π, about the origin, p 0.5) · RandomScale(0.9,
1.1) · RandomFlip · RandomJitter(0.005, 0.02) · ElasticDistortion([[2, 4], [8, 16]]) ·
GridSample(0.05, train, grid_coord) · SphereCrop(12 000, random) · CenterShift(no z) ·
NormalizeColor (colour fields only: the DALES-like data has none). The elastic granularities and
magnitudes are Pointcept's indoor defaults ([[0.2, 0.4], [0.8, 1.6]], for rooms of ~5 m) × 10
for chunks of 50 m: the same distortion relative to the scene, and a noise grid of a few cells
per point (2–4 on the 1 M-point dataset's chunks of ~5 000 points; the defaults would draw
hundreds of times more). SphereCrop's 12 000 points bound a chunk as Pointcept's crop bounds
each sample (the 1 M-point dataset's chunks are smaller: it keeps them whole).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import datagen
from bench import pointcept_ref as ref
from bench.chunked import ChunkPlanner
from bench.budget import MARGIN
from bench.measure import Device
from bench.transform_plan import TransformPlan

PRESETS = ("semseg",)
FIELDS = ("x", "y", "z", "intensity", "sem_class")
CHUNK_SIZE_M = 50.0
BATCH_CHUNKS = 16
GRID_SIZE = 0.05
POINT_MAX = 12_000
ELASTIC = [[2.0, 4.0], [8.0, 16.0]]
SMOKE_POINTS = 40_000
CPU_POINTS = 3_500_000
GPU_POINTS = 36_831_590
#: Points of the resident batch the preset is timed on alone (the GPU goal: < 5 ms).
SOLO_POINTS = 1_000_000


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the preset, both ways -------------------------------------------------------------------
def semseg(lib: bool, color: bool = False, point_max: int = POINT_MAX):
    """The semseg preset: gds-stream's batched transforms (``lib``) or the per-sample
    reference, with the same parameters."""
    if lib:
        from gds_stream import transforms as T
    else:
        T = ref
    ts = [T.CenterShift(apply_z=True),
          T.RandomRotate(angle=[-1, 1], axis="z", center=[0, 0, 0], p=0.5),
          T.RandomScale(scale=[0.9, 1.1]),
          T.RandomFlip(p=0.5),
          T.RandomJitter(sigma=0.005, clip=0.02),
          T.ElasticDistortion(ELASTIC)]
    if color:
        ts.append(T.NormalizeColor())
    grid = dict(grid_size=GRID_SIZE, mode="train", return_grid_coord=True)
    ts += [T.GridSample(hash="fnv", **grid) if lib else T.GridSample(hash_type="fnv", **grid),
           T.SphereCrop(point_max=point_max, mode="random"),
           T.CenterShift(apply_z=False)]
    if lib:
        ts.append(T.ToPointcept(feat=["coord", "intensity"], segment="sem_class"))
    return T.Compose(ts)


# -- the per-sample DataLoader ----------------------------------------------------------------
class ChunkSamples(torch.utils.data.Dataset):
    """Item i: chunk i read as a Pointcept sample (one read per field, as a per-sample dataset
    loads its sample's files), transformed by the reference. Each process opens the dataset
    itself (never pickled)."""

    def __init__(self, path: Path, transform):
        self.path, self.transform = Path(path), transform
        self._ds = None

    def _open(self):
        if self._ds is None:
            from gds_stream.format import open_dataset
            self._ds = open_dataset(self.path)
            self._ends = np.asarray(self._ds.chunk_offsets)
        return self._ds

    def __len__(self) -> int:
        return int(self._open().num_chunks)

    def __getitem__(self, i: int) -> dict:
        ds = self._open()
        a, b = int(self._ends[i]), int(self._ends[i + 1])
        m = {f: ds.read(f, a, b) for f in FIELDS}
        sample = {"coord": np.stack([m["x"], m["y"], m["z"]], 1),
                  "strength": m["intensity"].astype(np.float32),
                  "segment": m["sem_class"].astype(np.int64)}
        return self.transform(sample, _worker_rng())

    def __getstate__(self):
        return {"path": self.path, "transform": self.transform, "_ds": None}


_RNG: list = []


def _worker_rng() -> np.random.Generator:
    if not _RNG:
        _RNG.append(np.random.default_rng(torch.initial_seed() % (1 << 63)))
    return _RNG[0]


def _reset_rng(_worker_id: int) -> None:
    _RNG.clear()


def collate(samples: list[dict]) -> dict:
    """Pointcept's collate and Collect: concatenated, ``offset``, ``feat`` = coord + strength."""
    c = ref.collate(samples)
    out = {"coord": torch.from_numpy(c["coord"].astype(np.float32)),
           "grid_coord": torch.from_numpy(c["grid_coord"]),
           "segment": torch.from_numpy(c["segment"]),
           "offset": torch.from_numpy(c["offset"])}
    out["feat"] = torch.cat([out["coord"], torch.from_numpy(c["strength"])[:, None]], 1)
    return out


class PerSampleLoader:
    name = "per-sample DataLoader"

    def __init__(self, path, planner: ChunkPlanner, num_workers: int, device, seed: int):
        self.planner, self.device, self.epoch_no = planner, device, 0
        self.config = {"num_workers": num_workers, "prefetch_factor": 2 if num_workers else None,
                       "persistent_workers": bool(num_workers)}
        self.label = f"w={num_workers}"
        g = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            ChunkSamples(path, semseg(lib=False)), batch_sampler=_PlanSampler(self),
            num_workers=num_workers, collate_fn=collate, generator=g,
            worker_init_fn=_reset_rng, prefetch_factor=2 if num_workers else None,
            persistent_workers=bool(num_workers),
            pin_memory=torch.device(device).type == "cuda")

    def epoch(self):
        for b in self.loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
        self.epoch_no += 1

    def close(self):
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, owner):
        self.owner = owner

    def __iter__(self):
        return iter([u.tolist() for u in self.owner.planner.units(self.owner.epoch_no)])

    def __len__(self):
        return len(self.owner.planner.units(self.owner.epoch_no))


# -- gds-stream ---------------------------------------------------------------------------------
class LibraryPipeline:
    name = "gds-stream"

    def __init__(self, path, batch_chunks: int, device, seed: int, backend: str,
                 num_threads: int | None = None):
        from gds_stream import open_loader

        self.loader = open_loader(path, backend=backend, batch_chunks=batch_chunks,
                                  fields=list(FIELDS), device=str(device), shuffle=True,
                                  seed=seed, drop_last=False, rank=0, world_size=1,
                                  num_threads=num_threads, transform=semseg(lib=True))
        self.epoch_no = 0
        o = self.loader.options
        cpu = torch.device(device).type == "cpu"
        where = (f"{o.transform_threads} transform thread(s)" if cpu else "loader stream")
        reads = ("reads inline" if getattr(self.loader, "inline_reads", False)
                 else f"{o.num_threads} reader thr")
        self.label = f"{self.loader.backend}, {reads}, transforms: {where}"
        self.config = {"backend": self.loader.backend, "num_threads": o.num_threads,
                       "prefetch": o.prefetch, "transforms_run": where,
                       "transform_threads": o.transform_threads if cpu else None}

    def epoch(self):
        self.loader.set_epoch(self.epoch_no)
        self.epoch_no += 1
        return iter(self.loader)

    def close(self):
        self.loader.close()


# -- measurement --------------------------------------------------------------------------------
class Model(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(),
                                 nn.Linear(128, classes))

    def forward(self, feat):
        return self.net(feat)


class TrainStep:
    def __init__(self, device, classes: int):
        torch.manual_seed(0)
        self.model = Model(classes).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self, batch):
        loss = F.cross_entropy(self.model(batch["feat"]), batch["segment"], ignore_index=-1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def run_epoch(source, dev: Device, step=None) -> dict:
    """One epoch: wall, stall (time in ``next()``), output points and batches."""
    dev.sync()
    t0 = time.perf_counter()
    it = iter(source())
    stall = time.perf_counter() - t0
    out_points = batches = 0
    while True:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            stall += time.perf_counter() - t
            break
        stall += time.perf_counter() - t
        out_points += int(b["coord"].shape[0])
        batches += 1
        if step is not None:
            step(b)
    dev.sync()
    return {"wall_s": time.perf_counter() - t0, "stall_s": stall, "out_points": out_points,
            "batches": batches}


def _median_run(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return dict(best, wall_spread_s=[min(walls), max(walls)])


def measure(pipe, dev, repeat: int, classes: int, points: int, plan=None,
            essential: bool = True) -> dict:
    """Warm-up epoch (workers, caches; its time sizes the repetitions when a
    :class:`bench.transform_plan.TransformPlan` is given), then ``repeat`` loader-only and
    ``repeat`` training epochs, the median of each."""
    t0 = time.perf_counter()
    run_epoch(pipe.epoch, dev)
    if plan is not None:
        repeat = plan.repetitions(pipe.label, time.perf_counter() - t0, essential)
    lo = _median_run([run_epoch(pipe.epoch, dev) for _ in range(repeat)])
    step = TrainStep(dev.device, classes)
    e2e = _median_run([run_epoch(pipe.epoch, dev, step) for _ in range(repeat)])
    return {"name": pipe.name, "label": pipe.label, "config": pipe.config,
            "loader_only": lo, "train": e2e,
            "points_per_s": points / lo["wall_s"],
            "train_points_per_s": points / e2e["wall_s"],
            "stall_share": e2e["stall_s"] / e2e["wall_s"], "repeat": repeat}


def run(args) -> int:
    """The ``--transform`` mode of ``bench.compare`` (its --workdir, --dataset, --points,
    --chunk-size, --batch-chunks, --device, --seed, --repeat, --budget, --smoke, --json,
    --no-gds). The run is planned to fit --budget (default: the comparison's), see
    :mod:`bench.transform_plan`."""
    if args.transform not in PRESETS:
        print(f"error: --transform: unknown preset {args.transform!r} "
              f"(presets: {', '.join(PRESETS)})", file=sys.stderr)
        return 2
    dev = Device(args.device)
    chunk = args.chunk_size or CHUNK_SIZE_M
    k = args.batch_chunks or BATCH_CHUNKS
    if args.dataset is not None:
        path = args.dataset
    else:
        pts = args.points or (SMOKE_POINTS if args.smoke else GPU_POINTS if dev.cuda
                              else CPU_POINTS)
        path = datagen.ensure(args.workdir, pts, chunk_size=chunk)
    planner = ChunkPlanner(path, k, True, args.seed)
    from gds_stream.format import open_dataset
    ds = open_dataset(path)
    if ds.num_chunks == 0:
        print(f"error: {ds.path}: --transform needs a spatially chunked dataset", file=sys.stderr)
        return 2
    points = ds.num_points
    classes = int(ds.read("sem_class", 0, points).max()) + 1
    cores = len(os.sched_getaffinity(0))
    workers = sorted({0, min(2, cores)} if args.smoke else {0, 1, cores // 2 or 1, cores})
    backend = "fallback" if (args.no_gds or not dev.cuda) else "auto"
    rows, grid, libs = [], [], []
    from bench.budget import Budget, process_age
    from bench.compare import CPU_BUDGET_S, GPU_BUDGET_S, REPORT_RESERVE_S
    budget = Budget(args.budget or (GPU_BUDGET_S if dev.cuda else CPU_BUDGET_S),
                    reserve=REPORT_RESERVE_S)
    if getattr(args, "from_process_start", False):
        budget.start -= process_age()  # the interpreter's start and the imports count too
    solo_points = min(SOLO_POINTS, max(points, 1000))
    # kept for what follows the grids: compute-only's epochs, the preset alone (6 runs)
    plan = TransformPlan(budget, args.repeat, 1 + args.repeat + 6 * solo_points / points)
    progress(f"transform bench: {points:,} points in {ds.num_chunks} chunks of {chunk:g} m, "
             f"{k} chunks per batch, device {dev.device}, {cores} cores, budget "
             f"{budget.seconds:.0f} s")
    # what the comparison needs first (the library's default, the DataLoader on every core),
    # then the rest of both grids while the budget lasts
    order = [("lib", None, True), ("dl", workers[-1], True), ("lib", 1, False)]
    order += [("dl", w, False) for w in reversed(workers[:-1])]
    solo = solo_each = None
    try:
        for kind, arg, essential in order:
            if kind == "lib":
                if arg is not None and libs and libs[0]["config"]["num_threads"] == arg:
                    continue                     # the default is already one thread
                pipe = LibraryPipeline(path, k, dev.device, args.seed, backend, arg)
                into = libs
            else:
                pipe = PerSampleLoader(path, planner, arg, dev.device, args.seed)
                into = grid
            try:
                if not plan.admit(pipe.label, essential):
                    progress(f"  {pipe.name} ({pipe.label}): {plan.cut[pipe.label]}")
                    continue
                progress(f"  {pipe.name} ({pipe.label}) …")
                into.append(measure(pipe, dev, args.repeat, classes, points, plan, essential))
            finally:
                pipe.close()
        rows.append(max(libs, key=lambda r: r["points_per_s"]))
        rows[0]["best_of"] = [r["label"] for r in libs]
        grid.sort(key=lambda r: r["config"]["num_workers"])
        best = max(grid, key=lambda r: r["points_per_s"])
        best["best_of"] = [g["label"] for g in grid]
        rows.append(best)
        # compute-only: the same steps on batches transformed beforehand, resident
        lib = LibraryPipeline(path, k, dev.device, args.seed, backend)
        try:
            t0 = time.perf_counter()
            resident = [b for b in lib.epoch()]
            n_co = plan.repetitions("compute-only", time.perf_counter() - t0, True)
        finally:
            lib.close()
        step = TrainStep(dev.device, classes)
        co = _median_run([run_epoch(lambda: resident, dev, step) for _ in range(n_co)])
        per_point = plan.warmups[libs[0]["label"]] / points
        solo_s = 6 * solo_points * per_point * MARGIN
        if solo_s <= budget.left():
            from bench.transform_solo import solo_preset_ms
            solo, solo_each = solo_preset_ms(dev, solo_points, args.seed)
        else:
            plan.cut["the preset alone"] = (f"skipped: ~{solo_s:.1f} s, "
                                            f"{max(0.0, budget.left()):.1f} s of the budget left")
    finally:
        planner.close()
        ds.close()
    ratio = rows[0]["points_per_s"] / best["points_per_s"]
    doc = {"preset": args.transform, "device": str(dev.device), "cores": cores,
           "dataset": {"path": str(path), "points": points, "chunks": planner.num_chunks,
                       "chunk_size_m": chunk, "batch_chunks": k},
           "rows": rows, "grid": grid, "library_grid": libs, "compute_only": co,
           "ratio_points_per_s": ratio,
           "solo_preset_ms": solo, "solo_transform_ms": solo_each,
           "solo_points": solo_points, "budget": plan.describe()}
    print(render(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


def render(doc: dict) -> str:
    d = doc["dataset"]
    lines = [f"transform preset {doc['preset']!r} on {d['points']:,} points "
             f"({d['chunks']} chunks of {d['chunk_size_m']:g} m, {d['batch_chunks']} per batch), "
             f"device {doc['device']}, {doc['cores']} cores",
             f"{'pipeline':<24} {'config':<52} {'Mpts/s':>7} {'train s':>8} {'stall s':>8} "
             f"{'stall':>6}"]
    for r in doc["rows"]:
        lines.append(f"{r['name']:<24} {r['label'][:52]:<52} {r['points_per_s'] / 1e6:7.2f} "
                     f"{r['train']['wall_s']:8.2f} {r['train']['stall_s']:8.2f} "
                     f"{r['stall_share']:6.0%}")
    co = doc["compute_only"]
    lines.append(f"{'compute-only':<24} {'transformed batches resident':<52} {'':>7} "
                 f"{co['wall_s']:8.2f} {co['stall_s']:8.2f} {'':>6}")
    for name, key in (("gds-stream", "library_grid"), ("per-sample DataLoader", "grid")):
        g = ", ".join(f"{r['label']}: {r['points_per_s'] / 1e6:.2f}" for r in doc[key])
        lines.append(f"{name} grid (Mpts/s): {g}")
    lines.append(f"ratio gds-stream / best per-sample DataLoader (transformed points/s): "
                 f"{doc['ratio_points_per_s']:.2f}x")
    if doc["solo_preset_ms"] is None:
        lines.append(f"the preset alone on one resident batch of {doc['solo_points']:,} points: "
                     f"not measured ({doc['budget']['cut'].get('the preset alone', '')})")
    else:
        lines.append(f"the preset alone on one resident batch of {doc['solo_points']:,} "
                     f"points: {doc['solo_preset_ms']:.1f} ms")
    each = doc.get("solo_transform_ms") or {}
    if each:
        lines.append("  per transform (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in each.items()))
    b = doc["budget"]
    cut = "; ".join(f"{k}: {v}" for k, v in b["cut"].items())
    lines.append(f"budget {b['seconds']:.0f} s, {b['used_s']:.0f} s used"
                 + (f"; cut: {cut}" if cut else ", nothing cut"))
    return "\n".join(lines)


if __name__ == "__main__":
    from bench.transform_solo import main
    sys.exit(main())
