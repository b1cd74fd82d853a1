"""Write the predicted masks: QuPath GeoJSON per slide and an overview picture."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_il import __version__
from wsi_il.config import settings_of
from wsi_il.errors import InputError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text
from wsi_il.model import Context, model_state, slides_matching
from wsi_il.overview import Marks, Overview
from wsi_il.project import SlideRecord
from wsi_il.readout import require_map


@dataclass(frozen=True)
class ExportedSlide:
    """What export wrote for one slide."""

    slide: str
    geojson: Path
    overview: Path | None
    patches_per_class: dict[str, int]


def provenance(ctx: Context) -> dict[str, object]:
    """Describe what produced a prediction: weights, model, labels (goes into every export)."""
    features = settings_of(ctx.manifest).features
    state = model_state(ctx)
    info: dict[str, object] = {
        "tool": f"wsi-il {__version__}",
        "project": ctx.manifest["uid"],
        "weights": features.weights,
        "weights_sha256": features.weights_sha256,
        "model": state.get("model"),
        "labels": state.get("n_labels"),
    }
    if features.weights == "random":
        info["warning"] = "features from RANDOMLY initialised weights: not a pretrained model"
    return info


def _metadata(info: dict[str, object]) -> dict[str, str]:
    """Provenance as QuPath's metadata map (strings, kept by QuPath), e.g. ``wsi_il.weights``; None is left out."""
    return {f"wsi_il.{key}": str(value) for key, value in info.items() if value is not None}


def _out_path(out: Path, slide: str, several: bool, suffix: str) -> Path:
    base = out.name[: -len("".join(out.suffixes))] if out.suffixes else out.name
    name = f"{base}.{slide}{suffix}" if several else f"{base}{suffix}"
    return out.with_name(name)


def export_masks(
    ctx: Context,
    out: Path,
    slide_id: str | None = None,
    label: str | None = None,
    detections: bool = False,
    overview: bool = True,
) -> list[ExportedSlide]:
    """Write one GeoJSON per slide with one MultiPolygon annotation per predicted class."""
    predictions = require_map(ctx)
    slides = slides_matching(ctx, slide_id)
    if slide_id is not None:
        if not slides:
            raise InputError(
                f"slide {slide_id!r} is not in the project", f"use one of: {', '.join(s.id for s in ctx.table.slides)}"
            )
    if not slides:
        raise InputError(
            "the project has no slides to export masks for (it is a patch-folder database)",
            "use `wsi-il export PROJECT --out predictions.csv` for patch folders",
        )
    classes = [ctx.classes[ctx.class_index(label)]] if label else ctx.classes
    marks = overview_marks(ctx) if overview else None
    return [
        _export_slide(
            ctx, s, predictions, classes, out, len(slides) > 1, detections, None if marks is None else marks[s.id]
        )
        for s in slides
    ]


def _export_slide(
    ctx: Context,
    slide: SlideRecord,
    predictions: np.ndarray,
    classes: list[str],
    out: Path,
    several: bool,
    detections: bool,
    marks: Marks | None,
) -> ExportedSlide:
    """Write one slide's GeoJSON and, given the expert's ``marks`` on it, its overview picture."""
    from wsi_il.qupath import class_color, make_feature, union_squares, write_features

    indices = ctx.table.of_slide(slide.id)
    boxes = ctx.table.boxes[indices]
    probs = predictions[indices]
    predicted = probs.argmax(axis=1)
    info = provenance(ctx)
    features, counts = [], {}
    for name in classes:
        c = ctx.class_index(name)
        chosen = predicted == c
        counts[name] = int(chosen.sum())
        if not chosen.any():
            continue
        shape = union_squares(boxes[chosen, 0], boxes[chosen, 1], int(boxes[0, 2]), int(boxes[0, 3]))
        features.append(
            make_feature(
                shape,
                name=f"{name} (wsi-il)",
                classification=name,
                color=class_color(name),
                measurements={"Patches": float(chosen.sum())},
                metadata=_metadata({**info, "slide": slide.id}),
                offset=slide.offset,
            )
        )
    if detections:
        features.extend(_detections(ctx, boxes, probs, slide.offset))
    path = _out_path(out, slide.id, several, ".geojson")
    write_features(path, features)
    picture = _out_path(out, slide.id, several, ".png") if marks is not None else None
    if picture is not None:
        write_overview(
            picture,
            slide,
            boxes,
            predicted,
            [ctx.class_index(n) for n in classes],
            ctx.classes,
            marks,
            _overview_notes(info),
            info.get("warning"),
        )
    return ExportedSlide(slide.id, path, picture, counts)


def _overview_notes(info: dict[str, object]) -> str:
    return f"model {info.get('model') or '-'}, trained on {info.get('labels') or 0} labels ({info['tool']})"


def _detections(ctx: Context, boxes: np.ndarray, probs: np.ndarray, offset: tuple[float, float]) -> list[dict]:
    import shapely

    from wsi_il.qupath import class_color, make_feature

    squares = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3])
    out = []
    for square, row in zip(squares, probs, strict=True):
        best = int(row.argmax())
        measurements = {f"{name} probability": float(p) for name, p in zip(ctx.classes, row, strict=True)}
        out.append(
            make_feature(
                square,
                object_type="detection",
                classification=ctx.classes[best],
                color=class_color(ctx.classes[best]),
                measurements=measurements,
                offset=offset,
            )
        )
    return out


OVERVIEW_PANEL_PX = 1400
"""The longer side of each of the overview's two pictures of the slide."""


def write_overview(
    path: Path,
    slide: SlideRecord,
    boxes: np.ndarray,
    predicted: np.ndarray,
    shown: list[int],
    classes: list[str],
    marks: Marks | None = None,
    notes: str = "",
    warning: str | None = None,
    max_px: int = OVERVIEW_PANEL_PX,
) -> Overview:
    """Save the overview PNG: the slide with the expert's labels and queries beside it with the predicted classes
    (a light wash and an edge line each), under a legend (``wsi_il.overview``); return what was drawn."""
    from wsi_il import png
    from wsi_il.overview import render_overview
    from wsi_il.slide import read_thumbnail
    from wsi_il.threads import core_threads, default_workers

    thumb, scale = read_thumbnail(Path(slide.path), max_px)
    header = [f"{slide.id}: {notes}" if notes else slide.id]
    drawn = render_overview(thumb, scale, boxes, predicted, shown, classes, marks or Marks(), header, warning)
    rgb = np.asarray(drawn.image)
    stripes = list(
        core_threads().map(
            lambda bounds: png.encode_stripe(rgb, *bounds, OVERVIEW_COMPRESS_LEVEL),
            png.stripe_bounds(rgb.shape[0], default_workers()),
        )
    )
    atomic_write_bytes(path, png.assemble(drawn.image.width, drawn.image.height, stripes))
    return drawn


OVERVIEW_COMPRESS_LEVEL = 3
"""zlib level of the overview PNG, encoded in stripes on every core (``wsi_il.png``)."""


def overview_marks(ctx: Context) -> dict[str, Marks]:
    """Each slide's labelled patches (each one's label now: the newest ledger entry wins) and each session's query
    patches on it, as positions among the slide's patches."""
    from wsi_il.project import current_labels
    from wsi_il.session import list_sessions

    index_of = ctx.table.index_of()
    current = current_labels(ctx.project.read_ledger())
    known = [patch_id for patch_id in current if patch_id in index_of]
    labelled = np.array([index_of[p] for p in known], dtype=np.int64)
    labels = np.array([current[p]["label"] for p in known], dtype=object)
    queries = [
        (
            session["id"],
            np.array([index_of[p] for p in session["query"].get("patch_ids") or [] if p in index_of], dtype=np.int64),
        )
        for session in list_sessions(ctx.project)
    ]
    marks = {}
    for number, slide in enumerate(ctx.table.slides):
        indices = np.flatnonzero(ctx.table.slide_index == number)
        on_slide = ctx.table.slide_index[labelled] == number
        slide_queries = [
            (session, np.searchsorted(indices, found[ctx.table.slide_index[found] == number]))
            for session, found in queries
        ]
        marks[slide.id] = Marks(
            np.searchsorted(indices, labelled[on_slide]),
            tuple(labels[on_slide].tolist()),
            tuple((session, found) for session, found in slide_queries if len(found)),
        )
    return marks


def export_table(ctx: Context, out: Path) -> Path:
    """Write every patch's prediction as CSV (for patch-folder databases, or on request)."""
    predictions = require_map(ctx)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patch_id", "slide", "x", "y", "width", "height", "predicted", *[f"p_{c}" for c in ctx.classes]])
    for i, pid in enumerate(ctx.table.ids):
        slide = ctx.table.slides[int(ctx.table.slide_index[i])]
        row = predictions[i]
        writer.writerow(
            [pid, slide.id, *ctx.table.boxes[i].tolist(), ctx.classes[int(row.argmax())], *[f"{p:.4f}" for p in row]]
        )
    atomic_write_text(out, buffer.getvalue())
    return out
