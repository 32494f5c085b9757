"""gds-stream: stream huge point clouds from storage into PyTorch, GPU-direct where it can.

Importing this package is cheap: it never imports cupy or kvikio, and torch only when a loader
is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .convert import convert
from .errors import BackendUnavailable, ConversionError, DatasetError, GDSStreamError, LoaderError
from .format import Dataset, FieldSpec, open_dataset

__version__ = "0.1.0"

__all__ = [
    "open_dataset",
    "convert",
    "open_loader",
    "GDSLoader",
    "Dataset",
    "FieldSpec",
    "GDSStreamError",
    "DatasetError",
    "ConversionError",
    "LoaderError",
    "BackendUnavailable",
    "transforms",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .gds import GDSLoader
    from .backends import open_loader

_LAZY = {
    "open_loader": ("gds_stream.backends", "open_loader"),
    "GDSLoader": ("gds_stream.gds", "GDSLoader"),
    "transforms": ("gds_stream.transforms", None),  # the module itself
}


def __getattr__(name: str):
    """Import the heavier parts (converters, torch-based loaders) on first use."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'gds_stream' has no attribute {name!r}") from None
    import importlib

    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
