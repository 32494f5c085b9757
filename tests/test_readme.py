"""Every code block of the README runs as written.

The blocks are executed in README order in one scratch directory that holds ``tiles/`` —
DALES-like aerial tiles in metres (PLY: x, y, z, intensity, sem_class; a few tiles of 100–150 m
at 10–15 points/m², terrain, buildings and vegetation), so sizes such as ``--chunk-size 25`` mean
what they mean on real data — each ```python block as a script, and each ```bash block whose
commands are ``gds-stream`` invocations through a shell. Every block runs, then every block runs
again: an example pasted twice must work twice (no "output directory is not empty").
The two blocks that set up an environment (pip) and run the full benchmark are exercised
elsewhere — CI runs the same install commands (``.ci/run``) and ``tests/test_bench.py`` runs
every benchmark variant — so here they are only checked to be exactly those commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
#: Commands a bash block may hold that this test does not run (see the module docstring).
NOT_RUN = ("python3 -m venv", "pip install", "python -m bench.compare", "python -m pytest")
#: DALES-like tiles: (west, south) corner and edge in metres, points per m².
TILES = ((0.0, 0.0, 150.0, 10.0), (150.0, 0.0, 150.0, 15.0), (0.0, 150.0, 100.0, 12.0))
TILE_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<u2"),
                       ("sem_class", "u1")])


def write_dales_like_tile(path: Path, x0: float, y0: float, edge: float, density: float,
                          seed: int) -> int:
    """A binary PLY tile of ``edge`` × ``edge`` metres at ``density`` points/m²: rolling ground
    (~100 m above the datum), buildings (8–20 m blocks), trees and low vegetation, with DALES
    classes (1 ground, 2 vegetation, 8 buildings) and intensities. Returns the point count."""
    rng = np.random.default_rng(seed)
    n = int(edge * edge * density)
    x = rng.random(n) * edge + x0
    y = rng.random(n) * edge + y0
    ground = 100 + 3 * np.sin(x / 37) + 2 * np.cos(y / 53)
    cls = np.ones(n, dtype=np.uint8)
    z = ground + rng.normal(0, 0.05, n)
    block = ((x // 40).astype(int) * 7 + (y // 40).astype(int) * 3) % 5  # some 40 m blocks
    roof = (block == 0) & ((x % 40) < 25) & ((y % 40) < 20)
    cls[roof] = 8
    z[roof] = ground[roof] + 8 + 12 * ((x[roof] // 40 + y[roof] // 40) % 2)
    trees = ~roof & (rng.random(n) < 0.3)
    cls[trees] = 2
    z[trees] = ground[trees] + rng.random(trees.sum()) * 15
    rows = np.empty(n, dtype=TILE_DTYPE)
    rows["x"], rows["y"], rows["z"], rows["sem_class"] = x, y, z, cls
    rows["intensity"] = np.clip(rng.normal(40 + 5 * cls, 10), 0, 65535)
    head = (f"ply\nformat binary_little_endian 1.0\nelement vertex {n}\n"
            + "".join(f"property {t} {k}\n" for k, t in
                      (("x", "float"), ("y", "float"), ("z", "float"),
                       ("intensity", "ushort"), ("sem_class", "uchar")))
            + "end_header\n")
    with open(path, "wb") as f:
        f.write(head.encode("ascii"))
        rows.tofile(f)
    return n


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(README.read_text())]


def _commands(body: str) -> list[str]:
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _runnable_bash(body: str) -> bool:
    cmds = _commands(body)
    if all(c.startswith("gds-stream ") for c in cmds):
        return True
    for c in cmds:
        parts = [p.strip() for p in c.split("&&")]
        assert all(p.startswith(NOT_RUN) or p.startswith(". .venv") for p in parts), (
            f"README bash block runs something this test neither runs nor accounts for: {c!r}")
    return False


def test_readme_has_python_and_cli_examples():
    kinds = [k for k, _ in blocks()]
    assert "python" in kinds
    assert any(k == "bash" and _runnable_bash(b) for k, b in blocks())


def test_every_readme_block_runs_twice(tmp_path, request):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, (x0, y0, edge, density) in enumerate(TILES):
        write_dales_like_tile(tiles / f"tile_{i}.ply", x0, y0, edge, density, seed=i)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bindir = Path(sys.executable).parent
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    if any("s3://" in body for _, body in blocks()):  # "Object storage": a local S3 server
        from s3_fixtures import readme_env

        env.update(readme_env(request))
    ran = 0
    for round in (1, 2):
        for k, (kind, body) in enumerate(blocks()):
            if kind == "python":
                r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=300)
            elif kind == "bash" and _runnable_bash(body):
                r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path,
                                   env=env, capture_output=True, text=True, timeout=300)
            else:
                continue
            ran += 1
            assert r.returncode == 0, (f"README block {k} ({kind}) failed in round {round} with "
                                       f"exit {r.returncode}:\n{body}\n--- stderr ---\n"
                                       f"{r.stderr[-3000:]}")
    assert ran >= 4


def test_readme_tiles_are_dales_like_in_metres(tmp_path):
    n = write_dales_like_tile(tmp_path / "t.ply", 0.0, 0.0, 100.0, 12.0, seed=0)
    rows = np.fromfile(tmp_path / "t.ply", dtype=TILE_DTYPE,
                       offset=(tmp_path / "t.ply").read_bytes().index(b"end_header\n") + 11)
    assert len(rows) == n == 120_000
    assert 0 <= rows["x"].min() and rows["x"].max() < 100 and rows["y"].max() < 100
    assert 95 < rows["z"].min() and rows["z"].max() < 130  # metres above the datum
    assert set(np.unique(rows["sem_class"]).tolist()) == {1, 2, 8}


def test_readme_chunk_sizes_are_tens_of_metres():
    """The examples run on tiles in metres: a chunk is what a model trains on (tens of metres),
    not a fraction of a metre (0.5 once made 864,727 chunks of a real tile, and failed)."""
    text = "\n".join(body for kind, body in blocks() if kind in ("python", "bash"))
    sizes = [float(v) for v in re.findall(r"(?:--chunk-size |chunk_size=)([0-9.e+-]+)", text)]
    assert sizes, "no chunk example in the README"
    assert all(10 <= v <= 100 for v in sizes), sizes
