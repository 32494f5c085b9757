"""What a manifest may expand into: a pre-scan of the raw JSON bounds the objects parsing would
build (and the nesting) before anything is parsed, so a small hostile manifest cannot take
gigabytes on open. Every refusal is a DatasetError naming the manifest."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gds_stream import _manifest
from gds_stream._manifest import json_shape
from gds_stream.errors import ConversionError, DatasetError
from gds_stream.format import MANIFEST, DatasetWriter, FieldSpec, open_dataset

FIELDS = (FieldSpec("x", np.dtype("<f4"), 3),)


def write(out: Path, scans: int = 2) -> Path:
    with DatasetWriter(out, FIELDS) as w:
        for i in range(scans):
            w.append({"x": np.ones((3, 3), "<f4")})
            w.end_scan(f"scan{i}")
    return out


def with_raw(out: Path, key: str, raw: bytes) -> Path:
    """Replace the manifest's ``key`` by the raw JSON text ``raw``."""
    doc = json.loads((out / MANIFEST).read_text())
    doc[key] = "@@RAW@@"
    head, tail = json.dumps(doc).encode().split(b'"@@RAW@@"')
    (out / MANIFEST).write_bytes(head + raw + tail)
    return out


# -- the scanner -----------------------------------------------------------------------------
def _reference(t: str) -> dict:
    """A character-by-character scanner: the counts json_shape must give."""
    ins = esc = False
    objects = arrays = commas = keys = quotes = numbers = depth = top = 0
    prev = " "
    for ch in t:
        if ins:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                ins = False
            prev = ch
            continue
        if ch in "-0123456789" and prev not in "0123456789.eE+-" or ch in "NI":
            numbers += 1
        if ch == '"':
            ins, quotes = True, quotes + 1
        elif ch in "{[":
            objects, arrays = objects + (ch == "{"), arrays + (ch == "[")
            depth += 1
            top = max(top, depth)
        elif ch in "}]":
            depth -= 1
        elif ch == ",":
            commas += 1
        elif ch == ":":
            keys += 1
        prev = ch
    return {"objects": objects, "arrays": arrays, "members": commas + objects + arrays,
            "keys": keys, "strings": quotes - keys, "numbers": numbers, "depth": top}


def _doc(rng: random.Random, d: int = 0) -> object:
    r = rng.random()
    if d > 5 or r < 0.3:
        return rng.choice([1, -2.5e3, 'a"b', "\\", '\\\\"', "x,y[{:}]", '"', True, None,
                           123456, 1e-7, "ab\\\\", "é", "", float("nan"), float("-inf"),
                           "NaN", False])
    if r < 0.65:
        return [_doc(rng, d + 1) for _ in range(rng.randint(0, 4))]
    return {f'k{rng.randint(0, 9)}\\"': _doc(rng, d + 1) for _ in range(rng.randint(0, 4))}


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 20])
def test_json_shape_counts_exactly_across_blocks(monkeypatch, block):
    """Escapes, quotes and brackets inside strings, and runs of backslashes that straddle the
    scanner's block boundaries, are all counted as the parser sees them."""
    monkeypatch.setattr(_manifest, "_SCAN_BLOCK", block)
    rng = random.Random(block)
    for _ in range(150):
        text = json.dumps(_doc(rng), indent=rng.choice([None, 1]), ensure_ascii=rng.random() < .5)
        assert json_shape(text.encode()) == _reference(text), text


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,item,count", [
    ("sources", b"{}", 1_000_000),        # ~36× its size once parsed
    ("sources", b"[]", 1_000_000),
    ("sources", b'{"a":1}', 500_000),
    ("scan_offsets", b'"ab"', 5_000_000),  # ~12×
    ("scan_offsets", b"0", 6_000_000),     # estimated at 32 bytes a number (+ 8 a member)
])
def test_manifest_that_would_expand_is_refused_before_parsing(tmp_path, key, item, count):
    out = with_raw(write(tmp_path / "ds"), key, b"[" + b",".join([item] * count) + b"]")
    with pytest.raises(DatasetError, match=rf"{out / MANIFEST}: [\d,]+ bytes of JSON would take "
                                           rf"over [\d,]+ bytes once parsed"):
        open_dataset(out)


def test_more_sources_than_scans_is_refused(tmp_path):
    out = with_raw(write(tmp_path / "ds", scans=2), "sources", b'[{"path": "a"}, {}, {}]')
    with pytest.raises(DatasetError, match=rf"{out / MANIFEST}: sources holds 3 entries, more "
                                           rf"than the 2 scans"):
        open_dataset(out)


def test_manifests_as_written_open(tmp_path):
    """A dataset of many scans with short source names (the costliest valid manifest per byte)
    is well within the bound."""
    out = write(tmp_path / "ds", scans=20_000)
    with open_dataset(out) as ds:
        assert ds.num_scans == 20_000 and len(ds.sources) == 20_000


def test_writer_refuses_a_manifest_readers_would_refuse(tmp_path, monkeypatch):
    monkeypatch.setattr(_manifest, "MANIFEST_PARSE_BASE", 0)
    with pytest.raises(ConversionError, match=r"manifest\.json: .* once parsed .*the manifest of "
                                              r"300 scans and 0 chunks"):
        write(tmp_path / "ds", scans=300)
    assert os.listdir(tmp_path) == []


_OPEN = textwrap.dedent("""
    import sys
    from gds_stream.errors import DatasetError
    from gds_stream.format import open_dataset
    try:
        open_dataset(sys.argv[1])
        print("opened")
    except DatasetError as exc:
        print(exc)
    with open("/proc/self/status") as f:
        print(next(line for line in f if line.startswith("VmHWM")))
""")


def test_sixty_megabytes_of_empty_sources_peak_bounded(tmp_path):
    """The reported case: 20 M empty ``sources`` entries in a 60 MB manifest (within the size
    cap) took 1.5 GB of RSS to open. Now refused before parsing; peak RSS stays near the
    text's own size."""
    raw = b"[" + b"{}," * 19_999_999 + b"{}]"
    out = with_raw(write(tmp_path / "ds"), "sources", raw)
    assert 60e6 < (out / MANIFEST).stat().st_size < 64 << 20
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _OPEN, str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    message, hwm = proc.stdout.strip().splitlines()
    assert message.startswith(f"{out / MANIFEST}: 60,000,") and "once parsed" in message
    peak_kib = int(hwm.split()[1])
    assert peak_kib < 400 << 10, hwm  # was ~1.5 GB; the text itself is 60 MB


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-be"])
def test_manifest_in_utf16_or_utf32_is_refused(tmp_path, encoding):
    """The pre-scan reads UTF-8 bytes: a UTF-16 text could hide its structure from it."""
    out = write(tmp_path / "ds")
    text = (out / MANIFEST).read_text()
    (out / MANIFEST).write_bytes(text.encode(encoding))
    with pytest.raises(DatasetError, match=rf"{out / MANIFEST}: the manifest is UTF-(16|32)"
                                           rf"(-LE|-BE)? text; gds-stream manifests are UTF-8"):
        open_dataset(out)
    (out / MANIFEST).write_bytes(b"\xef\xbb\xbf" + text.encode())  # a UTF-8 BOM is fine
    open_dataset(out).close()


# -- fields that share bytes -----------------------------------------------------------------
def _two_fields(out: Path) -> Path:
    specs = (FieldSpec("x", np.dtype("<f4"), 3), FieldSpec("label", np.dtype("<u2")))
    with DatasetWriter(out, specs) as w:
        w.append({"x": np.ones((5, 3), "<f4"), "label": np.arange(5, dtype="<u2")})
        w.end_scan("scan0")
    return out


def _edit_label(out: Path, **kw) -> None:
    doc = json.loads((out / MANIFEST).read_text())
    doc["fields"][1].update(kw)
    (out / MANIFEST).write_text(json.dumps(doc))


def test_fields_pointed_at_the_same_bytes_are_refused(tmp_path):
    """A manifest edited so that two fields read the same bytes opened, and each batch's labels
    were the coordinates' bytes (no checksum is read on open)."""
    out = _two_fields(tmp_path / "ds")
    xfile = json.loads((out / MANIFEST).read_text())["fields"][0]["file"]
    _edit_label(out, file=xfile, offset=0)
    with pytest.raises(DatasetError, match=rf"{out / MANIFEST}: fields 'label' and 'x' overlap "
                                           rf"in {xfile} \(bytes 0\.\.10 belong to both\)"):
        open_dataset(out)
    # sharing a file without sharing bytes is not a lie
    os.truncate(out / xfile, 8192)
    _edit_label(out, offset=4096)
    with open_dataset(out) as ds:
        assert ds.read("label").tolist() == [0] * 5


def test_a_field_stored_in_the_manifest_is_refused(tmp_path):
    out = _two_fields(tmp_path / "ds")
    _edit_label(out, file=MANIFEST, offset=0)
    with open(out / MANIFEST, "a") as f:  # large enough to hold the field: JSON allows spaces
        f.write(" " * 8192)
    with pytest.raises(DatasetError, match=rf"{out / MANIFEST}: field 'label': file "
                                           rf"'manifest.json' is the manifest, not a data file"):
        open_dataset(out)
