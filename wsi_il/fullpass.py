"""A pooled round's full pass, run outside the project lock (docs/cluster.md "Rounds at cohort scale").

A pooled ``ingest`` writes the next batch and the session file under the project lock and leaves the full pass
(every patch re-embedded and predicted with the round's heads) to ``run_pass``, which its caller runs after
releasing that lock: the expert can ingest the next batch meanwhile.

- The pass holds its own lock (``pass/lock``), so one pass runs at a time, and writes its arrays under
  ``pass/``, named by its model (``Project.pass_arrays``), never over the live ones.
- Between chunks it reads the project's state: when a newer round's model is current, it stops, leaving the
  pass to that round's runner (who waits for the pass lock).
- Its arrays are entered under the project lock, taken briefly, only when its model is still the current one and
  the features are those it read; otherwise they are discarded. Entering clears the state's record of the
  cached arrays, moves the two arrays into place, then names their model: a kill at any point leaves complete
  arrays of a named model, or none named, and the next ingest of the batch finishes the pass.
- Given a Dask cluster, the computation runs on its workers, a slide a task (``wsi_il.clusterpass``); the checks
  and the entering are the same.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_il.errors import ProjectStateError
from wsi_il.fsutil import fsync_dir
from wsi_il.model import Context, counted, embed_chunk, init_state, load_model, model_state, pass_title, stem_cache
from wsi_il.project import Project
from wsi_il.stems import add_feature_files

if TYPE_CHECKING:
    from wsi_il.clusterpass import ClusterPass


@dataclass(frozen=True)
class PassOutcome:
    """What ``run_pass`` did with a model's full pass."""

    model: str
    entered: bool
    """Whether the model's embeddings and predictions are now the project's cached ones."""
    seconds: float
    message: str


class _Superseded(Exception):
    """A newer model became current while the pass ran."""

    def __init__(self, current: str | None) -> None:
        super().__init__(current)
        self.current = current


def run_pass(
    ctx: Context,
    model_id: str,
    on_wait: Callable[[str], None] = lambda holder: None,
    stop: Callable[[], bool] = lambda: False,
    guard: AbstractContextManager[Any] | None = None,
    cluster: ClusterPass | None = None,
) -> PassOutcome:
    """Embed and predict every patch with round ``model_id``'s heads outside the project lock and enter the
    results when the model is still current.

    ``on_wait`` is told once about a lock it waits for (another pass, a round in progress). ``stop`` is asked
    between chunks and while waiting whether to give up (the review desk closing): the pass then ends without
    entering anything. ``guard`` is held around taking the
    project lock to enter (the review desk's turn at it, so that a submit in the same process waits for it
    instead of finding the lock taken). ``cluster``: compute on that Dask cluster's workers, a slide a task
    (``wsi_il.clusterpass``), and enter the result the same way; a slide that fails there every try raises
    ``cluster.ClusterError`` and nothing is entered."""
    started = time.perf_counter()
    try:
        return _run(ctx, model_id, on_wait, stop, guard, cluster, started)
    except ProjectStateError:
        if not stop():
            raise
        return _outcome(model_id, False, started, f"the full pass of model {model_id} was stopped")


def _run(
    ctx: Context,
    model_id: str,
    on_wait: Callable[[str], None],
    stop: Callable[[], bool],
    guard: AbstractContextManager[Any] | None,
    cluster: ClusterPass | None,
    started: float,
) -> PassOutcome:
    project = ctx.project
    with project.lock_when_free(f"pass {model_id}", on_wait, poll_s=0.5, scope="pass", stop=stop):
        for leftover in project.pass_dir().glob("*.npy"):  # a pass killed before entering its arrays
            leftover.unlink(missing_ok=True)
        shutil.rmtree(project.pass_attempts_dir(), ignore_errors=True)  # and its workers' attempts
        state = model_state(ctx)
        if state["model"] != model_id:
            return _outcome(model_id, False, started, _replaced(model_id, state["model"]))
        if state.get("embeddings") == state.get("predictions") == model_id:
            return _outcome(model_id, True, started, f"predictions are already those of model {model_id}")
        features = _features_key(project, ctx.manifest)
        try:
            embeddings, predictions = _compute(ctx, model_id, stop, cluster)
        except _Superseded as newer:
            return _outcome(model_id, False, started, _replaced(model_id, newer.current))
        if embeddings is None:
            return _outcome(model_id, False, started, f"the full pass of model {model_id} was stopped")
        paths = project.pass_arrays(model_id)
        project.write_array(paths[0], embeddings)
        project.write_array(paths[1], predictions)
        entering = f"pass {model_id} (entering its predictions)"
        with guard or nullcontext(), project.lock_when_free(entering, on_wait, poll_s=0.5, stop=stop):
            return _enter(ctx, model_id, paths, features, started)


def _compute(
    ctx: Context, model_id: str, stop: Callable[[], bool], cluster: ClusterPass | None
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """The pass itself, as a synchronous round runs it (or on the cluster); (None, None) when ``stop`` said so."""
    from wsi_il.heads import embed_and_predict

    if cluster is not None:
        from wsi_il.clusterpass import compute_on_cluster

        try:
            return compute_on_cluster(ctx, model_id, cluster, lambda: _check(ctx, model_id, stop))
        except _Stopped:
            return None, None
    init = init_state(ctx)
    model = load_model(ctx, model_id)
    stems = stem_cache(ctx, model["classifier"], init) if model.get("frozen_stem") else None
    advance = ctx.reporter.task(pass_title("re-embedding and predicting", stems), len(ctx.store))
    chunks = _watched(ctx, model_id, stop, counted(ctx.store.chunks(embed_chunk(ctx.device)), advance))
    try:
        embeddings, predictions = embed_and_predict(
            model, init, len(ctx.classes), chunks, len(ctx.store), ctx.device, stems
        )
    except _Stopped:
        return None, None
    if stems is not None:
        stems.finish()
    return embeddings, predictions


class _Stopped(Exception):
    """The caller asked the pass to stop."""


def _watched(
    ctx: Context, model_id: str, stop: Callable[[], bool], chunks: Iterator[tuple[int, np.ndarray]]
) -> Iterator[tuple[int, np.ndarray]]:
    """Hand on the chunks, checking before each that the pass is still wanted (not stopped, its model current)."""
    for chunk in chunks:
        _check(ctx, model_id, stop)
        yield chunk


def _check(ctx: Context, model_id: str, stop: Callable[[], bool]) -> None:
    """Raise when the caller asked the pass to stop, or a newer model than ``model_id`` is current."""
    if stop():
        raise _Stopped()
    current = model_state(ctx)["model"]
    if current != model_id:
        raise _Superseded(current)


def _enter(ctx: Context, model_id: str, paths: tuple[Path, Path], features: str, started: float) -> PassOutcome:
    """Move a pass's arrays into place (the caller holds both locks) when its model and features are current."""
    project = ctx.project
    state = model_state(ctx)
    stale = None
    if state["model"] != model_id:
        stale = _replaced(model_id, state["model"])
    elif _features_key(project, project.read_manifest()) != features:
        stale = f"the features changed while model {model_id}'s full pass ran: it was discarded (ingest redoes it)"
    if stale is not None:
        for path in paths:
            path.unlink(missing_ok=True)
        return _outcome(model_id, False, started, stale)
    project.write_json(project.state_path(), {**state, "embeddings": None, "predictions": None})
    os.replace(paths[0], project.embeddings_path())
    os.replace(paths[1], project.predictions_path())
    fsync_dir(project.embeddings_path().parent)
    project.write_json(project.state_path(), {**model_state(ctx), "embeddings": model_id, "predictions": model_id})
    return _outcome(model_id, True, started, f"predictions updated to model {model_id}")


def _replaced(model_id: str, current: str | None) -> str:
    return f"model {current} replaced model {model_id} meanwhile: its full pass was discarded (the newer one runs)"


def _features_key(project: Project, manifest: dict[str, Any]) -> str:
    """What identifies the feature files the pass reads (an ``add-slide`` or ``reextract`` changes it)."""
    digest = hashlib.sha256()
    add_feature_files(digest, project, manifest)
    return digest.hexdigest()


def _outcome(model_id: str, entered: bool, started: float, message: str) -> PassOutcome:
    return PassOutcome(model_id, entered, time.perf_counter() - started, message)
