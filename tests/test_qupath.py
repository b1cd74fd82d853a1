"""Tests for wsi_il.qupath: reading QuPath's GeoJSON variants, writing importable Features, patch unions."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import LineString, MultiPoint, MultiPolygon, Point, Polygon, box

from wsi_il.errors import GeoJsonError
from wsi_il.qupath import (
    DEFAULT_COLORS,
    QuPathObject,
    class_color,
    make_feature,
    read_objects,
    read_region,
    union_squares,
    write_features,
)

CHECK_SH = Path(__file__).resolve().parents[1] / "tools" / "qupath-check" / "check.sh"
SQUARE = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
DONUT = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(25, 25), (75, 25), (75, 75), (25, 75)]])
DONUT_RINGS = [[list(xy) for xy in DONUT.exterior.coords], [list(xy) for xy in DONUT.interiors[0].coords]]


def _write_json(path: Path, value: Any) -> Path:
    """Write a JSON value to ``path`` as QuPath would (UTF-8, NaN allowed) and return the path."""
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def _feature(geometry: dict[str, Any] | None, **properties: Any) -> dict[str, Any]:
    """Build a raw Feature dict by hand, the way QuPath writes it."""
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation", **properties}}


def _polygon_json(rings: list[list[list[float]]] = SQUARE) -> dict[str, Any]:
    """Return a raw GeoJSON Polygon."""
    return {"type": "Polygon", "coordinates": rings}


def _squares(cells: list[tuple[int, int]], size: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Return top-left corners of patches at (col, row) cells of a ``size`` lattice."""
    cols, rows = np.array(cells).T
    return cols * size, rows * size


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_keeps_geometry_class_colour_measurements_and_type(tmp_path: Path) -> None:
    features = [
        make_feature(DONUT, name="query 1", classification="Tumor", measurements={"p": 0.25, "q": math.nan}),
        make_feature(box(5, 5, 20, 20), object_type="detection", classification="Zebra", color=(1, 2, 3)),
        make_feature(MultiPolygon([box(0, 0, 1, 1), box(3, 3, 4, 4)]), feature_id="id-1"),
        make_feature(Point(1.234, 5.678), classification="normal"),
    ]
    path = tmp_path / "out.geojson"
    write_features(path, features)
    objects = read_objects(path)

    assert [o.index for o in objects] == [0, 1, 2, 3]
    assert objects[0].geometry.equals(DONUT) and objects[0].geometry.area == DONUT.area
    assert (objects[0].name, objects[0].classification, objects[0].color) == ("query 1", "Tumor", (200, 0, 0))
    assert objects[0].measurements["p"] == 0.25 and math.isnan(objects[0].measurements["q"])
    assert (objects[1].object_type, objects[1].classification, objects[1].color) == (
        "detection",
        "Zebra",
        (1, 2, 3),
    )
    assert objects[2].id == "id-1" and objects[2].classification is None and objects[2].color is None
    assert objects[2].geometry.equals(MultiPolygon([box(0, 0, 1, 1), box(3, 3, 4, 4)]))
    assert objects[3].geometry.equals(Point(1.23, 5.68)) and objects[3].color == DEFAULT_COLORS["normal"]


def test_round_trip_through_gzip(tmp_path: Path) -> None:
    path = tmp_path / "out.geojson.gz"
    write_features(path, [make_feature(DONUT, classification="Stroma")])
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    (obj,) = read_objects(path)
    assert obj.geometry.equals(DONUT) and obj.classification == "Stroma"


def test_make_feature_writes_what_qupath_writes() -> None:
    feature = make_feature(box(0, 0, 10, 10), classification="Tumor", measurements={"x": math.inf})
    props = feature["properties"]
    assert feature["type"] == "Feature" and len(feature["id"]) == 36
    assert props["objectType"] == "annotation" and "isLocked" not in props  # QuPath writes it only when true
    assert make_feature(box(0, 0, 1, 1), locked=True)["properties"]["isLocked"] is True
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert props["measurements"] == {"x": "Infinity"}
    assert "name" not in props
    json.dumps(feature, allow_nan=False)  # plain, finite JSON values only


def test_make_feature_omits_classification_and_measurements_when_not_given() -> None:
    props = make_feature(box(0, 0, 1, 1), properties={"wsi_il_patch_id": 7})["properties"]
    assert "classification" not in props and "measurements" not in props
    assert props["wsi_il_patch_id"] == 7
    with pytest.raises(ValueError, match="overwrite"):
        make_feature(box(0, 0, 1, 1), properties={"objectType": "tile"})


def test_make_feature_repairs_rounds_and_uses_plain_floats() -> None:
    bow_tie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    feature = make_feature(bow_tie)
    geometry = shapely.geometry.shape(feature["geometry"])
    assert geometry.is_valid and geometry.area == pytest.approx(50)
    fine = make_feature(box(0.123456, 0, 10.987654, 5))["geometry"]["coordinates"][0]
    assert {type(v) for xy in fine for v in xy} == {float, int}  # 0.12 and 10.99, but 0 and 5 as QuPath writes
    assert {round(v, 2) for xy in fine for v in xy} == {v for xy in fine for v in xy}
    whole = json.dumps(make_feature(box(896, 512, 1024, 640))["geometry"])
    assert "896," in whole and ".0" not in whole
    with pytest.raises(ValueError, match="empty"):
        make_feature(box(0, 0, 0.001, 0.001))


def test_make_feature_orients_polygons_consistently() -> None:
    clockwise = Polygon([(0, 0), (0, 10), (10, 10), (10, 0)])
    ring = make_feature(clockwise)["geometry"]["coordinates"][0]
    assert shapely.LinearRing(ring).is_ccw


def test_class_color_is_stable_and_case_insensitive() -> None:
    assert class_color("TUMOUR") == (200, 0, 0)
    assert class_color("Lymphocyte") == class_color("lymphocyte")
    assert all(0 <= channel <= 255 for channel in class_color("Lymphocyte"))
    assert class_color("Lymphocyte") != class_color("Macrophage")


def test_offset_shifts_on_read_and_back_on_write(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "a.geojson", _feature(_polygon_json()))
    (obj,) = read_objects(path, offset=(100, 50))
    assert obj.geometry.equals(box(100, 50, 110, 60))
    back = make_feature(obj.geometry, offset=(100, 50))
    assert shapely.geometry.shape(back["geometry"]).equals(box(0, 0, 10, 10))


# ------------------------------------------------------------------------------------- QuPath variants


def test_reads_feature_collection_array_single_feature_and_bare_geometry(tmp_path: Path) -> None:
    feature = _feature(_polygon_json(), name="a")
    variants = [{"type": "FeatureCollection", "features": [feature]}, [feature], feature, _polygon_json()]
    for i, value in enumerate(variants):
        (obj,) = read_objects(_write_json(tmp_path / f"v{i}.json", value))
        assert obj.geometry.equals(box(0, 0, 10, 10)) and obj.object_type == "annotation"


def test_reads_gzip_by_magic_bytes(tmp_path: Path) -> None:
    path = tmp_path / "compressed.geojson"
    path.write_bytes(gzip.compress(json.dumps([_feature(_polygon_json())]).encode()))
    assert len(read_objects(path)) == 1


def test_reads_object_type_keys(tmp_path: Path) -> None:
    features = [
        {"type": "Feature", "geometry": _polygon_json(), "properties": {"object_type": "detection"}},
        {"type": "Feature", "geometry": _polygon_json(), "properties": {"type": "cell"}},
        {"type": "Feature", "geometry": _polygon_json(), "properties": {"objectType": "tmaCore"}},
        {"type": "Feature", "geometry": _polygon_json()},
    ]
    objects = read_objects(_write_json(tmp_path / "t.geojson", features))
    assert [o.object_type for o in objects] == ["detection", "cell", "tmaCore", "annotation"]
    assert objects[3].measurements == {} and objects[3].name is None


def test_reads_classification_forms(tmp_path: Path) -> None:
    features = [
        _feature(_polygon_json(), classification="Tumor"),
        _feature(_polygon_json(), classification={"names": ["Tumor", "Positive"], "color": [1, 2, 3, 255]}),
        _feature(_polygon_json(), classification={"name": "Stroma", "color": -16711936}),
        _feature(_polygon_json(), color=[4, 5, 6]),
    ]
    objects = read_objects(_write_json(tmp_path / "c.geojson", features))
    assert [o.classification for o in objects] == ["Tumor", "Tumor: Positive", "Stroma", None]
    assert [o.color for o in objects] == [None, (1, 2, 3), (0, 255, 0), (4, 5, 6)]


def test_reads_measurement_forms_and_ids(tmp_path: Path) -> None:
    features = [
        {**_feature(_polygon_json(), measurements={"a": 1, "b": "NaN"}), "id": "0c9c2b0e"},
        _feature(_polygon_json(), measurements=[{"name": "a", "value": 2.5}, {"name": "b", "value": None}]),
    ]
    first, second = read_objects(_write_json(tmp_path / "m.geojson", features))
    assert first.id == "0c9c2b0e" and first.measurements["a"] == 1.0 and math.isnan(first.measurements["b"])
    assert second.id is None and second.measurements["a"] == 2.5 and math.isnan(second.measurements["b"])


def test_reads_holes_multipolygons_and_other_geometry_types(tmp_path: Path) -> None:
    outer, hole = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]], [[25, 25], [75, 25], [75, 75], [25, 75]]
    geometries = [
        _polygon_json([outer, hole]),
        {"type": "MultiPolygon", "coordinates": [[outer, hole], [[[200, 0], [210, 0], [210, 10], [200, 0]]]]},
        {"type": "Point", "coordinates": [1, 2, 3]},
        {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
        {"type": "LineString", "coordinates": [[1, 2], [3, 4]]},
        {"type": "MultiLineString", "coordinates": [[[1, 2], [3, 4]]]},
        {"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [1, 2]}]},
    ]
    objects = read_objects(_write_json(tmp_path / "g.geojson", [_feature(g) for g in geometries]))
    assert objects[0].geometry.equals(DONUT) and objects[0].geometry.area == 7500
    assert isinstance(objects[1].geometry, MultiPolygon) and objects[1].geometry.area == 7550
    kinds = [o.geometry.geom_type for o in objects[2:]]
    assert kinds == "Point MultiPoint LineString MultiLineString GeometryCollection".split()
    assert not objects[2].geometry.has_z


def test_reader_accepts_qupath_export_file(tmp_path: Path) -> None:
    text = """{"type":"FeatureCollection","features":[{"type":"Feature",
    "id":"0c9c2b0e-5d5f-4a9f-9d0e-6c7c1b1f2a11",
    "geometry":{"type":"Polygon","coordinates":[[[10.5,20.25],[30,20.25],[30,40],[10.5,40],[10.5,20.25]]]},
    "properties":{"objectType":"annotation","name":"query 1",
    "classification":{"name":"Tumor","color":[200,0,0]},
    "isLocked":true,"measurements":{"Area \u00b5m^2":1234.5}}}]}"""
    path = tmp_path / "export.geojson"
    path.write_text(text, encoding="utf-8")
    (obj,) = read_objects(path)
    assert obj.geometry.equals(box(10.5, 20.25, 30, 40))
    assert obj.id == "0c9c2b0e-5d5f-4a9f-9d0e-6c7c1b1f2a11" and obj.measurements == {"Area µm^2": 1234.5}
    assert isinstance(obj, QuPathObject)


# ---------------------------------------------------------------------------------------------- errors

BAD_FEATURES: list[tuple[Any, str]] = [
    (_feature(None), "feature 1 has no geometry"),
    ({"type": "Feature", "properties": {}}, "feature 1 has no geometry"),
    (_feature({"type": "Circle", "coordinates": [0, 0]}), "unknown geometry type 'Circle'"),
    (_feature({"type": "Polygon"}), "without 'coordinates'"),
    (_feature({"type": "Polygon", "coordinates": SQUARE[0]}), "check the nesting"),
    (
        _feature({"type": "Polygon", "coordinates": [[[0, 0], [1, "x"], [1, 1], [0, 0]]]}),
        "'x' is not a number",
    ),
    (_feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}), "needs at least 4"),
    (_feature({"type": "Point", "coordinates": [math.nan, 1]}), "not finite"),
    (_feature({"type": "Point", "coordinates": [1e400, 1]}), "not finite"),
    (_feature({"type": "MultiPolygon", "coordinates": []}), "empty MultiPolygon"),
    (_feature({"type": "LineString", "coordinates": [[0, 0]]}), "at least 2"),
    (_feature(_polygon_json(), classification=[1]), "classification"),
    (_feature(_polygon_json(), classification={"name": "a", "color": [300, 0, 0]}), "0-255"),
    (_feature(_polygon_json(), measurements={"a": "high"}), "not a number"),
    (_feature(_polygon_json(), objectType="blob"), "unknown objectType"),
    ({"type": "Feature", "geometry": _polygon_json(), "properties": [1]}, "properties"),
    ([1, 2], "feature 1 is not a GeoJSON Feature"),
    ([_feature(_polygon_json()), {"type": "Polygon"}], "feature 2 is not a GeoJSON Feature"),
]

BAD_FILES: list[tuple[Any, str]] = [
    ({"features": []}, "not GeoJSON: the top-level object has no 'type'"),
    ({"type": "Topology"}, "not GeoJSON"),
    ({"type": "FeatureCollection"}, "without a 'features' list"),
    ({"type": "FeatureCollection", "features": []}, "contains no objects"),
    ([], "contains no objects"),
    ("hello", "not GeoJSON"),
]


@pytest.mark.parametrize(("value", "expected"), BAD_FEATURES + BAD_FILES)
def test_malformed_content_raises_geojson_error_naming_the_file(tmp_path: Path, value: Any, expected: str) -> None:
    path = _write_json(tmp_path / "bad.geojson", value)
    with pytest.raises(GeoJsonError, match="^.*$") as info:
        read_objects(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert info.value.hint


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"type": "Feature",\n "geometry": }', "line 2, column"),
        (b"\x1f\x8b\x08garbage", "not a valid gzip"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_unreadable_bytes_raise_geojson_error(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(GeoJsonError, match=expected) as info:
        read_objects(path)
    assert str(path) in str(info.value)


def test_missing_file_folder_and_size_limit(tmp_path: Path) -> None:
    with pytest.raises(GeoJsonError, match="no such file"):
        read_objects(tmp_path / "absent.geojson")
    with pytest.raises(GeoJsonError, match="is a folder"):
        read_objects(tmp_path)
    path = _write_json(tmp_path / "big.geojson", [_feature(_polygon_json())] * 20)
    with pytest.raises(GeoJsonError, match="is [0-9,]+ bytes, more than the limit of 1,000 bytes"):
        read_objects(path, max_bytes=1000)
    packed = tmp_path / "bomb.geojson.gz"
    packed.write_bytes(gzip.compress(b" " * 10_000 + b"[]"))
    with pytest.raises(GeoJsonError, match="decompresses to more than the limit of 1,000 bytes"):
        read_objects(packed, max_bytes=1000)


FUZZ_KEYS = "type features geometry coordinates properties geometries classification measurements name names color id"
FUZZ_TYPES = "Feature FeatureCollection Polygon MultiPolygon Point MultiPoint LineString MultiLineString"


def _json_values() -> st.SearchStrategy[Any]:
    """Arbitrary JSON values, biased towards GeoJSON's keys and shapes."""
    keys = st.sampled_from(FUZZ_KEYS.split())
    types = st.sampled_from(FUZZ_TYPES.split())
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | types
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys | st.text(max_size=3), inner, max_size=5),
        max_leaves=40,
    )


def _read_both(path: Path) -> None:
    """Read a file with read_objects and read_region; only GeoJsonError may escape."""
    for reader in (read_objects, read_region):
        try:
            reader(path)
        except GeoJsonError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_json_values())
def test_fuzz_arbitrary_json_raises_only_geojson_error(tmp_path: Path, value: Any) -> None:
    _read_both(_write_json(tmp_path / "fuzz.geojson", value))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | st.binary(max_size=100).map(gzip.compress))
def test_fuzz_arbitrary_bytes_raise_only_geojson_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.geojson"
    path.write_bytes(content)
    _read_both(path)


# ---------------------------------------------------------------------------------------------- regions


def test_read_region_repairs_a_bow_tie_with_a_warning(tmp_path: Path) -> None:
    bow_tie = [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]
    square = [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]
    features = [_feature(_polygon_json(square)), _feature(_polygon_json(bow_tie), name="q")]
    region, warnings = read_region(_write_json(tmp_path / "q.geojson", features), offset=(100, 0))
    assert isinstance(region, MultiPolygon) and region.is_valid and region.area == pytest.approx(100 + 50)
    assert region.bounds == (100, 0, 130, 10)
    assert warnings == ["feature 2 ('q') was not a valid polygon (Self-intersection at 105,5); repaired"]


def test_read_region_rejects_only_points(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "p.geojson", [_feature({"type": "Point", "coordinates": [1, 2]})])
    with pytest.raises(GeoJsonError, match="has only points/lines .*draw the query as an area"):
        read_region(path)


def test_read_region_ignores_points_next_to_a_polygon(tmp_path: Path) -> None:
    point = _feature({"type": "Point", "coordinates": [1, 2]}, name="dot")
    path = _write_json(tmp_path / "m.geojson", [point, _feature(_polygon_json([DONUT_RINGS[0], DONUT_RINGS[1]]))])
    region, warnings = read_region(path)
    assert region.equals(DONUT)
    assert len(warnings) == 1 and "feature 1 ('dot')" in warnings[0] and "ignored" in warnings[0]


def test_read_region_rejects_polygons_without_area(tmp_path: Path) -> None:
    flat = [[[0, 0], [5, 0], [10, 0], [0, 0]]]
    with pytest.raises(GeoJsonError, match="enclose no area"):
        read_region(_write_json(tmp_path / "f.geojson", [_feature(_polygon_json(flat))]))


# ----------------------------------------------------------------------------------------- union_squares


def test_union_squares_merges_adjacent_squares() -> None:
    merged = union_squares(*_squares([(0, 0), (1, 0)]), 10, 10)
    assert isinstance(merged, Polygon) and merged.equals(box(0, 0, 20, 10))
    assert len(merged.exterior.coords) == 5  # corners only, no vertex left where the squares met


def test_union_squares_ring_of_eight_has_one_hole() -> None:
    ring = [(c, r) for c in range(3) for r in range(3) if (c, r) != (1, 1)]
    merged = union_squares(*_squares(ring, size=224), 224, 224)
    assert isinstance(merged, Polygon) and merged.is_valid
    assert len(merged.interiors) == 1 and merged.area == 8 * 224 * 224
    assert Polygon(merged.interiors[0]).equals(box(224, 224, 448, 448))


def test_union_squares_diagonal_touching_and_duplicates() -> None:
    xs, ys = _squares([(0, 0), (1, 1), (1, 1), (2, 0), (0, 2), (2, 2)])
    merged = union_squares(xs + 7, ys + 3, 10, 10)
    assert merged.is_valid and merged.area == 5 * 100 and len(shapely.get_parts(merged)) == 5


def test_union_squares_random_grids_are_exact_and_valid() -> None:
    rng = np.random.default_rng(1)
    for density in (0.2, 0.5, 0.8):
        rows, cols = np.nonzero(rng.random((30, 40)) < density)
        merged = union_squares(cols * 16, rows * 16, 16, 16)
        assert merged.is_valid and merged.area == rows.size * 256
        assert merged.equals(shapely.union_all(shapely.box(cols * 16, rows * 16, cols * 16 + 16, rows * 16 + 16)))


@settings(max_examples=100, deadline=None)
@given(cells=st.sets(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=40))
def test_union_squares_equals_the_general_union(cells: set[tuple[int, int]]) -> None:
    xs, ys = _squares(sorted(cells), size=3)
    merged = union_squares(xs, ys, 3, 3)
    assert merged.is_valid and merged.area == len(cells) * 9
    assert merged.equals(shapely.union_all(shapely.box(xs, ys, xs + 3, ys + 3)))


def test_union_squares_off_lattice_falls_back_to_a_general_union() -> None:
    merged = union_squares([0, 5, 30], [0, 5, 0], 10, 10)
    assert merged.is_valid and merged.area == 100 + 100 - 25 + 100 and len(shapely.get_parts(merged)) == 2
    assert union_squares([], [], 10, 10).is_empty


def test_union_squares_is_fast_for_100k_patches() -> None:
    # Measured on the 2-core dev machine: 0.2 s for the 99,756 squares of this 316 x 316 blob grid;
    # 0.55 s for 101k squares in blobs on a 450 x 450 grid; 2.4 s for 101k squares of 50 % salt-and-pepper
    # noise (the worst case: ~50k separate polygons). make_feature + write_features add < 0.7 s.
    rng = np.random.default_rng(0)
    noise = rng.random((316, 316))
    for _ in range(4):
        noise = (
            noise + np.roll(noise, 1, 0) + np.roll(noise, -1, 0) + np.roll(noise, 1, 1) + np.roll(noise, -1, 1)
        ) / 5
    rows, cols = np.nonzero(noise > np.quantile(noise, 0.001))
    start = time.perf_counter()
    merged = union_squares(cols * 224 + 1000, rows * 224 + 500, 224, 224)
    elapsed = time.perf_counter() - start
    assert merged.is_valid and merged.area == rows.size * 224 * 224
    assert elapsed < 5, f"union_squares took {elapsed:.1f} s for {rows.size} squares"


# ------------------------------------------------------------------------------------ QuPath import check


def _qupath_check(path: Path) -> subprocess.CompletedProcess[str]:
    """Run the QuPath checker (tools/qupath-check) on a file, skipping where Java is not installed."""
    jars = (Path("/usr/share/java/jts-core.jar"), Path("/usr/share/java/gson.jar"))
    if shutil.which("java") is None or shutil.which("javac") is None or not all(jar.is_file() for jar in jars):
        pytest.skip("the QuPath checker (tools/qupath-check) needs java, javac, libjts-java and libgoogle-gson-java")
    return subprocess.run(["bash", str(CHECK_SH), str(path)], capture_output=True, text=True, timeout=600)


def test_written_features_pass_qupath_import_check(tmp_path: Path) -> None:
    rows, cols = np.nonzero(np.random.default_rng(2).random((12, 12)) < 0.6)
    features = [
        make_feature(box(10.004, 10, 50.123, 60.5), name="a", classification="Tumor", offset=(3.5, 1.25)),
        make_feature(Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]), classification="Normal", color=(0, 150, 0)),
        make_feature(
            box(0, 0, 224, 224),
            object_type="detection",
            classification="Tumor",
            measurements={"Tumor probability": 0.93, "uncertainty": math.nan},
        ),
        make_feature(MultiPolygon([DONUT, box(200, 200, 300, 300)]), classification="Stroma"),
        make_feature(union_squares(cols * 224, rows * 224, 224, 224), object_type="tile", classification="x"),
        make_feature(MultiPoint([(1, 2), (3.333, 4)]), classification="Immune cells"),
        make_feature(LineString([(0, 0), (5.5, 5.5)])),
    ]
    path = tmp_path / "batch.geojson"
    write_features(path, features)
    result = _qupath_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 objects, 0 problems" in result.stdout


def test_qupath_import_check_rejects_a_classification_without_colour(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "bad.geojson", [_feature(_polygon_json(), classification={"name": "Tumor"})])
    result = _qupath_check(path)
    assert result.returncode != 0 and "without color" in result.stdout
