"""The ``gds-stream`` command line: convert, info, verify, env.

Errors of the gds-stream family (and OS errors on the user's files) become one line on stderr and
exit status 2; ``--debug`` shows the traceback instead. ``--debug`` and ``-v/--verbose`` are
accepted before or after the subcommand. Sizes are in binary units (KiB, MiB, GiB) everywhere.

The one-line rule (:mod:`._quiet`): without ``-v``/``--debug`` a refusal prints exactly one line
— gds-stream's own warnings are held until the command ends and shown only when it succeeds;
other libraries' log lines and Python warnings (numpy's RuntimeWarnings, laspy's ``ERROR
laspy.lasreader``) and native libraries' own writes to stderr (a lazrs panic) are shown only with
``-v``/``--debug``. A misspelt option gets the subcommand's usage and a "did you mean".

A subcommand is a ``sub.add_parser(...)`` in :func:`_parser` and a function in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Sequence

import numpy as np

from . import __version__
from ._manifest import printable
from ._quiet import quiet_stderr
from .errors import GDSStreamError

EXIT_ERROR = 2
#: The reader of our output closed it: 128 + SIGPIPE, as a shell reports a process the signal
#: ended.
EXIT_BROKEN_PIPE = 141
EXIT_MISMATCH = 1


_DEBUG_HELP = "show tracebacks and debug logging (before or after the subcommand)"
_VERBOSE_HELP = "log progress information (before or after the subcommand)"


def _csv(text: str) -> list[str]:
    """Comma-separated names, an empty one kept (``x,,z``, a trailing comma) for the converter
    to refuse: dropping it would change how many columns ``--raw-fields`` gives a record."""
    return [t.strip() for t in text.split(",")]


def _plural(n: int, word: str) -> str:
    """``1 scan``, ``2 scans``, ``1,500 points``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gds-stream", description="Stream huge point clouds into PyTorch.",
        epilog="--debug and -v/--verbose may also follow the subcommand.")
    p.add_argument("--version", action="version", version=f"gds-stream {__version__}")
    p.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    # The same options on every subcommand; SUPPRESS keeps a subcommand that does not see them
    # from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=_DEBUG_HELP)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=_VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "convert", parents=[common],
        help="convert PLY / LAS / LAZ (COPC too) / SemanticKITTI / raw .bin files to a dataset",
        description="Convert point-cloud files to a gds-stream dataset, streaming (each input "
                    "file becomes one scan). Inputs: PLY (ascii and binary), LAS and LAZ 1.0-1.4 "
                    "(point formats 0-10, COPC included; recognised by the 'LASF' signature), "
                    "SemanticKITTI .bin (+ .label), raw N×F .bin.")
    c.add_argument("inputs", nargs="+", help="input files or directories, or s3://BUCKET/PREFIX "
                   "(every supported object under it) or s3://BUCKET/KEY (one object)")
    c.add_argument("-o", "--output", required=True,
                   help="dataset directory to create, or s3://BUCKET/PREFIX (uploaded, the "
                        "manifest last)")
    c.add_argument("--format", default="auto",
                   help="auto, ply, las (LAS/LAZ/COPC), kitti or raw (default: auto: LAS by its "
                        "signature, else by extension)")
    c.add_argument("--xyz", default="auto", choices=("auto", "float32", "float64"),
                   metavar="auto|float32|float64",
                   help="LAS/LAZ coordinates: float32 relative to the dataset origin, refusing a "
                        "point it cannot hold within half the file's scale; absolute float64; or "
                        "auto: float32 where every input holds so, else float64 with a warning "
                        "(default: auto)")
    c.add_argument("--element", default=None, help="PLY element holding the points "
                                                   "(default: the one with x, y and z)")
    c.add_argument("--fields", type=_csv, default=None,
                   help="comma-separated fields to keep (default: all); LAS/LAZ dimensions by "
                        "field name or by laspy's name")
    c.add_argument("--raw-fields", type=_csv, default=None,
                   help="names of the columns of a raw N×F .bin, e.g. x,y,z,intensity")
    c.add_argument("--raw-dtype", default="float32", help="dtype of a raw .bin (default float32)")
    c.add_argument("--chunk-size", type=float, default=None, metavar="S",
                   help="group each scan's points into spatial chunks: grid cells of edge S "
                        "(in the coordinates' unit) along a Morton curve, each chunk one "
                        "contiguous range, for batch_chunks= loaders (default: no chunks)")
    c.add_argument("--chunk-dims", type=int, default=2, choices=(2, 3),
                   help="cells on x, y (2, default) or x, y, z (3)")
    c.add_argument("--point-ids", action="store_true",
                   help="add a point_id field (uint64, each point's index in its input file)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", parents=[common],
                       help="show a dataset's schema, points, scans, bytes, origin and CRS")
    i.add_argument("dataset", help="dataset directory (holding manifest.json) or "
                   "s3://BUCKET/PREFIX")

    v = sub.add_parser("verify", parents=[common],
                       help="recompute every block checksum of a dataset")
    v.add_argument("dataset", help="dataset directory (holding manifest.json) or "
                   "s3://BUCKET/PREFIX")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("env", parents=[common],
                       help="versions, CUDA device, and GPUDirect Storage vs compat mode")
    e.add_argument("--check", nargs="?", const="", default=None, metavar="DIR",
                   help="also read a few hundred MiB (written into DIR, default the temp "
                        "directory) through each route, GPU idle and busy, and print a verdict")
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
                 raw_fields=a.raw_fields, raw_dtype=a.raw_dtype, xyz=a.xyz,
                 overwrite=a.overwrite, progress=False if a.no_progress else None,
                 chunk_size=a.chunk_size, chunk_dims=a.chunk_dims, point_ids=a.point_ids)
    chunks = f" ({_plural(ds.num_chunks, 'spatial chunk')})" if ds.num_chunks else ""
    print(f"wrote {ds.path}: {_plural(ds.num_points, 'point')} in "
          f"{_plural(ds.num_scans, 'scan')}{chunks}, {_fmt_bytes(ds.nbytes)}")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .format import open_dataset

    ds = open_dataset(a.dataset)
    print(f"dataset  {ds.path}")
    print(f"points   {ds.num_points:,}")
    print(f"scans    {ds.num_scans:,}")
    print(f"bytes    {ds.nbytes:,} ({_fmt_bytes(ds.nbytes)})")
    origin = getattr(ds, "origin", None)
    if origin is not None and any(origin):
        print(f"origin   {', '.join(repr(float(v)) for v in origin)} "
              f"(x, y, z are stored relative to it)")
    crs = _crs_summary(ds.sources)
    if crs:
        print(f"crs      {crs}")
    if ds.num_chunks:
        sizes = np.diff(ds.chunk_offsets)
        print(f"chunks   {ds.num_chunks:,} ({ds.chunk_dims}-D cells of {ds.chunk_size:g}); "
              f"points per chunk min {int(sizes.min()):,}, median {int(np.median(sizes)):,}, "
              f"max {int(sizes.max()):,}")
    print()
    rows = [("field", "dtype", "components", "bytes/point", "bytes")]
    for spec in ds.schema.values():
        rows.append((spec.name, spec.dtype.name, str(spec.components), str(spec.point_bytes),
                     f"{ds.layout(spec.name).nbytes:,}"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _crs_summary(sources: list) -> str:
    """The CRS the sources record (LAS/LAZ inputs), one line; empty when none records one."""
    from .convert.las_crs import label

    seen = []
    for src in sources:
        text = label(src) if isinstance(src, dict) else ""
        if text and text not in seen:
            seen.append(text)
    return "; ".join(seen)


def _cmd_verify(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .format import open_dataset

    ds = open_dataset(a.dataset)
    with tqdm(total=ds.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
              disable=a.no_progress or None, file=sys.stderr) as bar:
        bad = ds.verify(progress=bar.update)
    for name, block, want, got in bad:
        lo = block * ds.block_bytes
        hi = min(lo + ds.block_bytes, ds.layout(name).nbytes)
        print(f"{ds.field_path(name)}: field {name!r} block {block} "
              f"(bytes {lo}..{hi} of the field): crc32 {got:08x}, manifest says {want:08x}",
              file=sys.stderr)
    if bad:
        print(f"{ds.path}: {_plural(len(bad), 'corrupt block')}", file=sys.stderr)
        return EXIT_MISMATCH
    total = sum(len(ds.layout(n).checksums) for n in ds.schema)
    print(f"{ds.path}: {'all ' if total != 1 else ''}{_plural(total, 'block')} ok")
    return 0


def _cmd_env(a: argparse.Namespace) -> int:
    from .capability import environment_report

    for key, value in environment_report():
        print(f"{key:<14} {value}")
    if a.check is not None:
        from .envcheck import run

        return run(a.check or None, emit=print)[0]
    return 0


_COMMANDS = {"convert": _cmd_convert, "info": _cmd_info, "verify": _cmd_verify, "env": _cmd_env}


def _misspelt(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> None:
    """Unknown options: the subcommand's usage and a "did you mean" (exit status 2)."""
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    target = sub.choices.get(args.command, parser)
    options = [o for a in target._actions for o in a.option_strings]
    hints = []
    for word in extras:
        name = word.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1) if name.startswith("-") else []
        hints.append(f"{word} (did you mean {close[0]}?)" if close else word)
    target.error(f"unrecognized arguments: {' '.join(hints)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    _misspelt(parser, argv)
    args = parser.parse_args(argv)
    with quiet_stderr(debug=args.debug, verbose=args.verbose) as held:
        try:
            rc = _COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit
            return rc
        except BrokenPipeError:
            # the reader of our output left (``gds-stream info DIR | head``): not an error of
            # ours to report; stdout goes to /dev/null so the exit's own flush cannot fail too
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE
        except (GDSStreamError, OSError) as exc:
            if args.debug:
                raise
            if held is not None:
                held.drop()
            print(f"gds-stream: error: {printable(exc)}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            if held is not None:
                held.drop()
            print("gds-stream: interrupted", file=sys.stderr)
            return 130
