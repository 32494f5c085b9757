"""Peak host memory of one loader epoch, measured in a fresh process (``VmHWM``).

Usage: _mem_worker.py DATASET BATCH_POINTS PREFETCH [shuffle|noshuffle] [epochs] [window]
Prints one JSON line: the RSS before the loader was built, the peak RSS of the process (VmHWM), one
batch's bytes and the loader's options. Run by ``tests/test_loader_core.py`` and by hand (README).
"""

from __future__ import annotations

import json
import sys


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def main() -> int:
    path, batch, prefetch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    shuffle = (sys.argv[4] if len(sys.argv) > 4 else "shuffle") == "shuffle"
    epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    window = {"shuffle_window": int(sys.argv[6])} if len(sys.argv) > 6 else {}
    import torch  # noqa: F401 - imported before the baseline, as in a training job

    del torch

    from gds_stream.backends import open_loader
    from gds_stream.format import open_dataset

    ds = open_dataset(path)
    point_bytes = sum(s.point_bytes for s in ds.schema.values())
    ld = open_loader(ds, backend="fallback", device="cpu", batch_points=batch,
                     prefetch=prefetch, shuffle=shuffle, seed=1, **window)
    base = _rss_kib()
    n = 0
    for e in range(epochs):
        for b in ld:
            n += int(b["pid"][-1]) >= 0  # touch the batch
    ld.close()
    # VmHWM, the high-water mark of this process's own address space. (ru_maxrss is not:
    # Linux carries the parent's peak across fork and exec, so under a large parent, such as
    # a test runner, it reports the parent's RSS.)
    peak = _status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_kib": peak, "batches": n,
                      "batch_bytes": batch * point_bytes, "prefetch": ld.options.prefetch,
                      "window_bytes": ld.options.shuffle_window * point_bytes,
                      "num_threads": ld.options.num_threads, "shuffle": shuffle}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
