"""Every code block of the README runs as written.

The blocks are executed in README order in one scratch directory that holds ``tiles/`` (small
DALES-like PLY tiles: x, y, z, intensity, sem_class): each ```python block as a script, and each
```bash block whose commands are ``gds-stream`` invocations through a shell. The two blocks that
set up an environment (pip) and run the full benchmark are exercised elsewhere — CI runs the same
install commands (``.ci/run``) and ``tests/test_bench.py`` runs every benchmark variant — so here
they are only checked to be exactly those commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _make_ply

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
#: Commands a bash block may hold that this test does not run (see the module docstring).
NOT_RUN = ("python3 -m venv", "pip install", "python -m bench.compare", "python -m pytest")
TILE_PROPERTIES = (("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "u2"),
                   ("sem_class", "u1"))


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


def test_every_readme_block_runs(tmp_path, request):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, n in enumerate((30_000, 20_000, 25_000)):
        _make_ply(tiles / f"tile_{i}.ply", n, properties=TILE_PROPERTIES, seed=i)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bindir = Path(sys.executable).parent
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    if any("s3://" in body for _, body in blocks()):  # "Object storage": a local S3 server
        from s3_fixtures import readme_env

        env.update(readme_env(request))
    ran = 0
    for k, (kind, body) in enumerate(blocks()):
        if kind == "python":
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        elif kind == "bash" and _runnable_bash(body):
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        else:
            continue
        ran += 1
        assert r.returncode == 0, (f"README block {k} ({kind}) failed with exit "
                                   f"{r.returncode}:\n{body}\n--- stderr ---\n{r.stderr[-3000:]}")
    assert ran >= 2
