"""A pooled round's full pass on a real Dask cluster (two worker processes started on 127.0.0.1 by the tests):
the arrays it enters are those of the pass computed here, bit for bit; a newer model during the pass enters
nothing of the older one; a worker killed mid-slide is retried, and a slide that fails every try is named with
nothing entered."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_fullpass import ingest_later, state
from test_pool import POOL, copy_project, query_indices
from test_trust_support import cli

import wsi_il.model
from wsi_il.config import SessionSettings
from wsi_il.events import SilentReporter
from wsi_il.fullpass import run_pass
from wsi_il.model import init_state, load_model, open_context, stem_cache
from wsi_il.project import Project
from wsi_il.session import start_session

pytest.importorskip("distributed", reason="the cluster extra is not installed (pip install -e '.[test]')")

CHUNK = 8
"""Patches a chunk of the pass in these tests: twelve chunks a slide of 96, so that a worker can be caught
mid-slide."""


@pytest.fixture(scope="module")
def scheduler():
    """The address of a local Dask cluster of two worker processes, as ``--cluster local:2`` starts one."""
    from wsi_il.cluster import ClusterSpec, connect

    with connect(ClusterSpec(local_workers=2)) as client:
        yield client.scheduler.address


@pytest.fixture(scope="module")
def ingested(block_slide, second_block_slide, tmp_path_factory) -> Path:
    """A pooled project of two slides (96 tissue patches each, a pool of 30) whose first batch is ingested and
    whose full pass of model s1-r1 is still to run; its rounds keep the block's stem frozen (its output cached)."""
    root = tmp_path_factory.mktemp("clusterpass") / "base"
    cli(
        *("init", root, "--slide", block_slide.path, "--slide", second_block_slide.path, "--tile-size", 128),
        *("--weights", "random", "--epochs", 2, "--device", "cpu", "--round", "pool", "--pool-size", POOL),
        "--fast-frozen-conv1",
    )
    project = Project(root)
    ctx = open_context(project, "cpu", SilentReporter())
    start_session(ctx, "Tumor", SessionSettings("cnfp", 4, 3), query_indices=query_indices(ctx, block_slide))
    assert ingest_later(project, "s1-r1", block_slide.truth_path).pass_model == "s1-r1"
    return root


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(wsi_il.model, "EMBED_CHUNK", CHUNK)  # the workers are given this machine's chunk size


def pass_here(project: Project, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Run the pass of ``model_id`` here, on a copy of ``project``; return the arrays it entered."""
    copy = copy_project(project.root, project.root.with_name(f"{project.root.name}-here"))
    assert run_pass(open_context(copy, "cpu", SilentReporter()), model_id).entered
    return copy.read_array(copy.embeddings_path()), copy.read_array(copy.predictions_path())


def entered(project: Project) -> tuple[np.ndarray, np.ndarray]:
    return project.read_array(project.embeddings_path()), project.read_array(project.predictions_path())


def slide_rows(project: Project) -> dict[str, int]:
    return {s["id"]: s["n_patches"] for s in project.read_manifest()["slides"]}


class Watcher(threading.Thread):
    """Acts on the worker process computing ``slide``'s rows of a pass once its attempt has done some chunks but
    not all (mid-slide), at most ``times`` times: ``action(pid)``. It reads the process from the attempt's own
    record."""

    def __init__(self, project: Project, slide: str, times: int, action) -> None:
        super().__init__(daemon=True)
        self.project, self.slide, self.times, self.action = project, slide, times, action
        self.pids: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seen: set[str] = set()
        rows = slide_rows(self.project)[self.slide]
        while len(self.pids) < self.times and not self.stop.is_set():
            for folder in sorted(self.project.pass_attempts_dir().glob(f"*.{self.slide}.*")):
                try:
                    pid = json.loads((folder / "worker.json").read_text())["pid"]
                    done = json.loads((folder / "progress.json").read_text())["done"]
                except (OSError, ValueError, KeyError):
                    continue
                if folder.name not in seen and 0 < done < rows:
                    seen.add(folder.name)
                    self.action(int(pid))
                    self.pids.append(int(pid))
            time.sleep(0.002)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "stems", ["cached", pytest.param("filled", marks=pytest.mark.slow), pytest.param("none", marks=pytest.mark.slow)]
)
def test_the_cluster_pass_enters_the_same_arrays_as_the_pass_here_bit_for_bit(ingested, scheduler, tmp_path, stems):
    project = copy_project(ingested, tmp_path / "p")
    if stems == "cached":  # a first pass here fills the frozen stem's cache, which later passes read
        assert run_pass(open_context(project, "cpu", SilentReporter()), "s1-r1").entered
        project.write_json(project.state_path(), {**state(project), "embeddings": None, "predictions": None})
    elif stems == "none":  # a project whose passes keep no stem cache: the whole block is computed
        manifest = project.read_manifest()
        manifest["train"]["fast_frozen_conv1"] = False
        project.write_manifest(manifest)
    # "filled": no stem cache yet; the workers compute the stem and the pass fills the cache
    assert project.stems_path().is_file() == (stems == "cached")
    here = pass_here(project, "s1-r1")
    labels = project.batch_dir("s1-r1") / "labels.csv"
    result = cli("ingest", project.root, labels, "--cluster", scheduler, "--device", "cpu")
    assert "updating every patch's predictions (the full pass) on the cluster" in result.output
    assert "re-embedding and predicting on the cluster" in result.output
    assert "predictions updated to model s1-r1" in result.output
    assert state(project)["embeddings"] == state(project)["predictions"] == "s1-r1"
    ours = entered(project)
    assert ours[0].dtype == here[0].dtype and ours[1].dtype == here[1].dtype
    assert np.array_equal(ours[0], here[0]) and np.array_equal(ours[1], here[1])
    copy = Project(project.root.with_name("p-here"))
    assert project.stems_path().is_file() == (stems != "none")
    if stems != "none":
        assert project.stems_path().read_bytes() == copy.stems_path().read_bytes()
        ctx = open_context(project, "cpu", SilentReporter())  # and the cache is current: the next pass reads it
        assert stem_cache(ctx, load_model(ctx, "s1-r1")["classifier"], init_state(ctx)).complete
    assert not list(project.pass_dir().glob("*.npy")) and not list(project.pass_attempts_dir().glob("*"))


def test_a_newer_model_during_a_cluster_pass_stops_it_and_nothing_of_it_is_entered(
    ingested, block_slide, scheduler, tmp_path
):
    from wsi_il.cluster import ClusterSpec, connect
    from wsi_il.clusterpass import ClusterPass

    project = copy_project(ingested, tmp_path / "p")
    paused = Watcher(project, "block", 1, lambda pid: os.kill(pid, signal.SIGSTOP))
    outcomes = []
    with connect(ClusterSpec(address=scheduler)) as client:
        older = threading.Thread(
            target=lambda: outcomes.append(
                run_pass(open_context(project, "cpu", SilentReporter()), "s1-r1", cluster=ClusterPass(client, "cpu"))
            ),
            daemon=True,
        )
        paused.start()
        older.start()
        try:
            paused.join(120)
            assert paused.pids, "the worker should have been caught mid-slide"
            # The next round saves model s1-r2 while the worker of slide block is held mid-slide.
            assert ingest_later(project, "s1-r2", block_slide.truth_path).pass_model == "s1-r2"
            older.join(60)
            assert outcomes, "the older pass should end without waiting for its tasks"
        finally:
            for pid in paused.pids:
                os.kill(pid, signal.SIGCONT)
            paused.stop.set()
    (outcome,) = outcomes
    assert not outcome.entered and "model s1-r2 replaced model s1-r1" in outcome.message
    assert state(project)["model"] == "s1-r2" and state(project)["predictions"] is None
    assert not project.predictions_path().exists()
    time.sleep(1)  # the resumed worker finds its attempt gone at its next chunk and writes nothing more
    assert not list(project.pass_dir().glob("*.npy")) and not list(project.pass_attempts_dir().glob("*"))


def test_a_worker_killed_mid_slide_is_retried_and_the_pass_entered(ingested, scheduler, tmp_path):
    project = copy_project(ingested, tmp_path / "p")
    here = pass_here(project, "s1-r1")
    killer = Watcher(project, "other", 1, kill)
    killer.start()
    try:
        result = cli("ingest", project.root, project.batch_dir("s1-r1") / "labels.csv", "--cluster", scheduler)
    finally:
        killer.stop.set()
    assert len(killer.pids) == 1
    assert "the pass of other failed (its worker died" in " ".join(result.output.split())
    assert "predictions updated to model s1-r1" in result.output
    ours = entered(project)
    assert np.array_equal(ours[0], here[0]) and np.array_equal(ours[1], here[1])
    assert not list(project.pass_attempts_dir().glob("*"))


def test_a_slide_that_fails_every_try_is_named_and_nothing_is_entered(ingested, block_slide, scheduler, tmp_path):
    project = copy_project(ingested, tmp_path / "p")
    assert run_pass(open_context(project, "cpu", SilentReporter()), "s1-r1").entered
    before = entered(project)
    assert ingest_later(project, "s1-r2", block_slide.truth_path).pass_model == "s1-r2"
    killer = Watcher(project, "other", 2, kill)
    killer.start()
    try:
        labels = project.batch_dir("s1-r2") / "labels.csv"
        result = cli("ingest", project.root, labels, "--cluster", scheduler, code=1)
    finally:
        killer.stop.set()
    assert len(killer.pids) == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    line = " ".join(errors[0].split())
    assert "the full pass of model s1-r2 failed on the cluster for 1 slide(s), 2 tries each: other (its worker" in line
    assert "nothing was entered" in line
    assert state(project)["model"] == "s1-r2" and state(project)["predictions"] == "s1-r1"
    after = entered(project)
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[1], before[1])
    assert not list(project.pass_dir().glob("*.npy")) and not list(project.pass_attempts_dir().glob("*"))
    assert "from model s1-r1, not the current s1-r2" in cli("status", project.root).output


def test_the_review_desk_runs_its_pass_on_the_cluster(ingested, block_slide, scheduler, tmp_path):
    from wsi_il.desk.desk import Desk
    from wsi_il.measure.truth import fill_labels_from_truth

    project = copy_project(ingested, tmp_path / "p")
    assert run_pass(open_context(project, "cpu", SilentReporter()), "s1-r1").entered
    seen: set[str] = set()
    looking = threading.Event()

    def look() -> None:
        while not looking.is_set():
            seen.update(folder.name for folder in project.pass_attempts_dir().glob("*"))
            time.sleep(0.002)

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    desk = Desk(project.root, "cpu", prepare_ahead=False, cluster=scheduler, cluster_device="cpu")
    try:
        fill_labels_from_truth(project.batch_dir("s1-r2"), block_slide.truth_path)
        assert desk.submit("s1-r2")["pass"] == {"state": "running", "model": "s1-r2"}
        deadline = time.monotonic() + 120
        while desk.overview()["pass"]["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert desk.overview()["pass"]["state"] == "done", desk.overview()["pass"]
    finally:
        desk.close()
        looking.set()
    assert {name.split(".")[1] for name in seen} == set(slide_rows(project))  # each slide's rows on a worker
    assert state(project)["embeddings"] == state(project)["predictions"] == "s1-r2"
    here = pass_here_after_reset(project, "s1-r2")
    ours = entered(project)
    assert np.array_equal(ours[0], here[0]) and np.array_equal(ours[1], here[1])


def pass_here_after_reset(project: Project, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays the pass of ``model_id`` computes here, on a copy of ``project`` whose cached arrays are dropped."""
    copy = copy_project(project.root, project.root.with_name(f"{project.root.name}-again"))
    copy.write_json(copy.state_path(), {**state(copy), "embeddings": None, "predictions": None})
    assert run_pass(open_context(copy, "cpu", SilentReporter()), model_id).entered
    return copy.read_array(copy.embeddings_path()), copy.read_array(copy.predictions_path())
