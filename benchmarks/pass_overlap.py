"""Whether a pooled round's next `wsi-il ingest` starts while the previous round's full pass runs.

    python benchmarks/pass_overlap.py PROJECT TRUTH.geojson [--json F.json]

PROJECT: a pooled project (``init --round pool``) whose open session waits for the labels of its round-1 batch
and has at least three rounds. Two `wsi-il ingest` processes run as two terminals would: A ingests round 1; as soon
as A says the next batch is ready (and has released the project's lock), its labels are filled from TRUTH (a
QuPath GeoJSON of the query's class) and B ingests round 2 while A's pass runs. Printed: when each process
started, wrote its batch and ended (seconds from A's start), A's and B's last lines (what became of each pass),
their CPU seconds and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = "outside the project's lock"
"""What `ingest` prints once the batch is written and the project's lock released."""


class Timed:
    """A `wsi-il ingest` process, its output lines stamped with the seconds since ``t0``."""

    def __init__(self, args: list[str], t0: float) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
        self.t0, self.lines = t0, []
        self.started = time.perf_counter() - t0
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((round(time.perf_counter() - self.t0, 2), line.rstrip()))

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def finish(self) -> dict:
        """Wait for the process; its times, CPU seconds and last lines."""
        _, status, usage = os.wait4(self.process.pid, 0)
        ended = round(time.perf_counter() - self.t0, 2)
        self.reader.join(10)
        return {
            "started_s": round(self.started, 2),
            "batch_ready_s": self.first(READY),
            "ended_s": ended,
            "exit": os.waitstatus_to_exitcode(status),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "last_lines": [line for _, line in self.lines if line.strip()][-3:],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path)
    parser.add_argument("truth", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from wsi_il.measure.truth import fill_labels_from_truth
    from wsi_il.project import Project

    project = Project(args.project)
    cli = [sys.executable, "-m", "wsi_il", "ingest", str(args.project)]
    fill_labels_from_truth(project.batch_dir("s1-r1"), args.truth)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    a = Timed([*cli, str(project.batch_dir("s1-r1") / "labels.csv"), "--device", "cpu"], t0)
    while a.first(READY) is None and a.process.poll() is None:
        time.sleep(0.05)
    if a.first(READY) is None:
        raise SystemExit("A ended without leaving a pass to run:\n" + "\n".join(line for _, line in a.lines))
    fill_labels_from_truth(project.batch_dir("s1-r2"), args.truth)
    b = Timed([*cli, str(project.batch_dir("s1-r2") / "labels.csv"), "--device", "cpu"], t0)
    result = {"A (round 1)": a.finish(), "B (round 2)": b.finish()}
    result["load_average_before"] = [round(v, 2) for v in load_before]
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["patches"] = sum(s["n_patches"] for s in project.read_manifest()["slides"])
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
