"""open_loader's backend choice: every probe verdict, the reason kept on the loader, one log line.

The GPU-direct loader cannot be built without CUDA, so where the rule picks it a stand-in class
(a CPU loader that records how it was built) replaces ``gds_stream.gds.GDSLoader``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import gds_stream
import gds_stream.gds
from fallback import FallbackLoader
from gds_stream import capability
from gds_stream.backends import open_loader
from gds_stream.capability import GDSCapability
from gds_stream.errors import BackendUnavailable, LoaderError
from gds_stream.format import FieldSpec
from helpers import make_dataset

LOGGER = "gds_stream.backends"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("be"), [3000, 2000],
                        fields=[FieldSpec("pid", np.dtype("<i8"))])


def _verdict(monkeypatch, mode, reason=""):
    calls = []

    def probe():
        calls.append(1)
        return GDSCapability(mode, reason, {})

    monkeypatch.setattr(capability, "probe_gds", probe)
    return calls


class _StandIn(FallbackLoader):
    """Stands in for GDSLoader on a CPU machine; remembers its task_size."""

    mode = "gds"

    def __init__(self, dataset, task_size=None, **options):
        super().__init__(dataset, **options)
        self.task_size = task_size
        self.backend = type(self).mode


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(gds_stream.gds, "GDSLoader", _StandIn)
    return _StandIn


def _one_line(caplog):
    recs = [r for r in caplog.records if r.name == LOGGER]
    assert len(recs) == 1, [r.getMessage() for r in recs]
    assert recs[0].levelno == logging.INFO
    return recs[0].getMessage()


def test_auto_takes_gds_only_through_gpudirect_storage(ds, monkeypatch, stand_in, caplog):
    _verdict(monkeypatch, "gds")
    caplog.set_level(logging.INFO, logger=LOGGER)
    with open_loader(ds, batch_points=1000, task_size=1 << 20) as ld:
        assert isinstance(ld, _StandIn) and ld.backend == "gds"
        assert ld.task_size == 1 << 20  # the GPU-only option reaches the GPU-direct loader
        assert "GPUDirect Storage" in ld.backend_reason
        line = _one_line(caplog)
        assert line.startswith("gds-stream backend: gds (") and "GPUDirect Storage" in line


def test_auto_falls_back_in_compat_mode_saying_why(ds, monkeypatch, stand_in, caplog):
    why = "the nvidia-fs kernel module is not loaded (/proc/driver/nvidia-fs is absent)"
    _verdict(monkeypatch, "gds-compat", why)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with open_loader(ds, batch_points=1000, task_size=1 << 20) as ld:
        assert type(ld) is FallbackLoader and ld.backend == "fallback"
        assert "compat mode" in ld.backend_reason and why in ld.backend_reason
        line = _one_line(caplog)
        assert line.startswith("gds-stream backend: fallback (") and why in line
        assert len(list(ld)) == len(ld) == 5


def test_auto_falls_back_when_unavailable(ds, monkeypatch, stand_in, caplog):
    _verdict(monkeypatch, "unavailable", "kvikio is not installed")
    caplog.set_level(logging.INFO, logger=LOGGER)
    with open_loader(ds, batch_points=1000) as ld:
        assert type(ld) is FallbackLoader
        assert "kvikio is not installed" in ld.backend_reason
        assert "kvikio is not installed" in _one_line(caplog)


def test_auto_with_a_cpu_device_does_not_probe(ds, monkeypatch, caplog):
    calls = _verdict(monkeypatch, "gds")
    caplog.set_level(logging.INFO, logger=LOGGER)
    with open_loader(ds, batch_points=1000, device="cpu") as ld:
        assert type(ld) is FallbackLoader
        assert "'cpu' is not CUDA" in ld.backend_reason
        assert "not CUDA" in _one_line(caplog)
    assert not calls


def test_forced_gds_runs_in_compat_mode_and_says_so(ds, monkeypatch, caplog):
    class _Compat(_StandIn):
        mode = "gds-compat"

    monkeypatch.setattr(gds_stream.gds, "GDSLoader", _Compat)
    _verdict(monkeypatch, "gds-compat", "KVIKIO_COMPAT_MODE=ON forces compat mode")
    caplog.set_level(logging.INFO, logger=LOGGER)
    with open_loader(ds, backend="gds", batch_points=1000) as ld:
        assert isinstance(ld, _Compat) and ld.backend == "gds-compat"
        assert "compat mode" in ld.backend_reason
        line = _one_line(caplog)
        assert line.startswith("gds-stream backend: gds-compat (") and "compat" in line


def test_forced_gds_that_cannot_run_raises_the_reason(ds, monkeypatch, stand_in):
    _verdict(monkeypatch, "unavailable", "no CUDA device is visible")
    with pytest.raises(BackendUnavailable, match="no CUDA device is visible"):
        open_loader(ds, backend="gds", batch_points=1000)
    with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        open_loader(ds, backend="gds", batch_points=1000, device="cpu")


def test_forced_fallback(ds, monkeypatch, stand_in, caplog):
    calls = _verdict(monkeypatch, "gds")
    caplog.set_level(logging.INFO, logger=LOGGER)
    with open_loader(ds, backend="fallback", batch_points=1000, task_size=4096) as ld:
        assert type(ld) is FallbackLoader and ld.backend == "fallback"
        assert "requested" in ld.backend_reason and "requested" in _one_line(caplog)
    assert not calls


def test_this_machine_auto_is_the_fallback_with_the_probes_reason(ds):
    cap = capability.probe_gds()
    if cap.mode == "gds":
        pytest.skip("this machine has GPUDirect Storage")
    with open_loader(ds, batch_points=1000) as ld:
        assert ld.backend == "fallback" and ld.backend_reason
        if cap.mode == "unavailable":
            assert cap.reason in ld.backend_reason


def test_package_maps_open_loader_to_backends():
    assert gds_stream.open_loader is open_loader
    assert not hasattr(__import__("gds_stream.loader").loader, "open_loader")


def test_loader_core_imports_no_backend():
    """The core must not import a backend (nor the module above it) — a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, gds_stream.loader; "
            "bad = [m for m in ('fallback', 'fallback.loader', 'gds_stream.gds', "
            "'gds_stream.backends', 'cupy', 'kvikio') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_bad_backend_name(ds):
    with pytest.raises(LoaderError, match="backend must be 'auto', 'gds' or 'fallback'"):
        open_loader(ds, backend="cuda", batch_points=10)
