"""What the read side and the writer of the dataset format share: constants, field specs, dtypes.

Kept apart from ``format.py`` (the read side) and ``writer.py`` so that neither imports the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import DatasetError

FORMAT_NAME = "gds-stream"
FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
MANIFEST = "manifest.json"
ALIGN = 4096
DEFAULT_BLOCK_BYTES = 4 << 20
#: Largest checksum block a manifest may declare: ``verify`` reads a block in bounded pieces, but
#: a block is also the unit of a reported mismatch, and no writer makes blocks this large.
MAX_BLOCK_BYTES = 1 << 30
#: Upper bounds that keep a lying manifest from asking for absurd allocations.
MAX_COMPONENTS = 4096
#: Fields a dataset may hold (each is a file a loader keeps open: far below any real schema's
#: need, and it bounds what a manifest makes the opener check).
MAX_FIELDS = 4096
#: Integers that become numpy int64 arrays (offsets, counts, cells) must stay below this.
INT64_LIMIT = 1 << 63
#: Names a batch dict already uses, so no field may take them.
RESERVED_NAMES = frozenset({"offset", "chunk"})
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ALLOWED_KINDS = "iuf"


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def align_down(n: int, a: int = ALIGN) -> int:
    return (n // a) * a


def check_field_name(name: str, where: str) -> None:
    """Raise :class:`DatasetError` unless ``name`` can be a field (and a file) name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # no "name\n" ($ allows it)
        shown = repr(name)
        shown = shown if len(shown) <= 80 else f"{shown[:77]}..."
        raise DatasetError(
            f"{where}: field name {shown} is not usable; expected letters, digits and '_' "
            f"(at most 64, not starting with a digit)"
        )
    if name in RESERVED_NAMES:
        raise DatasetError(f"{where}: field name {name!r} is reserved for batch metadata")


def field_name_from(text: str) -> str:
    """``text`` (a name from an input file) as a usable field name: lowercased, every run of
    characters other than letters, digits and '_' replaced by one '_', '_' put before a leading
    digit, at most 64 characters (``"my dim"`` -> ``my_dim``). Lowercase because each field is a
    file named after it, and some filesystems do not tell ``Intensity`` from ``intensity``."""
    out = re.sub(r"[^a-z0-9_]+", "_", str(text).lower()) or "_"
    if out[0].isdigit():
        out = "_" + out
    return out[:64]


def unique_field_names(names: list[str], taken=()) -> list[str]:
    """Collision-free field names for ``names`` (from one input, unique there): each becomes
    :func:`field_name_from`'s form. A name already in that form keeps it; the others, and any
    that would take a name in ``taken``, a reserved batch key (``offset``, ``chunk``) or an
    earlier one, get the first free suffix ``_2``, ``_3``, … (``Intensity`` beside
    ``intensity`` -> ``intensity_2``; ``my dim`` beside ``my_dim`` -> ``my_dim_2``)."""
    used = set(taken) | set(RESERVED_NAMES)
    base = [field_name_from(n) for n in names]
    out: list[str | None] = [None] * len(names)
    for i, (n, b) in enumerate(zip(names, base)):  # exact names first: they keep themselves
        if n == b and b not in used:
            out[i] = b
            used.add(b)
    for i, b in enumerate(base):
        if out[i] is not None:
            continue
        k, cand = 1, b
        while cand in used:
            k += 1
            suffix = f"_{k}"
            cand = b[:64 - len(suffix)] + suffix
        out[i] = cand
        used.add(cand)
    return [str(n) for n in out]


def stored_dtype(dtype: np.dtype | str, where: str = "dtype") -> np.dtype:
    """The little-endian form of a numeric dtype given by a user (or :class:`DatasetError`).

    This normalises the byte order (input data may be big-endian); a manifest's dtype is checked
    by :func:`manifest_dtype`, which refuses anything but the explicit little-endian form.
    """
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{where}: {dtype!r} is not a numpy dtype") from exc
    if dt.kind not in _ALLOWED_KINDS or dt.itemsize > 8 or dt.subdtype is not None \
            or dt.fields is not None:
        raise DatasetError(
            f"{where}: dtype {dt.str!r} cannot be stored; expected an int, uint or float scalar"
        )
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


#: The dtype strings a manifest may hold: exactly what the writer records (``dtype.str``).
MANIFEST_DTYPES = frozenset(
    np.dtype(f"<{k}{n}").str for k in "iu" for n in (1, 2, 4, 8)
) | frozenset(np.dtype(f"<f{n}").str for n in (2, 4, 8))


def manifest_dtype(value: object, where: str) -> np.dtype:
    """The dtype a manifest names, which must be an explicit little-endian scalar like ``'<f4'``."""
    if not isinstance(value, str) or value not in MANIFEST_DTYPES:
        raise DatasetError(
            f"{where}: dtype {value!r} is not a stored dtype; expected one of "
            f"{', '.join(sorted(MANIFEST_DTYPES))} (little-endian, written by gds-stream)"
        )
    return np.dtype(value)


@dataclass(frozen=True)
class FieldSpec:
    """One field of a schema: its name, stored dtype and number of components per point."""

    name: str
    dtype: np.dtype
    components: int = 1

    @property
    def point_bytes(self) -> int:
        """Bytes one point takes in this field."""
        return self.dtype.itemsize * self.components

    def describe(self) -> str:
        comp = f"×{self.components}" if self.components != 1 else ""
        return f"{self.name}:{self.dtype.name}{comp}"


@dataclass(frozen=True)
class FieldLayout:
    """Where a field lives on disk, and the crc32 of each of its blocks."""

    spec: FieldSpec
    file: str
    offset: int
    nbytes: int
    checksums: tuple[int, ...]
