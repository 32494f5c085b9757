"""Pointcept's point-cloud transforms, batched over every unit of a batch, on its device.

A transform takes and returns a batch — ``dict[str, torch.Tensor]`` with ``offset`` (int64
cumulative ends of its units: chunks or scans; a batch without ``offset`` is one unit) — and is
called as ``transform(batch, generator=None)``. Inside a loader (``open_loader(...,
transform=...)``) the generator is the loader's per-step generator on the batch's device, seeded
from (seed, epoch, rank, step), so a transformed epoch is reproducible and resumable; standalone,
``generator=None`` draws from torch's default generator.

Coordinates are read from the fields named by ``coord`` (default ``("x", "y", "z")``, or one
(n, 3) field), computed in float64 if any of them is float64, else float32, and written back in
each field's own dtype. Every per-point field (first dimension = the point count: labels,
intensity, ids, ``grid_coord``...) follows the selected points; ``offset`` is rewritten; ``chunk``
(one id per unit) and ``inverse`` are carried unchanged. Each unit is transformed as Pointcept
transforms one sample; the batch is processed by segment-aware tensor operations, never by a
Python loop over units.
"""

from .compose import Compose, ToPointcept
from .elastic import ElasticDistortion
from .geometry import (CenterShift, NormalizeColor, RandomFlip, RandomJitter, RandomRotate,
                       RandomScale, Transform)
from .sampling import GridSample, RandomDropout, SphereCrop

__all__ = [
    "Compose",
    "ToPointcept",
    "Transform",
    "GridSample",
    "SphereCrop",
    "RandomDropout",
    "CenterShift",
    "RandomRotate",
    "RandomScale",
    "RandomFlip",
    "RandomJitter",
    "ElasticDistortion",
    "NormalizeColor",
]
