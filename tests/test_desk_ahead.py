"""Rounds prepared ahead (``wsi_il.desk.ahead``): while the last patch of a batch is unanswered the desk runs the
round for its likely answers on a shadow of the project; the submit that matches puts that round in place, and
the project ends exactly as a plain ingest of the same labels leaves it. A project changed meanwhile, or an
answer nobody prepared, falls back to the plain ingest; nothing of a shadow is left behind."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_e2e import run
from test_desk_server import base_project, truth_answers  # noqa: F401 (base_project: a fixture)

from wsi_il.batch import read_batch
from wsi_il.desk.ahead import AHEAD_DIR, fingerprint, likely_answers
from wsi_il.desk.desk import Desk
from wsi_il.project import Project

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture()
def desk_project(base_project, tmp_path):  # noqa: F811
    target = tmp_path / "cmu"
    shutil.copytree(base_project, target)
    return target


def wait_prepared(desk: Desk, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while desk.ahead.prepared_rounds < count:
        assert time.monotonic() < deadline, "no round was prepared in time"
        time.sleep(0.2)


def answers_in_order(root: Path, batch: str) -> list[tuple[str, str]]:
    return list(truth_answers(root, batch).items())


def without_times(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "time"} for e in entries]


def session_core(root: Path) -> dict:
    session = json.loads((root / "sessions" / "s1.json").read_text())
    for entry in session["history"]:
        for key in ("written", "ingested", "train_seconds", "pass_seconds", "batch_seconds", "round_seconds"):
            entry.pop(key, None)
    return session


def tensors(data: dict, prefix: str = "") -> dict:
    """Every tensor of a model file, by its path of keys."""
    found = {}
    for key, value in data.items():
        if isinstance(value, dict):
            found.update(tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            found[prefix + key] = value
    return found


def assert_same_round(prepared: Path, plain: Path) -> None:
    """The two projects hold the same labels, model, embeddings, predictions, session and next batch."""
    ledger = [json.loads(x) for x in (prepared / "labels.jsonl").read_text().splitlines()]
    other = [json.loads(x) for x in (plain / "labels.jsonl").read_text().splitlines()]
    assert without_times(ledger) == without_times(other)
    assert session_core(prepared) == session_core(plain)
    for name in ("embeddings.npy", "predictions.npy"):
        found = list(prepared.rglob(name))
        assert found, name
        for path in found:
            assert np.array_equal(np.load(path), np.load(plain / path.relative_to(prepared))), name
    models = sorted(p.relative_to(prepared) for p in (prepared / "models").glob("*.pt"))
    assert models == sorted(p.relative_to(plain) for p in (plain / "models").glob("*.pt"))
    for model in models:
        a = tensors(torch.load(prepared / model, weights_only=True))
        b = tensors(torch.load(plain / model, weights_only=True))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
    assert [p.patch_id for p in read_batch(prepared / "batches" / "s1-r2")[1]] == [
        p.patch_id for p in read_batch(plain / "batches" / "s1-r2")[1]
    ]
    assert not (prepared / AHEAD_DIR).exists() or not any((prepared / AHEAD_DIR).iterdir())


def test_the_likely_answers_start_with_the_suggestion():
    assert likely_answers(["Tumor", "Normal"], "Tumor", "Normal") == ["Normal", "Tumor"]
    assert likely_answers(["Tumor", "Normal"], "Tumor", None) == ["Tumor", "Normal"]
    assert likely_answers(["A", "B", "C"], "B", "B") == ["B", "A"]


def test_a_prepared_round_is_the_round_ingest_computes(desk_project, tmp_path):
    project = desk_project
    plain = tmp_path / "plain"
    shutil.copytree(project, plain)
    answers = answers_in_order(project, "s1-r1")
    desk = Desk(project, "cpu")
    try:
        desk.answer("s1-r1", answers[:-1])  # one patch left: the rounds for its two answers are prepared
        wait_prepared(desk, 2)
        assert len(list((project / AHEAD_DIR).iterdir())) == 2
        assert not (project / "labels.jsonl").exists()  # nothing of the project itself was written
        desk.answer("s1-r1", answers[-1:])
        started = time.perf_counter()
        result = desk.submit("s1-r1")
        assert result["prepared_ahead"] is True and result["next_batch"] == "s1-r2"
        assert time.perf_counter() - started < 5
    finally:
        desk.close()
    other = Desk(plain, "cpu", prepare_ahead=False)
    other.answer("s1-r1", answers)
    assert other.submit("s1-r1")["prepared_ahead"] is False
    assert_same_round(project, plain)
    status = json.loads(run("status", project, "--json"))
    assert status["sessions"][0]["round"] == 2 and status["n_labels"] == len(answers)


def test_a_project_changed_meanwhile_gets_the_round_computed_again(desk_project, tmp_path):
    project = desk_project
    answers = answers_in_order(project, "s1-r1")
    desk = Desk(project, "cpu")
    try:
        desk.answer("s1-r1", answers)  # every answer given: that round is prepared
        wait_prepared(desk, 1)
        before = fingerprint(Project(project))
        run("end", project)  # another command changes the project: the session ends
        assert fingerprint(Project(project)) != before
        with pytest.raises(Exception) as refused:  # ingest's own refusal, not a stale round put in place
            desk.submit("s1-r1")
        assert "not the batch session s1 waits for" in str(refused.value)
        assert not (project / "labels.jsonl").exists()
    finally:
        desk.close()
    assert not (project / AHEAD_DIR).exists() or not any((project / AHEAD_DIR).iterdir())


def test_an_answer_nobody_prepared_falls_back_to_ingest(desk_project, tmp_path):
    project = desk_project
    plain = tmp_path / "plain"
    shutil.copytree(project, plain)
    answers = answers_in_order(project, "s1-r1")
    last = (answers[-1][0], "skip")  # neither the suggestion nor a class: not prepared
    desk = Desk(project, "cpu")
    try:
        desk.answer("s1-r1", answers[:-1])
        wait_prepared(desk, 2)
        desk.answer("s1-r1", [last])
        result = desk.submit("s1-r1")
        assert result["next_batch"] == "s1-r2"
    finally:
        desk.close()
    other = Desk(plain, "cpu", prepare_ahead=False)
    other.answer("s1-r1", [*answers[:-1], last])
    other.submit("s1-r1")
    assert_same_round(project, plain)


def test_a_commit_cut_short_is_finished_by_submitting_again(desk_project, tmp_path, monkeypatch):
    project = desk_project
    plain = tmp_path / "plain"
    shutil.copytree(project, plain)
    answers = answers_in_order(project, "s1-r1")
    desk = Desk(project, "cpu")
    real_replace = os.replace

    def killed_before_the_session_file(source, target):  # the kill: everything moved in but the session file
        if Path(source).parent.name == "sessions":
            raise KeyboardInterrupt("killed")
        real_replace(source, target)

    try:
        desk.answer("s1-r1", answers)
        wait_prepared(desk, 1)
        monkeypatch.setattr("wsi_il.desk.ahead.os.replace", killed_before_the_session_file)
        with pytest.raises(KeyboardInterrupt):
            desk.submit("s1-r1")
        monkeypatch.undo()
        assert (project / "labels.jsonl").exists() and session_core(project)["round"] == 1
    finally:
        desk.close()
    again = Desk(project, "cpu", prepare_ahead=False)  # a new desk after the kill: the plain ingest finishes it
    assert again.submit("s1-r1")["next_batch"] == "s1-r2"
    other = Desk(plain, "cpu", prepare_ahead=False)
    other.answer("s1-r1", answers)
    other.submit("s1-r1")
    assert_same_round(project, plain)
