"""The offline path: pretraining beside the review, the switch of features between rounds, the redrawn batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_il.answers import read_answers, write_answers
from wsi_il.batch import read_batch
from wsi_il.cli import app
from wsi_il.pretrain import DurationEstimate
from wsi_il.project import Project

REPO = Path(__file__).resolve().parents[1]
PCAM = REPO / "tests" / "data" / "pcam"
CPU = ("--device", "cpu")
TINY = ("--batch", "8", "--crop", "32", *CPU)
"""A pretraining run small enough for a test (the recipes' views and batches are far larger)."""

runner = CliRunner()


def run(*args: object, code: int = 0, env: dict[str, str] | None = None) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)
    assert result.exit_code == code, result.output
    return result.output


def start(*args: object, log: Path) -> subprocess.Popen:
    """Start ``python -m wsi_il ARGS`` as another process, its output going to ``log``."""
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "wsi_il", *map(str, args)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None or condition(), f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reviewing(tmp_path_factory) -> Path:
    """A project of a PCam mosaic (random weights, 96 px tiles) whose session waits for its first batch."""
    from wsi_il.measure.mosaic import labelled_patches, make_patch_mosaic

    folder = tmp_path_factory.mktemp("offline")
    tumour, normal = labelled_patches(PCAM)
    slide = make_patch_mosaic(folder / "island.tiff", tumour, normal, cells=(12, 12), islands=2, seed=4).slide
    root = folder / "p"
    run("init", root, "--slide", slide.path, "--tile-size", "96", "--weights", "random", *CPU)
    boxes = np.load(root / "slides" / "island" / "patches.npy")
    run("query", root, "--patch", f"island_x{boxes[0, 0]}_y{boxes[0, 1]}", "-k", "4", "--rounds", "3", *CPU)
    return root


def copy_of(project: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "p"
    shutil.copytree(project, target)
    return target


def answer(batch: Path, labels: dict[int, str]) -> dict[str, str]:
    """Write answers into a batch's labels.csv as the review desk does ({row: label}); return them by patch id."""
    info, patches = read_batch(batch)
    given = {patches[row].patch_id: label for row, label in labels.items()}
    write_answers(batch, info, patches, given)
    return given


def test_without_imagenet_weights_init_names_three_routes_pretraining_first(tmp_path):
    offline = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    output = run(
        "init", tmp_path / "p", "--slide", REPO / "examples" / "CMU-1-Small-Region.svs", *CPU, code=3, env=offline
    )
    text = " ".join(output.split())
    routes = [text.find("--weights pretrain"), text.find("copy https://"), text.find("--weights FILE")]
    assert -1 not in routes and routes == sorted(routes), text
    assert not (tmp_path / "p").exists()


def test_the_review_goes_on_while_pretraining_runs_and_a_killed_run_changes_nothing(reviewing, tmp_path):
    project = copy_of(reviewing, tmp_path)
    features = project / "slides" / "island" / "features.npy"
    before = features.read_bytes()
    pretraining = start("pretrain", project, "--apply", "--steps", "100000", *TINY, log=tmp_path / "pretrain.log")
    try:
        wait_for(
            lambda: (project / "pretrain" / "lock").is_file() and "steps of" in (tmp_path / "pretrain.log").read_text(),
            "pretraining started",
            pretraining,
        )
        status = run("status", project)
        assert "pretraining: running" in " ".join(status.split())
        batch = project / "batches" / "s1-r1"
        answer(batch, {0: "Tumor", 1: "Normal", 2: "Normal", 3: "Tumor"})
        assert "batch s1-r2 is ready" in " ".join(run("ingest", project, batch / "labels.csv", *CPU).split())
        exported = " ".join(run("export", project, "--out", tmp_path / "mask.geojson").split())
        assert "pretraining is running" in exported and "Offline, run" not in exported
        assert pretraining.poll() is None, "pretraining ended before the review's commands ran beside it"
    finally:
        pretraining.kill()
        pretraining.wait()
    assert features.read_bytes() == before
    manifest = json.loads((project / "project.json").read_text())
    assert manifest["features"]["weights"] == "random" and "reextract" not in manifest
    assert json.loads(run("status", project, "--json"))["pretraining"] is None  # a killed run holds nothing


def test_the_switch_waits_for_a_round_then_redraws_the_waiting_batch_keeping_its_labels(reviewing, tmp_path):
    project = copy_of(reviewing, tmp_path)
    batch = project / "batches" / "s1-r1"
    given = answer(batch, {1: "Normal", 3: "Tumor"})
    log = tmp_path / "apply.log"
    proj = Project(project)
    with proj.lock("ingest"):  # a round in progress, in this process
        applying = start("pretrain", project, "--apply", "--steps", "3", *TINY, log=log)
        try:
            wait_for(
                lambda: "waiting for the round in progress" in " ".join(log.read_text().split()),
                "the switch waiting for the lock",
                applying,
            )
            assert json.loads((project / "project.json").read_text())["features"]["weights"] == "random"
            assert read_answers(batch, *read_batch(batch)) == given
        except BaseException:
            applying.kill()
            raise
    assert applying.wait(timeout=600) == 0, log.read_text()
    output = " ".join(log.read_text().split())
    assert "switched" in output and "batch s1-r1 was drawn again" in output
    weights = json.loads((project / "project.json").read_text())["features"]["weights"]
    assert Path(weights).name == "weights.pt"
    info, patches = read_batch(batch)
    kept = read_answers(batch, info, patches)
    assert {pid: label for pid, label in kept.items() if label} == given and len(patches) == 4
    session = json.loads((project / "sessions" / "s1.json").read_text())
    assert session["history"][-1]["features"].startswith("weights.pt") and session["history"][-1]["kept_labels"] == 2
    status = json.loads(run("status", project, "--json"))
    assert status["sessions"][0]["batch_features"].startswith("weights.pt")
    answer(batch, {n: "Normal" for n in range(4) if patches[n].patch_id not in given})
    run("ingest", project, batch / "labels.csv", *CPU)
    assert not (project / "pretrain" / "staged").exists()


def test_the_project_lock_leaves_pretraining_files_alone():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        proj = Project(Path(folder))
        (proj.pretrain_dir()).mkdir(parents=True)
        leftover = proj.pretrain_dir() / ".checkpoint.pt.x1.tmp"
        elsewhere = Path(folder) / ".labels.jsonl.x2.tmp"
        leftover.write_bytes(b"partial")
        elsewhere.write_bytes(b"partial")
        with proj.lock("ingest", create=True):
            assert leftover.is_file() and not elsewhere.is_file()
            with proj.lock("pretrain", scope="pretrain"):  # the two locks do not exclude each other
                assert not leftover.is_file()


def test_the_duration_estimate_follows_a_machine_that_slows_down_and_recovers():
    reports: list[tuple[int, float, bool]] = []
    step_seconds = [1.0] * 30 + [4.0] * 30 + [1.0] * 140
    clock, step = 0.0, 0

    def report(seconds: float, revised: bool = False) -> None:
        reports.append((step, seconds, revised))

    estimate = DurationEstimate(0, len(step_seconds), report, 0.0)
    for step, seconds in enumerate(step_seconds, start=1):
        clock += seconds
        estimate.step_done(step, clock)
    first, *revised = reports
    assert not first[2] and first[1] == pytest.approx(1.0 * (200 - first[0]))
    assert revised and all(r[2] for r in revised)
    per_step = [(at, seconds / (200 - at)) for at, seconds, _ in revised]
    assert any(30 < at <= 40 and rate >= 3.0 for at, rate in per_step)  # the slowdown, within ten steps
    assert per_step[-1][0] <= 75 and per_step[-1][1] == pytest.approx(1.0, rel=0.1)  # the recovery
    assert len(revised) <= 10  # a few reports, not one a step


@pytest.mark.slow
def test_one_command_takes_a_new_offline_user_to_pretrained_features(tmp_path):
    """`init --weights pretrain` with the quick recipe: the project ends on the pretrained features (minutes)."""
    from wsi_il.measure.mosaic import labelled_patches, make_patch_mosaic

    tumour, normal = labelled_patches(PCAM)
    slide = make_patch_mosaic(tmp_path / "island.tiff", tumour, normal, cells=(12, 12), islands=2, seed=4).slide
    project = tmp_path / "p"
    output = " ".join(
        run("init", project, "--slide", slide.path, "--tile-size", "96", "--weights", "pretrain", *CPU).split()
    )
    assert "RANDOMLY" not in output and "switched" in output
    manifest = json.loads((project / "project.json").read_text())
    assert Path(manifest["features"]["weights"]) == project.resolve() / "pretrain" / "weights.pt"
    assert "112 steps of 64 fields, 64 px views" in output
    run("init", project, "--weights", "pretrain", *CPU)  # the same command again: nothing left to do
