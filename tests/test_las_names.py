"""LAS/LAZ field names: laspy's names are unique, and so are the fields made of them —
standard dimensions keep laspy's names, extra-bytes names are sanitised and suffixed where they
would collide (case, spaces, batch keys); ``fields=`` selects by either name.
"""

from __future__ import annotations

import laspy
import numpy as np
import pytest

from gds_stream import ConversionError
from gds_stream.convert import convert

COLLIDING = [("Intensity", "u2"), ("Classification", "u1"), ("gps time", "f8"), ("my dim", "u2"),
             ("my_dim", "i2"), ("offset", "u4"), ("chunk", "u1")]


def test_extra_bytes_names_never_collide(tmp_path, make_las):
    """laspy's names are unique; the field names are too: standard dimensions keep theirs, an
    extra-bytes name that would collide (case, spaces, batch keys) gets a suffix."""
    make_las(tmp_path / "a.laz", 100, point_format=6, version="1.4", extra=COLLIDING)
    ds = convert(tmp_path / "a.laz", tmp_path / "ds", progress=False)
    want = {"intensity": "intensity", "Intensity": "intensity_2", "classification":
            "classification", "Classification": "classification_2", "gps time": "gps_time_2",
            "my_dim": "my_dim", "my dim": "my_dim_2", "offset": "offset_2", "chunk": "chunk_2"}
    back = laspy.read(tmp_path / "a.laz")
    for dim, field in want.items():
        assert np.array_equal(ds.read(field), np.asarray(back[dim])), (dim, field)
    assert "offset" not in ds.schema and "chunk" not in ds.schema
    assert ds.sources[0]["field_names"]["Intensity"] == "intensity_2"


def test_fields_select_by_field_or_laspy_name(tmp_path, make_las):
    las = make_las(tmp_path / "a.las", 50, point_format=6, version="1.4", extra=COLLIDING)
    ds = convert(tmp_path / "a.las", tmp_path / "ds", progress=False,
                 fields=["x", "y", "z", "Intensity", "gps time", "intensity"])
    assert list(ds.schema) == ["x", "y", "z", "intensity_2", "gps_time_2", "intensity"]
    assert np.array_equal(ds.read("intensity_2"), np.asarray(las["Intensity"]))
    assert np.array_equal(ds.read("intensity"), np.asarray(las["intensity"]))
    with pytest.raises(ConversionError, match=r"a\.las: --fields names one dimension more than "
                                              r"once \('Intensity', 'intensity_2'\)"):
        convert(tmp_path / "a.las", tmp_path / "d2", fields=["x", "Intensity", "intensity_2"],
                progress=False)


def test_field_name_rules():
    from gds_stream._schema import field_name_from, unique_field_names

    assert field_name_from("my dim") == "my_dim" and field_name_from("3d  x!") == "_3d_x_"
    assert unique_field_names(["Intensity", "intensity"]) == ["intensity_2", "intensity"]
    assert unique_field_names(["offset", "chunk", "a"]) == ["offset_2", "chunk_2", "a"]
    long = "a" * 70
    names = unique_field_names([long, long.upper()])
    assert names == ["a" * 64, "a" * 62 + "_2"]
