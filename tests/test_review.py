"""Tests for wsi_il.review: writing a review batch and reading the expert's labels back."""

from __future__ import annotations

import csv
import gzip
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import box

from wsi_il.batch import CSV_COLUMNS, BatchInfo, BatchPatch, accepted_labels, normalize_label, read_batch
from wsi_il.errors import LabelsError, ProjectStateError
from wsi_il.labels import read_labels
from wsi_il.review import write_batch

K = 7
OFFSET = (100.0, 50.0)
FILES = ("labels.csv", "contact_sheet.png", "batch.geojson", "README.txt", "batch.json")
LABELS = ["tumor", "normal", "tumor", "skip", "normal", "tumor", "normal"]


def _info(classes: tuple[str, ...] = ("tumor", "normal"), batch_id: str = "s1-r2") -> BatchInfo:
    return BatchInfo(
        batch_id=batch_id,
        project_uid="0b7f6a52-3c1e-4c59-9a3e-2f0d7c1a9e11",
        session="s1",
        round=int(batch_id.rsplit("r", 1)[1]),
        rounds=3,
        query_label="tumor",
        classes=classes,
        strategy="uncertainty",
    )


def _patches() -> list[BatchPatch]:
    patches = []
    for i in range(K):
        x, y = 1024 + 512 * i, 512 + 256 * (i % 3)
        suggestion, probability = ("tumor", 0.8712) if i % 2 == 0 else (None, None)
        patch = BatchPatch(f"CMU-1_x{x}_y{y}", "CMU-1", x, y, 224, 224, suggestion, probability, i + 1)
        patches.append(patch)
    return patches


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(K, 3))
    return [
        Image.fromarray(np.clip(c + rng.normal(0, 30, (224, 224, 3)), 0, 255).astype(np.uint8), "RGB") for c in colours
    ]


@pytest.fixture
def info() -> BatchInfo:
    return _info()


@pytest.fixture
def patches() -> list[BatchPatch]:
    return _patches()


@pytest.fixture
def folder(tmp_path: Path, info: BatchInfo, patches: list[BatchPatch]) -> Path:
    out = tmp_path / "batches" / info.batch_id
    write_batch(out, info, patches, _images(), offsets={"CMU-1": OFFSET}, project_hint="/data/proj")
    return out


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None, **kw: object) -> Path:
    encoding = str(kw.pop("encoding", "utf-8"))
    columns = columns or list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", **kw)
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def _filled(folder: Path, labels: list[str]) -> list[dict[str, str]]:
    rows = _rows(folder)
    for row, label in zip(rows, labels, strict=True):
        row["label"] = label
    return rows


def _expected(patches: list[BatchPatch], labels: list[str]) -> dict[str, str]:
    return {p.patch_id: label for p, label in zip(patches, labels, strict=True) if label}


# ------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("tumor", "tumor"), ("  Tumor ", "tumor"), ("\u00a0NORMAL\u00a0", "normal"), ("", None),
        ("   ", None), ("YES", "tumor"), ("1", "tumor"), ("+", "tumor"), ("relevant", "tumor"),
        ("no", "normal"), ("0", "normal"), ("FALSE", "normal"), ("-", "normal"), ("Skip", "skip"),
    ],
)  # fmt: skip
def test_normalize_label_two_classes(raw: str, expected: str | None, info: BatchInfo) -> None:
    assert normalize_label(raw, info) == expected


def test_normalize_label_multi_class_keeps_spelling() -> None:
    info = _info(("Tumor", "Stroma", "Necrosis"))
    info = BatchInfo(**{**info.__dict__, "query_label": "Tumor"})
    assert normalize_label("stroma", info) == "Stroma"
    assert normalize_label("no", info) == "not:Tumor"
    assert normalize_label("y", info) == "Tumor"


def test_normalize_label_rejects_unknown_with_where(info: BatchInfo) -> None:
    with pytest.raises(LabelsError) as err:
        normalize_label("tumour", info, where="labels.csv row 17")
    assert "labels.csv row 17: label 'tumour' is not one of tumor, normal, yes, no, 1, 0" in str(err.value)
    assert accepted_labels(info)[-1] == "skip"


# -------------------------------------------------------------------------------------- write_batch


def test_write_batch_writes_every_file(folder: Path) -> None:
    for name in FILES:
        assert (folder / name).is_file(), name
    pngs = sorted(p for p in folder.glob("[0-9][0-9]_*.png"))
    assert [p.name[:3] for p in pngs] == [f"{n:02d}_" for n in range(1, K + 1)]
    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == "RGB" and image.size == (224, 224)
    assert not list(folder.glob(".*.tmp"))


def test_contact_sheet_holds_a_grid_of_captioned_tiles(folder: Path) -> None:
    with Image.open(folder / "contact_sheet.png") as sheet:
        width, height = sheet.size
        corner = sheet.getpixel((1, 1))
    assert 4 * 256 <= width <= 4 * 256 + 100  # 7 patches alone (no slide around them): 4 columns of 256 px
    assert 2 * 256 + 60 <= height <= 2 * 256 + 400  # 2 rows with captions and a title
    assert corner == (255, 255, 255)


def test_labels_csv_lists_the_patches(folder: Path, patches: list[BatchPatch]) -> None:
    raw = (folder / "labels.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert raw.split(b"\n")[0] == (
        b"n,patch_id,slide,x,y,width,height,image,label,suggestion,suggestion_probability,suggestion_certainty,"
        b"rank,batch"
    )
    rows = _rows(folder)
    assert [r["patch_id"] for r in rows] == [p.patch_id for p in patches]
    assert rows[0]["image"] == f"01_{patches[0].patch_id}.png" and (folder / rows[0]["image"]).is_file()
    assert rows[0]["suggestion"] == "tumor" and rows[0]["suggestion_probability"] == "0.871"
    assert rows[0]["suggestion_certainty"] == "confident"
    assert rows[1]["suggestion"] == "" and rows[1]["suggestion_probability"] == ""
    assert rows[1]["suggestion_certainty"] == ""
    assert {r["batch"] for r in rows} == {"s1-r2"} and {r["label"] for r in rows} == {""}
    assert rows[6]["rank"] == "7" and rows[6]["n"] == "07"


def test_batch_json_round_trips(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    assert read_batch(folder) == (info, patches)


def test_readme_names_the_next_command(folder: Path) -> None:
    text = (folder / "README.txt").read_text(encoding="utf-8")
    assert f"wsi-il ingest /data/proj {folder / 'labels.csv'}" in text
    assert "round 2 of 3" in text and "is this tumor?" in text and "batch.geojson" in text
    assert "tumor, normal, yes, no, 1, 0, relevant, irrelevant, skip" in text


def test_batch_geojson_holds_unclassified_patch_squares(folder: Path, patches: list[BatchPatch]) -> None:
    from wsi_il import qupath

    raw = json.loads((folder / "batch.geojson").read_text(encoding="utf-8"))
    features = raw["features"] if isinstance(raw, dict) else raw
    assert features[0]["properties"]["metadata"] == {  # QuPath's own map of strings: it survives QuPath
        "wsi_il.batch": "s1-r2",
        "wsi_il.patch_id": patches[0].patch_id,
        "wsi_il.n": "01",
        "wsi_il.suggestion": "tumor (confident)",
    }
    assert "wsi_il.suggestion" not in features[1]["properties"]["metadata"]  # no suggestion, no mark
    assert "wsi_il" not in features[0]["properties"] and "isLocked" not in features[0]["properties"]
    assert features[0]["properties"]["measurements"] == {"Suggestion probability": pytest.approx(0.8712)}
    assert "classification" not in features[0]["properties"]
    at_file = qupath.read_objects(folder / "batch.geojson")
    at_wsi = qupath.read_objects(folder / "batch.geojson", offset=OFFSET)
    assert len(at_wsi) == K
    for obj, shifted, patch in zip(at_wsi, at_file, patches, strict=True):
        square = box(patch.x, patch.y, patch.x + patch.width, patch.y + patch.height)
        assert obj.object_type == "annotation" and obj.classification is None and obj.name == patch.patch_id
        assert obj.geometry.symmetric_difference(square).area < 1e-6
        x0, y0, _, _ = shifted.geometry.bounds
        assert (x0, y0) == pytest.approx((patch.x - OFFSET[0], patch.y - OFFSET[1]))


def test_write_batch_is_idempotent_and_refuses_another_batch(
    folder: Path, info: BatchInfo, patches: list[BatchPatch]
) -> None:
    before = (folder / "batch.json").read_bytes()
    write_batch(folder, info, patches, _images(), offsets={"CMU-1": OFFSET}, project_hint="/data/proj")
    assert (folder / "batch.json").read_bytes() == before
    with pytest.raises(ProjectStateError, match="already holds batch s1-r2"):
        write_batch(folder, _info(batch_id="s1-r3"), patches, _images())


def test_write_batch_rejects_mismatched_arguments(tmp_path: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    with pytest.raises(ValueError, match="7 patches but 6 images"):
        write_batch(tmp_path / "b", info, patches, _images()[:6])
    bad = [BatchPatch("../evil", "s", 0, 0, 1, 1)]
    with pytest.raises(ValueError, match="filename-safe"):
        write_batch(tmp_path / "b", info, bad, _images()[:1])


def test_write_batch_makes_every_file_durable_before_batch_json(
    tmp_path: Path, info: BatchInfo, patches: list[BatchPatch], monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch.json marks a complete batch: its rename comes last, after a sync of the folder that makes every
    other rename durable, and is itself followed by one; the other files share few folder syncs."""
    import os

    from wsi_il import fsutil, review

    events: list[str] = []
    replace, sync = os.replace, fsutil.fsync_dir
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(Path(dst).name), replace(src, dst)))
    for module in (fsutil, review):
        monkeypatch.setattr(module, "fsync_dir", lambda folder: (events.append("<sync>"), sync(folder)))
    folder = tmp_path / "b"
    write_batch(folder, info, patches, _images())
    renamed = [event for event in events if event != "<sync>"]
    assert sorted(renamed) == sorted(path.name for path in folder.iterdir())
    assert events[-2:] == ["batch.json", "<sync>"] and events[-3] == "<sync>"
    assert events.count("<sync>") < len(renamed) / 2


def test_write_batch_reports_a_failed_image_and_writes_no_batch_json(
    tmp_path: Path, info: BatchInfo, patches: list[BatchPatch], monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_il import review

    def failing(size: tuple[int, int], stripes: list[object]) -> bytes:  # the sheet's write fails, the patches' go on
        raise OSError("disk full")

    monkeypatch.setattr(review, "_assemble_png", failing)
    with pytest.raises(OSError, match="disk full"):
        write_batch(tmp_path / "b", info, patches, _images())
    assert not (tmp_path / "b" / "batch.json").exists()
    assert not list((tmp_path / "b").glob(".*.tmp"))


def test_atomic_write_without_folder_sync_leaves_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_il import fsutil

    synced: list[Path] = []
    monkeypatch.setattr(fsutil, "fsync_dir", synced.append)
    fsutil.atomic_write_bytes(tmp_path / "a.bin", b"old")
    fsutil.atomic_write_bytes(tmp_path / "a.bin", b"new" * 1000, sync_dir=False)
    fsutil.atomic_write_text(tmp_path / "b.txt", "text", sync_dir=False)
    assert (tmp_path / "a.bin").read_bytes() == b"new" * 1000 and (tmp_path / "b.txt").read_text() == "text"
    assert synced == [tmp_path] and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_read_batch_reports_missing_and_corrupt(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ProjectStateError, match="batch.json is missing"):
        read_batch(tmp_path)
    document = json.loads((folder / "batch.json").read_text(encoding="utf-8"))
    document["patches"][0]["x"] = "12"
    (folder / "batch.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ProjectStateError, match="corrupt"):
        read_batch(folder)
    (folder / "batch.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ProjectStateError, match="corrupt"):
        read_batch(folder)


# ----------------------------------------------------------------------------------- read_labels CSV


def test_read_labels_filled_csv(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.csv", _filled(folder, LABELS))
    assert read_labels(path, info, patches) == _expected(patches, LABELS)


def test_read_labels_excel_style(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    raw = ["  Tumor ", "normal", "YES", "skip", "0", "Tumor", "No"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\r\n", quoting=csv.QUOTE_ALL)
    rows = _filled(folder, raw)
    writer.writerow(["N", " Patch_ID ", *list(rows[0])[2:]])
    writer.writerows(list(row.values()) for row in rows)
    path = folder / "labels (excel).csv"
    path.write_bytes(b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8") + b";;;;\r\n\r\n\r\n")
    expected = ["tumor", "normal", "tumor", "skip", "normal", "tumor", "normal"]
    assert read_labels(path, info, patches) == _expected(patches, expected)


def test_read_labels_tab_separated(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.tsv", _filled(folder, LABELS), delimiter="\t")
    assert read_labels(path, info, patches) == _expected(patches, LABELS)


def test_read_labels_utf16_tab_separated(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.txt", _filled(folder, LABELS), delimiter="\t", encoding="utf-16")
    assert read_labels(path, info, patches) == _expected(patches, LABELS)


def test_read_labels_reordered_and_extra_columns(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    rows = [{**row, "comment": "vu"} for row in _filled(folder, LABELS)][::-1]
    path = _write_rows(folder / "mine.csv", rows, columns=["comment", "label", "patch_id"])
    assert read_labels(path, info, patches) == _expected(patches, LABELS)


def test_read_labels_latin1(folder: Path, patches: list[BatchPatch]) -> None:
    info = _info(("tumeur", "nécrose"))
    info = BatchInfo(**{**info.__dict__, "query_label": "tumeur"})
    labels = ["Nécrose", "tumeur", "NÉCROSE", "yes", "no", "skip", "tumeur"]
    path = _write_rows(folder / "labels.csv", _filled(folder, labels), encoding="latin-1")
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    expected = ["nécrose", "tumeur", "nécrose", "tumeur", "nécrose", "skip", "tumeur"]
    assert read_labels(path, info, patches) == _expected(patches, expected)


def test_read_labels_multi_class(folder: Path, patches: list[BatchPatch]) -> None:
    info = _info(("tumor", "stroma", "necrosis"))
    labels = ["tumor", "no", "stroma", "necrosis", "yes", "skip", "0"]
    path = _write_rows(folder / "labels.csv", _filled(folder, labels))
    expected = ["tumor", "not:tumor", "stroma", "necrosis", "tumor", "skip", "not:tumor"]
    assert read_labels(path, info, patches) == _expected(patches, expected)


def _rejected(path: Path, info: BatchInfo, patches: list[BatchPatch], **kw: object) -> str:
    with pytest.raises(LabelsError) as err:
        read_labels(path, info, patches, **kw)
    return str(err.value)


def test_rejects_unknown_label(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.csv", _filled(folder, [*LABELS[:4], "tumour", *LABELS[5:]]))
    message = _rejected(path, info, patches)
    assert "labels.csv patch 05 (row 6): label 'tumour' is not one of tumor, normal, yes, no" in message
    assert "did you mean 'tumor'?" in message  # the sheet's number, the spreadsheet's row, and a near miss
    assert "skip" in message


def test_rejects_unknown_patch_id(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    rows = _filled(folder, LABELS)
    rows.append({**rows[0], "patch_id": "CMU-1_x0_y0"})
    message = _rejected(_write_rows(folder / "labels.csv", rows), info, patches)
    assert "row 9: patch 'CMU-1_x0_y0' is not in batch s1-r2" in message


def test_rejects_conflicting_duplicate(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    rows = _filled(folder, LABELS)
    path = _write_rows(folder / "labels.csv", [*rows, {**rows[2], "label": "TUMOR"}])
    assert read_labels(path, info, patches) == _expected(patches, LABELS)
    _write_rows(path, [*rows, {**rows[2], "label": "normal"}])
    assert "labelled both 'tumor' and 'normal'" in _rejected(path, info, patches)


def test_rejects_missing_row(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    rows = _filled(folder, LABELS)
    del rows[3]
    message = _rejected(_write_rows(folder / "labels.csv", rows), info, patches, allow_partial=True)
    assert "lacks the rows of 1 patches" in message and patches[3].patch_id in message


def test_rejects_another_batchs_csv(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.csv", _filled(folder, LABELS))
    message = _rejected(path, _info(batch_id="s1-r3"), patches)
    assert "this is the labels file of batch s1-r2, not s1-r3" in message


def test_half_filled_needs_allow_partial(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    labels = ["tumor", "", "normal", "", "", "skip", "  "]
    path = _write_rows(folder / "labels.csv", _filled(folder, labels))
    message = _rejected(path, info, patches)
    assert "4 of 7 patches have no label" in message and "--partial" in message
    assert read_labels(path, info, patches, allow_partial=True) == _expected(patches, [*labels[:6], ""])


def test_empty_with_allow_partial_is_rejected(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    assert "no labels filled in" in _rejected(folder / "labels.csv", info, patches, allow_partial=True)


def test_rejects_missing_label_column(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.csv", _filled(folder, LABELS), columns=["n", "patch_id", "slide"])
    assert "labels.csv has no 'label' column" in _rejected(path, info, patches)


def test_rejects_oversized_and_missing_files(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _write_rows(folder / "labels.csv", _filled(folder, LABELS))
    assert "MiB" in _rejected(path, info, patches, max_bytes=100)
    assert "does not exist" in _rejected(folder / "nope.csv", info, patches)
    assert "not a file" in _rejected(folder, info, patches)


# ------------------------------------------------------------------------------- read_labels GeoJSON


def _classified(folder: Path, labels: Sequence[str | None], *, drop_names: bool = False) -> list[dict]:
    raw = json.loads((folder / "batch.geojson").read_text(encoding="utf-8"))
    features = raw["features"] if isinstance(raw, dict) else raw
    for feature, label in zip(features, labels, strict=True):
        properties = feature["properties"]
        properties.pop("wsi_il", None)  # QuPath keeps only the properties it knows
        if label is not None:
            properties["classification"] = {"name": label, "color": [200, 0, 0]}
        if drop_names:
            properties.pop("name", None)
    return features


def _export(path: Path, features: list[dict]) -> Path:
    data = json.dumps({"type": "FeatureCollection", "features": features}).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


GEO_LABELS = ["Tumor", "normal", "tumor", "skip", "Normal", "tumor", "normal"]
GEO_EXPECTED = ["tumor", "normal", "tumor", "skip", "normal", "tumor", "normal"]


@pytest.mark.parametrize("name", ["export.geojson", "export.json", "export.geojson.gz", "export.dat"])
def test_geojson_route(folder: Path, info: BatchInfo, patches: list[BatchPatch], name: str) -> None:
    path = _export(folder / name, _classified(folder, GEO_LABELS))
    assert read_labels(path, info, patches) == _expected(patches, GEO_EXPECTED)


def test_geojson_unclassified_needs_allow_partial(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _export(folder / "export.geojson", _classified(folder, [*GEO_LABELS[:6], None]))
    message = _rejected(path, info, patches)
    assert "1 objects in export.geojson have no classification" in message
    assert "classify every patch in QuPath (or pass --partial)" in message
    assert read_labels(path, info, patches, allow_partial=True) == _expected(patches, [*GEO_EXPECTED[:6], ""])


def test_geojson_matches_by_geometry_and_ignores_other_objects(
    folder: Path, info: BatchInfo, patches: list[BatchPatch]
) -> None:
    features = _classified(folder, GEO_LABELS, drop_names=True)
    for feature in features:  # only the squares say which patch is which
        feature["properties"].pop("metadata")
        feature["id"] = str(uuid.uuid4())
    own = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Other", "color": [0, 0, 0]}},
    }
    path = _export(folder / "export.geojson", [*features, own])
    result = read_labels(path, info, patches, offsets={"CMU-1": OFFSET})
    assert result == _expected(patches, GEO_EXPECTED)
    wrong = {"CMU-1": (-5000.0, 0.0)}
    assert "none of the patches of batch s1-r2" in _rejected(path, info, patches, offsets=wrong)


def test_geojson_matches_by_metadata_or_object_id_whatever_the_name_and_place(
    folder: Path, info: BatchInfo, patches: list[BatchPatch]
) -> None:
    by_metadata = _classified(folder, GEO_LABELS, drop_names=True)
    for feature in by_metadata:
        feature["id"] = str(uuid.uuid4())
    by_id = _classified(folder, GEO_LABELS, drop_names=True)
    for feature in by_id:
        feature["properties"].pop("metadata")
    wrong = {"CMU-1": (-5000.0, 0.0)}  # the squares match nothing: the objects themselves say which patch
    for features in (by_metadata, by_id):
        path = _export(folder / "export.geojson", features)
        assert read_labels(path, info, patches, offsets=wrong) == _expected(patches, GEO_EXPECTED)


def _as_qupath_06_exports(features: list[dict]) -> list[dict]:
    """What QuPath 0.6 writes after importing batch.geojson and classifying it: ids, names, measurements and
    its metadata map kept, other properties dropped, derived classes as ``names``."""
    kept = ("objectType", "name", "classification", "measurements", "metadata")
    return [
        {
            "type": "Feature",
            "id": f["id"],
            "geometry": f["geometry"],
            "properties": {k: v for k, v in f["properties"].items() if k in kept},
        }
        for f in features
    ]


def test_geojson_all_objects_export_takes_labels_from_the_patches_only(
    folder: Path, info: BatchInfo, patches: list[BatchPatch]
) -> None:
    features = _as_qupath_06_exports(_classified(folder, GEO_LABELS))
    extra = []
    for n, patch in enumerate(patches):  # cell detection run inside every patch, classified Positive/Negative
        x, y = patch.x - OFFSET[0] + 20, patch.y - OFFSET[1] + 20
        extra.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + 12, y], [x + 12, y + 12], [x, y + 12], [x, y]]],
                },
                "properties": {
                    "objectType": "cell",
                    "classification": {"name": "Positive" if n % 2 else "Negative", "color": [200, 50, 50]},
                },
            }
        )
    whole = {
        "type": "Feature",
        "id": str(uuid.uuid4()),  # a detection covering every patch
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[-1e4, -1e4], [1e5, -1e4], [1e5, 1e5], [-1e4, 1e5], [-1e4, -1e4]]],
        },
        "properties": {"objectType": "detection", "classification": {"name": "tumor", "color": [1, 2, 3]}},
    }
    path = _export(folder / "export.geojson", [*extra, *features, whole])
    assert read_labels(path, info, patches, offsets={"CMU-1": OFFSET}) == _expected(patches, GEO_EXPECTED)


def test_geojson_legacy_derived_class_is_not_read_as_an_answer(
    folder: Path, info: BatchInfo, patches: list[BatchPatch]
) -> None:
    features = _classified(folder, GEO_LABELS)
    features[0]["properties"]["classification"] = {
        "name": "Positive",
        "colorRGB": -3394765,
        "parentClass": {"name": "Tumor", "colorRGB": -3670016},
    }
    path = _export(folder / "export.geojson", features)
    assert "label 'Tumor: Positive' is not one of" in _rejected(path, info, patches)


def test_geojson_rejects_unknown_class_and_garbage(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> None:
    path = _export(folder / "export.geojson", _classified(folder, [*GEO_LABELS[:6], "Stroma"]))
    assert "label 'Stroma' is not one of" in _rejected(path, info, patches)
    path.write_text('{"type": "FeatureCollection", "features": [', encoding="utf-8")
    _rejected(path, info, patches)


# ------------------------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    folder = tmp_path_factory.mktemp("fuzz") / "s1-r2"
    write_batch(folder, _info(), _patches(), _images())
    csv_data = _write_rows(folder / "filled.csv", _filled(folder, LABELS)).read_bytes()
    geojson = json.dumps({"type": "FeatureCollection", "features": _classified(folder, GEO_LABELS)})
    return folder, csv_data, geojson.encode("utf-8")


def _read_or_reject(path: Path, data: bytes, partial: bool) -> None:
    path.write_bytes(data)
    try:
        result = read_labels(path, _info(), _patches(), allow_partial=partial)
    except LabelsError:
        return
    assert result and set(result) <= {p.patch_id for p in _patches()}


_SUFFIXES = st.sampled_from([".csv", ".tsv", ".geojson", ".json", ".gz", ".dat"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)),
    suffix=_SUFFIXES,
    partial=st.booleans(),
)
def test_fuzz_arbitrary_files(fuzz_batch: tuple[Path, bytes, bytes], data: bytes, suffix: str, partial: bool) -> None:
    _read_or_reject(fuzz_batch[0] / f"fuzz{suffix}", data, partial)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(1, 2),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3)), max_size=6),
    partial=st.booleans(),
)
def test_fuzz_mutated_batch_files(
    fuzz_batch: tuple[Path, bytes, bytes], which: int, edits: list[tuple[int, bytes]], partial: bool
) -> None:
    data = bytearray(fuzz_batch[2] if which == 2 else fuzz_batch[1])
    for position, replacement in edits:
        at = position % (len(data) + 1)
        data[at : at + len(replacement)] = replacement
    _read_or_reject(fuzz_batch[0] / ("fuzz.csv" if which == 1 else "fuzz.geojson"), bytes(data), partial)


_SPELLINGS = st.sampled_from([str.upper, str.lower, str.title, str])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    delimiter=st.sampled_from([",", ";", "\t"]),
    terminator=st.sampled_from(["\n", "\r\n"]),
    quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "cp1252", "utf-16"]),
    spellings=st.lists(_SPELLINGS, min_size=K, max_size=K),
    padding=st.lists(st.sampled_from(["", " ", "  ", "\t"]), min_size=2 * K, max_size=2 * K),
    order=st.permutations(list(range(len(CSV_COLUMNS)))),
    blank_lines=st.integers(0, 3),
)
def test_every_spreadsheet_dialect_of_a_filled_batch_is_accepted(
    fuzz_batch: tuple[Path, bytes, bytes],
    delimiter: str,
    terminator: str,
    quoting: int,
    encoding: str,
    spellings: list,
    padding: list[str],
    order: list[int],
    blank_lines: int,
) -> None:
    """What Excel, LibreOffice or Numbers write (BOM, ; or tab, CRLF, quotes, case, spaces) reads the same."""
    folder = fuzz_batch[0]
    answers = [padding[2 * i] + spellings[i](label) + padding[2 * i + 1] for i, label in enumerate(LABELS)]
    rows = _filled(folder, answers)
    columns = [list(rows[0])[i] for i in order]
    path = _write_rows(
        folder / "dialect.csv",
        rows,
        columns,
        delimiter=delimiter,
        lineterminator=terminator,
        quoting=quoting,
        encoding=encoding,
    )
    path.write_bytes(
        path.read_bytes() + (terminator * blank_lines).encode(encoding if encoding != "utf-16" else "utf-16-le")
    )
    assert read_labels(path, _info(), _patches()) == _expected(_patches(), LABELS)


# ------------------------------------------------------------------ labels.csv files of older batches


def test_read_labels_accepts_a_labels_csv_without_the_certainty_column(
    folder: Path, info: BatchInfo, patches: list[BatchPatch]
) -> None:
    """A labels.csv of a batch written before the column existed (or with the column deleted) reads the same."""
    old_columns = [c for c in CSV_COLUMNS if c != "suggestion_certainty"]
    path = _write_rows(folder / "labels.csv", _filled(folder, LABELS), columns=old_columns)
    assert path.read_text(encoding="utf-8").splitlines()[0] == (
        "n,patch_id,slide,x,y,width,height,image,label,suggestion,suggestion_probability,rank,batch"
    )
    assert read_labels(path, info, patches) == _expected(patches, LABELS)
    rows = _filled(folder, LABELS)
    for row in rows:
        row["suggestion_certainty"] = "uncertain"  # the mark is never read as a label
    path = _write_rows(folder / "labels.csv", rows, columns=list(CSV_COLUMNS))
    assert read_labels(path, info, patches) == _expected(patches, LABELS)
