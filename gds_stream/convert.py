"""Convert PLY, SemanticKITTI and raw N×F ``.bin`` files into a gds-stream dataset, streaming.

Every input file (a KITTI frame is one ``.bin`` file) becomes one scan. All inputs are opened and
validated first — headers parsed, sizes checked against what the headers promise, schemas
compared — so a bad input fails in seconds, before any data is written. Then each file is read
in chunks of rows and appended to a :class:`~gds_stream.format.DatasetWriter`, so memory stays
bounded whatever the file size (a 2 GB PLY converts in well under 500 MB of RSS).

PLY: plyfile parses the header only; rows are read here, binary ones with ``readinto`` into a
reused buffer viewed with the element's structured dtype, ASCII ones a chunk of lines at a time
with :func:`numpy.loadtxt` (and a line-by-line diagnosis when a chunk does not parse, so the
error names the line and the problem).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import ConversionError, DatasetError
from .format import (
    MANIFEST,
    Dataset,
    DatasetWriter,
    FieldSpec,
    check_field_name,
    check_output_dir,
    open_dataset,
    stored_dtype,
)

log = logging.getLogger(__name__)

__all__ = ["convert", "FORMATS"]

#: Values of ``format=`` (``--format``).
FORMATS = ("auto", "ply", "kitti", "raw")
#: Input extensions a directory expands to, per format.
_EXTENSIONS = {"auto": (".ply", ".bin"), "ply": (".ply",), "kitti": (".bin",), "raw": (".bin",)}
#: Rows read per chunk (fewer when rows are wide: a chunk stays within ``CHUNK_BYTES``).
CHUNK_ROWS = 1 << 20
CHUNK_BYTES = 32 << 20
#: ASCII rows per chunk: a list of line objects costs far more than the binary rows.
ASCII_CHUNK_ROWS = 1 << 18
#: Longest ASCII row accepted (a row of scalars is far shorter).
MAX_LINE = 1 << 16
#: A PLY header must end within this many bytes.
HEADER_LIMIT = 1 << 20

KITTI_FIELDS = ("x", "y", "z", "remission")
KITTI_LABEL_FIELDS = ("sem_class", "ins_class")


# -- sources -------------------------------------------------------------------------------------
@dataclass
class _Source:
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


def _chunk_rows(row_bytes: int) -> int:
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, row_bytes)))


def _readinto_exact(f, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise DatasetError(
                f"{path}: file ended {len(view) - done} bytes early (did it change during "
                f"the conversion?)"
            )
        done += n


def _select(path: Path, available: list[FieldSpec], fields: Sequence[str] | None,
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


def _file_size(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file or directory") from None
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise DatasetError(f"{path}: empty file (0 bytes)")
    return st.st_size


# -- PLY -----------------------------------------------------------------------------------------
class _PlySource(_Source):
    def __init__(self, path: Path, element: str | None, fields: Sequence[str] | None,
                 warned: set | None = None):
        """``warned``: keys of skipped-element sets already warned about in this conversion,
        so a directory of like files gives one warning, not one per file."""
        import plyfile

        size = _file_size(path)
        with open(path, "rb") as f:
            head = f.read(min(size, HEADER_LIMIT))
        stream = io.BytesIO(head)
        try:
            ply = plyfile.PlyData._parse_header(stream)
        except plyfile.PlyHeaderParseError as exc:
            if "early end-of-file" in str(exc) and size > HEADER_LIMIT:
                raise DatasetError(f"{path}: no 'end_header' within the first {HEADER_LIMIT} "
                                   f"bytes; not a PLY file, or a header too large") from None
            raise DatasetError(f"{path}: not a valid PLY header ({exc})") from None
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise DatasetError(f"{path}: not a valid PLY header ({exc})") from None
        data_start = stream.tell()
        elements = list(ply.elements)
        for e in elements:
            if e.count < 0:
                raise DatasetError(f"{path}: element {e.name!r} has a negative count {e.count}")

        target = self._pick_element(path, elements, element)
        t_index = next(i for i, e in enumerate(elements) if e is target)
        scalar = [p for p in target.properties if not isinstance(p, plyfile.PlyListProperty)]
        lists = [p.name for p in target.properties if isinstance(p, plyfile.PlyListProperty)]
        if lists:
            raise ConversionError(
                f"{path}: element {target.name!r} has list propert"
                f"{'ies' if len(lists) > 1 else 'y'} {', '.join(map(repr, lists))}; only "
                f"elements of scalar properties can be converted"
            )
        available = []
        for p in scalar:
            where = f"{path}: element {target.name!r} property {p.name!r}"
            check_field_name(p.name, where)
            available.append(FieldSpec(p.name, stored_dtype(p.val_dtype, where)))
        schema = _select(path, available, fields, f"property of element {target.name!r}")

        skipped = [e for e in elements if e is not target]
        if skipped:
            desc = ", ".join(
                f"{e.name!r} ({e.count} rows"
                + "".join(f"; list property {p.name!r}" for p in e.properties
                          if isinstance(p, plyfile.PlyListProperty))
                + ")" for e in skipped)
            key = (target.name, tuple((e.name, tuple(p.name for p in e.properties))
                                      for e in skipped))
            warned = set() if warned is None else warned
            level = logging.DEBUG if key in warned else logging.WARNING
            warned.add(key)
            log.log(level, "%s: converting element %r, skipping element(s) %s", path,
                    target.name, desc)

        self.text = ply.text
        self.byte_order = ply.byte_order
        self.element = target.name
        self.data_start = data_start
        self.header_lines = head[:data_start].count(b"\n")
        self.row_dtype = target.dtype("=" if ply.text else ply.byte_order)
        if self.text:
            self.skip_rows = sum(e.count for e in elements[:t_index])
        else:
            for e in elements[:t_index]:
                lp = [p.name for p in e.properties if isinstance(p, plyfile.PlyListProperty)]
                if lp:
                    raise ConversionError(
                        f"{path}: element {e.name!r} comes before {target.name!r} and has list "
                        f"property {lp[0]!r}, so where {target.name!r} starts in this binary "
                        f"file is unknown without parsing every row of {e.name!r}; streaming "
                        f"conversion does not do that (write {target.name!r} first)"
                    )
            self.skip_bytes = sum(e.count * e.dtype(ply.byte_order).itemsize
                                  for e in elements[:t_index])
            need = self.skip_bytes + target.count * self.row_dtype.itemsize
            have = size - data_start
            if have < need:
                raise DatasetError(
                    f"{path}: truncated: the header promises {need} bytes of data "
                    f"({target.count} rows of element {target.name!r}"
                    f"{' after the elements before it' if self.skip_bytes else ''}), "
                    f"but only {have} bytes follow the header"
                )
        fmt = "ascii" if ply.text else \
            {"<": "binary_little_endian", ">": "binary_big_endian"}[ply.byte_order]
        super().__init__(path, "ply", schema, target.count, size,
                         {"element": target.name, "ply_format": fmt})

    @staticmethod
    def _pick_element(path: Path, elements: list, element: str | None):
        names = [e.name for e in elements]
        if element is not None:
            for e in elements:
                if e.name == element:
                    chosen = e
                    break
            else:
                raise DatasetError(f"{path}: no element {element!r}; elements are "
                                   f"{', '.join(map(repr, names)) or '(none)'}")
        else:
            def has_xyz(e):
                have = {p.name for p in e.properties}
                return all(c in have for c in "xyz")

            found = [e for e in elements if has_xyz(e)]
            if found:
                return found[0]
            if not elements:
                raise DatasetError(f"{path}: the PLY header declares no element")
            by_name = {e.name: e for e in elements}
            chosen = by_name.get("vertex", elements[0])
        have = {p.name for p in chosen.properties}
        for c in "xyz":
            if c not in have:
                others = "" if element is not None or len(elements) == 1 else (
                    f" (and no element has x, y and z; elements are "
                    f"{', '.join(map(repr, names))})")
                raise DatasetError(
                    f"{path}: element {chosen.name!r} has no property {c!r}{others}"
                )
        return chosen

    def chunks(self):
        return self._ascii_chunks() if self.text else self._binary_chunks()

    def _binary_chunks(self):
        row = self.row_dtype.itemsize
        per = _chunk_rows(row)
        names = [s.name for s in self.schema]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + self.skip_bytes)
            buf = bytearray(min(per, max(self.num_points, 1)) * row)
            done = 0
            while done < self.num_points:
                n = min(per, self.num_points - done)
                view = memoryview(buf)[:n * row]
                _readinto_exact(f, view, self.path)
                rows = np.frombuffer(view, dtype=self.row_dtype)
                yield {k: rows[k] for k in names}, n * row
                done += n

    def _ascii_chunks(self):
        per = max(1, min(CHUNK_ROWS, ASCII_CHUNK_ROWS))
        names = [s.name for s in self.schema]
        line_no = self.header_lines + 1  # of the next line to read
        with open(self.path, "rb") as f:
            f.seek(self.data_start)
            left = self.skip_rows
            while left:
                k = len(self._read_lines(f, min(left, per), line_no))
                if k == 0:
                    raise DatasetError(
                        f"{self.path}: file ends at line {line_no - 1}, before the rows of "
                        f"element {self.element!r} (the elements before it promise "
                        f"{self.skip_rows} lines)"
                    )
                left -= k
                line_no += k
            done = 0
            while done < self.num_points:
                n = min(per, self.num_points - done)
                lines = self._read_lines(f, n, line_no)
                if len(lines) < n:
                    raise DatasetError(
                        f"{self.path}: truncated: file ends at line "
                        f"{line_no + len(lines) - 1}, but the header promises "
                        f"{self.num_points} rows of element {self.element!r} "
                        f"(found {done + len(lines)})"
                    )
                rows = self._parse(lines, line_no)
                yield {k: rows[k] for k in names}, sum(map(len, lines))
                done += n
                line_no += n

    def _read_lines(self, f, n: int, line_no: int) -> list[bytes]:
        """Up to ``n`` lines (fewer at the end of the file), each at most ``MAX_LINE`` bytes, so
        a file without line breaks cannot make one line the size of the file."""
        out = []
        readline = f.readline
        for _ in range(n):
            line = readline(MAX_LINE)
            if not line:
                break
            if len(line) == MAX_LINE and not line.endswith(b"\n"):
                raise ConversionError(
                    f"{self.path}: line {line_no + len(out)} is longer than {MAX_LINE} bytes; "
                    f"not a row of an ASCII PLY element"
                )
            out.append(line)
        return out

    def _parse(self, lines: list[bytes], first_line: int) -> np.ndarray:
        try:
            rows = np.loadtxt(lines, dtype=self.row_dtype, comments=None, ndmin=1)
        except ValueError as exc:
            self._diagnose(lines, first_line)
            raise ConversionError(
                f"{self.path}: lines {first_line}..{first_line + len(lines) - 1}: {exc}"
            ) from exc
        if len(rows) != len(lines):  # loadtxt skips blank lines
            self._diagnose(lines, first_line)
            raise ConversionError(  # pragma: no cover - _diagnose finds the blank line
                f"{self.path}: lines {first_line}..{first_line + len(lines) - 1}: "
                f"{len(rows)} rows parsed from {len(lines)} lines"
            )
        return rows

    def _diagnose(self, lines: list[bytes], first_line: int) -> None:
        """Raise a :class:`ConversionError` naming the first malformed line of ``lines``."""
        props = [(name, self.row_dtype[name]) for name in self.row_dtype.names]
        want = len(props)
        for i, raw in enumerate(lines):
            where = f"{self.path}: line {first_line + i}"
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise ConversionError(f"{where}: not ASCII text") from None
            tokens = text.split()
            if len(tokens) != want:
                raise ConversionError(
                    f"{where}: expected {want} values ({' '.join(n for n, _ in props)}) for a row "
                    f"of element {self.element!r}, found {len(tokens)}"
                )
            for tok, (name, dt) in zip(tokens, props):
                problem = _bad_token(tok, dt)
                if problem:
                    raise ConversionError(f"{where}: property {name!r}: {problem}")


def _bad_token(tok: str, dt: np.dtype) -> str | None:
    if dt.kind == "f":
        try:
            float(tok)
        except ValueError:
            return f"{tok!r} is not a number"
        return None
    try:
        v = int(tok, 10)
    except ValueError:
        return f"{tok!r} is not an integer ({dt.name})"
    info = np.iinfo(dt)
    if not info.min <= v <= info.max:
        return f"{v} is out of range for {dt.name} ({info.min}..{info.max})"
    return None


# -- SemanticKITTI -------------------------------------------------------------------------------
class _KittiSource(_Source):
    POINT = np.dtype("<f4")
    LABEL = np.dtype("<u4")

    def __init__(self, path: Path, fields: Sequence[str] | None):
        size = _file_size(path)
        rec = 4 * self.POINT.itemsize
        if size % rec:
            raise DatasetError(
                f"{path}: {size} bytes is not a multiple of {rec}; a SemanticKITTI .bin holds "
                f"N points of 4 float32 ({', '.join(KITTI_FIELDS)})"
            )
        n = size // rec
        candidates = [path.with_suffix(".label")]
        if path.parent.name == "velodyne":
            candidates.append(path.parent.parent / "labels" / (path.stem + ".label"))
        label = next((c for c in candidates if c.is_file()), None)
        available = [FieldSpec(k, self.POINT) for k in KITTI_FIELDS]
        note = ""
        if label is not None:
            lsize = label.stat().st_size
            if lsize % self.LABEL.itemsize:
                raise DatasetError(f"{label}: {lsize} bytes is not a multiple of 4 "
                                   f"(labels are uint32)")
            if lsize // self.LABEL.itemsize != n:
                raise DatasetError(
                    f"{label}: holds {lsize // self.LABEL.itemsize} labels, but {path.name} "
                    f"holds {n} points; the counts must be equal"
                )
            available += [FieldSpec(k, np.dtype("<u2")) for k in KITTI_LABEL_FIELDS]
            info = {"labels": str(label)}
        else:
            info = {}
            note = f"no .label file for {path} (looked for {', '.join(map(str, candidates))})"
        schema = _select(path, available, fields, "SemanticKITTI field")
        super().__init__(path, "kitti", schema, n, size + (label.stat().st_size if label else 0),
                         info, note)
        self.label = label

    def chunks(self):
        per = _chunk_rows(16 + 4)
        names = [s.name for s in self.schema]
        want_labels = self.label is not None and any(k in names for k in KITTI_LABEL_FIELDS)
        pts = np.empty((min(per, self.num_points), 4), dtype=self.POINT)
        labs = np.empty(min(per, self.num_points), dtype=self.LABEL)
        with open(self.path, "rb") as f, \
                (open(self.label, "rb") if want_labels else _null()) as g:
            done = 0
            while done < self.num_points:
                n = min(per, self.num_points - done)
                p = pts[:n]
                _readinto_exact(f, memoryview(p).cast("B"), self.path)
                cols = {k: p[:, j] for j, k in enumerate(KITTI_FIELDS) if k in names}
                consumed = p.nbytes
                if want_labels:
                    lab = labs[:n]
                    _readinto_exact(g, memoryview(lab).cast("B"), self.label)
                    cols["sem_class"] = (lab & 0xFFFF).astype("<u2")
                    cols["ins_class"] = (lab >> 16).astype("<u2")
                    consumed += lab.nbytes
                yield {k: cols[k] for k in names}, consumed
                done += n


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- raw N×F -------------------------------------------------------------------------------------
class _RawSource(_Source):
    def __init__(self, path: Path, raw_fields: Sequence[str], dtype: np.dtype,
                 fields: Sequence[str] | None):
        size = _file_size(path)
        rec = len(raw_fields) * dtype.itemsize
        if size % rec:
            raise DatasetError(
                f"{path}: {size} bytes is not a multiple of the record size {rec} "
                f"({len(raw_fields)} fields × {dtype.itemsize} bytes of {dtype.name})"
            )
        available = [FieldSpec(k, stored_dtype(dtype)) for k in raw_fields]
        schema = _select(path, available, fields, "raw field")
        super().__init__(path, "raw", schema, size // rec, size)
        self.dtype = dtype
        self.raw_fields = list(raw_fields)

    def chunks(self):
        width = len(self.raw_fields)
        per = _chunk_rows(width * self.dtype.itemsize)
        buf = np.empty((min(per, self.num_points), width), dtype=self.dtype)
        index = {k: j for j, k in enumerate(self.raw_fields)}
        with open(self.path, "rb") as f:
            done = 0
            while done < self.num_points:
                n = min(per, self.num_points - done)
                b = buf[:n]
                _readinto_exact(f, memoryview(b).cast("B"), self.path)
                yield {s.name: b[:, index[s.name]] for s in self.schema}, b.nbytes
                done += n


# -- inputs and schemas --------------------------------------------------------------------------
def _expand(inputs: Iterable[str | os.PathLike], fmt: str) -> list[Path]:
    """Files as given; a directory becomes its files with a known extension, sorted, recursive,
    skipping hidden entries and gds-stream dataset directories."""
    exts = _EXTENSIONS[fmt]
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
                raise DatasetError(f"{p}: no {' or '.join(exts)} files in this directory")
            out += sorted(found, key=lambda q: q.relative_to(p).parts)
        elif not p.exists():
            raise DatasetError(f"{p}: no such file or directory")
        else:
            out.append(p)
    if not out:
        raise ConversionError("no input files given")
    return out


def _format_of(path: Path, fmt: str, raw_fields) -> str:
    if fmt != "auto":
        return fmt
    ext = path.suffix.lower()
    if ext == ".ply":
        return "ply"
    if ext == ".bin":
        return "raw" if raw_fields else "kitti"
    raise ConversionError(
        f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; expected .ply "
        f"or .bin, or pass --format ply|kitti|raw"
    )


def _schema_mismatch(a: _Source, b: _Source) -> ConversionError:
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


def _raw_dtype(raw_dtype: str) -> np.dtype:
    try:
        dt = np.dtype(raw_dtype)
    except TypeError:
        raise ConversionError(f"--raw-dtype {raw_dtype!r} is not a numpy dtype") from None
    stored_dtype(dt, f"--raw-dtype {raw_dtype!r}")
    return dt


# -- the entry point -----------------------------------------------------------------------------
def convert(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            *, format: str = "auto", element: str | None = None,
            fields: Sequence[str] | None = None, raw_fields: Sequence[str] | None = None,
            raw_dtype: str = "float32", overwrite: bool = False,
            progress: bool | None = None) -> Dataset:
    """Convert ``inputs`` (files or directories) into the dataset directory ``out_dir``.

    ``format``: ``auto`` (``.ply`` → ply; ``.bin`` → raw when ``raw_fields`` is given, else
    SemanticKITTI), ``ply``, ``kitti`` or ``raw``. ``element``: the PLY element to convert
    (default: the one with x, y and z). ``fields``: the fields to keep, in this order (default:
    all). ``raw_fields`` / ``raw_dtype``: column names and dtype of raw N×F records.
    ``progress``: a tqdm bar over input bytes on stderr; ``None`` shows it when stderr is a TTY.

    Each input file becomes one scan. Every input is validated before anything is written; a
    failure leaves no output directory behind. Returns the opened dataset.
    """
    from tqdm import tqdm

    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
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
        if format in ("ply", "kitti"):
            raise ConversionError(f"--raw-fields applies to raw .bin input, not --format {format}")
        if not raw_fields:
            raise ConversionError("--raw-fields names no field")
        for k in raw_fields:
            check_field_name(k, "--raw-fields")
        dup = sorted({k for k in raw_fields if raw_fields.count(k) > 1})
        if dup:
            raise ConversionError(f"--raw-fields names {', '.join(map(repr, dup))} more than once")
        dtype = _raw_dtype(raw_dtype)
    elif format == "raw":
        raise ConversionError(
            "--format raw needs --raw-fields: the names of the columns of the N×F records, "
            "e.g. --raw-fields x,y,z,intensity (and --raw-dtype, default float32)"
        )
    out = Path(out_dir)
    check_output_dir(out, overwrite)

    sources: list[_Source] = []
    warned: set = set()
    for path in _expand(inputs, format):
        kind = _format_of(path, format, raw_fields)
        if kind == "ply":
            src: _Source = _PlySource(path, element, fields, warned)
        elif kind == "kitti":
            src = _KittiSource(path, fields)
        else:
            assert raw_fields is not None and dtype is not None
            src = _RawSource(path, raw_fields, dtype, fields)
        if sources and src.schema != sources[0].schema:
            raise _schema_mismatch(sources[0], src)
        sources.append(src)

    total = sum(s.nbytes for s in sources)
    log.info("converting %d file(s), %d points, %d bytes into %s", len(sources),
             sum(s.num_points for s in sources), total, out)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
              disable=None if progress is None else not progress, file=sys.stderr) as bar, \
            DatasetWriter(out, sources[0].schema, overwrite=overwrite) as writer:
        for src in sources:
            consumed = 0
            for columns, nbytes in src.chunks():
                writer.append(columns)
                consumed += nbytes
                bar.update(nbytes)
            bar.update(src.nbytes - consumed)
            writer.end_scan(str(src.path), format=src.format, **src.info)
    return open_dataset(out)
