"""The export's overview picture: the slide with the expert's labels and queries beside the prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry
from PIL import Image
from test_cli_e2e import run

from wsi_il import overview
from wsi_il.overview import QUERY_RGB, WASH_ALPHA, Marks, raster, render_overview
from wsi_il.qupath import class_color
from wsi_il.slide import read_info, read_thumbnail

CLASSES = ["Tumor", "Normal"]
TILE = 128


def test_raster_covers_each_patch_without_gaps_or_overlaps() -> None:
    boxes = np.array([(0, 0, 10, 10), (10, 0, 10, 10), (20, 0, 10, 10), (40, 40, 10, 10)])
    full = raster(boxes, np.ones(4, dtype=bool), 1.0, (60, 60))
    assert full.sum() == 400 and full[:10, :30].all() and full[40:50, 40:50].all() and not full[10:40].any()
    scaled = raster(boxes, np.array([True, False, True, False]), 3.0, (20, 20))  # edges rounded to pixels
    assert scaled[:3, :3].all() and not scaled[:3, 3:7].any() and scaled[:3, 7:10].all() and scaled.sum() == 18
    assert not raster(boxes, np.zeros(4, dtype=bool), 1.0, (60, 60)).any()


def test_edge_lies_inside_or_just_outside_a_region() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[3:9, 3:9] = True
    inner = overview.edge(mask, 1)
    outer = overview.edge(mask, 2, inside=False)
    assert inner.sum() == 20 and inner[3, 3:9].all() and not inner[4:8, 4:8].any()
    assert outer[1:11, 1:11].sum() == 100 - 36 and not (outer & mask).any() and not outer[0].any()


@pytest.fixture(scope="module")
def cmu_picture(example_slide: Path):
    """The bundled slide cut in 128 px patches, predicted Tumor inside the example's truth region, a few of them
    labelled and a query."""
    info = read_info(example_slide)
    xs, ys = np.meshgrid(np.arange(0, info.width - TILE + 1, TILE), np.arange(0, info.height - TILE + 1, TILE))
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, TILE), np.full(xs.size, TILE)], axis=1)
    truth = shapely.union_all(
        [
            shapely.geometry.shape(f["geometry"])
            for f in json.loads((example_slide.parent / "truth.geojson").read_text())["features"]
        ]
    )
    centres = shapely.points(boxes[:, 0] + TILE / 2, boxes[:, 1] + TILE / 2)
    predicted = np.where(shapely.contains(truth, centres), 0, 1)

    def at(x: int, y: int) -> int:
        return int(np.flatnonzero((boxes[:, 0] == x) & (boxes[:, 1] == y))[0])

    tumour = int(np.flatnonzero(predicted == 0)[len(np.flatnonzero(predicted == 0)) // 2])
    normal = at(256, 2560)
    labelled = np.array([tumour, normal, at(1280, 256), at(1920, 384)])
    query = np.array([at(512, 1024), at(640, 1024), at(512, 1152)])
    marks = Marks(labelled, ("Tumor", "Normal", "skip", "not:Tumor"), (("s1", query),))
    thumb, scale = read_thumbnail(example_slide, 1400)
    drawn = render_overview(thumb, scale, boxes, predicted, [0, 1], CLASSES, marks, ["CMU-1-Small-Region"])
    return drawn, thumb, scale, boxes, predicted, marks


def _thumb_box(box: np.ndarray, scale: float) -> tuple[int, int, int, int]:
    x, y, w, h = (float(v) for v in box)
    return round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale)


def test_overview_marks_labelled_patches_and_the_query_at_their_place(cmu_picture) -> None:
    drawn, thumb, scale, boxes, _, marks = cmu_picture
    picture = np.asarray(drawn.image)
    left, top = drawn.expert_corner
    panel = picture[top : top + thumb.shape[0], left : left + thumb.shape[1]]
    colours = overview.label_colours(CLASSES)
    for position, label in zip(marks.labelled.tolist(), marks.labels, strict=True):
        x0, y0, x1, y1 = _thumb_box(boxes[position], scale)
        assert tuple(panel[y0, (x0 + x1) // 2]) == colours[label]  # its outline, in its label's colour
        assert tuple(panel[(y0 + y1) // 2, x1 - 1]) == colours[label]
        middle = panel[y0 + 8 : y1 - 8, x0 + 8 : x1 - 8]
        assert np.array_equal(middle, thumb[y0 + 8 : y1 - 8, x0 + 8 : x1 - 8])  # the tissue under it untouched
    assert colours["Tumor"] == class_color("Tumor") and colours["skip"] != colours["Normal"]
    query = raster(boxes, marks.queries[0][1], scale, thumb.shape[:2])
    line = drawn.line_px
    top_left, right, bottom = (_thumb_box(boxes[p], scale) for p in marks.queries[0][1])  # an L of three patches
    for y, x in [
        (top_left[1] - 1, top_left[0] + 5),
        (top_left[1] + 5, top_left[0] - line),  # just outside it
        (bottom[3], (bottom[0] + bottom[2]) // 2),
        (bottom[3] + line - 1, bottom[0] + 3),
        ((right[1] + right[3]) // 2, right[2]),
        (right[3], right[2] - 3),
        (bottom[1] + 3, bottom[2]),
    ]:
        assert tuple(panel[y, x]) == QUERY_RGB, (y, x)
    assert np.array_equal(panel[query], thumb[query])  # the query's tissue is left as it is
    untouched = ~raster(boxes, np.concatenate([marks.labelled, marks.queries[0][1]]), scale, thumb.shape[:2])
    untouched[top_left[1] - 40 : top_left[1], top_left[0] - 5 : top_left[0] + 200] = False  # the query's name
    far = ~overview._shifted_all(~untouched, 2 * line + 2)
    assert np.array_equal(panel[far], thumb[far])  # nothing else drawn on the slide


def test_overview_shows_the_prediction_as_a_wash_with_lines_between_classes(cmu_picture) -> None:
    drawn, thumb, scale, boxes, predicted, _ = cmu_picture
    picture = np.asarray(drawn.image)
    left, top = drawn.prediction_corner
    panel = picture[top : top + thumb.shape[0], left : left + thumb.shape[1]].astype(int)
    tumour = raster(boxes, predicted == 0, scale, thumb.shape[:2])
    normal = raster(boxes, predicted == 1, scale, thumb.shape[:2])
    background = ~(tumour | normal)
    line = drawn.line_px
    deep = ~overview._shifted_all(~tumour, line + 1)  # tumour pixels away from any edge
    red = np.asarray(class_color("Tumor"), float)
    expected = (thumb[deep] * (1 - WASH_ALPHA) + red * WASH_ALPHA).astype(int)
    assert deep.sum() > 1000 and np.abs(panel[deep] - expected).max() <= 1
    assert np.array_equal(panel[background], thumb[background].astype(int))  # no patch, nothing drawn
    meets = tumour & overview._shifted_all(normal, 1)  # tumour pixels touching a normal patch
    assert meets.sum() > 50 and (panel[meets] == red).all()
    along_background = tumour & overview._shifted_all(background, line) & ~overview._shifted_all(normal, line + 1)
    assert along_background.any() and not (panel[along_background] == red).all(axis=1).any()


def test_overview_legend_counts(cmu_picture) -> None:
    _, _, _, _, predicted, marks = cmu_picture
    items = overview.legend_items(predicted, [0, 1], CLASSES, marks, overview.label_colours(CLASSES))
    texts = [item.text for item in items]
    assert texts == [
        f"predicted Tumor: {(predicted == 0).sum()} patches",
        f"predicted Normal: {(predicted == 1).sum()} patches",
        "labelled Tumor: 1",
        "labelled Normal: 1",
        "labelled not Tumor: 1",
        "labelled skipped: 1",
        "query patches (s1)",
    ]


@pytest.fixture(scope="module")
def corrected_project(example_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled slide after one ingested round, one of its labels then corrected."""
    from wsi_il.measure.truth import fill_labels_from_truth

    project = tmp_path_factory.mktemp("overview") / "cmu"
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
        "2",
        "--device",
        "cpu",
    )
    run("query", project, "--region", examples / "query.geojson", "-k", "6", "--rounds", "3", "--device", "cpu")
    fill_labels_from_truth(project / "batches" / "s1-r1", examples / "truth.geojson")
    run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")
    first = json.loads((project / "labels.jsonl").read_text().splitlines()[0])
    run("relabel", project, first["patch_id"], "skip")
    return project


def test_export_overview_marks_the_newest_labels_and_the_query(corrected_project: Path, tmp_path: Path) -> None:
    from wsi_il.events import SilentReporter
    from wsi_il.export import overview_marks, write_overview
    from wsi_il.model import current_predictions, open_context
    from wsi_il.project import Project, current_labels

    out = run("export", corrected_project, "--out", tmp_path / "mask.geojson")
    assert "mask.png" in out
    ctx = open_context(Project(corrected_project), "cpu", SilentReporter())
    slide = ctx.table.slides[0]
    indices = ctx.table.of_slide(slide.id)
    marks = overview_marks(ctx)[slide.id]
    ledger = ctx.project.read_ledger()
    newest = current_labels(ledger)
    assert sorted(ctx.table.ids[int(indices[p])] for p in marks.labelled) == sorted(newest)
    assert dict(zip((ctx.table.ids[int(indices[p])] for p in marks.labelled), marks.labels, strict=True)) == {
        patch_id: entry["label"] for patch_id, entry in newest.items()
    }
    corrected = ledger[0]["patch_id"]
    assert newest[corrected]["label"] == "skip"  # the correction won over the first answer
    session = json.loads((corrected_project / "sessions" / "s1.json").read_text())
    assert [(s, sorted(ctx.table.ids[int(indices[p])] for p in found)) for s, found in marks.queries] == [
        ("s1", sorted(session["query"]["patch_ids"]))
    ]
    predicted = current_predictions(ctx)[indices].argmax(axis=1)
    drawn = write_overview(
        tmp_path / "again.png", slide, ctx.table.boxes[indices], predicted, [0, 1], ctx.classes, marks
    )
    with Image.open(tmp_path / "again.png") as saved, Image.open(tmp_path / "mask.png") as exported:
        assert np.array_equal(np.asarray(saved), np.asarray(drawn.image))  # the PNG holds what was drawn
        assert exported.size[0] == saved.size[0]  # the exported one is the same picture but for its header
    thumb, scale = read_thumbnail(Path(slide.path), 1400)
    position = next(p for p, pid in ((p, ctx.table.ids[int(indices[p])]) for p in marks.labelled) if pid == corrected)
    x0, y0, x1, _ = _thumb_box(ctx.table.boxes[indices][position], scale)
    left, top = drawn.expert_corner
    assert tuple(np.asarray(drawn.image)[top + y0, left + (x0 + x1) // 2]) == overview.SKIP_RGB


def test_overview_marks_each_slide_with_its_own_patches(example_slide: Path, tmp_path: Path) -> None:
    """Two slides: each slide's marks hold its own labelled and query patches, as positions among its patches, the
    newest ledger entry of a patch winning."""
    from wsi_il.database import PatchTable
    from wsi_il.export import overview_marks
    from wsi_il.model import Context
    from wsi_il.project import Project, SlideRecord

    info = read_info(example_slide)
    records = [
        SlideRecord(
            id=name,
            kind="slide",
            path=str(example_slide),
            width=info.width,
            height=info.height,
            mpp=info.mpp,
            offset=info.offset,
            n_patches=3,
            tiled=True,
            extracted=True,
        )
        for name in ("a", "b")
    ]
    ids = ["a_0", "a_1", "a_2", "b_0", "b_1", "b_2"]
    table = PatchTable(
        slide_index=np.array([0, 0, 0, 1, 1, 1]), boxes=np.zeros((6, 4), dtype=np.int64), ids=ids, slides=records
    )
    project = Project(tmp_path / "p")
    (project.root / "sessions").mkdir(parents=True)
    project.append_ledger(
        [
            {"patch_id": "a_2", "label": "Tumor", "batch": "s1-r1"},
            {"patch_id": "b_1", "label": "Normal", "batch": "s1-r1"},
            {"patch_id": "a_2", "label": "skip", "batch": "correction", "source": "correction"},
            {"patch_id": "gone", "label": "Tumor", "batch": "s1-r1"},
        ]
    )
    for session, query in (("s1", ["a_0", "a_1"]), ("s2", ["b_2"])):
        (project.root / "sessions" / f"{session}.json").write_text(
            json.dumps({"id": session, "query": {"patch_ids": query}})
        )
    ctx = Context(project, {"classes": CLASSES}, table, store=None, device="cpu", reporter=None)
    marks = overview_marks(ctx)
    assert marks["a"].labelled.tolist() == [2] and marks["a"].labels == ("skip",)
    assert marks["b"].labelled.tolist() == [1] and marks["b"].labels == ("Normal",)
    assert [(s, q.tolist()) for s, q in marks["a"].queries] == [("s1", [0, 1])]
    assert [(s, q.tolist()) for s, q in marks["b"].queries] == [("s2", [2])]
