"""The whole loop through the CLI: init -> query -> ingest x rounds -> export, on real tissue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely
import shapely.geometry
from typer.testing import CliRunner

from wsi_il.cli import app
from wsi_il.measure.truth import fill_labels_from_truth

runner = CliRunner()


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def write_region(path: Path, x0: float, y0: float, x1: float, y1: float, name: str = "query") -> Path:
    feature = {
        "type": "Feature",
        "id": "q",
        "geometry": shapely.geometry.mapping(shapely.box(x0, y0, x1, y1)),
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": "Tumor", "color": [200, 0, 0]},
        },
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def mask_of(path: Path, name: str) -> shapely.Geometry:
    data = json.loads(path.read_text())
    shapes = [
        shapely.geometry.shape(f["geometry"])
        for f in data["features"]
        if f["properties"].get("classification", {}).get("name") == name
        and f["properties"]["objectType"] == "annotation"
    ]
    return shapely.union_all(shapes) if shapes else shapely.Polygon()


def iou(a, b) -> float:
    return a.intersection(b).area / max(a.union(b).area, 1e-9)


def run_session(project: Path, truth: Path, rounds: int, offset=(0.0, 0.0), session: str = "s1") -> None:
    for r in range(1, rounds + 1):
        batch = project / "batches" / f"{session}-r{r}"
        fill_labels_from_truth(batch, truth, offset)
        output = run("ingest", project, batch / "labels.csv", "--device", "cpu")
        assert "recorded" in output


def test_loop_on_block_slide_finds_the_tumour(block_slide, tmp_path, qupath_valid):
    project = tmp_path / "proj"
    out = run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "128",
        "--weights",
        "random",
        "--epochs",
        "15",
        "--device",
        "cpu",
    )
    assert "RANDOM" in out or "random" in out.lower()
    x0, y0, x1, y1 = block_slide.tumour.bounds
    region = write_region(tmp_path / "query.geojson", x0 + 128, y0 + 128, x0 + 384, y0 + 384)
    run("query", project, "--region", region, "--label", "tumor", "-k", "8", "--rounds", "4", "--device", "cpu")
    batch = project / "batches" / "s1-r1"
    for name in ("labels.csv", "contact_sheet.png", "batch.geojson", "README.txt", "batch.json"):
        assert (batch / name).is_file(), name
    assert len(list(batch.glob("*.png"))) == 8 + 1
    qupath_valid(batch / "batch.geojson")
    run_session(project, block_slide.truth_path, 4)
    status = json.loads(run("status", project, "--json"))
    assert status["n_labels"] == 32 and status["sessions"][0]["state"] == "done"
    assert status["weights"]["kind"] == "random"
    mask_path = tmp_path / "out" / "tumor.geojson"
    run("export", project, "--out", mask_path, "--detections")
    assert (tmp_path / "out" / "tumor.png").is_file()
    qupath_valid(mask_path)
    predicted = mask_of(mask_path, "Tumor")
    score = iou(predicted, block_slide.tumour)
    # PCam tumour and normal patches are both lymph node and often alike (about 0.43 here, with random weights and
    # 32 labels); calling all tissue tumour scores 0.25, finding nothing 0
    assert score > 0.35, f"IoU of the exported tumour mask with the known block: {score:.2f}"
    props = json.loads(mask_path.read_text())["features"][0]["properties"]
    meta = props["metadata"]  # QuPath's map of strings: the provenance survives an import into QuPath
    assert meta["wsi_il.weights"] == "random" and "RANDOM" in meta["wsi_il.warning"]
    assert all(isinstance(v, str) for v in meta.values()) and "wsi_il" not in props


def test_example_slide_loop(example_slide, tmp_path, qupath_valid):
    project = tmp_path / "cmu"
    examples = example_slide.parent
    run(
        "init",
        project,
        "--slide",
        example_slide,
        "--tile-size",
        "128",
        "--weights",
        "random",
        "--epochs",
        "10",
        "--device",
        "cpu",
    )
    run("query", project, "--region", examples / "query.geojson", "-k", "6", "--rounds", "2", "--device", "cpu")
    run_session(project, examples / "truth.geojson", 2)
    mask_path = tmp_path / "cmu.geojson"
    run("export", project, "--out", mask_path, "--label", "Tumor")
    qupath_valid(mask_path)
    predicted = mask_of(mask_path, "Tumor")
    truth = shapely.union_all(
        [
            shapely.geometry.shape(f["geometry"])
            for f in json.loads((examples / "truth.geojson").read_text())["features"]
        ]
    )
    assert predicted.intersects(truth)
    assert predicted.bounds[2] <= 2220 + 1e-6 and predicted.bounds[3] <= 2967 + 1e-6  # level-0 frame


def test_ingest_twice_changes_nothing(block_slide, tmp_path):
    project = tmp_path / "p"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "q.geojson", x0, y0, x0 + 512, y0 + 512)
    run("query", project, "--region", region, "-k", "4", "--rounds", "2", "--device", "cpu")
    batch = project / "batches" / "s1-r1"
    fill_labels_from_truth(batch, block_slide.truth_path)
    run("ingest", project, batch / "labels.csv", "--device", "cpu")
    ledger = (project / "labels.jsonl").read_bytes()
    session = (project / "sessions" / "s1.json").read_bytes()
    out = run("ingest", project, batch / "labels.csv", "--device", "cpu")
    assert "already ingested" in out and "nothing changed" in out
    assert (project / "labels.jsonl").read_bytes() == ledger
    assert (project / "sessions" / "s1.json").read_bytes() == session
    assert not (project / "batches" / "s1-r3").exists()


def test_multi_slide_query_searches_both(block_slide, second_block_slide, tmp_path, qupath_valid):
    project = tmp_path / "multi"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--slide",
        second_block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "5",
        "--device",
        "cpu",
    )
    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "q.geojson", x0, y0, x0 + 512, y0 + 512)
    run("query", project, "--region", region, "--slide", "block", "-k", "4", "--rounds", "2", "--device", "cpu")
    status = json.loads(run("status", project, "--json"))
    n_patches = status["patches"]
    per_slide = {s["id"]: s["patches"] for s in status["slides"]}
    assert set(per_slide) == {"block", "other"} and min(per_slide.values()) > 0
    history = status["sessions"][0]["rounds_detail"]
    assert history[0]["candidates"] == n_patches - status["sessions"][0]["query_patches"]  # both slides searched
    for r in (1, 2):
        batch = project / "batches" / f"s1-r{r}"
        _label_by_slide(batch, {"block": block_slide.truth_path, "other": second_block_slide.truth_path})
        run("ingest", project, batch / "labels.csv", "--device", "cpu")
    out_path = tmp_path / "multi" / "mask.geojson"
    out = run("export", project, "--out", out_path)
    written = sorted(p.name for p in out_path.parent.glob("mask.*.geojson"))
    assert written == ["mask.block.geojson", "mask.other.geojson"], out
    for path in out_path.parent.glob("mask.*.geojson"):
        qupath_valid(path)


def _label_by_slide(batch: Path, truths: dict[str, Path]) -> None:
    """Label a batch whose patches come from several slides with each slide's own truth."""
    import csv
    import io

    from wsi_il.measure.truth import truth_mask

    rows = list(csv.DictReader(io.StringIO((batch / "labels.csv").read_text())))
    for row in rows:
        box = np.array([[int(row["x"]), int(row["y"]), int(row["width"]), int(row["height"])]])
        row["label"] = "yes" if truth_mask(box, truths[row["slide"]])[0] else "no"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (batch / "labels.csv").write_text(buffer.getvalue())


def test_add_slide_after_a_session(block_slide, second_block_slide, tmp_path):
    project = tmp_path / "grow"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    before = json.loads((project / "project.json").read_text())["normalisation"]
    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "q.geojson", x0, y0, x0 + 512, y0 + 512)
    run("query", project, "--region", region, "-k", "4", "--rounds", "1", "--device", "cpu")
    run_session(project, block_slide.truth_path, 1)
    run("add-slide", project, "--slide", second_block_slide.path, "--device", "cpu")
    status = json.loads(run("status", project, "--json"))
    assert [s["id"] for s in status["slides"]] == ["block", "other"] and all(s["extracted"] for s in status["slides"])
    assert json.loads((project / "project.json").read_text())["normalisation"] == before  # frozen at init
    run("export", project, "--out", tmp_path / "m.geojson")
    assert (tmp_path / "m.other.geojson").is_file() and (tmp_path / "m.block.geojson").is_file()
    run("add-slide", project, "--slide", second_block_slide.path, code=3)  # the same slide twice


def test_init_with_weights_that_do_not_fit_writes_nothing(block_slide, tmp_path):
    import torch
    from torchvision.models import resnet50

    weights = tmp_path / "r50.pt"
    torch.save(resnet50().state_dict(), weights)
    result = runner.invoke(
        app,
        [
            "init",
            str(tmp_path / "p"),
            "--slide",
            str(block_slide.path),
            "--weights",
            str(weights),
            "--arch",
            "resnet18",
        ],
    )
    assert result.exit_code == 3 and "does not fit ResNet-18" in result.output
    assert "looks like a resnet50" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p").exists()
    torch.save({"features.0.weight": torch.zeros(3)}, weights)  # no ResNet at all
    result = runner.invoke(
        app, ["init", str(tmp_path / "p"), "--slide", str(block_slide.path), "--weights", str(weights)]
    )
    assert result.exit_code == 3 and "holds no ResNet" in result.output and not (tmp_path / "p").exists()


def test_frozen_stem_is_cached_once_and_gives_the_full_blocks_predictions(block_slide, tmp_path):
    import torch

    from wsi_il.heads import block_stem, make_block, predict
    from wsi_il.model import load_tensors
    from wsi_il.project import Project

    project = tmp_path / "frozen"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "3",
        "--schedule",
        "fast",
        "--fast-frozen-conv1",
        "--device",
        "cpu",
    )  # by hand: off by default with random weights
    assert json.loads((project / "project.json").read_text())["train"]["fast_frozen_conv1"] is True
    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "q.geojson", x0, y0, x0 + 512, y0 + 512)
    run("query", project, "--region", region, "-k", "4", "--rounds", "3", "--device", "cpu")
    stems_path = project / "state" / "stems.npy"  # the first pass over the database (pretrained head) wrote it
    written = stems_path.stat()
    features = np.load(project / "slides" / "block" / "features.npy")
    init = load_tensors(Project(project).init_model_path())
    block = make_block(init).eval()
    with torch.inference_mode():
        expected = block_stem(block, torch.from_numpy(features).float()).numpy()
    stems = np.load(stems_path)
    assert stems.dtype == np.float16 and stems.shape == features.shape
    assert np.allclose(stems, expected, atol=0.05 * float(np.abs(expected).max()))  # bf16 arithmetic
    for r in (1, 2, 3):  # every round reads the cache: the same file, and predictions as the whole block gives
        batch = project / "batches" / f"s1-r{r}"
        fill_labels_from_truth(batch, block_slide.truth_path)
        run("ingest", project, batch / "labels.csv", "--device", "cpu")
        assert stems_path.stat().st_ino == written.st_ino and stems_path.stat().st_mtime_ns == written.st_mtime_ns
    state = json.loads((project / "state" / "state.json").read_text())
    model = load_tensors(project / "models" / f"{state['model']}.pt")
    assert model["frozen_stem"] and torch.equal(model["classifier"]["block.conv1.weight"], init["conv1.weight"])
    full = predict(model["classifier"], init, 2, [(0, features)], len(features), "cpu")
    assert np.allclose(np.load(project / "state" / "predictions.npy"), full, atol=2e-2)
