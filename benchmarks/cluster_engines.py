"""Dask against Ray for wsi-il's cluster extraction, on this machine: install size, a local cluster's start-up,
what each does when a worker dies mid-task, and the extraction of a few slides with 1 and 2 local workers
(the same per-slide work, ``wsi_il.cluster.features_task``, under each engine; and on one machine without a
cluster for reference).

usage: python benchmarks/cluster_engines.py [--slides 4] [--cells 24] [--engines dask,ray] [--out FILE.json]

Slides are PCam patch mosaics built from tests/data/pcam (``--cells`` 96 px cells a side; the patch counts are
printed). Each timing is one run, in this order: local, then for each engine 1 worker and 2 workers. CPU seconds
are the whole process tree's (this process and every process it started), read just before each cluster stops.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def install_mb(name: str, seen: set[str] | None = None) -> float:
    """Megabytes of a distribution's installed files and of everything it requires (not counting what is
    already counted: numpy etc. once)."""
    import re

    seen = set() if seen is None else seen
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return 0.0
    seen.add(key)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0.0
    size = sum((f.size or 0) for f in (dist.files or []))
    for requirement in dist.requires or []:
        if "extra ==" in requirement:
            continue
        size += install_mb(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0], seen) * 1e6
    return size / 1e6


def tree_cpu_s() -> float:
    """CPU seconds of this process and of every living process below it."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def make_slides(folder: Path, count: int, cells: int) -> list[Path]:
    from wsi_il.measure.mosaic import labelled_patches, make_patch_mosaic

    tumour, normal = labelled_patches(REPO / "tests" / "data" / "pcam")
    return [
        make_patch_mosaic(folder / f"s{n}.tiff", tumour, normal, cells=(cells, cells), islands=2, seed=n).slide.path
        for n in range(count)
    ]


def prepared_project(root: Path, slides: list[Path]) -> Any:
    """A project of the slides with its candidates and tissue statistics (what the coordinator does first)."""
    from wsi_il.config import FeatureSettings, TilingSettings, TrainSettings, to_dict
    from wsi_il.database import register_slide
    from wsi_il.events import SilentReporter
    from wsi_il.extraction import ensure_normalisation, slide_readers, tile_sources
    from wsi_il.project import Project

    project = Project(root)
    manifest = {
        "classes": ["Tumor", "Normal"],
        "tiling": to_dict(TilingSettings(tile_size_px=256)),
        "features": to_dict(FeatureSettings(weights="random", batch_size=32)),
        "train": to_dict(TrainSettings()),
        "normalisation": None,
        "slides": [],
    }
    for slide in slides:
        register_slide(manifest, slide)
    project.create(manifest)
    manifest = project.read_manifest()
    tile_sources(project, manifest, SilentReporter(), 2)
    with slide_readers(TilingSettings(tile_size_px=256), 2, 32) as readers:
        ensure_normalisation(project, manifest, SilentReporter(), readers)
    return project


def time_local(template: Path, work: Path) -> dict[str, Any]:
    from wsi_il.events import SilentReporter
    from wsi_il.extraction import build_database
    from wsi_il.project import Project

    root = work / "local"
    shutil.copytree(template, root)
    project = Project(root)
    cpu, start = tree_cpu_s(), time.perf_counter()
    manifest = build_database(project, project.read_manifest(), SilentReporter(), "cpu")
    wall = time.perf_counter() - start
    tiles = sum(s["n_patches"] for s in manifest["slides"])
    return {"wall_s": round(wall, 2), "cpu_s": round(tree_cpu_s() - cpu, 2), "patches": tiles}


def _jobs(project: Any) -> tuple[list[tuple[Any, ...]], str]:
    """The features_task arguments of every slide (less the threads and the attempt), and where this process runs
    (its host and cores: the key of a worker's compute threads, ``cluster.check_workers``)."""
    manifest = project.read_manifest()
    part = {key: manifest[key] for key in ("tiling", "features", "normalisation")}
    from wsi_il.cluster import where_running

    return [(str(project.root), dict(e), part, "cpu") for e in manifest["slides"]], where_running()


def time_dask(template: Path, work: Path, workers: int) -> dict[str, Any]:
    from wsi_il.cluster import ClusterSpec, connect, features_task
    from wsi_il.project import Project
    from wsi_il.threads import default_workers

    root = work / f"dask{workers}"
    shutil.copytree(template, root)
    jobs, where = _jobs(Project(root))
    threads = {where: max(1, default_workers() // workers)}
    cpu0, start = tree_cpu_s(), time.perf_counter()
    with connect(ClusterSpec(local_workers=workers)) as client:
        client.run(lambda: __import__("torch"))  # what the first task would otherwise import
        started = time.perf_counter() - start
        cpu1, begin = tree_cpu_s(), time.perf_counter()
        futures = [client.submit(features_task, *job, threads, f"a{n}", pure=False) for n, job in enumerate(jobs)]
        results = client.gather(futures)
        wall = time.perf_counter() - begin
        cpu = tree_cpu_s() - cpu1
    return {
        "start_s": round(started, 2),
        "start_cpu_s": round(cpu1 - cpu0, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "patches": sum(r["n_patches"] for r in results),
    }


def time_ray(template: Path, work: Path, workers: int) -> dict[str, Any]:
    import ray

    from wsi_il.cluster import features_task
    from wsi_il.project import Project
    from wsi_il.threads import default_workers

    root = work / f"ray{workers}"
    shutil.copytree(template, root)
    jobs, where = _jobs(Project(root))
    threads = {where: max(1, default_workers() // workers)}
    cpu0, start = tree_cpu_s(), time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": _pythonpath()})
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(features_task)
        ray.get([ray.remote(num_cpus=1)(lambda: __import__("torch") and 0).remote() for _ in range(workers)])
        started = time.perf_counter() - start
        cpu1, begin = tree_cpu_s(), time.perf_counter()
        results = ray.get([task.remote(*job, threads, f"a{n}") for n, job in enumerate(jobs)])
        wall = time.perf_counter() - begin
        cpu = tree_cpu_s() - cpu1
    finally:
        ray.shutdown()
    return {
        "start_s": round(started, 2),
        "start_cpu_s": round(cpu1 - cpu0, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "patches": sum(r["n_patches"] for r in results),
    }


def _pythonpath() -> dict[str, str]:
    return {"PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}


def _sleeper(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def death_dask() -> dict[str, Any]:
    """What Dask does when the worker running a task is killed: with allowed-failures 0 (as wsi-il sets it for a
    local cluster) the task fails at once with KilledWorker, and wsi-il retries it; seconds until the failure
    is seen."""
    from wsi_il.cluster import ClusterSpec, connect

    with connect(ClusterSpec(local_workers=1)) as client:
        pid = next(iter(client.run(os.getpid).values()))
        future = client.submit(_sleeper, 30, pure=False)
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        start = time.perf_counter()
        try:
            future.result()
            outcome = "finished"
        except Exception as exc:
            outcome = type(exc).__name__
        return {"outcome": outcome, "seen_after_s": round(time.perf_counter() - start, 2)}


def death_ray() -> dict[str, Any]:
    """What Ray does when the worker running a task is killed: the task is retried (max_retries, 3 by default
    for a worker's death); seconds until the retried task returns (it sleeps 3 s)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": _pythonpath()})
    try:
        task = ray.remote(max_retries=1)(_sleeper)
        ref = task.remote(3)
        time.sleep(1.5)
        import psutil

        workers = [p for p in psutil.process_iter(["name", "cmdline"]) if "ray::_sleeper" in " ".join(p.cmdline())]
        for process in workers:
            os.kill(process.pid, signal.SIGKILL)
        start = time.perf_counter()
        try:
            ray.get(ref)
            outcome = f"retried and finished (killed {len(workers)} process)"
        except Exception as exc:
            outcome = type(exc).__name__
        return {"outcome": outcome, "returned_after_s": round(time.perf_counter() - start, 2)}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--cells", type=int, default=24)
    parser.add_argument("--engines", default="dask,ray")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    report: dict[str, Any] = {
        "load_average": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)),
        "install_mb": {name: round(install_mb(name, {"numpy"}), 1) for name in ("distributed", "ray")},
    }
    with tempfile.TemporaryDirectory(prefix="wsi-il-engines-") as tmp:
        work = Path(tmp)
        slides = make_slides(work / "slides", args.slides, args.cells)
        template = prepared_project(work / "template", slides).root
        report["local"] = time_local(template, work)
        for engine in engines:
            timer = time_dask if engine == "dask" else time_ray
            for workers in (1, 2):
                report[f"{engine}_{workers}"] = timer(template, work, workers)
        for engine in engines:
            report[f"{engine}_worker_death"] = death_dask() if engine == "dask" else death_ray()
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
