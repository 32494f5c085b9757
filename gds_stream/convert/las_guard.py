"""What a LAS/LAZ file's header claims, checked against the file before laspy or lazrs act on
it, and the one place they are called.

A lying count makes laspy build records past the end of the file, and a LAZ chunk table that
claims 2³¹ chunks makes lazrs allocate tens of GB and abort the process; both are refused here
from the file's size. So are what laspy would read without a word: a version other than 1.0
to 1.4 (laspy reads only the minor number), a point format the version does not have, a LAS
1.4 legacy count that disagrees with the 64-bit one, uncompressed point data holding more
records than the count (the rest would be dropped), a LAZ count its chunk table disproves,
EVLRs before the points or past the end (laspy reads each one's declared length whole), a VLR
chain that does not end by the points or holds more VLRs than counted (laspy drops what it
cannot place: the CRS, the extra-bytes fields). lazrs reports some damage with a Rust panic (``PanicException``, a
``BaseException`` that ``except Exception`` misses): :func:`guard` turns every failure of
laspy/lazrs into one error of the gds-stream family naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ConversionError, DatasetError, GDSStreamError

log = logging.getLogger(__name__)

#: The highest point format of each LAS 1.x (formats 6-10 came with LAS 1.4).
_MAX_FORMAT = {0: 1, 1: 1, 2: 3, 3: 5, 4: 10}
#: Sizes of a VLR and an EVLR header (bytes).
VLR_HEADER, EVLR_HEADER = 54, 60
#: The LASzip VLR: its user id and record id, and where its chunk size sits in its payload.
_LASZIP = (b"laszip encoded", 22204)
_LASZIP_CHUNK_SIZE_AT = 12
_VARIABLE_CHUNKS = 0xFFFFFFFF


@dataclass(frozen=True)
class Layout:
    """Where a file's parts lie, from its raw header (checked against its size)."""

    header_size: int
    point_start: int
    #: Where the point data must end: the first EVLR or an internal waveform block, else EOF.
    point_end: int
    #: What ends the point data (said in messages).
    point_end_what: str
    #: The LASzip VLR's chunk size (``None``: no LASzip VLR).
    laz_chunk_size: int | None
    #: The LASzip VLR's payload (``None``: no LASzip VLR).
    laz_vlr: bytes | None = None


def check_layout(path: Path, size: int) -> Layout:
    """Refuse header counts the file cannot hold before laspy reads them."""
    with open(path, "rb") as f:
        head = f.read(375)
    if len(head) < 227:
        raise DatasetError(f"{path}: not a readable LAS/LAZ file (truncated: {len(head)} bytes, "
                           f"shorter than a LAS header)")
    major, minor = head[24], head[25]
    if major != 1 or minor > 4:
        raise DatasetError(f"{path}: the header says LAS version {major}.{minor}; gds-stream "
                           f"reads LAS 1.0 to 1.4")
    fmt = head[104] & 0x3F  # bits 6 and 7 mark compression
    if fmt <= 10 and fmt > _MAX_FORMAT[minor]:
        raise DatasetError(f"{path}: point format {fmt} does not exist in LAS 1.{minor} (it "
                           f"has formats 0 to {_MAX_FORMAT[minor]}); the header is damaged")
    global_encoding, = struct.unpack_from("<H", head, 6)
    header_size, = struct.unpack_from("<H", head, 94)
    offset_to_points, n_vlrs = struct.unpack_from("<II", head, 96)
    if header_size < 227 or offset_to_points < header_size or offset_to_points > size:
        raise DatasetError(f"{path}: the header says the points start at byte "
                           f"{offset_to_points} after a {header_size}-byte header, in a file of "
                           f"{size} bytes")
    if n_vlrs * VLR_HEADER > offset_to_points - header_size:
        raise DatasetError(f"{path}: the header counts {n_vlrs} VLRs, more than fit between "
                           f"its end (byte {header_size}) and the points (byte "
                           f"{offset_to_points})")
    end, what = size, "the end of the file"
    if minor >= 3 and len(head) >= 235 and global_encoding & 2:  # waveform packets inside
        wave, = struct.unpack_from("<Q", head, 227)
        if offset_to_points <= wave < end:
            end, what = wave, "the waveform data"
    if minor >= 4 and len(head) >= 255:
        first_evlr, n_evlrs, count = struct.unpack_from("<QIQ", head, 235)
        legacy, = struct.unpack_from("<I", head, 107)
        if legacy not in (0, count):
            raise DatasetError(f"{path}: the header's legacy point count {legacy} and its LAS "
                               f"1.4 point count {count} disagree; the header is damaged")
        if n_evlrs and (first_evlr > size or n_evlrs * EVLR_HEADER > size - first_evlr):
            raise DatasetError(f"{path}: the header counts {n_evlrs} extended VLRs from byte "
                               f"{first_evlr}, more than the {size}-byte file holds")
        if n_evlrs:
            _check_evlrs(path, first_evlr, n_evlrs, offset_to_points, size)
        if n_evlrs and first_evlr < end:
            end, what = first_evlr, "the extended VLRs"
    chunk_size, laz_vlr = _walk_vlrs(path, header_size, n_vlrs, offset_to_points)
    return Layout(header_size, offset_to_points, end, what, chunk_size, laz_vlr)


def _check_evlrs(path: Path, at: int, count: int, points: int, size: int) -> None:
    """The ``count`` EVLRs from byte ``at`` lie after the start of the points, one after the
    other, each inside the file (laspy reads each one's declared length whole)."""
    if at < points:
        raise DatasetError(f"{path}: the header places its {count} extended VLRs at byte {at}, "
                           f"before the point data (byte {points}); the header is damaged")
    with open(path, "rb") as f:
        for i in range(count):
            f.seek(at)
            raw = f.read(EVLR_HEADER)
            length = struct.unpack_from("<Q", raw, 20)[0] if len(raw) == EVLR_HEADER else None
            if length is None or length > size - at - EVLR_HEADER:
                raise DatasetError(
                    f"{path}: extended VLR {i} of {count} at byte {at} "
                    f"{'is cut short' if length is None else f'claims {length} bytes'}, more "
                    f"than the {size}-byte file holds; the file is truncated or damaged")
            user, record = struct.unpack_from("<16sH", raw, 2)
            _check_payload(path, f, f"extended VLR {i} of {count} at byte {at}", user, record,
                           at + EVLR_HEADER, length)
            at += EVLR_HEADER + length


def _user_id(raw: bytes, empty: bool = False) -> bool:
    """Whether a VLR header's 16-byte user id reads as one: printable ASCII up to its first
    NUL (what follows a NUL is not looked at: some writers leave bytes there), and not empty
    unless ``empty`` (laspy writes and reads a VLR with an empty user id; the bytes after the
    counted VLRs, often zero padding, must look more like a VLR to be taken for one)."""
    text = raw.split(b"\0", 1)[0]
    return (empty or bool(text.strip())) and all(0x20 <= c <= 0x7E for c in text)


#: VLRs whose payload laspy parses, by (user id, record id): a damaged one is dropped with only
#: a warning (the extra-bytes fields, the CRS), so it is refused here.
_EXTRA_BYTES = (b"LASF_Spec", 4)
_WKT = (b"LASF_Projection", 2112)
_GEOKEYS = (b"LASF_Projection", 34735)
_GEODOUBLES = (b"LASF_Projection", 34736)
#: Largest payload read to check it (a WKT VLR holds at most 64 KiB; an EVLR could hold more).
_MAX_CHECKED = 1 << 20


def _wkt_complete(text: str) -> bool:
    """Whether ``text`` reads as whole WKT: a keyword, then brackets that all close, outside
    quoted strings (a WKT cut short leaves some open)."""
    depth, quoted, opened = 0, False, False
    for c in text:
        if c == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif c in "[(":
            depth, opened = depth + 1, True
        elif c in "])":
            depth -= 1
            if depth < 0:
                return False
    return opened and depth == 0 and not quoted


def _check_payload(path: Path, f, where: str, user: bytes, record: int, at: int,
                   length: int) -> None:
    """Refuse a damaged payload of the (E)VLRs laspy would drop with only a warning: the
    extra-bytes descriptions (whole 192-byte records), the OGC WKT (UTF-8, complete), the
    GeoTIFF key directory (as many keys as it counts)."""
    key = (user.split(b"\0", 1)[0], record)
    if key not in (_EXTRA_BYTES, _WKT, _GEOKEYS, _GEODOUBLES):
        return
    if key == _EXTRA_BYTES:
        if length == 0 or length % 192:
            raise DatasetError(
                f"{path}: the extra-bytes VLR ({where}) holds {length} bytes, not a whole "
                f"number of 192-byte field descriptions; its length is damaged (the extra "
                f"fields would be lost)")
        return
    if key == _GEODOUBLES:
        if length % 8:
            raise DatasetError(f"{path}: the GeoTIFF double parameters ({where}) hold {length} "
                               f"bytes, not whole doubles; the CRS record is damaged")
        return
    f.seek(at)
    raw = f.read(min(length, _MAX_CHECKED))
    if key == _GEOKEYS:
        keys = struct.unpack_from("<H", raw, 6)[0] if len(raw) >= 8 else None
        if keys is None or length < 8 * (keys + 1):
            raise DatasetError(
                f"{path}: the GeoTIFF key directory ({where}) holds {length} bytes"
                + ("" if keys is None else f" for {keys} keys (needs {8 * (keys + 1)})")
                + "; the CRS record is damaged (the CRS would be lost)")
        return
    if length > _MAX_CHECKED:
        return
    try:
        text = raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: the OGC WKT CRS ({where}) is not UTF-8 text; the CRS "
                           f"record is damaged (the CRS would be lost)") from None
    if text.strip() and not _wkt_complete(text):
        raise DatasetError(f"{path}: the OGC WKT CRS ({where}, {length} bytes) is cut short or "
                           f"damaged: its brackets do not close (the CRS would be recorded "
                           f"wrong)")


def _walk_vlrs(path: Path, at: int, n_vlrs: int, stop: int) -> int | None:
    """Walk the header's ``n_vlrs`` VLRs from byte ``at``: each must read as a VLR header and
    end by ``stop`` (the point data), and no further VLR may lie in the bytes left before it
    (a damaged count or length would make laspy lose the CRS and the extra-bytes fields, or a
    point offset inside the VLRs would convert them as points, without a word). Returns the
    LASzip VLR's chunk size and payload (``None``: no LASzip VLR)."""
    chunk_size = laz_vlr = None
    with open(path, "rb") as f:
        for i in range(n_vlrs):
            f.seek(at)
            raw = f.read(VLR_HEADER)
            if len(raw) < VLR_HEADER:  # the count was checked to fit: a file cut meanwhile
                raise DatasetError(f"{path}: truncated inside VLR {i} of {n_vlrs} (byte {at})")
            user, record, length = struct.unpack_from("<16sHH", raw, 2)
            # an empty user id only with a record id or a payload: zeros are not a VLR
            if not _user_id(user, empty=bool(record or length)):
                raise DatasetError(
                    f"{path}: VLR {i} of {n_vlrs} at byte {at} is not a VLR header (user id "
                    f"{user!r}); the header size, the VLR count or a VLR's length is damaged")
            end = at + VLR_HEADER + length
            if end > stop:
                raise DatasetError(
                    f"{path}: VLR {i} of {n_vlrs} at byte {at} ({length} bytes) ends at byte "
                    f"{end}, past the start of the point data (byte {stop}); a VLR's length or "
                    f"the point data offset is damaged")
            if (user.rstrip(b"\0"), record) == _LASZIP and length >= _LASZIP_CHUNK_SIZE_AT + 4:
                f.seek(at + VLR_HEADER)
                laz_vlr = f.read(length)
                chunk_size = struct.unpack_from("<I", laz_vlr, _LASZIP_CHUNK_SIZE_AT)[0]
            _check_payload(path, f, f"VLR {i} of {n_vlrs} at byte {at}", user, record,
                           at + VLR_HEADER, length)
            at = end
        if stop - at >= VLR_HEADER:  # padding is allowed there; one more VLR is not
            f.seek(at)
            raw = f.read(VLR_HEADER)
            reserved, user, _, length = struct.unpack_from("<H16sHH", raw)
            if reserved in (0, 0xAABB) and _user_id(user) and at + VLR_HEADER + length <= stop:
                raise DatasetError(
                    f"{path}: the header counts {n_vlrs} VLRs, but another one "
                    f"({user.split(bytes(1), 1)[0].decode()!r}) lies at byte {at}, before the "
                    f"point data (byte {stop}); the VLR count is damaged")
    return chunk_size, laz_vlr


def check_points_fit(path: Path, lay: Layout, n: int, record: int) -> None:
    """Uncompressed points: ``n`` records of ``record`` bytes end before :attr:`Layout.point_end`
    (a LAS 1.4 count that runs into the EVLRs would read them as points)."""
    need = lay.point_start + n * record
    if need > lay.point_end:
        where = (f"the file holds {lay.point_end} bytes" if lay.point_end_what.startswith(
            "the end") else f"{lay.point_end_what} start at byte {lay.point_end}")
        raise DatasetError(
            f"{path}: {'truncated: ' if lay.point_end_what.startswith('the end') else ''}the "
            f"header promises {n} points of {record} bytes from byte {lay.point_start} "
            f"({need} bytes), but {where}"
        )
    held = (lay.point_end - lay.point_start) // record if record else 0
    if held > n:  # whole records beyond the count: converting n would drop them silently
        raise DatasetError(
            f"{path}: the header counts {n} points, but its point data (bytes "
            f"{lay.point_start}..{lay.point_end}, up to {lay.point_end_what}) holds {held} "
            f"records of {record} bytes; the point count is wrong or the file is damaged")


#: Largest uncompressed chunk (chunk size × record size) accepted whatever the file's size.
MAX_CHUNK_BYTES = 256 << 20
#: A chunk's points are accepted up to this many times the compressed bytes in bytes.
MAX_RATIO = 1000


def check_chunk_table(path: Path, lay: Layout, n: int, record: int) -> None:
    """A LAZ file's first 8 bytes of point data give the offset of its chunk table (-1 when the
    writer could not seek back: the offset is then the file's last 8 bytes); the table must lie
    after the compressed points and before the end of the point data, and its chunk count must
    fit both the bytes before it (each chunk takes at least one) and the point count
    (``ceil(n / chunk size)`` chunks at least; a file of no points may hold one empty chunk).
    Chunks of variable size (COPC) give each chunk's points in the table: each must fit the
    bytes it is compressed in, and together they must hold the header's count — lazrs
    allocates a chunk's points before decoding them."""
    start, end = lay.point_start, lay.point_end
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(8)
        if len(raw) < 8:
            raise DatasetError(f"{path}: truncated: the file ends at byte {end}, before the "
                               f"point data the header places at byte {start}")
        (table,) = struct.unpack("<q", raw)
        where = ""
        if table == -1:
            size = f.seek(0, 2)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
            (table,) = struct.unpack("<q", tail) if len(tail) == 8 else (-1,)
            where = " (from the file's last 8 bytes)"
        if not start + 8 <= table <= end - 8:
            raise DatasetError(f"{path}: the LAZ chunk table offset {table}{where} lies outside "
                               f"the compressed points (bytes {start + 8}..{end}); the file is "
                               f"truncated or damaged")
        f.seek(table)
        version, count = struct.unpack("<II", f.read(8))
    room = table - (start + 8)
    cs = lay.laz_chunk_size
    fixed = bool(cs) and cs != _VARIABLE_CHUNKS
    if fixed and cs * record > max(MAX_CHUNK_BYTES, MAX_RATIO * room):
        raise DatasetError(
            f"{path}: the LASzip VLR's chunk size {cs} points ({cs * record} bytes "
            f"uncompressed) cannot come from {room} bytes of compressed data; the file is "
            f"damaged")
    least = -(-n // cs) if fixed else (1 if n else 0)
    most = room if n else max(room, 1)  # no points: one empty chunk is allowed
    if not fixed:
        most = min(most, n + 1)  # each chunk holds a point, but for an empty last one
    if version != 0 or count > most or count < least:
        raise DatasetError(
            f"{path}: the LAZ chunk table at byte {table} (version {version}) counts {count} "
            f"chunks; {n} points{f' in chunks of {cs}' if fixed else ''} "
            f"in {room} bytes of compressed data need {least}..{most}; the file is damaged"
        )
    if fixed and count > 1 and n <= (count - 1) * cs:
        # every chunk but the last holds cs points: converting n would drop the rest silently
        raise DatasetError(
            f"{path}: the header counts {n} points, but its LAZ chunk table counts {count} "
            f"chunks of {cs} points, so the file holds at least {(count - 1) * cs + 1}; the "
            f"point count is wrong or the file is damaged")
    if not fixed and count and lay.laz_vlr is not None:
        _check_variable_chunks(path, lay, n, record, room)


def _check_variable_chunks(path: Path, lay: Layout, n: int, record: int, room: int) -> None:
    """Each chunk of a variable-size chunk table: its points fit the bytes it is compressed in
    (as for a fixed chunk size), its bytes lie before the table, and the chunks hold at least
    the header's count."""
    import lazrs

    with guard(path, "reading the LAZ chunk table"):
        vlr = lazrs.LazVlr(lay.laz_vlr)
        with open(path, "rb") as f:
            f.seek(lay.point_start)
            entries = [(int(p), int(b)) for p, b in lazrs.read_chunk_table(f, vlr)]
    points = used = 0
    for i, (pts, nbytes) in enumerate(entries):
        if pts * record > max(MAX_CHUNK_BYTES, MAX_RATIO * nbytes):
            raise DatasetError(
                f"{path}: LAZ chunk {i} of {len(entries)} claims {pts} points ({pts * record} "
                f"bytes uncompressed) in {nbytes} bytes of compressed data; the chunk table is "
                f"damaged")
        points += pts
        used += nbytes
    if used > room + 8:
        raise DatasetError(
            f"{path}: the LAZ chunk table's {len(entries)} chunks take {used} bytes, more than "
            f"the {room + 8} bytes of compressed data before it; the chunk table is damaged")
    if points < n:
        raise DatasetError(
            f"{path}: the header counts {n} points, but the LAZ chunk table's {len(entries)} "
            f"chunks hold {points}; the file is truncated or damaged")


@contextlib.contextmanager
def guard(path: Path, what: str, done: list[int] | None = None):
    """Every failure of laspy/lazrs inside the block becomes one error naming ``path``:
    a lazrs panic a :class:`ConversionError`, anything else a :class:`DatasetError`.
    ``done``: a list holding the points read so far, then optionally the points being read and
    the points the header promises (said in the message)."""
    try:
        yield
    except (GDSStreamError, GeneratorExit, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # lazrs' PanicException derives from BaseException
        after = f" after the first {done[0]} points" if done else ""
        if done and len(done) == 3 and done[1]:  # whole batches are read: say which
            first, count, promised = done
            after = (f" (points {first:,}..{first + count - 1:,} of the {promised:,} the header "
                     f"promises)")
        if not isinstance(exc, Exception):
            raise ConversionError(f"{path}: lazrs failed {what}{after} ({why(exc)}); the file "
                                  f"is damaged") from exc
        more = (", or its header counts more points than it holds"
                if done and len(done) == 3 else "")
        raise DatasetError(f"{path}: {what}{after} failed ({why(exc)}); the file is damaged or "
                           f"truncated{more}") from exc


def read_header(path: Path):
    """laspy's header of ``path`` (guarded)."""
    laspy = laspy_module()
    with guard(path, "reading the header"):
        with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
            return reader.header


def read_points(path: Path, per: int, limit: int | None = None) -> Iterator:
    """laspy's point records of ``path``, ``per`` at a time (at most ``limit`` in all), read
    with lazrs on every core; any failure is one error naming the file (see :func:`guard`)."""
    laspy = laspy_module()
    done = [0]
    with guard(path, "reading the points", done):
        with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
            promised = int(reader.header.point_count)
            done += [min(per, promised), promised]
            for points in reader.chunk_iterator(per):
                k = len(points)
                if k == 0:
                    break
                if limit is not None and done[0] + k > limit:
                    points = points[:limit - done[0]]
                    k = len(points)
                done[0] += k
                done[1] = min(per, promised - done[0])
                yield points
                if limit is not None and done[0] >= limit:
                    break


def laspy_module():
    try:
        import laspy
    except ImportError:  # pragma: no cover - laspy is a dependency
        raise ConversionError("LAS/LAZ input needs laspy and lazrs: pip install 'laspy[lazrs]'")
    return laspy


def why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
