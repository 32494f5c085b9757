"""A per-sample numpy reference of Pointcept's transforms (``pointcept/datasets/transform.py``),
one sample (unit) at a time, as Pointcept-style DataLoader workers run them.

Written from Pointcept's semantics, not copied; scipy-free (the box filter and the trilinear
interpolation of ElasticDistortion are written out in numpy). Deliberate choices, each
also made by :mod:`gds_stream.transforms` so that deterministic results can be compared:
sorts are stable (Pointcept's ``np.argsort`` is not, so the order of points inside a voxel, and
so test-mode parts, would be implementation-defined), and GridSample divides in float64.
Train-mode GridSample picks as Pointcept does (``randint(0, count.max()) % count``).

A sample is a dict: ``coord`` (n, 3) float array, any other per-point arrays (first dimension
n), and optionally ``color`` (n, 3). Every transform is ``t(sample, rng) -> sample`` with a
``numpy.random.Generator``. Used by the benchmark's per-sample baseline and by the tests.
"""

from __future__ import annotations

import numpy as np

FNV_BASIS = np.uint64(14695981039346656037)
FNV_PRIME = np.uint64(1099511628211)


def index_operator(sample: dict, idx: np.ndarray) -> dict:
    n = len(sample["coord"])
    return {k: (v[idx] if isinstance(v, np.ndarray) and v.ndim and len(v) == n else v)
            for k, v in sample.items()}


def fnv_hash(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.uint64)
    h = np.full(arr.shape[0], FNV_BASIS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(arr.shape[1]):
            h = np.bitwise_xor(h * FNV_PRIME, arr[:, j])
    return h


def ravel_hash(arr: np.ndarray) -> np.ndarray:
    arr = (arr - arr.min(0)).astype(np.uint64)
    dims = arr.max(0).astype(np.uint64) + np.uint64(1)
    keys = np.zeros(arr.shape[0], dtype=np.uint64)
    for j in range(arr.shape[1] - 1):
        keys = (keys + arr[:, j]) * dims[j + 1]
    return keys + arr[:, -1]


class CenterShift:
    def __init__(self, apply_z=True):
        self.apply_z = apply_z

    def __call__(self, s, rng):
        lo, hi = s["coord"].min(0), s["coord"].max(0)
        shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2,
                          lo[2] if self.apply_z else 0], dtype=s["coord"].dtype)
        s["coord"] = s["coord"] - shift
        return s


class RandomRotate:
    def __init__(self, angle=None, center=None, axis="z", always_apply=False, p=0.5):
        self.angle = [-1, 1] if angle is None else angle
        self.center, self.axis = center, axis
        self.p = 1 if always_apply else p

    def __call__(self, s, rng):
        if rng.random() > self.p:
            return s
        a = rng.uniform(self.angle[0], self.angle[1]) * np.pi
        c, si = np.cos(a), np.sin(a)
        rot = {"x": [[1, 0, 0], [0, c, -si], [0, si, c]],
               "y": [[c, 0, si], [0, 1, 0], [-si, 0, c]],
               "z": [[c, -si, 0], [si, c, 0], [0, 0, 1]]}[self.axis]
        xyz = s["coord"]
        center = (xyz.min(0) + xyz.max(0)) / 2 if self.center is None else np.asarray(self.center)
        s["coord"] = ((xyz - center) @ np.array(rot).T + center).astype(xyz.dtype)
        return s


class RandomScale:
    def __init__(self, scale=None, anisotropic=False):
        self.scale = [0.95, 1.05] if scale is None else scale
        self.anisotropic = anisotropic

    def __call__(self, s, rng):
        f = rng.uniform(self.scale[0], self.scale[1], 3 if self.anisotropic else 1)
        s["coord"] = (s["coord"] * f).astype(s["coord"].dtype)
        return s


class RandomFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, s, rng):
        for axis in (0, 1):
            if rng.random() < self.p:
                s["coord"] = s["coord"].copy()
                s["coord"][:, axis] = -s["coord"][:, axis]
        return s


class RandomJitter:
    def __init__(self, sigma=0.01, clip=0.05):
        self.sigma, self.clip = sigma, clip

    def __call__(self, s, rng):
        j = np.clip(self.sigma * rng.standard_normal((len(s["coord"]), 3)), -self.clip, self.clip)
        s["coord"] = (s["coord"] + j).astype(s["coord"].dtype)
        return s


class NormalizeColor:
    def __call__(self, s, rng):
        if "color" in s:
            s["color"] = s["color"] / 255
        return s


def _box3(a: np.ndarray, axis: int) -> np.ndarray:
    """(a[i-1] + a[i] + a[i+1]) / 3 along ``axis``, zero outside (scipy's constant mode)."""
    out = a.copy()
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis], hi[axis] = slice(1, None), slice(None, -1)
    out[tuple(lo)] += a[tuple(hi)]
    out[tuple(hi)] += a[tuple(lo)]
    return out / np.float32(3)


def elastic_distortion(coords, granularity, magnitude, rng, noise=None):
    """One (granularity, magnitude) pass; ``noise`` (dims + (3,), float32) replaces the draw."""
    cmin = coords.min(0)
    dims = ((coords - cmin).max(0) // granularity).astype(int) + 3
    if noise is None:
        noise = rng.standard_normal((*dims, 3)).astype(np.float32)
    for _ in range(2):
        for axis in range(3):
            noise = _box3(noise, axis)
    # trilinear interpolation on the grid lo - granularity + k * granularity, k < dims
    t = (coords.astype(np.float64) - cmin) / granularity + 1
    i0 = np.minimum(np.floor(t).astype(np.int64).clip(min=0), dims - 2)
    w = (t - i0).astype(np.float32)
    out = np.zeros((len(coords), 3), np.float32)
    for c in np.ndindex(2, 2, 2):
        wt = np.prod([w[:, a] if c[a] else 1 - w[:, a] for a in range(3)], axis=0)
        out += wt[:, None] * noise[i0[:, 0] + c[0], i0[:, 1] + c[1], i0[:, 2] + c[2]]
    return (coords + out * magnitude).astype(coords.dtype)


class ElasticDistortion:
    def __init__(self, distortion_params=None):
        self.distortion_params = ([[0.2, 0.4], [0.8, 1.6]] if distortion_params is None
                                  else distortion_params)

    def __call__(self, s, rng):
        if rng.random() < 0.95:
            for g, m in self.distortion_params:
                s["coord"] = elastic_distortion(s["coord"], g, m, rng)
        return s


class GridSample:
    def __init__(self, grid_size=0.05, hash_type="fnv", mode="train", return_grid_coord=False):
        self.grid_size, self.mode = grid_size, mode
        self.hash = fnv_hash if hash_type == "fnv" else ravel_hash
        self.return_grid_coord = return_grid_coord

    def voxels(self, s):
        grid = np.floor(s["coord"].astype(np.float64) / self.grid_size).astype(np.int64)
        grid -= grid.min(0)
        key = self.hash(grid)
        order = np.argsort(key, kind="stable")
        _, count = np.unique(key[order], return_counts=True)
        return grid, order, count

    def __call__(self, s, rng):
        if len(s["coord"]) == 0:
            return s if self.mode == "train" else [dict(s, index=np.zeros(0, np.int64))]
        grid, order, count = self.voxels(s)
        start = np.cumsum(np.insert(count, 0, 0)[:-1])
        if self.mode == "train":
            idx = order[start + rng.integers(0, count.max(), count.size) % count]
            out = index_operator(s, idx)
            if self.return_grid_coord:
                out["grid_coord"] = grid[idx]
            return out
        parts = []
        for i in range(count.max()):
            idx = order[start + i % count]
            part = index_operator(s, idx)
            part["index"] = idx
            if self.return_grid_coord:
                part["grid_coord"] = grid[idx]
            parts.append(part)
        return parts


class SphereCrop:
    def __init__(self, point_max=80000, sample_rate=None, mode="random"):
        self.point_max, self.sample_rate, self.mode = point_max, sample_rate, mode

    def __call__(self, s, rng):
        n = len(s["coord"])
        k = int(self.sample_rate * n) if self.sample_rate is not None else self.point_max
        if n <= k:
            return s
        c = s["coord"][rng.integers(n) if self.mode == "random" else n // 2]
        d = s["coord"] - c
        dist = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2]
        return index_operator(s, np.argsort(dist, kind="stable")[:k])


class RandomDropout:
    def __init__(self, dropout_ratio=0.2, dropout_application_ratio=0.5):
        self.ratio, self.p = dropout_ratio, dropout_application_ratio

    def __call__(self, s, rng):
        if rng.random() < self.p:
            n = len(s["coord"])
            s = index_operator(s, rng.choice(n, int(n * (1 - self.ratio)), replace=False))
        return s


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, s, rng):
        for t in self.transforms:
            s = t(s, rng)
        return s


def collate(samples: list[dict]) -> dict:
    """Pointcept's point collate: concatenate every array, ``offset`` = cumulative sizes."""
    out = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    out["offset"] = np.cumsum([len(s["coord"]) for s in samples]).astype(np.int64)
    return out
