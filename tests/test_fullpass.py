"""A pooled round's full pass outside the project lock (wsi_il.fullpass): the next batch is ingested while it runs,
a newer model's pass replaces an older one's, a pass killed before entering leaves the cached arrays as they were
and is finished by the next command, and the review desk answers a submit before the pass ends."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_pool import PASS_TITLE, copy_project, pooled_project, query_indices
from typer.testing import CliRunner

import wsi_il.model
from wsi_il.cli import app
from wsi_il.config import SessionSettings
from wsi_il.events import SilentReporter
from wsi_il.fullpass import run_pass
from wsi_il.measure.truth import fill_labels_from_truth
from wsi_il.model import open_context
from wsi_il.project import Project
from wsi_il.session import finish_full_pass, ingest, start_session

runner = CliRunner()


class StallingReporter(SilentReporter):
    """A reporter that holds the full pass after its first chunk until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled, self.release = threading.Event(), threading.Event()
        self.chunks = 0

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        if not description.startswith(PASS_TITLE):
            return super().task(description, total, unit)

        def advance(amount: int) -> None:
            self.chunks += 1
            self.stalled.set()
            assert self.release.wait(120), "the test never released the pass"

        return advance


@pytest.fixture(scope="module")
def pooled(block_slide, tmp_path_factory) -> Path:
    """A pooled project of the block slide (96 tissue patches, a pool of 30) with a session of 3 rounds started."""
    project = pooled_project(block_slide, tmp_path_factory.mktemp("fullpass") / "base")
    ctx = open_context(Project(project), "cpu", SilentReporter())
    start_session(ctx, "Tumor", SessionSettings("cnfp", 4, 3), query_indices=query_indices(ctx, block_slide))
    return project


def ingest_later(project: Project, batch: str, truth: Path):
    """Label a batch from the truth and ingest it under the project lock, leaving its full pass to the caller."""
    folder = project.batch_dir(batch)
    fill_labels_from_truth(folder, truth)
    with project.lock("ingest"):
        return ingest(open_context(project, "cpu", SilentReporter()), folder / "labels.csv", pass_later=True)


def state(project: Project) -> dict:
    return project.read_json(project.state_path())


@pytest.mark.parametrize("chunk", [16, 256], ids=["stopped-between-chunks", "discarded-when-entering"])
def test_the_next_batch_is_ingested_while_a_pass_runs_and_only_the_newer_models_pass_is_entered(
    pooled, block_slide, tmp_path, monkeypatch, chunk
):
    monkeypatch.setattr(wsi_il.model, "EMBED_CHUNK", chunk)  # 16: six chunks of the 96 patches; 256: one
    project = copy_project(pooled, tmp_path / "p")
    first = ingest_later(project, "s1-r1", block_slide.truth_path)
    assert first.pass_model == "s1-r1" and first.batch_dir == project.batch_dir("s1-r2")
    assert state(project)["model"] == "s1-r1" and state(project)["predictions"] is None

    stalled = StallingReporter()
    outcomes: dict[str, object] = {}
    older = threading.Thread(
        target=lambda: outcomes.update(old=run_pass(open_context(project, "cpu", stalled), "s1-r1")), daemon=True
    )
    older.start()
    assert stalled.stalled.wait(120)
    # The pass of s1-r1 holds its own lock, mid-way: the project lock is free for the next round.
    second = ingest_later(project, "s1-r2", block_slide.truth_path)
    assert second.pass_model == "s1-r2" and second.batch_dir == project.batch_dir("s1-r3")
    assert state(project)["model"] == "s1-r2" and state(project)["predictions"] is None

    waits: list[str] = []
    newer = threading.Thread(
        target=lambda: outcomes.update(
            new=run_pass(open_context(project, "cpu", SilentReporter()), "s1-r2", on_wait=waits.append)
        ),
        daemon=True,
    )
    newer.start()
    deadline = time.monotonic() + 120
    while not waits and time.monotonic() < deadline:  # the newer pass finds the pass lock taken and waits for it
        time.sleep(0.1)
    assert waits and "pass s1-r1" in waits[0]
    stalled.release.set()
    older.join(120)
    newer.join(120)
    old, new = outcomes["old"], outcomes["new"]
    assert not old.entered and "model s1-r2 replaced model s1-r1" in old.message
    if chunk == 16:
        assert stalled.chunks == 1  # it stopped at the next chunk, not at the end of the pass
    assert new.entered and state(project)["embeddings"] == state(project)["predictions"] == "s1-r2"
    assert not list(project.pass_dir().glob("*.npy"))

    # What was entered is model s1-r2's pass: the synchronous pass of the same model computes the same arrays.
    check = copy_project(project.root, tmp_path / "check")
    check.write_json(check.state_path(), {**state(check), "embeddings": None, "predictions": None})
    assert finish_full_pass(open_context(check, "cpu", SilentReporter())) is not None
    assert np.array_equal(project.read_array(project.embeddings_path()), check.read_array(check.embeddings_path()))
    assert np.array_equal(project.read_array(project.predictions_path()), check.read_array(check.predictions_path()))


def test_a_pass_killed_before_entering_leaves_the_previous_arrays_and_the_next_ingest_finishes_it(
    pooled, block_slide, tmp_path
):
    project = copy_project(pooled, tmp_path / "p")
    folder = project.batch_dir("s1-r1")
    fill_labels_from_truth(folder, block_slide.truth_path)
    with project.lock("ingest"):
        ingest(open_context(project, "cpu", SilentReporter()), folder / "labels.csv")  # its pass in the command
    assert state(project)["predictions"] == "s1-r1"
    before = project.read_array(project.predictions_path())
    assert ingest_later(project, "s1-r2", block_slide.truth_path).pass_model == "s1-r2"

    def killed(holder: str) -> None:
        raise KeyboardInterrupt  # the process dies while it waits to enter its arrays

    with project.lock("another command"), pytest.raises(KeyboardInterrupt):
        run_pass(open_context(project, "cpu", SilentReporter()), "s1-r2", on_wait=killed)
    assert sorted(p.name for p in project.pass_dir().glob("*.npy")) == [
        "s1-r2.embeddings.npy",
        "s1-r2.predictions.npy",
    ]  # computed, not entered
    assert state(project)["model"] == "s1-r2" and state(project)["predictions"] == "s1-r1"
    assert np.array_equal(project.read_array(project.predictions_path()), before)
    # A kill leaves the pass lock behind, naming a process that is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    project.pass_lock_path().write_text(f'{{"pid": {int(gone.stdout)}, "host": "{_host()}", "command": "pass"}}')
    status = runner.invoke(app, ["status", str(project.root)], catch_exceptions=False).output
    assert "from model s1-r1, not the current s1-r2" in status and "did not finish" in status

    result = runner.invoke(app, ["ingest", str(project.root), str(project.batch_dir("s1-r2") / "labels.csv")])
    assert result.exit_code == 0, result.output
    assert "already ingested; its full pass is unfinished" in result.output
    assert "outside the project's lock" in result.output and "predictions updated to model s1-r2" in result.output
    assert state(project)["embeddings"] == state(project)["predictions"] == "s1-r2"
    assert not list(project.pass_dir().glob("*.npy")) and not project.pass_lock_path().exists()


def _host() -> str:
    import socket

    return socket.gethostname()


def test_the_desk_answers_a_submit_before_the_pass_and_the_pass_lands_afterwards(pooled, block_slide, tmp_path):
    from wsi_il.desk.desk import Desk

    project = copy_project(pooled, tmp_path / "p")
    desk = Desk(project.root, "cpu", prepare_ahead=False)
    try:
        with project.lock("a pass of another process", scope="pass"):  # the desk's pass waits for it
            fill_labels_from_truth(project.batch_dir("s1-r1"), block_slide.truth_path)
            reply = desk.submit("s1-r1")
            assert reply["next_batch"] == "s1-r2" and reply["pass"] == {"state": "running", "model": "s1-r1"}
            assert state(project)["model"] == "s1-r1" and state(project)["predictions"] is None
            # The next submit is not held up by the pass either.
            fill_labels_from_truth(project.batch_dir("s1-r2"), block_slide.truth_path)
            reply = desk.submit("s1-r2")
            assert reply["next_batch"] == "s1-r3" and desk.overview()["pass"]["state"] == "running"
            assert state(project)["predictions"] is None
        deadline = time.monotonic() + 120
        while desk.overview()["pass"]["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert desk.overview()["pass"] | {"seconds": 0} == {
            "state": "done",
            "model": "s1-r2",
            "seconds": 0,
            "message": "predictions updated to model s1-r2",
        }
        assert state(project)["embeddings"] == state(project)["predictions"] == "s1-r2"
    finally:
        desk.close()


def test_closing_the_desk_stops_its_pass_and_enters_nothing(pooled, block_slide, tmp_path):
    from wsi_il.desk.desk import Desk

    project = copy_project(pooled, tmp_path / "p")
    desk = Desk(project.root, "cpu", prepare_ahead=False)
    with project.lock("a pass of another process", scope="pass"):
        fill_labels_from_truth(project.batch_dir("s1-r1"), block_slide.truth_path)
        assert desk.submit("s1-r1")["pass"]["state"] == "running"
        started = time.monotonic()
        desk.close()  # its pass waits for the pass lock: it gives up instead of keeping the desk open
        assert time.monotonic() - started < 30
    assert desk.overview()["pass"]["state"] == "not entered" and "stopped" in desk.overview()["pass"]["message"]
    assert state(project)["model"] == "s1-r1" and state(project)["predictions"] is None
    assert not list(project.pass_dir().glob("*.npy"))
