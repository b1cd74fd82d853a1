"""Pooled rounds (wsi_il.pool, session): a round that re-embeds and ranks only a bounded pool of candidates, the
full pass after the batch, the setting in old and new manifests, and the frozen embedding's search index."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_il.batch import read_batch
from wsi_il.cli import app
from wsi_il.config import POOL_ABOVE, RoundSettings, SessionSettings, round_is_pooled, settings_of, to_dict
from wsi_il.events import SilentReporter
from wsi_il.measure.truth import fill_labels_from_truth
from wsi_il.model import model_state, open_context
from wsi_il.project import Project
from wsi_il.session import ingest, start_session

runner = CliRunner()
POOL = 30
"""Pool size of the pooled project: about a third of the slide's 96 tissue patches."""
POOL_TITLE = "re-embedding the candidate pool"
PASS_TITLE = "re-embedding and predicting"


class RecordingReporter(SilentReporter):
    """A reporter that records each progress task (title, total) and can stop the work when a task starts."""

    def __init__(self, stop_in: str | None = None) -> None:
        super().__init__()
        self.tasks: list[tuple[str, int]] = []
        self.stop_in = stop_in

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        self.tasks.append((description, total))
        stop = self.stop_in is not None and description.startswith(self.stop_in)

        def advance(amount: int) -> None:
            if stop:  # the process dies inside the pass, after its first block
                raise KeyboardInterrupt

        return advance


def pooled_project(block_slide, project: Path) -> Path:
    """A project of the block slide (128 px tiles: 96 tissue patches) made with `init --round pool`."""
    args = ["init", project, "--slide", block_slide.path, "--tile-size", "128", "--weights", "random"]
    args += ["--epochs", "2", "--device", "cpu", "--round", "pool", "--pool-size", str(POOL)]
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return project


@pytest.fixture(scope="module")
def base(block_slide, tmp_path_factory) -> Path:
    return pooled_project(block_slide, tmp_path_factory.mktemp("pool") / "base")


def copy_project(base: Path, target: Path, **round_settings) -> Project:
    shutil.copytree(base, target)
    project = Project(target)
    if round_settings:
        manifest = project.read_manifest()
        manifest["round"] = to_dict(RoundSettings(**round_settings))
        project.write_manifest(manifest)
    return project


def query_indices(ctx, block_slide) -> np.ndarray:
    """Four tumour patches in the block's corner."""
    x0, y0, _, _ = block_slide.tumour.bounds
    boxes = ctx.table.boxes
    inside = (boxes[:, 0] >= x0) & (boxes[:, 0] < x0 + 256) & (boxes[:, 1] >= y0) & (boxes[:, 1] < y0 + 256)
    return np.flatnonzero(inside)


def batch_ids(project: Project, batch: str) -> list[str]:
    return [p.patch_id for p in read_batch(project.batch_dir(batch))[1]]


def label_and_ingest(project: Project, batch: str, truth: Path, reporter=None):
    folder = project.batch_dir(batch)
    fill_labels_from_truth(folder, truth)
    ctx = open_context(project, "cpu", reporter or SilentReporter())
    return ingest(ctx, folder / "labels.csv")


def test_pooled_round_embeds_only_the_pool_and_runs_the_full_pass_after_the_batch(base, block_slide, tmp_path):
    project = copy_project(base, tmp_path / "p")
    assert settings_of(project.read_manifest()).round == RoundSettings("pool", POOL)
    reporter = RecordingReporter()
    ctx = open_context(project, "cpu", reporter)
    n = len(ctx.table)
    query = query_indices(ctx, block_slide)
    start_session(ctx, "Tumor", SessionSettings("cnfp", 4, 3), query_indices=query)
    assert (POOL_TITLE, POOL) in reporter.tasks
    assert not any(title.startswith(PASS_TITLE) for title, _ in reporter.tasks)  # no pass over the database
    first = project.read_json(project.session_path("s1"))["history"][0]
    assert first["pool"]["size"] == POOL and first["candidates"] == n - len(query)

    seen_while_passing: list[bool] = []

    class Watching(RecordingReporter):
        def task(self, description: str, total: int, unit: str = "patches"):
            if description.startswith(PASS_TITLE):  # the next batch and the session file are written first
                session = project.read_json(project.session_path("s1"))
                seen_while_passing.append(
                    (project.batch_dir("s1-r2") / "batch.json").is_file() and session["round"] == 2
                )
            return super().task(description, total, unit)

    reporter = Watching()
    result = label_and_ingest(project, "s1-r1", block_slide.truth_path, reporter)
    titles = [title for title, _ in reporter.tasks]
    assert (POOL_TITLE, POOL) in reporter.tasks
    assert seen_while_passing == [True]
    assert titles.index(POOL_TITLE) < max(i for i, t in enumerate(titles) if t.startswith(PASS_TITLE))
    assert result.batch_dir == project.batch_dir("s1-r2")
    chosen = batch_ids(project, "s1-r2")
    assert len(chosen) == 4
    labelled = {e["patch_id"] for e in project.read_ledger()}
    assert not set(chosen) & labelled and not set(chosen) & {ctx.table.ids[i] for i in query}
    entry = project.read_json(project.session_path("s1"))["history"]
    assert entry[1]["pool"]["size"] == POOL and entry[0]["pass_seconds"] >= 0
    positives = [e for e in project.read_ledger() if e["label"] == "Tumor"]
    assert set(entry[1]["pool"]["parts"]) == {"query", "random"} | ({"positives"} if positives else set())
    state = model_state(open_context(project, "cpu", SilentReporter()))
    assert state["model"] == state["predictions"] == state["embeddings"] == "s1-r1"
    predictions = project.read_array(project.predictions_path())
    assert predictions.shape == (n, 2) and np.allclose(predictions.sum(axis=1), 1.0, atol=1e-4)
    frozen = project.read_array(project.frozen_embeddings_path())
    assert frozen.dtype == np.float16 and len(frozen) == n

    label_and_ingest(project, "s1-r2", block_slide.truth_path)  # the last full pass's predictions join the pool
    third = project.read_json(project.session_path("s1"))["history"][2]
    assert third["pool"]["predictions_of"] == "s1-r1" and third["pool"]["parts"]["predicted"] > 0


def test_a_random_batch_is_drawn_from_every_unreviewed_patch_not_only_from_the_pool(base, block_slide, tmp_path):
    project = copy_project(base, tmp_path / "p")
    reporter = RecordingReporter()
    ctx = open_context(project, "cpu", reporter)
    query = query_indices(ctx, block_slide)
    start_session(ctx, "Tumor", SessionSettings("random", 4, 2), query_indices=query)
    embedded = [total for title, total in reporter.tasks if title == POOL_TITLE]
    # The pool holds 30 patches, mostly near the query; the batch's 4 are drawn from all 90-odd unreviewed ones,
    # so some lie outside it and are embedded beside it (for their suggestions and ranks).
    assert len(embedded) == 1 and POOL < embedded[0] <= POOL + 4
    chosen = batch_ids(project, "s1-r1")
    assert len(set(chosen)) == 4 and not set(chosen) & {ctx.table.ids[i] for i in query}
    assert project.read_json(project.session_path("s1"))["history"][0]["rule"] == "random"


def test_a_pool_as_large_as_the_slide_gives_the_exact_rounds_batches(base, block_slide, tmp_path):
    exact = copy_project(base, tmp_path / "exact", round_mode="exact")
    pooled = copy_project(base, tmp_path / "pooled", round_mode="pool", pool_size=10_000)

    for project in (exact, pooled):
        ctx = open_context(project, "cpu", SilentReporter())
        start_session(ctx, "Tumor", SessionSettings("cnfp", 4, 3), query_indices=query_indices(ctx, block_slide))
        label_and_ingest(project, "s1-r1", block_slide.truth_path)
        label_and_ingest(project, "s1-r2", block_slide.truth_path)
    for batch in ("s1-r1", "s1-r2", "s1-r3"):
        assert batch_ids(pooled, batch) == batch_ids(exact, batch)
    history = pooled.read_json(pooled.session_path("s1"))["history"]
    assert [h["pool"]["parts"] for h in history] == [{"all": h["candidates"]} for h in history]
    assert "pool" not in exact.read_json(exact.session_path("s1"))["history"][-1]


def test_an_old_manifest_without_the_setting_reads_as_auto_and_rounds_exactly(base, block_slide, tmp_path):
    project = copy_project(base, tmp_path / "old")
    manifest = project.read_manifest()
    del manifest["round"]
    project.write_manifest(manifest)
    assert "round" not in json.loads(project.manifest_path().read_text())
    settings = settings_of(project.read_manifest()).round
    assert settings == RoundSettings() and settings.round_mode == "auto"
    assert not round_is_pooled(settings, POOL_ABOVE) and round_is_pooled(settings, POOL_ABOVE + 1)
    assert round_is_pooled(RoundSettings("pool"), 10) and not round_is_pooled(RoundSettings("exact"), 10**7)
    reporter = RecordingReporter()
    ctx = open_context(project, "cpu", reporter)

    start_session(ctx, "Tumor", SessionSettings("cnfp", 4, 2), query_indices=query_indices(ctx, block_slide))
    assert "pool" not in project.read_json(project.session_path("s1"))["history"][0]
    assert not any(title == POOL_TITLE for title, _ in reporter.tasks)


def test_a_full_pass_cut_short_is_finished_by_the_same_ingest_run_again(base, block_slide, tmp_path):

    project = copy_project(base, tmp_path / "killed")
    ctx = open_context(project, "cpu", SilentReporter())
    start_session(ctx, "Tumor", SessionSettings("cnfp", 4, 3), query_indices=query_indices(ctx, block_slide))
    with pytest.raises(KeyboardInterrupt):
        label_and_ingest(project, "s1-r1", block_slide.truth_path, RecordingReporter(stop_in=PASS_TITLE))
    # What the pass left: the round is recorded and the next batch written, the cached predictions are not the
    # model's (there were none yet) and nothing half-written is in their place.
    session = project.read_json(project.session_path("s1"))
    assert session["round"] == 2 and (project.batch_dir("s1-r2") / "batch.json").is_file()
    state = project.read_json(project.state_path())
    assert state["model"] == "s1-r1" and state["predictions"] is None and not project.predictions_path().exists()
    status = runner.invoke(app, ["status", str(project.root)], catch_exceptions=False).output
    assert "not the current s1-r1" in status

    reporter = RecordingReporter()
    result = label_and_ingest(project, "s1-r1", block_slide.truth_path, reporter)
    assert "the full pass it left unfinished is done now" in result.message
    assert [title for title, _ in reporter.tasks if title.startswith(PASS_TITLE)]
    state = project.read_json(project.state_path())
    assert state["predictions"] == state["embeddings"] == "s1-r1"
    assert len(project.read_array(project.predictions_path())) == len(ctx.table)
    again = label_and_ingest(project, "s1-r1", block_slide.truth_path)
    assert "nothing changed" in again.message


def test_init_records_the_round_setting_and_refuses_another_one_on_resume(base, tmp_path):
    manifest = json.loads((base / "project.json").read_text())
    assert manifest["round"] == {"round_mode": "pool", "pool_size": POOL}
    project = copy_project(base, tmp_path / "again")
    result = runner.invoke(app, ["init", str(project.root), "--round", "exact"])
    assert result.exit_code != 0 and "--round" in result.output
    result = runner.invoke(
        app, ["init", str(tmp_path / "new"), "--slide", "x.svs", "--weights", "random", "--round", "sometimes"]
    )
    assert result.exit_code != 0 and "--round 'sometimes' is not one of auto, exact, pool" in result.output


def test_the_index_is_exact_up_to_its_size_and_approximate_above(tmp_path):
    from wsi_il.index import build_index, index_bytes, index_from_bytes, is_exact, search_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 64)).astype(np.float32)
    vectors = (centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 64))).astype(np.float16)
    queries = vectors[:5].astype(np.float32)
    exact = build_index(vectors)
    assert is_exact(exact)
    found = search_index(exact, queries, 50)
    distances = np.linalg.norm(vectors.astype(np.float32)[None] - queries[:, None], axis=2)
    truth = np.argsort(distances, axis=1, kind="stable")[:, :50]
    assert all(set(found[i]) == set(truth[i]) for i in range(5))
    approximate = build_index(vectors, flat_up_to=1000)
    assert not is_exact(approximate) and approximate.ntotal == 3000
    restored = index_from_bytes(index_bytes(approximate))
    near = search_index(restored, queries, 300)
    assert (near >= 0).all()  # enough lists probed for every neighbour asked
    recall = np.mean([len(set(truth[i]) & set(near[i])) / 50 for i in range(5)])
    assert recall > 0.9


def test_an_approximate_index_is_saved_once_and_rebuilt_when_the_features_change(base, tmp_path, monkeypatch):
    from wsi_il import index as search
    from wsi_il.pool import frozen_embeddings, frozen_index

    project = copy_project(base, tmp_path / "indexed")
    reporter = RecordingReporter()
    ctx = open_context(project, "cpu", reporter)
    frozen = frozen_embeddings(ctx)
    assert frozen.shape == (len(ctx.table), 512) and frozen.dtype == np.float16
    monkeypatch.setattr(search, "FLAT_UP_TO", 1000)  # the project's 96 patches stand for a large cohort's
    rng = np.random.default_rng(1)
    large = rng.normal(size=(3000, 64)).astype(np.float16)
    built = frozen_index(ctx, large)
    assert not search.is_exact(built) and project.frozen_index_path().is_file()
    saved = project.frozen_index_path().stat().st_mtime_ns
    again = frozen_index(open_context(project, "cpu", SilentReporter()), large)
    assert again.ntotal == 3000 and project.frozen_index_path().stat().st_mtime_ns == saved
    assert sum("building the search index" in s for s in reporter.statuses) == 1
    # New features (a reextract, an added slide) make the frozen embeddings, and so the index, stale.
    features = project.features_path(project.slides()[0].id)
    stat = features.stat()
    os.utime(features, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert frozen_embeddings(open_context(project, "cpu", SilentReporter())).shape == frozen.shape
    assert not project.frozen_index_path().exists()
