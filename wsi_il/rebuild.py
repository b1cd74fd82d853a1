"""Re-extract a project's features with new backbone weights, keeping every label.

New features are written beside the old ones (``features.next.npy``), resumably; only when every slide
is done does the manifest switch to them (a journal entry makes the switch safe against a kill). The
heads are then retrained on all labels so far, each session's query is re-embedded and a batch waiting for
review is drawn again with the new features.

After pretraining, the features can be computed first without the project lock (``stage_features``, into
``pretrain/staged/``, while the review goes on) and moved into place under the lock (``reextract`` finds them).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.config import FeatureSettings, from_dict, settings_of
from wsi_il.errors import InputError
from wsi_il.events import Reporter
from wsi_il.extraction import extract_slide
from wsi_il.features import FeatureExtractor, Weights, build_resnet, head_block_of
from wsi_il.fsutil import atomic_write_bytes
from wsi_il.project import Project
from wsi_il.threads import default_workers


def reextract(
    project: Project, weights: Weights, arch: str, reporter: Reporter, device: str, workers: int | None = None
) -> dict[str, Any]:
    """Compute every slide's features with ``weights``, switch the project to them, retrain the heads."""
    manifest = project.read_manifest()
    finish_switch(project, manifest)
    model = build_resnet(weights, settings_of(manifest).features.seed, arch)
    target = target_features(manifest, weights, arch)
    if target == manifest["features"]:
        raise InputError("the project's features already come from these weights", "nothing to do")
    if manifest.get("reextract") not in (None, target):
        _drop_staged(project, manifest)  # a run towards other weights was interrupted: start over
    manifest["reextract"] = target
    project.write_manifest(manifest)
    _adopt_staged(project, manifest, target)
    settings = from_dict(FeatureSettings, target)
    norm = manifest["normalisation"]
    extractor = FeatureExtractor(model, norm["mean"], norm["std"], device, settings.trainable, settings.input_px)
    for record in project.slides(manifest):
        if record.n_patches > 0:
            extract_slide(project, record, extractor, settings, reporter, workers or default_workers(), staged=True)
    _save_block(project, model, staged=True, trainable=settings.trainable)
    manifest["reextract"] = {**target, "switch": True}
    project.write_manifest(manifest)
    finish_switch(project, manifest)
    _refresh_sessions(project, reporter, device)
    return project.read_manifest()


def target_features(manifest: dict[str, Any], weights: Weights, arch: str) -> dict[str, Any]:
    """The feature settings of the project once switched to ``weights``."""
    return {
        **manifest["features"],
        "arch": arch,
        "weights_sha256": weights.sha256,
        "weights": weights.source if weights.kind == "file" else weights.kind,
    }


def stage_features(
    project: Project, weights: Weights, arch: str, reporter: Reporter, device: str, workers: int | None = None
) -> None:
    """Compute every slide's features with ``weights`` into ``pretrain/staged/``, without the project lock.

    Hold the pretraining lock. Resumable; the current features are not touched. ``reextract`` (under the project
    lock) moves them into place when they still fit the project, and computes only what is missing.
    """
    manifest = project.read_manifest()
    target = target_features(manifest, weights, arch)
    info_path = project.staged_info_path()
    if project.read_json(info_path) != target:
        import shutil

        shutil.rmtree(info_path.parent, ignore_errors=True)  # staged for other weights: start over
        info_path.parent.mkdir(parents=True, exist_ok=True)
        project.write_json(info_path, target)
    model = build_resnet(weights, settings_of(manifest).features.seed, arch)
    settings = from_dict(FeatureSettings, target)
    norm = manifest["normalisation"]
    extractor = FeatureExtractor(model, norm["mean"], norm["std"], device, settings.trainable, settings.input_px)
    for record in project.slides(manifest):
        if record.n_patches > 0 and record.extracted:
            paths = (project.staged_features_path(record.id), project.staged_progress_path(record.id))
            extract_slide(project, record, extractor, settings, reporter, workers or default_workers(), paths=paths)


def _adopt_staged(project: Project, manifest: dict[str, Any], target: dict[str, Any]) -> None:
    """Move features staged for exactly ``target`` into the reextract's place (slides staged whole only)."""
    if project.read_json(project.staged_info_path()) != target:
        return
    for record in project.slides(manifest):
        staged, progress = project.staged_features_path(record.id), project.staged_progress_path(record.id)
        done = int(project.read_json(progress, {"done": 0})["done"])
        if staged.is_file() and done == record.n_patches and not project.next_features_path(record.id).is_file():
            os.replace(staged, project.next_features_path(record.id))
            os.replace(progress, project.next_progress_path(record.id))


def finish_switch(project: Project, manifest: dict[str, Any]) -> None:
    """Complete a switch to new features that a kill interrupted (idempotent)."""
    staged = manifest.get("reextract")
    if not staged or not staged.get("switch"):
        return
    for record in project.slides(manifest):
        nxt = project.next_features_path(record.id)
        if nxt.is_file():
            os.replace(nxt, project.features_path(record.id))
            project.next_progress_path(record.id).unlink(missing_ok=True)
    nxt_block = project.init_model_path().with_suffix(".next.pt")
    if nxt_block.is_file():
        os.replace(nxt_block, project.init_model_path())
    manifest["features"] = {k: v for k, v in staged.items() if k != "switch"}
    del manifest["reextract"]
    project.write_manifest(manifest)
    project.write_json(project.state_path(), {"model": None, "embeddings": None, "predictions": None})


def _drop_staged(project: Project, manifest: dict[str, Any]) -> None:
    for record in project.slides(manifest):
        project.next_features_path(record.id).unlink(missing_ok=True)
        project.next_progress_path(record.id).unlink(missing_ok=True)


def _save_block(project: Project, model, staged: bool, trainable: str = "last") -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(head_block_of(model, trainable).state_dict(), buffer)
    path = project.init_model_path()
    atomic_write_bytes(path.with_suffix(".next.pt") if staged else path, buffer.getvalue())


def _refresh_sessions(project: Project, reporter: Reporter, device: str) -> None:
    """Re-take each session's query features, retrain the heads on all labels, re-embed open queries."""
    from wsi_il.model import open_context
    from wsi_il.session import extract_query_images, list_sessions, redraw_waiting_batch, refined_query, train_round

    ctx = open_context(project, device, reporter)
    index = ctx.table.index_of()
    for session in list_sessions(project):
        query = session["query"]
        if query["patch_ids"]:
            features = ctx.store.take(np.array([index[p] for p in query["patch_ids"]], dtype=np.int64))
        elif query.get("images") and all(Path(p).is_file() for p in query["images"]):
            features = extract_query_images(ctx, [Path(p) for p in query["images"]])
        else:
            reporter.warn(
                f"session {session['id']}: its query images are gone; its query patches are left out "
                "of training from now on"
            )
            features = np.zeros((0, *ctx.store.shape), dtype=np.float16)
        project.write_array(project.query_features_path(session["id"]), features.astype(np.float16))
    if project.read_ledger() or list_sessions(project):
        n = len(list(project.root.glob("models/reextract-*.pt"))) + 1
        train_round(ctx, f"reextract-{n}")
    for session in list_sessions(project):
        if session["state"] != "reviewing":
            continue
        if session["query"]["n"] and len(project.read_array(project.query_features_path(session["id"]))):
            session["q"] = refined_query(ctx, session, []).tolist()
        batch = redraw_waiting_batch(ctx, session)
        project.write_json(project.session_path(session["id"]), session)
        if batch:
            reporter.info(f"batch {batch} was drawn again with the new features (labels given so far kept)")
