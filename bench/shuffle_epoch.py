"""Loader-only speed of a shuffled point epoch on the CPU: ``python -m bench.shuffle_epoch``.

Opens the fallback on the CPU with batches of ``--batch-points`` points, ``shuffle=True`` and the
default shuffle window (or ``--window``), runs ``--epochs`` epochs touching nothing, and prints
each epoch's points/s and the best one (the first epoch pays the page cache and warm-up). The
dataset is the benchmark's DALES-like one (x, y, z, intensity float32, sem_class, ins_class
int32: 24 bytes a point), generated under ``--workdir`` on first use; ``--dataset`` takes any
gds-stream dataset instead.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shuffle_epoch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=6_000_000)
    p.add_argument("--batch-points", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--window", type=int, help="shuffle_window (default: the loader's)")
    p.add_argument("--dataset", type=Path, help="an existing dataset instead of the generated one")
    p.add_argument("--workdir", type=Path, default=Path("bench/results/data"))
    args = p.parse_args(argv)
    if args.points < 1 or args.batch_points < 1 or args.epochs < 1:
        p.error("--points, --batch-points and --epochs must be positive")

    import gds_stream
    from bench import datagen

    path = args.dataset or datagen.ensure(args.workdir, args.points)
    extra = {} if args.window is None else {"shuffle_window": args.window}
    with gds_stream.open_loader(path, backend="fallback", device="cpu", shuffle=True, seed=1,
                                batch_points=args.batch_points, **extra) as ld:
        print(f"dataset {path}: {ld.dataset.num_points:,} points; batches of "
              f"{args.batch_points:,}; shuffle_window {ld.options.shuffle_window:,}")
        print(f"backend: {ld.backend_reason}")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        rates = []
        for epoch in range(args.epochs):
            ld.set_epoch(epoch)
            t = time.perf_counter()
            n = sum(int(next(iter(b.values())).shape[0]) for b in ld)
            wall = time.perf_counter() - t
            rates.append(n / wall)
            print(f"epoch {epoch}: {n:,} points in {wall:.3f} s = {n / wall / 1e6:.1f} M points/s")
    best = max(rates[1:] or rates)
    print(f"best{' after the first' if len(rates) > 1 else ''}: {best / 1e6:.1f} M points/s; "
          f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
