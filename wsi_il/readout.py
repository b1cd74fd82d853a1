"""The map: every patch's class probabilities as a person sees them, read out of the pretrained block.

Each round the trained heads steer the search: the query vector ranks the slide in the retrieval head's embedding,
and the sampling reads the classifier head's predictions (``model.current_predictions``). What a person sees and
exports (the export, ``evaluate``, the review desk's overlay and suggestions, a batch's suggestions) is the *map*.
With ``TrainSettings.map_from`` 'readout' (the default) it is a logistic regression (``heads.fit_logistic``) of
every reviewed label and every query patch on the pretrained block's pooled output (the frozen embedding times
its norm, ``pool.frozen_embeddings``, computed once per project), fitted each round after the heads are trained: each
session's query region weighs as much as ``heads.QUERY_GROUP_SIZE`` labels however large it is drawn, and each
class weighs the same in total. On exact truth (docs/quality.md "The map: a read-out of the pretrained block") it
gives a region covering most of a tumour island a map at least as good as ten query patches, where the trained
classifier over-calls, and costs ten patches nothing. With 'heads' (the paper) the map is the classifier head's
predictions, as are the maps of models without a read-out (labels of one kind only; projects made before the
setting existed).

The read-out is saved in the round's model file (``readout``: ``weight`` (C, D), ``bias`` (C,)); the map is kept in
``state/map.npy`` for the model it comes from (``state.json`` "map").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsi_il.errors import ProjectStateError
from wsi_il.model import Context, current_predictions, init_state, load_model, model_state

MAP_CHUNK = 65536
"""Patches whose map is computed at a time (bounds the memory of a large project's map)."""


def readout_weights(targets: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Loss weights (mean 1) of the read-out's rows: a reviewed label (group -1) weighs 1, each session's query
    patches (group: the session's number) together as much as ``QUERY_GROUP_SIZE`` labels (each at most 1); then
    each target value (class, or "not class c") is scaled to the same total."""
    from wsi_il.heads import QUERY_GROUP_SIZE

    targets, groups = np.asarray(targets), np.asarray(groups)
    weights = np.ones(len(targets), dtype=np.float64)
    for group in np.unique(groups[groups >= 0]):
        rows = groups == group
        weights[rows] = min(1.0, QUERY_GROUP_SIZE / rows.sum())
    for value in np.unique(targets):
        rows = targets == value
        weights[rows] /= weights[rows].sum()
    return (weights / weights.mean()).astype(np.float32)


def fit_readout(
    features: np.ndarray | None,
    targets: np.ndarray,
    groups: np.ndarray,
    init: dict[str, Any],
    n_classes: int,
    device: str,
    pooled: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """The read-out of training rows (cached trunk features, their targets and groups as
    ``session._training_rows``): ``{"weight", "bias"}`` (CPU tensors) on the pretrained block's pooled output
    (``pooled``, where it is known already: then ``features`` may be None), or None with a single kind of target
    (nothing to separate)."""
    import torch

    from wsi_il.heads import fit_logistic, pooled_output, pretrained_retrieval

    targets = np.asarray(targets, dtype=np.int64)
    if len(np.unique(targets)) < 2:
        return None
    if pooled is None:
        pooled = pooled_output(pretrained_retrieval(init), init, [(0, features)], len(features), device)
    weights = torch.from_numpy(readout_weights(targets, groups))
    x = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))
    weight, bias = fit_logistic(x, torch.from_numpy(targets), weights, n_classes)
    return {"weight": weight.detach().cpu(), "bias": bias.detach().cpu()}


def project_readout(
    ctx: Context, features: np.ndarray | None, targets: np.ndarray, groups: np.ndarray, patches: np.ndarray
) -> dict[str, Any] | None:
    """The read-out of a project's training rows (``session.training_entries``: ``patches`` holds each row's
    database index, -1 outside the database; ``features`` may be None when every row is a database patch). A
    database patch's pooled output is read from the frozen embedding and its norm, computed once (the map's own
    input); only a query from outside the database runs the block."""
    from wsi_il.heads import pooled_output, pretrained_retrieval
    from wsi_il.pool import frozen_embeddings, frozen_norms

    patches = np.asarray(patches, dtype=np.int64)
    known = patches >= 0
    init = init_state(ctx)
    frozen, norms = frozen_embeddings(ctx), frozen_norms(ctx)
    pooled = np.empty((len(patches), frozen.shape[1]), dtype=np.float32)
    pooled[known] = np.asarray(frozen[patches[known]], dtype=np.float32) * np.asarray(norms[patches[known]])[:, None]
    if not known.all():
        outside = features[~known]
        pooled[~known] = pooled_output(pretrained_retrieval(init), init, [(0, outside)], len(outside), ctx.device)
    return fit_readout(features, targets, groups, init, len(ctx.classes), ctx.device, pooled)


def map_probabilities(frozen: np.ndarray, norms: np.ndarray, readout: dict[str, Any]) -> np.ndarray:
    """Class probabilities float32 (n, C) under a read-out of the pooled outputs whose frozen embeddings (n, D) and
    norms (n,) are given (the pooled output is their product)."""
    weight = np.asarray(readout["weight"], dtype=np.float32)
    bias = np.asarray(readout["bias"], dtype=np.float32)
    out = np.empty((len(frozen), len(bias)), dtype=np.float32)
    for start in range(0, len(frozen), MAP_CHUNK):
        part = slice(start, start + MAP_CHUNK)
        logits = np.asarray(frozen[part], dtype=np.float32) @ weight.T
        logits *= np.asarray(norms[part], dtype=np.float32)[:, None]
        logits += bias
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        out[part] = logits / logits.sum(axis=1, keepdims=True)
    return out


def readout_of_features(readout: dict[str, Any], features: np.ndarray, init: dict[str, Any], device: str) -> np.ndarray:
    """Class probabilities float32 (n, C) of cached trunk features (not of the database: a test set's) under a
    read-out."""
    from wsi_il.heads import pooled_output, pretrained_retrieval

    pooled = pooled_output(pretrained_retrieval(init), init, [(0, features)], len(features), device)
    return map_probabilities(pooled, np.ones(len(pooled), dtype=np.float32), readout)


def train_readout(
    ctx: Context, features: np.ndarray, targets: np.ndarray, groups: np.ndarray, patches: np.ndarray
) -> dict | None:
    """A round's read-out of its training rows (``project_readout``) where the project's map comes from one; None
    where it does not ('heads') or cannot (labels of one kind)."""
    from wsi_il.config import settings_of

    if settings_of(ctx.manifest).train.map_from != "readout":
        return None
    return project_readout(ctx, features, targets, groups, patches)


def write_map(ctx: Context, model_id: str, readout: dict[str, Any] | None) -> None:
    """Compute and keep the map of model ``model_id`` (the current one) from its read-out; without one the map is
    the model's predictions, and any kept map is dropped."""
    from wsi_il.pool import frozen_embeddings, frozen_norms

    if readout is None:
        ctx.project.map_path().unlink(missing_ok=True)
        ctx.project.write_json(ctx.project.state_path(), {**model_state(ctx), "map": None})
        return
    ctx.project.write_array(
        ctx.project.map_path(), map_probabilities(frozen_embeddings(ctx), frozen_norms(ctx), readout)
    )
    ctx.project.write_json(ctx.project.state_path(), {**model_state(ctx), "map": model_id})


def kept_map(ctx: Context) -> np.ndarray | None:
    """The current model's map where it comes from a read-out (computed and kept where it is missing); None before
    any model and where the map is the classifier head's predictions."""
    state = model_state(ctx)
    if not state["model"]:
        return None
    path = ctx.project.map_path()
    if state.get("map") == state["model"] and path.is_file():
        cached = ctx.project.read_array(path, mmap=True)
        if len(cached) == len(ctx.store):
            return cached
    readout = load_model(ctx, state["model"]).get("readout")
    if readout is None:
        return None
    write_map(ctx, state["model"], readout)
    return ctx.project.read_array(path, mmap=True)


def current_map(ctx: Context) -> np.ndarray | None:
    """Every patch's class probabilities as shown and exported under the current model (its read-out's, or its
    classifier head's where it has none); None before any model."""
    found = kept_map(ctx)
    return current_predictions(ctx) if found is None else found


def require_map(ctx: Context) -> np.ndarray:
    """Return the current map, refusing when no model exists yet."""
    found = current_map(ctx)
    if found is None:
        raise ProjectStateError(
            "no classifier has been trained yet",
            f"review and ingest at least one batch (`wsi-il status {ctx.project.root}`)",
        )
    return found


def shown_path(project: Any) -> Any:
    """The file of the map a reader without a context (the review desk) shows: the kept map where it belongs to the
    current model, else the predictions file (which may not exist yet)."""
    state = project.read_json(project.state_path(), {})
    if state.get("model") and state.get("map") == state.get("model") and project.map_path().is_file():
        return project.map_path()
    return project.predictions_path()
