"""SemanticKITTI input: ``.bin`` frames of N×4 float32 (x, y, z, remission), with the labels
of a ``.label`` file (uint32: semantic class in the low 16 bits, instance in the high 16) where
one is found beside the frame or in the dataset's ``labels/`` directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError
from ..format import FieldSpec
from . import common
from .common import Source, file_size, readinto_exact, select

KITTI_FIELDS = ("x", "y", "z", "remission")
KITTI_LABEL_FIELDS = ("sem_class", "ins_class")


class KittiSource(Source):
    POINT = np.dtype("<f4")
    LABEL = np.dtype("<u4")

    def __init__(self, path: Path, fields: Sequence[str] | None):
        size = file_size(path)
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
        schema = select(path, available, fields, "SemanticKITTI field")
        super().__init__(path, "kitti", schema, n, size + (label.stat().st_size if label else 0),
                         info, note)
        self.label = label

    def chunks(self):
        per = common.chunk_rows(16 + 4)
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
                readinto_exact(f, memoryview(p).cast("B"), self.path)
                cols = {k: p[:, j] for j, k in enumerate(KITTI_FIELDS) if k in names}
                consumed = p.nbytes
                if want_labels:
                    lab = labs[:n]
                    readinto_exact(g, memoryview(lab).cast("B"), self.label)
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
