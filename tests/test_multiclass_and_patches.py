"""Patch-folder databases, multi-class feedback, label spelling, and the query command's refusals."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import shapely
import shapely.geometry
from typer.testing import CliRunner

from wsi_il.cli import app

runner = CliRunner()
CLASSES = ["lympho", "stroma", "tumor"]


def run(*args: object, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def status(project: Path) -> dict:
    return json.loads(run("status", project, "--json").stdout)


def ledger(project: Path) -> list[dict]:
    path = project / "labels.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def batch_rows(batch: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((batch / "labels.csv").read_text(encoding="utf-8"))))


def fill(batch: Path, labels: list[str] | dict[str, str]) -> list[str]:
    """Write labels into a batch's labels.csv (a list in row order, or a patch_id -> label map)."""
    rows = batch_rows(batch)
    for i, row in enumerate(rows):
        row["label"] = labels[i] if isinstance(labels, list) else labels[row["patch_id"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (batch / "labels.csv").write_text(buffer.getvalue(), encoding="utf-8")
    return [row["patch_id"] for row in rows]


def write_region(path: Path, x0: float, y0: float, x1: float, y1: float) -> Path:
    feature = {
        "type": "Feature",
        "id": "q",
        "geometry": shapely.geometry.mapping(shapely.box(x0, y0, x1, y1)),
        "properties": {"objectType": "annotation", "name": "query"},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def folder_truth(project: Path) -> dict[str, str]:
    """patch id -> class folder, from the project's images.json."""
    (images,) = (project / "slides").glob("*/images.json")
    data = json.loads(images.read_text())
    return dict(zip(data["ids"], data["labels"], strict=True))


# ---- a patch-folder project, built once and copied per test ----------------------------------


@pytest.fixture(scope="module")
def crc_project(copy_crc, tmp_path_factory) -> Path:
    """An initialised project on 3 x 12 colorectal tiles (tests/data/crc, cut into quadrants)."""
    root = tmp_path_factory.mktemp("crc")
    folder = copy_crc(root / "crc", slice(0, 12))
    project = root / "project"
    out = run("init", project, "--patches", folder, "--weights", "random", "--epochs", "3", "--device", "cpu").output
    assert "36 tissue patches" in out
    return project


def copy_project(project: Path, tmp_path: Path) -> Path:
    target = tmp_path / "p"
    shutil.copytree(project, target)
    return target


def test_patch_folder_init_query_ingest_export(crc_project, crc_patches, tmp_path):
    project = copy_project(crc_project, tmp_path)
    info = status(project)
    assert info["classes"] == CLASSES
    assert info["patches"] == 36 and info["slides"][0]["kind"] == "patches"
    truth = folder_truth(project)
    assert sorted(truth.values()) == sorted(CLASSES * 12)
    query_id = next(pid for pid, cls in truth.items() if cls == "tumor")
    run("query", project, "--patch", query_id, "--label", "tumor", "-k", "5", "--rounds", "2", "--device", "cpu")
    shown = []
    for r in (1, 2):
        batch = project / "batches" / f"s1-r{r}"
        shown += fill(batch, truth)  # explicit class labels, from the folders
        assert "recorded" in run("ingest", project, batch / "labels.csv", "--device", "cpu").output
    assert len(set(shown)) == 10 and query_id not in shown
    entries = ledger(project)
    assert {e["patch_id"]: e["label"] for e in entries} == {pid: truth[pid] for pid in shown}
    info = status(project)
    assert info["sessions"][0]["state"] == "done" and info["n_labels"] == 10

    preds = tmp_path / "preds.csv"
    run("export", project, "--out", preds)
    rows = list(csv.DictReader(io.StringIO(preds.read_text())))
    assert len(rows) == 36 and {r["patch_id"] for r in rows} == set(truth)
    assert {"patch_id", "predicted", "p_lympho", "p_stroma", "p_tumor"} <= set(rows[0])
    for row in rows:
        assert row["predicted"] in CLASSES
        probs = [float(row[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 0.01 and row["predicted"] == CLASSES[probs.index(max(probs))]

    result = run("export", project, "--out", tmp_path / "mask.geojson", code=3)
    assert "patch-folder" in result.output and "predictions.csv" in result.output
    assert not (tmp_path / "mask.geojson").exists()

    # a second session from query images outside the database (files 13-14 of tumor: another tile's quadrants)
    extra = tmp_path / "query-images"
    extra.mkdir()
    for image in sorted((crc_patches / "tumor").glob("*.png"))[12:14]:
        shutil.copy(image, extra / image.name)
    run("query", project, "--images", extra, "--label", "tumor", "-k", "5", "--rounds", "1", "--device", "cpu")
    session = status(project)["sessions"][1]
    assert session["query_patches"] == 2 and session["query_source"] == "2 images" and session["label"] == "tumor"
    second = [row["patch_id"] for row in batch_rows(project / "batches" / "s2-r1")]
    assert len(second) == 5 and not set(second) & (set(shown) | {query_id})


def test_binary_feedback_in_a_three_class_project(crc_project, tmp_path):
    project = copy_project(crc_project, tmp_path)
    truth = folder_truth(project)
    query_id = next(pid for pid, cls in truth.items() if cls == "tumor")
    run("query", project, "--patch", query_id, "--label", "tumor", "-k", "5", "--rounds", "3", "--device", "cpu")
    first = fill(project / "batches" / "s1-r1", ["yes", "no", "skip", "No", "1"])
    run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")
    stored = {e["patch_id"]: e["label"] for e in ledger(project)}
    assert [stored[pid] for pid in first] == ["tumor", "not:tumor", "skip", "not:tumor", "tumor"]
    skipped = first[2]
    second = fill(project / "batches" / "s1-r2", ["no"] * 5)
    assert skipped not in second and not set(second) & set(first)
    run("ingest", project, project / "batches" / "s1-r2" / "labels.csv", "--device", "cpu")
    third = [row["patch_id"] for row in batch_rows(project / "batches" / "s1-r3")]
    assert skipped not in third and not set(third) & (set(first) | set(second))
    assert status(project)["labels"] == {"tumor": 2, "not:tumor": 7, "skip": 1}


# ---- a three-class slide project ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tri_project(block_slide, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("tri") / "project"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--classes",
        "Tumor,Stroma,Normal",
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    return project


def test_class_labels_are_matched_loosely_and_unknown_ones_refused(tri_project, block_slide, tmp_path):
    project = copy_project(tri_project, tmp_path)
    assert status(project)["classes"] == ["Tumor", "Stroma", "Normal"]
    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "q.geojson", x0, y0, x0 + 512, y0 + 512)
    run("query", project, "--region", region, "--label", "tumor", "-k", "4", "--rounds", "2", "--device", "cpu")
    batch = project / "batches" / "s1-r1"
    ids = fill(batch, ["  tumor ", "NORMAL", " stroma", "Tumor"])
    run("ingest", project, batch / "labels.csv", "--device", "cpu")
    assert [e["label"] for e in ledger(project)] == ["Tumor", "Normal", "Stroma", "Tumor"]
    assert [e["patch_id"] for e in ledger(project)] == ids

    before = (project / "labels.jsonl").read_bytes()
    session_before = (project / "sessions" / "s1.json").read_bytes()
    batch = project / "batches" / "s1-r2"
    fill(batch, ["normal", "Tumor", "tumour", "stroma"])
    result = run("ingest", project, batch / "labels.csv", "--device", "cpu", code=3)
    message = " ".join(result.output.split())
    assert "row 4" in message and "'tumour'" in message  # header is row 1: the third patch is row 4
    for accepted in ("Tumor", "Stroma", "Normal", "yes", "no", "skip"):
        assert accepted in message
    assert (project / "labels.jsonl").read_bytes() == before
    assert (project / "sessions" / "s1.json").read_bytes() == session_before
    assert not (project / "batches" / "s1-r3").exists()


def test_query_refusals(tri_project, block_slide, tmp_path):
    project = copy_project(tri_project, tmp_path)
    outside = write_region(tmp_path / "outside.geojson", 5000, 5000, 6000, 6000)
    result = run("query", project, "--region", outside, "-k", "2", "--rounds", "1", "--device", "cpu", code=3)
    assert "outside" in result.output
    margin = write_region(tmp_path / "margin.geojson", 16, 16, 240, 240)  # the white 256 px margin
    result = run("query", project, "--region", margin, "-k", "2", "--rounds", "1", "--device", "cpu", code=3)
    assert "no tissue patch" in result.output
    assert not (project / "sessions").exists() or not list((project / "sessions").glob("*.json"))

    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "q.geojson", x0, y0, x0 + 512, y0 + 512)
    run("query", project, "--region", region, "-k", "2", "--rounds", "1", "--device", "cpu")
    result = run("query", project, "--region", region, "-k", "2", "--rounds", "1", "--device", "cpu", code=4)
    assert "--abandon" in result.output and "s1-r1" in result.output
    run("query", project, "--region", region, "-k", "2", "--rounds", "1", "--abandon", "--device", "cpu")
    states = {s["id"]: s["state"] for s in status(project)["sessions"]}
    assert states == {"s1": "abandoned", "s2": "reviewing"}
    assert (project / "batches" / "s2-r1" / "labels.csv").is_file()
