"""``python -m bench.compare --source s3``: loader-only throughput from object storage.

Starts a local S3 protocol server (moto, on 127.0.0.1), uploads the generated DALES-like dataset
as ``convert -o s3://...`` would, and times loader-only epochs (iterate, touch nothing) of the
fallback loader from three sources: the local directory (page cache warm), the bucket with no
cache (every epoch fetched: "cold"), and the bucket through a block cache already filled by one
epoch ("cache warm"). Before any speed is printed, one untimed epoch per source is checksummed
batch by batch (crc32 of every field, in yield order): all sources must yield the same bytes,
else exit 3.

A local moto server measures the client's overhead (request handling, copies, the cache), not a
cloud link: moto answers from memory on the same machine and copies a whole object for each
ranged GET. Throughput to a real bucket depends on the network and on how many ranges are in
flight (``num_threads``).

``--range-sizes 1,4,8,16,32`` also sweeps the size of one ranged GET: for each size S (MiB) the
fallback's reader tasks are split at S and the block cache fetches blocks of S, and it times
loader-only epochs of one batch holding every point from the bucket without a cache, and through
a cache that starts empty each epoch ("cache cold"). In file order each field is one range,
read in GETs of S (or the field's size where that is smaller); with ``--shuffle`` the batch is
the shuffled ≥ 1 MiB blocks, so uncached GETs are those blocks and a cold cache fetches the
blocks of S they fall in (reader threads missing the same block fetch it twice). Every size's
first epoch is checksummed against the local dataset first.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from bench import datagen
from bench.backbone import FIELDS

STATEMENT = ("a local moto S3 server measures the client's overhead (requests, copies, cache), "
             "not a cloud link")
EXIT_MISMATCH = 3
BUCKET = "gds-stream-bench"


def _epoch(ds: Any, batch: int, args: argparse.Namespace, epoch: int,
           checksum: bool) -> tuple[float, int, list[int]]:
    import gds_stream

    sums: list[int] = []
    points = 0
    with gds_stream.open_loader(ds, backend="fallback", device="cpu", fields=list(FIELDS),
                                batch_points=batch, shuffle=args.shuffle,
                                seed=args.seed) as ld:
        ld.set_epoch(epoch)
        t = time.perf_counter()
        for b in ld:
            points += len(b["x"])
            if checksum:
                sums.append(zlib.crc32(b"".join(
                    memoryview(b[f].contiguous().numpy()).cast("B") for f in FIELDS)))
        wall = time.perf_counter() - t
    return wall, points, sums


class _Mismatch(Exception):
    """A source yielded other bytes than the local dataset."""


def _sweep(url: str, opts: dict, local: Any, nbytes: int, args: argparse.Namespace,
           tmp: Path) -> list[dict]:
    """Loader-only GB/s at each range size of ``args.range_sizes`` (see the module docstring)."""
    import fallback.loader as fallback_loader
    import gds_stream
    from gds_stream.storage import cache as cache_mod

    batch = local.num_points  # without --shuffle: one range per field, split at the size
    ref_one = _epoch(local, batch, args, 0, True)[2]
    saved = fallback_loader.REMOTE_TASK_BYTES, cache_mod.CACHE_BLOCK_BYTES
    rows = []
    try:
        for mib in args.range_sizes:
            fallback_loader.REMOTE_TASK_BYTES = cache_mod.CACHE_BLOCK_BYTES = mib << 20
            ds = gds_stream.open_dataset(url, storage_options=opts)
            if _epoch(ds, batch, args, 0, True)[2] != ref_one:
                raise _Mismatch(f"range size {mib} MiB: the bucket yielded other bytes than "
                                f"the local dataset")
            gets = sum(-(-local.layout(f).nbytes // (mib << 20)) for f in FIELDS)
            plain = [_epoch(ds, batch, args, 1 + rep, False)[0] for rep in range(args.repeat)]
            cold = []
            for rep in range(args.repeat):
                cdir = tmp / f"sweep-{mib}-{rep}"
                cds = gds_stream.open_dataset(url, storage_options=opts, cache_dir=cdir,
                                              cache_bytes=2 * nbytes + (2 * mib << 20))
                cold.append(_epoch(cds, batch, args, 1 + rep, False)[0])
                shutil.rmtree(cdir, ignore_errors=True)
            rows.append({"range_mib": mib, "gets": gets, "no_cache_s": plain,
                         "cache_cold_s": cold,
                         "no_cache_gb_s": nbytes / statistics.median(plain) / 1e9,
                         "cache_cold_gb_s": nbytes / statistics.median(cold) / 1e9})
    finally:
        fallback_loader.REMOTE_TASK_BYTES, cache_mod.CACHE_BLOCK_BYTES = saved
    return rows


def run(args: argparse.Namespace) -> int:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("error: --source s3 needs moto[server] (pip install 'moto[server]'; it is in the "
              "dev extra)", file=sys.stderr)
        return 2
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's request log

    import gds_stream
    from gds_stream.storage.s3 import S3Client
    from gds_stream.storage.upload import upload_dir

    smoke_points, smoke_batch, cpu_points, cpu_batch = 200_000, 50_000, 3_500_000, 250_000
    batch = args.batch_points or (smoke_batch if args.smoke else cpu_batch)
    path = args.dataset or datagen.ensure(args.workdir, args.points or (
        smoke_points if args.smoke else cpu_points))
    local = gds_stream.open_dataset(path)
    nbytes = sum(local.layout(f).nbytes for f in FIELDS)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    tmp = Path(tempfile.mkdtemp(prefix="gds-stream-s3-bench-"))
    try:
        host, port = srv.get_host_and_port()
        opts = {"endpoint": f"http://{host}:{port}", "access_key_id": "bench",
                "secret_access_key": "bench", "region": "us-east-1"}
        boto3.client("s3", endpoint_url=opts["endpoint"], region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench"
                     ).create_bucket(Bucket=BUCKET)
        t = time.perf_counter()
        upload_dir(S3Client(BUCKET, opts), Path(path), "dales", None)
        upload_s = time.perf_counter() - t
        url = f"s3://{BUCKET}/dales"
        sources = {
            "local": local,
            "s3 (no cache)": gds_stream.open_dataset(url, storage_options=opts),
            "s3 (cache warm)": gds_stream.open_dataset(url, storage_options=opts,
                                                       cache_dir=tmp / "cache",
                                                       cache_bytes=2 * nbytes + (64 << 20)),
        }
        # untimed: fills the cache, and every source must yield the same bytes
        sums = {name: _epoch(ds, batch, args, 0, True)[2] for name, ds in sources.items()}
        ref = sums["local"]
        bad = [name for name, s in sums.items() if s != ref]
        if bad:
            print(f"error: {', '.join(bad)} yielded other bytes than the local dataset",
                  file=sys.stderr)
            return EXIT_MISMATCH
        rows = []
        for name, ds in sources.items():
            walls = []
            for rep in range(args.repeat):
                wall, points, _ = _epoch(ds, batch, args, 1 + rep, False)
                assert points == local.num_points
                walls.append(wall)
            med = statistics.median(walls)
            rows.append({"source": name, "wall_s": walls, "median_s": med,
                         "gb_s": nbytes / med / 1e9, "mpoints_s": local.num_points / med / 1e6})
        cache = sources["s3 (cache warm)"].cache.stats()  # type: ignore[union-attr]
        sweep = (_sweep(url, opts, local, nbytes, args, tmp)
                 if getattr(args, "range_sizes", None) else None)
    except _Mismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISMATCH
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"dataset: {path}: {local.num_points:,} points, {nbytes / 2**20:.1f} MiB in "
          f"{len(FIELDS)} fields; batch {batch:,} points, shuffle={args.shuffle}, "
          f"repeat {args.repeat}; fallback loader, loader-only (iterate, touch nothing)")
    print(f"upload to the local server: {upload_s:.2f} s; checksums of every batch equal "
          f"across sources")
    print(f"{'source':<18}{'GB/s':>8}{'Mpts/s':>9}   epoch walls (s)")
    for r in rows:
        print(f"{r['source']:<18}{r['gb_s']:>8.3f}{r['mpoints_s']:>9.2f}   "
              + ", ".join(f"{w:.3f}" for w in r["wall_s"]))
    print(f"cache: {cache}")
    if sweep is not None:
        print(f"range size sweep: one batch of {local.num_points:,} points per epoch, "
              f"shuffle={args.shuffle}, repeat {args.repeat} (median GB/s; checksums equal at "
              f"every size)")
        print(f"{'range MiB':<11}{'no cache':>10}{'cache cold':>12}   GETs per epoch (no cache"
              f"{', file order' if args.shuffle else ''})")
        for r in sweep:
            print(f"{r['range_mib']:<11}{r['no_cache_gb_s']:>10.3f}{r['cache_cold_gb_s']:>12.3f}"
                  f"   {r['gets']}")
    print(f"note: {STATEMENT}.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "source": "s3", "note": STATEMENT, "dataset": str(path),
            "num_points": local.num_points, "nbytes": nbytes, "batch_points": batch,
            "shuffle": args.shuffle, "upload_s": upload_s, "checksums_equal": True,
            "rows": rows, "cache": cache, "range_sweep": sweep}, indent=1) + "\n")
    return 0
