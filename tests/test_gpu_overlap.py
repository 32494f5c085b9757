"""Reads never wait for training: both backends, on a CUDA device (``pytest -m gpu``).

A training loop queues GPU work on its stream and calls ``next()``; the loader's reads must go
on while that work runs. The test queues ≥ 400 ms of GPU work (``torch.cuda._sleep``,
calibrated with timing events) on the consumer's stream — the default (legacy null) stream or
a side stream — *first*, with no pause, then takes ``2 × prefetch`` batches: the first
``prefetch`` were queued before the sleep, the next ``prefetch`` are read (and copied) only
while it runs. All of them must come back while the consumer's stream is still busy, hold the
dataset's values, and the route each file took (``loader.routes``) is reported and checked. A
loader whose reads synchronise the null stream (KvikIO's ``pread`` on device memory, or a file
KvikIO silently put in compat mode), copy on a blocking stream, or wait on an event recorded on
the consumer's stream, returns only after the sleep.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gds_stream import capability, open_loader
from helpers import cuda_reason
from gds_stream.format import DatasetWriter, FieldSpec, open_dataset

SLEEP_MS = 1500.0
PREFETCH = 4


def _cuda_reason() -> str | None:
    return cuda_reason()


def _gds_reason() -> str | None:
    reason = _cuda_reason()
    if reason is not None:
        return reason
    cap = capability.probe_gds()
    return None if cap.available else f"GPU-direct path unavailable: {cap.reason}"


BACKENDS = [
    pytest.param("fallback", marks=pytest.mark.skipif(_cuda_reason() is not None,
                                                      reason=str(_cuda_reason()))),
    pytest.param("gds", marks=pytest.mark.skipif(_gds_reason() is not None,
                                                 reason=str(_gds_reason()))),
]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("overlap") / "ds"
    specs = [FieldSpec("xyz", np.dtype("<f4"), 3), FieldSpec("label", np.dtype("<u2"))]
    with DatasetWriter(path, specs) as w:
        for _ in range(4):
            n = 250_000
            w.append({"xyz": rng.standard_normal((n, 3)).astype(np.float32),
                      "label": rng.integers(0, 65535, n).astype(np.uint16)})
            w.end_scan("scan")
    return open_dataset(path)


def _cycles_per_ms() -> float:
    import torch

    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 50_000_000
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    b.synchronize()
    return cycles / a.elapsed_time(b)


@pytest.mark.gpu
@pytest.mark.parametrize("stream", ["default", "side"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_complete_while_the_consumer_stream_is_busy(ds, backend, stream):
    import torch

    cpm = _cycles_per_ms()
    s = torch.cuda.default_stream() if stream == "default" else torch.cuda.Stream()
    cfg = dict(batch_points=50_000, shuffle=True, seed=1, prefetch=PREFETCH, shuffle_window=0)
    with open_loader(ds, backend=backend, device="cuda", **cfg) as loader, torch.cuda.stream(s):
        routes = getattr(loader, "routes", None)
        if backend == "gds":
            assert routes is not None and len(routes) == 2
            assert set(routes) <= {"gds", "host"}
            assert (loader.backend == "gds") == all(r == "gds" for r in routes)
            print(f"gds routes: {routes} ({loader.backend}: {loader.backend_reason})")
        it = iter(loader)
        torch.cuda._sleep(int(SLEEP_MS * cpm))  # the "training step", queued first
        t0 = time.perf_counter()
        got = [next(it) for _ in range(2 * PREFETCH)]
        waited_ms = (time.perf_counter() - t0) * 1e3
        busy = not s.query()
        assert busy, (f"{backend}: the consumer's stream finished its queued work before "
                      f"{2 * PREFETCH} batches came back ({waited_ms:.0f} ms of "
                      f"{SLEEP_MS:.0f} ms): the reads waited for it (routes {routes})")
        plan = loader.epoch_plan(0)
        for i, batch in enumerate(got):
            idx = plan.batch(i).point_indices()
            for k, t in batch.items():
                assert np.array_equal(t.cpu().numpy(), ds.read(k)[idx]), (backend, k, i)
