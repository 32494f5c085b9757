"""Reading ``manifest.json`` safely, and checking the types of the values it holds.

Everything here turns a bad input into a :class:`DatasetError` naming the manifest: a manifest
that is not a regular file (a FIFO, ``/dev/zero``, a directory), one far larger than any real
manifest, invalid or absurdly nested JSON, integers beyond int64, NaN where a coordinate goes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._schema import INT64_LIMIT, MANIFEST
from .errors import DatasetError

#: A manifest holds, besides a few fixed keys, one crc32 per checksum block (<= 12 bytes of JSON
#: per block of >= 4 KiB), one offset and one source record per scan (a few hundred bytes), and
#: one record per spatial chunk (<= ~400 bytes). ``BASE`` covers the scans and sources of a
#: dataset of some hundred thousand scans with no data at all; ``PER_DATA_BYTE`` grants one byte
#: of manifest per 64 bytes of data in the directory, which covers the checksums with room to
#: spare and chunks down to ~25 KB of data each (a chunk is a training unit, far larger in
#: practice). ``ABS_MAX`` bounds what parsing may cost whatever the files claim (sparse files
#: can claim anything): Python's JSON objects take a few times the text's size in memory.
MANIFEST_BASE_BYTES = 64 << 20
MANIFEST_DATA_RATIO = 64
MANIFEST_ABS_MAX_BYTES = 1 << 30


def manifest_cap(directory: Path | int) -> int:
    """Largest manifest a dataset in ``directory`` (a path or a directory descriptor) can have,
    from the size of its data files."""
    data = 0
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.is_file():
                        st = entry.stat()
                        # the bytes the file holds on disk: a sparse file's size claims anything
                        data += min(st.st_size, st.st_blocks * 512)
                except (OSError, ValueError):
                    continue
    except (OSError, ValueError):
        pass
    return min(MANIFEST_ABS_MAX_BYTES, MANIFEST_BASE_BYTES + data // MANIFEST_DATA_RATIO)


def read_manifest(path: Path, cap: int, dir_fd: int | None = None) -> dict:
    """The JSON object in ``path``: a regular file of at most ``cap`` bytes, read with a bound.

    With ``dir_fd``, ``path.name`` is opened relative to that directory descriptor (``path``
    then only names the file in messages). The file is opened non-blocking, so a FIFO in its
    place never blocks, and checked with ``fstat`` on the opened descriptor (no window between
    check and read).
    """
    try:
        # not through a symbolic link: the manifest is the dataset's own file, as its fields'
        # files are (a link could read any file, or another dataset's manifest)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        fd = (os.open(path, flags) if dir_fd is None else
              os.open(path.name, flags, dir_fd=dir_fd))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file; expected a gds-stream dataset directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            try:
                st = (os.stat(path) if dir_fd is None else os.stat(path.name, dir_fd=dir_fd))
                kind = None if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
            except (OSError, ValueError):
                kind = None
            if kind is not None:
                raise DatasetError(f"{path}: the manifest is not a regular file ({kind}, "
                                   f"through a symbolic link)") from None
            raise DatasetError(f"{path}: the manifest is a symbolic link; a dataset's manifest "
                               f"must be a regular file of its own directory") from None
        raise DatasetError(f"{path}: cannot open the manifest ({os_reason(exc)})") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot open the manifest ({os_reason(exc)})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{path}: the manifest is not a regular file "
                               f"({file_kind(st.st_mode)})")
        if st.st_size > cap:
            raise DatasetError(f"{path}: manifest of {st.st_size} bytes is larger than any valid "
                               f"one for this directory (at most {cap} bytes)")
        raw = _read_bounded(fd, st.st_size, cap, path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the manifest ({os_reason(exc)})") from exc
    finally:
        os.close(fd)
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes | bytearray, path: object) -> dict:
    """The JSON object in a manifest's bytes (``path`` names it in messages), refused before
    parsing when parsing would cost too much (:func:`check_expansion`)."""
    check_expansion(raw, path)
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise DatasetError(f"{path}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, int digit limit
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _read_bounded(fd: int, size: int, cap: int, path: Path) -> bytearray:
    """All bytes of ``fd`` (``size`` by ``fstat``), into one buffer: at most ``cap`` of them."""
    buf = bytearray(size + 1)  # one byte more: a file that grew is noticed
    got = 0
    while True:
        if got == len(buf):
            if got > cap:
                raise DatasetError(f"{path}: manifest grew past {cap} bytes while being read")
            buf.extend(bytes(min(1 << 20, cap + 1 - got)))
        n = os.readv(fd, [memoryview(buf)[got:]])
        if n == 0:
            break
        got += n
    if got > cap:
        raise DatasetError(f"{path}: manifest grew past {cap} bytes while being read")
    del buf[got:]
    return buf


# -- what parsing may cost --------------------------------------------------------------------
#: Deepest nesting of a valid manifest: 4 (document, ``chunks``, ``cell``, one cell) plus what a
#: source record holds. Deeper JSON is refused before parsing.
MANIFEST_MAX_DEPTH = 32
#: Parsing may take at most ``BASE + RATIO × the manifest's size`` bytes of Python objects, by
#: the estimate of :func:`check_expansion` (an upper bound of what parsing takes). Manifests that
#: gds-stream writes estimate at 3-7× their size (12× for very short source names), so ``BASE``
#: leaves room for all but the largest of those, and a hostile manifest (millions of ``{}``,
#: ``[]``, two-letter strings or one-digit numbers, 12-36× their size in memory) is refused
#: before parsing.
MANIFEST_PARSE_BASE = 64 << 20
MANIFEST_PARSE_RATIO = 8
#: Bytes per parsed value in CPython (64-bit, GC header included): a dict, a list, a member of
#: either, a key, a string value, a number. The text's own bytes are added once.
_COST = {"objects": 200, "arrays": 80, "members": 8, "keys": 48, "strings": 56, "numbers": 32}
_SCAN_BLOCK = 1 << 20


def json_shape(raw: bytes | bytearray, budget: int | None = None) -> dict[str, int]:
    """What JSON text parses into, counted without parsing it: ``objects``, ``arrays``,
    ``members`` (an upper bound), ``keys``, ``strings`` (values), ``numbers`` and ``depth``.

    Exact for UTF-8 text that ``json.loads`` accepts (other text fails to parse anyway; UTF-16
    and -32 are refused by :func:`check_expansion`). Scans the bytes in blocks, tracking
    strings, escapes and nesting across them; works on the positions of quotes, backslashes and structural characters, so it takes little memory and
    runs at memory speed on manifests with few strings. With ``budget``, stops early once the
    estimated parsed size (see :func:`check_expansion`) of what was scanned exceeds it.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    tot = dict.fromkeys(("objects", "arrays", "commas", "keys", "quotes", "numbers", "depth"), 0)
    slashes = depth = 0  # carried: backslashes ending the previous block, nesting level
    inside = False  # the previous block ended inside a string
    numish_before = False  # ... with a character that continues a number
    for lo in range(0, len(data), _SCAN_BLOCK):
        b = data[lo:lo + _SCAN_BLOCK]
        n = len(b)
        qp = np.flatnonzero(b == 0x22)
        bp = np.flatnonzero(b == 0x5C)
        if len(qp) and (len(bp) or slashes):  # drop quotes after an odd run of backslashes
            run = np.where(qp == 0, slashes, 0)
            if len(bp):
                first = np.ones(len(bp), dtype=bool)
                first[1:] = np.diff(bp) != 1
                start = np.maximum.accumulate(np.where(first, bp, 0))  # of each one's run
                j = np.maximum(np.searchsorted(bp, qp) - 1, 0)
                adj = (qp > 0) & (bp[j] == qp - 1)
                run = np.where(adj, qp - start[j] + np.where(start[j] == 0, slashes, 0), run)
            qp = qp[run % 2 == 0]
        if len(bp) and bp[-1] == n - 1:
            k = len(bp) - 1
            while k > 0 and bp[k - 1] == bp[k] - 1:
                k -= 1
            slashes = n - int(bp[k]) + (slashes if bp[k] == 0 else 0)
        else:
            slashes = 0
        # string intervals [starts, ends): between an opening and its closing quote
        bounds = np.concatenate(([0], qp)) if inside else qp
        starts, ends = bounds[0::2], bounds[1::2] + 1
        if len(ends) < len(starts):
            ends = np.append(ends, n)

        def outside(pos: np.ndarray) -> np.ndarray:
            if not len(starts):
                return pos
            k = np.searchsorted(starts, pos, side="right") - 1
            return pos[(k < 0) | (pos >= ends[np.maximum(k, 0)])]

        opens = outside(np.flatnonzero((b == 0x7B) | (b == 0x5B)))
        closes = outside(np.flatnonzero((b == 0x7D) | (b == 0x5D)))
        objects = int(np.count_nonzero(b[opens] == 0x7B))
        tot["objects"] += objects
        tot["arrays"] += len(opens) - objects
        tot["commas"] += len(outside(np.flatnonzero(b == 0x2C)))
        tot["keys"] += len(outside(np.flatnonzero(b == 0x3A)))
        tot["quotes"] += len(qp)
        numeric = (b >= 0x30) & (b <= 0x39) | (b == 0x2D)
        numish = numeric | (b == 0x2E) | (b == 0x2B) | (b == 0x45) | (b == 0x65)
        first_digit = numeric.copy()
        first_digit[1:] &= ~numish[:-1]
        first_digit[0] &= not numish_before
        first_digit |= (b == 0x4E) | (b == 0x49)  # NaN, Infinity (floats too; -Infinity twice)
        tot["numbers"] += len(outside(np.flatnonzero(first_digit)))
        if budget is not None and _cost(tot, lo + n) > budget:
            break  # already too costly: the rest cannot make it cheaper
        if len(opens):  # nesting peaks at an opening bracket
            level = depth + np.arange(1, len(opens) + 1) - np.searchsorted(closes, opens)
            tot["depth"] = max(tot["depth"], int(level.max()))
        depth += len(opens) - len(closes)
        inside = len(bounds) % 2 == 1
        numish_before = bool(numish[-1]) and not inside
    return _summary(tot)


def _summary(tot: dict[str, int]) -> dict[str, int]:
    return {"objects": tot["objects"], "arrays": tot["arrays"],
            "members": tot["commas"] + tot["objects"] + tot["arrays"], "keys": tot["keys"],
            "strings": max(0, tot["quotes"] // 2 - tot["keys"]), "numbers": tot["numbers"],
            "depth": tot["depth"]}


def _cost(tot: dict[str, int], nbytes: int) -> int:
    """Estimated bytes of Python objects that parsing ``nbytes`` of JSON text takes."""
    shape = _summary(tot)
    return nbytes + sum(_COST[k] * shape[k] for k in _COST)


def check_expansion(raw: bytes | bytearray, path: Path) -> None:
    """Refuse, before parsing, a manifest whose parsed objects would take more than
    ``MANIFEST_PARSE_BASE + MANIFEST_PARSE_RATIO × size``, or nested deeper than
    :data:`MANIFEST_MAX_DEPTH`."""
    encoding = json.detect_encoding(bytes(raw[:4]))
    if not encoding.startswith("utf-8"):  # a byte scan can't see UTF-16 or -32 structure
        raise DatasetError(f"{path}: the manifest is {encoding.upper()} text; gds-stream "
                           f"manifests are UTF-8")
    limit = MANIFEST_PARSE_BASE + MANIFEST_PARSE_RATIO * len(raw)
    shape = json_shape(raw, budget=limit)
    cost = len(raw) + sum(_COST[k] * shape[k] for k in _COST)
    if cost > limit:
        raise DatasetError(
            f"{path}: {len(raw):,} bytes of JSON would take over {limit:,} bytes once parsed "
            f"(objects: {shape['objects']:,}, arrays: {shape['arrays']:,}, strings: "
            f"{shape['strings'] + shape['keys']:,}, numbers: {shape['numbers']:,}, counted "
            f"until the estimate passed the bound), more than any valid manifest of its size; "
            f"refusing to parse it")
    if shape["depth"] > MANIFEST_MAX_DEPTH:
        raise DatasetError(f"{path}: JSON nested {shape['depth']} levels deep; a manifest nests "
                           f"at most {MANIFEST_MAX_DEPTH}")


def os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# -- typed values --------------------------------------------------------------------------------
def want(cond: bool, path: object, what: str) -> None:
    if not cond:
        raise DatasetError(f"{path}: {what}")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_i64(v: object, lo: int = 0) -> bool:
    """An integer (not a bool) in ``[lo, 2**63)``."""
    return is_int(v) and lo <= v < INT64_LIMIT  # type: ignore[operator]


def is_finite(v: object) -> bool:
    """A JSON number (not a bool) that is finite as a float64."""
    if not (is_int(v) or isinstance(v, float)):
        return False
    try:
        return math.isfinite(float(v))  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float64
        return False


#: Control characters (C0, DEL, C1) as escapes: a name in a message stays on its line and sends
#: nothing to the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127, *range(0x80, 0xA0))}
_CONTROL.update({9: "\\t", 10: "\\n", 13: "\\r"})


def printable(text: object) -> str:
    """``str(text)`` with its control characters escaped (a file name from a manifest, or any
    message a CLI prints on one line)."""
    return str(text).translate(_CONTROL)


def short(v: object, limit: int = 60) -> str:
    """``repr`` of a manifest value, cut short (a lying value may be megabytes long)."""
    try:
        r = repr(v)
    except (ValueError, RecursionError):  # an int beyond the str-conversion limit
        return f"<{type(v).__name__}>"
    return r if len(r) <= limit else r[:limit] + "…"


def int_list(v: object, path: object, what: str, lo: int = 0) -> np.ndarray:
    """A JSON list of integers in ``[lo, 2**63)`` as a read-only int64 array."""
    want(isinstance(v, list) and all(is_i64(x, lo) for x in v), path,  # type: ignore[union-attr]
         f"{what} must be a list of integers in [{lo}, 2**63), found {short(v)}")
    arr = np.asarray(v, dtype=np.int64).reshape(-1)
    arr.setflags(write=False)
    return arr


def origin_value(v: object, path: object) -> np.ndarray:
    """A dataset origin: three finite numbers, as a read-only float64 array."""
    want(isinstance(v, list) and len(v) == 3 and all(is_finite(x) for x in v), path,
         f"origin must be a list of 3 finite numbers, found {short(v)}")
    arr = np.asarray(v, dtype=np.float64)
    want(bool(np.all(np.isfinite(arr))), path, f"origin {short(v)} is not finite as float64")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class ChunkTable:
    """The ``chunks`` record: spatial chunks, each a contiguous point range inside one scan."""

    size: float
    dims: int
    offsets: np.ndarray  # int64 (n + 1,), 0 .. num_points, strictly increasing
    scan: np.ndarray     # int64 (n,)
    cells: np.ndarray    # int64 (n, 3)
    bounds: np.ndarray   # float64 (n, 6): xmin, ymin, zmin, xmax, ymax, zmax

    @classmethod
    def empty(cls) -> "ChunkTable":
        return cls(0.0, 0, _ro(np.zeros(1, np.int64)), _ro(np.zeros(0, np.int64)),
                   _ro(np.zeros((0, 3), np.int64)), _ro(np.zeros((0, 6), np.float64)))


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def chunk_table(v: object, num_points: int, scan_offsets: np.ndarray, path: object) -> ChunkTable:
    """Validate a manifest's ``chunks`` record against the point count and the scans."""
    want(isinstance(v, dict), path, f"chunks must be an object, found {short(v)}")
    assert isinstance(v, dict)
    size, dims = v.get("size"), v.get("dims")
    want(is_finite(size) and size > 0, path,  # type: ignore[operator]
         f"chunks.size must be a finite number > 0, found {short(size)}")
    want(dims in (2, 3) and is_int(dims), path, f"chunks.dims must be 2 or 3, found {short(dims)}")
    offsets = int_list(v.get("offsets"), path, "chunks.offsets")
    want(len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == num_points, path,
         f"chunks.offsets must run from 0 to num_points={num_points}")
    want(bool(np.all(np.diff(offsets) > 0)), path,
         "chunks.offsets must increase strictly (every chunk holds at least one point)")
    n = len(offsets) - 1
    scan = int_list(v.get("scan"), path, "chunks.scan")
    want(len(scan) == n, path, f"chunks.scan has {len(scan)} entries, expected {n} (one per chunk)")
    num_scans = len(scan_offsets) - 1
    want(bool(np.all(scan < num_scans)), path, f"chunks.scan names a scan >= {num_scans}")
    if n:
        inside = (scan_offsets[scan] <= offsets[:-1]) & (offsets[1:] <= scan_offsets[scan + 1])
        bad = np.flatnonzero(~inside)
        want(len(bad) == 0, path,
             f"chunk {int(bad[0]) if len(bad) else 0} does not lie inside its scan "
             f"{int(scan[bad[0]]) if len(bad) else 0}")
    cells = v.get("cell")
    want(isinstance(cells, list) and len(cells) == n
         and all(isinstance(c, list) and len(c) == 3 and all(is_int(x) and -INT64_LIMIT <= x
                                                              < INT64_LIMIT for x in c)
                 for c in cells), path,
         f"chunks.cell must be a list of {n} [i, j, k] int64 triples")
    bounds = v.get("bounds")
    want(isinstance(bounds, list) and len(bounds) == n
         and all(isinstance(b, list) and len(b) == 6 and all(is_finite(x) for x in b)
                 for b in bounds), path,
         f"chunks.bounds must be a list of {n} [xmin, ymin, zmin, xmax, ymax, zmax] of finite numbers")
    barr = np.asarray(bounds, dtype=np.float64).reshape(n, 6)
    want(bool(np.all(np.isfinite(barr))) and bool(np.all(barr[:, :3] <= barr[:, 3:])), path,
         "chunks.bounds must be finite with min <= max on every axis")
    return ChunkTable(float(size), int(dims), offsets, scan,  # type: ignore[arg-type]
                      _ro(np.asarray(cells, dtype=np.int64).reshape(n, 3)), _ro(barr))


def check_disjoint(layouts: dict, path: object, same_file: dict | None = None) -> None:
    """Fields that share a file must not share bytes (the writer gives each field its own file;
    a manifest edited to point two fields at the same bytes would read one as the other), and
    no field lives in the manifest. ``layouts``: field name -> ``FieldLayout``; ``same_file``:
    a file's name -> the name its bytes were first found under (hard links are one file)."""
    same_file = same_file or {}
    by_file: dict[str, list] = {}
    for name, lay in layouts.items():
        want(lay.file != MANIFEST, path, f"field {name!r}: file {MANIFEST!r} is the manifest, "
             f"not a data file")
        if lay.nbytes:
            by_file.setdefault(same_file.get(lay.file, lay.file), []).append(
                (lay.offset, lay.offset + lay.nbytes, name))
    for file, spans in by_file.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            want(start >= end, path, f"fields {a!r} and {b!r} overlap in {file} (bytes "
                 f"{start}..{end} belong to both)")
