"""Corrections: any label can be changed later; the ledger stays append-only and the newest answer wins."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_cli_e2e import run

from wsi_il.corrections import correct_labels, corrections
from wsi_il.errors import InputError
from wsi_il.measure.truth import fill_labels_from_truth
from wsi_il.project import Project, current_labels


@pytest.fixture()
def labelled_project(example_slide, tmp_path):
    """The bundled slide after one ingested round of 6 labels (a second batch waits)."""
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
        "2",
        "--device",
        "cpu",
    )
    run("query", project, "--region", examples / "query.geojson", "-k", "6", "--rounds", "3", "--device", "cpu")
    batch = project / "batches" / "s1-r1"
    fill_labels_from_truth(batch, examples / "truth.geojson")
    run("ingest", project, batch / "labels.csv", "--device", "cpu")
    return project


def _ledger(project):
    return [json.loads(line) for line in (project / "labels.jsonl").read_text().splitlines()]


def _rows(batch):
    with open(batch / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_relabel_appends_and_the_newest_wins_in_training(labelled_project):
    project = labelled_project
    before = (project / "labels.jsonl").read_bytes()
    first = _ledger(project)[0]
    new = "Normal" if first["label"] == "Tumor" else "Tumor"
    out = run("relabel", project, first["patch_id"], new.lower())
    assert "corrected" in out and first["patch_id"] in out
    after = (project / "labels.jsonl").read_bytes()
    assert after.startswith(before)  # append-only: the earlier answers stay as they were
    ledger = _ledger(project)
    assert len(ledger) == 7 and ledger[-1]["source"] == "correction" and ledger[-1]["label"] == new
    assert current_labels(ledger)[first["patch_id"]]["label"] == new
    status = json.loads(run("status", project, "--json"))
    assert status["n_labels"] == 6  # still six labelled patches, one of them corrected
    assert status["corrections"] == [
        {
            "patch_id": first["patch_id"],
            "previous": first["label"],
            "label": new,
            "time": ledger[-1]["time"],
            "via": "cli",
        }
    ]
    assert "corrections: 1" in run("status", project)

    from wsi_il.events import SilentReporter  # the next round trains on the corrected label, once
    from wsi_il.model import open_context
    from wsi_il.session import training_set

    ctx = open_context(Project(project), "cpu", SilentReporter())
    _, targets = training_set(ctx)
    query = len(np.load(project / "sessions" / "s1.query.npy"))
    assert len(targets) == 6 + query
    assert targets[0] == ctx.class_index(new)
    # the same answer again changes nothing
    assert "nothing to correct" in run("relabel", project, first["patch_id"], new)
    assert (project / "labels.jsonl").read_bytes() == after


def test_corrected_labels_csv_with_the_flag(labelled_project):
    project = labelled_project
    batch = project / "batches" / "s1-r1"
    rows = _rows(batch)
    fix = "Normal" if rows[1]["label"] == "Tumor" else "Tumor"
    rows[1]["label"] = "no" if fix == "Normal" else "yes"
    with open(batch / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = run("ingest", project, batch / "labels.csv", "--device", "cpu", code=4)
    assert "relabel" in out and "--labels" in out  # ingest refuses, and says how to correct
    out = run("relabel", project, "--labels", batch / "labels.csv")
    said = [line for line in out.splitlines() if line.startswith("corrected ")]
    assert said == [f"corrected {rows[1]['patch_id']}: {fix}"]
    fixes = corrections(_ledger(project))
    assert [f["patch_id"] for f in fixes] == [rows[1]["patch_id"]]
    # ingest of the original batch stays idempotent: corrections are entries of their own
    assert "nothing changed" in run("ingest", project, batch / "labels.csv", "--device", "cpu")


def test_bad_corrections_write_nothing(labelled_project):
    project = labelled_project
    before = (project / "labels.jsonl").read_bytes()
    first = _ledger(project)[0]
    out = run("relabel", project, first["patch_id"], "tumour", code=3)
    assert "not one of Tumor, Normal" in out
    out = run("relabel", project, "no_such_patch", "Tumor", code=3)
    assert "no_such_patch" in out and "not in" in out
    out = run("relabel", project, code=3)
    assert "PATCH LABEL or --labels" in out
    assert (project / "labels.jsonl").read_bytes() == before


def test_a_patch_never_shown_can_be_labelled_and_yes_answers_the_session(labelled_project):
    proj = Project(labelled_project)
    manifest = proj.read_manifest()
    from wsi_il.database import patch_table

    ids = patch_table(proj, manifest).ids
    labelled = set(current_labels(proj.read_ledger()))
    fresh = next(p for p in ids if p not in labelled)
    written = correct_labels(proj, manifest, set(ids), [(fresh, "yes")], via="page")
    assert written[0]["label"] == "Tumor" and written[0]["via"] == "page" and written[0]["session"] == "s1"
    assert corrections(proj.read_ledger())[-1]["previous"] is None
    with pytest.raises(InputError, match="no label to skip"):
        correct_labels(
            proj, manifest, set(ids), [(next(p for p in ids if p not in labelled | {fresh}), "skip")], via="page"
        )


def test_end_closes_the_session_early_and_next_says_what_waits(labelled_project):
    project = labelled_project
    status = json.loads(run("status", project, "--json"))
    assert "wsi-il end" in status["next"] and "s1-r2" in status["next"]
    out = run("end", project)
    assert "session s1 ended after 1 of 3 rounds" in out and "closed unlabelled" in out
    assert "next: export the mask" in out
    status = json.loads(run("status", project, "--json"))
    assert status["sessions"][0]["state"] == "ended" and status["n_labels"] == 6
    assert "no session is open" in run("end", project, code=4)
