"""Every bad input a user can give, through the CLI: exit 3, one line saying what and how, project unchanged.

Slides (init, add-slide), query GeoJSON (query) and labels (ingest). The readers' own unit and property
tests are in test_review.py and test_qupath.py; these check what the user sees and that nothing was written.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry
from test_trust_support import (
    CPU,
    INIT,
    QUERY_BOX,
    assert_unchanged,
    cli,
    copy_project,
    error_line,
    fill,
    init_project,
    ledger,
    record,
    rows,
    session_project,
    snapshot,
    write_geojson,
    write_region,
    write_rows,
)

EXAMPLE_SVS = Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs"


@pytest.fixture()
def fresh(block_slide, tmp_path_factory, tmp_path) -> Path:
    """A copy of an initialised project (no session yet)."""
    return copy_project(init_project(tmp_path_factory.getbasetemp(), block_slide.path), tmp_path / "p")


@pytest.fixture()
def reviewing(block_slide, tmp_path_factory, tmp_path) -> Path:
    """A copy of a project whose session s1 waits for batch s1-r1 (4 patches, filled from the truth)."""
    base = session_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path)
    return copy_project(base, tmp_path / "p")


# ---- slides ---------------------------------------------------------------------------------------


def _png_named_svs(folder: Path) -> Path:
    from PIL import Image

    path = folder / "photo.svs"
    Image.new("RGB", (64, 64), "white").save(path, format="PNG")
    return path


def _truncated_svs(folder: Path) -> Path:
    data = EXAMPLE_SVS.read_bytes()
    path = folder / "cut.svs"
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy
    return path


def _damaged_tiles_svs(folder: Path) -> Path:
    data = bytearray(EXAMPLE_SVS.read_bytes())
    start = len(data) // 4
    data[start : start + 400_000] = b"\xff" * 400_000  # the header is intact, the JPEG tiles are not
    path = folder / "damaged.svs"
    path.write_bytes(bytes(data))
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not a slide\n")
    return path


SLIDES = {
    "missing file": (lambda folder: folder / "absent.svs", "does not exist"),
    "a folder": (lambda folder: folder, "is a folder"),
    "unsupported (.txt)": (_text_file, "is not a slide format OpenSlide reads"),
    "a PNG renamed .svs": (_png_named_svs, "named like a slide"),
    "truncated .svs": (_truncated_svs, "truncated"),
    "damaged tiles (.svs opens, tiles do not decode)": (_damaged_tiles_svs, "cannot"),
}


@pytest.mark.parametrize("case", list(SLIDES))
def test_init_refuses_a_bad_slide_and_leaves_no_project(case, tmp_path):
    make, expected = SLIDES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    slide = make(inputs)
    project = tmp_path / "project"
    result = cli("init", project, "--slide", slide, *INIT, code=3)
    line = error_line(result)
    assert expected in line and str(slide) in line
    assert not project.exists(), "a refused init must not leave a project folder behind"
    record(f"init --slide: {case}", line, not project.exists())


def test_init_in_an_existing_folder_removes_only_what_it_made(tmp_path):
    folder = tmp_path / "work"
    (folder / "slides").mkdir(parents=True)  # the user's own files, e.g. `wsi-il init . --slide slides/x.svs`
    (folder / "slides" / "keep.txt").write_text("mine")
    (folder / "notes.txt").write_text("mine too")
    before = snapshot(folder)
    slide = _damaged_tiles_svs(tmp_path)
    result = cli("init", folder, "--slide", slide, *INIT, code=3)
    error_line(result)
    assert_unchanged(folder, before)


def test_add_slide_refuses_a_damaged_slide_and_rolls_back(fresh, tmp_path):
    before = snapshot(fresh)
    for slide in (_damaged_tiles_svs(tmp_path), _truncated_svs(tmp_path), tmp_path / "absent.svs"):
        line = error_line(cli("add-slide", fresh, "--slide", slide, *CPU, code=3))
        assert str(slide) in line
        assert_unchanged(fresh, before)
        record(f"add-slide --slide: {slide.name}", line, True)
    info = json.loads(cli("status", fresh, "--json").stdout)
    assert [s["id"] for s in info["slides"]] == ["block"] and info["next"].startswith("start a session")


def _tiff_without_resolution(path: Path) -> Path:
    """A tiled pyramidal TIFF with no resolution tags: OpenSlide reports no openslide.mpp-x."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = np.full((1024, 1280, 3), 240, np.uint8)
    rgb[256:768, 256:1024] = rng.integers(60, 200, (512, 768, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as writer:
        level = rgb
        for index in range(3):
            writer.write(
                level, tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=0 if index == 0 else 1
            )
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


def test_slide_without_mpp_is_accepted_with_a_warning(tmp_path):
    from wsi_il.slide import read_info

    slide = _tiff_without_resolution(tmp_path / "nompp.tiff")
    assert read_info(slide).mpp is None
    project = tmp_path / "p"
    result = cli("init", project, "--slide", slide, *INIT)
    output = " ".join(result.output.split())
    assert "warning:" in output and "no pixel size (mpp)" in output and "nompp" in output
    manifest = json.loads((project / "project.json").read_text())
    assert manifest["slides"][0]["mpp"] is None and manifest["slides"][0]["n_patches"] > 0
    assert json.loads(cli("status", project, "--json").stdout)["slides"][0]["mpp"] is None
    assert "| -" in cli("status", project).stdout.replace("│", "|")
    record(
        "init --slide: TIFF without mpp",
        "warning: slide nompp (nompp.tiff) records no pixel size (mpp); it is kept as unknown ...",
        "created (accepted)",
    )


def test_bounds_offset_from_openslide_properties():
    # No slide format with bounds (MRXS, ...) can be generated here, so the property logic is tested on the
    # properties OpenSlide reports for such a slide; the session path is tested below with a recorded offset.
    from wsi_il.slide import bounds_and_offset

    props = {
        "openslide.bounds-x": "1200",
        "openslide.bounds-y": "3400",
        "openslide.bounds-width": "50000",
        "openslide.bounds-height": "60000",
    }
    assert bounds_and_offset(props, 90000, 200000) == ((1200, 3400, 50000, 60000), (1200.0, 3400.0))
    assert bounds_and_offset({"openslide.bounds-x": "7"}, 100, 80) == ((7, 0, 93, 80), (7.0, 0.0))
    assert bounds_and_offset(props, 90000, 200000, use_bounds=False) == ((0, 0, 90000, 200000), (0.0, 0.0))
    assert bounds_and_offset({}, 100, 80) == ((0, 0, 100, 80), (0.0, 0.0))


def test_a_recorded_bounds_offset_shifts_query_batch_and_export_exactly(fresh, block_slide, tmp_path):
    # As if the slide were an MRXS that QuPath crops at (100, 50): QuPath coordinates = ours - offset.
    from wsi_il.measure.truth import fill_labels_from_truth

    offset = (100.0, 50.0)
    manifest = json.loads((fresh / "project.json").read_text())
    manifest["slides"][0]["offset"] = list(offset)
    (fresh / "project.json").write_text(json.dumps(manifest))
    x0, y0, x1, y1 = QUERY_BOX
    shifted = write_region(tmp_path / "q.geojson", x0 - offset[0], y0 - offset[1], x1 - offset[0], y1 - offset[1])
    cli("query", fresh, "--region", shifted, "-k", "4", "--rounds", "1", *CPU)
    session = json.loads((fresh / "sessions" / "s1.json").read_text())
    boxes = np.load(fresh / "slides" / "block" / "patches.npy")
    ids = [f"block_x{x}_y{y}" for x, y in boxes[:, :2].tolist()]
    region = shapely.box(*QUERY_BOX)
    expected = [
        pid
        for pid, (x, y, w, h) in zip(ids, boxes.tolist(), strict=True)
        if shapely.box(x, y, x + w, y + h).intersection(region).area >= 0.5 * w * h
    ]
    assert sorted(session["query"]["patch_ids"]) == sorted(expected) and expected

    batch = fresh / "batches" / "s1-r1"
    placed = {
        f["properties"]["name"]: shapely.geometry.shape(f["geometry"]).bounds
        for f in json.loads((batch / "batch.geojson").read_text())["features"]
    }
    for row in rows(batch):
        x, y, w, h = (int(row[k]) for k in ("x", "y", "width", "height"))
        assert placed[row["patch_id"]] == pytest.approx((x - 100, y - 50, x + w - 100, y + h - 50))

    fill_labels_from_truth(batch, block_slide.truth_path)
    cli("ingest", fresh, batch / "labels.csv", *CPU)
    out = tmp_path / "mask.geojson"
    cli("export", fresh, "--out", out, "--detections", "--no-overview")
    predicted = np.load(fresh / "state" / "predictions.npy").argmax(axis=1)
    features = json.loads(out.read_text())["features"]
    for c, name in enumerate(manifest["classes"]):
        mask = [
            shapely.geometry.shape(f["geometry"])
            for f in features
            if f["properties"]["objectType"] == "annotation" and f["properties"]["classification"]["name"] == name
        ]
        squares = [
            shapely.box(x - 100, y - 50, x + w - 100, y + h - 50)
            for (x, y, w, h), p in zip(boxes.tolist(), predicted, strict=True)
            if p == c
        ]
        if squares:
            assert shapely.union_all(mask).symmetric_difference(shapely.union_all(squares)).area < 1e-6
    detections = sorted(
        shapely.geometry.shape(f["geometry"]).bounds for f in features if f["properties"]["objectType"] == "detection"
    )
    assert detections == sorted((x - 100.0, y - 50.0, x + w - 100.0, y + h - 50.0) for x, y, w, h in boxes.tolist())


# ---- query GeoJSON ---------------------------------------------------------------------------------


def _bow_tie(path: Path) -> Path:
    x0, y0, x1, y1 = QUERY_BOX
    return write_geojson(path, [shapely.Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])])


def _gzip_bomb(path: Path) -> Path:
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(b"[" + b" " * (65 * 2**20) + b"]")
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


REGIONS = {
    "not JSON": (lambda p: _text(p, "Tumor at the top left"), "is not valid JSON"),
    "JSON, not GeoJSON": (lambda p: _text(p, '{"patient": 12, "region": "top left"}'), "is JSON but not GeoJSON"),
    "empty FeatureCollection": (
        lambda p: _text(p, '{"type": "FeatureCollection", "features": []}'),
        "contains no objects",
    ),
    "only points": (
        lambda p: write_geojson(p, [shapely.Point(600, 600), shapely.MultiPoint([(1, 2), (3, 4)])]),
        "only points/lines",
    ),
    "a line": (lambda p: write_geojson(p, [shapely.LineString([(600, 600), (900, 900)])]), "only points/lines"),
    "outside the slide": (lambda p: write_region(p, 5000, 5000, 6000, 6000), "lies outside slide block"),
    "drawn on another, larger slide": (
        lambda p: write_region(p, 1800, 1300, 3800, 2900),
        "most of the region lies outside the slide (2048 x 1536 px): was it drawn on another slide?",
    ),
    "no tissue (the white margin)": (lambda p: write_region(p, 16, 16, 240, 240), "no tissue patch"),
    "missing file": (lambda p: p, "no such file"),
    "a folder": (lambda p: p.parent, "is a folder"),
    "huge file (65 MiB)": (lambda p: _sparse(p, 65 * 2**20), "limit of 67,108,864 bytes (64 MiB)"),
    "gzip bomb (65 MiB inflated)": (
        lambda p: _gzip_bomb(p.with_suffix(".geojson.gz")),
        "decompresses to more than the limit of 67,108,864 bytes",
    ),
    "binary garbage": (lambda p: _bytes(p, bytes(range(256)) * 4), "GeoJSON"),
}


@pytest.mark.parametrize("case", list(REGIONS))
def test_query_refuses_a_bad_region(case, fresh, tmp_path):
    make, expected = REGIONS[case]
    folder = tmp_path / "inputs"
    folder.mkdir()
    region = make(folder / "region.geojson")
    before = snapshot(fresh)
    line = error_line(cli("query", fresh, "--region", region, "-k", "2", "--rounds", "1", *CPU, code=3))
    assert expected in line, line
    assert_unchanged(fresh, before)
    record(f"query --region: {case}", line, True)


def test_region_outside_the_slide_names_it_and_suggests_slide(fresh, tmp_path):
    region = write_region(tmp_path / "q.geojson", 30000, 20000, 31000, 21000)
    line = error_line(cli("query", fresh, "--region", region, *CPU, code=3))
    assert "slide block (2048 x 1536 px)" in line and "--slide" in line
    line = error_line(cli("query", fresh, "--region", region, "--slide", "other.svs", *CPU, code=3))
    assert "'other.svs' is not in the project" in line and "block" in line
    record("query --slide: a slide not in the project", line, True)


def test_self_intersecting_region_is_repaired_with_a_warning(fresh, tmp_path):
    result = cli("query", fresh, "--region", _bow_tie(tmp_path / "bow.geojson"), "-k", "2", "--rounds", "1", *CPU)
    output = " ".join(result.output.split())
    assert "warning:" in output and "not a valid polygon" in output and "repaired" in output
    assert json.loads((fresh / "sessions" / "s1.json").read_text())["query"]["n"] > 0
    record(
        "query --region: self-intersecting polygon (bow tie)",
        "warning: query was not a valid polygon (Self-intersection[...]); repaired",
        "repaired, session started",
    )


# ---- labels ----------------------------------------------------------------------------------------


def test_spreadsheet_mangled_csv_is_accepted(reviewing):
    batch = reviewing / "batches" / "s1-r1"
    records = rows(batch)
    answers = ["  TUMOR ", "normal", " Yes", "no "]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\r\n", quoting=csv.QUOTE_ALL)
    writer.writerow(list(records[0]))
    for record_, answer in zip(records, answers, strict=True):
        writer.writerow([*list(record_.values())[:8], answer, *list(record_.values())[9:]])
    (batch / "labels.csv").write_bytes(b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8"))
    cli("ingest", reviewing, batch / "labels.csv", *CPU)
    assert [(e["patch_id"], e["label"]) for e in ledger(reviewing)] == [
        (r["patch_id"], label) for r, label in zip(records, ["Tumor", "Normal", "Tumor", "Normal"], strict=True)
    ]


def _edit(batch: Path, change) -> Path:
    records = [dict(r, label=label) for r, label in zip(rows(batch), ["Tumor", "Normal", "yes", "no"], strict=True)]
    return write_rows(batch / "labels.csv", change(records))


def _other_batch(records):
    return [dict(r, batch="s1-r2") for r in records]


def _unclassified_geojson(batch: Path) -> Path:
    data = json.loads((batch / "batch.geojson").read_text())
    for feature in data["features"][:2]:
        feature["properties"]["classification"] = {"name": "Tumor", "color": [200, 0, 0]}
    path = batch / "exported.geojson"
    path.write_text(json.dumps(data))
    return path


LABELS = {
    "unknown label": (
        lambda rs: [dict(rs[0], label="tumour"), *rs[1:]],
        "label 'tumour' is not one of Tumor, Normal, yes, no, 1, 0, relevant, irrelevant, skip",
    ),
    "unknown patch id": (
        lambda rs: [dict(rs[0], patch_id="block_x9999_y9999"), *rs[1:]],
        "patch 'block_x9999_y9999' is not in batch s1-r1",
    ),
    "added row (a patch of the project not in the batch)": (
        lambda rs: [*rs, dict(rs[0], patch_id="block_x256_y256", n="05")],
        "is not in batch s1-r1",
    ),
    "duplicate row with a conflicting label": (lambda rs: [*rs, dict(rs[0], label="Normal")], "labelled both"),
    "missing row": (lambda rs: rs[:3], "lacks the rows of 1 patches"),
    "another batch's CSV": (_other_batch, "this is the labels file of batch s1-r2, not s1-r1"),
    "half-filled, no --partial": (
        lambda rs: [*rs[:2], *(dict(r, label="") for r in rs[2:])],
        "2 of 4 patches have no label",
    ),
    "no label at all": (lambda rs: [dict(r, label="") for r in rs], "4 of 4 patches have no label"),
    "header removed": (lambda rs: [{k.upper() + "x": v for k, v in r.items()} for r in rs], "no 'patch_id'"),
}


@pytest.mark.parametrize("case", list(LABELS))
def test_ingest_refuses_bad_labels(case, reviewing):
    change, expected = LABELS[case]
    batch = reviewing / "batches" / "s1-r1"
    path = _edit(batch, change)
    before = snapshot(reviewing)
    line = error_line(cli("ingest", reviewing, path, *CPU, code=3))
    assert expected in line, line
    assert_unchanged(reviewing, before)
    record(f"ingest labels.csv: {case}", line, True)


def test_half_filled_batch_with_partial_records_the_filled_rows_only(reviewing):
    batch = reviewing / "batches" / "s1-r1"
    records = fill(batch, ["Tumor", "", "no", ""])
    cli("ingest", reviewing, batch / "labels.csv", "--partial", *CPU)
    assert [(e["patch_id"], e["label"]) for e in ledger(reviewing)] == [
        (records[0]["patch_id"], "Tumor"),
        (records[2]["patch_id"], "Normal"),
    ]


def test_qupath_export_with_unclassified_objects_is_refused(reviewing):
    batch = reviewing / "batches" / "s1-r1"
    path = _unclassified_geojson(batch)
    before = snapshot(reviewing)
    line = error_line(cli("ingest", reviewing, path, *CPU, code=3))
    assert "2 objects in exported.geojson have no classification" in line and "--partial" in line
    assert_unchanged(reviewing, before)
    record("ingest QuPath GeoJSON with unclassified objects", line, True)


def test_another_projects_batch_is_refused(reviewing, tmp_path):
    other = copy_project(reviewing, tmp_path / "other")
    manifest = json.loads((other / "project.json").read_text())
    manifest["uid"] = "f" * 32  # another project on the same slide
    (other / "project.json").write_text(json.dumps(manifest))
    before, before_other = snapshot(reviewing), snapshot(other)
    line = error_line(cli("ingest", other, reviewing / "batches" / "s1-r1" / "labels.csv", *CPU, code=3))
    assert "belongs to another project" in line
    assert_unchanged(reviewing, before)
    assert_unchanged(other, before_other)
    record("ingest another project's batch", line, True)


def test_labels_file_outside_a_batch_and_missing_file(reviewing, tmp_path):
    loose = shutil.copy(reviewing / "batches" / "s1-r1" / "labels.csv", tmp_path / "labels.csv")
    before = snapshot(reviewing)
    line = error_line(cli("ingest", reviewing, loose, *CPU, code=3))
    assert "is not inside a review batch folder" in line
    record("ingest a labels.csv copied out of its batch folder", line, True)
    line = error_line(cli("ingest", reviewing, reviewing / "batches" / "s1-r1" / "nope.csv", *CPU, code=3))
    assert "does not exist" in line
    record("ingest a labels file that does not exist", line, True)
    assert_unchanged(reviewing, before)


def test_ingesting_a_batch_the_session_does_not_wait_for_changes_nothing(reviewing, block_slide, tmp_path):
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    cli("query", reviewing, "--region", region, "-k", "2", "--rounds", "1", "--abandon", *CPU)
    before = snapshot(reviewing)
    line = error_line(cli("ingest", reviewing, reviewing / "batches" / "s1-r1" / "labels.csv", *CPU, code=4))
    assert "is not the batch session s1 waits for" in line
    assert_unchanged(reviewing, before)  # the labels were not appended to the ledger either
    record("ingest the batch of an abandoned session", line, True)
