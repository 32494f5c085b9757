"""How LAS/LAZ coordinates are stored: ``--xyz auto|float32|float64``.

LAS stores X, Y, Z as int32 with a scale and an offset, often georeferenced (UTM easting
~500,000 m, where float32 resolves only ~0.03 m). ``float32`` stores x, y, z as float32
relative to a dataset origin (the centre of all inputs' bounds snapped to a multiple of
``ORIGIN_STEP``; zero where float32 resolves the absolute values well enough) and refuses a point
whose ``origin + value`` is not its scaled coordinate within half the scale's magnitude.
``float64`` keeps absolute float64 coordinates. ``auto`` (the default) is float32 where every
point holds within half its scale relative to that origin — proved from the bounds, or where
they do not prove it, by reading the points once (stopping at the first that float32 cannot
hold) — else float64 with one warning saying why.

The bounds are the header's where they contain a sample of the points (the first
``SAMPLE_POINTS``); otherwise — a header's bounds are written by its producer and are sometimes
wrong — the file's coordinates are read once to measure them, with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import common
from .las_guard import read_points

if TYPE_CHECKING:  # pragma: no cover
    from .las import LasSource

log = logging.getLogger(__name__)

#: Values of ``xyz=`` (``--xyz``).
MODES = ("auto", "float32", "float64")
#: A non-zero origin is a multiple of this (in the units of the file's CRS).
ORIGIN_STEP = 100.0
#: Points read from the start of a file to check that its header bounds contain them.
SAMPLE_POINTS = 4096


def scaled(src: "LasSource", points, first: int) -> list[np.ndarray]:
    """The scaled coordinates (x, y, z: float64 arrays) of laspy ``points``; a non-finite one
    (scale 1e300 with offset 1.7e308 overflows) is a :class:`ConversionError` naming the file
    and the point."""
    from ..errors import ConversionError

    arr = points.array
    out = []
    for j, c in enumerate("XYZ"):
        with np.errstate(over="ignore", invalid="ignore"):
            v = arr[c] * src.scales[j] + src.offsets[j]
        if not np.isfinite(v).all():
            i = int(np.flatnonzero(~np.isfinite(v))[0])
            raise ConversionError(
                f"{src.path}: point {first + i}: {'xyz'[j]} = {int(arr[c][i])} × "
                f"{src.scales[j]!r} + {src.offsets[j]!r} is {float(v[i])!r}, not a finite "
                f"coordinate; the header's scale or offset is damaged"
            )
        out.append(v)
    return out


def outside(src: "LasSource", xyz: list[np.ndarray]) -> int:
    """How many points of ``xyz`` lie outside the header bounds by more than a scale step."""
    mask = None
    for j, v in enumerate(xyz):
        step = abs(src.scales[j])
        m = (v < src.lo[j] - step) | (v > src.hi[j] + step)
        mask = m if mask is None else mask | m
    return int(np.count_nonzero(mask)) if mask is not None else 0


def _header_bounds_hold(src: "LasSource") -> bool:
    lo, hi = src.lo, src.hi
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return False
    if (lo == 0).all() and (hi == 0).all() and src.offsets.any():
        return False  # left at zero by the writer
    with contextlib.closing(read_points(src.path, SAMPLE_POINTS, SAMPLE_POINTS)) as sample:
        for p in sample:  # one chunk of at most SAMPLE_POINTS
            if outside(src, scaled(src, p, 0)):
                return False
    return True


def _bar(progress: bool | None, src: "LasSource", what: str):
    """A progress bar (stderr, as the conversion's own) over a pass that reads every point of
    ``src`` before the conversion writes anything."""
    from tqdm import tqdm

    return tqdm(total=src.num_points, unit="pt", unit_scale=True, file=sys.stderr,
                desc=f"{what} {src.path.name}", dynamic_ncols=True, leave=False,
                disable=None if progress is None else not progress)


def _measured_bounds(src: "LasSource", bar) -> tuple[np.ndarray, np.ndarray]:
    """Read every point's coordinates once: their bounds (a warning says so, with the count of
    points outside the header's bounds)."""
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    count = done = 0
    with bar:
        for p in read_points(src.path, common.chunk_rows(src.header.point_format.size),
                             src.num_points):
            xyz = scaled(src, p, done)
            done += len(p)
            bar.update(len(p))
            lo = np.minimum(lo, [v.min() for v in xyz])
            hi = np.maximum(hi, [v.max() for v in xyz])
            count += outside(src, xyz)
    src.outside_reported = True
    if not done:  # no points: nothing lies outside, and nothing to place the origin from
        return src.offsets.copy(), src.offsets.copy()
    log.warning("%s: %d of %d points lie outside the header's bounds %s..%s by more than a "
                "scale step; the dataset origin is placed from the points read (%s..%s)",
                src.path, count, done, src.lo.tolist(), src.hi.tolist(), lo.tolist(),
                hi.tolist())
    return lo, hi


def _f32_ulp(v: float) -> float:
    if not math.isfinite(v) or v >= float(np.finfo(np.float32).max):
        return math.inf
    return float(np.spacing(np.float32(v)))


def place(sources: Sequence["LasSource"], mode: str, progress: bool | None = None) -> np.ndarray:
    """Decide how ``sources`` store x, y, z under ``mode``: sets each one's ``origin`` and
    x/y/z dtype, and returns the dataset origin (zeros for absolute coordinates)."""
    if mode == "float64":
        _store(sources, np.dtype("<f8"), np.zeros(3))
        return np.zeros(3)
    if not any(f.name in ("x", "y", "z") for f in sources[0].schema):  # --fields without them
        _store(sources, np.dtype("<f4"), np.zeros(3))
        return np.zeros(3)
    bounds = [(s.lo, s.hi) if _header_bounds_hold(s) else
              _measured_bounds(s, _bar(progress, s, "bounds")) for s in sources]
    lo = np.min([b[0] for b in bounds], axis=0)
    hi = np.max([b[1] for b in bounds], axis=0)
    origin = np.zeros(3)
    if not all(_fits(s, b, origin) is None for s, b in zip(sources, bounds)):
        origin = np.round((lo / 2 + hi / 2) / ORIGIN_STEP) * ORIGIN_STEP + 0.0
    if mode == "auto":
        for s, b in zip(sources, bounds):
            why = _fits(s, b, origin)
            if why is not None:  # the bounds do not prove it: are the points held?
                why = _points_fit(s, origin, _bar(progress, s, "check"))
            if why is not None:
                log.warning("%s: %s; storing x, y, z as absolute float64 (--xyz float32 refuses "
                            "instead)", s.path, why)
                _store(sources, np.dtype("<f8"), np.zeros(3))
                return np.zeros(3)
    _store(sources, np.dtype("<f4"), origin)
    return origin


def _fits(src: "LasSource", bounds, origin: np.ndarray) -> str | None:
    """``None`` where float32 relative to ``origin`` holds ``src``'s bounds within half its
    scale's magnitude, else why not."""
    for j, c in enumerate("xyz"):
        d = max(abs(float(bounds[0][j]) - origin[j]), abs(float(bounds[1][j]) - origin[j]))
        half = abs(float(src.scales[j])) / 2
        if _f32_ulp(d) / 2 > half:
            return (f"{c} reaches {d:.6g} from the dataset origin {float(origin[j])!r}, where "
                    f"float32 cannot hold it within half the scale ({half:g})")
    return None


def _points_fit(src: "LasSource", origin: np.ndarray, bar) -> str | None:
    """``None`` where float32 relative to ``origin`` holds every point of ``src`` within half
    its scale's magnitude (data quantised more coarsely than its scale), else why not (the
    first point that it does not hold; reading stops there)."""
    done = 0
    with bar, contextlib.closing(read_points(src.path, common.chunk_rows(
            src.header.point_format.size), src.num_points)) as chunks:
        for p in chunks:
            for j, v in enumerate(scaled(src, p, done)):
                rel = (v - origin[j]).astype(np.float32).astype(np.float64)
                half = abs(float(src.scales[j])) / 2
                bad = np.flatnonzero(np.abs(rel + origin[j] - v) > half)
                if bad.size:
                    i = int(bad[0])
                    return (f"point {done + i}: {'xyz'[j]} = {float(v[i])!r} is "
                            f"{abs(float(v[i]) - origin[j]):.6g} from the dataset origin "
                            f"{float(origin[j])!r}, where float32 cannot hold it within half "
                            f"the scale ({half:g})")
            done += len(p)
            bar.update(len(p))
    return None


def _store(sources: Sequence["LasSource"], dtype: np.dtype, origin: np.ndarray) -> None:
    for s in sources:
        s.set_xyz(dtype, origin)
