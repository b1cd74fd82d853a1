"""``wsi-il watch``: each batch ingested as soon as its labels file is complete, in one process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_cli_e2e import run, write_region
from typer.testing import CliRunner

from wsi_il.cli import app
from wsi_il.measure.truth import fill_labels_from_truth, write_batch_labels


@pytest.fixture()
def waiting_project(block_slide, tmp_path) -> Path:
    """A project whose first session (2 rounds of 6 patches) waits for its first batch's labels."""
    return _waiting_project(block_slide, tmp_path)


def _waiting_project(block_slide, tmp_path: Path, *init_options: str, device: str = "cpu") -> Path:
    project = tmp_path / "proj"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "128",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        device,
        *init_options,
    )
    x0, y0, _, _ = block_slide.tumour.bounds
    region = write_region(tmp_path / "query.geojson", x0 + 128, y0 + 128, x0 + 384, y0 + 384)
    run("query", project, "--region", region, "--label", "tumor", "-k", "6", "--rounds", "2", "--device", device)
    return project


def _wait_for(condition, what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _fill(batch: Path, truth: Path, keep: int | None = None, typo: bool = False) -> None:
    """The pseudo-expert's labels for the first ``keep`` rows (all by default), one mistyped with ``typo``."""
    labels = fill_labels_from_truth(batch, truth)
    for n, patch in enumerate(labels):
        if keep is not None and n >= keep:
            labels[patch] = ""
    if typo:
        labels[next(iter(labels))] = "tumuor"
    write_batch_labels(batch, labels)


def test_watch_ingests_each_batch_once_it_is_complete(waiting_project, block_slide):
    """Empty, half-filled, mistyped, then complete: only the complete file is ingested; the watcher says what it
    waits for and what is wrong, and ends with the session."""
    from wsi_il.events import SilentReporter
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest
    from wsi_il.watch import watch

    project = Project(waiting_project)
    reporter = SilentReporter()
    said = reporter.statuses
    ingested: list[str] = []

    def ingest_batch(labels: Path) -> None:
        ingested.append(labels.parent.name)
        ingest(open_context(project, "cpu", SilentReporter()), labels)

    rounds: list[int] = []
    stopped = threading.Event()
    watcher = threading.Thread(
        target=lambda: rounds.append(watch(project, ingest_batch, reporter, 0.05, stopped.is_set))
    )
    watcher.start()
    try:
        first = waiting_project / "batches" / "s1-r1"
        _wait_for(lambda: any("0 of 6" in s for s in said), "the empty batch to be reported")
        _fill(first, block_slide.truth_path, keep=3)
        _wait_for(lambda: any("3 of 6" in s for s in said), "the half-filled batch to be reported")
        _fill(first, block_slide.truth_path, typo=True)
        _wait_for(lambda: any("tumuor" in s for s in said), "the mistyped label to be reported")
        assert ingested == []
        _fill(first, block_slide.truth_path)
        second = waiting_project / "batches" / "s1-r2"
        _wait_for(lambda: ingested == ["s1-r1"] and (second / "batch.json").is_file(), "the first round")
        _fill(second, block_slide.truth_path)
        watcher.join(timeout=120)
    finally:
        stopped.set()  # (after a failed wait: the thread ends with the test)
        watcher.join(timeout=120)
    assert rounds == [2] and ingested == ["s1-r1", "s1-r2"]
    assert run("status", waiting_project, "--json").count('"done"') == 1


def test_watch_command_runs_the_rounds_and_says_what_comes_next(waiting_project, block_slide):
    results = []
    command = threading.Thread(
        target=lambda: results.append(
            CliRunner().invoke(
                app, ["watch", str(waiting_project), "--interval", "0.05", "--device", "cpu"], catch_exceptions=False
            )
        )
    )
    command.start()
    for batch in ("s1-r1", "s1-r2"):
        path = waiting_project / "batches" / batch
        _wait_for(lambda: (path / "batch.json").is_file(), f"batch {batch}")  # noqa: B023 - (written last)
        _fill(path, block_slide.truth_path)
    command.join(timeout=180)
    assert results and results[0].exit_code == 0, results and results[0].output
    output = results[0].output
    assert "is ingested as soon as every row is labelled" in output and "wsi-il export" in output


def test_watch_without_a_waiting_batch_says_how_to_start_one(tmp_path, block_slide):
    project = tmp_path / "proj"
    run("init", project, "--slide", block_slide.path, "--tile-size", "256", "--weights", "random", "--device", "cpu")
    output = run("watch", project, code=4)  # a project-state error
    assert "no review batch" in output and "wsi-il query" in output


def test_watch_ingests_a_geojson_exported_from_qupath_into_the_batch_folder(waiting_project, block_slide):
    """The QuPath route: the batch's objects classified and exported into its folder, as ``ingest`` takes them."""
    import json

    from wsi_il.events import SilentReporter
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest
    from wsi_il.watch import watch

    project = Project(waiting_project)
    batch = waiting_project / "batches" / "s1-r1"
    truth = fill_labels_from_truth(batch, block_slide.truth_path)  # the labels, to copy into the export
    write_batch_labels(batch, dict.fromkeys(truth, ""))  # the CSV stays empty: the export brings them
    exported = json.loads((batch / "batch.geojson").read_text())
    for n, feature in enumerate(exported["features"]):
        feature["properties"].pop("wsi_il", None)
        if n:  # the first object left unclassified: a partial export first
            feature["properties"]["classification"] = {
                "name": truth[feature["properties"]["name"]],
                "color": [200, 0, 0],
            }
    reporter = SilentReporter()
    said = reporter.statuses
    ingested: list[Path] = []
    stopped = threading.Event()

    def ingest_batch(labels: Path) -> None:
        ingested.append(labels)
        ingest(open_context(project, "cpu", SilentReporter()), labels)
        stopped.set()

    (batch / "qupath-export.geojson").write_text(json.dumps(exported))
    watcher = threading.Thread(target=lambda: watch(project, ingest_batch, reporter, 0.05, stopped.is_set))
    watcher.start()
    try:
        _wait_for(lambda: any("5 of 6" in s and "qupath-export" in s for s in said), "the partial export")
        first = exported["features"][0]["properties"]
        first["classification"] = {"name": truth[first["name"]], "color": [200, 0, 0]}
        (batch / "qupath-export.geojson").write_text(json.dumps(exported))
        _wait_for(stopped.is_set, "the export to be ingested")
    finally:
        stopped.set()
        watcher.join(timeout=120)
    assert ingested == [batch / "qupath-export.geojson"]
    assert (waiting_project / "batches" / "s1-r2" / "batch.json").is_file()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("options", [(), ("--schedule", "fast", "--fast-frozen-conv1")])
def test_a_rehearsal_writes_nothing_and_leaves_the_round_as_it_would_be(block_slide, tmp_path, options):
    """``rehearse`` (the watcher's warm-up) trains and discards: the project's files are unchanged, and the round
    ingested after it gives the embeddings and predictions a round without it gives (also with the fast
    schedule's frozen stem, whose cache the round writes)."""
    import shutil

    import numpy as np

    from wsi_il.events import SilentReporter
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest, rehearse

    waiting_project = _waiting_project(block_slide, tmp_path, *options)
    twin = tmp_path / "twin"
    shutil.copytree(waiting_project, twin)
    project = Project(waiting_project)
    before = _files(waiting_project)
    assert rehearse(open_context(project, "cpu", SilentReporter()), waiting_project / "batches" / "s1-r1") > 0
    assert _files(waiting_project) == before
    results = []
    for root in (waiting_project, twin):
        _fill(root / "batches" / "s1-r1", block_slide.truth_path)
        done = Project(root)
        ingest(open_context(done, "cpu", SilentReporter()), root / "batches" / "s1-r1" / "labels.csv")
        results.append((np.load(done.embeddings_path()), np.load(done.predictions_path())))
        assert done.stems_path().is_file() == bool(options)  # the frozen stem's round ran as such
    assert all(np.array_equal(a, b) for a, b in zip(*results, strict=True))


def test_the_watcher_warms_up_while_the_batch_waits_and_not_once_it_is_labelled(waiting_project, block_slide, capsys):
    from wsi_il.cli import _rehearse
    from wsi_il.project import Project
    from wsi_il.watch import waiting_batches

    project = Project(waiting_project)
    _rehearse(project, "cpu", waiting_batches(project)[0])
    assert "warmed up for the first round in" in capsys.readouterr().out
    _fill(waiting_project / "batches" / "s1-r1", block_slide.truth_path)
    _rehearse(project, "cpu", waiting_batches(project)[0])
    assert capsys.readouterr().out == ""
    _fill(waiting_project / "batches" / "s1-r1", block_slide.truth_path, keep=2)
    with project.lock("other command"):  # it writes nothing, so it needs no lock (taking it removes temporaries)
        _rehearse(project, "cpu", waiting_batches(project)[0])
    assert "warmed up for the first round in" in capsys.readouterr().out
    (waiting_project / "project.json").write_text("{")  # a rehearsal that fails: the watcher goes on, unwarmed
    _rehearse(project, "cpu", waiting_batches(project)[0])
    assert "not warmed up for the first round" in capsys.readouterr().out
