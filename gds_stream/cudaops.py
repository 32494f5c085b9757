"""The few CUDA operations both backends use, in one place (tests swap in a CPU model).

Three rules live here (each checked against the sources they come from):

* **The loader's streams are its own.** ``torch.cuda.Stream()`` hands out one of 32 pooled
  streams per device round-robin (c10 ``CUDAStream.cpp``: ``kStreamsPerPool``, ``get_idx``), so
  a stream taken per epoch walks the pool and sooner or later is the training loop's side
  stream or the one NCCL uses. :meth:`CudaOps.new_stream` creates a ``cudaStreamNonBlocking``
  stream outside that pool (through ``cuda.bindings``, CuPy, or the CUDA runtime torch already
  loaded, whichever is importable), wraps it in ``torch.cuda.ExternalStream`` and
  :meth:`CudaOps.destroy_stream` destroys it when the loader closes.
* **Every thread that issues CUDA or cuFile calls binds the device first**
  (:meth:`CudaOps.bind`): KvikIO's ``read_async`` pushes no context (``cpp/src/file_handle.cpp``,
  unlike ``pread``), and a fresh thread has none; ``cudaSetDevice`` makes the device's primary
  context current (CUDA ≥ 12).
* **Waits are on our own events**: events are created ``blocking=True`` (a waiting thread
  sleeps); nothing here synchronises a stream or the device.

Nothing here imports cupy or kvikio at module import.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

_NON_BLOCKING = 1  # cudaStreamNonBlocking


class _Runtime:
    """cudaSetDevice / cudaStreamCreateWithFlags / cudaStreamDestroy through whichever binding
    is importable: ``cuda.bindings`` (cuda-python), CuPy, or the CUDA runtime library torch
    loaded (ctypes)."""

    def __init__(self) -> None:
        self.kind, self._api = self._find()

    @staticmethod
    def _find() -> tuple[str, Any]:
        try:
            from cuda.bindings import runtime as cudart  # type: ignore

            return "cuda.bindings", cudart
        except ImportError:
            pass
        try:
            import cupy  # type: ignore

            return "cupy", cupy
        except ImportError:
            pass
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                return "libcudart", ctypes.CDLL(name)
            except OSError:
                continue
        return "none", None

    def set_device(self, index: int) -> None:
        if self.kind == "cuda.bindings":
            (err,) = self._api.cudaSetDevice(index)
            _check(int(err), "cudaSetDevice")
        elif self.kind == "cupy":
            self._api.cuda.runtime.setDevice(index)
        elif self.kind == "libcudart":
            _check(self._api.cudaSetDevice(ctypes.c_int(index)), "cudaSetDevice")
        else:
            import torch

            torch.cuda.set_device(index)

    def create_stream(self) -> tuple[int, Callable[[], None]] | None:
        """A new non-blocking stream on the current device: (handle, destroy), or None when no
        binding is there."""
        if self.kind == "cuda.bindings":
            err, s = self._api.cudaStreamCreateWithFlags(_NON_BLOCKING)
            _check(int(err), "cudaStreamCreateWithFlags")
            return int(s), lambda: self._api.cudaStreamDestroy(s)
        if self.kind == "cupy":
            s = self._api.cuda.Stream(non_blocking=True)
            holder = [s]
            return int(s.ptr), holder.clear  # CuPy destroys the stream with the object
        if self.kind == "libcudart":
            h = ctypes.c_void_p()
            _check(self._api.cudaStreamCreateWithFlags(ctypes.byref(h),
                                                       ctypes.c_uint(_NON_BLOCKING)),
                   "cudaStreamCreateWithFlags")
            return int(h.value or 0), lambda: self._api.cudaStreamDestroy(h)
        return None


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed with CUDA error {err}")


_RUNTIME: _Runtime | None = None


def runtime() -> _Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _Runtime()
    return _RUNTIME


class CudaOps:
    """CUDA operations on one device, for one loader."""

    def __init__(self, torch: Any, device: Any):
        self.torch, self.device = torch, device
        self._destroy: dict[int, Callable[[], None]] = {}

    # -- threads and streams ------------------------------------------------------------------
    def bind(self) -> None:
        """Make the device's primary context current in the calling thread (first thing in
        every thread that issues CUDA or cuFile calls)."""
        runtime().set_device(self.device.index)

    def new_stream(self) -> Any:
        """A non-blocking stream of the loader's own (not from torch's pool)."""
        torch = self.torch
        with torch.cuda.device(self.device):
            made = runtime().create_stream()
        if made is None:  # pragma: no cover - torch always loads a CUDA runtime
            log.warning("no CUDA runtime binding found: the loader's stream comes from torch's "
                        "stream pool (install cuda-python or cupy)")
            return torch.cuda.Stream(device=self.device)
        handle, destroy = made
        stream = torch.cuda.ExternalStream(handle, device=self.device)
        self._destroy[handle] = destroy
        return stream

    def destroy_stream(self, stream: Any) -> None:
        """Destroy a stream made by :meth:`new_stream` (its queued work still completes)."""
        destroy = self._destroy.pop(self.raw_stream(stream), None)
        if destroy is not None:
            destroy()

    def current_stream(self) -> Any:
        return self.torch.cuda.current_stream(self.device)

    def use_stream(self, stream: Any) -> Any:
        return self.torch.cuda.stream(stream)

    def new_event(self) -> Any:
        return self.torch.cuda.Event(blocking=True)

    def raw_stream(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    # -- memory -------------------------------------------------------------------------------
    def device_empty(self, nbytes: int, dtype: Any) -> Any:
        """From torch's caching allocator, ordered on the current stream."""
        return self.torch.empty(nbytes, dtype=dtype, device=self.device)

    def pinned_empty(self, nbytes: int, dtype: Any) -> Any:
        return self.torch.empty(nbytes, dtype=dtype, pin_memory=True)

    def copy_async(self, dst: Any, src: Any) -> None:
        """On the current stream."""
        dst.copy_(src, non_blocking=True)

    def record_stream(self, tensor: Any, stream: Any) -> None:
        tensor.record_stream(stream)

    # -- CuPy: device buffers over torch's memory --------------------------------------------
    def as_cupy(self, tensor: Any) -> Any:
        """A CuPy uint8 array over ``tensor``'s memory (from torch's caching allocator: one
        pool); the array keeps the tensor alive. KvikIO reads into it."""
        import cupy

        nbytes = tensor.numel() * tensor.element_size()
        mem = cupy.cuda.UnownedMemory(tensor.data_ptr(), nbytes, tensor, self.device.index)
        return cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))


def to_cupy(batch: dict) -> dict:
    """``output="cupy"``: each tensor of a batch as a CuPy array (zero copy, DLPack), exported
    while CuPy's current stream is torch's current one, so nothing waits."""
    import cupy
    import torch

    first = next(iter(batch.values()), None)
    if first is None or first.device.type != "cuda":
        return batch
    raw = torch.cuda.current_stream(first.device).cuda_stream
    with cupy.cuda.ExternalStream(raw, first.device.index):
        return {k: cupy.from_dlpack(v) for k, v in batch.items()}
