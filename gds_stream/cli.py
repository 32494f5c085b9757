"""The ``gds-stream`` command line: convert, info, verify, env.

Errors of the gds-stream family (and OS errors on the user's files) become one line on stderr and
exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .errors import GDSStreamError

EXIT_ERROR = 2
EXIT_MISMATCH = 1


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gds-stream",
                                description="Stream huge point clouds into PyTorch.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress information")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert PLY / SemanticKITTI / raw .bin files to a dataset")
    c.add_argument("inputs", nargs="+", help="input files or directories")
    c.add_argument("-o", "--output", required=True, help="dataset directory to create")
    c.add_argument("--format", default="auto", help="auto, ply, kitti or raw (default: auto)")
    c.add_argument("--element", default=None, help="PLY element holding the points "
                                                   "(default: the one with x, y and z)")
    c.add_argument("--fields", type=_csv, default=None,
                   help="comma-separated fields to keep (default: all)")
    c.add_argument("--raw-fields", type=_csv, default=None,
                   help="names of the columns of a raw N×F .bin, e.g. x,y,z,intensity")
    c.add_argument("--raw-dtype", default="float32", help="dtype of a raw .bin (default float32)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="show a dataset's schema, points, scans and bytes")
    i.add_argument("dataset")

    v = sub.add_parser("verify", help="recompute every block checksum of a dataset")
    v.add_argument("dataset")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("env", help="versions, CUDA device, and GPUDirect Storage vs compat mode")
    return p


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    ds = convert(a.inputs, a.output, format=a.format, element=a.element, fields=a.fields,
                 raw_fields=a.raw_fields, raw_dtype=a.raw_dtype, overwrite=a.overwrite,
                 progress=False if a.no_progress else None)
    print(f"wrote {ds.path}: {ds.num_points:,} points in {ds.num_scans:,} scans, "
          f"{_fmt_bytes(ds.nbytes)}")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .format import open_dataset

    ds = open_dataset(a.dataset)
    print(f"dataset  {ds.path}")
    print(f"points   {ds.num_points:,}")
    print(f"scans    {ds.num_scans:,}")
    print(f"bytes    {ds.nbytes:,} ({_fmt_bytes(ds.nbytes)})")
    print()
    rows = [("field", "dtype", "components", "bytes/point", "bytes")]
    for spec in ds.schema.values():
        rows.append((spec.name, spec.dtype.name, str(spec.components), str(spec.point_bytes),
                     f"{ds.layout(spec.name).nbytes:,}"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .format import open_dataset

    ds = open_dataset(a.dataset)
    with tqdm(total=ds.nbytes, unit="B", unit_scale=True, desc="verify",
              disable=a.no_progress or None, file=sys.stderr) as bar:
        bad = ds.verify(progress=bar.update)
    for name, block, want, got in bad:
        lo = block * ds.block_bytes
        print(f"{ds.field_path(name)}: field {name!r} block {block} "
              f"(bytes {lo}..{lo + ds.block_bytes}): crc32 {got:08x}, manifest says {want:08x}",
              file=sys.stderr)
    if bad:
        print(f"{ds.path}: {len(bad)} corrupt block(s)", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"{ds.path}: all {sum(len(ds.layout(n).checksums) for n in ds.schema)} blocks ok")
    return 0


def _cmd_env(a: argparse.Namespace) -> int:
    from .capability import environment_report

    for key, value in environment_report():
        print(f"{key:<14} {value}")
    return 0


_COMMANDS = {"convert": _cmd_convert, "info": _cmd_info, "verify": _cmd_verify, "env": _cmd_env}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except (GDSStreamError, OSError) as exc:
        if args.debug:
            raise
        print(f"gds-stream: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gds-stream: interrupted", file=sys.stderr)
        return 130
