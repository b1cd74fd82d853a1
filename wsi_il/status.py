"""Summarise a project for `wsi-il status`: slides, sessions, labels, weights, what to do next."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from wsi_il.config import FeatureSettings, round_is_pooled, settings_of
from wsi_il.corrections import corrections
from wsi_il.project import Project, current_labels, features_pending
from wsi_il.resolution import tile_um
from wsi_il.session import list_sessions


def _weights(features: FeatureSettings) -> dict[str, Any]:
    kind = features.weights if features.weights in ("imagenet", "random") else "file"
    if kind == "random":
        text = "RANDOM initialisation (--weights random): features are not pretrained"
    elif kind == "imagenet":
        text = "torchvision ImageNet ResNet-18 (IMAGENET1K_V1)"
    elif features.weights.startswith("hf-hub:"):
        text = f"{features.weights} (local hub cache)"
    else:
        text = f"file {features.weights}"
    sha = features.weights_sha256
    return {
        "kind": kind,
        "source": features.weights,
        "sha256": sha,
        "description": text + (f", sha256 {sha[:12]}" if sha else ""),
    }


def _session_row(session: dict[str, Any]) -> dict[str, Any]:
    timed = [h["round_seconds"] for h in session["history"] if "round_seconds" in h]
    return {
        "id": session["id"],
        "label": session["label"],
        "strategy": session["strategy"],
        "k": session["k"],
        "round": session["round"],
        "rounds": session["rounds"],
        "state": session["state"],
        "query_patches": session["query"]["n"],
        "query_source": session["query"]["source"],
        "seconds_per_round": sum(timed) / len(timed) if timed else None,
        "batch_features": session["history"][-1].get("features") if session["history"] else None,
        "rounds_detail": session["history"],
    }


def pretraining_run(project: Project) -> dict[str, Any] | None:
    """The pretraining run in progress (its lock's holder), or None."""
    path = project.pretrain_lock_path()
    if not path.is_file() or Project._lock_is_stale(path):
        return None
    return project.read_json(path, None)


def pass_run(project: Project) -> dict[str, Any] | None:
    """The full pass in progress outside the project lock (its lock's holder), or None."""
    path = project.pass_lock_path()
    if not path.is_file() or Project._lock_is_stale(path):
        return None
    return project.read_json(path, None)


def _next_step(root: Path, manifest: dict[str, Any], sessions: list[dict[str, Any]], model: str | None) -> str:
    if any(features_pending(s) for s in manifest["slides"]) or manifest["normalisation"] is None:
        return f"finish the feature cache: wsi-il init {root}"
    open_session = next((s for s in sessions if s["state"] == "reviewing"), None)
    if open_session:
        batch = root / "batches" / f"{open_session['id']}-r{open_session['round']}"
        return (
            f"fill {batch / 'labels.csv'}, then: wsi-il ingest {root} {batch / 'labels.csv'}   (or end the "
            f"session here: wsi-il end {root})"
        )
    if model:
        return f"export the mask (wsi-il export {root} --out mask.geojson) or start another query (wsi-il query)"
    return f"start a session: wsi-il query {root} --region QUERY.geojson --label {manifest['classes'][0]}"


def _backbone(settings: FeatureSettings) -> dict[str, Any]:
    """The backbone, its split and what a patch costs in the feature store."""
    from wsi_il.backbones import bytes_per_patch
    from wsi_il.features import store_shape

    return {
        "arch": settings.arch,
        "arch_args": settings.arch_args,
        "trainable": settings.trainable,
        "input_px": settings.input_px,
        "bytes_per_patch": bytes_per_patch(store_shape(settings)),
        "mean": settings.mean,
        "std": settings.std,
        "interpolation": settings.interpolation,
    }


def _rounds(settings: Any, patches: int) -> dict[str, Any]:
    """How the project's rounds pick their batches: the setting and what it means at the project's size."""
    mode = settings.round
    return {
        "round_mode": mode.round_mode,
        "pool_size": mode.pool_size,
        "pooled": round_is_pooled(mode, patches),
    }


def project_status(root: Path) -> dict[str, Any]:
    """Collect everything `wsi-il status` shows, as a JSON-ready dict."""
    project = Project(root)
    manifest = project.read_manifest()
    sessions = list_sessions(project)
    ledger = project.read_ledger()
    state = project.read_json(project.state_path(), {"model": None})
    labelled = current_labels(ledger)
    counts = Counter(e["label"] for e in labelled.values())
    settings = settings_of(manifest)
    tiling = settings.tiling
    slides = [
        {
            "id": s["id"],
            "kind": s["kind"],
            "path": s["path"],
            "width": s["width"],
            "height": s["height"],
            "mpp": s["mpp"],
            "mpp_given": s.get("mpp_given", False),
            "patches": s["n_patches"],
            "tile_um": tile_um(tiling, s["mpp"]) if s["kind"] == "slide" else None,
            "tiled": s["tiled"],
            "extracted": s["extracted"],
        }
        for s in manifest["slides"]
    ]
    return {
        "project": str(root),
        "uid": manifest["uid"],
        "classes": manifest["classes"],
        "weights": _weights(settings.features),
        "settings": {k: manifest[k] for k in ("tiling", "train")},
        "rounds": _rounds(settings, sum(s["patches"] for s in slides)),
        "trainable": settings.features.trainable,
        "normalisation": manifest.get("normalisation"),
        "backbone": _backbone(settings.features),
        "slides": slides,
        "patches": sum(s["patches"] for s in slides),
        "sessions": [_session_row(s) for s in sessions],
        "n_labels": len(labelled),
        "labels": dict(counts),
        "corrections": corrections(ledger),
        "pretraining": pretraining_run(project),
        "model": state.get("model"),
        "predictions_of": state.get("predictions"),
        "map_from": settings.train.map_from,
        "map_of": state.get("map"),
        "full_pass": pass_run(project),
        "next": _next_step(Path(root), manifest, sessions, state.get("model")),
        "versions": (manifest.get("provenance") or {}).get("versions"),
    }
