"""Wall and CPU time of a pooled round's full pass here and on local Dask clusters of 1 and 2 workers.

    python benchmarks/cluster_pass.py PROJECT [--workers 1,2] [--json F.json]

PROJECT: a pooled project (``init --round pool``). When it has no model yet, a session is started on its first ten
patches and its first batch ingested (labels alternating between the two classes), without the pass. Each variant
runs on a copy of the project, in a process of its own: the pass of the current model, with nothing cached
(``run_pass``; with ``--cluster local:N``, a local cluster of N workers started first, its start timed apart).
Printed and saved: each variant's seconds (the pass alone, and the process whole), the CPU seconds of the process
and of all it started (the workers), the load average before and after, and whether every variant entered the same
arrays as the pass here, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = """
import json, sys, time
from pathlib import Path
from wsi_il.events import SilentReporter
from wsi_il.fullpass import run_pass
from wsi_il.model import model_state, open_context
from wsi_il.project import Project

root, workers = Path(sys.argv[1]), int(sys.argv[2])
project = Project(root)
ctx = open_context(project, "cpu", SilentReporter())
model = model_state(ctx)["model"]
if workers == 0:
    started = time.perf_counter()
    outcome = run_pass(ctx, model)
    print(json.dumps({"connect_s": 0.0, "pass_s": time.perf_counter() - started, "entered": outcome.entered}))
else:
    from wsi_il.cluster import ClusterSpec, connect
    from wsi_il.clusterpass import ClusterPass

    started = time.perf_counter()
    with connect(ClusterSpec(local_workers=workers)) as client:
        client.wait_for_workers(workers)
        connected = time.perf_counter()
        outcome = run_pass(ctx, model, cluster=ClusterPass(client, "cpu"))
        done = time.perf_counter()
    print(json.dumps({"connect_s": connected - started, "pass_s": done - connected, "entered": outcome.entered}))
"""


def prepare(root: Path) -> str:
    """Give the project a current model (a first round ingested, its pass left undone); return the model's id."""
    from wsi_il.batch import read_batch
    from wsi_il.config import SessionSettings
    from wsi_il.events import SilentReporter
    from wsi_il.measure.truth import write_batch_labels
    from wsi_il.model import model_state, open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest, start_session

    project = Project(root)
    ctx = open_context(project, "cpu", SilentReporter())
    if model_state(ctx)["model"]:
        return model_state(ctx)["model"]
    with project.lock("benchmark"):
        result = start_session(ctx, ctx.classes[0], SessionSettings("cnfp", 10, 3), query_indices=np.arange(10))
        _, patches = read_batch(result.batch_dir)
        write_batch_labels(result.batch_dir, {p.patch_id: ctx.classes[n % 2] for n, p in enumerate(patches)})
        ingest(ctx, result.batch_dir / "labels.csv", pass_later=True)
    return model_state(open_context(project, "cpu", SilentReporter()))["model"]


def run_variant(base: Path, workers: int, scratch: Path) -> dict:
    root = scratch / f"w{workers}"
    shutil.copytree(base, root)
    state_path = root / "state" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "embeddings": None, "predictions": None}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(root), str(workers)], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "variant": "here" if workers == 0 else f"local:{workers}",
        **result,
        "process_s": wall,
        "cpu_s_with_workers": cpu,
        "load_before": load,
        "load_after": os.getloadavg(),
        "root": str(root),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = prepare(args.project)
    n = sum(s["n_patches"] for s in json.loads((args.project / "project.json").read_text())["slides"])
    runs = []
    with tempfile.TemporaryDirectory(dir=args.project.parent) as scratch:
        for workers in [0, *map(int, args.workers.split(","))]:
            runs.append(run_variant(args.project, workers, Path(scratch)))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "root"}), flush=True)
        reference = [np.load(Path(runs[0]["root"]) / "state" / name) for name in ("embeddings.npy", "predictions.npy")]
        for run in runs:
            arrays = [np.load(Path(run["root"]) / "state" / name) for name in ("embeddings.npy", "predictions.npy")]
            run["same_as_here"] = all(np.array_equal(a, b) for a, b in zip(arrays, reference, strict=True))
            del run["root"]
    report = {"project": str(args.project), "patches": n, "model": model, "cpus": os.cpu_count(), "runs": runs}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
