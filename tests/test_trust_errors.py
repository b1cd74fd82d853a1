"""Every refusal, as a user sees it in a terminal: one line on stderr, no traceback, the right exit code."""

from __future__ import annotations

import os
import subprocess
import sys

from test_trust_support import QUERY_BOX, copy_project, fill, init_project, session_project, write_region


def test_refusals_are_one_unwrapped_line_without_traceback(block_slide, tmp_path_factory, tmp_path):
    base = tmp_path_factory.getbasetemp()
    fresh = copy_project(init_project(base, block_slide.path), tmp_path / "fresh")
    other = copy_project(fresh, tmp_path / "other")  # commands run at once: one project each, or the lock refuses
    reviewing = copy_project(session_project(base, block_slide.path, block_slide.truth_path), tmp_path / "reviewing")
    fill(reviewing / "batches" / "s1-r1", ["tumour", "no", "no", "yes"])
    (tmp_path / "notes.geojson").write_text("Tumor, top left\n")
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "slide.svs"
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    commands = {
        "status of no project": (["status", tmp_path / "nowhere"], 4),
        "init with a missing slide": (["init", tmp_path / "new", "--slide", deep, "--weights", "random"], 3),
        "query with a region that is not JSON": (
            ["query", fresh, "--region", tmp_path / "notes.geojson", "--device", "cpu"],
            3,
        ),
        "ingest with a typo": (
            ["ingest", reviewing, reviewing / "batches" / "s1-r1" / "labels.csv", "--device", "cpu"],
            3,
        ),
        "export before any training": (["export", other, "--out", tmp_path / "m.geojson"], 4),
        "query with an unknown strategy": (["query", fresh, "--region", region, "--strategy", "best"], 3),
    }
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm-256color"}
    env.pop("WSI_IL_DEBUG", None)
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "wsi_il", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (args, _) in commands.items()
    }
    longest = 0
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == commands[name][1], (name, stderr)
        assert "Traceback" not in stderr + stdout, (name, stderr)
        assert stdout == "", (name, stdout)
        lines = [line for line in stderr.splitlines() if line.strip() and "RANDOMLY initialised" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        longest = max(longest, len(lines[0]))
    assert longest > 120, "no message was long enough to show that long lines are not wrapped"


def test_a_damaged_cache_is_one_line_too(block_slide, tmp_path_factory, tmp_path):
    project = copy_project(init_project(tmp_path_factory.getbasetemp(), block_slide.path), tmp_path / "p")
    features = project / "slides" / "block" / "features.npy"
    features.write_bytes(features.read_bytes()[:200])  # cut behind wsi-il's back
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("WSI_IL_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "wsi_il", "query", str(project), "--patch", "block_x512_y512", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "RANDOMLY" not in line]
    assert len(lines) == 1 and "feature cache of" in lines[0] and "is damaged" in lines[0], result.stderr
    print(f"TRUST-TABLE | features.npy cut short | {lines[0]} | yes")
    assert not (project / "lock").exists()
