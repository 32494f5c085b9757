"""A deterministic DALES-like dataset for the benchmark, written with ``DatasetWriter``.

DALES tiles are aerial LiDAR: 500 m × 500 m, ground with buildings, vegetation, cars, trucks,
power lines, fences and poles; fields x, y, z, intensity (float32) and sem_class, ins_class
(int32). The generator reproduces that schema and rough class mix, not the geometry: the
benchmark measures bytes moved, and the bytes only need to be deterministic and not trivially
compressible. Points are generated and written in chunks, so memory stays bounded.

With ``chunk_size`` the same points are written spatially chunked (x, y cells of that edge,
Morton order, through the converter's own :class:`ScanChunker`), as
``gds-stream convert --chunk-size`` would store them; cached in a directory of its own.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from gds_stream.convert.chunks import ScanChunker
from gds_stream.errors import DatasetError
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset

log = logging.getLogger(__name__)

SCHEMA = (
    FieldSpec("x", np.dtype("<f4")),
    FieldSpec("y", np.dtype("<f4")),
    FieldSpec("z", np.dtype("<f4")),
    FieldSpec("intensity", np.dtype("<f4")),
    FieldSpec("sem_class", np.dtype("<i4")),
    FieldSpec("ins_class", np.dtype("<i4")),
)
#: DALES classes: 0 unknown, 1 ground, 2 vegetation, 3 cars, 4 trucks, 5 power lines,
#: 6 fences, 7 poles, 8 buildings — and a rough share of points for each.
CLASS_SHARE = np.array([0.01, 0.50, 0.24, 0.02, 0.01, 0.01, 0.02, 0.01, 0.18])
NUM_CLASSES = len(CLASS_SHARE)
_HEIGHT = np.array([0.0, 0.0, 6.0, 1.5, 3.0, 18.0, 1.2, 8.0, 12.0], dtype=np.float32)
_INTENSITY = np.array([20, 60, 35, 80, 70, 15, 45, 50, 90], dtype=np.float32)
_HAS_INSTANCES = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
TILE_M = 500.0
CHUNK = 1 << 20
SEED = 20240611


def default_num_scans(points: int) -> int:
    """A few scans: about one per 10 M points, between 2 and 8 (1 for tiny sets)."""
    if points < 2:
        return 1
    return int(min(8, max(2, round(points / 10e6))))


def dataset_dir(workdir: str | Path, points: int, chunk_size: float | None = None) -> Path:
    tail = "" if chunk_size is None else f"-chunks{chunk_size:g}"
    return Path(workdir) / f"dales-like-{points}{tail}"


def _chunk(rng: np.random.Generator, n: int, tile: int, first_instance: int) -> dict:
    ox, oy = (tile % 4) * TILE_M, (tile // 4) * TILE_M
    x = rng.random(n, dtype=np.float32) * np.float32(TILE_M)
    y = rng.random(n, dtype=np.float32) * np.float32(TILE_M)
    cls = rng.choice(NUM_CLASSES, size=n, p=CLASS_SHARE).astype(np.int32)
    ground = (np.sin(x * np.float32(0.013)) * np.float32(4.0)
              + np.cos(y * np.float32(0.009)) * np.float32(3.0) + np.float32(100.0))
    z = ground + _HEIGHT[cls] * rng.random(n, dtype=np.float32)
    intensity = _INTENSITY[cls] + rng.standard_normal(n, dtype=np.float32) * np.float32(8.0)
    inst = np.where(_HAS_INSTANCES[cls],
                    first_instance + (x // 25).astype(np.int32) * 20 + (y // 25).astype(np.int32),
                    -1).astype(np.int32)
    return {"x": x + np.float32(ox), "y": y + np.float32(oy), "z": z,
            "intensity": intensity, "sem_class": cls, "ins_class": inst}


def generate(out_dir: str | Path, points: int, num_scans: int | None = None,
             seed: int = SEED, progress: bool = True, chunk_size: float | None = None) -> Path:
    """Write ``points`` DALES-like points in ``num_scans`` scans to ``out_dir`` (atomic);
    spatially chunked on x, y cells of edge ``chunk_size`` when given."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    num_scans = default_num_scans(points) if num_scans is None else num_scans
    rng = np.random.default_rng(seed)
    base, extra = divmod(points, num_scans)
    done = 0
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    chunked = {} if chunk_size is None else {"chunk_size": float(chunk_size), "chunk_dims": 2}
    with DatasetWriter(out_dir, SCHEMA, overwrite=True, **chunked) as w:
        for s in range(num_scans):
            name = f"dales-like-tile-{s}"
            ch = (None if chunk_size is None
                  else ScanChunker(SCHEMA, float(chunk_size), 2, Path(out_dir).parent, name))
            sink = w if ch is None else ch
            try:
                left = base + (1 if s < extra else 0)
                while left:
                    n = min(CHUNK, left)
                    sink.append(_chunk(rng, n, s, first_instance=s * 1000))
                    left -= n
                    done += n
                    if progress:
                        print(f"\rgenerating {out_dir}: {done / points:6.1%}", end="",
                              file=sys.stderr)
                if ch is not None:
                    ch.write_to(w)
            finally:
                if ch is not None:
                    ch.close()
            w.end_scan(name, generator="bench.datagen", seed=seed)
    if progress:
        print(file=sys.stderr)
    return Path(out_dir)


def ensure(workdir: str | Path, points: int, progress: bool = True,
           chunk_size: float | None = None) -> Path:
    """The cached dataset for ``points`` (chunked on ``chunk_size`` when given) under
    ``workdir``: reused when it opens and matches, regenerated otherwise."""
    path = dataset_dir(workdir, points, chunk_size)
    if path.exists():
        try:
            ds = open_dataset(path)
            ok = ds.num_points == points and [s for s in ds.schema.values()] == list(SCHEMA)
            if chunk_size is None:
                ok = ok and ds.num_chunks == 0
            else:
                ok = ok and ds.num_chunks > 0 and ds.chunk_size == float(chunk_size) \
                    and ds.chunk_dims == 2
            ds.close()
            if ok:
                return path
        except DatasetError as exc:
            log.warning("regenerating %s: %s", path, exc)
        shutil.rmtree(path)
    return generate(path, points, progress=progress, chunk_size=chunk_size)
