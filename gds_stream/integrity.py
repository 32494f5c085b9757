"""Optional read verification (``verify_reads=True``): the crc32 of every checksum block a batch
touches is recomputed before the batch is handed out.

The manifest keeps one crc32 per ``block_bytes`` (4 MiB by default) of each field. A batch's point
ranges rarely cover whole blocks, so :class:`BlockVerifier` reads every touched block *whole* a
second time, with positioned reads of its own, and compares. The cost: the verified bytes are at
least the batch's bytes and up to ``block_bytes`` more per range end (small shuffled ranges can
read several times the batch), plus a crc32 over them (~1-2 GB/s per thread). A mismatch is a
:class:`DatasetError` naming the file, the field, the block, its byte range and both checksums.

The check reads the file, not the batch's memory: it proves the stored blocks still hold what
was written, which is what a silently corrupted or replaced file breaks. An object-store
dataset's blocks are read again with ranged GETs (:mod:`gds_stream.storage`), through the block
cache when there is one (which then proves the cached copy).
"""

from __future__ import annotations

import logging
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._lifetime import FieldFiles, pread_into
from .errors import DatasetError
from .format import Dataset, FieldSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Field:
    name: str
    point_bytes: int
    offset: int  # file offset of the field's first byte
    nbytes: int
    checksums: tuple[int, ...]
    fd: int | None  # None: an object-store reader, read through its read_into
    path: str


class BlockVerifier:
    """Recompute the block checksums that point ranges touch. Thread-safe: workers call
    :meth:`check` concurrently (positioned reads, a buffer per thread).

    ``files``: descriptors to read through (the loader's); without them the verifier opens its
    own and :meth:`close` closes them.
    """

    def __init__(self, dataset: Dataset, specs: Sequence[FieldSpec],
                 files: FieldFiles | None = None):
        self.block_bytes = dataset.block_bytes
        self._own = files is None
        self._files = FieldFiles(dataset, [s.name for s in specs]) if files is None else files
        self._fields = []
        for s in specs:
            lay = dataset.layout(s.name)
            fd = None if getattr(self._files, "remote", False) else self._files.fd(s.name)
            self._fields.append(_Field(s.name, s.point_bytes, lay.offset, lay.nbytes,
                                       lay.checksums, fd, self._files.path(s.name)))
        self._local = threading.local()
        self._lock = threading.Lock()
        self.blocks_checked = 0
        self.bytes_checked = 0

    def _buffer(self) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(self.block_bytes, dtype=np.uint8)
        return buf

    def blocks(self, segments: np.ndarray, point_bytes: int) -> np.ndarray:
        """Sorted indices of the checksum blocks that point ranges ``segments`` touch."""
        seg = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
        seg = seg[seg[:, 1] > seg[:, 0]]
        if len(seg) == 0:
            return np.zeros(0, dtype=np.int64)
        first = seg[:, 0] * point_bytes // self.block_bytes
        last = (seg[:, 1] * point_bytes - 1) // self.block_bytes
        return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))

    def check(self, segments: np.ndarray) -> None:
        """Raise :class:`DatasetError` if a block that ``segments`` ((k, 2) point ranges) touch
        no longer matches its manifest checksum."""
        buf = self._buffer()
        blocks = nbytes = 0
        for f in self._fields:
            for b in self.blocks(segments, f.point_bytes):
                start = int(b) * self.block_bytes
                n = min(self.block_bytes, f.nbytes - start)
                view = memoryview(buf)[:n]
                if f.fd is None:  # object storage: ranged GETs (retries, ETag checked)
                    self._files.read_into(f.name, f.offset + start, view)
                else:
                    pread_into(f.fd, view, f.offset + start, f.path)
                found = zlib.crc32(view)
                want = f.checksums[int(b)]
                if found != want:
                    raise DatasetError(
                        f"{f.path}: field {f.name!r} block {int(b)} (field bytes "
                        f"{start}..{start + n}, file offset {f.offset + start}) has crc32 "
                        f"{found:#010x}, expected {want:#010x}: the file changed since it was "
                        f"written")
                blocks += 1
                nbytes += n
        with self._lock:
            self.blocks_checked += blocks
            self.bytes_checked += nbytes

    def close(self) -> None:
        if self._own:
            self._files.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"blocks_checked": self.blocks_checked, "bytes_checked": self.bytes_checked}
