"""LAS / LAZ input (LAS 1.0–1.4, point formats 0–10, COPC files too), read with laspy and its
lazrs backend, streamed a chunk of points at a time (LAZ decompressed on every core).

Every dimension becomes a field with its stored type: bit fields (return_number, classification
of formats 0–5, …) become uint8, extra-bytes dimensions keep their type, an array extra-bytes
dimension becomes one field of that many components. Names: the standard dimensions keep
laspy's names; an extra-bytes name is lowercased and sanitised, and one that would collide with
another field or a batch key gets a suffix (``Intensity`` beside ``intensity`` ->
``intensity_2``; see :func:`gds_stream._schema.unique_field_names`). ``fields=`` selects by field
name or by laspy's own name.

How x, y, z are stored (``xyz=``): :mod:`.las_xyz`. What the header claims is checked against the
file before laspy or lazrs see it, and every call into them is guarded: :mod:`.las_guard`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .._schema import unique_field_names
from ..errors import ConversionError, DatasetError
from ..format import FieldSpec, stored_dtype
from . import common, las_crs, las_guard, las_xyz
from .common import Source, file_size, select

log = logging.getLogger(__name__)

SIGNATURE = b"LASF"
ORIGIN_STEP = las_xyz.ORIGIN_STEP
_COORDS = ("x", "y", "z")


def is_las(path: Path) -> bool:
    """Whether the file starts with the LAS signature ``LASF``."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == SIGNATURE
    except OSError:
        return False


def field_names(dims: Sequence[str], standard: Sequence[str]) -> dict[str, str]:
    """laspy dimension name -> field name for every dimension but X, Y, Z: ``standard`` ones
    keep laspy's name, extra-bytes ones get a collision-free sanitised name."""
    out = {d: d for d in standard if d not in ("X", "Y", "Z")}
    extra = [d for d in dims if d not in standard]
    taken = set(_COORDS) | set(out.values()) | {common.POINT_ID}
    out.update(zip(extra, unique_field_names(extra, taken)))
    return out


def _resolve(path: Path, fields: Sequence[str] | None, names: dict[str, str]):
    """``fields`` with laspy's own names (``"gps time"``, ``Intensity``) turned into field
    names; a field name wins where both match."""
    if fields is None:
        return None
    known = set(names.values()) | set(_COORDS)
    out = [f if f in known or f not in names else names[f] for f in fields]
    dup = sorted({f for f, k in zip(fields, out) if out.count(k) > 1})
    if dup:
        raise ConversionError(f"{path}: --fields names one dimension more than once "
                              f"({', '.join(map(repr, dup))})")
    return out


class LasSource(Source):
    def __init__(self, path: Path, fields: Sequence[str] | None, xyz: str):
        size = file_size(path)
        if not is_las(path):
            try:
                with open(path, "rb") as f:
                    head = f.read(4)
            except OSError as exc:
                raise DatasetError(f"{path}: cannot read the file "
                                   f"({exc.strerror or exc})") from exc
            raise DatasetError(f"{path}: not a LAS/LAZ file: expected the signature 'LASF' at "
                               f"byte 0, found {head!r}")
        layout = las_guard.check_layout(path, size)
        header = las_guard.read_header(path)
        self.header = header
        self.compressed = header.are_points_compressed
        pf = header.point_format
        n = int(header.point_count)
        if self.compressed:
            las_guard.check_chunk_table(path, layout, n, pf.size)
        else:
            las_guard.check_points_fit(path, layout, n, pf.size)
        self.scales = np.asarray(header.scales, dtype=np.float64)
        self.offsets = np.asarray(header.offsets, dtype=np.float64)
        if not (np.isfinite(self.scales).all() and (self.scales != 0).all()
                and np.isfinite(self.offsets).all()):
            raise DatasetError(f"{path}: the header's coordinate scale {self.scales.tolist()} "
                               f"or offset {self.offsets.tolist()} is not usable (scales must "
                               f"be finite and non-zero, offsets finite)")
        mins = np.asarray(header.mins, dtype=np.float64)
        maxs = np.asarray(header.maxs, dtype=np.float64)
        # a negative scale makes some writers swap min and max: the bounds are an interval
        self.lo, self.hi = np.fmin(mins, maxs), np.fmax(mins, maxs)
        self.origin = np.zeros(3)
        self.outside_reported = False
        self.xyz_dtype = np.dtype("<f8" if xyz == "float64" else "<f4")
        self.strict = xyz == "float32"
        names = field_names([d.name for d in pf.dimensions], list(pf.standard_dimension_names))
        available = [FieldSpec(c, self.xyz_dtype) for c in _COORDS]
        self.dims: list[tuple[str, str, str]] = []  # (field, laspy name, how: raw|bits|scaled)
        scaled: dict[str, dict] = {}
        # an extra-bytes description of a damaged type fails inside laspy on first use
        with las_guard.guard(path, "reading the point format's dimensions"):
            for d in pf.dimensions:
                if d.name in ("X", "Y", "Z"):
                    continue
                name = names[d.name]
                where = f"{path}: dimension {d.name!r}"
                base = d.dtype.base if d.dtype is not None and d.dtype.subdtype is not None \
                    else d.dtype
                if d.dtype is None:
                    spec, how = FieldSpec(name, np.dtype("u1")), "bits"
                elif (getattr(d, "scales", None) is not None
                      or getattr(d, "offsets", None) is not None):
                    # an extra-bytes dimension with a scale/offset: its values are the scaled
                    # ones (as laspy presents them); the stored type and the scale are recorded
                    spec, how = FieldSpec(name, np.dtype("<f8"), d.num_elements), "scaled"
                    scaled[name] = {"stored_dtype": np.dtype(base).str,
                                    "scale": _floats(path, d.name, d.scales, 1.0),
                                    "offset": _floats(path, d.name, d.offsets, 0.0)}
                else:
                    spec, how = FieldSpec(name, stored_dtype(base, where), d.num_elements), "raw"
                available.append(spec)
                self.dims.append((name, d.name, how))
        schema = select(path, available, _resolve(path, fields, names), "LAS dimension")
        copc = any(v.user_id == "copc" and v.record_id == 1 for v in header.vlrs)
        info = {"las_version": str(header.version), "point_format": pf.id,
                "compressed": bool(self.compressed), "copc": copc,
                "scale": self.scales.tolist(), "offset": self.offsets.tolist(),
                **las_crs.crs_of(header)}
        renamed = {d: k for d, k in names.items() if k != d}
        if renamed:
            info["field_names"] = renamed  # laspy name -> field name, where they differ
        if scaled:
            info["scaled_extra_bytes"] = {k: v for k, v in scaled.items()
                                          if any(sp.name == k for sp in schema)}
        super().__init__(path, "las", schema, n, size, info)

    def set_xyz(self, dtype: np.dtype, origin: np.ndarray) -> None:
        """Store x, y, z as ``dtype`` relative to ``origin`` (decided for all inputs)."""
        self.xyz_dtype, self.origin = np.dtype(dtype), np.asarray(origin, dtype=np.float64)
        self.schema = [FieldSpec(s.name, self.xyz_dtype) if s.name in _COORDS else s
                       for s in self.schema]

    def check_compatible(self, other: Source) -> None:
        if not isinstance(other, LasSource):
            raise ConversionError(f"{self.path}: LAS/LAZ input cannot share a dataset with "
                                  f"{other.path} ({other.format} input)")
        mine = {k: v for k, v in self.info.items() if k.startswith("crs_")}
        theirs = {k: v for k, v in other.info.items() if k.startswith("crs_")}
        if mine != theirs:
            raise ConversionError(
                f"{self.path}: coordinate reference system differs from {other.path} "
                f"({las_crs.text(mine)} vs {las_crs.text(theirs)}); convert them separately or "
                f"reproject first"
            )

    def chunks(self):
        names = {s.name for s in self.schema}
        per = common.chunk_rows(self.header.point_format.size)
        done = outside = 0
        for points in las_guard.read_points(self.path, per):
            k = len(points)
            xyz = las_xyz.scaled(self, points, done)
            outside += las_xyz.outside(self, xyz)
            cols = {}
            for j, c in enumerate(_COORDS):
                if c in names:
                    cols[c] = self._coord(xyz[j], j, done)
            with las_guard.guard(self.path, "reading the points", [done]):
                for name, dim, how in self.dims:
                    if name in names:
                        cols[name] = (np.asarray(points[dim], dtype=np.uint8)
                                      if how == "bits" else
                                      np.asarray(points[dim], dtype=np.float64)
                                      if how == "scaled" else points.array[dim])
            before = self._progress(done)
            done += k
            yield ({s.name: cols[s.name] for s in self.schema},
                   self._progress(done) - before)
        if done != self.num_points:
            raise DatasetError(f"{self.path}: the header promises {self.num_points} points, "
                               f"but the file holds {done}")
        if outside and not self.outside_reported:
            log.warning("%s: %d of %d points lie outside the header's bounds %s..%s by more "
                        "than a scale step (a wrong header, or damaged data)", self.path,
                        outside, done, self.lo.tolist(), self.hi.tolist())

    def _progress(self, done: int) -> int:
        """Input bytes that ``done`` points stand for (a LAZ file's are compressed)."""
        return self.nbytes * min(done, self.num_points) // max(1, self.num_points)

    def _coord(self, scaled: np.ndarray, j: int, first: int) -> np.ndarray:
        if self.xyz_dtype == np.float64:
            return scaled
        rel = (scaled - self.origin[j]).astype(np.float32)
        err = np.abs((rel.astype(np.float64) + self.origin[j]) - scaled)
        half = abs(self.scales[j]) / 2
        bad = np.flatnonzero(err > half)
        if bad.size:
            i = int(bad[0])
            v = float(scaled[i])
            where = ("" if self.lo[j] - 2 * half <= v <= self.hi[j] + 2 * half else
                     f", outside the header's bounds {float(self.lo[j])!r}..{float(self.hi[j])!r}")
            raise Float32Overflow(
                f"{self.path}: point {first + i}: {_COORDS[j]} = {v!r}{where} is "
                f"{abs(v - self.origin[j]):.6g} from the dataset origin "
                f"{float(self.origin[j])!r}, where float32 cannot hold it within half the scale "
                f"({half:g}); pass --xyz float64 (xyz='float64')"
            )
        return rel


class Float32Overflow(ConversionError):
    """A point float32 cannot hold relative to the dataset origin (``--xyz float32``, or
    ``auto`` misled by header bounds the points leave: ``auto`` then converts again as
    float64)."""


def _floats(path: Path, dim: str, values, default: float) -> list[float]:
    """An extra-bytes dimension's scale (``default`` 1.0: finite, non-zero) or offset
    (``default`` 0.0: finite); a scale of 0 would store every value as the offset."""
    out = [default] if values is None else [float(v) for v in np.atleast_1d(values)]
    what = "scale" if default == 1.0 else "offset"
    if not all(math.isfinite(v) and (v != 0 or what == "offset") for v in out):
        raise DatasetError(f"{path}: extra-bytes dimension {dim!r} has the {what} {out}; a "
                           f"{what} must be finite{' and non-zero' if what == 'scale' else ''}")
    return out


def choose_origin(sources: Sequence[LasSource], xyz: str = "float32",
                  progress: bool | None = None) -> np.ndarray:
    """Decide how ``sources`` store x, y, z (see :func:`.las_xyz.place`); the dataset origin.
    ``progress``: bars over the passes that read every point first (bounds the header does not
    give, points float32 may not hold), as the conversion's own."""
    return las_xyz.place(sources, xyz, progress)
