"""What this machine can do for the GPU-direct path, probed once and reported truthfully.

Three global answers: ``gds`` (KvikIO reads through GPUDirect Storage: cuFile and the nvidia-fs driver
are there), ``gds-compat`` (KvikIO runs, but in compat mode: POSIX reads, no direct DMA), or
unavailable, with the reason (no CUDA device, no kvikio). KvikIO also decides per file (:func:`file_route`): a file on a
filesystem where O_DIRECT or cuFile registration fails is read in compat mode even where the
global answer is ``gds``. Nothing here imports cupy or kvikio before it is called.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import platform
import sys
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'gds-stream[gpu]'"
NVIDIA_FS_PROC = "/proc/driver/nvidia-fs"


@dataclass(frozen=True)
class GDSCapability:
    """The probe's verdict. ``mode`` is "gds", "gds-compat" or "unavailable"."""

    mode: str
    reason: str  # why unavailable, or why compat instead of true GDS; "" for true GDS
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.mode != "unavailable"


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:
        return None


def _cuda_device_reason() -> str | None:
    """None when torch sees a CUDA device, else why not."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (no NVIDIA driver or no GPU)"
    return None


@functools.cache
def probe_gds() -> GDSCapability:
    """Can the GPU-direct backend run here, and in which mode? Cached for the process."""
    versions: dict[str, str] = {}
    reason = _cuda_device_reason()
    if reason is not None:
        return GDSCapability("unavailable", reason, versions)
    try:
        import kvikio
        import kvikio.defaults
    except ImportError as exc:
        return GDSCapability("unavailable", f"kvikio is not installed ({exc}); {INSTALL_HINT}",
                             versions)
    except Exception as exc:
        return GDSCapability("unavailable", f"kvikio failed to import: {exc}", versions)
    versions["kvikio"] = kvikio.__version__
    compat_reason = _compat_reason(kvikio)
    if compat_reason is None:
        return GDSCapability("gds", "", versions)
    return GDSCapability("gds-compat", compat_reason, versions)


def probe_remote() -> tuple[bool, str]:
    """Can KvikIO read object-store ranges here (``kvikio.RemoteFile``)? ``(True, "")``, or
    ``(False, why not)``: it needs what the GPU-direct backend needs (a CUDA device, kvikio)
    and a KvikIO built with remote-file support. Never true on a CPU-only machine."""
    cap = probe_gds()
    if not cap.available:
        return False, cap.reason
    try:
        import kvikio

        version = getattr(kvikio, "__version__", "?")
        ok = bool(kvikio.is_remote_file_available())
    except Exception as exc:  # noqa: BLE001 - an older kvikio has no such probe
        return False, f"this kvikio cannot read remote files ({exc})"
    if not ok:
        return False, f"kvikio {version} was built without remote-file support (libcurl)"
    return True, ""


def _compat_reason(kvikio) -> str | None:
    """None when KvikIO will use GPUDirect Storage proper, else why it runs in compat mode."""
    setting = os.environ.get("KVIKIO_COMPAT_MODE", "").upper()
    if setting in ("ON", "TRUE", "YES", "1"):
        return "KVIKIO_COMPAT_MODE=ON forces compat mode"
    gds_available = None
    try:
        import kvikio.cufile_driver

        gds_available = bool(kvikio.cufile_driver.get("is_gds_available"))
    except Exception as exc:  # libcufile missing or too old
        log.debug("cuFile driver query failed: %s", exc)
        return f"the cuFile library is unavailable ({exc})"
    try:
        preferred = bool(kvikio.defaults.is_compat_mode_preferred())
    except Exception as exc:  # pragma: no cover - very old kvikio
        log.debug("is_compat_mode_preferred failed: %s", exc)
        preferred = not gds_available
    if gds_available and not preferred:
        return None
    if not os.path.exists(NVIDIA_FS_PROC):
        how = ("KvikIO still calls cuFile, which runs its own compat mode" if not preferred
               else "KvikIO runs its POSIX compat mode")
        return f"the nvidia-fs kernel module is not loaded ({NVIDIA_FS_PROC} is absent); {how}"
    if preferred and not os.access("/run/udev", os.R_OK):
        return "/run/udev is not readable, so KvikIO's AUTO mode resolves to compat"
    if not gds_available:
        return "cuFile reports GPUDirect Storage unavailable on this system"
    return "KvikIO prefers compat mode for this system's configuration"


def environment_report() -> list[tuple[str, str]]:
    """Rows for ``gds-stream env``: versions, device, and GDS vs compat, each with its reason."""
    import numpy

    from . import __version__

    rows = [
        ("gds-stream", __version__),
        ("python", f"{sys.version.split()[0]} ({platform.machine()}, {platform.system()})"),
        ("numpy", numpy.__version__),
    ]
    try:
        import torch

        rows.append(("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"))
        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            p = torch.cuda.get_device_properties(i)
            rows.append(("cuda device", f"{p.name} (sm_{p.major}{p.minor}, "
                                        f"{p.total_memory / 2**30:.1f} GiB), {torch.cuda.device_count()} visible"))
        else:
            rows.append(("cuda device", f"none: {_cuda_device_reason()}"))
    except ImportError:  # pragma: no cover
        rows.append(("torch", "not installed"))
    cap = probe_gds()
    v = cap.versions.get("kvikio") or _version("kvikio")
    rows.append(("kvikio", v if v else f"not installed ({INSTALL_HINT})"))
    if cap.mode == "gds":
        rows.append(("GPUDirect", "available: KvikIO reads through GPUDirect Storage (cuFile + "
                                  "nvidia-fs); decided per file when a loader opens them"))
    elif cap.mode == "gds-compat":
        rows.append(("GPUDirect", f"not available: {cap.reason}; backend='gds' would run KvikIO "
                                  f"in compat mode (POSIX reads, no direct DMA)"))
    else:
        rows.append(("GPUDirect", f"not available: {cap.reason}"))
    if cap.available:
        rows.append(("cuFile allow_compat_mode", cufile_allow_compat()))
    rows.append(("backend auto", auto_choice(cap)))
    ok, why = probe_remote()
    rows.append(("object storage", "KvikIO's RemoteFile on a CUDA device (settings from the AWS "
                 "environment, no block cache), else the fallback through obstore" if ok else
                 f"the fallback through obstore (KvikIO's RemoteFile unavailable: {why})"))
    return rows


def auto_choice(cap: GDSCapability) -> str:
    """What ``backend="auto"`` picks for a CUDA device here, and why (one line)."""
    if cap.mode == "gds":
        return "gds (GPUDirect Storage is available)"
    if cap.mode == "gds-compat":
        return (f"fallback (GPUDirect Storage is not available: {cap.reason}; compat mode is "
                f"POSIX reads plus bounce-buffer copies, which the fallback does itself)")
    return f"fallback (GPU-direct unavailable: {cap.reason})"


#: Filesystems on which cuFile cannot register a file handle (KvikIO's AUTO mode then reads
#: the file in compat mode).
NO_GDS_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "overlay", "squashfs", "proc", "sysfs"})


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding ``path`` (longest mount point in /proc/self/mounts)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for m in mounts:
        if len(m) < 3:
            continue
        point = m[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, m[2]
    return kind


def cufile_config_path() -> str:
    """Where cuFile's config lives, as KvikIO looks it up (``cpp/src/cufile/config.cpp``):
    ``CUFILE_ENV_PATH_JSON`` if that file exists, else ``/etc/cufile.json``, else ""."""
    env = os.environ.get("CUFILE_ENV_PATH_JSON")
    if env and os.path.exists(env):
        return env
    return "/etc/cufile.json" if os.path.exists("/etc/cufile.json") else ""


def file_route(cap: GDSCapability, cufile, path: str) -> tuple[str, str]:
    """How the GPU-direct backend reads one opened file: ("gds", "") when KvikIO reads it
    through GPUDirect Storage on a stream of ours, else ("host", why) — KvikIO reads it into
    pinned host memory and the loader copies it on its own stream.

    KvikIO decides compat mode per file (``CompatModeManager``, ``cpp/src/compat_mode_manager
    .cpp``): under ``AUTO`` an O_DIRECT open or a cuFile handle registration that fails puts
    the file in compat mode silently, and with no cuFile config its async reads run in compat
    mode. :func:`open_for_route` opens files with compat mode OFF, so the first two raise there;
    this function adds the checks an open cannot make (the filesystems named below, where
    cuFile's own compat mode may still serve a registered file, and the config).
    """
    if cap.mode != "gds":
        return "host", cap.reason or f"GPUDirect mode is {cap.mode}"
    try:
        direct = bool(cufile.is_direct_io_supported())
    except AttributeError:  # older KvikIO: try the O_DIRECT open ourselves
        direct = _opens_direct(path)
    if not direct:
        return "host", f"{path}: opening with O_DIRECT failed, so KvikIO reads it in compat mode"
    fs = filesystem_type(path)
    if fs is not None and (fs in NO_GDS_FILESYSTEMS or fs.startswith("fuse")):
        return "host", f"{path} is on {fs}, where cuFile cannot register files (compat mode)"
    if not cufile_config_path():
        return "host", ("no cuFile config (CUFILE_ENV_PATH_JSON or /etc/cufile.json), so KvikIO "
                        "runs stream-ordered reads in compat mode")
    return "gds", ""


def _opens_direct(path: str) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    os.close(fd)
    return True


#: KvikIO's compat mode is a process-wide default read when a ``CuFile`` is opened: changed and
#: restored under this lock, so two loaders opening files at once do not see each other's.
_COMPAT_LOCK = threading.Lock()


def _open_compat_off(kvikio, path: str):
    """``kvikio.CuFile(path)`` with compat mode OFF: raises where the file cannot do GDS (an
    O_DIRECT open or a cuFile registration that fails; under AUTO, KvikIO would switch the file
    to compat mode silently, ``cpp/src/compat_mode_manager.cpp``)."""
    with _COMPAT_LOCK:
        old = kvikio.defaults.get("compat_mode")
        kvikio.defaults.set("compat_mode", kvikio.CompatMode.OFF)
        try:
            return kvikio.CuFile(path, "r")
        finally:
            kvikio.defaults.set("compat_mode", old)


def open_for_route(cap: GDSCapability, kvikio, path: str,
                   open_path: str | None = None) -> tuple[object, str, str]:
    """Open ``path`` for the GPU-direct backend: (CuFile, route, why not gds).

    ``open_path`` is what KvikIO opens (a dataset's pinned descriptor as ``/proc/self/fd/N``,
    so a replaced dataset is still read as its snapshot); ``path`` names the file in messages.
    Where the probe says ``gds``, the file is opened with compat mode OFF; if that raises, or
    :func:`file_route` finds a reason, it is read on the ``host`` route (a CuFile opened with
    KvikIO's default mode, whose ``pread`` into host memory is plain POSIX reads)."""
    target = path if open_path is None else open_path
    if cap.mode == "gds":
        try:
            f = _open_compat_off(kvikio, target)
        except Exception as exc:  # noqa: BLE001 - cuFile/O_DIRECT errors come in many types
            why = f"{path}: cuFile cannot open it for GPUDirect Storage ({exc}); read in compat mode"
            log.debug("%s", why)
            return kvikio.CuFile(target, "r"), "host", why
        route, why = file_route(cap, f, path)
        return f, route, why
    f = kvikio.CuFile(target, "r")
    route, why = file_route(cap, f, path)
    return f, route, why


def cufile_allow_compat() -> str:
    """cuFile's own ``allow_compat_mode`` (from its config), as ``gds-stream env`` reports it."""
    try:
        import kvikio.cufile_driver

        return "yes" if kvikio.cufile_driver.get("allow_compat_mode") else "no"
    except Exception as exc:  # noqa: BLE001 - no kvikio, or no libcufile
        return f"unknown ({type(exc).__name__}: {exc})" if not isinstance(exc, ImportError) \
            else "unknown (kvikio is not installed)"
