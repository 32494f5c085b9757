"""Local field files: positioned reads on the descriptors a :class:`Dataset` pinned."""

from __future__ import annotations

import os

from .._lifetime import FieldFiles


class LocalFiles(FieldFiles):
    """:class:`~gds_stream._lifetime.FieldFiles` (duplicated descriptors of the dataset's
    snapshot) with the storage read interface on top."""

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        from .._lifetime import pread_into

        pread_into(self.fd(name), view, offset, self.path(name))

    def size(self, name: str) -> int:
        return os.fstat(self.fd(name)).st_size

    def identity(self, name: str) -> tuple[int, int]:
        st = os.fstat(self.fd(name))
        return st.st_dev, st.st_ino
