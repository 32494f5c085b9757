"""The semseg preset alone on one resident batch: ``python -m bench.transform_bench
--preset-only`` (and the last line of ``python -m bench.compare --transform semseg``).

The batch: ``points`` points in 16 chunks (50 m squares of uniform x, y; z in [0, 20) m), the
bench's 1 M by default, in memory on the device; the preset (:func:`bench.transform_bench.semseg`,
SphereCrop bound to the batch's size) timed whole and transform by transform, the device
synchronised around each, after one warm-up run. No dataset, no loader: seconds, a check of the
transforms' own speed that a shared machine's load disturbs least (best of the runs).
``--threads K`` (CPU) adds the preset run by K threads at once against one, each on one
intra-op thread as the loader's transform threads are: what a second thread adds where every
thread dispatches its ops under the one GIL.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.measure import Device
from bench.transform_bench import CHUNK_SIZE_M, SOLO_POINTS, semseg


def solo_preset_ms(dev: Device, points: int, seed: int) -> tuple[float, dict[str, float]]:
    """The whole preset on one resident batch of ``points`` points in 16 chunks: median ms of 5
    runs (after one warm-up), and each transform's median ms (timed one by one in the same
    runs, the device synchronised around each)."""
    times, each = solo_preset_runs(dev, points, seed, 5)
    return (statistics.median(times) * 1e3,
            {n: statistics.median(v) * 1e3 for n, v in each.items()})


def solo_batch(dev: Device, points: int, seed: int) -> dict:
    """The resident batch: ``points`` points in 16 chunks (50 m squares of uniform x, y; z in
    [0, 20) m), intensity and a class, on the device."""
    g = torch.Generator().manual_seed(seed)
    side = CHUNK_SIZE_M
    b = {"x": torch.rand(points, generator=g) * side * 4, "y": torch.rand(points, generator=g)
         * side * 4, "z": torch.rand(points, generator=g) * 20,
         "intensity": torch.rand(points, generator=g) * 100,
         "sem_class": torch.randint(0, 9, (points,), generator=g, dtype=torch.int32)}
    cell = (b["x"] // side).long() * 4 + (b["y"] // side).long()
    order = torch.argsort(cell, stable=True)
    b = {k: v[order].to(dev.device) for k, v in b.items()}
    b["offset"] = torch.cumsum(torch.bincount(cell, minlength=16), 0).to(dev.device)
    return b


#: Alternated rounds of ``--threads``' one-thread and K-thread runs (the median is reported).
THREAD_ROUNDS = 3


def threaded_rates(points: int, seed: int, threads: int, runs: int,
                   rounds: int = THREAD_ROUNDS) -> dict[int, list[float]]:
    """CPU: batches a second of the preset on the resident batch run by 1 and by ``threads``
    threads at once, each thread on one intra-op thread of its own as the loader's transform
    threads are (``runs`` runs each after a warm-up, different draws; the rate is all runs over
    the slowest thread's time), ``rounds`` times alternated: {thread count: [rate per round]}.
    Where the threads' ops cannot be put on one intra-op thread each, they share torch's pool."""
    import threading

    from gds_stream._producer import single_intraop_thread

    b = solo_batch(Device("cpu"), points, seed)
    t = semseg(lib=True, point_max=points)
    rates: dict[int, list[float]] = {1: [], threads: []}

    def work(k, start, done):
        single_intraop_thread()
        gen = torch.Generator()
        gen.manual_seed(seed * 1_000_003 + k)
        t(b, gen)                                   # warm-up: caches, scratch buffers
        start.wait()
        t0 = time.perf_counter()
        for i in range(runs):
            gen.manual_seed(seed * 1_000_003 + 1000 * (k + 1) + i)
            t(b, gen)
        done.append(time.perf_counter() - t0)

    for _ in range(rounds):
        for count in (1, threads):
            start, done = threading.Barrier(count), []
            ts = [threading.Thread(target=work, args=(k, start, done), daemon=True)
                  for k in range(count)]
            for x in ts:
                x.start()
            for x in ts:
                x.join()
            rates[count].append(count * runs / max(done))
    return rates


def solo_preset_runs(dev: Device, points: int, seed: int,
                     runs: int) -> tuple[list[float], dict[str, list[float]]]:
    """The seconds of ``runs`` runs of the preset (after one warm-up) on one resident batch of
    ``points`` points in 16 chunks (50 m squares of uniform x, y; z in [0, 20) m), and of each
    transform in them (the device synchronised around each)."""
    b = solo_batch(dev, points, seed)
    t = semseg(lib=True, point_max=points)
    names = [f"{type(x).__name__}" for x in t.transforms]
    names = [n if names.count(n) == 1 else f"{n} {names[:i + 1].count(n)}"
             for i, n in enumerate(names)]
    gen = torch.Generator(device=dev.device)
    times, each = [], {n: [] for n in names}
    for i in range(runs + 1):
        gen.manual_seed(i)
        x, total = b, 0.0
        for name, step in zip(names, t.transforms):
            dev.sync()
            t0 = time.perf_counter()
            x = step(x, gen)
            dev.sync()
            dt = time.perf_counter() - t0
            total += dt
            if i:
                each[name].append(dt)
        if i:
            times.append(total)
    return times, each


def main(argv=None) -> int:
    """``python -m bench.transform_bench --preset-only``: the semseg preset alone on one resident
    batch (default the bench's 1 M points in 16 chunks), the whole preset and each transform:
    the median and the best of ``--runs`` runs after a warm-up. Seconds, no dataset, no loaders: a quick
    check of the transforms' own speed on a shared machine."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.transform_bench", description=main.__doc__)
    p.add_argument("--preset-only", action="store_true",
                   help="time the preset alone on a resident batch (the only mode; the "
                        "comparison runs as python -m bench.compare --transform semseg)")
    p.add_argument("--points", type=int, default=SOLO_POINTS)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: also run the preset in this many threads at once, each on one "
                        "intra-op thread as the loader's transform threads, against one such "
                        f"thread (batches a second, {THREAD_ROUNDS} rounds alternated)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if not a.preset_only:
        print("error: give --preset-only (the comparison runs as python -m bench.compare "
              "--transform semseg)", file=sys.stderr)
        return 2
    if a.points < 16 or a.runs < 1:
        print("error: --points must be >= 16 and --runs >= 1", file=sys.stderr)
        return 2
    if a.threads < 0 or (a.threads and a.device != "cpu"):
        print("error: --threads must be >= 0, and is for --device cpu", file=sys.stderr)
        return 2
    dev = Device(a.device)
    doc = {"points": a.points, "runs": a.runs, "device": str(dev.device),
           "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
    times, each = solo_preset_runs(dev, a.points, a.seed, a.runs)

    def stats(v):
        return {"median": statistics.median(v) * 1e3, "min": min(v) * 1e3}
    doc.update(preset_ms=stats(times), transform_ms={k: stats(v) for k, v in each.items()})
    med, best = doc["preset_ms"]["median"], doc["preset_ms"]["min"]
    print(f"the semseg preset alone on one resident batch of {a.points:,} points (16 chunks), "
          f"device {dev.device}, {doc['threads']} intra-op threads, load average "
          f"{' '.join(f'{x:.2f}' for x in doc['load_average'])}: median / best of {a.runs} (ms)")
    print(f"  {'preset':<20} {med:8.1f} {best:8.1f}")
    for k, v in doc["transform_ms"].items():
        print(f"  {k:<20} {v['median']:8.1f} {v['min']:8.1f}")
    if a.threads:
        rates = threaded_rates(a.points, a.seed, a.threads, a.runs)
        one, many = statistics.median(rates[1]), statistics.median(rates[a.threads])
        doc["threaded"] = {"threads": a.threads, "batches_per_s": {str(k): v for k, v in
                                                                  rates.items()},
                           "scaling": many / one}
        print(f"  in threads, one intra-op thread each (as the loader's transform threads), "
              f"batches/s, median of {THREAD_ROUNDS} alternated rounds: 1 thread {one:.1f}, "
              f"{a.threads} "
              f"threads {many:.1f} ({many / one:.2f}x)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0

