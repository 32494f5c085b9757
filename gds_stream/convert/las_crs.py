"""A LAS/LAZ file's coordinate reference system: as recorded (OGC WKT or GeoTIFF keys), and a
one-line label for people (``WGS 84 / UTM zone 33N (EPSG:32633)``).

The EPSG code shown is the horizontal CRS's own: pyproj's identification where pyproj is
installed, else the ``AUTHORITY``/``ID`` that is a direct child of the (horizontal) CRS element of
the WKT — never one of a nested element (a unit's ``EPSG:9002``, a datum's, …). None is shown
when there is none.
"""

from __future__ import annotations

import re

#: WKT keywords of a compound CRS, whose first CRS element is the horizontal one.
_COMPOUND = {"COMPD_CS", "COMPOUNDCRS"}
#: WKT wrappers whose CRS is a child (WKT2 ``BOUNDCRS[SOURCECRS[...]]``).
_WRAPPERS = {"BOUNDCRS", "SOURCECRS"}
_CRS_KEYWORDS = {"PROJCS", "GEOGCS", "GEOCCS", "PROJCRS", "PROJECTEDCRS", "GEOGCRS",
                 "GEOGRAPHICCRS", "GEODCRS", "GEODETICCRS", "BASEGEOGCRS"}
#: Longest WKT parsed (a WKT VLR holds at most 64 KiB; an EVLR could hold more).
_MAX_WKT = 1 << 16
_MAX_DEPTH = 64
_TOKEN = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([A-Za-z_][A-Za-z0-9_]*)|([-+0-9.eE]+)|(.))', re.S)


def crs_of(header) -> dict:
    """The CRS as recorded in the (E)VLRs: OGC WKT, or the GeoTIFF keys."""
    vlrs = list(header.vlrs) + list(header.evlrs or [])
    for v in vlrs:
        if type(v).__name__ == "WktCoordinateSystemVlr" and v.string:
            return {"crs_wkt": v.string}
    for v in vlrs:
        if type(v).__name__ == "GeoKeyDirectoryVlr":
            return {"crs_geokeys": [[k.id, k.tiff_tag_location, k.count, k.value_offset]
                                    for k in v.geo_keys]}
    return {}


def _parse(text: str):
    """The WKT as nested ``(KEYWORD, [args])`` (strings, numbers, nodes); ``None`` if it is
    not WKT."""
    tokens = [m.groups() for m in _TOKEN.finditer(text[:_MAX_WKT])]
    pos = 0

    def node(depth: int):
        nonlocal pos
        if depth > _MAX_DEPTH or pos >= len(tokens) or tokens[pos][1] is None:
            return None
        key = tokens[pos][1].upper()
        pos += 1
        if pos >= len(tokens) or tokens[pos][3] not in ("[", "("):
            return (key, [])  # a bare word (AXIS["X",EAST])
        pos += 1
        args: list = []
        while pos < len(tokens):
            s, word, num, other = tokens[pos]
            if other in ("]", ")"):
                pos += 1
                return (key, args)
            if other == ",":
                pos += 1
            elif s is not None:
                args.append(s.replace('""', '"'))
                pos += 1
            elif num is not None:
                args.append(num)
                pos += 1
            elif word is not None:
                child = node(depth + 1)
                if child is None:
                    return None
                args.append(child)
            else:
                return None
        return None

    return node(0)


def _horizontal(tree):
    key, args = tree
    if key in _COMPOUND or key in _WRAPPERS:
        for a in args:
            if isinstance(a, tuple) and (a[0] in _CRS_KEYWORDS or a[0] in _WRAPPERS
                                         or a[0] in _COMPOUND):
                return _horizontal(a)
    return tree


def wkt_epsg(text: str) -> str | None:
    """The horizontal CRS's own EPSG code of a WKT (see the module docstring), or ``None``."""
    try:
        import pyproj
    except ImportError:
        pyproj = None
    if pyproj is not None:
        try:
            crs = pyproj.CRS.from_wkt(text)
            if crs.is_compound and crs.sub_crs_list:
                crs = crs.sub_crs_list[0]
            code = crs.to_epsg()
            return None if code is None else str(code)
        except Exception:  # noqa: BLE001 - pyproj cannot read it: fall back to the WKT's own
            pass
    tree = _parse(text)
    if tree is None:
        return None
    _, args = _horizontal(tree)
    for a in args:
        if isinstance(a, tuple) and a[0] in ("AUTHORITY", "ID") and len(a[1]) >= 2 \
                and str(a[1][0]).upper() == "EPSG" and str(a[1][1]).strip().isdigit():
            return str(a[1][1]).strip()
    return None


def wkt_name(text: str) -> str:
    tree = _parse(text)
    if tree is not None and tree[1] and isinstance(tree[1][0], str):
        return tree[1][0]
    return text[:60] + ("…" if len(text) > 60 else "")


def label(src: dict) -> str:
    """One line for the CRS a ``sources`` entry records; empty where it records none."""
    if "crs_wkt" in src:
        text = str(src["crs_wkt"])
        code = wkt_epsg(text)
        return wkt_name(text) + (f" (EPSG:{code})" if code else "")
    if "crs_geokeys" in src:
        raw = src["crs_geokeys"] if isinstance(src["crs_geokeys"], list) else []
        keys = {k[0]: k[3] for k in raw
                if isinstance(k, list) and len(k) == 4 and isinstance(k[0], int)}
        code = keys.get(3072) or keys.get(2048)
        known = isinstance(code, int) and 0 < code < 32767  # 32767: user-defined
        return f"GeoTIFF keys (EPSG:{code})" if known else "GeoTIFF keys"
    return ""


def text(crs: dict) -> str:
    """A short description of a recorded CRS for messages."""
    if "crs_wkt" in crs:
        wkt = crs["crs_wkt"]
        return "WKT " + (wkt[:60] + "…" if len(wkt) > 60 else wkt)
    if "crs_geokeys" in crs:
        return label(crs)
    return "no CRS"
