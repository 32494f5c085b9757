"""Compose (a pipeline of transforms) and ToPointcept (the dict a Pointcept model takes)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import LoaderError
from ._batch import Batch, coord_names, get_coord, require
from .geometry import XYZ


class Compose:
    """Apply ``transforms`` in order, each with the same generator. A transform that returns a
    list of batches (``GridSample(mode="test")``) has the rest applied to each part, and the
    composition returns that list."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise LoaderError(f"Compose: every transform must be callable, got {t!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None):
        items, listed = [batch], False
        for t in self.transforms:
            done = []
            for b in items:
                r = t(b, generator)
                if isinstance(r, list):
                    listed = True
                    done.extend(r)
                else:
                    done.append(r)
            items = done
        return items if listed else items[0]

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class ToPointcept:
    """The batch as a Pointcept model takes it: ``coord`` (n, 3) float32, ``feat`` (n, k)
    float32 (the ``feat`` fields column-wise; ``"coord"`` stands for the three coordinates),
    ``segment`` int64 (omitted when ``segment=None``), ``offset`` int64 (``[n]`` for a batch
    without one), ``grid_coord`` when a GridSample added it, and the ``keep`` keys unchanged."""

    def __init__(self, coord: str | Sequence[str] = XYZ, feat: Sequence[str] | None = None,
                 segment: str | None = "classification", keep: Sequence[str] = ()):
        self.coord = coord_names(coord, "ToPointcept")
        self.feat = ("coord",) if feat is None else ((feat,) if isinstance(feat, str)
                                                     else tuple(feat))
        if not self.feat:
            raise LoaderError("ToPointcept: feat must name at least one field")
        self.segment = segment
        self.keep = tuple(keep)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz = get_coord(batch, self.coord, "ToPointcept").to(torch.float32)
        n = xyz.shape[0]
        # row-major (n, 3) and (n, k), as a model takes them, from columns (the transforms pass
        # coordinates planar: stacking their columns is ~6x faster than a transposing copy)
        xs = list(xyz.unbind(1))
        cols = []
        for name in self.feat:
            if name == "coord":
                cols += xs
                continue
            v = require(batch, name, "ToPointcept", "feat")
            if v.shape[0] != n or v.dim() > 2:
                raise LoaderError(f"ToPointcept: feat field {name!r} must be (n,) or (n, k) with "
                                  f"n = {n}, got shape {tuple(v.shape)}")
            cols += list(v.to(torch.float32).reshape(n, -1).unbind(1))
        xyz = torch.stack(xs, 1)
        feat = torch.stack(cols, 1) if cols else xyz.new_zeros((n, 0))
        out = {"coord": xyz, "feat": feat}
        if self.segment is not None:
            out["segment"] = require(batch, self.segment, "ToPointcept", "segment").to(
                torch.int64)
        off = batch.get("offset")
        out["offset"] = (off if off is not None
                         else torch.tensor([n], dtype=torch.int64, device=xyz.device))
        if "grid_coord" in batch:
            out["grid_coord"] = batch["grid_coord"]
        for k in self.keep:
            out[k] = require(batch, k, "ToPointcept", "keep")
        return out

    def __repr__(self) -> str:
        return (f"ToPointcept(coord={self.coord!r}, feat={self.feat!r}, "
                f"segment={self.segment!r}, keep={self.keep!r})")
