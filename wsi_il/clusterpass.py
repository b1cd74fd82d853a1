"""A pooled round's full pass on a Dask cluster: each slide's rows re-embedded and predicted by a worker.

``fullpass.run_pass`` calls ``compute_on_cluster`` instead of computing here when it is given a cluster. Each slide
whose features the project holds is one task: the worker reads the slide's feature shard from the shared file
system, loads the round's model file, runs ``heads.embed_and_predict`` over the shard in the chunks this machine's
pass would use (so that the arithmetic is the same, batch for batch), and writes the slide's embeddings and
predictions into a folder of its own attempt (``pass/attempts/<model>.<slide>.<random>/``). This machine checks
each attempt is whole and copies its rows into the pass's arrays, in the project's row order; ``run_pass`` enters
them exactly as it enters a pass computed here.

Between chunks this machine asks ``check`` (which raises when a newer model is current or the caller stops the
pass), and each worker reads the project's current model and looks for its attempt's folder: a pass that is
superseded or stopped cancels its tasks and removes their folders, and the workers stop at their next chunk. A
slide whose worker dies or fails is tried once more (``cluster.TRIES`` in all); a slide that fails every time makes
the whole pass fail, naming it, with nothing entered.
"""

from __future__ import annotations

import contextlib
import json
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

from wsi_il import model as model_module
from wsi_il.cluster import (
    TRIES,
    ClusterError,
    check_versions,
    check_workers,
    connect,
    failure_reason,
    parse_cluster,
    run_slides,
    where_running,
    worker_device,
)
from wsi_il.database import RowWriter
from wsi_il.errors import WsiIlError
from wsi_il.events import Reporter
from wsi_il.model import Context, init_state, load_model, load_tensors, pass_title, stem_cache
from wsi_il.project import Project, current_versions
from wsi_il.stems import ProjectStems
from wsi_il.threads import default_workers

STEM_ROWS_PER_COPY = 2048
"""Rows of a worker's stem outputs copied into the project's stem cache at a time (bounds this machine's memory)."""


@dataclass(frozen=True)
class ClusterPass:
    """Where a full pass runs on a cluster: a connected Dask client, and the workers' device (``auto``: each
    worker's GPU where it has one, else its CPU)."""

    client: Any
    device: str = "auto"


@contextlib.contextmanager
def pass_cluster(cluster: str | None, device: str, reporter: Reporter) -> Iterator[ClusterPass | None]:
    """The cluster ``--cluster`` names, connected for a pass (a ``local:N`` cluster started for it and stopped
    after); None without ``--cluster``. ``device``: the workers' ``--device``."""
    if cluster is None:
        yield None
        return
    with connect(parse_cluster(cluster)) as client:
        reporter.info(f"cluster: {client.scheduler.address}, {len(client.nthreads())} worker(s)")
        yield ClusterPass(client, device)


@dataclass(frozen=True)
class _Shard:
    """A slide's rows of the pass: its id, its first row in the project's order and its number of rows."""

    slide_id: str
    start: int
    rows: int


class _Abandoned(Exception):
    """On a worker: the pass that asked for this slide was superseded or stopped."""


def compute_on_cluster(
    ctx: Context, model_id: str, cluster: ClusterPass, check: Callable[[], None]
) -> tuple[np.ndarray, np.ndarray]:
    """Return (embeddings, predictions) of every patch under round ``model_id``'s heads, computed by the cluster's
    workers a slide at a time. ``check`` raises to stop the pass (a newer model, the caller's stop); the tasks
    are then cancelled and their attempts removed. Raises ``ClusterError`` naming the slides that failed ``TRIES``
    times (nothing computed is kept)."""
    threads = check_workers(cluster.client)
    init = init_state(ctx)
    heads = load_model(ctx, model_id)
    stems = stem_cache(ctx, heads["classifier"], init) if heads.get("frozen_stem") else None
    shards = _shards(ctx)
    stem_mode = None if stems is None else ("read" if stems.complete else "write")
    sizes = (model_module.EMBED_CHUNK, model_module.GPU_EMBED_CHUNK)
    task_args = {
        s.slide_id: (str(ctx.project.root), model_id, s, len(ctx.classes), cluster.device, sizes, stem_mode)
        for s in shards
    }
    advance = ctx.reporter.task(pass_title("re-embedding and predicting on the cluster", stems), len(ctx.store))
    extra = {"versions": current_versions(), "threads": threads}
    arrays: list[np.ndarray] = []

    def take(shard: _Shard, attempt: str) -> None:
        embeddings, predictions = _read_attempt(ctx.project, attempt, shard, len(ctx.classes))
        if not arrays:
            arrays.extend(
                np.zeros((len(ctx.store), found.shape[1]), dtype=found.dtype) for found in (embeddings, predictions)
            )
        arrays[0][shard.start : shard.start + shard.rows] = embeddings
        arrays[1][shard.start : shard.start + shard.rows] = predictions
        if stem_mode == "write":
            _copy_stems(ctx.project, attempt, shard, stems)

    failed = _run(cluster.client, ctx, model_id, task_args, extra, check, advance, take)
    if failed:
        names = "; ".join(f"{slide_id} ({why})" for slide_id, why in sorted(failed.items()))
        raise ClusterError(
            f"the full pass of model {model_id} failed on the cluster for {len(failed)} slide(s), {TRIES} tries "
            f"each: {names}; nothing was entered",
            "the predictions stay those of the last complete pass (`wsi-il status` says which); run the pass again "
            "by ingesting the same labels file again, with --cluster or without it (here)",
        )
    if stems is not None and stem_mode == "write":
        stems.finish()
    if not arrays:  # no slide with patches: open_context refuses such a project before a round
        raise WsiIlError(f"the full pass of model {model_id} found no patches", "add slides with patches")
    return arrays[0], arrays[1]


def _shards(ctx: Context) -> list[_Shard]:
    """The slides whose rows the pass computes, in the project's row order (the feature store's)."""
    ids = [s.id for s in ctx.project.slides(ctx.manifest) if s.tiled and s.n_patches > 0]
    offsets = [int(o) for o in ctx.store.offsets]
    return [_Shard(slide_id, offsets[n], offsets[n + 1] - offsets[n]) for n, slide_id in enumerate(ids)]


def _run(
    client: Any,
    ctx: Context,
    model_id: str,
    task_args: dict[str, tuple[Any, ...]],
    extra: dict[str, Any],
    check: Callable[[], None],
    advance: Callable[[int], None],
    take: Callable[[_Shard, str], None],
) -> dict[str, str]:
    """Run every slide's task on the cluster (``cluster.run_slides``); ``take`` reads each finished attempt.
    ``check`` raises when the pass is no longer wanted. Returns the slides that failed every try, with why."""
    project = ctx.project
    shards = {slide_id: args[2] for slide_id, args in task_args.items()}
    shown = dict.fromkeys(task_args, 0)

    def submit(slide_id: str) -> tuple[Any, str]:
        attempt = f"{model_id}.{slide_id}.{uuid.uuid4().hex[:12]}"
        args = task_args[slide_id]
        return client.submit(pass_task, *args, extra, attempt, key=f"wsi-il-pass-{attempt}", pure=False), attempt

    def took(slide_id: str, attempt: str, result: Any) -> None:
        take(shards[slide_id], attempt)
        discard(attempt)
        advance(shards[slide_id].rows - shown[slide_id])
        shown[slide_id] = shards[slide_id].rows

    def failed_try(slide_id: str, attempt: str, exc: Exception, again: bool) -> None:
        check()  # a worker that stopped because the pass is no longer wanted did not fail
        if again:
            ctx.reporter.warn(f"the pass of {slide_id} failed ({failure_reason(exc)}); trying it again")

    def poll(running: list[tuple[str, str]]) -> None:
        check()
        _show_progress(project, [(shards[slide_id], attempt) for slide_id, attempt in running], shown, advance)

    def discard(attempt: str) -> None:
        shutil.rmtree(project.pass_attempts_dir() / attempt, ignore_errors=True)

    return run_slides(client, list(task_args), submit, took, failed_try, poll, discard)


def _show_progress(project: Project, running: Any, shown: dict[str, int], advance: Callable[[int], None]) -> None:
    """Advance the pass's bar by the rows each running attempt has done (never back: a retry starts over)."""
    for shard, attempt in list(running):
        try:
            done = int(json.loads(project.pass_attempt_file(attempt, "progress.json").read_text())["done"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not started yet, or being replaced
        if done > shown[shard.slide_id]:
            advance(done - shown[shard.slide_id])
            shown[shard.slide_id] = done


def _read_attempt(project: Project, attempt: str, shard: _Shard, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A finished attempt's arrays, refused unless they hold every row of the slide."""
    try:
        embeddings = project.read_array(project.pass_attempt_file(attempt, "embeddings.npy"))
        predictions = project.read_array(project.pass_attempt_file(attempt, "predictions.npy"))
    except (OSError, ValueError, EOFError) as exc:
        raise WsiIlError(f"the cluster's pass of {shard.slide_id} left no readable arrays ({exc})", "") from exc
    if len(embeddings) != shard.rows or predictions.shape != (shard.rows, n_classes):
        raise WsiIlError(
            f"the cluster's pass of {shard.slide_id} is not whole ({len(embeddings)} embeddings, "
            f"{len(predictions)} predictions of {shard.rows} rows)",
            "",
        )
    return embeddings, predictions


def _copy_stems(project: Project, attempt: str, shard: _Shard, stems: ProjectStems | None) -> None:
    """Put a finished attempt's stem outputs into the project's stem cache, at the slide's rows."""
    if stems is None:
        return
    rows = np.load(project.pass_attempt_file(attempt, "stems.npy"), mmap_mode="r", allow_pickle=False)
    if len(rows) != shard.rows:
        raise WsiIlError(f"the cluster's stem outputs of {shard.slide_id} are not whole", "")
    for start in range(0, shard.rows, STEM_ROWS_PER_COPY):
        stems.put(shard.start + start, np.asarray(rows[start : start + STEM_ROWS_PER_COPY]))


# ---- on the workers ---------------------------------------------------------------------------------------------
def pass_task(
    root: str,
    model_id: str,
    shard: _Shard,
    n_classes: int,
    device: str,
    chunk_sizes: tuple[int, int],
    stem_mode: str | None,
    extra: dict[str, Any],
    attempt: str,
) -> dict[str, Any]:
    """On a worker: a slide's rows of the full pass of round ``model_id``, into the attempt's own folder.
    ``chunk_sizes``: patches a chunk on a CPU and on a GPU; ``stem_mode``: ``read`` the project's complete stem
    cache, ``write`` the stem outputs into the attempt, or None (the model's stem is not frozen)."""
    from wsi_il.heads import embed_and_predict

    started = time.perf_counter()
    check_versions(current_versions(), extra["versions"], f"the worker on {socket.gethostname()}")
    project = Project(Path(root))
    folder = project.pass_attempts_dir() / attempt
    folder.mkdir(parents=True)
    worker = {"slide": shard.slide_id, "host": socket.gethostname(), "pid": os.getpid()}
    project.pass_attempt_file(attempt, "worker.json").write_text(json.dumps(worker))
    features = np.load(project.features_path(shard.slide_id), mmap_mode="r", allow_pickle=False)
    if len(features) != shard.rows:
        raise WsiIlError(
            f"{shard.slide_id}'s features hold {len(features)} rows on {socket.gethostname()}, not {shard.rows}",
            "check that every worker sees the project folder at the same path, up to date",
        )
    dev = worker_device(device)
    if dev == "cpu":
        import torch

        torch.set_num_threads(extra["threads"].get(where_running(), default_workers()))
    heads = load_tensors(project.model_path(model_id))
    init = load_tensors(project.init_model_path())
    stems = _SlideStems(project, attempt, shard, features.shape[1:], stem_mode)
    size = chunk_sizes[0] if dev == "cpu" else chunk_sizes[1]
    chunks = _watched(project, model_id, attempt, features, size)
    try:
        embeddings, predictions = embed_and_predict(
            heads, init, n_classes, chunks, shard.rows, dev, stems if stem_mode else None
        )
    finally:
        stems.close()
    project.write_array(project.pass_attempt_file(attempt, "embeddings.npy"), embeddings)
    project.write_array(project.pass_attempt_file(attempt, "predictions.npy"), predictions)
    return {"rows": shard.rows, "host": socket.gethostname(), "seconds": time.perf_counter() - started}


def _watched(
    project: Project, model_id: str, attempt: str, features: np.ndarray, size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """The slide's chunks, each only while the pass is wanted (its model current, its attempt's folder there),
    reporting the rows done after each."""
    progress = project.pass_attempt_file(attempt, "progress.json")
    for start in range(0, len(features), size):
        if not progress.parent.is_dir():
            raise _Abandoned(f"the pass of model {model_id} was stopped")
        current = project.read_json(project.state_path(), {}).get("model")
        if current != model_id:
            raise _Abandoned(f"model {current} replaced model {model_id}")
        block = np.asarray(features[start : start + size])
        yield start, block
        aside = progress.with_name(".progress.json.tmp")
        aside.write_text(json.dumps({"done": start + len(block)}))
        os.replace(aside, progress)


class _SlideStems:
    """A slide's view of the stem cache (``heads.StemCache``) on a worker: the project's complete cache read at the
    slide's rows, or the stem outputs written into the attempt for this machine to put into the cache."""

    def __init__(self, project: Project, attempt: str, shard: _Shard, shape: tuple[int, ...], mode: str | None):
        self.rows = None
        self.writer: RowWriter | None = None
        if mode == "read":
            cache = np.load(project.stems_path(), mmap_mode="r", allow_pickle=False)
            self.rows = cache[shard.start : shard.start + shard.rows]
        elif mode == "write":
            path = project.pass_attempt_file(attempt, "stems.npy")
            self.writer = RowWriter(path, (shard.rows, *shape), np.float16, create=True)

    def get(self, start: int, count: int) -> np.ndarray | None:
        return None if self.rows is None else np.asarray(self.rows[start : start + count])

    def put(self, start: int, rows: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.write(start, rows, durable=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.sync()
            self.writer.close()
            self.writer = None
