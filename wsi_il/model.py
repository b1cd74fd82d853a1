"""The project's model state: a project opened for a command (``Context``), the heads saved after each round, and
every patch's embedding and prediction under the current heads, computed once a model and cached.

The rounds that train and use this state are ``wsi_il.session``'s.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.config import settings_of
from wsi_il.database import FeatureStore, PatchTable, patch_table
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.events import Reporter
from wsi_il.fsutil import atomic_write_bytes
from wsi_il.project import Project, check_settings, current_versions, features_pending
from wsi_il.stems import ProjectStems, stem_key

EMBED_CHUNK = 256
"""Patches per block of a pass over the database (embedding, prediction) on a CPU."""
GPU_EMBED_CHUNK = 2048
"""The same on a GPU, where each block's fixed cost (kernel launches, a wait for its results) would otherwise
set the pace: 12,500 patches are seven blocks, not forty-nine."""


def embed_chunk(device: Any) -> int:
    """Patches per block of a pass over the database on ``device``."""
    return EMBED_CHUNK if str(device).startswith("cpu") else GPU_EMBED_CHUNK


@dataclass
class Context:
    """An opened project, ready for a session command."""

    project: Project
    manifest: dict[str, Any]
    table: PatchTable
    store: FeatureStore
    device: str
    reporter: Reporter

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def class_index(self, name: str) -> int:
        lowered = [c.lower() for c in self.classes]
        if name.lower() not in lowered:
            raise InputError(
                f"label {name!r} is not one of the project's classes: {', '.join(self.classes)}",
                "pick one of them with --label",
            )
        return lowered.index(name.lower())

    def offsets(self) -> dict[str, tuple[float, float]]:
        return {s.id: s.offset for s in self.table.slides}


def open_context(project: Project, device: str, reporter: Reporter) -> Context:
    """Open a project whose features are complete, made with the settings it records."""
    manifest = project.read_manifest()
    for warning in check_settings(project.manifest_path(), manifest):
        reporter.warn(warning)
    unfinished = [s["id"] for s in manifest["slides"] if features_pending(s)]
    if unfinished or not manifest["slides"]:
        raise ProjectStateError(
            f"the features of {', '.join(unfinished) or 'any slide'} are not computed yet",
            f"run `wsi-il init {project.root}` again to finish them",
        )
    try:
        table = patch_table(project, manifest)
        store = FeatureStore(project, manifest)
    except (ValueError, EOFError) as exc:  # numpy's words for a cut or overwritten .npy file
        raise ProjectStateError(
            f"the patch or feature cache of {project.root} is damaged ({exc})",
            "restore the project folder from a backup (wsi-il writes these files whole or "
            "resumably, so something else changed them)",
        ) from exc
    if len(store) != len(table):
        raise ProjectStateError(
            f"the feature cache of {project.root} holds {len(store)} patches, its patch table {len(table)}",
            "restore the project folder from a backup",
        )
    return Context(project, manifest, table, store, device, reporter)


def init_state(ctx: Context) -> dict[str, Any]:
    """The trainable part's pretrained weights, the start of every head."""
    return load_tensors(ctx.project.init_model_path())


def load_tensors(path: Path) -> dict[str, Any]:
    """Load a model file of the project as plain tensors (``weights_only``: a pickled object is never run)."""
    import pickle

    import torch

    if not path.is_file():
        raise ProjectStateError(
            f"{path} is missing", "restore the project folder from a backup; a model file is only ever replaced whole"
        )
    hint = (
        "it was replaced or damaged outside wsi-il: restore it from a backup, or delete it and ingest the "
        "last batch again"
    )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ProjectStateError(
            f"{path} holds pickled Python objects, not plain tensors: it was not loaded (wsi-il writes only tensors)",
            hint,
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().split("\n")[0] or type(exc).__name__
        raise ProjectStateError(f"{path} is damaged and was not loaded ({first[:160]})", hint) from exc
    if not isinstance(data, dict):
        raise ProjectStateError(f"{path} does not hold a wsi-il model", "restore it from a backup")
    return data


def model_state(ctx: Context) -> dict[str, Any]:
    """The project's current model and the model its cached embeddings and predictions come from."""
    return ctx.project.read_json(ctx.project.state_path(), {"model": None, "embeddings": None})


def load_model(ctx: Context, model_id: str) -> dict[str, Any]:
    """The heads saved by round ``model_id``, refused when they were trained for other classes."""
    path = ctx.project.model_path(model_id)
    data = load_tensors(path)
    if data.get("classes") not in (None, ctx.classes):
        raise ProjectStateError(
            f"{path} was trained for the classes {', '.join(map(str, data['classes']))}, "
            f"not this project's {', '.join(ctx.classes)}",
            "restore the model file that belongs to this project",
        )
    return data


def save_model(ctx: Context, model_id: str, data: dict[str, Any]) -> None:
    """Save a round's heads whole, with the training settings and versions that made them."""
    import torch

    made_with = {"train": ctx.manifest["train"], "versions": current_versions()}
    buffer = io.BytesIO()
    torch.save({**data, "made_with": made_with}, buffer)
    atomic_write_bytes(ctx.project.model_path(model_id), buffer.getvalue())


def current_embeddings(ctx: Context) -> np.ndarray:
    """Return every patch's embedding under the current retrieval head (computed once per model)."""
    from wsi_il.heads import embed, pretrained_retrieval

    state = model_state(ctx)
    key = state["model"] or "pretrained"
    path = ctx.project.embeddings_path()
    if state.get("embeddings") == key and path.is_file():
        cached = ctx.project.read_array(path)
        if len(cached) == len(ctx.store):  # slides added since then make it stale
            return cached
    init = init_state(ctx)
    model = load_model(ctx, key) if state["model"] else None
    retrieval = model["retrieval"] if model else pretrained_retrieval(init)
    stems = stem_cache(ctx, retrieval, init) if model is None or model.get("frozen_stem") else None
    advance = ctx.reporter.task(pass_title("embedding the database", stems), len(ctx.store))
    embeddings = embed(
        retrieval, init, counted(ctx.store.chunks(embed_chunk(ctx.device)), advance), len(ctx.store), ctx.device, stems
    )
    if stems is not None:
        stems.finish()
    ctx.project.write_array(path, embeddings)
    ctx.project.write_json(ctx.project.state_path(), {**state, "embeddings": key})
    return embeddings


def stem_cache(ctx: Context, block_state: dict[str, Any], init: dict[str, Any]) -> ProjectStems | None:
    """The stem cache for a block (keys ``block.conv1.weight`` ...) in a project whose rounds keep the stem frozen
    (the fast schedule with ``fast_frozen_conv1`` on this device, one trainable block); None elsewhere."""
    from wsi_il.config import resolve_schedule
    from wsi_il.heads import single_block

    settings = settings_of(ctx.manifest).train
    if not (settings.fast_frozen_conv1 and resolve_schedule(settings, ctx.device) == "fast" and single_block(init)):
        return None
    return ProjectStems(ctx.project, stem_key(block_state, ctx.project, ctx.manifest), len(ctx.store), ctx.store.shape)


def pass_title(title: str, stems: ProjectStems | None) -> str:
    """The progress title of a pass over the database, saying when the pass also fills the stem cache."""
    return title if stems is None or stems.complete else f"{title} (caching the frozen stem)"


def counted(chunks, advance):
    """Pass the database's chunks through, advancing the progress by each one's patches."""
    for start, block in chunks:
        yield start, block
        advance(len(block))


def current_predictions(ctx: Context) -> np.ndarray | None:
    """Return every patch's class probabilities under the current classifier, or None before one."""
    from wsi_il.heads import predict

    state = model_state(ctx)
    if not state["model"]:
        return None
    path = ctx.project.predictions_path()
    if state.get("predictions") == state["model"] and path.is_file():
        cached = ctx.project.read_array(path)
        if len(cached) == len(ctx.store):
            return cached
    classifier = load_model(ctx, state["model"])["classifier"]
    advance = ctx.reporter.task("predicting the database", len(ctx.store))
    predictions = predict(
        classifier,
        init_state(ctx),
        len(ctx.classes),
        counted(ctx.store.chunks(embed_chunk(ctx.device)), advance),
        len(ctx.store),
        ctx.device,
    )
    ctx.project.write_array(path, predictions)
    ctx.project.write_json(ctx.project.state_path(), {**model_state(ctx), "predictions": state["model"]})
    return predictions


def last_pass_predictions(ctx: Context) -> tuple[np.ndarray, str] | None:
    """The predictions of the last full pass over the database (memory-mapped) and the model they come from, which
    a pooled round's pass may not have caught up with yet; None before any pass."""
    of = model_state(ctx).get("predictions")
    path = ctx.project.predictions_path()
    if not of or not path.is_file():
        return None
    cached = ctx.project.read_array(path, mmap=True)
    return (cached, str(of)) if len(cached) == len(ctx.store) else None


def slides_matching(ctx: Context, slide_id: str | None) -> list[Any]:
    """Return the project's slides (not patch folders), only the one named by id or file name when given."""
    slides = [s for s in ctx.table.slides if s.kind == "slide"]
    if slide_id is None:
        return slides
    return [s for s in slides if s.id == slide_id or Path(s.path).name == slide_id]


def embed_features(ctx: Context, features: np.ndarray) -> np.ndarray:
    """Embed trunk features (a query's) under the current retrieval head, or the pretrained one before any round."""
    from wsi_il.heads import embed, pretrained_retrieval

    state = model_state(ctx)
    init = init_state(ctx)
    retrieval = load_model(ctx, state["model"])["retrieval"] if state["model"] else pretrained_retrieval(init)
    return embed(retrieval, init, [(0, features)], len(features), ctx.device)
