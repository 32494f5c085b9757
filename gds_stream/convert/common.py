"""What every input format shares: the validated-source contract, field selection, schema
comparison, input expansion, and the streaming driver that writes sources into a dataset.

The chunk sizes here are read at call time, so tests (and callers with unusual memory limits) can
change them on this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .._manifest import file_kind, os_reason
from ..errors import ConversionError, DatasetError
from ..format import MANIFEST, DatasetWriter, FieldSpec

log = logging.getLogger(__name__)

#: Rows read per chunk (fewer when rows are wide: a chunk stays within ``CHUNK_BYTES``).
CHUNK_ROWS = 1 << 20
CHUNK_BYTES = 32 << 20
#: The field ``--point-ids`` adds.
POINT_ID = "point_id"


@dataclass
class Source:
    """One validated input file: what it will add (schema, points) and how to read it."""

    path: Path
    format: str
    schema: list[FieldSpec]
    num_points: int
    nbytes: int
    info: dict = field(default_factory=dict)
    #: Said after a schema mismatch, e.g. where labels were looked for.
    note: str = ""

    def chunks(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Yield ``(columns, input bytes consumed)``. Arrays may view a reused buffer: the
        consumer must copy or write them before asking for the next chunk."""
        raise NotImplementedError

    def check_compatible(self, other: "Source") -> None:
        """Raise a :class:`ConversionError` naming both files where this source and ``other``
        cannot share a dataset (beyond the schema, which the driver compares). Called both ways."""


def chunk_rows(row_bytes: int) -> int:
    """Rows per chunk for rows of ``row_bytes``: at most ``CHUNK_ROWS`` and ``CHUNK_BYTES``."""
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, row_bytes)))


def readinto_exact(f, view: memoryview, path: Path) -> None:
    """Fill ``view`` from the file object ``f``; a short file is a :class:`DatasetError`."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise DatasetError(
                f"{path}: file ended {len(view) - done} bytes early (did it change during "
                f"the conversion?)"
            )
        done += n


def select(path: Path, available: list[FieldSpec], fields: Sequence[str] | None,
           what: str) -> list[FieldSpec]:
    """The requested subset of ``available`` in the requested order (all when ``fields`` is
    None); a name that is not there is an error listing what is."""
    if fields is None:
        return list(available)
    by_name = {s.name: s for s in available}
    out = []
    for name in fields:
        if name not in by_name:
            raise ConversionError(
                f"{path}: no {what} {name!r} to select; available: "
                f"{', '.join(by_name) or '(none)'}"
            )
        out.append(by_name[name])
    return out


def file_size(path: Path) -> int:
    """Size of a regular, non-empty input file, or a :class:`DatasetError` saying why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot stat the input ({os_reason(exc)})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{path}: not a regular file ({file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise DatasetError(f"{path}: empty file (0 bytes)")
    return st.st_size


def expand(inputs: Iterable[str | os.PathLike], exts: tuple[str, ...]) -> list[Path]:
    """Files as given; a directory becomes its files ending in one of ``exts``, sorted,
    recursive, skipping hidden entries and gds-stream dataset directories."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                if MANIFEST in files and root != str(p):
                    log.info("%s: skipping a gds-stream dataset directory", root)
                    dirs[:] = []
                    continue
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root) / name for name in files
                          if not name.startswith(".") and name.lower().endswith(exts)]
            if not found:
                listed = ", ".join(exts[:-1]) + " or " + exts[-1] if len(exts) > 1 else exts[0]
                raise DatasetError(f"{p}: no {listed} files in this directory")
            out += sorted(found, key=lambda q: q.relative_to(p).parts)
        elif not p.exists():
            raise DatasetError(f"{p}: no such file or directory")
        else:
            out.append(p)
    for p in out:  # before anything opens them: opening a FIFO blocks until a writer comes
        file_size(p)
    if not out:
        raise ConversionError("no input files given")
    return out


def schema_mismatch(a: Source, b: Source) -> ConversionError:
    """The error for ``b`` whose schema differs from ``a``'s, saying exactly how."""
    sa = {s.name: s for s in a.schema}
    sb = {s.name: s for s in b.schema}
    parts = []
    lacks = [sa[k].describe() for k in sa if k not in sb]
    extra = [sb[k].describe() for k in sb if k not in sa]
    if lacks:
        parts.append(f"{b.path} lacks {', '.join(lacks)}")
    if extra:
        parts.append(f"{b.path} has {', '.join(extra)}, which {a.path} lacks")
    for k in sa:
        if k in sb and sa[k] != sb[k]:
            parts.append(f"field {k!r} is {sa[k].describe()} in {a.path} but "
                         f"{sb[k].describe()} in {b.path}")
    if not parts:
        parts.append(f"fields in another order: {', '.join(sa)} in {a.path}, "
                     f"{', '.join(sb)} in {b.path}")
    notes = [n for n in (a.note, b.note) if n]
    return ConversionError(
        f"{b.path}: schema differs from {a.path} (all inputs of one dataset must share one "
        f"schema): {'; '.join(parts)}" + (f" [{'; '.join(notes)}]" if notes else "")
    )


def check_sources(sources: Sequence[Source]) -> None:
    """Every source shares the first one's schema and passes its format's own checks."""
    for src in sources[1:]:
        if src.schema != sources[0].schema:
            raise schema_mismatch(sources[0], src)
        src.check_compatible(sources[0])
        sources[0].check_compatible(src)


def write_sources(sources: Sequence[Source], out: Path, *, overwrite: bool,
                  progress: bool | None, writer_options: dict | None = None,
                  chunk_size: float | None = None, chunk_dims: int = 2,
                  point_ids: bool = False) -> None:
    """Stream every source, one scan each, into a new dataset at ``out``, with progress bars on
    stderr: one over input bytes (binary units); with ``chunk_size`` one per phase — ``read``
    (input bytes), ``sort`` (points split into sort buckets) and ``write`` (points sorted and
    written). Any error aborts the writer: nothing is left behind.

    ``chunk_size``: group each scan's points into spatial chunks (see :mod:`.chunks`).
    ``point_ids``: add a ``point_id`` field (uint64, the point's index in its input file)."""
    from tqdm import tqdm

    from .chunks import ScanChunker, chunk_limit

    schema = list(sources[0].schema)
    if point_ids:
        if any(s.name == POINT_ID for s in schema):
            raise ConversionError(f"{sources[0].path}: already has a field {POINT_ID!r}; "
                                  f"--point-ids would add a second one")
        schema.append(FieldSpec(POINT_ID, np.dtype("<u8")))
    options = dict(writer_options or {})
    chunked = chunk_size is not None
    if chunked:
        options.update(chunk_size=chunk_size, chunk_dims=chunk_dims)
    total = sum(s.nbytes for s in sources)
    points = sum(s.num_points for s in sources)
    log.info("converting %d file(s), %d points, %d bytes into %s", len(sources), points, total,
             out)
    bar_options = dict(disable=None if progress is None else not progress, file=sys.stderr,
                       dynamic_ncols=True)
    limit = chunk_limit(schema, points) if chunked else None
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc="read" if chunked else "convert", **bar_options))
        phases = [stack.enter_context(tqdm(total=points, unit="pt", unit_scale=True, desc=name,
                                           position=i + 1, **bar_options))
                  for i, name in enumerate(("sort", "write"))] if chunked else []
        writer = stack.enter_context(DatasetWriter(out, schema, overwrite=overwrite, **options))
        for src in sources:
            consumed, row = 0, 0
            # inside the writer's temporary directory: removed with it on any failure, and by
            # the next convert when this one is killed
            chunker = (ScanChunker(schema, chunk_size, chunk_dims, writer.tmp, str(src.path),
                                   limit) if chunked else None)
            try:
                sink = chunker.append if chunker is not None else writer.append
                for columns, nbytes in src.chunks():
                    if point_ids:
                        n = len(next(iter(columns.values())))
                        columns = {**columns,
                                   POINT_ID: np.arange(row, row + n, dtype=np.uint64)}
                        row += n
                    sink(columns)
                    consumed += nbytes
                    bar.update(nbytes)
                bar.update(src.nbytes - consumed)
                if chunker is not None:
                    assert limit is not None
                    limit.declared += chunker.write_to(writer, phases[0].update,
                                                       phases[1].update)
                    for phase in phases:  # a source that held fewer points than it promised
                        phase.update(max(0, src.num_points - chunker.num_points))
            finally:
                if chunker is not None:
                    chunker.close()
            writer.end_scan(str(src.path), format=src.format, **src.info)
