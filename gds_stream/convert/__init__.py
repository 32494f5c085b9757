"""Convert point-cloud files into a gds-stream dataset, streaming.

Every input file (a KITTI frame is one ``.bin`` file) becomes one scan. All inputs are opened and
validated first — headers parsed, sizes checked against what the headers promise, schemas
compared — so a bad input fails in seconds, before any data is written. Then each file is read
in chunks of rows and appended to a :class:`~gds_stream.format.DatasetWriter`, so memory stays
bounded whatever the file size (a 2 GB PLY converts in well under 500 MB of RSS).

One module per input format (:mod:`.ply`, :mod:`.las`, :mod:`.kitti`, :mod:`.raw`); what they
share — the source contract, field selection, schema checks and the streaming driver — is in
:mod:`.common`. Inputs given as object-store URLs are streamed into local temporary files one
at a time by :mod:`.remote_inputs`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from ..errors import ConversionError
from ..format import Dataset, check_field_name, check_output_dir, open_dataset
from ..storage import is_url
from . import chunks
from .common import Source, check_sources, write_sources
from .kitti import KittiSource
from .las import Float32Overflow, LasSource, choose_origin, is_las
from .ply import PlySource
from .raw import RawSource, raw_dtype as parse_raw_dtype
from .remote_inputs import RemoteInputs

log = logging.getLogger(__name__)

__all__ = ["convert", "FORMATS", "XYZ_TYPES"]

#: Values of ``format=`` (``--format``).
FORMATS = ("auto", "ply", "las", "kitti", "raw")
#: Values of ``xyz=`` (``--xyz``): how LAS/LAZ coordinates are stored (see :mod:`.las_xyz`).
XYZ_TYPES = ("auto", "float32", "float64")
#: Input extensions a directory expands to, per format.
_EXTENSIONS = {"auto": (".ply", ".las", ".laz", ".bin"), "ply": (".ply",),
               "las": (".las", ".laz"), "kitti": (".bin",), "raw": (".bin",)}


def _format_of(path: Path, fmt: str, raw_fields) -> str:
    if fmt != "auto":
        return fmt
    ext = path.suffix.lower()
    if is_las(path) or ext in (".las", ".laz"):
        return "las"
    if ext == ".ply":
        return "ply"
    if ext == ".bin":
        return "raw" if raw_fields else "kitti"
    raise ConversionError(
        f"{path}: cannot tell the format from the extension {ext or '(none)'!r} (and the file "
        f"does not start with the LAS signature); expected .ply, .las, .laz or .bin, or pass "
        f"--format ply|las|kitti|raw"
    )


def convert(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            *, format: str = "auto", element: str | None = None,
            fields: Sequence[str] | None = None, raw_fields: Sequence[str] | None = None,
            raw_dtype: str = "float32", xyz: str = "auto", overwrite: bool = False,
            progress: bool | None = None, chunk_size: float | None = None,
            chunk_dims: int = 2, point_ids: bool = False,
            storage_options: dict | None = None) -> Dataset:
    """Convert ``inputs`` (files or directories) into the dataset directory ``out_dir``.

    Inputs and ``out_dir`` may also be object-store URLs (``s3://bucket/prefix``): an input URL
    names one object, or a prefix (every object under it with a supported extension); each is
    streamed into a local temporary file one at a time (:mod:`.remote_inputs`). An output URL is
    written locally, then uploaded, the manifest last (:mod:`gds_stream.storage.upload`).
    ``storage_options``: credentials, endpoint and retry budget for those URLs (see
    :mod:`gds_stream.storage.s3`; the standard AWS environment supplies what it does not set).

    ``format``: ``auto`` (a file starting with ``LASF``, ``.las`` or ``.laz`` → las; ``.ply`` →
    ply; ``.bin`` → raw when ``raw_fields`` is given, else SemanticKITTI), ``ply``, ``las``
    (LAS/LAZ/COPC), ``kitti`` or ``raw``. ``element``: the PLY element to convert
    (default: the one with x, y and z). ``fields``: the fields to keep, in this order (default:
    all). ``raw_fields`` / ``raw_dtype``: column names and dtype of raw N×F records.
    ``xyz``: ``float32`` stores LAS/LAZ coordinates relative to the dataset origin (checked to
    reproduce every scaled coordinate within half the file's scale), ``float64`` absolute,
    ``auto`` (default) float32 where every input holds so, else float64 with a warning; other
    formats keep their stored types.
    ``progress``: tqdm bars on stderr (over input bytes; with ``chunk_size`` one per phase:
    read, sort, write); ``None`` shows them when stderr is a TTY.
    ``chunk_size`` (``--chunk-size``): group the points of each scan into spatial chunks, the
    grid cells of this edge (in the coordinates' unit: tens of metres for LiDAR) on x, y
    (``chunk_dims=2``) or x, y, z (``chunk_dims=3``), ordered along a Morton curve, each chunk a
    contiguous range (out-of-core on all cores: bounded memory; temporary disk beside
    ``out_dir``: the scan's rows twice). ``point_ids`` (``--point-ids``): add a
    ``point_id`` field (uint64, each point's index in its input file), so the original order
    stays recoverable.

    Each input file becomes one scan. Every input is validated before anything is written; a
    failure leaves no output directory behind. Returns the opened dataset.
    """
    if is_url(out_dir):  # object storage: convert to a local temporary directory, upload
        from ..storage.upload import convert_to_url

        return convert_to_url(lambda tmp: convert(
            inputs, tmp, format=format, element=element, fields=fields, raw_fields=raw_fields,
            raw_dtype=raw_dtype, xyz=xyz, progress=progress, chunk_size=chunk_size,
            chunk_dims=chunk_dims, point_ids=point_ids, storage_options=storage_options),
            str(out_dir), overwrite, storage_options)
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if xyz not in XYZ_TYPES:
        raise ConversionError(f"--xyz {xyz!r}: expected one of {', '.join(XYZ_TYPES)}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for name, names in (("fields", fields), ("raw_fields", raw_fields)):
        if isinstance(names, (str, bytes)):  # "x,y,z" would be read one character at a time
            raise ConversionError(f"{name}= takes a list of field names, not the string "
                                  f"{names[:60]!r}; e.g. {name}=['x', 'y', 'z']")
    if raw_dtype is None:  # None: the default, as for every option
        raw_dtype = "float32"
    if fields is not None:
        fields = list(fields)
        if not fields:
            raise ConversionError("--fields selects no field")
        dup = sorted({k for k in fields if fields.count(k) > 1})
        if dup:
            raise ConversionError(f"--fields names {', '.join(map(repr, dup))} more than once")
    dtype = None
    if raw_fields is not None:
        raw_fields = list(raw_fields)
        if format in ("ply", "las", "kitti"):
            raise ConversionError(f"--raw-fields applies to raw .bin input, not --format {format}")
        if not raw_fields:
            raise ConversionError("--raw-fields names no field")
        for k in raw_fields:
            check_field_name(k, "--raw-fields")
        dup = sorted({k for k in raw_fields if raw_fields.count(k) > 1})
        if dup:
            raise ConversionError(f"--raw-fields names {', '.join(map(repr, dup))} more than once")
        dtype = parse_raw_dtype(raw_dtype)
    elif format == "raw":
        raise ConversionError(
            "--format raw needs --raw-fields: the names of the columns of the N×F records, "
            "e.g. --raw-fields x,y,z,intensity (and --raw-dtype, default float32)"
        )
    if chunk_size is not None:
        chunk_size, chunk_dims = chunks.check_options(chunk_size, chunk_dims)
    if not isinstance(point_ids, bool):
        raise ConversionError(f"point_ids must be True or False, found {point_ids!r}")
    out = Path(out_dir)
    check_output_dir(out, overwrite)

    with RemoteInputs(storage_options) as remote:  # URLs: one temporary file at a time
        sources: list[Source] = []
        warned: set = set()
        voxels = []
        for path in remote.expand(inputs, _EXTENSIONS[format]):
            kind = _format_of(path, format, raw_fields)
            if kind == "kitti" and path.parent.name == "voxels":
                voxels.append(path)  # SemanticKITTI's occupancy grids, not point scans
                continue
            if kind == "ply":
                src: Source = PlySource(path, element, fields, warned)
            elif kind == "las":
                src = LasSource(path, fields, xyz)
            elif kind == "kitti":
                src = KittiSource(path, fields)
            else:
                assert raw_fields is not None and dtype is not None
                src = RawSource(path, raw_fields, dtype, fields)
            sources.append(src)
            check_sources(sources)

        if voxels:
            log.warning("skipping %d SemanticKITTI voxel grid(s) under voxels/ (%s%s): they are "
                        "occupancy grids, not point scans", len(voxels), voxels[0],
                        ", ..." if len(voxels) > 1 else "")
            if not sources:
                raise ConversionError(f"{voxels[0]}: a SemanticKITTI voxel grid (voxels/), not a "
                                      f"point scan; convert the velodyne/ scans")
        las = [s for s in sources if isinstance(s, LasSource)]
        if xyz != "auto" and len(las) != len(sources):
            raise ConversionError(f"--xyz {xyz} applies to LAS/LAZ input; {sources[0].path} keeps "
                                  f"its own stored types")
        options = {}
        if las:
            origin = choose_origin(las, xyz, progress)
            if origin.any():
                log.info("dataset origin %s (x, y, z are stored relative to it)", origin.tolist())
                options["origin"] = origin
        if chunk_size is not None:  # before anything is written
            chunks.check_schema(sources[0].schema, sources[0].path)
        def write() -> None:
            write_sources(sources, out, overwrite=overwrite, progress=progress,
                          writer_options=options, chunk_size=chunk_size, chunk_dims=chunk_dims,
                          point_ids=point_ids)
        try:
            write()
        except Float32Overflow as exc:
            if xyz != "auto":
                raise
            # header bounds that held a sample of the points, left by later ones: auto's
            # float32 was decided on them; nothing was published, so convert again as float64
            log.warning("%s; converting again with x, y, z as absolute float64",
                        str(exc).split("; pass --xyz")[0])
            options.pop("origin", None)
            choose_origin(las, "float64")
            write()
    return open_dataset(out)
