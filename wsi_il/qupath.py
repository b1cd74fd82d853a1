"""Read and write QuPath GeoJSON: objects in, valid 0.01 px Features out (see docs/qupath.md).

wsi-il works in OpenSlide level-0 pixels; QuPath may crop the slide to its bounds, so a file's
coordinates plus ``offset`` (the slide's bounds x, y) are wsi-il coordinates, and writing subtracts it.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import io
import json
import math
import re
import reprlib
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import shapely
import shapely.affinity
import shapely.errors
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from wsi_il.errors import GeoJsonError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text

Color = tuple[int, int, int]
Offset = tuple[float, float]
_T = TypeVar("_T")

DEFAULT_MAX_BYTES = 256 * 2**20
PRECISION_PX = 0.01

DEFAULT_COLORS: dict[str, Color] = {
    "tumor": (200, 0, 0),
    "tumour": (200, 0, 0),
    "normal": (0, 150, 0),
    "stroma": (150, 200, 150),
    "immune cells": (160, 90, 160),
    "necrosis": (50, 50, 50),
    "other": (255, 200, 0),
    "region*": (0, 0, 180),
    "ignore*": (180, 180, 180),
    "skip": (180, 180, 180),
    "positive": (200, 50, 50),
    "negative": (112, 112, 225),
    "query": (0, 0, 180),
}

_EXPORT_HINT = "export the objects again from QuPath (File > Object data > Export as GeoJSON)"
_AREA_HINT = "draw the query as an area (rectangle, polygon or brush) in QuPath"
_OBJECT_TYPES = {t.lower(): t for t in ("annotation", "detection", "cell", "tile", "tmaCore", "root")}
_OBJECT_TYPES["tma_core"] = "tmaCore"
_LEGACY_TYPE_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
"""QuPath 0.2 wrote the object's type as the Feature's ``id``."""
REGION_TYPES = frozenset({"annotation"})
"""The object types that make a region (or carry a patch's label): what a pathologist draws."""
_GEOMETRY_TYPES = frozenset(
    ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection")
)
_MAX_COLLECTION_DEPTH = 16
_WRAPPED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RecursionError,
    OverflowError,
    shapely.errors.ShapelyError,
)
_SPECIAL_FLOATS = {
    "nan": math.nan,
    "infinity": math.inf,
    "-infinity": -math.inf,
    "inf": math.inf,
    "-inf": -math.inf,
}


@dataclass(frozen=True)
class QuPathObject:
    """One object read from a QuPath GeoJSON file, in wsi-il (OpenSlide level-0 px) coordinates."""

    geometry: BaseGeometry
    object_type: str = "annotation"
    name: str | None = None
    classification: str | None = None
    color: Color | None = None
    id: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    """QuPath's ``metadata`` map of strings (kept by QuPath on import and export)."""
    index: int = 0
    """Position of the feature in the file (0-based; messages say ``index + 1``)."""


class _Invalid(Exception):
    """A part of a file is not QuPath GeoJSON; raised inside the reader, reported with the file name."""

    def __init__(self, message: str, hint: str = _EXPORT_HINT) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# ---------------------------------------------------------------------------------------------- colours


def class_color(name: str) -> Color:
    """Return QuPath's colour for a class name, or a stable colour derived from the name."""
    key = name.strip().lower()
    if key in DEFAULT_COLORS:
        return DEFAULT_COLORS[key]
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.7, 0.85)
    return (round(red * 255), round(green * 255), round(blue * 255))


# ---------------------------------------------------------------------------------------------- reading


def read_objects(path: Path, offset: Offset = (0.0, 0.0), max_bytes: int = DEFAULT_MAX_BYTES) -> list[QuPathObject]:
    """Read the objects of a QuPath GeoJSON file, shifted by ``offset`` into wsi-il coordinates."""
    path = Path(path)
    root = _load_json(path, max_bytes)
    items = _guarded(path, None, _feature_items, root)
    items = _with_children(items)
    if not items:
        raise GeoJsonError(f"{path}: contains no objects", "draw or select objects in QuPath, then export again")
    return [_guarded(path, i, _parse_feature, item, i, offset) for i, item in enumerate(items)]


def read_region(
    path: Path, offset: Offset = (0.0, 0.0), max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[Polygon | MultiPolygon, list[str]]:
    """Read the union of the areas drawn in a QuPath GeoJSON file, and warnings about what was changed.

    A region is made of annotations (objects without a type count as annotations, as in QuPath); cells,
    detections, tiles and TMA cores that an "all objects" export carries are left out, with one warning."""
    objects, left_out = drawn_objects(read_objects(path, offset, max_bytes))
    if not objects:
        raise GeoJsonError(
            f"{path}: holds no annotations, only {left_out}",
            "draw the region as an annotation in QuPath and export it (File > Export objects as GeoJSON)",
        )
    warnings = [f"left out {left_out} (only annotations make a region)"] if left_out else []
    areas: list[BaseGeometry] = []
    not_areas: list[str] = []
    for obj in objects:
        area, warning = _object_area(obj)
        if warning:
            warnings.append(warning)
        if _has_non_polygonal_part(obj.geometry):
            not_areas.append(_label(obj))
        if area is not None:
            areas.append(area)
    if not areas and len(not_areas) == len(objects):
        raise GeoJsonError(f"{path}: has only points/lines", _AREA_HINT)
    if not_areas:
        warnings.append(f"ignored the points/lines of {_short_list(not_areas)}; only areas count as a region")
    region = _polygonal(shapely.union_all(areas)) if areas else Polygon()
    if region.is_empty:
        raise GeoJsonError(f"{path}: its polygons enclose no area", _AREA_HINT)
    return region, warnings


def drawn_objects(objects: list[QuPathObject]) -> tuple[list[QuPathObject], str]:
    """Keep the annotations; also return how many objects of other types were left out, in words ('' if none),
    e.g. '12 cells, 3 detections'."""
    kept = [obj for obj in objects if obj.object_type in REGION_TYPES]
    left = Counter(obj.object_type for obj in objects if obj.object_type not in REGION_TYPES)
    return kept, ", ".join(
        f"{n} {_TYPE_WORDS.get(kind, kind)}{'' if n == 1 else 's'}" for kind, n in sorted(left.items())
    )


_TYPE_WORDS = {"tmaCore": "TMA core", "root": "root object"}


def _load_json(path: Path, max_bytes: int) -> Any:
    """Read, decompress, decode and parse a JSON file, reporting each failure with the file name."""
    text = _decode(path, _read_bytes(path, max_bytes))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise GeoJsonError(f"{path}: is not valid JSON ({exc.msg} at {where})", _EXPORT_HINT) from exc
    except (ValueError, RecursionError) as exc:
        raise GeoJsonError(f"{path}: is not valid JSON ({_one_line(exc)})", _EXPORT_HINT) from exc


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` of a file, gunzipping it when it starts with gzip's magic bytes."""
    if path.is_dir():
        raise GeoJsonError(f"{path}: is a folder, not a GeoJSON file", "give the path of the .geojson file")
    if not path.is_file():
        raise GeoJsonError(f"{path}: no such file", f"check the path; {_EXPORT_HINT}")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_big(path, f"is {size:,} bytes, more than", max_bytes)
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise GeoJsonError(f"{path}: cannot be read ({exc.strerror or exc})", "check the file's permissions") from exc
    return _gunzip(path, data, max_bytes) if data[:2] == b"\x1f\x8b" else data


def _gunzip(path: Path, data: bytes, max_bytes: int) -> bytes:
    """Decompress gzip ``data``, refusing more than ``max_bytes`` of output."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as handle:
            out = handle.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        hint = f"check the download, or decompress it with gunzip to see the error; {_EXPORT_HINT}"
        raise GeoJsonError(f"{path}: is not a valid gzip file ({_one_line(exc)})", hint) from exc
    if len(out) > max_bytes:
        raise _too_big(path, "decompresses to more than", max_bytes)
    return out


def _too_big(path: Path, what: str, max_bytes: int) -> GeoJsonError:
    """Build the error for a file over the size limit."""
    hint = (
        "export only the objects you need: select them in QuPath, then File > Export objects as GeoJSON "
        "(the annotations, not thousands of detections)"
    )
    return GeoJsonError(f"{path}: {what} the limit of {max_bytes:,} bytes ({max_bytes / 2**20:g} MiB)", hint)


def _decode(path: Path, data: bytes) -> str:
    """Decode UTF-8 (with or without a byte-order mark)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        message = f"{path}: is not UTF-8 text (byte {exc.start}, line {line})"
        raise GeoJsonError(message, f"save it as UTF-8 JSON; {_EXPORT_HINT}") from exc


def _guarded(path: Path, index: int | None, func: Callable[..., _T], *args: Any) -> _T:
    """Call ``func``; turn any failure on malformed input into a GeoJsonError naming the file and feature."""
    where = f"{path}:" if index is None else f"{path}: feature {index + 1}"
    try:
        return func(*args)
    except _Invalid as exc:
        raise GeoJsonError(f"{where} {exc.message}", exc.hint) from None
    except _WRAPPED as exc:
        message = f"{where} cannot be read ({type(exc).__name__}: {_one_line(exc)})"
        raise GeoJsonError(message, _EXPORT_HINT) from exc


def _feature_items(root: Any) -> list[Any]:
    """Return the feature candidates of a FeatureCollection, a list, a Feature or a bare Geometry."""
    if isinstance(root, list):
        return root
    if not isinstance(root, dict):
        raise _Invalid(f"holds {_json_kind(root)}, not GeoJSON (a FeatureCollection, Feature or list of Features)")
    kind = root.get("type")
    if kind == "FeatureCollection":
        features = root.get("features")
        if not isinstance(features, list):
            raise _Invalid("is a FeatureCollection without a 'features' list")
        return features
    if kind == "Feature":
        return [root]
    if isinstance(kind, str) and kind in _GEOMETRY_TYPES:
        return [{"type": "Feature", "geometry": root}]
    what = "has no 'type'" if kind is None else f"has the type {_show(kind)}"
    raise _Invalid(f"is JSON but not GeoJSON: the top-level object {what}")


def _with_children(items: list[Any]) -> list[Any]:
    """Each feature followed by its child objects (QuPath's hierarchy export nests them in the properties)."""
    flat: list[Any] = []
    for item in items:
        flat.append(item)
        props = item.get("properties") if isinstance(item, dict) else None
        children = props.get("childObjects", props.get("children")) if isinstance(props, dict) else None
        if isinstance(children, list):
            flat.extend(_with_children(children))
    return flat


def _parse_feature(item: Any, index: int, offset: Offset) -> QuPathObject:
    """Parse one GeoJSON Feature into a QuPathObject."""
    if not isinstance(item, dict) or item.get("type") != "Feature":
        got = f"an object of type {_show(item.get('type'))}" if isinstance(item, dict) else _json_kind(item)
        raise _Invalid(f"is not a GeoJSON Feature (it is {got})")
    props = _parse_properties(item.get("properties"))
    geometry = _parse_geometry(item.get("geometry"))
    if offset[0] or offset[1]:
        geometry = shapely.affinity.translate(geometry, offset[0], offset[1])
    classification, color = _parse_classification(props.get("classification"))
    feature_id = _parse_text(item.get("id"), "id")
    legacy_type = _LEGACY_TYPE_IDS.get(feature_id or "")
    return QuPathObject(
        geometry=geometry,
        object_type=_parse_object_type(props, legacy_type),
        name=_parse_text(props.get("name"), "name"),
        classification=classification,
        color=color or _parse_color(props.get("color"), "color"),
        id=None if legacy_type else feature_id,
        measurements=_parse_measurements(props.get("measurements")),
        metadata=_parse_metadata(props.get("metadata")),
        index=index,
    )


def _parse_properties(value: Any) -> dict[str, Any]:
    """Return a Feature's properties; a missing or null one is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"has 'properties' that are {_json_kind(value)}, not a JSON object")
    return value


def _parse_geometry(value: Any, depth: int = 0) -> BaseGeometry:
    """Check a GeoJSON geometry's structure and build it with shapely."""
    if value is None:
        raise _Invalid("has no geometry")
    if not isinstance(value, dict):
        raise _Invalid(f"has a geometry that is {_json_kind(value)}, not a GeoJSON geometry object")
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in _GEOMETRY_TYPES:
        raise _Invalid(f"has an unknown geometry type {_show(kind)}", f"use {', '.join(sorted(_GEOMETRY_TYPES))}")
    if kind == "GeometryCollection":
        geometry = _parse_collection(value.get("geometries"), depth)
    else:
        coordinates = value.get("coordinates")
        if coordinates is None:
            raise _Invalid(f"has a {kind} without 'coordinates'")
        try:
            geometry = shape({"type": kind, "coordinates": _COORDINATES[kind](coordinates)})
        except _Invalid as exc:
            raise _Invalid(f"has a malformed {kind}: {exc.message}") from None
    if geometry.is_empty:
        raise _Invalid(f"has an empty {kind}")
    return geometry


def _parse_collection(parts: Any, depth: int) -> GeometryCollection:
    """Build a GeometryCollection from its member geometries."""
    if not isinstance(parts, list):
        raise _Invalid("has a GeometryCollection without a 'geometries' list")
    if depth >= _MAX_COLLECTION_DEPTH:
        raise _Invalid(f"has GeometryCollections nested more than {_MAX_COLLECTION_DEPTH} deep")
    return GeometryCollection([_parse_geometry(part, depth + 1) for part in parts])


def _position(value: Any) -> list[float]:
    """Check one ``[x, y]`` (or ``[x, y, z]``) position and return ``[x, y]``."""
    if not isinstance(value, list) or len(value) < 2:
        raise _Invalid(f"expected a position [x, y], got {_show(value)} (check the nesting of 'coordinates')")
    xy = value[:2]
    for number in xy:
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise _Invalid(f"the coordinate {_show(number)} is not a number")
        if not math.isfinite(number):
            raise _Invalid(f"the coordinate {_show(number)} is not finite")
    return [float(xy[0]), float(xy[1])]


def _positions(value: Any, minimum: int = 0) -> list[list[float]]:
    """Check a list of positions with at least ``minimum`` entries."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of positions, got {_show(value)} (check the nesting of 'coordinates')")
    points = [_position(item) for item in value]
    if len(points) < minimum:
        raise _Invalid(f"a line has {len(points)} position(s); it needs at least {minimum}")
    return points


def _ring(value: Any) -> list[list[float]]:
    """Check a linear ring, closing it if the last position does not repeat the first."""
    points = _positions(value)
    if points and points[0] != points[-1]:
        points.append(points[0])
    if len(points) < 4:
        raise _Invalid(f"a ring has {len(points)} position(s); it needs at least 4 (the first repeated at the end)")
    return points


def _lists(value: Any, item: Callable[[Any], Any], what: str) -> list[Any]:
    """Check a list whose members are each checked by ``item``."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of {what}, got {_show(value)} (check the nesting of 'coordinates')")
    return [item(member) for member in value]


def _polygon(value: Any) -> list[list[list[float]]]:
    """Check a polygon: an exterior ring followed by its holes."""
    rings = _lists(value, _ring, "rings")
    if not rings:
        raise _Invalid("a polygon has no rings")
    return rings


_COORDINATES: dict[str, Callable[[Any], Any]] = {
    "Point": _position,
    "MultiPoint": _positions,
    "LineString": lambda value: _positions(value, 2),
    "MultiLineString": lambda value: _lists(value, lambda line: _positions(line, 2), "lines"),
    "Polygon": _polygon,
    "MultiPolygon": lambda value: _lists(value, _polygon, "polygons"),
}


def _parse_object_type(props: dict[str, Any], legacy: str | None = None) -> str:
    """Return the object type from ``objectType``, older ``object_type`` or ``type``, else from a v0.2 type id
    (``legacy``); default annotation."""
    for key in ("objectType", "object_type"):
        value = props.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.lower() in _OBJECT_TYPES:
            return _OBJECT_TYPES[value.lower()]
        raise _Invalid(f"has an unknown {key} {_show(value)}", f"use one of {', '.join(_OBJECT_TYPES.values())}")
    alias = props.get("type")
    if isinstance(alias, str) and alias.lower() in _OBJECT_TYPES:
        return _OBJECT_TYPES[alias.lower()]
    return legacy or "annotation"


def _parse_text(value: Any, what: str) -> str | None:
    """Return a string property (numbers are turned into text); null means None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _Invalid(f"has a {what} that is {_json_kind(value)}, not text")


def _parse_classification(value: Any) -> tuple[str | None, Color | None]:
    """Return the class name (derived classes joined by ': ', as QuPath names them) and its colour.

    Besides the current forms, QuPath reads those it wrote before 0.4: ``{}`` for "unclassified", and a class
    with ``colorRGB`` (one packed integer) whose parents nest as ``parentClass`` objects."""
    if value is None or isinstance(value, str):
        return (value or None), None
    if not isinstance(value, dict):
        raise _Invalid(f"has a classification that is {_json_kind(value)}, not an object or a name")
    if not value:
        return None, None
    names = value.get("names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        name = ": ".join(names)
    elif isinstance(value.get("name"), str):
        name = ": ".join([*_parent_names(value.get("parentClass")), value["name"]])
    else:
        raise _Invalid("has a classification without a 'name' (or a 'names' list of text)")
    color = _parse_color(value.get("color"), "classification color")
    return (name or None), color or _parse_color(value.get("colorRGB"), "classification colorRGB")


def _parent_names(parent: Any, depth: int = 0) -> list[str]:
    """The names of a legacy class's ancestors, the outermost first."""
    if parent is None:
        return []
    if not isinstance(parent, dict) or not isinstance(parent.get("name"), str):
        raise _Invalid(f"has a parentClass {_show(parent)} without a 'name'")
    if depth >= _MAX_COLLECTION_DEPTH:
        raise _Invalid(f"has classes nested more than {_MAX_COLLECTION_DEPTH} deep")
    return [*_parent_names(parent.get("parentClass"), depth + 1), parent["name"]]


def _parse_color(value: Any, what: str) -> Color | None:
    """Return an ``[r, g, b(, a)]`` list or a packed integer colour as ``(r, g, b)``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    if isinstance(value, list) and len(value) in (3, 4) and all(_is_channel(v) for v in value):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise _Invalid(f"has a {what} {_show(value)} that is not [r, g, b] with values 0-255")


def _is_channel(value: Any) -> bool:
    """Tell whether a value is a colour channel: a whole number from 0 to 255."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(value).is_integer() and 0 <= value <= 255


def _parse_metadata(value: Any) -> dict[str, str]:
    """Return QuPath's metadata map; like QuPath, keep the entries whose values are text, numbers or booleans."""
    if not isinstance(value, dict):
        return {}
    return {
        str(key): item if isinstance(item, str) else json.dumps(item)
        for key, item in value.items()
        if isinstance(item, str | int | float | bool)
    }


def _parse_measurements(value: Any) -> dict[str, float]:
    """Return measurements from a ``{name: value}`` map or an older ``[{name, value}]`` list."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(name): _measurement(name, number) for name, number in value.items()}
    if isinstance(value, list):
        pairs = [_measurement_pair(item) for item in value]
        return {name: _measurement(name, number) for name, number in pairs}
    raise _Invalid(f"has measurements that are {_json_kind(value)}, not a map of name to number")


def _measurement_pair(item: Any) -> tuple[str, Any]:
    """Return ``(name, value)`` of one entry of the older measurement list."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise _Invalid(f"has a measurement entry {_show(item)} that is not {{'name': ..., 'value': ...}}")
    return item["name"], item.get("value")


def _measurement(name: Any, value: Any) -> float:
    """Return a measurement value as a float; null and 'NaN' are NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str) and value.strip().lower() in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value.strip().lower()]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _Invalid(f"has the measurement {_show(name)} = {_show(value)}, which is not a number")


# ---------------------------------------------------------------------------------------------- regions


def _object_area(obj: QuPathObject) -> tuple[BaseGeometry | None, str | None]:
    """Return the valid polygonal part of an object (None if it has none) and a warning if it was repaired."""
    area = _polygonal(obj.geometry)
    if area.is_empty:
        return None, None
    if area.is_valid:
        return area, None
    reason = _valid_reason(area)
    area = _polygonal(shapely.make_valid(area))
    if area.is_empty:
        return None, f"{_label(obj)} was not a valid polygon ({reason}) and encloses no area; ignored"
    return area, f"{_label(obj)} was not a valid polygon ({reason}); repaired"


def _valid_reason(geometry: BaseGeometry) -> str:
    """Return GEOS's reason for invalidity, e.g. 'Self-intersection at 10,20'."""
    return re.sub(r"\[(\S+) (\S+)\]", r" at \1,\2", shapely.is_valid_reason(geometry))


def _has_non_polygonal_part(geometry: BaseGeometry) -> bool:
    """Tell whether a geometry has points or lines."""
    if type(geometry) is GeometryCollection:
        return any(_has_non_polygonal_part(part) for part in geometry.geoms)
    return not isinstance(geometry, Polygon | MultiPolygon)


def _polygon_parts(geometry: BaseGeometry) -> list[Polygon]:
    """Return the non-empty polygons of a geometry, looking inside collections."""
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    if isinstance(geometry, MultiPolygon):
        return [part for part in geometry.geoms if not part.is_empty]
    if type(geometry) is GeometryCollection:
        return [polygon for part in geometry.geoms for polygon in _polygon_parts(part)]
    return []


def _polygonal(geometry: BaseGeometry) -> Polygon | MultiPolygon:
    """Return the polygonal part of a geometry as one (Multi)Polygon, empty if it has none."""
    parts = _polygon_parts(geometry)
    if not parts:
        return Polygon()
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _label(obj: QuPathObject) -> str:
    """Name an object in messages, counting from 1: 'feature 2' or "feature 2 ('query 1')"."""
    return f"feature {obj.index + 1}" + (f" ({obj.name!r})" if obj.name else "")


def _short_list(labels: Sequence[str], limit: int = 5) -> str:
    """Join labels, cutting long lists short."""
    shown = ", ".join(labels[:limit])
    return shown if len(labels) <= limit else f"{shown} and {len(labels) - limit} more"


# ---------------------------------------------------------------------------------------------- writing


def make_feature(
    geometry: BaseGeometry,
    *,
    object_type: str = "annotation",
    name: str | None = None,
    classification: str | None = None,
    color: Color | None = None,
    measurements: dict[str, float] | None = None,
    properties: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    offset: Offset = (0.0, 0.0),
    feature_id: str | None = None,
    locked: bool = False,
) -> dict[str, Any]:
    """Return a GeoJSON Feature as QuPath writes it, with valid geometry rounded to 0.01 px.

    ``metadata`` goes into QuPath's own map of strings, which QuPath keeps through import and export (other
    properties it drops); ``isLocked`` is written only when true, as QuPath does."""
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = name
    if classification is not None:
        props["classification"] = {
            "name": classification,
            "color": _color_json(color or class_color(classification)),
        }
    elif color is not None:
        props["color"] = _color_json(color)
    if locked:
        props["isLocked"] = True
    if measurements is not None:
        props["measurements"] = {str(key): _measurement_json(value) for key, value in measurements.items()}
    clash = sorted(set(properties or {}) & {*props, "metadata", "isLocked"})
    if clash:
        raise ValueError(f"properties {clash} would overwrite the ones make_feature writes; use its arguments")
    props.update(properties or {})
    if metadata:
        props["metadata"] = {str(key): str(value) for key, value in metadata.items()}
    geometry_json = _geometry_json(_prepare_geometry(geometry, offset))
    return {
        "type": "Feature",
        "id": feature_id or str(uuid.uuid4()),
        "geometry": geometry_json,
        "properties": props,
    }


def write_features(path: Path, features: Sequence[dict[str, Any]]) -> None:
    """Write Features as a FeatureCollection atomically; a ``.gz`` suffix gzips the file."""
    path = Path(path)
    collection = {"type": "FeatureCollection", "features": list(features)}
    text = json.dumps(collection, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    if path.suffix.lower() == ".gz":
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        atomic_write_text(path, text)


def _color_json(color: Sequence[int]) -> list[int]:
    """Return a colour as ``[r, g, b]`` of plain ints, checking its range."""
    values = [int(channel) for channel in color]
    if len(values) != 3 or not all(0 <= channel <= 255 for channel in values):
        raise ValueError(f"colour {tuple(color)!r} is not (r, g, b) with values 0-255")
    return values


def _measurement_json(value: float) -> float | str:
    """Return a measurement as QuPath writes it: a number, or 'NaN' / 'Infinity' / '-Infinity'."""
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return number


def _prepare_geometry(geometry: BaseGeometry, offset: Offset) -> BaseGeometry:
    """Shift a geometry into file coordinates and make it valid on QuPath's 0.01 px grid."""
    if not isinstance(geometry, BaseGeometry):
        raise TypeError(f"expected a shapely geometry, got {type(geometry).__name__}")
    if offset[0] or offset[1]:
        geometry = shapely.affinity.translate(geometry, -offset[0], -offset[1])
    if not _has_non_polygonal_part(geometry):
        prepared = _clean_polygonal(geometry)
    elif geometry.geom_type in ("Point", "MultiPoint", "LineString"):
        prepared = shapely.set_precision(geometry, PRECISION_PX)
    else:
        raise ValueError(f"QuPath cannot import a {geometry.geom_type} as one object; split it first")
    if prepared.is_empty:
        raise ValueError(f"the {geometry.geom_type} is empty at 0.01 px precision; there is nothing to write")
    return prepared


def _clean_polygonal(geometry: BaseGeometry) -> Polygon | MultiPolygon:
    """Return valid, 0.01 px-rounded, consistently oriented polygons with no empty parts."""
    area = geometry if geometry.is_valid else shapely.make_valid(geometry)
    area = _polygonal(area)
    if not area.is_valid:  # e.g. overlapping polygons from a GeometryCollection
        area = _polygonal(shapely.union_all(_polygon_parts(area)))
    for _ in range(3):
        if not _on_grid(area):
            area = _polygonal(shapely.set_precision(area, PRECISION_PX))
        if area.is_valid:
            return _orient(area)
        area = _polygonal(shapely.make_valid(area))
    raise ValueError("could not make the geometry valid on QuPath's 0.01 px grid")


def _orient(area: Polygon | MultiPolygon) -> Polygon | MultiPolygon:
    """Orient exteriors counter-clockwise and holes clockwise (in x-right, y-up terms)."""
    if hasattr(shapely, "orient_polygons"):  # shapely >= 2.1: vectorised
        return shapely.orient_polygons(area)
    if area.is_empty:  # shapely 2.0's orient fails on an empty ring
        return area
    if isinstance(area, Polygon):
        return orient(area)
    return MultiPolygon([orient(part) for part in area.geoms])


def _on_grid(geometry: BaseGeometry) -> bool:
    """Tell whether every coordinate is already a multiple of 0.01 px."""
    scaled = shapely.get_coordinates(geometry) / PRECISION_PX
    return bool(np.all(np.abs(scaled - np.round(scaled)) <= 1e-6))


def _geometry_json(geometry: BaseGeometry) -> dict[str, Any]:
    """Return a GeoJSON geometry with plain-float coordinates rounded to 0.01 px."""
    kind = geometry.geom_type
    if kind == "Polygon":
        coordinates: Any = _polygon_json(geometry)
    elif kind == "MultiPolygon":
        coordinates = [_polygon_json(part) for part in geometry.geoms]
    elif kind == "Point":
        coordinates = _coordinates_json(geometry)[0]
    else:
        coordinates = _coordinates_json(geometry)
    return {"type": kind, "coordinates": coordinates}


def _polygon_json(polygon: Polygon) -> list[list[list[float]]]:
    """Return a polygon's rings, exterior first, as coordinate lists."""
    return [_coordinates_json(polygon.exterior), *(_coordinates_json(ring) for ring in polygon.interiors)]


def _coordinates_json(geometry: BaseGeometry) -> list[list[float | int]]:
    """Return the ``[x, y]`` coordinates of a simple geometry, rounded to 0.01 px; whole numbers as integers
    (``896``, not ``896.0``), as QuPath writes them."""
    coordinates = shapely.get_coordinates(geometry)
    if not np.all(np.isfinite(coordinates)):
        raise ValueError("geometry has NaN or infinite coordinates")
    rounded = np.round(coordinates, 2)
    return [[int(v) if v.is_integer() else v for v in pair] for pair in rounded.tolist()]


# ---------------------------------------------------------------------------------------------- patches


_EXACT_COVERAGE_UNION = (3, 14, 0)
"""GEOS before 3.14 (shapely 2.0 and 2.1) unions a coverage of squares into invalid, self-touching rings, and
slowly; there the general union takes its place (valid; about 3x slower than GEOS 3.14's coverage union)."""


def union_squares(
    xs: np.ndarray | Sequence[int], ys: np.ndarray | Sequence[int], width: int, height: int
) -> Polygon | MultiPolygon:
    """Return the valid union of ``width`` x ``height`` patches with top-left corners ``(xs, ys)``."""
    x = np.asarray(xs, dtype=np.float64).ravel()
    y = np.asarray(ys, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"xs and ys differ in length ({x.size} and {y.size})")
    if width <= 0 or height <= 0:
        raise ValueError(f"patch size must be positive, got {width} x {height}")
    if x.size == 0:
        return Polygon()
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("patch corners must be finite")
    x0, y0 = x.min(), y.min()
    on_lattice = np.all((x - x0) % width == 0) and np.all((y - y0) % height == 0)
    lattice = on_lattice and shapely.geos_version >= _EXACT_COVERAGE_UNION
    merged = _union_lattice(x, y, width, height) if lattice else _union_boxes(x, y, width, height)
    return _drop_collinear(_polygonal(merged))


def _union_lattice(x: np.ndarray, y: np.ndarray, width: int, height: int) -> BaseGeometry:
    """Merge squares on one lattice: they form a coverage, which GEOS unions fast and exactly."""
    x0, y0 = x.min(), y.min()
    cols = np.rint((x - x0) / width).astype(np.int64)
    rows = np.rint((y - y0) / height).astype(np.int64)
    keys = np.unique(rows * (int(cols.max()) + 1) + cols)  # drop duplicate patches: a coverage has no overlaps
    rows, cols = np.divmod(keys, int(cols.max()) + 1)
    left, top = x0 + cols * width, y0 + rows * height
    return shapely.coverage_union_all(shapely.box(left, top, left + width, top + height))


def _union_boxes(x: np.ndarray, y: np.ndarray, width: int, height: int) -> BaseGeometry:
    """Merge squares that are not on one lattice (they may overlap) with a general union."""
    return shapely.union_all(shapely.box(x, y, x + width, y + height))


def _drop_collinear(area: Polygon | MultiPolygon) -> Polygon | MultiPolygon:
    """Remove ring vertices that lie on a straight line between their neighbours (patch corners on edges)."""
    polygons = shapely.get_parts(area)
    if area.is_empty or not polygons.size:
        return area
    rings = shapely.get_rings(polygons)
    ring_polygon = np.repeat(np.arange(polygons.size), shapely.get_num_interior_rings(polygons) + 1)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    is_last = np.r_[ring_of[1:] != ring_of[:-1], True]  # the closing repeat of the first point
    coords, ring_of = coords[~is_last], ring_of[~is_last]
    start = np.searchsorted(ring_of, ring_of)
    length = np.bincount(ring_of, minlength=rings.size)[ring_of]
    local = np.arange(ring_of.size) - start
    before = coords[start + (local - 1) % length]
    after = coords[start + (local + 1) % length]
    cross = (coords[:, 0] - before[:, 0]) * (after[:, 1] - coords[:, 1]) - (coords[:, 1] - before[:, 1]) * (
        after[:, 0] - coords[:, 0]
    )
    keep = cross != 0
    simplified = shapely.polygons(shapely.linearrings(coords[keep], indices=ring_of[keep]), indices=ring_polygon)
    return simplified[0] if simplified.size == 1 else MultiPolygon(list(simplified))


# ---------------------------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    """Return a short repr of a JSON value for messages."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 40, 40
    return " ".join(short.repr(value).split())


def _json_kind(value: Any) -> str:
    """Name the JSON kind of a value: 'an object', 'a list', 'a string', 'a number', 'true/false', 'null'."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string {_show(value)}"
    if isinstance(value, bool):
        return f"the value {str(value).lower()}"
    if value is None:
        return "null"
    return f"the number {_show(value)}"


def _one_line(exc: BaseException) -> str:
    """Return an exception's message on one line, cut to a readable length."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
