"""The one exception family of gds-stream.

Every message names the file (or dataset) concerned, what was expected and what was found, so a
user can act on it without a traceback: ``DatasetError: tile_3.ply: element 'vertex' has no
property 'z'``.
"""

from __future__ import annotations

__all__ = [
    "GDSStreamError",
    "DatasetError",
    "ConversionError",
    "LoaderError",
    "BackendUnavailable",
]


class GDSStreamError(Exception):
    """Base class of every error gds-stream raises on purpose."""


class DatasetError(GDSStreamError):
    """A dataset directory or an input file is missing, malformed or lies about its contents."""


class ConversionError(DatasetError):
    """An input file cannot be converted (bad format, bad options, mismatched schemas)."""


class LoaderError(GDSStreamError):
    """A loader was misconfigured, or a read failed in one of its workers (the cause is chained)."""


class BackendUnavailable(GDSStreamError):
    """The requested backend cannot run on this machine; the message says why."""
