"""Write the predicted masks: QuPath GeoJSON per slide and an overview picture."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_il import __version__
from wsi_il.errors import InputError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text
from wsi_il.project import SlideRecord
from wsi_il.session import Context, _state, require_predictions, slides_matching


@dataclass(frozen=True)
class ExportedSlide:
    """What export wrote for one slide."""

    slide: str
    geojson: Path
    overview: Path | None
    patches_per_class: dict[str, int]


def provenance(ctx: Context) -> dict[str, object]:
    """Describe what produced a prediction: weights, model, labels (goes into every export)."""
    features = ctx.manifest["features"]
    state = _state(ctx)
    info: dict[str, object] = {"tool": f"wsi-il {__version__}", "project": ctx.manifest["uid"],
                               "weights": features["weights"], "weights_sha256": features.get("weights_sha256"),
                               "model": state.get("model"), "labels": state.get("n_labels")}
    if features["weights"] == "random":
        info["warning"] = "features from RANDOMLY initialised weights: not a pretrained model"
    return info


def _metadata(info: dict[str, object]) -> dict[str, str]:
    """Provenance as QuPath's metadata map (strings, kept by QuPath), e.g. ``wsi_il.weights``; None is left out."""
    return {f"wsi_il.{key}": str(value) for key, value in info.items() if value is not None}


def _out_path(out: Path, slide: str, several: bool, suffix: str) -> Path:
    base = out.name[: -len("".join(out.suffixes))] if out.suffixes else out.name
    name = f"{base}.{slide}{suffix}" if several else f"{base}{suffix}"
    return out.with_name(name)


def export_masks(ctx: Context, out: Path, slide_id: str | None = None, label: str | None = None,
                 detections: bool = False, overview: bool = True) -> list[ExportedSlide]:
    """Write one GeoJSON per slide with one MultiPolygon annotation per predicted class."""
    predictions = require_predictions(ctx)
    slides = slides_matching(ctx, slide_id)
    if slide_id is not None:
        if not slides:
            raise InputError(f"slide {slide_id!r} is not in the project",
                             f"use one of: {', '.join(s.id for s in ctx.table.slides)}")
    if not slides:
        raise InputError("the project has no slides to export masks for (it is a patch-folder database)",
                         "use `wsi-il export PROJECT --out predictions.csv` for patch folders")
    classes = [ctx.classes[ctx.class_index(label)]] if label else ctx.classes
    return [_export_slide(ctx, s, predictions, classes, out, len(slides) > 1, detections, overview)
            for s in slides]


def _export_slide(ctx: Context, slide: SlideRecord, predictions: np.ndarray, classes: list[str], out: Path,
                  several: bool, detections: bool, overview: bool) -> ExportedSlide:
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
        features.append(make_feature(shape, name=f"{name} (wsi-il)", classification=name, color=class_color(name),
                                     measurements={"Patches": float(chosen.sum())},
                                     metadata=_metadata({**info, "slide": slide.id}), offset=slide.offset))
    if detections:
        features.extend(_detections(ctx, boxes, probs, slide.offset))
    path = _out_path(out, slide.id, several, ".geojson")
    write_features(path, features)
    picture = _out_path(out, slide.id, several, ".png") if overview else None
    if picture is not None:
        write_overview(picture, slide, boxes, predicted, [ctx.class_index(n) for n in classes], ctx.classes)
    return ExportedSlide(slide.id, path, picture, counts)


def _detections(ctx: Context, boxes: np.ndarray, probs: np.ndarray, offset: tuple[float, float]) -> list[dict]:
    import shapely

    from wsi_il.qupath import class_color, make_feature

    squares = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3])
    out = []
    for square, row in zip(squares, probs, strict=True):
        best = int(row.argmax())
        measurements = {f"{name} probability": float(p) for name, p in zip(ctx.classes, row, strict=True)}
        out.append(make_feature(square, object_type="detection", classification=ctx.classes[best],
                                color=class_color(ctx.classes[best]), measurements=measurements, offset=offset))
    return out


def write_overview(path: Path, slide: SlideRecord, boxes: np.ndarray, predicted: np.ndarray, shown: list[int],
                   classes: list[str], max_px: int = 1600) -> None:
    """Save the slide thumbnail with the predicted classes overlaid, and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    from wsi_il.qupath import class_color
    from wsi_il.slide import read_thumbnail

    thumb, scale = read_thumbnail(Path(slide.path), max_px)
    base = Image.fromarray(thumb).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for (x, y, w, h), c in zip(boxes.tolist(), predicted.tolist(), strict=True):
        if c in shown:
            box = (x / scale, y / scale, (x + w) / scale - 1, (y + h) / scale - 1)
            draw.rectangle(box, fill=(*class_color(classes[c]), 90), outline=(*class_color(classes[c]), 200))
    image = Image.alpha_composite(base, overlay).convert("RGB")
    legend_h = 36
    canvas = Image.new("RGB", (image.width, image.height + legend_h), "white")
    canvas.paste(image, (0, legend_h))
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    x = 8
    for c in shown:
        pen.rectangle((x, 9, x + 18, 27), fill=class_color(classes[c]))
        text = f"{classes[c]}: {int((predicted == c).sum())} patches"
        pen.text((x + 24, 8), text, fill="black", font=font)
        x += 34 + int(pen.textlength(text, font=font))
    pen.text((x + 10, 8), slide.id, fill=(90, 90, 90), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def export_table(ctx: Context, out: Path) -> Path:
    """Write every patch's prediction as CSV (for patch-folder databases, or on request)."""
    predictions = require_predictions(ctx)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patch_id", "slide", "x", "y", "width", "height", "predicted",
                     *[f"p_{c}" for c in ctx.classes]])
    for i, pid in enumerate(ctx.table.ids):
        slide = ctx.table.slides[int(ctx.table.slide_index[i])]
        row = predictions[i]
        writer.writerow([pid, slide.id, *ctx.table.boxes[i].tolist(), ctx.classes[int(row.argmax())],
                         *[f"{p:.4f}" for p in row]])
    atomic_write_text(out, buffer.getvalue())
    return out
