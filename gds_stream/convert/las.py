"""LAS / LAZ input (LAS 1.0–1.4, point formats 0–10, COPC files too), read with laspy and its
lazrs backend, streamed a chunk of points at a time (LAZ decompressed on every core).

Every dimension becomes a field named as laspy names it, lowercased, with its stored type: bit
fields (return_number, classification of formats 0–5, …) become uint8, extra-bytes dimensions
keep their type, an array extra-bytes dimension becomes one field of that many components.

Coordinates: LAS stores X, Y, Z as int32 with a scale and an offset, often georeferenced (UTM
easting ~500,000 m, where float32 resolves only ~0.03 m). ``xyz="float32"`` stores x, y, z as
float32 relative to a dataset origin (the centre of all inputs' bounds, snapped to a multiple of
``ORIGIN_STEP``; zero where float32 resolves the absolute values well enough), and checks on every
point that ``origin + value`` reproduces the scaled coordinate within half the file's scale.
``xyz="float64"`` keeps absolute float64 coordinates.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConversionError, DatasetError
from ..format import FieldSpec, check_field_name, stored_dtype
from . import common
from .common import Source, file_size, select

log = logging.getLogger(__name__)

SIGNATURE = b"LASF"
#: A non-zero origin is a multiple of this (in the units of the file's CRS).
ORIGIN_STEP = 100.0
_COORDS = ("x", "y", "z")


def is_las(path: Path) -> bool:
    """Whether the file starts with the LAS signature ``LASF``."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == SIGNATURE
    except OSError:
        return False


def _laspy():
    try:
        import laspy
    except ImportError:  # pragma: no cover - laspy is a dependency
        raise ConversionError("LAS/LAZ input needs laspy and lazrs: pip install 'laspy[lazrs]'")
    return laspy


def _field_name(path: Path, name: str) -> str:
    """laspy's dimension name as a field name: lowercased, anything but letters, digits and
    '_' replaced by '_' (extra-bytes names may hold spaces)."""
    out = re.sub(r"[^a-z0-9_]", "_", name.lower())[:64]
    if out and out[0].isdigit():
        out = "_" + out[:63]
    check_field_name(out, f"{path}: dimension {name!r}")
    return out


def _crs(header) -> dict:
    """The CRS as recorded in the (E)VLRs: OGC WKT, or the GeoTIFF keys."""
    vlrs = list(header.vlrs) + list(header.evlrs or [])
    for v in vlrs:
        if type(v).__name__ == "WktCoordinateSystemVlr" and v.string:
            return {"crs_wkt": v.string}
    for v in vlrs:
        if type(v).__name__ == "GeoKeyDirectoryVlr":
            return {"crs_geokeys": [[k.id, k.tiff_tag_location, k.count, k.value_offset]
                                    for k in v.geo_keys]}
    return {}


class LasSource(Source):
    def __init__(self, path: Path, fields: Sequence[str] | None, xyz: str):
        laspy = _laspy()
        size = file_size(path)
        if not is_las(path):
            with open(path, "rb") as f:
                head = f.read(4)
            raise DatasetError(f"{path}: not a LAS/LAZ file: expected the signature 'LASF' at "
                               f"byte 0, found {head!r}")
        _check_header_counts(path, size)
        try:
            with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
                header = reader.header
        except Exception as exc:  # laspy and lazrs raise their own and plain errors alike
            raise DatasetError(f"{path}: not a readable LAS/LAZ file ({_why(exc)})") from None
        self.header = header
        self.compressed = header.are_points_compressed
        pf = header.point_format
        n = int(header.point_count)
        if self.compressed:
            _check_chunk_table(path, header.offset_to_point_data, size)
        else:
            need = header.offset_to_point_data + n * pf.size
            if size < need:
                raise DatasetError(
                    f"{path}: truncated: the header promises {n} points of {pf.size} bytes from "
                    f"byte {header.offset_to_point_data} ({need} bytes), but the file holds "
                    f"{size} bytes"
                )
        self.xyz_dtype = np.dtype("<f4" if xyz == "float32" else "<f8")
        available = [FieldSpec(c, self.xyz_dtype) for c in _COORDS]
        self.dims: list[tuple[str, str, str]] = []  # (field, laspy name, how: raw|bits|scaled)
        scaled: dict[str, dict] = {}
        seen = set(_COORDS)
        for d in pf.dimensions:
            if d.name in ("X", "Y", "Z"):
                continue
            name = _field_name(path, d.name)
            if name in seen:
                raise ConversionError(f"{path}: dimension {d.name!r} becomes field {name!r}, "
                                      f"which another dimension already has; rename it")
            seen.add(name)
            where = f"{path}: dimension {d.name!r}"
            base = d.dtype.base if d.dtype is not None and d.dtype.subdtype is not None \
                else d.dtype
            if d.dtype is None:
                spec, how = FieldSpec(name, np.dtype("u1")), "bits"
            elif getattr(d, "scales", None) is not None or getattr(d, "offsets", None) is not None:
                # an extra-bytes dimension with a scale/offset: its values are the scaled ones
                # (as laspy presents them); the stored type and the scale are recorded
                spec, how = FieldSpec(name, np.dtype("<f8"), d.num_elements), "scaled"
                scaled[name] = {"stored_dtype": np.dtype(base).str,
                                "scale": _floats(path, d.name, d.scales, 1.0),
                                "offset": _floats(path, d.name, d.offsets, 0.0)}
            else:
                spec, how = FieldSpec(name, stored_dtype(base, where), d.num_elements), "raw"
            available.append(spec)
            self.dims.append((name, d.name, how))
        schema = select(path, available, fields, "LAS dimension")
        self.scales = np.asarray(header.scales, dtype=np.float64)
        self.offsets = np.asarray(header.offsets, dtype=np.float64)
        if not (np.isfinite(self.scales).all() and (self.scales != 0).all()
                and np.isfinite(self.offsets).all()):
            raise DatasetError(f"{path}: the header's coordinate scale {self.scales.tolist()} "
                               f"or offset {self.offsets.tolist()} is not usable (scales must "
                               f"be finite and non-zero, offsets finite)")
        self.mins = np.asarray(header.mins, dtype=np.float64)
        self.maxs = np.asarray(header.maxs, dtype=np.float64)
        self.origin = np.zeros(3)
        copc = any(v.user_id == "copc" and v.record_id == 1 for v in header.vlrs)
        info = {"las_version": str(header.version), "point_format": pf.id,
                "compressed": bool(self.compressed), "copc": copc,
                "scale": self.scales.tolist(), "offset": self.offsets.tolist(), **_crs(header)}
        if scaled:
            info["scaled_extra_bytes"] = {k: v for k, v in scaled.items()
                                          if any(sp.name == k for sp in schema)}
        super().__init__(path, "las", schema, n, size, info)

    def check_compatible(self, other: Source) -> None:
        if not isinstance(other, LasSource):
            raise ConversionError(f"{self.path}: LAS/LAZ input cannot share a dataset with "
                                  f"{other.path} ({other.format} input)")
        mine = {k: v for k, v in self.info.items() if k.startswith("crs_")}
        theirs = {k: v for k, v in other.info.items() if k.startswith("crs_")}
        if mine != theirs:
            raise ConversionError(
                f"{self.path}: coordinate reference system differs from {other.path} "
                f"({_crs_text(mine)} vs {_crs_text(theirs)}); convert them separately or "
                f"reproject first"
            )

    def chunks(self):
        laspy = _laspy()
        names = {s.name for s in self.schema}
        want_xyz = [j for j, c in enumerate(_COORDS) if c in names]
        per = common.chunk_rows(self.header.point_format.size)
        done = 0
        try:
            with laspy.open(self.path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
                for points in reader.chunk_iterator(per):
                    k = len(points)
                    if k == 0:
                        break
                    cols = {}
                    for j in want_xyz:
                        cols[_COORDS[j]] = self._coord(points.array["XYZ"[j]], j, done)
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
        except (DatasetError, GeneratorExit):
            raise
        except Exception as exc:
            raise DatasetError(f"{self.path}: cannot read the points after the first {done} "
                               f"({_why(exc)}); the file is damaged or truncated") from exc
        if done != self.num_points:
            raise DatasetError(f"{self.path}: the header promises {self.num_points} points, "
                               f"but the file holds {done}")

    def _progress(self, done: int) -> int:
        """Input bytes that ``done`` points stand for (a LAZ file's are compressed)."""
        return self.nbytes * min(done, self.num_points) // max(1, self.num_points)

    def _coord(self, raw: np.ndarray, j: int, first: int) -> np.ndarray:
        scaled = raw * self.scales[j] + self.offsets[j]
        if self.xyz_dtype == np.float64:
            return scaled
        rel = (scaled - self.origin[j]).astype(np.float32)
        err = np.abs((rel.astype(np.float64) + self.origin[j]) - scaled)
        bad = np.flatnonzero(err > self.scales[j] / 2)
        if bad.size:
            i = int(bad[0])
            raise ConversionError(
                f"{self.path}: point {first + i}: {_COORDS[j]} = {float(scaled[i])!r} is "
                f"{abs(float(scaled[i]) - self.origin[j]):.6g} from the dataset origin "
                f"{float(self.origin[j])!r}, where float32 cannot hold it within half the scale "
                f"({self.scales[j] / 2:g}); pass --xyz float64 (xyz='float64')"
            )
        return rel


def _floats(path: Path, dim: str, values, default: float) -> list[float]:
    out = [default] if values is None else [float(v) for v in np.atleast_1d(values)]
    if not all(math.isfinite(v) for v in out):
        raise DatasetError(f"{path}: extra-bytes dimension {dim!r} has a non-finite scale or "
                           f"offset {out}")
    return out


#: Sizes of a VLR and an EVLR header (bytes).
_VLR_HEADER, _EVLR_HEADER = 54, 60


def _check_header_counts(path: Path, size: int) -> None:
    """Refuse header counts the file cannot hold before laspy reads them (a lying VLR count
    makes it build records past the end of the file without bound)."""
    with open(path, "rb") as f:
        head = f.read(375)
    if len(head) < 227:
        raise DatasetError(f"{path}: not a readable LAS/LAZ file (truncated: {len(head)} bytes, "
                           f"shorter than a LAS header)")
    minor = head[25]
    header_size, = struct.unpack_from("<H", head, 94)
    offset_to_points, n_vlrs = struct.unpack_from("<II", head, 96)
    if header_size < 227 or offset_to_points < header_size or offset_to_points > size:
        raise DatasetError(f"{path}: the header says the points start at byte "
                           f"{offset_to_points} after a {header_size}-byte header, in a file of "
                           f"{size} bytes")
    if n_vlrs * _VLR_HEADER > offset_to_points - header_size:
        raise DatasetError(f"{path}: the header counts {n_vlrs} VLRs, more than fit between "
                           f"its end (byte {header_size}) and the points (byte "
                           f"{offset_to_points})")
    if minor >= 4 and len(head) >= 247:
        first_evlr, n_evlrs = struct.unpack_from("<QI", head, 235)
        if n_evlrs and (first_evlr > size or n_evlrs * _EVLR_HEADER > size - first_evlr):
            raise DatasetError(f"{path}: the header counts {n_evlrs} extended VLRs from byte "
                               f"{first_evlr}, more than the {size}-byte file holds")


def _check_chunk_table(path: Path, start: int, size: int) -> None:
    """A LAZ file's first 8 bytes of point data give the offset of its chunk table (-1 when the
    writer could not seek back); it must lie inside the file."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(8)
    if len(raw) < 8:
        raise DatasetError(f"{path}: truncated: the file ends at byte {size}, before the point "
                           f"data the header places at byte {start}")
    (table,) = struct.unpack("<q", raw)
    if table != -1 and not start + 8 <= table <= size - 8:
        raise DatasetError(f"{path}: the LAZ chunk table offset {table} lies outside the "
                           f"compressed points (bytes {start + 8}..{size}); the file is "
                           f"truncated or damaged")


def choose_origin(sources: Sequence[LasSource]) -> np.ndarray:
    """Zero where float32 resolves every input's absolute bounds within half its scale, else
    the centre of all inputs' bounds snapped to a multiple of ``ORIGIN_STEP``.

    Header bounds are written by the producer and sometimes wrong (zeros, or min > max); a file
    whose bounds do not contain its own offsets' neighbourhood contributes its offsets instead —
    LAS writers put the offset near the data. Every point is still checked against the origin."""
    los, his = [], []
    for s in sources:
        lo, hi = s.mins, s.maxs
        plausible = (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo <= hi).all()
                     and not ((lo == 0).all() and (hi == 0).all() and s.offsets.any()))
        if not plausible:
            log.warning("%s: header bounds %s..%s are implausible; using the header offsets "
                        "%s to place the dataset origin", s.path, lo.tolist(), hi.tolist(),
                        s.offsets.tolist())
            lo = hi = s.offsets
        los.append(lo)
        his.append(hi)
    lo, hi = np.min(los, axis=0), np.max(his, axis=0)
    half = np.min([s.scales for s in sources], axis=0) / 2
    extent = np.maximum(np.abs(lo), np.abs(hi))
    if all(_f32_ulp(e) / 2 <= h for e, h in zip(extent, half)):
        return np.zeros(3)
    centre = (lo + hi) / 2
    return np.round(centre / ORIGIN_STEP) * ORIGIN_STEP + 0.0


def _f32_ulp(v: float) -> float:
    if not math.isfinite(v):
        return math.inf
    return float(np.spacing(np.float32(v)))


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _crs_text(crs: dict) -> str:
    if "crs_wkt" in crs:
        wkt = crs["crs_wkt"]
        return "WKT " + (wkt[:60] + "…" if len(wkt) > 60 else wkt)
    if "crs_geokeys" in crs:
        keys = {k[0]: k[3] for k in crs["crs_geokeys"]}
        code = keys.get(3072) or keys.get(2048)
        return f"GeoTIFF keys (EPSG {code})" if code else "GeoTIFF keys"
    return "no CRS"
