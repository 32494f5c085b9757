"""The installed package holds every module of the source tree (setuptools installs only the
packages pyproject.toml lists: a subpackage missing there imports from a checkout and fails
once installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("gds_stream", "fallback") for p in (ROOT / top).rglob("__init__.py")}
    assert found, "no package found under the repository root"
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
