"""`wsi-il simulate` and `wsi-il evaluate`: the engine's own loop with ground truth as the expert."""

from __future__ import annotations

import csv
import inspect
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_il.cli import app
from wsi_il.measure.simulate import (
    COLUMNS,
    REFERENCE,
    SimulationSettings,
    _macro_average,
    grow_region,
    query_regions,
    suggestion_rounds,
    suggestion_scores,
    summarise,
    tumour_islands,
)

runner = CliRunner()
# click before 8.2 mixes stderr (where warnings go) into result.stdout unless told not to
stdout_runner = CliRunner(**({"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}))
FAST = ["--epochs", "1", "--weights", "random", "--device", "cpu", "--tile-size", "256"]
SLIDE_FAST = [*FAST[:-1], "96", "--reference-folds", "2"]  # the PCam mosaic's cells are 96 px
PCAM = Path(__file__).resolve().parent / "data" / "pcam"


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def run_json(*args: object) -> dict:
    result = stdout_runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


@pytest.fixture(scope="module")
def island_slide(tmp_path_factory):
    """A PCam patch mosaic from the repository's test data: exact truth at the 96 px patch level."""
    from wsi_il.measure.mosaic import labelled_patches, make_patch_mosaic

    tumour, normal = labelled_patches(PCAM)
    folder = tmp_path_factory.mktemp("island")
    return make_patch_mosaic(
        folder / "island.tiff", tumour, normal, cells=(14, 14), islands=2, tumour_share=0.35, seed=4
    ).slide


@pytest.fixture(scope="module")
def slide_run(island_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "slide"
    output = run(
        "simulate",
        "--slide",
        island_slide.path,
        "--truth",
        island_slide.truth_path,
        "--strategy",
        "random,topk,fme,cnfp,hybrid,entropy",
        "--sessions",
        "1",
        "--rounds",
        "1",
        "-k",
        "3",
        *SLIDE_FAST,
        "--out",
        out,
    )
    return out, output


def test_simulate_slide_runs_all_six_strategies(slide_run) -> None:
    out, output = slide_run
    rows = read_rows(out / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    strategies = [r["strategy"] for r in rows]
    assert strategies == [REFERENCE, "random", "topk", "fme", "cnfp", "hybrid", "entropy"]
    for row in rows[1:]:
        assert row["session"] == "1" and row["labels"] == str(1 + 3)  # the query patch counts
        assert row["accuracy"] == "" and row["p_at_10"] == ""  # patch-dataset metrics do not apply
        assert 0 <= float(row["jaccard"]) <= float(row["f1"]) <= 1 and float(row["seconds"]) > 0
        assert row["f1_unlabelled"] != "" and 0 <= float(row["balanced_accuracy_unlabelled"]) <= 1
        assert row["reviewed"] == "3" and row["query_patches"] == "1"
    reference = rows[0]
    assert reference["balanced_accuracy"] == reference["balanced_accuracy_unlabelled"]  # each patch held out once
    assert 0 <= float(reference["balanced_accuracy"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "slides" and set(summary["strategies"]) == {REFERENCE, *strategies[1:]}
    assert "labels_to_95pct" in summary["strategies"]["cnfp"]["jaccard"]
    for metric in ("f1", "jaccard", "f1_unlabelled", "jaccard_unlabelled", "balanced_accuracy_unlabelled"):
        assert (out / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cnfp" in output and "wrote" in output


def test_simulate_drives_the_real_review_loop(slide_run) -> None:
    """Each run is a project whose batches were written by start_session/ingest and filled from the truth."""
    out, _ = slide_run
    project = out / "runs" / "island" / "cnfp-seed0"
    session = json.loads((project / "sessions" / "s1.json").read_text())
    assert session["strategy"] == "cnfp" and session["state"] == "done" and session["k"] == 3
    assert [h["rule"] for h in session["history"]] == ["fme"]  # no classifier before the first labels
    labels = read_rows(project / "batches" / "s1-r1" / "labels.csv")
    assert len(labels) == 3 and {row["label"] for row in labels} <= {"Tumor", "Normal"}
    ledger = (project / "labels.jsonl").read_text().splitlines()
    assert len(ledger) == 3
    status = run_json("status", project, "--json")
    assert status["n_labels"] == 3 and status["model"] == "s1-r1"


def test_evaluate_scores_a_project(slide_run, island_slide) -> None:
    out, _ = slide_run
    project = out / "runs" / "island" / "cnfp-seed0"
    result = run_json("evaluate", project, "--truth", island_slide.truth_path, "--json")
    assert result["label"] == "Tumor" and result["labelled_patches"] == 4  # 3 reviewed + 1 query
    assert result["truth_patches"] > 0 and result["patches"] > result["truth_patches"]
    for key in ("precision", "recall", "f1", "jaccard"):
        assert 0 <= result["patch"][key] <= 1
    assert 0 <= result["pixel_iou"] <= 1
    every = result["patch"]
    assert every["balanced_accuracy"] == pytest.approx((every["recall"] + every["specificity"]) / 2)
    assert every["called_share"] == pytest.approx(result["predicted_patches"] / result["patches"])
    assert every["truth_share"] == pytest.approx(result["truth_patches"] / result["patches"])
    text = run("evaluate", project, "--truth", island_slide.truth_path)
    assert "pixel-level IoU" in text and "not labelled" in text and "balanced acc." in text


def test_simulate_a_drawn_region(slide_run, island_slide, tmp_path) -> None:
    """--query-island-share: the session's query is a connected part of the largest tumour island; the
    suggestions shown are scored against the truth."""
    from wsi_il.database import patch_table
    from wsi_il.measure.truth import truth_mask
    from wsi_il.project import Project

    base, out = slide_run[0] / "base", tmp_path / "region"
    shutil.copytree(base, out / "base")  # the features, computed once
    run(
        "simulate",
        "--slide",
        island_slide.path,
        "--truth",
        island_slide.truth_path,
        "--strategy",
        "cnfp",
        "--sessions",
        "1",
        "--rounds",
        "2",
        "-k",
        "3",
        "--query-island-share",
        "0.5",
        "--no-reference",
        *SLIDE_FAST,
        "--out",
        out,
    )
    project = Project(out / "base" / "island")
    table = patch_table(project, project.read_manifest())
    truth = truth_mask(table.boxes, island_slide.truth_path)
    largest = max(tumour_islands(table.boxes, truth), key=len)
    row = read_rows(out / "results.csv")[0]
    assert row["query_patches"] == str(round(0.5 * len(largest))) and row["reviewed"] == "6"
    assert int(row["labels"]) == int(row["query_patches"]) + 6
    session = json.loads((out / "runs" / "island" / "cnfp-seed0" / "sessions" / "s1.json").read_text())
    index = table.index_of()
    query = np.array([index[p] for p in session["query"]["patch_ids"]])
    assert set(query) <= set(largest) and len(tumour_islands(table.boxes, np.isin(np.arange(len(truth)), query))) == 1
    shown = read_rows(out / "suggestions.csv")
    assert {r["round"] for r in shown} == {"2"} and len(shown) == 3  # round 1 had no classifier to suggest with
    right = np.mean([r["suggestion"] == r["truth"] for r in shown])
    assert float(row["suggestion_accuracy"]) == pytest.approx(right)
    assert 0 <= float(row["confident_share"]) <= 1
    rounds = read_rows(out / "rounds.csv")
    assert len(rounds) == 1 and rounds[0]["round"] == "2" and rounds[0]["shown"] == "3"
    assert float(rounds[0]["suggestion_accuracy"]) == pytest.approx(right)


def _grid(mask: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (96 px) and truth of the cells of a picture: '#' tumour, '.' other tissue, ' ' no patch."""
    boxes, truth = [], []
    for row, line in enumerate(mask):
        for col, char in enumerate(line):
            if char != " ":
                boxes.append((col * 96, row * 96, 96, 96))
                truth.append(char == "#")
    return np.array(boxes), np.array(truth)


def test_tumour_islands_and_grown_regions() -> None:
    boxes, truth = _grid(["##..#", "#...#", "..  #", "##.##"])
    islands = sorted((list(i) for i in tumour_islands(boxes, truth)), key=len)
    assert [len(i) for i in islands] == [2, 3, 5]  # edge neighbours only: the corner cells do not join
    largest = np.array(islands[-1])
    rng = np.random.default_rng(0)
    for size in (1, 3, 5):
        region = grow_region(boxes, largest, size, rng)
        assert len(region) == size and set(region) <= set(largest)
        assert len(tumour_islands(boxes, np.isin(np.arange(len(truth)), region))) == 1  # connected
    settings = SimulationSettings(sessions=3, query_island_share=0.6)
    regions = query_regions(boxes, truth, settings, rng)
    assert [len(r) for r in regions] == [3, 3, 3] and all(set(r) <= set(largest) for r in regions)
    paper = query_regions(boxes, truth, SimulationSettings(sessions=4, queries=2), rng)
    assert all(len(r) == 1 and truth[r[0]] for r in paper) and paper[0][0] == paper[2][0]  # cycles 2 patches
    two = query_regions(boxes, truth, SimulationSettings(sessions=2, query_patches=3), rng)
    assert all(len(r) == 3 and set(r) <= set(np.flatnonzero(truth)) for r in two)


def test_suggestion_scores_by_hand() -> None:
    shown = [
        {"suggestion": "Tumor", "probability": 0.9, "truth": "Tumor"},
        {"suggestion": "Tumor", "probability": 0.55, "truth": "Normal"},
        {"suggestion": "Normal", "probability": 0.8, "truth": "Tumor"},
        {"suggestion": "Normal", "probability": 0.99, "truth": "Normal"},
    ]
    scores = suggestion_scores(shown)
    assert scores == {"suggestion_accuracy": 0.5, "confident_share": 0.75, "confident_accuracy": pytest.approx(2 / 3)}
    assert suggestion_scores([])["suggestion_accuracy"] == ""
    per_round = suggestion_rounds(
        [{**p, "strategy": "cnfp", "seed": 0, "session": 1, "round": 1 + i // 2} for i, p in enumerate(shown)]
    )
    assert [(r["round"], r["shown"], r["suggestion_accuracy"]) for r in per_round] == [(1, 2, 0.5), (2, 2, 0.5)]
    assert per_round[1]["confident_accuracy"] == 0.5 and "slide" not in per_round[0]


def test_evaluate_needs_a_trained_model(slide_run, island_slide) -> None:
    out, _ = slide_run
    output = run("evaluate", out / "base" / "island", "--truth", island_slide.truth_path, code=4)
    assert "no classifier" in output


@pytest.mark.slow
def test_simulate_inter_slide(island_slide, block_slide, tmp_path) -> None:
    out = tmp_path / "inter"
    run(
        "simulate",
        "--slide",
        island_slide.path,
        "--truth",
        island_slide.truth_path,
        "--query-slide",
        block_slide.path,
        "--query-truth",
        block_slide.truth_path,
        "--strategy",
        "cnfp",
        "--sessions",
        "1",
        "--rounds",
        "1",
        "-k",
        "2",
        *FAST,
        "--out",
        out,
    )
    session = json.loads((out / "runs" / "island" / "cnfp-seed0" / "sessions" / "s1.json").read_text())
    assert session["query"]["patch_ids"] == [] and len(session["query"]["images"]) == 1  # from the other slide
    assert len(read_rows(out / "results.csv")) == 2


@pytest.fixture()
def tiny_split(copy_crc, tmp_path) -> tuple[Path, Path]:
    """Three classes of colorectal tissue: 4 images a class in the database, the last 2 (another tile) as test."""
    return copy_crc(tmp_path / "db", slice(0, 4)), copy_crc(tmp_path / "test", slice(-2, None))


def test_simulate_patches(tiny_split, tmp_path) -> None:
    database, test = tiny_split
    out = tmp_path / "patches"
    run(
        "simulate",
        "--patches",
        database,
        "--test",
        test,
        "--strategy",
        "cnfp,random",
        "--sessions",
        "2",
        "--rounds",
        "1",
        "-k",
        "2",
        "--queries",
        "1",
        *FAST[:-2],
        "--out",
        out,
    )
    rows = read_rows(out / "results.csv")
    assert [(r["strategy"], r["seed"], r["session"]) for r in rows] == [
        (REFERENCE, "0", "0"),
        ("cnfp", "0", "1"),
        ("cnfp", "0", "2"),
        ("random", "0", "1"),
        ("random", "0", "2"),
    ]
    assert rows[0]["labels"] == "12" and rows[2]["labels"] == "6"
    for row in rows:
        assert 0 <= float(row["accuracy"]) <= 1 and 0 <= float(row["p_at_10"]) <= 1 and row["f1"] == ""
    project = out / "runs" / "db" / "cnfp-seed0"
    labels = read_rows(project / "batches" / "s1-r1" / "labels.csv")
    assert {row["label"] for row in labels} <= {"lympho", "stroma", "tumor"}  # explicit class labels
    first = json.loads((project / "sessions" / "s1.json").read_text())
    second = json.loads((project / "sessions" / "s2.json").read_text())
    assert first["label"] != second["label"]  # sessions go round the classes
    assert second["history"][0]["rule"] == "cnfp"  # the classifier of session 1 drives CNFP from then on
    assert (out / "accuracy.png").is_file() and (out / "p_at_10.png").is_file()


def test_simulate_schedules_and_no_reference(tiny_split, tmp_path) -> None:
    from wsi_il.model import load_tensors

    database, test = tiny_split
    for schedule in ("paper", "fast", "fast-frozen"):
        out = tmp_path / schedule
        frozen = ["--fast-frozen-conv1"] if schedule == "fast-frozen" else []  # random weights: off by default
        schedule = schedule.removesuffix("-frozen")
        run(
            "simulate",
            "--patches",
            database,
            "--test",
            test,
            "--strategy",
            "cnfp",
            "--sessions",
            "1",
            "--rounds",
            "2",
            "-k",
            "2",
            "--queries",
            "1",
            "--seeds",
            "2",
            "--schedule",
            schedule,
            "--no-reference",
            *FAST[:-2],
            *frozen,
            "--out",
            out,
        )
        rows = read_rows(out / "results.csv")
        assert [(r["strategy"], r["seed"]) for r in rows] == [("cnfp", "0"), ("cnfp", "1")]  # no reference row
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["schedule"] == schedule and summary["settings"]["reference"] is False
        model = load_tensors(out / "runs" / "db" / "cnfp-seed0" / "models" / "s1-r2.pt")
        assert model["schedule"] == schedule and model["shared"] == (schedule == "fast")
        if schedule == "fast":  # one block for both heads
            assert all(model["retrieval"][k].equal(model["classifier"][k]) for k in model["retrieval"])
        assert model["frozen_stem"] == bool(frozen)
        assert (out / "runs" / "db" / "cnfp-seed0" / "state" / "stems.npy").is_file() == bool(frozen)


def test_a_stopped_simulate_reuses_the_runs_that_ended(tiny_split, tmp_path) -> None:
    database, test = tiny_split
    out = tmp_path / "resumed"
    common = ["--patches", database, "--test", test, "--sessions", "1", "--rounds", "1", "-k", "2", "--queries", "1"]
    run("simulate", *common, "--strategy", "random", "--no-reference", *FAST[:-2], "--out", out)
    first = read_rows(out / "results.csv")
    marker = out / "runs" / "db" / "random-seed0" / "kept"
    marker.write_text("a rerun would have removed this folder")
    with (out / "runs.jsonl").open("a") as journal:
        journal.write('{"run": "db/cnfp/seed0", "rows": [{"stra')  # a line a kill cut short
    output = run("simulate", *common, "--strategy", "random,cnfp", "--no-reference", *FAST[:-2], "--out", out)
    assert "1 run(s) already done" in " ".join(output.split())
    assert marker.is_file()  # the random run was not done again
    rows = read_rows(out / "results.csv")
    assert [r for r in rows if r["strategy"] == "random"] == first
    assert [r["strategy"] for r in rows] == ["random", "cnfp"]
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3  # the experiment and two runs
    other = run(
        "simulate", *common, "--strategy", "random", "--no-reference", *FAST[:-2], "--epochs", "2", "--out", out, code=3
    )
    assert "holds the runs of another experiment (different epochs)" in " ".join(other.split())


def test_simulate_refuses_bad_input(tmp_path) -> None:
    assert "either --slide" in run("simulate", "--out", tmp_path, code=3)
    assert "not one of" in run(
        "simulate", "--patches", tmp_path, "--test", tmp_path, "--strategy", "best", "--out", tmp_path, code=3
    )
    assert "one --truth per --slide" in run("simulate", "--slide", tmp_path / "a.tiff", "--out", tmp_path, code=3)
    slide = ("--slide", tmp_path / "a.tiff", "--truth", tmp_path / "a.geojson", "--out", tmp_path)
    assert "unknown balance 'equal'" in run("simulate", *slide, "--balance", "equal", code=3)
    assert "--query-island-share 1.5 is not in 0..1" in run("simulate", *slide, "--query-island-share", "1.5", code=3)
    assert "--query-patches must be at least 1" in run("simulate", *slide, "--query-patches", "0", code=3)
    assert "--reference-folds must be at least 2" in run("simulate", *slide, "--reference-folds", "1", code=3)


def _row(strategy: str, seed: int, session: int, labels: int, value: float) -> dict[str, object]:
    return {"strategy": strategy, "seed": seed, "session": session, "labels": labels, "jaccard": value}


def test_summary_labels_to_reach_the_reference() -> None:
    rows = [
        _row(REFERENCE, 0, 0, 100, 0.8),
        _row(REFERENCE, 1, 0, 100, 0.8),
        _row("cnfp", 0, 1, 10, 0.5),
        _row("cnfp", 0, 2, 20, 0.77),
        _row("cnfp", 0, 3, 30, 0.8),
        _row("cnfp", 1, 1, 10, 0.76),
        _row("cnfp", 1, 2, 20, 0.7),
        _row("cnfp", 1, 3, 30, 0.75),
    ]
    summary = summarise(rows, ("jaccard",))
    assert summary[REFERENCE]["jaccard"]["mean"] == pytest.approx(0.8)
    cnfp = summary["cnfp"]["jaccard"]
    assert cnfp["labels_to_95pct"]["per_seed"] == [20.0, 10.0]  # 0.95 * 0.8 = 0.76
    assert cnfp["labels_to_100pct"]["per_seed"] == [30.0, None] and cnfp["labels_to_100pct"]["reached"] == 1
    assert cnfp["final"]["mean"] == pytest.approx(0.775) and cnfp["final"]["n"] == 2
    assert summary["cnfp"]["final_labels"]["mean"] == 30


def test_macro_average_over_slides() -> None:
    per_slide = [
        {**_row("cnfp", 0, 1, 10, 0.4), "slide": "a", "f1": ""},
        {**_row("cnfp", 0, 1, 12, 0.8), "slide": "b", "f1": ""},
    ]
    [row] = _macro_average(per_slide)
    assert row["jaccard"] == pytest.approx(0.6) and row["labels"] == 11 and row["f1"] == ""


def test_fill_labels_from_classes(tmp_path) -> None:
    from wsi_il.measure.simulate import fill_labels_from_classes

    batch = tmp_path / "b"
    batch.mkdir()
    (batch / "labels.csv").write_text("n,patch_id,label,rank\n1,p1,,3\n2,p2,,9\n")
    assert fill_labels_from_classes(batch, {"p1": "TUM", "p2": "STR", "p3": "ADI"}) == {"p1": "TUM", "p2": "STR"}
    assert (batch / "labels.csv").read_text() == "n,patch_id,label,rank\n1,p1,TUM,3\n2,p2,STR,9\n"
