"""Raw input: a headerless ``.bin`` of N records of F values of one dtype, named by the caller."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConversionError, DatasetError
from ..format import FieldSpec, stored_dtype
from . import common
from .common import Source, file_size, readinto_exact, select


class RawSource(Source):
    def __init__(self, path: Path, raw_fields: Sequence[str], dtype: np.dtype,
                 fields: Sequence[str] | None):
        size = file_size(path)
        rec = len(raw_fields) * dtype.itemsize
        if size % rec:
            raise DatasetError(
                f"{path}: {size} bytes is not a multiple of the record size {rec} "
                f"({len(raw_fields)} fields × {dtype.itemsize} bytes of {dtype.name})"
            )
        available = [FieldSpec(k, stored_dtype(dtype)) for k in raw_fields]
        schema = select(path, available, fields, "raw field")
        super().__init__(path, "raw", schema, size // rec, size)
        self.dtype = dtype
        self.raw_fields = list(raw_fields)

    def chunks(self):
        width = len(self.raw_fields)
        per = common.chunk_rows(width * self.dtype.itemsize)
        buf = np.empty((min(per, self.num_points), width), dtype=self.dtype)
        index = {k: j for j, k in enumerate(self.raw_fields)}
        with open(self.path, "rb") as f:
            done = 0
            while done < self.num_points:
                n = min(per, self.num_points - done)
                b = buf[:n]
                readinto_exact(f, memoryview(b).cast("B"), self.path)
                yield {s.name: b[:, index[s.name]] for s in self.schema}, b.nbytes
                done += n


def raw_dtype(raw_dtype: str) -> np.dtype:
    try:
        dt = np.dtype(raw_dtype)
    except TypeError:
        raise ConversionError(f"--raw-dtype {raw_dtype!r} is not a numpy dtype") from None
    stored_dtype(dt, f"--raw-dtype {raw_dtype!r}")
    return dt
