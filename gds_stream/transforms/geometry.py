"""Per-unit coordinate augmentations: CenterShift, RandomRotate, RandomScale, RandomFlip,
RandomJitter, NormalizeColor — Pointcept's semantics and defaults, batched over every unit.

Each random draw is made once per unit (or per point) for the whole batch, from the generator
passed to ``__call__`` (the loader's per-step generator; torch's default one when ``None``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import LoaderError
from ._batch import (Batch, Units, check_pair, check_range, coord_names, get_coord, num_points,
                     planar, rand, randn, require, segment_bbox, set_coord)

XYZ = ("x", "y", "z")


class Transform:
    """Base: ``transform(batch, generator=None) -> batch``; the batch is not modified in place."""

    def __init__(self, coord: str | Sequence[str] = XYZ):
        self.coord = coord_names(coord, type(self).__name__)

    @property
    def who(self) -> str:
        return type(self).__name__

    def _setup(self, batch: Batch) -> tuple[torch.Tensor, Units]:
        n = num_points(batch, self.coord, self.who)
        xyz = get_coord(batch, self.coord, self.who)
        return xyz, Units(batch, n, xyz.device, self.who)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.who}({args})"


class CenterShift(Transform):
    """Per unit, move the bounding box's x, y centre to 0 and (``apply_z``) its lowest z to 0."""

    def __init__(self, apply_z: bool = True, coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        self.apply_z = bool(apply_z)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, units = self._setup(batch)
        lo, hi = segment_bbox(xyz, units)
        shift = (lo + hi) / 2
        shift[:, 2] = lo[:, 2] if self.apply_z else 0
        return set_coord(batch, self.coord, xyz - units.expand(shift, like=xyz))


class RandomRotate(Transform):
    """Per unit with probability ``p`` (1 with ``always_apply``): rotate by an angle drawn from
    ``angle`` × π (default [-1, 1]) about ``axis`` through ``center`` (default: the unit's
    bounding-box centre)."""

    def __init__(self, angle: Sequence[float] | None = None, center: Sequence[float] | None = None,
                 axis: str = "z", always_apply: bool = False, p: float = 0.5,
                 coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        self.angle = check_pair(self.who, "angle", [-1, 1] if angle is None else angle)
        if axis not in ("x", "y", "z"):
            raise LoaderError(f"{self.who}: axis must be 'x', 'y' or 'z', got {axis!r}")
        self.axis = axis
        check_range(self.who, "p", p, 0, 1)
        self.p = 1.0 if always_apply else float(p)
        if center is not None:
            try:
                center = tuple(float(c) for c in center)
            except (TypeError, ValueError):
                center = ()
            if len(center) != 3:
                raise LoaderError(f"{self.who}: center must be three numbers or None")
        self.center = center

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, units = self._setup(batch)
        dev, u = xyz.device, units.num
        apply = rand(u, generator, dev) <= self.p
        a0, a1 = self.angle
        theta = (a0 + (a1 - a0) * rand(u, generator, dev)) * math.pi
        # units left alone rotate by 0 about 0: x·1 − y·0 + 0 is x exactly, no select needed
        cos = torch.where(apply, torch.cos(theta), 1.0).to(xyz.dtype)
        sin = torch.where(apply, torch.sin(theta), 0.0).to(xyz.dtype)
        i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[self.axis]
        c, s = units.expand(cos), units.expand(sin)
        if self.center is not None and not any(self.center):
            p, center = xyz, None                              # about the origin: as it is
        else:
            if self.center is None:
                lo, hi = segment_bbox(xyz, units)
                center = (lo + hi) / 2
            else:
                center = torch.tensor(self.center, dtype=xyz.dtype, device=dev).expand(u, 3)
            center = units.expand(torch.where(apply[:, None], center, 0.0), like=xyz)
            p = xyz - center
        out = torch.empty_like(p)                              # p's layout (planar or rows)
        k = 3 - i - j
        out[:, k] = p[:, k]
        torch.mul(c, p[:, i], out=out[:, i]).addcmul_(s, p[:, j], value=-1)
        torch.mul(s, p[:, i], out=out[:, j]).addcmul_(c, p[:, j])
        if center is not None:
            out += center
        return set_coord(batch, self.coord, out)


class RandomScale(Transform):
    """Per unit, multiply the coordinates by a factor drawn from ``scale`` (default
    [0.95, 1.05]); one factor per axis with ``anisotropic``."""

    def __init__(self, scale: Sequence[float] | None = None, anisotropic: bool = False,
                 coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        self.scale = check_pair(self.who, "scale", [0.95, 1.05] if scale is None else scale)
        self.anisotropic = bool(anisotropic)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, units = self._setup(batch)
        lo, hi = self.scale
        r = rand((units.num, 3 if self.anisotropic else 1), generator, xyz.device)
        factor = (lo + (hi - lo) * r).to(xyz.dtype)
        if not self.anisotropic:                  # one factor per point, broadcast over axes
            return set_coord(batch, self.coord, xyz * units.expand(factor[:, 0])[:, None])
        return set_coord(batch, self.coord, xyz * units.expand(factor, like=xyz))


class RandomFlip(Transform):
    """Per unit, negate x with probability ``p`` and, independently, y with probability ``p``."""

    def __init__(self, p: float = 0.5, coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        check_range(self.who, "p", p, 0, 1)
        self.p = float(p)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, units = self._setup(batch)
        flip = rand((units.num, 2), generator, xyz.device) < self.p
        sign = torch.ones((units.num, 3), dtype=xyz.dtype, device=xyz.device)
        sign[:, :2] = torch.where(flip, -1.0, 1.0).to(xyz.dtype)
        return set_coord(batch, self.coord, xyz * units.expand(sign, like=xyz))


class RandomJitter(Transform):
    """Add to every coordinate ``sigma`` × N(0, 1) noise clipped to ±``clip``."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05, coord: str | Sequence[str] = XYZ):
        super().__init__(coord)
        check_range(self.who, "sigma", sigma, 0)
        check_range(self.who, "clip", clip, 0, lo_open=True)
        self.sigma, self.clip = float(sigma), float(clip)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        xyz, _ = self._setup(batch)
        # drawn in xyz's layout (planar: x's noise, then y's, then z's); the noise is the output
        out = randn(torch.empty(xyz.shape[::-1] if planar(xyz) else xyz.shape,
                                device=xyz.device, dtype=xyz.dtype), generator)
        out = out.t() if planar(xyz) else out
        out.mul_(self.sigma).clamp_(-self.clip, self.clip).add_(xyz)
        return set_coord(batch, self.coord, out)


class NormalizeColor:
    """Divide the colour fields by 255 (float32 out; float64 stays float64)."""

    def __init__(self, color: str | Sequence[str] = ("red", "green", "blue")):
        self.color = (color,) if isinstance(color, str) else tuple(color)
        if not self.color or not all(isinstance(c, str) and c for c in self.color):
            raise LoaderError(f"NormalizeColor: color must name one or more fields, got {color!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        out = dict(batch)
        for name in self.color:
            v = require(batch, name, "NormalizeColor", "color")
            dt = torch.float64 if v.dtype == torch.float64 else torch.float32
            out[name] = v.to(dt) / 255
        return out

    def __repr__(self) -> str:
        return f"NormalizeColor(color={self.color!r})"
