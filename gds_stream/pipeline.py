"""The batch pipeline: what the loader does to a batch after its bytes are unpacked.

Per yielded batch, in this order: gather/unpack (the backend) → ``transform`` → ``stack``.

* ``transform(batch, generator) -> batch``: any callable taking the batch dict and a fresh
  ``torch.Generator`` on the batch's device seeded with :func:`batch_seed` ``(seed, epoch, rank,
  step)``, so the same arguments give bit-identical batches and a resumed epoch yields exactly
  the batches of the uninterrupted one. A batch in points mode has no ``"offset"``: a transform
  treats it as one unit. An exception it raises surfaces as :class:`LoaderError` at ``next()``
  (cause chained).
* ``stack={"feat": ["x", "y", "z", "intensity"]}``: the named tensors (1-D, or ``(n, k)``,
  contributing ``k`` columns) are cast to ``dtype`` (default ``torch.float32``) and written
  column by column into one ``(n, columns)`` tensor under the new key; the stacked source
  tensors are dropped from the batch. A stack key may not shadow a field of the dataset or a
  batch key (``offset``, ``chunk``).
* ``stack_layout="rows"`` (default): the stacked tensor is row-major (``is_contiguous()``), each
  point's values side by side — an interleave, one pass over the batch in which every value
  moves on its own. ``"columns"``: the same ``(n, columns)`` values, column-major (``t.t()`` is
  contiguous); torch's ops (``nn.Linear``, indexing, ``cat``) take it as it is, and a backend
  can read a field straight into its column: the fallback on a CPU device does, for batches in
  file order without a ``transform`` (a field of another dtype is read beside and cast into its
  column), so the stack costs no pass over the batch.

Where it runs: on a CPU device in the loader's pipeline thread, never in the consumer's
``next()`` (except when the loader reads inline on the consumer's thread, see
``loader.backend_reason``); on CUDA queued on the loader's own stream right after the batch
lands, the consumer's stream waiting on an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .errors import LoaderError

#: Keys the loader itself adds to batches (a stack key may not take them).
BATCH_KEYS = ("offset", "chunk")
#: The layouts of a stacked tensor (``stack_layout=``).
STACK_LAYOUTS = ("rows", "columns")

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijective, well-avalanching mix of 64 bits."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
    return z ^ (z >> 31)


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The seed of one batch's transform generator: a stable 63-bit mix of its four arguments
    (the same on every platform, Python and numpy version; distinct arguments give unrelated
    seeds)."""
    h = 0x6A09E667F3BCC908
    for v in (seed, epoch, rank, step):
        h = _mix64((h + (int(v) & _M64) + 0x9E3779B97F4A7C15) & _M64)
    return h >> 1


@dataclass(frozen=True)
class Pipeline:
    """A loader's checked ``transform``/``stack``/``dtype``; :meth:`apply` runs them on one
    batch."""

    transform: Callable[..., Any] | None
    stack: tuple[tuple[str, tuple[str, ...]], ...]
    dtype: Any
    where: str  # the dataset, for messages
    layout: str = "rows"  # of the stacked tensors: "rows" (row-major) or "columns"

    def apply(self, batch: dict, seed: int, epoch: int, rank: int, step: int,
              stacked: bool = False) -> dict:
        """The pipeline on one batch; ``stacked``: the backend already built the stacked
        tensors (a fused read, see :attr:`fusable`), so only the transform (none then) runs."""
        if self.transform is not None:
            batch = self._transform(batch, seed, epoch, rank, step)
        if self.stack and not stacked:
            batch = self._stack(batch, epoch, step)
        return batch

    @property
    def fusable(self) -> bool:
        """Whether a backend may build the stacked tensors as it reads: column-major stacks of
        the fields as loaded (no transform between the read and the stack)."""
        return bool(self.stack) and self.transform is None and self.layout == "columns"

    def _transform(self, batch: dict, seed: int, epoch: int, rank: int, step: int) -> dict:
        import torch

        device = next(iter(batch.values())).device if batch else torch.device("cpu")
        gen = torch.Generator(device=device)
        gen.manual_seed(batch_seed(seed, epoch, rank, step))
        name = getattr(self.transform, "__name__", type(self.transform).__name__)
        try:
            out = self.transform(batch, gen)
        except LoaderError:
            raise
        except Exception as exc:
            raise LoaderError(f"{self.where}: transform {name} failed on batch {step} of epoch "
                              f"{epoch}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, dict):
            raise LoaderError(f"{self.where}: transform {name} returned a "
                              f"{type(out).__name__} for batch {step} of epoch {epoch}; it must "
                              f"return the batch dict (str -> torch.Tensor)")
        return out

    def _stack(self, batch: dict, epoch: int, step: int) -> dict:
        import torch

        out = dict(batch)
        drop: set[str] = set()
        for key, names in self.stack:
            cols, n = [], None
            for name in names:
                t = batch.get(name)
                if not isinstance(t, torch.Tensor):
                    raise LoaderError(
                        f"{self.where}: stack {key!r} needs {name!r}, which batch {step} of epoch "
                        f"{epoch} does not hold (keys: {', '.join(batch)})")
                if t.dim() not in (1, 2) or (n is not None and t.shape[0] != n):
                    raise LoaderError(
                        f"{self.where}: stack {key!r}: {name!r} has shape {tuple(t.shape)}; "
                        f"stacked tensors must be (n,) or (n, k) with one n"
                        + (f" (the first had n={n})" if n is not None else ""))
                n = int(t.shape[0])
                cols.append(t)
            width = sum(1 if t.dim() == 1 else int(t.shape[1]) for t in cols)
            # (n, width) either way; "columns": the transpose of a (width, n) tensor
            shape = (width, n or 0) if self.layout == "columns" else (n or 0, width)
            dst = _stack_buffer(torch, shape, self.dtype, cols[0].device)
            if self.layout == "columns":
                dst = dst.t()
            j = 0
            for t in cols:
                k = 1 if t.dim() == 1 else int(t.shape[1])
                dst[:, j:j + k].copy_(t.view(-1, 1) if t.dim() == 1 else t)
                j += k
            out[key] = dst
            drop.update(names)
        for name in drop:
            out.pop(name, None)
        return out


def _stack_buffer(torch: Any, shape: tuple[int, int], dtype: Any, device: Any) -> Any:
    """An uninitialised tensor for a stack (every element is written). On a CPU device it lies
    in a recycled host buffer (:func:`gds_stream._hostmem.anon_buffer`), which returns to the
    pool when the batch's last view of it dies. A batch-sized tensor allocated afresh may be
    faulted in page by page on every batch: with torch's huge-page allocations
    (``THP_MEM_ALLOC_ENABLE=1``) each 2 MiB page is zeroed, and often compacted first, per batch.
    Loader-only, 4 M points of six float32 fields stacked row-major in batches of 250,000, that
    took the epoch from 17 ms to 28-33 ms on the development VM. On CUDA: torch's caching
    allocator."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    from ._hostmem import anon_buffer

    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.from_numpy(anon_buffer(shape[0] * shape[1] * size))
    return raw.view(dtype).view(shape)


def make_pipeline(where: str, schema: Sequence[str], fields: Sequence[str], transform: Any,
                  stack: Any, dtype: Any, stack_layout: Any = "rows") -> Pipeline | None:
    """Check ``transform=``, ``stack=``, ``dtype=`` and ``stack_layout=`` (a
    :class:`LoaderError` naming the problem); None when there is nothing to do."""
    if stack_layout is None:  # None: the default, as for every option
        stack_layout = "rows"
    if stack_layout not in STACK_LAYOUTS:
        raise LoaderError(f"stack_layout= must be one of {', '.join(map(repr, STACK_LAYOUTS))}, "
                          f"got {stack_layout!r}")
    if transform is not None and not callable(transform):
        raise LoaderError(f"transform= must be a callable transform(batch, generator) -> batch, "
                          f"got {transform!r} ({type(transform).__name__})")
    if stack is None:
        if dtype is not None:
            raise LoaderError("dtype= is the dtype of the stack= tensors; give stack= too "
                              "(e.g. stack={'feat': ['x', 'y', 'z']}, dtype=torch.float32)")
        if stack_layout != "rows":
            raise LoaderError(f"stack_layout={stack_layout!r} is the layout of the stack= "
                              f"tensors; give stack= too (e.g. stack={{'feat': ['x', 'y', 'z']}})")
        return None if transform is None else Pipeline(transform, (), None, where)
    if not isinstance(stack, Mapping) or not stack:
        raise LoaderError(f"stack= must be a non-empty dict of new key -> list of field names, "
                          f"e.g. {{'feat': ['x', 'y', 'z']}}, got {stack!r}")
    items = []
    for key, names in stack.items():
        if not isinstance(key, str) or not key:
            raise LoaderError(f"stack= keys must be non-empty strings, got {key!r}")
        if key in schema or key in BATCH_KEYS:
            what = "a field of the dataset" if key in schema else "a key the loader adds"
            raise LoaderError(f"stack= key {key!r} would shadow {what}; choose another name")
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise LoaderError(f"stack[{key!r}] must be a non-empty list of field names, "
                              f"got {names!r}")
        bad = [x for x in names if not isinstance(x, str)]
        if bad:
            raise LoaderError(f"stack[{key!r}] names fields by their names (strings), "
                              f"got {bad[0]!r}")
        if len(set(names)) != len(names):
            raise LoaderError(f"stack[{key!r}] names a field twice: {list(names)}")
        if transform is None:  # without a transform the batch holds exactly the fields
            missing = [x for x in names if x not in fields]
            if missing:
                raise LoaderError(
                    f"{where}: stack[{key!r}] names {', '.join(map(repr, missing))}, not among "
                    f"the loaded fields ({', '.join(fields)})")
        items.append((key, tuple(names)))
    import torch

    if dtype is None:
        dtype = torch.float32
    elif not isinstance(dtype, torch.dtype):
        raise LoaderError(f"dtype= must be a torch.dtype (e.g. torch.float32), got {dtype!r}")
    return Pipeline(transform, tuple(items), dtype, where, stack_layout)
