"""Inputs a user or a hostile environment hands gds-stream that no other module's tests cover:
special files where an input file should be, a binary PLY holding more rows than its header
counts. Each is one clear error naming the file (the CLI: one line, exit status 2), never a hang
or a silently short dataset.
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


def _ply(path, count, rows, after=b"", after_data=b""):
    import struct

    head = (b"ply\nformat binary_little_endian 1.0\nelement vertex %d\nproperty float x\n"
            b"property float y\nproperty float z\n" % count) + after + b"end_header\n"
    path.write_bytes(head + struct.pack(f"<{3 * rows}f", *range(3 * rows)) + after_data)
    return path


@pytest.mark.parametrize("after, after_data", [
    (b"", b""),
    (b"element extra 1\nproperty uchar a\n", b"\x07"),  # a fixed-size element after the points
])
def test_binary_ply_holding_more_rows_than_its_count_is_refused(tmp_path, after, after_data):
    """A header count smaller than the data converted the first rows and dropped the rest
    without a word."""
    from gds_stream import DatasetError
    from gds_stream.convert import convert

    exact = _ply(tmp_path / "ok.ply", 3, 3, after, after_data)
    assert convert(exact, tmp_path / "ok", progress=False).num_points == 3
    if after:  # two more rows of the last element
        path = _ply(tmp_path / "a.ply", 3, 3, after, after_data + b"\x08\x09")
        message = "the header counts 1 rows of element 'extra', but 2 more bytes follow"
    else:
        path = _ply(tmp_path / "a.ply", 1, 3)
        message = "the header counts 1 rows of element 'vertex', but 24 more bytes follow"
    with pytest.raises(DatasetError, match=rf"a\.ply: {message} its data \(2 rows or more\)"):
        convert(path, tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()
