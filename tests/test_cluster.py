"""Extraction on a real Dask cluster (two worker processes started on 127.0.0.1 by the tests, stopped after):
the same features as on one machine, bit for bit; a worker killed mid-slide is retried and nothing half-written
is entered; a slide that fails twice is left out and named, and the others finish."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_trust_support import cli, error_line

from wsi_il.measure.mosaic import make_block_slide
from wsi_il.project import Project

pytest.importorskip("distributed", reason="the cluster extra is not installed (pip install -e '.[test]')")

TILE = 128
SLIDES = 3


@pytest.fixture(scope="module")
def cohort(dense_pcam, tmp_path_factory) -> Path:
    """A folder of three small slides of real tissue (1024 x 768 px: 48 candidate tiles of 128 px each)."""
    from wsi_il.measure.mosaic import PCAM_MPP

    folder = tmp_path_factory.mktemp("cohort")
    tumour, normal = dense_pcam
    for n in range(SLIDES):
        make_block_slide(
            folder / f"s{n}.tiff",
            tumour,
            normal,
            size_px=(1024, 768),
            block=(256, 256, 512, 512),
            mpp=PCAM_MPP,
            seed=10 + n,
            piece_px=96,
            background_margin_px=128,
        )
    return folder


@pytest.fixture(scope="module")
def scheduler():
    """The address of a local Dask cluster of two worker processes, as ``--cluster local:2`` starts one."""
    from wsi_il.cluster import ClusterSpec, connect

    with connect(ClusterSpec(local_workers=2)) as client:
        yield client.scheduler.address


def _init(project: Path, *slides: object, code: int = 0):
    return cli(
        "init",
        project,
        *slides,
        "--tile-size",
        TILE,
        "--batch-size",
        8,
        "--weights",
        "random",
        "--device",
        "cpu",
        code=code,
    )


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    """The cohort's project built on this machine, without a cluster."""
    root = tmp_path_factory.mktemp("reference") / "p"
    _init(root, "--slides", str(cohort / "*.tiff"))
    return root


def _same_slide(a: Project, b: Project, slide_id: str) -> None:
    for path in ("features_path", "patches_path", "tissue_path", "candidates_path"):
        left, right = getattr(a, path)(slide_id), getattr(b, path)(slide_id)
        assert left.read_bytes() == right.read_bytes(), f"{slide_id}: {left.name} differs"


def _slides(root: Path) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads((root / "project.json").read_text())["slides"]}


def test_the_cluster_computes_the_same_features_bit_for_bit(cohort, reference, scheduler, tmp_path):
    listing = tmp_path / "slides.txt"  # a comment, a blank line, a path relative to the list, a slide given twice
    relative = os.path.relpath(cohort / "s2.tiff", tmp_path)
    listing.write_text(f"# the cohort\n{cohort / 's0.tiff'}\n\n{cohort / 's1.tiff'}\n{relative}\n")
    result = _init(tmp_path / "p", "--slide", cohort / "s0.tiff", "--slide-list", listing, "--cluster", scheduler)
    assert "features on the cluster" in result.output
    ours, theirs = _slides(tmp_path / "p"), _slides(reference)
    assert ours == theirs and len(ours) == SLIDES
    assert all(s["extracted"] and s["n_patches"] > 0 for s in ours.values())
    manifest = json.loads((tmp_path / "p" / "project.json").read_text())
    assert manifest["normalisation"] == json.loads((reference / "project.json").read_text())["normalisation"]
    for slide_id in ours:
        _same_slide(Project(tmp_path / "p"), Project(reference), slide_id)
    assert not (tmp_path / "p" / "incoming").exists()


class Killer(threading.Thread):
    """Kills the worker process computing ``slide`` once its attempt has committed some tiles but not all (mid
    slide), ``times`` times: it reads which process holds an attempt from the attempt's own record."""

    def __init__(self, project: Path, slide: str, times: int) -> None:
        super().__init__(daemon=True)
        self.project, self.slide, self.times = Project(project), slide, times
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seen: set[str] = set()
        while len(self.killed) < self.times and not self.stop.is_set():
            for attempt in sorted(self.project.incoming_dir().glob(f"{self.slide}.*")):
                staged = Project(attempt)
                try:
                    info = json.loads(staged.attempt_info_path().read_text())
                    done = json.loads(staged.progress_path(self.slide).read_text())["done"]
                except (OSError, ValueError, KeyError):
                    continue
                total = len(np.load(staged.candidates_path(self.slide)))
                if attempt.name not in seen and 0 < done < total:
                    seen.add(attempt.name)
                    os.kill(int(info["pid"]), signal.SIGKILL)
                    self.killed.append(int(info["pid"]))
            time.sleep(0.005)


def test_a_worker_killed_mid_slide_is_retried_and_nothing_half_written_is_entered(
    cohort, reference, scheduler, tmp_path
):
    root = tmp_path / "p"
    killer = Killer(root, "s1", times=1)
    killer.start()
    try:
        result = _init(root, "--slides", str(cohort / "*.tiff"), "--cluster", scheduler)
    finally:
        killer.stop.set()
    assert len(killer.killed) == 1, "the slide should have been caught mid-way"
    assert "features of s1 failed (its worker died" in " ".join(result.output.split())
    assert _slides(root) == _slides(reference)
    for slide_id in _slides(root):
        _same_slide(Project(root), Project(reference), slide_id)
    assert not (root / "incoming").exists()


def test_a_slide_that_fails_twice_is_named_and_left_out_and_the_others_finish(cohort, reference, scheduler, tmp_path):
    root = tmp_path / "p"
    killer = Killer(root, "s2", times=2)
    killer.start()
    try:
        result = _init(root, "--slides", str(cohort / "*.tiff"), "--cluster", scheduler, code=1)
    finally:
        killer.stop.set()
    assert len(killer.killed) == 2
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    line = " ".join(errors[0].split())
    assert "1 slide(s) failed 2 times on the cluster" in line and "s2 (its worker died" in line
    assert "wsi-il add-slide" in line
    ours = _slides(root)
    assert sorted(ours) == ["s0", "s1"] and all(s["extracted"] for s in ours.values())
    for slide_id in ours:
        _same_slide(Project(root), Project(reference), slide_id)
    assert not Project(root).slide_dir("s2").exists() and not (root / "incoming").exists()
    status = cli("status", root)
    assert "s2" not in status.output
    # The command the error names finishes the project on the cluster: the same slide as on one machine.
    added = cli("add-slide", root, "--slide", cohort / "s2.tiff", "--cluster", scheduler)
    assert "features on the cluster" in added.output
    assert _slides(root) == _slides(reference)
    _same_slide(Project(root), Project(reference), "s2")
    assert not (root / "incoming").exists()


def test_without_the_engine_the_cluster_option_is_refused_in_one_line(cohort, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    result = _init(tmp_path / "p", "--slides", str(cohort / "*.tiff"), "--cluster", "local:2", code=3)
    assert "pip install 'wsi-il[cluster]'" in error_line(result)


@pytest.mark.parametrize("value", ["local:0", "local:x", "somewhere"])
def test_a_cluster_address_that_is_not_one_is_refused(cohort, tmp_path, value):
    result = _init(tmp_path / "p", "--slides", str(cohort / "*.tiff"), "--cluster", value, code=3)
    assert "--cluster" in error_line(result)


def test_slide_patterns_and_lists_that_name_no_file_are_refused(tmp_path):
    result = _init(tmp_path / "p", "--slides", str(tmp_path / "*.svs"), code=3)
    assert "matches no file" in error_line(result)
    listing = tmp_path / "list.txt"
    listing.write_text("missing.svs\n")
    result = _init(tmp_path / "p", "--slide-list", listing, code=3)
    assert "names 1 file(s) that do not exist (line 1: " in error_line(result)


def _kind_into(queue) -> None:
    from wsi_il.readers import reader_kind

    queue.put(reader_kind())


def test_a_daemonic_process_reads_tiles_on_threads(monkeypatch):
    import multiprocessing

    from wsi_il.readers import READERS_ENV, reader_kind

    monkeypatch.delenv(READERS_ENV, raising=False)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_kind_into, args=(queue,), daemon=True)  # as a Dask worker runs by default
    process.start()
    assert queue.get(timeout=30) == "threads"
    process.join()
    assert reader_kind() == "processes"  # this process may start its own
