"""Inputs a user or a hostile environment hands gds-stream that no other module's tests cover:
special files where an input file should be. Each is one clear error naming the file (the CLI:
one line, exit status 2), never a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(*args, cwd, timeout=60):
    return subprocess.run([sys.executable, "-m", "gds_stream", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("where", ["given", "in a directory"])
@pytest.mark.parametrize("name", ["scan.las", "scan.ply", "scan.bin"])
def test_convert_refuses_a_fifo_input_instead_of_blocking(tmp_path, where, name):
    """Telling the format opened the file to look for the LAS signature: opening a FIFO blocks
    until something writes to it, so ``convert`` hung for ever."""
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / name)
    arg = f"in/{name}" if where == "given" else "in"
    r = _cli("convert", arg, "-o", "out", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"gds-stream: error: in/{name}: not a regular file "
                                     f"(a FIFO)"]
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_device_input(tmp_path):
    (tmp_path / "zero.las").symlink_to("/dev/zero")
    r = _cli("convert", "zero.las", "-o", "out", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["gds-stream: error: zero.las: not a regular file "
                                     "(a character device)"]
