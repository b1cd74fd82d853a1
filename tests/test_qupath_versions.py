"""Files as each QuPath version writes them (hand-made fixtures in tests/data/qupath, see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import shapely

from wsi_il.errors import GeoJsonError
from wsi_il.qupath import read_objects, read_region

DATA = Path(__file__).parent / "data" / "qupath"


def test_all_objects_export_makes_a_region_of_its_annotations_only():
    region, warnings = read_region(DATA / "v06_all_objects.geojson")
    assert region.equals(shapely.box(1000, 1000, 1600, 1500))  # the cells and detection outside add nothing
    assert warnings == ["left out 2 cells, 1 detection, 1 tile, 1 TMA core (only annotations make a region)"]


def test_all_objects_export_keeps_types_classes_and_metadata():
    objects = read_objects(DATA / "v06_all_objects.geojson")
    assert [o.object_type for o in objects] == ["annotation", "cell", "cell", "detection", "tile", "tmaCore"]
    assert objects[1].classification == "Tumor: Positive" and objects[1].measurements["Nucleus: Area"] == 36
    assert objects[0].id == "6f1d2a8e-0b3c-4f6a-9e51-2d7c8b9a1f01"


def test_v02_array_types_from_ids_and_packed_colours():
    objects = read_objects(DATA / "v02_array.json")
    assert [o.object_type for o in objects] == ["annotation", "detection", "cell"]
    assert [o.id for o in objects] == [None, None, None]  # a type name, not an object id
    assert objects[0].classification == "Tumor" and objects[0].color == (200, 0, 0)  # -3670016 = 0xFFC80000
    assert objects[0].measurements == {"Area px^2": 300000.0}
    region, warnings = read_region(DATA / "v02_array.json")
    assert region.equals(shapely.box(1000, 1000, 1600, 1500))
    assert warnings == ["left out 1 cell, 1 detection (only annotations make a region)"]


def test_legacy_derived_classes_unclassified_and_tma_core():
    objects = read_objects(DATA / "v03_legacy_classes.geojson")
    assert [o.classification for o in objects] == ["First: Second: Third", "Tumor: Positive", None, None]
    assert objects[0].color == (0, 0, 255)  # the class's own colour, not a parent's
    assert [o.object_type for o in objects] == ["annotation", "annotation", "annotation", "tmaCore"]
    assert "1 TMA core" in read_region(DATA / "v03_legacy_classes.geojson")[1][0]


def test_a_file_of_cells_only_is_no_region(tmp_path):
    cells = [
        f
        for f in json.loads((DATA / "v06_all_objects.geojson").read_text())["features"]
        if f["properties"]["objectType"] == "cell"
    ]
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": cells}))
    with pytest.raises(GeoJsonError, match="holds no annotations, only 2 cells"):
        read_region(path)


def test_hierarchy_export_children_are_read(tmp_path):
    parent = json.loads((DATA / "v06_all_objects.geojson").read_text())["features"]
    nested = {**parent[0], "properties": {**parent[0]["properties"], "childObjects": parent[1:3]}}
    path = tmp_path / "tree.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [nested]}))
    assert [o.object_type for o in read_objects(path)] == ["annotation", "cell", "cell"]
