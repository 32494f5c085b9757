"""Shuffle windows, on the loader's side: one backend read per window, batches gathered from it.

With ``shuffle_window`` (points mode, shuffle on) the planner groups a rank's steps into windows,
each one contiguous span of the epoch's block-shuffled stream whose points are permuted as a
whole (:meth:`gds_stream.plan.EpochPlan.window`). A backend reads a window exactly like an
unshuffled batch — the same few large, aligned reads, into its own buffers (a pinned slot and a
device slab, or a GPU-direct staging slab) — and the core cuts each batch out of it with one
gather per field on the batch's device, by the plan's rows. The gathered tensors are new: the
consumer owns them, and the window is dropped after its last batch. Both backends read the same
bytes and gather by the same rows, so their batches are bit-identical.

On a CPU a window of several fields is first packed into rows (:func:`pack_window`): the
fields of a point side by side, a row padded to 1, 2, 4, 8 or a multiple of 16 bytes. A batch is
then one gather of whole rows — one cache line per point instead of one per field, which is what
a random gather over a window far larger than the caches costs — and one streaming split of the
gathered rows into the batch's fields.

Memory: the window being consumed (packed on a CPU: ``shuffle_window × row bytes``) and the next
one, read ahead, each with its row permutation (int32 below 2³¹ rows): about
``2 × shuffle_window × (row bytes + 4)``, plus the batch being gathered and the batches the
consumer holds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._hostmem import anon_buffer
from .slab import from_int_rows, gather_field_rows, int_rows, torch_int

_ALIGN = 4096


class PackedWindow:
    """A CPU window's fields packed side by side into rows (see the module docstring).

    ``rows`` is an ``(n, width)`` uint8 array; each field sits at a byte offset that is a
    multiple of its element size (fields placed widest element first), so every field is a
    strided integer view of ``rows``. All copies here are numpy's, on the calling thread: many
    small torch copies would each wake torch's intra-op threads, which on a loaded machine
    costs more than the copy."""

    __slots__ = ("rows", "fields", "names")

    def __init__(self, rows: np.ndarray, fields: list[tuple[str, Any, tuple[int, ...], int, int]],
                 names: list[str]):
        self.rows = rows
        #: (name, torch dtype, row shape, byte offset in the row, element size), packing order
        self.fields = fields
        #: the window's field names in their original order (a batch's key order)
        self.names = names


def pack_window(window: dict[str, Any], reuse: Any = None) -> "PackedWindow | dict[str, Any]":
    """``window`` (CPU torch tensors, rows along dim 0) packed into rows; a window of one field
    is returned as it is (its gather already touches one cache line per point). ``reuse``: the
    previous window of the epoch, no longer used — its rows' memory is packed into again when
    it is large enough (batches are copies, nothing else views it)."""
    import torch

    if len(window) < 2:
        return window
    n = int(next(iter(window.values())).shape[0])
    if n == 0:
        return window
    order = sorted(window.items(), key=lambda kv: -kv[1].element_size())
    fields, pos = [], 0
    for name, t in order:
        es = t.element_size()
        fields.append((name, t.dtype, tuple(t.shape[1:]), pos, es))
        pos += t[:1].numel() * es
    width = next((w for w in (1, 2, 4, 8, 16) if pos <= w), -(-pos // 16) * 16)
    if isinstance(reuse, PackedWindow) and reuse.rows.size >= n * width:
        rows = reuse.rows.reshape(-1)[:n * width].reshape(n, width)
    else:
        rows = anon_buffer(n * width).reshape(n, width)
    views = []
    for (name, dtype, shape, off, es), (_, t) in zip(fields, order):
        k = t[:1].numel()
        src = t.reshape(n, k).view(torch_int(torch, es)).numpy()
        views.append((_columns(rows, off, es, k), src))
    # block by block, every field: a block of rows stays in cache while its fields land
    block = max(1, _PACK_BYTES // width)
    for a in range(0, n, block):
        for dst, src in views:
            dst[a:a + block] = src[a:a + block]
    return PackedWindow(rows, fields, list(window))


def _columns(rows: np.ndarray, off: int, es: int, k: int) -> np.ndarray:
    """The ``k`` items of ``es`` bytes at byte ``off`` of every row, as an integer view."""
    width = rows.shape[1]
    return rows.view(f"<i{es}").reshape(rows.shape[0], width // es)[:, off // es:off // es + k]


#: Bytes of rows moved at a time (all fields of a block land, or leave, while it is in cache).
_PACK_BYTES = 1 << 20


def _gather_packed(win: PackedWindow, rows: np.ndarray) -> dict[str, Any]:
    """The batch of ``rows`` of a packed window, a block of rows at a time: whole rows gathered
    (one item of ``width`` bytes each) into a small scratch that stays in cache, then each
    field copied out of it into one anonymous mapping of the batch's own (from the recycled
    pool: no allocator heap grows)."""
    import torch

    n, width = win.rows.shape
    m = len(rows)
    sizes = [_aligned(m * math.prod(shape) * es) for _, _, shape, _, es in win.fields]
    buf = anon_buffer(sum(sizes))
    dsts, pos = [], 0
    for (name, dtype, shape, off, es), size in zip(win.fields, sizes):
        k = math.prod(shape)
        dsts.append(buf[pos:pos + m * k * es].view(f"<i{es}").reshape(m, k))
        pos += size
    block = max(1, _PACK_BYTES // width)
    # one row at least: torch cannot view an empty byte matrix as wider integers
    scratch = np.empty((max(1, min(block, m)), width), dtype=np.uint8)
    if width <= 16:  # a row is one integer (complex128 for 16 bytes): torch's 1-D gather,
        one = torch.complex128 if width == 16 else torch_int(torch, width)  # serial, fastest
        src = torch.from_numpy(win.rows).view(one).view(n)
        into = torch.from_numpy(scratch).view(one).view(-1)
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    else:  # a row is one numpy void item
        item = np.dtype((np.void, width))
        src_np, into_np = win.rows.view(item).reshape(n), scratch.view(item).reshape(-1)
    for a in range(0, m, block):
        b = min(m, a + block)
        got = scratch[:b - a]
        if width <= 16:
            torch.index_select(src, 0, idx[a:b], out=into[:b - a])
        else:
            np.take(src_np, rows[a:b], out=into_np[:b - a])
        for (name, dtype, shape, off, es), dst in zip(win.fields, dsts):
            dst[a:b] = _columns(got, off, es, dst.shape[1])
    out = {name: torch.from_numpy(dst).view(dtype).view((m, *shape))
           for (name, dtype, shape, _, _), dst in zip(win.fields, dsts)}
    return {name: out[name] for name in win.names}


def gather_rows(window: "dict[str, Any] | PackedWindow", rows: np.ndarray) -> dict[str, Any]:
    """The batch made of ``rows`` of every tensor of ``window`` (torch tensors of one device,
    or a CPU window packed by :func:`pack_window`), in the window's field order.

    On CUDA the index goes to the device from pinned memory asynchronously, and the gathers
    run on the current stream, so nothing here waits for the device. On the CPU the batch is
    gathered into one anonymous mapping of its own (freed as soon as the consumer drops it)."""
    import torch

    if isinstance(window, PackedWindow):
        return _gather_packed(window, rows)
    idx = torch.from_numpy(np.ascontiguousarray(rows))
    first = next(iter(window.values()))
    cuda = first.device.type == "cuda"
    if cuda:
        idx = idx.pin_memory().to(first.device, non_blocking=True)
        stream = torch.cuda.current_stream(first.device)
        for t in window.values():  # the window is read on this stream too, maybe a new one:
            t.record_stream(stream)  # its memory is not reused before these gathers ran
        # fields of equal width that sit equally spaced in the window's slab: one launch each
        n, m = int(first.shape[0]), len(rows)
        gathered = gather_field_rows(
            [t.reshape(n, -1).view(torch.uint8) for t in window.values()], idx)
        return {name: g.view(t.dtype).view((m, *t.shape[1:]))
                for (name, t), g in zip(window.items(), gathered)}
    sizes = [_aligned(len(rows) * t[:1].numel() * t.element_size()) for t in window.values()]
    buf = torch.from_numpy(anon_buffer(sum(sizes)))
    out, pos = {}, 0
    m = len(rows)
    for name, t in window.items():
        src = int_rows(torch, t)  # one integer per row where it fits: torch's fast 1-D gather
        nbytes = m * src[:1].numel() * src.element_size()
        g = buf[pos:pos + nbytes].view(src.dtype).view((m, *src.shape[1:]))
        torch.index_select(src, 0, idx, out=g)
        pos += _aligned(nbytes)
        out[name] = from_int_rows(torch, g, t.dtype, tuple(t.shape[1:]))
    return out


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
