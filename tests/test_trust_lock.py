"""One writer at a time: a second command is refused naming the first; `status` reads during a lock;
a lock left by a killed process is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trust_support import (
    CPU,
    QUERY_BOX,
    assert_unchanged,
    cli,
    copy_project,
    error_line,
    record,
    session_project,
    snapshot,
    write_region,
)

HOLD = """
import sys, time
from wsi_il.project import Project
with Project(sys.argv[1]).lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture()
def reviewing(block_slide, tmp_path_factory, tmp_path) -> Path:
    base = session_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path)
    return copy_project(base, tmp_path / "p")


def hold_lock(project: Path, command: str) -> subprocess.Popen:
    """Start another process that holds the project's lock (through wsi-il's own code) until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(project), command], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_writers_are_refused_while_another_holds_the_lock_and_status_still_reads(reviewing, tmp_path):
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    holder = hold_lock(reviewing, "ingest")
    try:
        before = snapshot(reviewing)
        commands = {
            "ingest": ("ingest", reviewing, reviewing / "batches" / "s1-r1" / "labels.csv", *CPU),
            "query": ("query", reviewing, "--region", region, "--abandon", *CPU),
            "export": ("export", reviewing, "--out", tmp_path / "m.geojson"),
            "init (resume)": ("init", reviewing),
            "add-slide": ("add-slide", reviewing, "--slide", tmp_path / "x.svs", *CPU),
        }
        for name, args in commands.items():
            line = error_line(cli(*args, code=4))
            assert f"is in use by `wsi-il ingest` (pid {holder.pid} on " in line, line
            assert "wait for it to finish" in line
            record(f"{name} while another `wsi-il ingest` runs", line, True)
        info = json.loads(cli("status", reviewing, "--json").stdout)
        assert info["sessions"][0]["state"] == "reviewing"
        assert_unchanged(reviewing, before)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder was killed: its lock is stale, and the next command takes it over
    assert json.loads((reviewing / "lock").read_text())["pid"] == holder.pid
    cli("query", reviewing, "--region", region, "-k", "2", "--rounds", "1", "--abandon", *CPU)
    assert not (reviewing / "lock").exists()


def test_a_real_init_in_progress_refuses_a_second_command(block_slide, tmp_path):
    project = tmp_path / "p"
    log = tmp_path / "init.log"
    with open(log, "wb") as handle:
        init = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wsi_il",
                "init",
                str(project),
                "--slide",
                str(block_slide.path),
                "--tile-size",
                "128",
                "--batch-size",
                "4",
                "--weights",
                "random",
                *CPU,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not ((project / "lock").is_file() and (project / "project.json").is_file()):
            assert init.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "init did not start"
            time.sleep(0.05)
        line = error_line(cli("init", project, *CPU, code=4))
        assert f"`wsi-il init` (pid {init.pid} on " in line
        line = error_line(cli("ingest", project, tmp_path / "labels.csv", *CPU, code=4))
        assert f"`wsi-il init` (pid {init.pid} on " in line
        info = json.loads(cli("status", project, "--json").stdout)  # reads while init writes
        assert info["next"].startswith("finish the feature cache")
    finally:
        init.send_signal(signal.SIGKILL)
        init.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from /proc")
def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    import socket

    from wsi_il.project import Project

    project = Project(tmp_path / "p")
    project.root.mkdir()
    # our own, living pid, but a process start time that is not ours: the pid was reused after a kill
    (project.root / "lock").write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": "ingest",
                "since": "2025-01-01T00:00:00+00:00",
                "started": 1,
            }
        )
    )
    with project.lock("query"):
        assert json.loads((project.root / "lock").read_text())["command"] == "query"
    assert not (project.root / "lock").exists()


def test_a_command_on_a_folder_that_is_no_project_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    line = error_line(cli("ingest", missing, tmp_path / "labels.csv", *CPU, code=4))
    assert "is not a wsi-il project" in line and not missing.exists()
    record("ingest on a folder that does not exist", line, "yes (nothing created)")
