"""Re-extract a project's features with new backbone weights, keeping every label.

New features are written beside the old ones (``features.next.npy``), resumably; only when every slide
is done does the manifest switch to them (a journal entry makes the switch safe against a kill). The
heads are then retrained on all labels so far, and each session's query is re-embedded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.config import FeatureSettings, from_dict
from wsi_il.database import extract_slide
from wsi_il.errors import InputError
from wsi_il.events import Reporter
from wsi_il.features import FeatureExtractor, Weights, build_resnet, default_workers, head_block_of
from wsi_il.fsutil import atomic_write_bytes
from wsi_il.project import Project


def reextract(project: Project, weights: Weights, arch: str, reporter: Reporter, device: str,
              workers: int | None = None) -> dict[str, Any]:
    """Compute every slide's features with ``weights``, switch the project to them, retrain the heads."""
    manifest = project.read_manifest()
    finish_switch(project, manifest)
    model = build_resnet(weights, int(manifest["features"].get("seed", 0)), arch)
    target = {**manifest["features"], "arch": arch, "weights_sha256": weights.sha256,
              "weights": weights.source if weights.kind == "file" else weights.kind}
    if target == manifest["features"]:
        raise InputError("the project's features already come from these weights", "nothing to do")
    if manifest.get("reextract") not in (None, target):
        _drop_staged(project, manifest)  # a run towards other weights was interrupted: start over
    manifest["reextract"] = target
    project.write_manifest(manifest)
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


def _save_block(project: Project, model, staged: bool,  # type: ignore[no-untyped-def]
                trainable: str = "last") -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(head_block_of(model, trainable).state_dict(), buffer)
    path = project.init_model_path()
    atomic_write_bytes(path.with_suffix(".next.pt") if staged else path, buffer.getvalue())


def _refresh_sessions(project: Project, reporter: Reporter, device: str) -> None:
    """Re-take each session's query features, retrain the heads on all labels, re-embed open queries."""
    from wsi_il.session import _refined_query, _train_round, extract_query_images, list_sessions, open_context

    ctx = open_context(project, device, reporter)
    index = ctx.table.index_of()
    for session in list_sessions(project):
        query = session["query"]
        if query["patch_ids"]:
            features = ctx.store.take(np.array([index[p] for p in query["patch_ids"]], dtype=np.int64))
        elif query.get("images") and all(Path(p).is_file() for p in query["images"]):
            features = extract_query_images(ctx, [Path(p) for p in query["images"]])
        else:
            reporter.warn(f"session {session['id']}: its query images are gone; its query patches are left out "
                          "of training from now on")
            features = np.zeros((0, *ctx.store.shape), dtype=np.float16)
        project.write_array(project.query_features_path(session["id"]), features.astype(np.float16))
    if project.read_ledger() or list_sessions(project):
        n = len(list(project.root.glob("models/reextract-*.pt"))) + 1
        _train_round(ctx, f"reextract-{n}")
    for session in list_sessions(project):
        if session["state"] == "reviewing" and session["query"]["n"] and len(
                project.read_array(project.query_features_path(session["id"]))):
            session["q"] = _refined_query(ctx, session, []).tolist()
            project.write_json(project.session_path(session["id"]), session)

