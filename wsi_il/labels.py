"""Read the expert's labels back: a filled labels.csv (any spreadsheet's CSV) or a GeoJSON exported from QuPath,
checked against the batch it answers."""

from __future__ import annotations

import csv
import io
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_il.batch import (
    BATCH_GEOJSON,
    BatchInfo,
    BatchPatch,
    clean_text,
    normalize_label,
    patch_number,
    patch_object_id,
    shorten,
)
from wsi_il.errors import LabelsError, WsiIlError

if TYPE_CHECKING:
    from wsi_il.qupath import QuPathObject

_GEOJSON_SUFFIXES = frozenset({".geojson", ".json", ".gz"})
_DELIMITERS = (",", ";", "\t")
_MAX_LISTED = 5


def read_labels(
    path: Path,
    info: BatchInfo,
    patches: list[BatchPatch],
    *,
    allow_partial: bool = False,
    allow_empty: bool = False,
    offsets: dict[str, tuple[float, float]] | None = None,
    max_bytes: int = 64 * 2**20,
) -> dict[str, str]:
    """Read a filled labels CSV or a GeoJSON exported from QuPath; return {patch_id: label}.

    Only labelled patches are returned, in batch order; raises LabelsError for anything the expert
    must fix (with ``allow_partial``, also a file without any label, unless ``allow_empty``).
    """
    path = Path(path)
    head = _read_head(path, max_bytes)
    if _is_geojson(path, head):
        labels = _labels_from_geojson(path, info, patches, allow_partial, offsets or {}, max_bytes)
    else:
        labels = _labels_from_csv(path, info, patches, allow_partial)
    return _filled(path, labels, patches, allow_empty)


def _read_head(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise LabelsError(f"{path} is not a file", "give the labels.csv or the GeoJSON exported from QuPath")
        with path.open("rb") as handle:
            head = handle.read(64)
    except FileNotFoundError as exc:
        raise LabelsError(f"{path} does not exist", "check the path of the labels file") from exc
    except OSError as exc:
        raise LabelsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise LabelsError(
            f"{path.name} is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.1f} MiB a labels file may have",
            "give the labels.csv of the batch or the GeoJSON exported from QuPath",
        )
    return head


def _is_geojson(path: Path, head: bytes) -> bool:
    suffix = path.suffix.lower()
    if suffix in _GEOJSON_SUFFIXES:
        return True
    if head.startswith(b"\x1f\x8b"):
        return True
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")


def _labels_from_csv(
    path: Path, info: BatchInfo, patches: list[BatchPatch], allow_partial: bool
) -> dict[str, str | None]:
    records = _csv_records(path)
    start = next((i for i, record in enumerate(records) if any(clean_text(f) for f in record)), len(records))
    columns = _column_positions(path, records[start] if records[start:] else [])
    rows = _data_rows(path, records, start, columns)
    _check_batch_column(path, rows, info)
    labels = _labels_by_patch(path, rows, info, patches)
    _check_no_missing_rows(path, labels, patches)
    if not allow_partial:
        _check_filled(path, labels, patches)
    return labels


def _csv_records(path: Path) -> list[list[str]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    text = _decode(data)
    header = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=csv_delimiter(header)))
    except csv.Error as exc:
        raise LabelsError(f"{path.name} is not a readable CSV file: {exc}", _CSV_HINT) from exc


_CSV_HINT = "save the sheet again as CSV (comma, semicolon or tab separated) with the columns patch_id and label"


def _decode(data: bytes) -> str:
    """Decode what spreadsheet programs write: UTF-8 (with or without BOM), UTF-16, else Windows-1252."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def csv_delimiter(header: str) -> str:
    """Pick the delimiter that splits the header into the required columns, else the most fields."""
    best, best_fields = ",", 0
    for delimiter in _DELIMITERS:
        try:
            fields = [column_key(f) for f in next(csv.reader([header], delimiter=delimiter), [])]
        except csv.Error:
            continue
        if "patch_id" in fields and "label" in fields:
            return delimiter
        if len(fields) > best_fields:
            best, best_fields = delimiter, len(fields)
    return best


def column_key(name: str) -> str:
    """A header cell as the readers match it: case, spaces and dashes ignored (``Patch ID`` is ``patch_id``)."""
    return re.sub(r"[\s\-]+", "_", clean_text(name).casefold())


def _column_positions(path: Path, header: list[str]) -> dict[str, int]:
    keys = [column_key(h) for h in header]
    missing = [c for c in ("patch_id", "label") if c not in keys]
    if missing:
        raise LabelsError(
            f"{path.name} has no {' and no '.join(repr(m) for m in missing)} column in its first line",
            "keep the header line of the labels.csv the batch came with and fill its 'label' column",
        )
    positions: dict[str, int] = {}
    for i, key in enumerate(keys):
        positions.setdefault(key, i)
    return positions


def row_place(file_name: str, sheet_number: str, line: int) -> str:
    """Name a labels.csv row in messages as the expert sees it: the contact sheet's number, then the spreadsheet's
    row, e.g. ``labels.csv patch 05 (row 6)``."""
    return f"{file_name} patch {sheet_number} (row {line})"


@dataclass(frozen=True)
class _Row:
    line: int
    where: str
    patch_id: str
    label: str
    batch: str


def _data_rows(path: Path, records: list[list[str]], start: int, columns: dict[str, int]) -> list[_Row]:
    """Turn the records after the header into rows, numbered as a spreadsheet numbers them."""
    rows = []
    for number, record in enumerate(records[start + 1 :], start=start + 2):
        if not any(clean_text(field) for field in record):
            continue
        row = _Row(
            line=number,
            where=f"{path.name} row {number}",
            patch_id=clean_text(_field(record, columns.get("patch_id"))),
            label=_field(record, columns.get("label")),
            batch=clean_text(_field(record, columns.get("batch"))),
        )
        if not row.patch_id:
            raise LabelsError(f"{row.where} has no patch_id", "delete the row or restore its patch_id")
        rows.append(row)
    return rows


def _field(record: list[str], index: int | None) -> str:
    return record[index] if index is not None and index < len(record) else ""


def _check_batch_column(path: Path, rows: list[_Row], info: BatchInfo) -> None:
    for row in rows:
        if row.batch and row.batch != info.batch_id:
            raise LabelsError(
                f"{row.where}: this is the labels file of batch {shorten(row.batch)}, not {info.batch_id}",
                f"give the labels.csv from the folder of batch {info.batch_id}",
            )


def _labels_by_patch(path: Path, rows: list[_Row], info: BatchInfo, patches: list[BatchPatch]) -> dict[str, str | None]:
    known = {p.patch_id for p in patches}
    if rows and not any(row.patch_id in known for row in rows):
        raise LabelsError(
            f"{path.name} holds none of the patches of batch {info.batch_id}",
            f"give the labels.csv from the folder of batch {info.batch_id}",
        )
    labels: dict[str, str | None] = {}
    sheet = {p.patch_id: patch_number(n, len(patches)) for n, p in enumerate(patches, start=1)}
    for row in rows:
        if row.patch_id not in known:
            raise LabelsError(
                f"{row.where}: patch {shorten(row.patch_id)!r} is not in batch {info.batch_id}",
                "delete the row; add no rows to labels.csv",
            )
        where = row_place(path.name, sheet[row.patch_id], row.line)
        _merge(labels, row.patch_id, normalize_label(row.label, info, where), where)
    return labels


def _merge(labels: dict[str, str | None], patch_id: str, label: str | None, where: str) -> None:
    """Record ``label`` for ``patch_id``; an empty label never overrides nor conflicts with a filled one."""
    earlier = labels.get(patch_id)
    if earlier is not None and label is not None and earlier != label:
        raise LabelsError(
            f"{where}: patch {patch_id!r} is labelled both {earlier!r} and {label!r}",
            "keep one label per patch",
        )
    labels[patch_id] = earlier if label is None else label


def _check_filled(path: Path, labels: dict[str, str | None], patches: list[BatchPatch]) -> None:
    empty = [p.patch_id for p in patches if labels.get(p.patch_id) is None]
    if empty:
        raise LabelsError(
            f"{len(empty)} of {len(patches)} patches have no label in {path.name} ({_listing(empty)})",
            "fill them (skip for a patch that is not informative) or pass --partial",
        )


def _filled(
    path: Path, labels: dict[str, str | None], patches: list[BatchPatch], allow_empty: bool = False
) -> dict[str, str]:
    """Return the filled labels in batch order; raise when there are none (unless ``allow_empty``)."""
    filled: dict[str, str] = {}
    for patch in patches:
        label = labels.get(patch.patch_id)
        if label is not None:
            filled[patch.patch_id] = label
    if not filled and not allow_empty:
        raise LabelsError(f"{path.name} has no labels filled in", "fill the label of at least one patch")
    return filled


def _check_no_missing_rows(path: Path, labels: dict[str, str | None], patches: list[BatchPatch]) -> None:
    missing = [p.patch_id for p in patches if p.patch_id not in labels]
    if missing:
        raise LabelsError(
            f"{path.name} lacks the rows of {len(missing)} patches of the batch ({_listing(missing)})",
            "restore the rows (leave the label empty and pass --partial for patches you did not label)",
        )


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _labels_from_geojson(
    path: Path,
    info: BatchInfo,
    patches: list[BatchPatch],
    allow_partial: bool,
    offsets: dict[str, tuple[float, float]],
    max_bytes: int,
) -> dict[str, str | None]:
    slide_offsets = {offsets.get(p.slide, (0.0, 0.0)) for p in patches}
    by_geometry = len(slide_offsets) == 1
    from wsi_il.qupath import drawn_objects

    objects = _read_qupath_objects(path, next(iter(slide_offsets)) if by_geometry else (0.0, 0.0), max_bytes)
    objects, _ = drawn_objects(objects)  # a cell or detection inside a patch never gives the patch its label
    ids = {patch_object_id(info, p.patch_id): p.patch_id for p in patches}
    matches = [(obj, _match(obj, patches, by_geometry, ids)) for obj in objects]
    matched = [(obj, patch_id) for obj, patch_id in matches if patch_id is not None]
    if not matched:
        raise LabelsError(
            f"{path.name} holds none of the patches of batch {info.batch_id}",
            f"import {BATCH_GEOJSON} of batch {info.batch_id} in QuPath, classify its patch objects, "
            "and export all objects as GeoJSON",
        )
    labels: dict[str, str | None] = {}
    for obj, patch_id in matched:
        where = f"{path.name} object {obj.index + 1} ({shorten(obj.name or patch_id)})"
        _merge(labels, patch_id, normalize_label(obj.classification or "", info, where), where)
    if not allow_partial:
        _check_classified(path, labels, patches)
    return labels


def _read_qupath_objects(path: Path, offset: tuple[float, float], max_bytes: int) -> list[QuPathObject]:
    from wsi_il import qupath

    try:
        return qupath.read_objects(path, offset=offset, max_bytes=max_bytes)
    except LabelsError:
        raise
    except WsiIlError as exc:
        raise LabelsError(exc.message, exc.hint) from exc
    except (ValueError, OSError, EOFError, RecursionError, zlib.error) as exc:  # undecodable data
        raise LabelsError(f"{path.name} is not a readable GeoJSON file: {exc}", _GEOJSON_HINT) from exc


_GEOJSON_HINT = "export the objects again from QuPath (File > Object data > Export as GeoJSON)"


def _match(obj: QuPathObject, patches: list[BatchPatch], by_geometry: bool, ids: dict[str, str]) -> str | None:
    """Find the patch an annotation stands for: by the patch id in its metadata, its name or its object id (the
    batch writes all three, QuPath keeps them), else by its shape (a square over the patch, as imported)."""
    known = {p.patch_id for p in patches}
    for candidate in (obj.metadata.get("wsi_il.patch_id"), clean_text(obj.name or ""), ids.get(obj.id or "")):
        if candidate in known:
            return candidate
    if not by_geometry or obj.geometry is None or obj.geometry.is_empty:
        return None
    same = [p.patch_id for p in patches if _overlap(p, obj.geometry) >= _SAME_SQUARE]
    return same[0] if len(same) == 1 else None


_SAME_SQUARE = 0.9
"""An annotation is a patch's square when their intersection over union reaches this (QuPath rounds to 0.01 px)."""


def _overlap(patch: BatchPatch, geometry: Any) -> float:
    from shapely.geometry import box

    square = box(patch.x, patch.y, patch.x + patch.width, patch.y + patch.height)
    union = square.union(geometry).area
    return square.intersection(geometry).area / union if union else 0.0


def _check_classified(path: Path, labels: dict[str, str | None], patches: list[BatchPatch]) -> None:
    unclassified = [p.patch_id for p in patches if p.patch_id in labels and labels[p.patch_id] is None]
    absent = [p.patch_id for p in patches if p.patch_id not in labels]
    if unclassified:
        raise LabelsError(
            f"{len(unclassified)} objects in {path.name} have no classification ({_listing(unclassified)})",
            "classify every patch in QuPath (or pass --partial)",
        )
    if absent:
        raise LabelsError(
            f"{len(absent)} patches of the batch are not in {path.name} ({_listing(absent)})",
            "export all objects from QuPath, not a selection (or pass --partial)",
        )
