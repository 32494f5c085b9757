"""The seed project's workload as a benchmark layout: ``python -m bench.compare --layout seed``.

The seed project stored a point cloud as one file of N × 6 float32 rows (x, y, z, intensity,
sem_class, ins_class) and fed a ``Linear(6,64)-ReLU-Linear(64,3)`` backbone through its own
pipeline: a ``numpy.memmap`` of the file, one producer thread putting ``np.copy`` of 250,000-row
slices into a ``queue.Queue(maxsize=2)``, ``torch.from_numpy`` in the training loop.

Owns: the seed file (written from the benchmark's dataset: the int32 labels become float32,
exact below 2^24), the dataset our loaders read (that file converted back by gds-stream's raw
converter, so both sides read the same bytes of the same dtypes), and the loaders of this
layout, every one yielding ``{"feat": (n, 6) float32}`` in file order:

* ``seed-pipeline``: the seed's design, on the seed file (:class:`bench.variants.QueueVariant`
  over a single 6-component field);
* ``fallback-stack``: ``open_loader(backend="fallback", stack={"feat": [six fields]},
  dtype=torch.float32)`` on that dataset (:func:`ensure_seed_dataset`) — the tensor the model
  takes, assembled by the loader off the training loop's critical path (row-major: an
  interleave of the six columns);
* ``fallback-stack-cols``: the same with ``stack_layout="columns"`` — the (n, 6) tensor
  column-major, each field read straight into its column (no interleave);
* ``fallback-loopstack``: the same loader yielding the six fields, stacked to N × 6 in the
  training loop (what a user writes without ``stack=``; for reference);
* ``compute-only``: the feature tensors already resident.

And the layout's goals: ``fallback-stack`` and ``fallback-stack-cols`` end to end at least as
fast as the seed pipeline (paired median ratio ≥ 1.00), each judged on its own.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.backbone import FIELDS
from bench.goals import judge
from bench.measure import paired_speedup
from bench.variants import FieldFile, LibraryVariant, QueueVariant, Variant
from gds_stream.convert import convert
from gds_stream.format import Dataset

FEAT = "feat"
SEED_CLASSES = 3  # the seed's head: Linear(64, 3)
ROW = np.dtype("<f4")
#: Rows written per step when the seed file is made (bounded memory).
WRITE_ROWS = 1 << 20
REFERENCE = "seed-pipeline"
OURS = "fallback-stack"
OURS_COLS = "fallback-stack-cols"
ESSENTIAL = (REFERENCE, OURS, OURS_COLS, "compute-only")


def check_seed_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options the seed layout cannot honour are usage errors (exit 2)."""
    if args.layout != "seed":
        return
    for opt, given in (("--batch-chunks", args.batch_chunks is not None),
                       ("--shuffle", args.shuffle), ("--train", args.train),
                       ("--task-sizes", bool(args.task_sizes))):
        if given:
            p.error(f"--layout seed reproduces the seed's inference pipeline in file order; "
                    f"{opt} is for the default layout")
    if args.backbone not in (None, "linear"):
        p.error("--layout seed runs the seed's Linear(6,64)-ReLU-Linear(64,3) backbone "
                "(--backbone linear)")


def seed_file_path(ds: Dataset) -> Path:
    return Path(ds.path).parent / f"{Path(ds.path).name}.seed-n6-f32.bin"


def ensure_seed_file(ds: Dataset) -> Path:
    """The dataset's points as N × 6 float32 rows in one file beside it (written atomically;
    reused while its size matches and it is newer than the dataset's manifest)."""
    path = seed_file_path(ds)
    n = ds.num_points
    manifest = Path(ds.path) / "manifest.json"
    try:
        st = path.stat()
        if st.st_size == n * 6 * ROW.itemsize and st.st_mtime >= manifest.stat().st_mtime:
            return path
    except OSError:
        pass
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for a in range(0, n, WRITE_ROWS):
                b = min(n, a + WRITE_ROWS)
                rows = np.empty((b - a, 6), dtype=ROW)
                for j, name in enumerate(FIELDS):
                    rows[:, j] = ds.read(name, a, b)
                f.write(rows.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def seed_dataset_path(seed_path: Path) -> Path:
    return seed_path.with_name(seed_path.name + ".gds")


def ensure_seed_dataset(seed_path: Path) -> Path:
    """The seed file converted by gds-stream's own raw converter (``gds-stream convert
    SEED.bin --format raw --raw-fields x,y,z,intensity,sem_class,ins_class --raw-dtype
    float32``): the dataset our loaders read holds the seed's very bytes and dtypes, six float32
    fields. Reused while the seed file is the one it was converted from (its size and
    modification time, kept in a stamp beside the dataset)."""
    out = seed_dataset_path(seed_path)
    stamp = out.with_name(out.name + ".source")
    st = seed_path.stat()
    source = f"{st.st_size} {st.st_mtime_ns}"
    try:
        if stamp.read_text() == source:
            conv = Dataset(out)
            try:
                if conv.num_points * 6 * ROW.itemsize == st.st_size:
                    return out
            finally:
                conv.close()
    except Exception:  # absent or stale: rewritten below
        pass
    convert([seed_path], out, format="raw", raw_fields=list(FIELDS), raw_dtype="float32",
            overwrite=True, progress=False)
    stamp.write_text(source)
    return out


def seed_field(path: Path, num_points: int) -> FieldFile:
    return FieldFile(FEAT, str(path), 0, num_points * 6 * ROW.itemsize, ROW, 6)


class SeedPipelineVariant(QueueVariant):
    """The seed's pipeline: memmap of the N × 6 file, one thread, ``Queue(2)``, ``np.copy``."""

    family = REFERENCE
    fields = (FEAT,)

    def __init__(self, path: Path, num_points: int, batch: int, device, keep_map: bool = True):
        super().__init__([seed_field(path, num_points)], num_points, batch, device,
                         keep_maps=keep_map)
        self.name = REFERENCE
        self.backend = "memmap+thread+Queue(2)+np.copy"
        self.config.update(file="N × 6 float32", layout="seed")


class StackVariant(LibraryVariant):
    """gds-stream's fallback assembling the (n, 6) float32 tensor itself (``stack=``)."""

    fields = (FEAT,)

    def __init__(self, path: Path, batch: int, device, columns: bool = False):
        name = OURS_COLS if columns else OURS
        extra = {"stack_layout": "columns"} if columns else {}
        super().__init__("fallback", path, batch, device, name=name,
                         stack={FEAT: list(FIELDS)}, dtype=torch.float32, **extra)
        self.family = name
        self.backend = (f"stack= {'columns' if columns else 'rows'} in loader; "
                        f"{self.backend}")


class LoopStackVariant(Variant):
    """gds-stream's fallback yielding six fields, stacked to (n, 6) float32 in the loop."""

    family = "fallback-loopstack"
    fields = (FEAT,)

    def __init__(self, path: Path, batch: int, device):
        self.inner = LibraryVariant("fallback", path, batch, device)
        super().__init__(self.family, f"stack in loop; {self.inner.backend}",
                         dict(self.inner.config, stack="in the training loop"))

    def epoch(self):
        return self._gen()

    def _gen(self):
        it = self.inner.epoch()
        try:
            for b in it:
                yield {FEAT: torch.stack([b[f].to(torch.float32) for f in FIELDS], dim=1)}
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self):
        self.inner.close()


class SeedComputeOnly(Variant):
    family = "compute-only"
    fields = (FEAT,)

    def __init__(self, path: Path, num_points: int, batch: int, device):
        super().__init__("compute-only", "feature tensors resident on the device", {})
        m = np.memmap(path, dtype=ROW, mode="r", shape=(num_points, 6))
        self.batches = [{FEAT: torch.from_numpy(np.copy(m[a:a + batch])).to(device)}
                        for a in range(0, num_points, batch)]
        del m

    def epoch(self):
        return iter(self.batches)

    def close(self):
        self.batches = []


def build_variants(ds: Dataset, seed_path: Path, batch: int, device, cold: bool) -> list[Variant]:
    """``ds``: the seed file converted (:func:`ensure_seed_dataset`), read by our loaders."""
    n = ds.num_points
    return [SeedPipelineVariant(seed_path, n, batch, device, keep_map=not cold),
            StackVariant(ds.path, batch, device),
            StackVariant(ds.path, batch, device, columns=True),
            LoopStackVariant(ds.path, batch, device),
            SeedComputeOnly(seed_path, n, batch, device)]


def ratio_line(row: dict | None, ref: dict | None, label: str) -> dict | None:
    """Paired median ratios ``ref wall / row wall`` (> 1: ``row`` is faster), end to end and
    loader-only, with every pair's ratio."""
    if not row or not ref or not row.get("wall_s") or not ref.get("wall_s"):
        return None
    out = {"label": label, "row": row["name"], "reference": ref["name"]}
    for kind, a, b in (("end_to_end", row, ref),
                       ("loader_only", row.get("loader_only"), ref.get("loader_only"))):
        if not a or not b:
            continue
        r, sp = paired_speedup(a, b)
        pairs = [y / x for x, y in zip(a.get("wall_s_runs") or [], b.get("wall_s_runs") or [])
                 if x > 0] if len(a.get("wall_s_runs") or []) == len(b.get("wall_s_runs") or []) \
            else []
        out[kind] = {"median": r, "spread": sp, "pairs": pairs}
    return out


def paired_ratios(by_family: dict[str, dict], seed_layout: bool) -> list[dict]:
    """The ratios the goals are stated in: ours against the seed pipeline (and the loop-stack
    reference), or the fallback (and gds) against the sequential baseline."""
    if seed_layout:
        pairs = [(OURS, REFERENCE), (OURS_COLS, REFERENCE), ("fallback-loopstack", REFERENCE)]
    else:
        pairs = [("fallback", "sequential"), ("gds", "sequential")]
    out = [ratio_line(by_family.get(a), by_family.get(b), f"{a} vs {b}") for a, b in pairs]
    return [r for r in out if r]


def seed_goals(rows: dict[str, dict], quality: dict, cold: bool) -> list[dict]:
    cache = "cold" if cold else "warm"
    ref = rows.get(REFERENCE)
    out = []
    for name, what in ((OURS, "stack="), (OURS_COLS, 'stack=, stack_layout="columns"')):
        ours = rows.get(name)
        goal = f"fallback with {what} end-to-end ≥ 1.00× the seed pipeline ({cache})"
        if not ours or not ref:
            out.append(judge(goal, None, "one of the two did not run", quality))
            continue
        r, sp = paired_speedup(ours, ref)
        out.append(judge(goal, r >= 1.0, f"{name} {ours['wall_s']:.3f} s vs {REFERENCE} "
                         f"{ref['wall_s']:.3f} s (median epochs); paired ratio {r:.3f}×",
                         quality, r, sp, rows=(ours, ref)))
    return out


def ratio_text(ratios: Sequence[dict | None]) -> list[str]:
    """The report's paired-ratio lines: the numbers the goals are stated in."""
    L = []
    for rt in ratios:
        if not rt:
            continue
        for kind, what in (("end_to_end", "end-to-end"), ("loader_only", "loader-only")):
            d = rt.get(kind)
            if not d:
                continue
            pairs = ", ".join(f"{p:.3f}" for p in d["pairs"])
            L.append(f"  {rt['label']} {what}: paired median {d['median']:.3f}× over "
                     f"{len(d['pairs']) or 1} pair(s)" + (f" [{pairs}]" if pairs else ""))
    if L:
        L.insert(0, "paired ratios (reference wall / loader wall, each pair run back to back; "
                    "> 1.000× = the loader is faster)")
    return L
