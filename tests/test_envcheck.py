"""``gds-stream env --check``: the CPU-only answer (through the CLI) and the report logic."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gds_stream import capability, envcheck
from gds_stream.envcheck import RouteResult, describe, verdict
from helpers import cuda_reason

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.skipif(cuda_reason() is None, reason="a CUDA device works here")
def test_cli_check_without_a_gpu_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "gds_stream", "env", "--check", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("no GPU")]
    assert len(lines) == 1 and "no GPU path to check" in lines[0]
    assert r.stderr == ""
    assert list(tmp_path.iterdir()) == []  # nothing written without a GPU


def test_cli_env_without_check_does_not_check():
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "gds_stream", "env"], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0 and "no GPU path to check" not in r.stdout
    assert "GPUDirect" in r.stdout


def test_run_reports_each_route_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(capability, "probe_gds",
                        lambda: capability.GDSCapability("unavailable", "no kvikio here"))
    seen = []

    def fake_route(ds, route):
        seen.append((route, ds.num_points))
        return RouteResult(route, "fallback", {"v.bin": "compat (pinned host memory)"},
                           2.0, 1.5, True)

    monkeypatch.setattr(envcheck, "_check_route", fake_route)
    out: list[str] = []
    rc, lines = envcheck.run(str(tmp_path), mib=1, emit=out.append)
    assert rc == 0 and lines == out
    assert seen == [("fallback", 1 << 20)]
    assert "route gds: not available (no kvikio here)" in lines
    assert any(ln.startswith("route fallback: 2.00 GB/s idle, 1.50 GB/s") for ln in lines)
    assert lines[-1].startswith("verdict: GPU-direct unavailable")
    assert list(tmp_path.iterdir()) == []  # the dataset written is removed


def test_verdict_names_gds_and_reads_that_wait():
    g = RouteResult("gds", "gds", {"v.bin": "GDS"}, 5.0, 4.8, True)
    f = RouteResult("fallback", "fallback", {"v.bin": "compat"}, 3.0, 0.4, False)
    v = verdict([g, f], "gds")
    assert v.startswith("verdict: GPUDirect Storage works (5.00 GB/s idle)")
    assert "fallback reads WAIT for the busy GPU" in v
    assert "fastest under load: gds (4.80 GB/s)" in v
    c = RouteResult("gds", "gds-compat", {"v.bin": "compat (on overlay)"}, 1.0, 1.0, True)
    v = verdict([c, RouteResult("fallback", "fallback", {}, 2.0, 2.0, True)], "gds")
    assert "compat mode" in v and "reads overlap a busy GPU on every route" in v
    assert describe(RouteResult("gds", error="OSError: boom")) == ["route gds: failed: OSError: boom"]


@pytest.mark.parametrize("copy_stream", ["own", "blocking"])
def test_check_route_on_the_simulated_cuda(tmp_path, monkeypatch, copy_stream):
    """The measurement logic on the CPU model of CUDA: with the fallback's own non-blocking
    copy stream the reads finish while the "long kernel" on the default stream has not run
    (overlapped); with a blocking copy stream the model makes them wait, and the check says so."""
    import torch

    import fallback.loader as fb_loader
    import simcuda

    ops_made: list = []

    def make(torch_, device):
        ops_made.append(simcuda.SimOps(torch_, device, deferred_consumer=True))
        if copy_stream == "blocking":
            ops = ops_made[-1]

            def blocking(self=ops):
                s = simcuda.SimStream(self, blocking=True, null=self.null)
                self.streams.append(s)
                return s

            ops.new_stream = blocking
        return ops_made[-1]

    monkeypatch.setattr(fb_loader, "cuda_ops", make)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ops = lambda: ops_made[-1]  # noqa: E731
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: [s.run_all() for s in
                                                           (ops().null, *ops().streams)])
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: ops().null.put(lambda: None))
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: simcuda.SimStream(ops(),
                                                                               name="side"))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: ops().use_stream(s))
    monkeypatch.setattr(torch.cuda, "Event", lambda **k: simcuda.SimEvent())
    monkeypatch.setattr(torch.cuda, "default_stream", lambda *a: ops().null)
    monkeypatch.setattr(envcheck, "_cycles_per_ms", lambda torch_: 1.0)
    ds = envcheck._write_dataset(str(tmp_path / "ds"), 1)
    r = envcheck._check_route(ds, "fallback")
    assert r.error == "" and r.backend == "fallback"
    assert r.idle_gbs > 0 and r.busy_gbs > 0
    assert r.overlapped is (copy_stream == "own")
    line = describe(r)[1]
    assert ("overlapped the busy GPU" in line) == (copy_stream == "own")
    assert ("fallback reads WAIT" in verdict([r], "unavailable")) == (copy_stream != "own")
