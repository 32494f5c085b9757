"""The CRS label ``info`` shows: the horizontal CRS's own EPSG code — pyproj's identification
where pyproj is installed, else the WKT's top-level ``AUTHORITY``/``ID`` — never a nested
element's (a unit's, a datum's, a vertical CRS's)."""

from __future__ import annotations

import sys
import types

import pytest

from gds_stream.convert import las_crs

UNIT_LAST = ('PROJCS["NAD_1983_HARN_Lambert_Conformal_Conic",GEOGCS["GCS_NAD83(HARN)",'
             'DATUM["NAD83_High_Accuracy_Reference_Network",SPHEROID["GRS 1980",6378137,'
             '298.257222101,AUTHORITY["EPSG","7019"]],AUTHORITY["EPSG","6152"]]],'
             'UNIT["foot",0.3048,AUTHORITY["EPSG","9002"]]]')
COMPOUND_WKT2 = ('COMPOUNDCRS["NAD83 / Oregon LCC (m) + NAVD88 height (ftUS)",'
                 'PROJCRS["NAD83 / Oregon LCC (m)",BASEGEOGCRS["NAD83",ID["EPSG",4269]],'
                 'ID["EPSG",2991]],VERTCRS["NAVD88 height (ftUS)",ID["EPSG",6360]]]')


@pytest.fixture
def no_pyproj(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyproj", None)  # import pyproj -> ImportError


@pytest.mark.parametrize("wkt, code", [
    (UNIT_LAST, None),
    (UNIT_LAST[:-1] + ',AUTHORITY["EPSG","2992"]]', "2992"),
    (COMPOUND_WKT2, "2991"),
    ('GEOGCS["WGS 84",AUTHORITY["EPSG","4326"]]', "4326"),
    ("not WKT at all", None),
    ('PROJCS["unclosed",AUTHORITY["EPSG","32633"]', None),
])
def test_wkt_code_without_pyproj(no_pyproj, wkt, code):
    assert las_crs.wkt_epsg(wkt) == code


def test_label(no_pyproj):
    assert las_crs.label({"crs_wkt": COMPOUND_WKT2}) == \
        "NAD83 / Oregon LCC (m) + NAVD88 height (ftUS) (EPSG:2991)"
    assert las_crs.label({"crs_wkt": UNIT_LAST}) == "NAD_1983_HARN_Lambert_Conformal_Conic"
    assert las_crs.label({"crs_geokeys": [[3072, 0, 1, 32767]]}) == "GeoTIFF keys"
    assert las_crs.label({"crs_geokeys": [[3072, 0, 1, 32633]]}) == "GeoTIFF keys (EPSG:32633)"


def test_pyproj_identifies_the_horizontal_crs(monkeypatch):
    """With pyproj, its identification of the compound CRS's first (horizontal) part is used."""
    seen = []

    class FakeCRS:
        def __init__(self, code, subs=()):
            self.code, self.sub_crs_list, self.is_compound = code, list(subs), bool(subs)

        def to_epsg(self):
            seen.append(self.code)
            return self.code

    fake = types.SimpleNamespace(CRS=types.SimpleNamespace(
        from_wkt=lambda text: FakeCRS(None, [FakeCRS(2991), FakeCRS(6360)])))
    monkeypatch.setitem(sys.modules, "pyproj", fake)
    assert las_crs.wkt_epsg(COMPOUND_WKT2) == "2991" and seen == [2991]
