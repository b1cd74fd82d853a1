"""Fault injection: `init`, `ingest` and `export` killed (SIGKILL) at many instants, then run again.

Each killed command runs in a subprocess and is killed after a delay spread over the duration of an
unkilled run (over the part that writes, from the moment it takes the project lock; the slow set also kills
during start-up); the rerun must succeed, and the project must then equal one made without a kill: every label
in the ledger exactly once, the session file valid, the next batch complete, the same features, model
outputs and exported files. A few delays run by default, many with `-m slow`. The states a kill can leave
between two writes of `ingest` are also built directly (deterministic) and checked.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_trust_support import (
    CPU,
    cli,
    copy_project,
    fill,
    ingested_project,
    ledger,
    rows,
    session_project,
    snapshot,
)

INIT_ARGS = ("--tile-size", "128", "--batch-size", "4", "--weights", "random", "--epochs", "2", *CPU)
FAST = {"init": (0.3, 0.7), "ingest": (0.3, 0.8), "export": (0.4, 0.9)}
"""Where the default run kills, as a fraction of the time from taking the lock to the end."""
SLOW = {"init": 14, "ingest": 16, "export": 10}
_VOLATILE = {
    "created",
    "written",
    "ingested",
    "seconds",
    "train_seconds",
    "pass_seconds",
    "batch_seconds",
    "round_seconds",
    "time",
}
BATCH_FILES = ("labels.csv", "contact_sheet.png", "batch.geojson", "README.txt", "batch.json")


def delays(command: str, timing: tuple[float, float], slow: bool) -> list[float]:
    """Kill delays: fractions of the writing part of an unkilled run (negative: during start-up)."""
    total, locked = timing
    spread = np.linspace(-0.15, 0.98, SLOW[command]) if slow else FAST[command]
    return [round(locked + f * (total - locked), 3) for f in spread]


def timed_run(args: list[str], lock: Path, log: Path) -> tuple[float, float]:
    """Run `python -m wsi_il ARGS` to the end; return its duration and when it took the project lock."""
    started = time.monotonic()
    locked = None
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "wsi_il", *args], stdout=handle, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if locked is None and lock.exists():
                locked = time.monotonic() - started
            time.sleep(0.005)
    total = time.monotonic() - started
    assert process.returncode == 0, log.read_text(errors="replace")[-2000:]
    return total, locked if locked is not None else total / 2


def kill_after(args: list[str], delay_s: float, log: Path) -> bool:
    """Start `python -m wsi_il ARGS`, SIGKILL it after ``delay_s``; return False when it had finished."""
    with open(log, "wb") as handle:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen([sys.executable, "-m", "wsi_il", *args], stdout=handle, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=delay_s)
        assert process.returncode == 0, log.read_text(errors="replace")[-2000:]
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()  # reaped: its pid names no process any more, so its lock is stale
        return True


def without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def same_output(got: Path, want: Path) -> bool:
    """Compare two written files; GeoJSON parsed, without the Features' ids (fresh UUIDs on every write)."""
    if got.suffix != ".geojson":
        return got.read_bytes() == want.read_bytes()

    def parsed(path: Path) -> Any:
        data = json.loads(path.read_text())
        return [{k: v for k, v in f.items() if k != "id"} for f in data["features"]]

    return parsed(got) == parsed(want)


def describe(project: Path) -> str:
    """What a kill left: for the fault table printed with `pytest -s`."""
    if not project.is_dir():
        return "no project folder"
    manifest = project / "project.json"
    if not manifest.is_file():
        return f"folder only: {sorted(p.name for p in project.iterdir())}"
    slides = json.loads(manifest.read_text())["slides"]
    progress = project / "slides" / "block" / "progress.json"
    done = json.loads(progress.read_text())["done"] if progress.is_file() else 0
    batch = project / "batches" / "s1-r2"
    state = "complete" if (batch / "batch.json").is_file() else "partial" if batch.is_dir() else "absent"
    return (
        f"tiled={slides[0]['tiled']} features {done}/{slides[0]['n_patches']} extracted={slides[0]['extracted']}"
        f" lock={'left' if (project / 'lock').exists() else 'none'} ledger={len(ledger(project))}"
        f" next-batch={state} temporaries={len(list(project.rglob('.*.tmp')))}"
    )


def assert_clean(project: Path) -> None:
    """No lock and no temporary file is left after a command finished."""
    assert not (project / "lock").exists()
    leftovers = [p.name for p in project.rglob("*") if p.name.endswith((".tmp", ".claim"))]
    assert not leftovers, leftovers


def assert_batch_complete(batch: Path) -> None:
    """batch.json present => every file of the batch is there and nothing else."""
    if not (batch / "batch.json").is_file():
        return
    document = json.loads((batch / "batch.json").read_text())
    images = {f"{n:02d}_{p['patch_id']}.png" for n, p in enumerate(document["patches"], start=1)}
    present = {p.name for p in batch.iterdir()}
    assert set(BATCH_FILES) | images == present, present ^ (set(BATCH_FILES) | images)


# ---- init ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def init_reference(block_slide, tmp_path_factory) -> tuple[Path, tuple[float, float]]:
    """A project made by one unkilled `init` in a subprocess, and its timing."""
    folder = tmp_path_factory.mktemp("init-reference")
    project = folder / "p"
    timing = timed_run(
        ["init", str(project), "--slide", str(block_slide.path), *INIT_ARGS], project / "lock", folder / "log"
    )
    return project, timing


def check_init_kills(init_reference, block_slide, tmp_path: Path, slow: bool) -> None:
    reference, timing = init_reference
    for delay in delays("init", timing, slow):
        project = tmp_path / f"killed-{delay}"
        args = ["init", str(project), "--slide", str(block_slide.path), *INIT_ARGS]
        killed = kill_after(args, delay, tmp_path / f"log-{delay}")
        print(
            f"TRUST-FAULT | init killed={killed} at {delay:.2f} s of {timing[0]:.1f} s (lock at {timing[1]:.1f} s)"
            f" | {describe(project)}"
        )
        cli(*args)
        assert_clean(project)
        manifest = json.loads((project / "project.json").read_text())
        expected = json.loads((reference / "project.json").read_text())
        for key in ("slides", "normalisation", "tiling", "features", "train", "classes"):
            assert manifest[key] == expected[key], (delay, key)
        for name in ("features.npy", "patches.npy", "progress.json", "candidates.npy", "tissue.npy"):
            got, want = project / "slides" / "block" / name, reference / "slides" / "block" / name
            assert got.read_bytes() == want.read_bytes(), (delay, name)
        import torch

        got, want = (torch.load(p / "models" / "init.pt", weights_only=True) for p in (project, reference))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), delay


def test_init_killed_at_several_instants_resumes_to_the_same_project(init_reference, block_slide, tmp_path):
    check_init_kills(init_reference, block_slide, tmp_path, slow=False)


@pytest.mark.slow
def test_init_killed_at_many_instants(init_reference, block_slide, tmp_path):
    check_init_kills(init_reference, block_slide, tmp_path, slow=True)


# ---- ingest --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingest_base(block_slide, tmp_path_factory) -> Path:
    """A project whose batch s1-r1 is filled and waits to be ingested (do not change it: copy it)."""
    return session_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path)


@pytest.fixture(scope="module")
def ingest_reference(ingest_base, tmp_path_factory) -> tuple[Path, tuple[float, float]]:
    """The project after one unkilled ingest, and how long an unkilled ingest takes in a subprocess."""
    folder = tmp_path_factory.mktemp("ingest-reference")
    reference = copy_project(ingest_base, folder / "reference")
    cli("ingest", reference, reference / "batches" / "s1-r1" / "labels.csv", *CPU)
    timed = copy_project(ingest_base, folder / "timed")
    timing = timed_run(
        ["ingest", str(timed), str(timed / "batches" / "s1-r1" / "labels.csv"), *CPU], timed / "lock", folder / "log"
    )
    assert_same_round(timed, reference)  # an unkilled run in another process gives the same round
    return reference, timing


def assert_same_round(project: Path, reference: Path) -> None:
    """The project holds exactly the round the reference holds: labels once, session, next batch, model."""
    entries, expected = ledger(project), ledger(reference)
    assert [without_volatile(e) for e in entries] == [without_volatile(e) for e in expected]
    ids = [e["patch_id"] for e in entries]
    assert len(ids) == len(set(ids)), "a label was recorded twice"
    session = json.loads((project / "sessions" / "s1.json").read_text())
    assert without_volatile(session) == without_volatile(json.loads((reference / "sessions" / "s1.json").read_text()))
    batch, want = project / "batches" / "s1-r2", reference / "batches" / "s1-r2"
    assert_batch_complete(batch)
    for name in ("labels.csv", "batch.json", "batch.geojson"):
        assert same_output(batch / name, want / name), name
    readme = (batch / "README.txt").read_text().replace(str(project), "PROJECT")
    assert readme == (want / "README.txt").read_text().replace(str(reference), "PROJECT")
    for name in ("predictions.npy", "embeddings.npy"):
        assert np.array_equal(np.load(project / "state" / name), np.load(reference / "state" / name)), name
    assert_clean(project)


def check_ingest_kills(ingest_base, ingest_reference, tmp_path: Path, slow: bool) -> None:
    reference, timing = ingest_reference
    for delay in delays("ingest", timing, slow):
        project = copy_project(ingest_base, tmp_path / f"killed-{delay}")
        labels = project / "batches" / "s1-r1" / "labels.csv"
        killed = kill_after(["ingest", str(project), str(labels), *CPU], delay, tmp_path / f"log-{delay}")
        session = json.loads((project / "sessions" / "s1.json").read_text())  # never torn
        assert_batch_complete(project / "batches" / "s1-r2")
        print(
            f"TRUST-FAULT | ingest killed={killed} at {delay:.2f} s of {timing[0]:.1f} s (lock at {timing[1]:.1f}"
            f" s) | {describe(project)} | session round {session['round']}"
        )
        status = json.loads(cli("status", project, "--json").stdout)  # readable in any state, despite the lock
        assert status["n_labels"] in (0, 4)
        output = cli("ingest", project, labels, *CPU).output
        assert "labels recorded" in output or "already ingested" in output
        assert_same_round(project, reference)
        assert "already ingested" in cli("ingest", project, labels, *CPU).output


def test_ingest_killed_at_several_instants_completes_the_round(ingest_base, ingest_reference, tmp_path):
    check_ingest_kills(ingest_base, ingest_reference, tmp_path, slow=False)


@pytest.mark.slow
def test_ingest_killed_at_many_instants(ingest_base, ingest_reference, tmp_path):
    check_ingest_kills(ingest_base, ingest_reference, tmp_path, slow=True)


# ---- the states a kill leaves between the writes of ingest, built directly -------------------------


def _labels(project: Path) -> dict[str, str]:
    from wsi_il.batch import read_batch
    from wsi_il.labels import read_labels

    batch = project / "batches" / "s1-r1"
    info, patches = read_batch(batch)
    return read_labels(batch / "labels.csv", info, patches)


def _entries(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "patch_id": pid,
            "label": label,
            "batch": "s1-r1",
            "session": "s1",
            "round": 1,
            "time": "2025-01-01T00:00:00+00:00",
        }
        for pid, label in labels.items()
    ]


def test_killed_after_the_labels_were_recorded_the_rerun_finishes_the_round(ingest_base, ingest_reference, tmp_path):
    from wsi_il.project import Project

    project = copy_project(ingest_base, tmp_path / "p")
    Project(project).append_ledger(_entries(_labels(project)))  # durable; the session was not advanced
    assert "4 labels recorded" in cli("ingest", project, project / "batches" / "s1-r1" / "labels.csv", *CPU).output
    assert_same_round(project, ingest_reference[0])


def test_killed_in_the_middle_of_the_append_the_rerun_completes_it(ingest_base, ingest_reference, tmp_path):
    project = copy_project(ingest_base, tmp_path / "p")
    lines = [json.dumps(e, sort_keys=True) + "\n" for e in _entries(_labels(project))]
    (project / "labels.jsonl").write_text(lines[0] + lines[1] + lines[2][:25])  # two entries and a torn third
    cli("ingest", project, project / "batches" / "s1-r1" / "labels.csv", *CPU)
    assert_same_round(project, ingest_reference[0])


def test_labels_changed_after_a_killed_ingest_are_refused(ingest_base, tmp_path):
    project = copy_project(ingest_base, tmp_path / "p")
    labels = _labels(project)
    (project / "labels.jsonl").write_text(json.dumps(_entries(labels)[0], sort_keys=True) + "\n")
    records = rows(project / "batches" / "s1-r1")
    flipped = {"Tumor": "Normal", "Normal": "Tumor"}[labels[records[0]["patch_id"]]]
    fill(project / "batches" / "s1-r1", [flipped, *[labels[r["patch_id"]] for r in records[1:]]])
    before = snapshot(project)
    result = cli("ingest", project, project / "batches" / "s1-r1" / "labels.csv", *CPU, code=4)
    assert "recorded by an ingest that did not finish" in result.output and records[0]["patch_id"] in result.output
    assert snapshot(project) == before


def test_a_half_written_next_batch_is_overwritten_cleanly(ingest_base, ingest_reference, tmp_path):
    project = copy_project(ingest_base, tmp_path / "p")
    half = project / "batches" / "s1-r2"
    half.mkdir(parents=True)
    (half / "07_block_x0_y0.png").write_bytes(b"\x89PNG half")  # another patch, from a run killed mid-batch
    (half / "contact_sheet.png").write_bytes(b"\x89PNG torn")
    (half / ".labels.csv.x1y2z3.tmp").write_text("n,patch_id")
    cli("ingest", project, project / "batches" / "s1-r1" / "labels.csv", *CPU)
    assert not (half / "07_block_x0_y0.png").exists()
    assert_same_round(project, ingest_reference[0])


def test_killed_after_the_next_batch_was_written_keeps_labels_already_filled(ingest_base, ingest_reference, tmp_path):
    reference = ingest_reference[0]
    project = copy_project(reference, tmp_path / "p")
    shutil.copy(ingest_base / "sessions" / "s1.json", project / "sessions" / "s1.json")  # not advanced
    filled = fill(project / "batches" / "s1-r2", ["no", "skip", "", ""])  # the expert did not wait
    cli("ingest", project, project / "batches" / "s1-r1" / "labels.csv", *CPU)
    assert [r["label"] for r in rows(project / "batches" / "s1-r2")] == [r["label"] for r in filled]
    session = json.loads((project / "sessions" / "s1.json").read_text())
    assert without_volatile(session) == without_volatile(json.loads((reference / "sessions" / "s1.json").read_text()))
    assert [without_volatile(e) for e in ledger(project)] == [without_volatile(e) for e in ledger(reference)]


def test_warm_start_rerun_starts_from_the_previous_round_not_its_own(ingest_base, block_slide, tmp_path):
    from wsi_il.measure.truth import fill_labels_from_truth

    middle = copy_project(ingest_base, tmp_path / "middle")
    manifest = json.loads((middle / "project.json").read_text())
    manifest["train"]["warm_start"] = True  # a training setting: not protected, may be changed
    (middle / "project.json").write_text(json.dumps(manifest))
    cli("ingest", middle, middle / "batches" / "s1-r1" / "labels.csv", *CPU)
    fill_labels_from_truth(middle / "batches" / "s1-r2", block_slide.truth_path)
    reference = copy_project(middle, tmp_path / "reference")
    cli("ingest", reference, reference / "batches" / "s1-r2" / "labels.csv", *CPU)

    project = copy_project(middle, tmp_path / "p")
    cli("ingest", project, project / "batches" / "s1-r2" / "labels.csv", *CPU)
    # killed just before the session file was written: model s1-r2 is current, the session still waits for r2
    shutil.copy(middle / "sessions" / "s1.json", project / "sessions" / "s1.json")
    cli("ingest", project, project / "batches" / "s1-r2" / "labels.csv", *CPU)
    assert json.loads((project / "state" / "state.json").read_text())["previous"] == "s1-r1"
    assert np.array_equal(
        np.load(project / "state" / "predictions.npy"), np.load(reference / "state" / "predictions.npy")
    )
    assert [without_volatile(e) for e in ledger(project)] == [without_volatile(e) for e in ledger(reference)]


# ---- export --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_base(block_slide, tmp_path_factory) -> Path:
    return ingested_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path)


@pytest.fixture(scope="module")
def export_reference(export_base, tmp_path_factory) -> tuple[Path, tuple[float, float]]:
    folder = tmp_path_factory.mktemp("export-reference")
    project = copy_project(export_base, folder / "p")
    cli("export", project, "--out", folder / "out" / "mask.geojson", "--detections")
    timing = timed_run(
        ["export", str(project), "--out", str(folder / "timed" / "mask.geojson"), "--detections"],
        project / "lock",
        folder / "log",
    )
    for name in ("mask.geojson", "mask.png"):
        assert same_output(folder / "timed" / name, folder / "out" / name), name
    return folder / "out", timing


def check_export_kills(export_base, export_reference, tmp_path: Path, slow: bool) -> None:
    reference, timing = export_reference
    project = copy_project(export_base, tmp_path / "p")
    before = snapshot(project)
    for delay in delays("export", timing, slow):
        out = tmp_path / f"out-{delay}"
        args = ["export", str(project), "--out", str(out / "mask.geojson"), "--detections"]
        killed = kill_after(args, delay, tmp_path / f"log-{delay}")
        print(
            f"TRUST-FAULT | export killed={killed} at {delay:.2f} s of {timing[0]:.1f} s (lock at {timing[1]:.1f}"
            f" s) | written: {sorted(p.name for p in out.iterdir()) if out.is_dir() else []}"
        )
        for name in ("mask.geojson", "mask.png"):  # whatever is there is whole: written aside, then renamed
            if (out / name).exists():
                assert same_output(out / name, reference / name), (delay, name)
        cli(*args)
        for name in ("mask.geojson", "mask.png"):
            assert same_output(out / name, reference / name), (delay, name)
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mask.geojson", "mask.png"]
        assert snapshot(project) == before, delay  # export changes nothing in the project


def test_export_killed_at_several_instants(export_base, export_reference, tmp_path):
    check_export_kills(export_base, export_reference, tmp_path, slow=False)


@pytest.mark.slow
def test_export_killed_at_many_instants(export_base, export_reference, tmp_path):
    check_export_kills(export_base, export_reference, tmp_path, slow=True)
