"""PLY input (binary little/big endian and ASCII), streamed.

plyfile parses the header only; rows are read here, binary ones with ``readinto`` into a reused
buffer viewed with the element's structured dtype, ASCII ones a chunk of lines at a time with
:func:`numpy.loadtxt` (and a line-by-line diagnosis when a chunk does not parse, so the error
names the line and the problem).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConversionError, DatasetError
from ..format import FieldSpec, check_field_name, stored_dtype
from . import common
from .common import Source, file_size, readinto_exact, select

log = logging.getLogger(__name__)

#: ASCII rows per chunk: a list of line objects costs far more than the binary rows.
ASCII_CHUNK_ROWS = 1 << 18
#: Longest ASCII row accepted (a row of scalars is far shorter).
MAX_LINE = 1 << 16
#: ASCII: the rows of the elements after the converted one are counted up to this many lines
#: (a few seconds), to check that nothing follows them.
ASCII_TAIL_LINES = 1 << 24
#: A PLY header must end within this many bytes.
HEADER_LIMIT = 1 << 20


class PlySource(Source):
    def __init__(self, path: Path, element: str | None, fields: Sequence[str] | None,
                 warned: set | None = None):
        """``warned``: keys of skipped-element sets already warned about in this conversion,
        so a directory of like files gives one warning, not one per file."""
        import plyfile

        size = file_size(path)
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
        schema = select(path, available, fields, f"property of element {target.name!r}")

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
        #: ASCII: rows of the elements after the target (one line each), then nothing more.
        self.rows_after = sum(e.count for e in elements[t_index + 1:])
        self.after_names = [e.name for e in elements[t_index + 1:]]
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
            after = elements[t_index + 1:]
            if not any(isinstance(p, plyfile.PlyListProperty) for e in after
                       for p in e.properties):  # where the data ends is known
                end = need + sum(e.count * e.dtype(ply.byte_order).itemsize for e in after)
                last = (after[-1] if after else target)
                row = last.dtype(ply.byte_order).itemsize
                if have < end:  # the target is whole; what the header says follows it is not
                    raise DatasetError(
                        f"{path}: truncated: the header promises {end} bytes of data (element "
                        f"{target.name!r}, then {', '.join(repr(e.name) for e in after)}), but "
                        f"only {have} bytes follow the header")
                if row and have - end >= row:  # whole rows past the counts: dropped silently
                    raise DatasetError(
                        f"{path}: the header counts {last.count} rows of element "
                        f"{last.name!r}, but {have - end} more bytes follow its data "
                        f"({(have - end) // row} rows or more); the count is wrong or the file "
                        f"is damaged")
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
        per = common.chunk_rows(row)
        names = [s.name for s in self.schema]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + self.skip_bytes)
            buf = bytearray(min(per, max(self.num_points, 1)) * row)
            done = 0
            while done < self.num_points:
                n = min(per, self.num_points - done)
                view = memoryview(buf)[:n * row]
                readinto_exact(f, view, self.path)
                rows = np.frombuffer(view, dtype=self.row_dtype)
                yield {k: rows[k] for k in names}, n * row
                done += n

    def _ascii_chunks(self):
        per = max(1, min(common.CHUNK_ROWS, ASCII_CHUNK_ROWS))
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
            self._check_ascii_end(f, line_no)

    def _check_ascii_end(self, f, line_no: int) -> None:
        """After the target's rows: the rows the header promises for the elements after it (one
        line each; counted up to :data:`ASCII_TAIL_LINES`), then nothing but blank lines. A
        count smaller than the rows dropped the rest without a word."""
        left_bytes = os.fstat(f.fileno()).st_size - f.tell()
        if left_bytes < self.rows_after:  # every row takes a line break at least
            raise DatasetError(
                f"{self.path}: truncated: the header promises {self.rows_after} rows of "
                f"element(s) {', '.join(map(repr, self.after_names))} after {self.element!r}, "
                f"but only {left_bytes} bytes follow its rows")
        if self.rows_after > ASCII_TAIL_LINES:
            return  # too many to count here; the target's rows are whole
        left = self.rows_after
        while left:
            k = len(self._read_lines(f, min(left, common.CHUNK_ROWS), line_no))
            if k == 0:
                raise DatasetError(
                    f"{self.path}: truncated: file ends at line {line_no - 1}, but the header "
                    f"promises {self.rows_after} rows of element(s) "
                    f"{', '.join(map(repr, self.after_names))} after {self.element!r}")
            left -= k
            line_no += k
        while True:
            extra = self._read_lines(f, 1, line_no)
            if not extra:
                return
            if extra[0].strip():
                last = self.after_names[-1] if self.after_names else self.element
                raise DatasetError(
                    f"{self.path}: line {line_no} follows the rows the header counts (the "
                    f"last element is {last!r}); the count is wrong or the file is damaged")
            line_no += 1

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
