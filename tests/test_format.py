"""The on-disk format: manifest records (origin, chunks), validation of every manifest claim,
safe reading of manifest and field files, atomic publishing, cleanup after killed writers, and a
manifest fuzz test. Every failure must be a DatasetError (ConversionError when writing)."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gds_stream import _publish
from gds_stream.errors import ConversionError, DatasetError
from gds_stream.format import MANIFEST, DatasetWriter, FieldSpec, open_dataset

FIELDS = (FieldSpec("x", np.dtype("<f4"), 3), FieldSpec("label", np.dtype("<u2")))


def write(out: Path, scans=(5, 0, 7), block_bytes: int = 4096, **kw) -> Path:
    rng = np.random.default_rng(len(scans))
    with DatasetWriter(out, FIELDS, block_bytes=block_bytes, **kw) as w:
        for i, n in enumerate(scans):
            w.append({"x": rng.standard_normal((n, 3)).astype("<f4"),
                      "label": np.arange(n, dtype="<u2")})
            w.end_scan(f"scan{i}")
    return out


def load(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def save(out: Path, doc: object) -> None:
    (out / MANIFEST).write_text(json.dumps(doc))


def refused(out: Path, match: str | None = None) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        ds = open_dataset(out)
        for name in ds.schema:  # a manifest that opens must also read
            ds.read(name)
        ds.verify()
    assert str(out) in str(info.value)
    return info.value


# -- A1: origin ------------------------------------------------------------------------------
def test_origin_round_trip_and_default(tmp_path):
    ds = open_dataset(write(tmp_path / "a", origin=(1.5, -2.0, 1e6)))
    assert ds.origin.dtype == np.float64 and ds.origin.tolist() == [1.5, -2.0, 1e6]
    with pytest.raises(ValueError):
        ds.origin[0] = 3.0  # read-only
    assert open_dataset(write(tmp_path / "b")).origin.tolist() == [0.0, 0.0, 0.0]
    assert "origin" not in load(tmp_path / "b")


def test_origin_set_before_finish(tmp_path):
    out = tmp_path / "ds"
    with DatasetWriter(out, FIELDS) as w:
        w.origin = (1, 2, 3)
        w.set_origin([4.0, 5.0, 6.0])
        w.end_scan("empty")
    assert open_dataset(out).origin.tolist() == [4.0, 5.0, 6.0]


@pytest.mark.parametrize("bad", [(1, 2), (1, 2, float("nan")), (0, 0, float("inf")), "abc"])
def test_writer_refuses_bad_origin(tmp_path, bad):
    with pytest.raises(ConversionError, match="origin"):
        DatasetWriter(tmp_path / "ds", FIELDS, origin=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [[1, 2], [1, 2, "3"], [1, 2, True], "0,0,0", {"x": 1},
                                 [1, 2, 10**400], None])
def test_reader_refuses_bad_origin(tmp_path, bad):
    out = write(tmp_path / "ds")
    doc = load(out)
    doc["origin"] = bad
    save(out, doc)
    refused(out, "origin")


def test_reader_refuses_nan_origin(tmp_path):
    out = write(tmp_path / "ds")
    text = (out / MANIFEST).read_text().replace('"format"', '"origin": [0, NaN, 1], "format"')
    (out / MANIFEST).write_text(text)
    refused(out, "origin")


# -- A2: chunks ------------------------------------------------------------------------------
def write_chunked(out: Path, dims: int = 2) -> Path:
    rng = np.random.default_rng(3)
    with DatasetWriter(out, FIELDS, block_bytes=4096, chunk_size=2.5, chunk_dims=dims) as w:
        for s, sizes in enumerate(([3, 2], [], [4])):
            n = sum(sizes)
            for k, c in enumerate(sizes):  # chunks may be declared before the points
                w.add_chunk(c, (s, k, 0), (0, 0, 0, 1, 1, float(k)))
            w.append({"x": rng.standard_normal((n, 3)).astype("<f4"),
                      "label": np.arange(n, dtype="<u2")})
            w.end_scan(f"scan{s}")
    return out


def test_chunks_round_trip(tmp_path):
    ds = open_dataset(write_chunked(tmp_path / "ds"))
    assert ds.num_chunks == 3 and ds.chunk_size == 2.5 and ds.chunk_dims == 2
    assert ds.chunk_offsets.dtype == np.int64 and ds.chunk_offsets.tolist() == [0, 3, 5, 9]
    assert ds.chunk_scan.tolist() == [0, 0, 2]
    assert ds.chunk_cells.dtype == np.int64 and ds.chunk_cells.tolist() == [[0, 0, 0], [0, 1, 0],
                                                                             [2, 0, 0]]
    assert ds.chunk_bounds.shape == (3, 6) and ds.chunk_bounds[1].tolist() == [0, 0, 0, 1, 1, 1]
    for a in (ds.chunk_offsets, ds.chunk_scan, ds.chunk_cells, ds.chunk_bounds):
        assert not a.flags.writeable


def test_no_chunks(tmp_path):
    ds = open_dataset(write(tmp_path / "ds"))
    assert ds.num_chunks == 0 and ds.chunk_offsets.tolist() == [0]
    assert ds.chunk_bounds.shape == (0, 6) and ds.chunk_cells.shape == (0, 3)
    assert ds.chunk_size == 0.0 and ds.chunk_dims == 0


def test_writer_chunk_errors(tmp_path):
    with pytest.raises(ConversionError, match="before any end_scan"):
        with DatasetWriter(tmp_path / "z", FIELDS):
            pass
    with pytest.raises(ConversionError, match="without chunk_size"):
        with DatasetWriter(tmp_path / "a", FIELDS) as w:
            w.add_chunk(1, (0, 0, 0), (0,) * 6)
    with pytest.raises(ConversionError, match="chunks of scan 0"):
        with DatasetWriter(tmp_path / "b", FIELDS, chunk_size=1.0) as w:
            w.append({"x": np.zeros((4, 3), "<f4"), "label": np.zeros(4, "<u2")})
            w.add_chunk(3, (0, 0, 0), (0,) * 6)
            w.end_scan("s")
    with DatasetWriter(tmp_path / "c", FIELDS, chunk_size=1.0) as w:
        with pytest.raises(ConversionError, match="bounds"):
            w.add_chunk(1, (0, 0, 0), (1, 0, 0, 0, 0, 0))
        with pytest.raises(ConversionError, match=">= 1"):
            w.add_chunk(0, (0, 0, 0), (0,) * 6)
        with pytest.raises(ConversionError, match="3 integers"):
            w.add_chunk(1, (0, 0.5, 0), (0,) * 6)
        with pytest.raises(ConversionError, match="3 integers"):
            w.add_chunk(1, (0, 0, 0), (0, 0, 0, 1, 1, "a"))
        w.end_scan("empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


CHUNK_LIES = [
    ("offsets", [0, 3, 5], "from 0 to num_points"),
    ("offsets", [0, 5, 3, 9], "increase strictly"),
    ("offsets", [0, 3, 3, 9], "increase strictly"),
    ("offsets", [0, 2, 6, 9], "inside its scan"),  # chunk 1 spans scans 0..2
    ("offsets", [0, 3, 5, 2**64], "integers"),
    ("scan", [0, 0], "one per chunk"),
    ("scan", [0, 0, 3], "scan >= 3"),
    ("scan", [0, 1, 2], "inside its scan"),
    ("scan", [0, 0, -1], "integers"),
    ("cell", [[0, 0, 0], [0, 1, 0]], "cell"),
    ("cell", [[0, 0, 0], [0, 1], [2, 0, 0]], "cell"),
    ("cell", [[0, 0, 0], [0, 1, 0], [2, 0, 2**63]], "cell"),
    ("bounds", [[0, 0, 0, 1, 1, 1]] * 2, "bounds"),
    ("bounds", [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 0, 0, 1, 1, 1]], "min <= max"),
    ("bounds", [[0, 0, 0, 1, 1, 1]] * 2 + [[0, 0, 0, 1, 1, "1"]], "bounds"),
    ("size", 0, "size"),
    ("size", "1", "size"),
    ("dims", 4, "dims"),
    ("dims", True, "dims"),
]


@pytest.mark.parametrize("key,value,match", CHUNK_LIES)
def test_reader_refuses_lying_chunks(tmp_path, key, value, match):
    out = write_chunked(tmp_path / "ds")
    doc = load(out)
    doc["chunks"][key] = value
    save(out, doc)
    refused(out, match)


def test_reader_refuses_chunks_not_an_object(tmp_path):
    out = write_chunked(tmp_path / "ds")
    doc = load(out)
    doc["chunks"] = [1, 2]
    save(out, doc)
    refused(out, "chunks must be an object")


# -- B1: the manifest file itself --------------------------------------------------------------
def test_manifest_symlinked_to_dev_zero(tmp_path):
    out = write(tmp_path / "ds")
    (out / MANIFEST).unlink()
    (out / MANIFEST).symlink_to("/dev/zero")
    refused(out, "not a regular file .a character device")


def test_manifest_fifo_does_not_block(tmp_path):
    out = write(tmp_path / "ds")
    (out / MANIFEST).unlink()
    os.mkfifo(out / MANIFEST)
    result: list[BaseException] = []

    def run() -> None:
        try:
            open_dataset(out)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the reader before failing
        fd = os.open(out / MANIFEST, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("open_dataset blocked on a FIFO manifest")
    assert isinstance(result[0], DatasetError) and "FIFO" in str(result[0])


def test_manifest_is_a_directory(tmp_path):
    out = write(tmp_path / "ds")
    (out / MANIFEST).unlink()
    (out / MANIFEST).mkdir()
    refused(out, "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_manifest_unreadable(tmp_path):
    out = write(tmp_path / "ds")
    (out / MANIFEST).chmod(0)
    refused(out, "cannot open the manifest")


def test_manifest_size_cap(tmp_path, monkeypatch):
    from gds_stream import _manifest

    out = write(tmp_path / "ds")
    monkeypatch.setattr(_manifest, "MANIFEST_BASE_BYTES", 1000)
    monkeypatch.setattr(_manifest, "MANIFEST_DATA_RATIO", 1 << 40)
    doc = load(out)
    doc["padding"] = "x" * 2000
    save(out, doc)
    refused(out, "larger than any valid one")
    cap = _manifest.manifest_cap(out)
    assert cap == 1000
    # the cap grows with the bytes the directory's files hold on disk, up to the maximum
    monkeypatch.setattr(_manifest, "MANIFEST_DATA_RATIO", 64)
    grown = _manifest.manifest_cap(out)
    assert grown > 1000
    monkeypatch.setattr(_manifest, "MANIFEST_ABS_MAX_BYTES", grown - 1)
    assert _manifest.manifest_cap(out) == grown - 1
    monkeypatch.setattr(_manifest, "MANIFEST_ABS_MAX_BYTES", 1 << 30)
    # a sparse multi-GiB file claims bytes it does not hold: it lifts the cap by nothing, so a
    # huge manifest beside it is refused before it is read (not parsed at GiB-scale cost)
    with open(out / "huge.bin", "wb") as f:
        f.truncate(4 << 30)
    assert _manifest.manifest_cap(out) == grown
    doc["padding"] = "x" * (grown + 10)
    save(out, doc)
    refused(out, "larger than any valid one")


# -- B2: types and ranges of every value -----------------------------------------------------
def mutate(out: Path, fn) -> None:
    doc = load(out)
    fn(doc)
    save(out, doc)


def _set(key, value):
    def fn(doc):
        doc[key] = value
    return fn


def _field(key, value, i=0):
    def fn(doc):
        if value is KeyError:
            del doc["fields"][i][key]
        else:
            doc["fields"][i][key] = value
    return fn


LIES = [
    (_set("sources", 0), "sources must be a list of objects"),
    (_set("sources", [1]), "sources must be a list of objects"),
    (_set("scan_offsets", [0, 5, 5, 2**64]), "scan_offsets"),
    (_set("scan_offsets", [0, 5, 5, -12]), "scan_offsets"),
    (_set("scan_offsets", "0,12"), "scan_offsets"),
    (_set("num_points", 2**63), "num_points"),
    (_set("num_points", 2**70), "num_points"),
    (_set("num_points", -1), "num_points"),
    (_set("num_points", 12.0), "num_points"),
    (_set("num_scans", 7), "num_scans"),
    (_set("alignment", 512), "alignment"),
    (_set("version", 2), "version"),
    (_set("version", True), "version"),
    (_set("checksum", "crc32"), "checksum"),
    (_set("checksum", {"algorithm": "crc32", "block_bytes": 2**40}), "block_bytes"),
    (_set("checksum", {"algorithm": "crc32", "block_bytes": 1024}), "block_bytes"),
    (_set("checksum", {"algorithm": "crc32", "block_bytes": 6000}), "block_bytes"),
    (_set("fields", {"x": 1}), "fields"),
    (_set("fields", []), "fields"),
    (_field("name", "a b"), "field name"),
    (_field("name", "offset"), "reserved"),
    (_field("dtype", {"name": "q"}), "dtype"),
    (_field("dtype", "q"), "dtype"),
    (_field("dtype", ">f4"), "dtype"),
    (_field("dtype", "float32"), "dtype"),
    (_field("dtype", "<c8"), "dtype"),
    (_field("dtype", KeyError), "no dtype"),
    (_field("components", 0), "components"),
    (_field("components", 10**30), "components"),
    (_field("file", "a\0b"), "NUL"),
    (_field("file", "x" * 300), "cannot stat .* .File name too long"),
    (_field("file", "../other.bin"), "outside"),
    (_field("file", "/etc/passwd"), "outside"),
    (_field("file", 7), "file must be"),
    (_field("offset", 100), "offset"),
    (_field("offset", 2**64), "offset"),
    (_field("offset", 2**62), "needs"),
    (_field("nbytes", 2**64), "nbytes"),
    (_field("checksums", "abc"), "checksums must be a list"),
    (_field("checksums", [1, 2, 3, 4, 5, 6, 7]), "expected 1 crc32 checksums .* found 7"),
    (_field("checksums", [2**32]), r"checksum 0 is 4294967296, expected an integer in \[0, 2\*\*32\)"),
    (_field("checksums", [-1]), "checksum 0 is -1"),
]


@pytest.mark.parametrize("fn,match", LIES, ids=[f"lie{i}" for i in range(len(LIES))])
def test_lying_manifest(tmp_path, fn, match):
    out = write(tmp_path / "ds")
    mutate(out, fn)
    refused(out, match)


@pytest.mark.parametrize("text,match", [
    ('{"num_points": ' + "9" * 5000 + "}", "not valid JSON"),
    ("[" * 100000, "JSON nested 100000 levels deep; a manifest nests at most 32"),
    ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "JSON nested 100001 levels deep"),
    ('{"a": ' + "[" * 33 + "]" * 33 + "}", "JSON nested 34 levels deep"),
    ("\xff\xfe", "the manifest is UTF-16 text; gds-stream manifests are UTF-8"),
    ("[1, 2]", "expected a JSON object"),
    ("", "not valid JSON"),
])
def test_unparseable_manifest(tmp_path, text, match):
    out = write(tmp_path / "ds")
    (out / MANIFEST).write_bytes(text.encode("latin-1"))
    refused(out, match)


def test_symlink_loop_as_field_file(tmp_path):
    out = write(tmp_path / "ds")
    os.symlink("loop2", out / "loop1")
    os.symlink("loop1", out / "loop2")
    mutate(out, _field("file", "loop1"))
    refused(out, "loop1: cannot stat .* .Too many levels of symbolic links")


# -- B3: byte order and missing dtype ------------------------------------------------------------
def test_big_endian_dtype_refused(tmp_path):
    out = write(tmp_path / "ds")
    mutate(out, _field("dtype", ">u2", 1))
    refused(out, "'>u2' is not a stored dtype")


# -- B4: block_bytes bounded, verify with a bounded buffer ---------------------------------------
def test_verify_reads_large_blocks_in_pieces(tmp_path, monkeypatch):
    from gds_stream import format as fmt

    out = write(tmp_path / "ds", scans=(3000,), block_bytes=8192)
    ds = open_dataset(out)
    assert ds.verify() == []
    monkeypatch.setattr(fmt, "VERIFY_PIECE", 4096)
    sizes = []
    real = fmt.pread_into
    monkeypatch.setattr(fmt, "pread_into", lambda fd, v, off, p="": (sizes.append(len(v)),
                                                                     real(fd, v, off, p)))
    assert ds.verify() == []
    assert max(sizes) == 4096
    with open(out / "x.bin", "r+b") as f:  # flip a byte in the second block of x
        f.seek(9000)
        b = f.read(1)
        f.seek(9000)
        f.write(bytes([b[0] ^ 1]))
    assert [(n, b) for n, b, _, _ in ds.verify()] == [("x", 1)]


# -- B5: field files must be regular files -----------------------------------------------------
def test_field_file_fifo_in_empty_dataset(tmp_path):
    out = write(tmp_path / "ds", scans=(0,))
    (out / "x.bin").unlink()
    os.mkfifo(out / "x.bin")
    refused(out, "must be a regular file .a FIFO")


def test_field_file_directory(tmp_path):
    out = write(tmp_path / "ds", scans=(0,))
    (out / "x.bin").unlink()
    (out / "x.bin").mkdir()
    refused(out, "must be a regular file .a directory")


# -- B6: files changed after opening -------------------------------------------------------------
def test_field_file_removed_after_open_still_reads_the_opened_file(tmp_path):
    """The dataset's descriptors are opened with the manifest: removing a file after open
    changes nothing for this Dataset (before, the file was opened by path on first read)."""
    ds = open_dataset(write(tmp_path / "ds"))
    want = ds.read("x")
    (ds.path / "x.bin").unlink()
    assert np.array_equal(ds.read("x"), want) and ds.verify() == []
    ds.close()


def test_field_file_replaced_after_open_still_reads_the_opened_file(tmp_path):
    ds = open_dataset(write(tmp_path / "ds"))
    want_x, want_label = ds.read("x"), ds.read("label")
    (ds.path / "x.bin").unlink()
    os.mkfifo(ds.path / "x.bin")
    (ds.path / "label.bin").unlink()
    (ds.path / "label.bin").write_bytes(b"")
    assert np.array_equal(ds.read("x"), want_x) and np.array_equal(ds.read("label"), want_label)
    assert ds.verify() == []
    ds.close()
    with pytest.raises(DatasetError, match="x.bin: the dataset is closed"):
        ds.read("x")


def test_field_file_that_cannot_be_opened_is_refused_at_open(tmp_path, monkeypatch):
    from gds_stream import format as fmt

    out = write(tmp_path / "ds")
    real = os.open

    def deny(path, *a, **k):
        if str(path).endswith("x.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(fmt.os, "open", deny)
    with pytest.raises(DatasetError, match="x.bin: cannot open .* .Permission denied"):
        open_dataset(out)


def test_field_file_truncated_after_fileno(tmp_path):
    ds = open_dataset(write(tmp_path / "ds"))
    ds.fileno("x")
    os.truncate(ds.path / "x.bin", 0)
    with pytest.raises(DatasetError, match="x.bin: file ended"):
        ds.read("x")
    ds.close()


def test_read_error_is_dataset_error(tmp_path, monkeypatch):
    from gds_stream import format as fmt

    ds = open_dataset(write(tmp_path / "ds"))

    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fmt.os, "preadv", eio)
    with pytest.raises(DatasetError, match="x.bin: read of .* failed .Input/output error"):
        ds.read("x")


def test_dataset_uses_the_closeable_mixin(tmp_path):
    from gds_stream._lifetime import Closeable

    with open_dataset(write(tmp_path / "ds")) as ds:
        fd = ds.fileno("x")
        assert isinstance(ds, Closeable)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_manifest_permission_error_is_dataset_error(tmp_path, monkeypatch):
    from gds_stream import _manifest

    out = write(tmp_path / "ds")
    real = os.open

    def deny(path, *a, **k):
        if str(path).endswith(MANIFEST):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(_manifest.os, "open", deny)
    refused(out, "cannot open the manifest .Permission denied")


# -- B14: the final step never replaces a dataset that appeared meanwhile ------------------------
def fill(w: DatasetWriter, n: int, value: int) -> None:
    w.append({"x": np.full((n, 3), value, "<f4"), "label": np.full(n, value, "<u2")})
    w.end_scan(f"v{value}")


def leftovers(parent: Path, name: str = "ds") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("empty_target", [False, True], ids=["absent", "empty-dir"])
def test_concurrent_writers_one_wins(tmp_path, monkeypatch, renameat2, empty_target):
    if not renameat2:
        monkeypatch.setattr(_publish, "_renameat2", lambda *a: False)
    out = tmp_path / "ds"
    if empty_target:
        out.mkdir()
    a = DatasetWriter(out, FIELDS)
    b = DatasetWriter(out, FIELDS)
    fill(a, 3, 1)
    fill(b, 4, 2)
    a.finish()
    with pytest.raises(ConversionError, match="ds: appeared while converting"):
        with b:
            pass
    ds = open_dataset(out)
    assert ds.num_points == 3 and ds.read("label").tolist() == [1, 1, 1]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "two-renames"])
def test_overwrite_replaces(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(_publish, "_renameat2", lambda *a: False)
    out = tmp_path / "ds"
    with DatasetWriter(out, FIELDS) as w:
        fill(w, 3, 1)
    with DatasetWriter(out, FIELDS, overwrite=True) as w:
        fill(w, 2, 7)
    assert open_dataset(out).read("label").tolist() == [7, 7]
    assert leftovers(tmp_path) == [] and sorted(p.name for p in out.iterdir()) == [
        "label.bin", MANIFEST, "x.bin"]


_CONVERT_ONE = """
import sys, numpy as np
from gds_stream.errors import ConversionError
from gds_stream.format import DatasetWriter, FieldSpec
v = int(sys.argv[2])
try:
    with DatasetWriter(sys.argv[1], [FieldSpec("label", np.dtype("<u2"))]) as w:
        w.append({"label": np.full(1000, v, "<u2")}); w.end_scan(str(v))
except ConversionError as exc:
    print("refused", exc); sys.exit(2)
print("won")
"""


def test_concurrent_processes_one_wins(tmp_path):
    out = tmp_path / "ds"
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT_ONE, str(out), str(v)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v in range(4)]
    results = [(p.wait(120), p.communicate()) for p in procs]
    codes = [rc for rc, _ in results]
    assert sorted(codes) == [0, 2, 2, 2], results
    winner = codes.index(0)
    assert open_dataset(out).read("label")[0] == winner
    assert all("ds:" in o for rc, (o, _) in results if rc == 2)
    assert leftovers(tmp_path) == []


# -- B15: cleanup after killed writers -------------------------------------------------------------
_KILLED = """
import sys, time, numpy as np
from gds_stream.format import DatasetWriter, FieldSpec
w = DatasetWriter(sys.argv[1], [FieldSpec("label", np.dtype("<u2"))])
w.append({"label": np.zeros(1000, "<u2")})
w._writers[0].f.flush()
print("ready", flush=True)
time.sleep(120)
"""


def test_temp_dir_of_killed_writer_removed(tmp_path):
    out = tmp_path / "ds"
    p = subprocess.Popen([sys.executable, "-c", _KILLED, str(out)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        [tmp] = leftovers(tmp_path)
        assert tmp.startswith(".ds.tmp-")
        # while its writer lives, another writer leaves it alone
        DatasetWriter(tmp_path / "ds", FIELDS).abort()
        assert leftovers(tmp_path) == [tmp]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        p.stdout.close()
    with DatasetWriter(out, FIELDS) as w:
        fill(w, 2, 5)
    assert leftovers(tmp_path) == []
    assert open_dataset(out).num_points == 2


def test_stale_markers(tmp_path):
    out = tmp_path / "ds"
    me = _publish.owner_record()
    cases = {
        ".ds.tmp-reused": dict(me, start="1"),       # our pid, other start time: pid reused
        ".ds.tmp-reboot": dict(me, boot="another"),  # written before a reboot
        ".ds.tmp-live": me,                          # a live writer (this process)
        ".ds.tmp-fresh": None,                       # no marker yet, just created
        ".ds.tmp-old": None,                         # no marker, untouched for long
    }
    for name, rec in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.bin").write_bytes(b"1")
        if rec is not None:
            (tmp_path / name / _publish.MARKER).write_text(json.dumps(rec))
    old = time.time() - 2 * _publish.UNMARKED_STALE_S
    os.utime(tmp_path / ".ds.tmp-old", (old, old))
    (tmp_path / ".other.tmp-x").mkdir()  # another dataset's: not ours to judge
    DatasetWriter(out, FIELDS).abort()
    assert leftovers(tmp_path) == [".ds.tmp-fresh", ".ds.tmp-live"]
    assert (tmp_path / ".other.tmp-x").is_dir()


def test_interrupted_overwrite_recovered(tmp_path, caplog):
    out = write(tmp_path / "ds")
    want = open_dataset(out).read("x")
    os.rename(out, tmp_path / ".ds.old-1234abcd")  # killed between the two renames
    with pytest.raises(DatasetError, match=r"ds: no such directory; .* in \.ds\.old-1234abcd"):
        open_dataset(out)
    with caplog.at_level("WARNING", logger="gds_stream._publish"):
        with pytest.raises(ConversionError, match="not empty"):
            DatasetWriter(out, FIELDS)
    assert "restoring the previous dataset" in caplog.text
    np.testing.assert_array_equal(open_dataset(out).read("x"), want)
    assert leftovers(tmp_path) == []
    # an .old-* beside an existing target is the rest of a finished replacement
    shutil.copytree(out, tmp_path / ".ds.old-5678")
    with DatasetWriter(out, FIELDS, overwrite=True) as w:
        fill(w, 1, 3)
    assert leftovers(tmp_path) == [] and open_dataset(out).num_points == 1


# -- B16: write failures name the output file ----------------------------------------------------
class _FullDisk:
    def __init__(self, f):
        self.f = f
        self.closed = False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.closed = True
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_disk_full_while_appending(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(ConversionError, match=r"ds/label.bin: writing 6 bytes failed "
                                              r"\(No space left on device\)"):
        with DatasetWriter(out, FIELDS) as w:
            w._writers[1].f = _FullDisk(w._writers[1].f)
            fill(w, 3, 1)
    assert not out.exists() and leftovers(tmp_path) == []


def test_disk_full_while_finishing(tmp_path, monkeypatch):
    from gds_stream import writer as writer_mod

    out = tmp_path / "ds"
    real = open

    def full(path, mode="r", *a, **k):
        f = real(path, mode, *a, **k)
        return _FullDisk(f) if str(path).endswith(MANIFEST) and "w" in mode else f

    monkeypatch.setattr(writer_mod, "open", full, raising=False)
    with pytest.raises(ConversionError, match=r"ds/manifest.json: writing the manifest failed "
                                              r"\(No space left on device\)"):
        with DatasetWriter(out, FIELDS) as w:
            fill(w, 3, 1)
    monkeypatch.undo()

    def enospc(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_publish, "publish", enospc)
    with pytest.raises(ConversionError, match=r"ds: moving the finished dataset into place failed"):
        with DatasetWriter(out, FIELDS) as w:
            fill(w, 3, 1)
    assert not out.exists() and leftovers(tmp_path) == []


# -- C: manifest fuzzing ---------------------------------------------------------------------------
_ODD_VALUES = [
    None, True, False, 0, 1, -1, 7, 4096, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30,
    -(10**30), 0.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "<f4", ">f4",
    "|u1", "<i8", "crc32", "gds-stream", "../x.bin", "/dev/zero", "x.bin", "label.bin",
    "manifest.json", ".", "a\0b", "é" * 3, "\ud7ff", "x" * 300, [], [0], [0, 0], [1, 2, 3],
    [0, 5, 5, 12], [[0, 0, 0]], {}, {"name": "q"}, {"algorithm": "crc32", "block_bytes": 4096},
]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):  # keep long checksum lists from dominating
            yield from _paths(v, prefix + (i,))


def _nested(rng, depth):
    v: object = int(rng.integers(0, 5))
    for _ in range(depth):
        v = [v] if rng.random() < 0.5 else {"k": v}
    return v


def _mutate_once(doc, rng) -> object:
    paths = list(_paths(doc))
    path = paths[int(rng.integers(len(paths)))]
    if not path:
        return _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))] if rng.random() < 0.1 else doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.integers(6)
    if op == 0:
        parent[key] = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
    elif op == 1 and isinstance(parent, dict):
        del parent[key]
    elif op == 2:
        parent[key] = _nested(rng, int(rng.choice([3, 50, 200])))
    elif op == 3 and isinstance(parent[key], list):
        lst = parent[key]
        if lst and rng.random() < 0.5:
            lst.pop(int(rng.integers(len(lst))))
        else:
            lst.append(lst[-1] if lst else 0)
    elif op == 4 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * int(rng.choice([-1, 2, 4096, 2**40])) + int(rng.integers(-2, 3))
    else:
        parent[key] = str(parent[key])[:50]
    return doc


def _fuzz_text(doc, rng) -> bytes:
    text = json.dumps(doc).encode()
    r = rng.random()
    if r < 0.05 and text:
        return text[:int(rng.integers(len(text)))]
    if r < 0.1 and text:
        i = int(rng.integers(len(text)))
        return text[:i] + bytes([int(rng.integers(256))]) + text[i + 1:]
    if r < 0.13:  # nesting deeper than the JSON encoder (or a recursive parser) can take
        depth = 100_000
        return text.replace(b": ", b": " + b"[" * depth + b"0" + b"]" * depth + b", \"pad\": ", 1)
    return text


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    out = write_chunked(root / "ds")
    doc = load(out)
    doc["origin"] = [1.0, 2.0, 3.0]
    save(out, doc)
    open_dataset(out)  # the base opens
    return out, doc


@pytest.mark.parametrize("block", range(4))
def test_manifest_fuzz(fuzz_base, block):
    out, base = fuzz_base
    rng = np.random.default_rng(1234 + block)
    opened = refusals = 0
    for case in range(150):
        doc: object = copy.deepcopy(base)
        for _ in range(int(rng.integers(1, 4))):
            doc = _mutate_once(doc, rng)
        (out / MANIFEST).write_bytes(_fuzz_text(doc, rng))
        t0 = time.monotonic()
        try:
            with open_dataset(out) as ds:
                for name in ds.schema:
                    assert len(ds.read(name)) == ds.num_points
                ds.verify()
                opened += 1
        except DatasetError:
            refusals += 1
        assert time.monotonic() - t0 < 20, f"case {case} of block {block} took too long"
    assert refusals > 100 and opened + refusals == 150


@pytest.mark.parametrize("damage", ["dev-zero", "sources", "fifo-field"])
def test_cli_reports_one_line_exit_2(tmp_path, damage):
    out = write(tmp_path / "ds", scans=(0,) if damage == "fifo-field" else (5, 0, 7))
    if damage == "dev-zero":
        (out / MANIFEST).unlink()
        (out / MANIFEST).symlink_to("/dev/zero")
    elif damage == "sources":
        mutate(out, _set("sources", 0))
    else:
        (out / "x.bin").unlink()
        os.mkfifo(out / "x.bin")
    cmd = "info" if damage == "dev-zero" else "verify"
    r = subprocess.run([sys.executable, "-m", "gds_stream", cmd, str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(out) in r.stderr


def test_writer_and_publish_do_not_import_each_other():
    """The rule both use (check_output_dir) lives in the lower module, _publish."""
    import ast

    import gds_stream._publish as pub
    import gds_stream.writer as wr

    def imported(mod) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(Path(mod.__file__).read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add((node.module or "") if node.level == 0 else
                          "." * node.level + (node.module or ""))
                names.update("." * node.level + a.name for a in node.names if not node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert not {n for n in imported(pub) if n.endswith("writer")}, imported(pub)
    assert "._publish" in imported(wr)
    assert wr.check_output_dir is pub.check_output_dir


def test_a_hostile_file_name_stays_on_one_line(tmp_path):
    """A field's file name holding a newline and a terminal escape: the error escapes it, and
    the CLI's refusal is one line that sends nothing to the terminal."""
    out = write(tmp_path / "ds")
    doc = load(out)
    doc["fields"][0]["file"] = "x\nsecond line \x1b[31mRED\x1b[0m.bin"
    save(out, doc)
    err = refused(out, "no such file")
    assert "\n" not in str(err) and "\x1b" not in str(err) and "\\n" in str(err)
    r = subprocess.run([sys.executable, "-m", "gds_stream", "info", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "\x1b" not in r.stderr, r.stderr
    assert "no such file" in r.stderr


def test_dataset_read_refuses_a_file_written_in_place_since_open(tmp_path):
    out = write(tmp_path / "ds")
    ds = open_dataset(out)
    try:
        before = ds.read("label")
        lay = ds.layout("label")
        path = out / lay.file
        data = bytearray(path.read_bytes())
        data[lay.offset] ^= 0xFF  # same size, other bytes, written in place
        with open(path, "r+b") as f:
            f.write(data)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock
        with pytest.raises(DatasetError, match="written in place") as info:
            ds.read("label")
        assert str(path) in str(info.value)
        assert len(before) == ds.num_points
    finally:
        ds.close()
