"""An `init` killed while it caches features resumes, and ends with the same features as an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_il.cli import app

runner = CliRunner()
SETTINGS = ("--tile-size", "128", "--batch-size", "8", "--weights", "random", "--device", "cpu")


def init_args(project: Path, slide: Path) -> list[str]:
    return ["init", str(project), "--slide", str(slide), *SETTINGS]


def run_init(project: Path, slide: Path):
    result = runner.invoke(app, init_args(project, slide), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kill_during_features(project: Path, slide: Path, deadline_s: float = 120.0) -> tuple[int, int, int]:
    """Run `wsi-il init` in a subprocess and SIGKILL it once some but not all candidate tiles are done (each is
    read once: the pixel rule, then the features of the tissue tiles).

    Returns (pid, done, n_candidates), or (pid, -1, -1) when the run finished before it could be killed.
    """
    progress_path = project / "slides" / "block" / "progress.json"
    candidates_path = project / "slides" / "block" / "candidates.npy"
    log = project.with_name(project.name + ".log")
    with open(log, "wb") as handle:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(
            [sys.executable, "-m", "wsi_il", *init_args(project, slide)], stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        started = time.monotonic()
        while time.monotonic() - started < deadline_s:
            if process.poll() is not None:
                break
            progress = read_json(progress_path)
            if progress and candidates_path.is_file():
                n_candidates, done = len(np.load(candidates_path)), progress["done"]
                if 0 < done < n_candidates:
                    process.send_signal(signal.SIGKILL)
                    process.wait()  # reap it, so that its pid names no process any more
                    return process.pid, done, n_candidates
            time.sleep(0.02)
        else:
            pytest.fail(f"wsi-il init did not reach the feature stage within {deadline_s:.0f} s")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, f"init failed before it could be killed: {output[-2000:]}"
    return process.pid, -1, -1


@pytest.fixture(scope="module")
def reference(block_slide, tmp_path_factory) -> Path:
    """A project made by one uninterrupted init."""
    project = tmp_path_factory.mktemp("reference") / "project"
    run_init(project, block_slide.path)
    return project


def test_killed_init_resumes_with_identical_features(block_slide, reference, tmp_path):
    for attempt in range(3):
        project = tmp_path / f"killed-{attempt}"
        pid, done, n_candidates = kill_during_features(project, block_slide.path)
        if done > 0:
            break
    else:
        pytest.fail("init finished each of 3 times before it could be killed mid-features")

    lock = read_json(project / "lock")
    assert lock is not None and lock["pid"] == pid, "SIGKILL should leave the lock of the killed run behind"
    manifest = json.loads((project / "project.json").read_text())
    assert not manifest["slides"][0]["extracted"] and not manifest["slides"][0]["tiled"]
    slide_dir = project / "slides" / "block"
    partial = np.load(slide_dir / "features.npy")
    kept = int(np.count_nonzero(np.load(slide_dir / "tissue.npy")[:done] == 1))
    assert partial.shape[0] == n_candidates and done % 8 == 0 and kept > 0
    assert np.abs(partial[:kept].astype(np.float32)).sum() > 0  # the finished batches were kept on disk

    result = run_init(project, block_slide.path)  # the stale lock does not block it
    assert "resuming" in result.output
    assert not (project / "lock").exists()
    assert read_json(slide_dir / "progress.json") == {"done": n_candidates}

    want = reference / "slides" / "block"
    features, expected = np.load(slide_dir / "features.npy"), np.load(want / "features.npy")
    n_patches = json.loads((project / "project.json").read_text())["slides"][0]["n_patches"]
    assert features.dtype == np.float16 and features.shape == expected.shape == (n_patches, 512, 7, 7)
    assert np.array_equal(features[:kept], partial[:kept]), "resuming rewrote finished batches differently"
    assert np.array_equal(features, expected)
    assert np.array_equal(np.load(slide_dir / "patches.npy"), np.load(want / "patches.npy"))
    resumed = json.loads((project / "project.json").read_text())
    assert resumed["normalisation"] == json.loads((reference / "project.json").read_text())["normalisation"]
    assert resumed["slides"][0]["extracted"] and resumed["slides"][0]["tiled"]
    assert (project / "models" / "init.pt").is_file()


def test_init_again_on_a_complete_project_changes_nothing(block_slide, reference, tmp_path):
    project = tmp_path / "again"
    shutil.copytree(reference, project)
    files = (
        "project.json",
        "slides/block/features.npy",
        "slides/block/patches.npy",
        "slides/block/candidates.npy",
        "slides/block/tissue.npy",
        "slides/block/progress.json",
        "models/init.pt",
    )
    before = {name: (project / name).read_bytes() for name in files}
    result = run_init(project, block_slide.path)
    assert "resuming" in result.output and "ready" in result.output
    for name in files:
        assert (project / name).read_bytes() == before[name], f"{name} changed"
    assert not (project / "lock").exists()
