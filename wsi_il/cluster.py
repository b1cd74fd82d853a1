"""Extraction on a Dask cluster: each slide computed by a worker, entered into the project only whole.

The command that runs this (the coordinator) holds the project lock and alone writes the manifest. It lists
every slide's candidate tiles and computes the tissue statistics as on one machine (``extraction.tile_sources``,
``extraction.ensure_normalisation``; the thumbnails are read on the workers first), then hands each slide to a
worker. A worker writes the slide as ``extraction.extract_tissue`` does, but into a folder of its own attempt
(``incoming/<attempt>/``, on the storage every machine sees); the coordinator checks that the attempt is whole,
moves its files into ``slides/<id>/`` and only then records the slide in the manifest (the commit). A slide
whose worker dies or fails is tried once more, in a new folder (a worker that is only cut off and still runs
writes where nothing is read); a slide that fails twice is left out of the project and reported by name, and
the others finish. The engine is Dask (``distributed``): docs/cluster.md says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.config import TilingSettings, settings_of
from wsi_il.errors import InputError, WsiIlError
from wsi_il.events import Reporter, SilentReporter
from wsi_il.extraction import (
    ensure_normalisation,
    extract_tissue,
    normalisation_of,
    save_init_block,
    slide_candidates,
    slide_readers,
    slide_side0,
    tile_sources,
)
from wsi_il.features import (
    FeatureExtractor,
    Weights,
    build_backbone,
    load_project_weights,
    trunk_batch_size,
)
from wsi_il.fsutil import fsync_dir
from wsi_il.project import Project, SlideRecord, current_versions, features_pending
from wsi_il.threads import default_workers

TRIES = 2
"""Times a slide is tried on the cluster before it is reported and left out."""
WORKERS_WAIT_S = 120.0
"""How long the coordinator waits for a first worker to join a scheduler it was given."""
POLL_S = 0.5
"""How often the coordinator reads the attempts' progress and collects finished slides."""
EXTRA = "cluster"
"""The pip extra that installs the engine: ``pip install 'wsi-il[cluster]'``."""
_SAME_VERSIONS = ("wsi-il", "torch", "torchvision", "openslide-bin", "numpy")
"""Packages whose versions must be the same on every worker as on the coordinator (the features depend on them)."""


class ClusterError(WsiIlError):
    """Slides that failed on the cluster however often they were tried (the others are in the project)."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where to run: a scheduler's address (``tcp://host:8786``), or a local cluster of ``local_workers``
    worker processes started on 127.0.0.1 for the command."""

    address: str | None = None
    local_workers: int = 0


def parse_cluster(text: str) -> ClusterSpec:
    """Read ``--cluster``: ``local:N`` or a Dask scheduler's address (``tcp://host:port``, ``tls://...``)."""
    text = text.strip()
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--cluster {text!r}: local:N needs a number of workers of 1 or more", "e.g. local:2")
        return ClusterSpec(local_workers=int(count))
    if "://" in text and text.split("://", 1)[1]:
        return ClusterSpec(address=text)
    raise InputError(
        f"--cluster {text!r} is not local:N or a scheduler address",
        "give e.g. tcp://head-node:8786 (a running `dask scheduler`) or local:2",
    )


def require_distributed() -> Any:
    """Dask's ``distributed`` module, or a one-line error saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise InputError(
            "--cluster needs Dask's distributed package, which is not installed",
            f"pip install 'wsi-il[{EXTRA}]'",
        ) from exc
    return distributed


@contextlib.contextmanager
def connect(spec: ClusterSpec) -> Iterator[Any]:
    """A Dask client of the cluster ``spec`` names; a local cluster is started here and stopped on leaving."""
    distributed = require_distributed()
    import dask

    if spec.local_workers:
        # allowed-failures 0: a worker's death fails its slide at once, and TRIES counts the tries; workers not
        # daemonic, so that each can fork its tile readers
        config = {"distributed.scheduler.allowed-failures": 0, "distributed.worker.daemon": False}
        with (
            dask.config.set(config),
            distributed.LocalCluster(
                n_workers=spec.local_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=0,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = distributed.Client(spec.address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InputError(
            f"cannot reach the Dask scheduler at {spec.address}: {exc}",
            "start it (`dask scheduler`, or a dask-jobqueue cluster: docs/cluster.md) or check the address",
        ) from exc
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKERS_WAIT_S)
        except TimeoutError as exc:
            raise InputError(
                f"no worker joined the Dask scheduler at {spec.address} within {WORKERS_WAIT_S:.0f} s",
                f"start workers: `dask worker {spec.address}`",
            ) from exc
        yield client


def check_workers(client: Any) -> dict[str, int]:
    """Refuse workers whose packages differ from this machine's; return the compute threads of a worker by where
    it runs (its host and the cores it may use, shared among the workers that may use the same cores: a local
    cluster's share one machine, Slurm jobs each their own cores; keyed so that a restarted worker finds its own)."""
    found = client.run(_worker_facts)
    for address, facts in found.items():
        check_versions(facts["versions"], current_versions(), f"the Dask worker {address} on {facts['host']}")
    sharing: dict[str, int] = {}
    for facts in found.values():
        sharing[facts["where"]] = sharing.get(facts["where"], 0) + 1
    return {facts["where"]: max(1, facts["cores"] // sharing[facts["where"]]) for facts in found.values()}


def check_versions(there: dict[str, Any], here: dict[str, Any], who: str) -> None:
    """Refuse a worker (``who``) whose packages that the results depend on differ from this machine's."""
    differ = [
        f"{name} {there.get(name)} (here {here.get(name)})"
        for name in _SAME_VERSIONS
        if there.get(name) != here.get(name)
    ]
    if differ:
        raise InputError(
            f"{who} has {', '.join(differ)}",
            "install the same versions on every worker as on the machine that runs the command, so that every "
            "slide's features are the same",
        )


def _worker_facts() -> dict[str, Any]:
    return {
        "versions": current_versions(),
        "host": socket.gethostname(),
        "where": where_running(),
        "cores": default_workers(),
    }


def where_running() -> str:
    """This process's host and the cores it may run on."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [os.cpu_count() or 1]
    return f"{socket.gethostname()}:{','.join(map(str, cores))}"


# ---- the coordinator --------------------------------------------------------------------------------------------
def build_on_cluster(
    project: Project,
    manifest: dict[str, Any],
    reporter: Reporter,
    client: Any,
    device: str = "auto",
    local_device: str = "cpu",
    weights: Weights | None = None,
) -> dict[str, Any]:
    """Tile and extract the project's slides on the cluster (patch folders and slides tiled before: here, by
    ``extraction.build_database`` on ``local_device`` after this); returns the manifest. ``device``: the workers'
    (auto: each worker's GPU where it has one).

    Raises ``ClusterError`` naming the slides that failed ``TRIES`` times: they are taken out of the project,
    the others are in it.
    """
    from wsi_il.extraction import build_database

    threads = check_workers(client)
    tiling = settings_of(manifest).tiling
    settings = settings_of(manifest).features
    failed: dict[str, str] = {}
    untiled = [e for e in manifest["slides"] if e["kind"] == "slide" and not e["tiled"]]
    thumbnails = [e for e in untiled if not project.candidates_path(e["id"]).is_file()]
    if thumbnails:
        jobs = {e["id"]: _candidates_job(project, e, tiling) for e in thumbnails}
        failed.update(_run(client, project, jobs, reporter, "thumbnails", {}))
        _leave_out(project, manifest, failed)
    workers = default_workers()
    tile_sources(project, manifest, reporter, workers)
    if manifest.get("normalisation") is None:
        with slide_readers(tiling, workers, trunk_batch_size("cpu", settings.batch_size)) as readers:
            ensure_normalisation(project, manifest, reporter, readers)
    pending = [e for e in manifest["slides"] if e["kind"] == "slide" and not e["tiled"] and features_pending(e)]
    if pending:
        save_init_block(
            project, build_backbone(weights or load_project_weights(settings), settings), settings.trainable
        )
        jobs = {e["id"]: _features_job(project, manifest, e, device, threads) for e in pending}
        totals = {e["id"]: len(project.read_array(project.candidates_path(e["id"]))) for e in pending}

        def enter(slide_id: str, attempt: str, result: dict[str, Any]) -> None:
            _enter(project, manifest, slide_id, attempt, result, totals[slide_id])

        failed.update(_run(client, project, jobs, reporter, "features", totals, enter))
        _leave_out(project, manifest, failed)
    _remove_attempts(project)
    manifest = build_database(project, manifest, reporter, local_device, weights)
    if failed:
        names = "; ".join(f"{slide_id} ({reason})" for slide_id, reason in sorted(failed.items()))
        raise ClusterError(
            f"{len(failed)} slide(s) failed {TRIES} times on the cluster and were left out of the project: {names}",
            f"the other slides are in it; check those files (and the workers' memory), then add them with "
            f"`wsi-il add-slide {project.root} --slide FILE`",
        )
    return manifest


@dataclass(frozen=True)
class _Job:
    """A slide's work on a worker: ``task(*args, attempt)``."""

    task: Callable[..., dict[str, Any]]
    args: tuple[Any, ...]


def _candidates_job(project: Project, entry: dict[str, Any], tiling: TilingSettings) -> _Job:
    return _Job(candidates_task, (str(project.root), entry["id"], entry["path"], tiling, slide_side0(tiling, entry)))


def _features_job(
    project: Project, manifest: dict[str, Any], entry: dict[str, Any], device: str, threads: dict[str, int]
) -> _Job:
    part = {key: manifest[key] for key in ("tiling", "features", "normalisation")}
    part["versions"] = current_versions()  # a worker that joins later is checked by the task itself
    return _Job(features_task, (str(project.root), dict(entry), part, device, threads))


def run_slides(
    client: Any,
    slide_ids: list[str],
    submit: Callable[[str], tuple[Any, str]],
    take: Callable[[str, str, Any], None],
    failed_try: Callable[[str, str, Exception, bool], None],
    poll: Callable[[list[tuple[str, str]]], None],
    discard: Callable[[str], None],
) -> dict[str, str]:
    """Run one task a slide on the cluster, one a worker thread at a time (a slide uses all of its worker's cores),
    each tried up to ``TRIES`` times; returns the slides that failed every try, with why.

    ``submit(slide_id)`` starts a try and returns its future and attempt name; ``take(slide_id, attempt, result)``
    takes a finished try (an exception there fails the try); ``failed_try(slide_id, attempt, error, again)`` hears
    of each failed try and whether it is tried again; ``poll(running)`` runs before each wait and after it, with the
    (slide id, attempt) pairs still running (progress; it may raise to stop everything). A try's attempt is
    ``discard``-ed when it failed, and, with its task cancelled, when the run ends by an exception."""
    distributed = require_distributed()
    waiting = list(slide_ids)
    tries = dict.fromkeys(slide_ids, 0)
    running: dict[Any, tuple[str, str]] = {}  # future -> (slide id, attempt)
    failed: dict[str, str] = {}
    try:
        while waiting or running:
            poll(list(running.values()))
            slots = max(1, len(client.nthreads()))  # read each time: workers join and leave
            while waiting and len(running) < slots:
                slide_id = waiting.pop(0)
                tries[slide_id] += 1
                future, attempt = submit(slide_id)
                running[future] = (slide_id, attempt)
            try:
                done = distributed.wait(list(running), timeout=POLL_S, return_when="FIRST_COMPLETED").done
            except TimeoutError:  # none finished meanwhile
                done = set()
            poll(list(running.values()))
            for future in done:
                slide_id, attempt = running.pop(future)
                try:
                    take(slide_id, attempt, future.result())
                except Exception as exc:  # a worker's death (KilledWorker), the slide's own error, an attempt not whole
                    again = tries[slide_id] < TRIES
                    discard(attempt)
                    failed_try(slide_id, attempt, exc, again)
                    if again:
                        waiting.append(slide_id)
                    else:
                        failed[slide_id] = failure_reason(exc)
    except BaseException:  # stopped or interrupted: the tasks still running are cancelled, their attempts removed
        if running:
            client.cancel(list(running))
            for _, attempt in running.values():
                discard(attempt)
        raise
    return failed


def _run(
    client: Any,
    project: Project,
    jobs: dict[str, _Job],
    reporter: Reporter,
    stage: str,
    totals: dict[str, int],
    enter: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> dict[str, str]:
    """Run every job on the cluster (``run_slides``); ``enter`` takes each finished attempt. Returns the slides
    that failed, with why."""
    overall = reporter.task(f"{stage} on the cluster", len(jobs), "slides")
    bars: dict[str, tuple[Callable[[int], None], list[int]]] = {}

    def submit(slide_id: str) -> tuple[Any, str]:
        attempt = f"{slide_id}.{uuid.uuid4().hex[:12]}"
        job = jobs[slide_id]
        future = client.submit(job.task, *job.args, attempt, key=f"wsi-il-{stage}-{attempt}", pure=False)
        if slide_id in totals and slide_id not in bars:
            bars[slide_id] = (reporter.task(f"{stage} {slide_id}", totals[slide_id], "tiles"), [0])
        return future, attempt

    def take(slide_id: str, attempt: str, result: Any) -> None:
        if enter is not None:
            enter(slide_id, attempt, result)
        if slide_id in bars:
            advance, shown = bars[slide_id]
            advance(totals[slide_id] - shown[0])
        overall(1)

    def failed_try(slide_id: str, attempt: str, exc: Exception, again: bool) -> None:
        if again:
            reporter.warn(f"{stage} of {slide_id} failed ({failure_reason(exc)}); trying it again")
        else:
            overall(1)

    return run_slides(
        client,
        list(jobs),
        submit,
        take,
        failed_try,
        lambda running: _show_progress(project, running, bars),
        lambda attempt: _discard(project, attempt),
    )


def _show_progress(project: Project, running: Any, bars: dict[str, tuple[Callable[[int], None], list[int]]]) -> None:
    """Advance each running slide's bar to the tiles its attempt has committed (never back: a retry starts over)."""
    for slide_id, attempt in list(running):
        if slide_id not in bars:
            continue
        staged = Project(project.attempt_dir(attempt))
        try:
            done = int(staged.read_json(staged.progress_path(slide_id), {"done": 0})["done"])
        except (WsiIlError, OSError, KeyError, TypeError, ValueError):
            continue  # being written, or the attempt was cut off
        advance, shown = bars[slide_id]
        if done > shown[0]:
            advance(done - shown[0])
            shown[0] = done


def failure_reason(exc: BaseException) -> str:
    """Why a slide's task failed, in one short line."""
    if type(exc).__name__ == "KilledWorker":
        return "its worker died: killed, or out of memory"
    text = exc.message if isinstance(exc, WsiIlError) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300]


def _enter(
    project: Project, manifest: dict[str, Any], slide_id: str, attempt: str, result: dict[str, Any], total: int
) -> None:
    """Move a finished attempt's files into the project, then record the slide in the manifest (the commit)."""
    staged = Project(project.attempt_dir(attempt))
    done = int(staged.read_json(staged.progress_path(slide_id), {"done": -1})["done"])
    n = int(result["n_patches"])
    boxes = staged.read_array(staged.patches_path(slide_id))
    features = staged.features_path(slide_id)
    rows = len(np.load(features, mmap_mode="r")) if features.is_file() else 0
    if done != total or len(boxes) != n or rows != n:
        raise WsiIlError(
            f"the cluster's result for {slide_id} is not whole ({done} of {total} tiles, {len(boxes)} patches, "
            f"{rows} feature rows, {n} reported)",
            f"run the command again to compute it anew; {staged.root} holds what was written",
        )
    target = project.slide_dir(slide_id)
    target.mkdir(parents=True, exist_ok=True)
    for name in (staged.tissue_path, staged.progress_path, staged.features_path, staged.patches_path):
        source = name(slide_id)
        if source.is_file():
            os.replace(source, target / source.name)
    if not n:
        project.features_path(slide_id).unlink(missing_ok=True)
    fsync_dir(target)
    for entry in manifest["slides"]:
        if entry["id"] == slide_id:
            entry.update(tiled=True, n_patches=n, extracted=n > 0, precision=result["precision"] if n else None)
    project.write_manifest(manifest)
    _discard(project, attempt)


def _discard(project: Project, attempt: str) -> None:
    shutil.rmtree(project.attempt_dir(attempt), ignore_errors=True)


def _remove_attempts(project: Project) -> None:
    """Remove the folders of attempts that were never entered (cut off, failed, or of an earlier run)."""
    shutil.rmtree(project.incoming_dir(), ignore_errors=True)


def _leave_out(project: Project, manifest: dict[str, Any], failed: dict[str, str]) -> None:
    """Take the slides that failed out of the manifest, with their files."""
    if not failed:
        return
    manifest["slides"] = [e for e in manifest["slides"] if e["id"] not in failed]
    project.write_manifest(manifest)
    for slide_id in failed:
        project.remove_slide_files(slide_id)


# ---- on the workers ---------------------------------------------------------------------------------------------
def candidates_task(root: str, slide_id: str, path: str, tiling: TilingSettings, side0: int, attempt: str) -> dict:
    """On a worker: a slide's candidate tiles from its thumbnail, written into the project (the same file
    whoever computes it, written whole: a second writer changes nothing)."""
    corners = slide_candidates(Project(Path(root)), slide_id, Path(path), tiling, side0)
    return {"candidates": len(corners)}


def features_task(
    root: str,
    entry: dict[str, Any],
    manifest: dict[str, Any],
    device: str,
    threads: dict[str, int],
    attempt: str,
) -> dict[str, Any]:
    """On a worker: the pixel rule and the features of one slide, into the attempt's own folder."""
    started = time.perf_counter()
    if "versions" in manifest:
        check_versions(current_versions(), manifest["versions"], f"the worker on {socket.gethostname()}")
    project = Project(Path(root))
    staged = Project(project.attempt_dir(attempt))
    slide_id = entry["id"]
    staged.slide_dir(slide_id).mkdir(parents=True, exist_ok=True)
    staged.write_json(staged.attempt_info_path(), {"slide": slide_id, "host": socket.gethostname(), "pid": os.getpid()})
    shutil.copyfile(project.candidates_path(slide_id), staged.candidates_path(slide_id))
    tiling = settings_of(manifest).tiling
    settings = settings_of(manifest).features
    extractor = FeatureExtractor(
        build_backbone(load_project_weights(settings), settings),
        *normalisation_of(settings, manifest),
        worker_device(device),
        settings.trainable,
        settings.input_px,
        settings.interpolation,
    )
    cores = threads.get(where_running(), default_workers())
    if extractor.threads:
        extractor.threads = cores
    record = SlideRecord(**{**entry, "offset": tuple(entry["offset"])})
    batch = extractor.batch_size(settings.batch_size)
    extractor.warm_up(batch, tiling.tile_size_px)
    with slide_readers(tiling, cores, batch) as readers:
        n = extract_tissue(staged, record, tiling, extractor, settings, SilentReporter(), readers)
    return {
        "n_patches": n,
        "precision": extractor.precision,
        "host": socket.gethostname(),
        "seconds": time.perf_counter() - started,
    }


def worker_device(device: str) -> str:
    """The device a worker computes on for ``--device`` (``auto``: its GPU where it has one)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
