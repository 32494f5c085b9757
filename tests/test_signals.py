"""Ctrl-C is never swallowed by a finalizer of ours (a KeyboardInterrupt raised inside a
``weakref.finalize`` or ``__del__`` is only printed, and the loop runs on)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gds_stream import _lifetime
from gds_stream.backends import open_loader
from gds_stream.format import DatasetWriter, FieldSpec

ROOT = Path(__file__).resolve().parent.parent

# SIGALRM runs Python's SIGINT handler (default_int_handler) at a random moment of a tight loop
# that allocates and drops batch buffers; a swallowed interrupt lets the loop run for its second.
_SCRIPT = textwrap.dedent("""
    import random, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from gds_stream._hostmem import anon_buffer
    from gds_stream.backends import open_loader
    signal.signal(signal.SIGALRM, signal.default_int_handler)
    random.seed(0)
    loader = open_loader(sys.argv[2], backend="fallback", device="cpu", batch_points=64,
                         num_threads=0) if len(sys.argv) > 2 else None
    swallowed = 0
    for trial in range(30):
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.001, 0.02))
        start = time.monotonic()
        try:
            while time.monotonic() - start < 1.0:
                if loader is None:
                    for _ in range(50):
                        a = anon_buffer(4096)
                        del a
                else:
                    for b in loader:
                        pass
            swallowed += 1
        except KeyboardInterrupt:
            pass
    print("swallowed", swallowed)
""")


def _dataset(tmp_path):
    with DatasetWriter(tmp_path / "ds", [FieldSpec("pid", np.dtype("<i8"))]) as w:
        w.append({"pid": np.arange(2000, dtype=np.int64)})
        w.end_scan("gen")
    return str(tmp_path / "ds")


@pytest.mark.parametrize("what", ["buffers", "loader"])
def test_ctrl_c_in_a_tight_loop_always_reaches_the_loop(tmp_path, what):
    args = [sys.executable, "-c", _SCRIPT, str(ROOT)]
    if what == "loader":
        args.append(_dataset(tmp_path))
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Exception ignored" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip() == "swallowed 0", (r.stdout, r.stderr[-2000:])


def test_an_interrupt_caught_in_a_del_is_raised_at_the_next_next(tmp_path):
    class Interrupted(_lifetime.Closeable):
        def close(self):
            raise KeyboardInterrupt

    with open_loader(_dataset(tmp_path), backend="fallback", device="cpu",
                     batch_points=500) as ld:
        it = iter(ld)
        next(it)
        obj = Interrupted()
        del obj  # __del__ -> close() -> KeyboardInterrupt, which a finalizer cannot raise
        with pytest.raises(KeyboardInterrupt):
            next(it)
        assert not _lifetime.PENDING_INTERRUPT
