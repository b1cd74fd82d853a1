"""The export's overview picture: the slide as scanned beside the model's prediction, the expert's part marked.

Left, the slide's thumbnail untouched but for what the expert gave: each labelled patch outlined in its label's
colour and each session's query patches as one outlined region. Right, the same thumbnail with each predicted
class as a light wash, and a line in its colour wherever it meets another class, so that the tissue under the
prediction stays readable and the borders the model draws stand out. Both are drawn at the thumbnail's
resolution from arrays (one raster per class, whatever the number of patches), so the picture costs the same
for a thousand patches or a hundred thousand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WASH_ALPHA = 0.18
"""How much of a predicted class's colour is laid over the tissue (0: none, 1: opaque)."""
QUERY_RGB = (20, 90, 255)
"""The query region's line: a blue apart from the class colours of H&E projects."""
SKIP_RGB = (150, 150, 150)
NOT_RGB = (40, 40, 40)
"""A "not <query class>" answer (a no with more than two classes)."""
_HALO_RGB = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED_INK = (110, 110, 110)
_WARN_INK = (190, 0, 0)
_PAD_PX = 14
_GAP_PX = 24
_FONT_PX = 18
_SMALL_FONT_PX = 15
_MIN_MARK_PX = 9
"""Labelled patches smaller than this on the thumbnail are drawn as filled squares of this size."""


@dataclass(frozen=True)
class Marks:
    """The expert's part of one slide: labelled patches and each session's query patches (positions into the
    slide's boxes)."""

    labelled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Positions of the labelled patches."""
    labels: tuple[str, ...] = ()
    """Each labelled patch's label now (a class name, ``skip`` or ``not:<class>``)."""
    queries: tuple[tuple[str, np.ndarray], ...] = ()
    """(session id, positions of its query patches) for each session that queried this slide."""


@dataclass(frozen=True)
class LegendItem:
    text: str
    rgb: tuple[int, int, int]
    style: str
    """``wash`` (a filled swatch), ``outline`` (a hollow square) or ``line``."""


def raster(boxes: np.ndarray, chosen: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """A (height, width) boolean image of ``shape``: True where a chosen patch lies, at ``scale`` level-0 px per
    pixel. Patch edges are rounded to the nearest pixel, so that neighbouring patches neither overlap nor gap."""
    height, width = shape
    x0, y0, x1, y1 = _pixel_boxes(boxes[chosen], scale, shape)
    keep = (x1 > x0) & (y1 > y0)
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    corners = np.zeros((height + 1, width + 1), dtype=np.int32)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(corners, (ys, xs), sign)
    covered = corners.cumsum(axis=0, dtype=np.int32).cumsum(axis=1, dtype=np.int32)
    return covered[:height, :width] > 0


def _pixel_boxes(
    boxes: np.ndarray, scale: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    height, width = shape
    x, y, w, h = (boxes[:, k].astype(np.float64) for k in range(4))
    return (
        np.clip(np.rint(x / scale), 0, width).astype(np.int64),
        np.clip(np.rint(y / scale), 0, height).astype(np.int64),
        np.clip(np.rint((x + w) / scale), 0, width).astype(np.int64),
        np.clip(np.rint((y + h) / scale), 0, height).astype(np.int64),
    )


def edge(mask: np.ndarray, width_px: int, inside: bool = True) -> np.ndarray:
    """The band of ``width_px`` pixels along the border of ``mask``'s regions: inside them, or just outside."""
    grown = _shifted_all(~mask if inside else mask, width_px)
    return mask & grown if inside else grown & ~mask


def _shifted_all(mask: np.ndarray, reach: int) -> np.ndarray:
    """True where ``mask`` is True within ``reach`` pixels (a square neighbourhood)."""
    out = mask.copy()
    for _ in range(reach):
        step = out.copy()
        step[1:] |= out[:-1]
        step[:-1] |= out[1:]
        step[:, 1:] |= step[:, :-1].copy()
        step[:, :-1] |= step[:, 1:].copy()
        out = step
    return out


def prediction_panel(
    thumb: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]], tissue: np.ndarray, line_px: int
) -> np.ndarray:
    """The thumbnail with each (mask, colour) laid over as a light wash, and a line in the class's colour inside its
    region's edge wherever it meets other ``tissue`` (where it meets the background, the tissue's own edge shows
    it)."""
    out = thumb.astype(np.float32)
    for mask, rgb in masks:
        out[mask] = out[mask] * (1 - WASH_ALPHA) + np.asarray(rgb, np.float32) * WASH_ALPHA
    picture = out.astype(np.uint8)
    for mask, rgb in masks:
        others = _shifted_all(tissue & ~mask, line_px)
        picture[mask & others] = rgb
    return picture


def expert_panel(
    thumb: np.ndarray,
    boxes: np.ndarray,
    scale: float,
    marks: Marks,
    colours: dict[str, tuple[int, int, int]],
    line_px: int,
) -> Image.Image:
    """The thumbnail with each labelled patch outlined in its label's colour and each session's query patches as
    an outlined region, named by its session (sessions that share their query patches share one outline)."""
    picture = thumb.copy()
    shape = thumb.shape[:2]
    regions: dict[tuple[int, ...], list[str]] = {}
    for session, positions in marks.queries:
        regions.setdefault(tuple(sorted(positions.tolist())), []).append(session)
    for positions in regions:
        region = raster(boxes, np.asarray(positions, dtype=np.int64), scale, shape)
        picture[edge(region, line_px + 2, inside=False)] = _HALO_RGB
        picture[edge(region, line_px, inside=False)] = QUERY_RGB
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = _pixel_boxes(boxes[marks.labelled], scale, shape)
    for left, top, right, bottom, label in zip(
        x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), marks.labels, strict=True
    ):
        _draw_mark(draw, (left, top, right, bottom), colours.get(label, SKIP_RGB), line_px)
    font = ImageFont.load_default(size=_FONT_PX)
    for positions, sessions in regions.items():
        x0, y0, _, _ = _pixel_boxes(boxes[np.asarray(positions, dtype=np.int64)], scale, shape)
        if len(x0):
            corner = (int(x0.min()), max(0, int(y0.min()) - _FONT_PX - 3 * line_px))
            name = f"{', '.join(sessions)} query"
            draw.text(corner, name, fill=QUERY_RGB, font=font, stroke_width=3, stroke_fill=_HALO_RGB)
            draw.text(corner, name, fill=QUERY_RGB, font=font, stroke_width=1, stroke_fill=QUERY_RGB)
    return image


def _draw_mark(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rgb: tuple[int, int, int], line_px: int
) -> None:
    left, top, right, bottom = box
    if min(right - left, bottom - top) < _MIN_MARK_PX:
        cx, cy, half = (left + right) // 2, (top + bottom) // 2, _MIN_MARK_PX // 2
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=rgb, outline=_HALO_RGB)
        return
    draw.rectangle((left - 1, top - 1, right, bottom), outline=_HALO_RGB, width=line_px + 2)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=rgb, width=line_px)


@dataclass(frozen=True)
class Overview:
    """The overview picture and where its two panels lie in it."""

    image: Image.Image
    expert_corner: tuple[int, int]
    """Top-left corner of the slide with the expert's labels and queries."""
    prediction_corner: tuple[int, int]
    """Top-left corner of the slide with the prediction."""
    line_px: int
    """The width of the lines drawn on the slide."""


def render_overview(
    thumb: np.ndarray,
    scale: float,
    boxes: np.ndarray,
    predicted: np.ndarray,
    shown: list[int],
    classes: list[str],
    marks: Marks,
    header: list[str],
    warning: str | None = None,
) -> Overview:
    """Draw the overview of one slide from its thumbnail (``scale`` level-0 px per pixel), its patches' ``boxes``
    and predicted class indices, the classes ``shown`` (indices into ``classes``) and the expert's ``marks``."""
    from wsi_il.qupath import class_color

    line_px = max(2, round(max(thumb.shape[:2]) / 450))
    shape = thumb.shape[:2]
    masks = [(raster(boxes, predicted == c, scale, shape), class_color(classes[c])) for c in shown]
    tissue = raster(boxes, np.ones(len(boxes), dtype=bool), scale, shape)
    right = Image.fromarray(prediction_panel(thumb, masks, tissue, line_px))
    colours = label_colours(classes)
    left = expert_panel(thumb, boxes, scale, marks, colours, line_px)
    titles = ("The slide, with your labels and queries", "The model's prediction")
    image, corners = compose(
        left, right, titles, header, legend_items(predicted, shown, classes, marks, colours), warning
    )
    return Overview(image, *corners, line_px)


def label_colours(classes: list[str]) -> dict[str, tuple[int, int, int]]:
    """The colour of each label a patch can have: its class's (QuPath's), grey for skip, dark for a "not"."""
    from wsi_il.batch import NOT_PREFIX, SKIP
    from wsi_il.qupath import class_color

    colours = {name: class_color(name) for name in classes}
    colours.update({f"{NOT_PREFIX}{name}": NOT_RGB for name in classes})
    colours[SKIP] = SKIP_RGB
    return colours


def legend_items(
    predicted: np.ndarray, shown: list[int], classes: list[str], marks: Marks, colours: dict[str, tuple[int, int, int]]
) -> list[LegendItem]:
    """What the legend lists: each shown class's predicted patches, each label's labelled patches, the queries."""
    from collections import Counter

    from wsi_il.batch import NOT_PREFIX, SKIP

    items = [
        LegendItem(f"predicted {classes[c]}: {int((predicted == c).sum())} patches", colours[classes[c]], "wash")
        for c in shown
    ]
    counts = Counter(marks.labels)
    for label in [*classes, *sorted(set(counts) - set(classes))]:
        if counts[label]:
            name = "skipped" if label == SKIP else label.replace(NOT_PREFIX, "not ")
            items.append(LegendItem(f"labelled {name}: {counts[label]}", colours.get(label, SKIP_RGB), "outline"))
    if marks.queries:
        items.append(LegendItem(f"query patches ({', '.join(s for s, _ in marks.queries)})", QUERY_RGB, "line"))
    return items


def compose(
    left: Image.Image,
    right: Image.Image,
    titles: tuple[str, str],
    header: list[str],
    legend: list[LegendItem],
    warning: str | None = None,
) -> tuple[Image.Image, tuple[tuple[int, int], tuple[int, int]]]:
    """Put the two panels side by side (one above the other for a wide slide) under a header and a legend; return
    the picture and the panels' top-left corners."""
    font = ImageFont.load_default(size=_FONT_PX)
    small = ImageFont.load_default(size=_SMALL_FONT_PX)
    beside = left.width <= left.height * 1.25
    width = 2 * left.width + _GAP_PX if beside else left.width
    line_h = int(_FONT_PX * 1.4)
    legend_rows = _legend_rows(legend, small, width)
    top_px = _PAD_PX + line_h * (len(header) + (warning is not None)) + len(legend_rows) * line_h + _PAD_PX
    panel_top = top_px + line_h
    height = (panel_top + left.height if beside else panel_top + 2 * left.height + _GAP_PX + line_h) + _PAD_PX
    canvas = Image.new("RGB", (width + 2 * _PAD_PX, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = _PAD_PX
    for n, text in enumerate(header):
        draw.text((_PAD_PX, y), text, fill=_INK if n == 0 else _MUTED_INK, font=font if n == 0 else small)
        y += line_h
    if warning is not None:
        draw.text((_PAD_PX, y), warning, fill=_WARN_INK, font=small)
        y += line_h
    for row in legend_rows:
        _draw_legend_row(draw, (_PAD_PX, y), row, small)
        y += line_h
    second = (
        (_PAD_PX + left.width + _GAP_PX, panel_top) if beside else (_PAD_PX, panel_top + left.height + _GAP_PX + line_h)
    )
    first = (_PAD_PX, panel_top)
    for (x, y), panel, title in ((first, left, titles[0]), (second, right, titles[1])):
        draw.text((x, y - line_h + 2), title, fill=_INK, font=font)
        canvas.paste(panel, (x, y))
    return canvas, (first, second)


def _legend_rows(
    items: list[LegendItem], font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> list[list[LegendItem]]:
    rows: list[list[LegendItem]] = [[]]
    used = 0
    for item in items:
        need = _SMALL_FONT_PX + 8 + int(font.getlength(item.text)) + 22
        if rows[-1] and used + need > width:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += need
    return [row for row in rows if row]


def _draw_legend_row(
    draw: ImageDraw.ImageDraw,
    corner: tuple[int, int],
    items: list[LegendItem],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    x, y = corner
    size = _SMALL_FONT_PX
    for item in items:
        box = (x, y + 2, x + size, y + 2 + size)
        if item.style == "wash":
            draw.rectangle(
                box, fill=tuple(int(255 * (1 - 0.45) + c * 0.45) for c in item.rgb), outline=item.rgb, width=2
            )
        elif item.style == "outline":
            draw.rectangle(box, outline=item.rgb, width=3)
        else:
            draw.line((x, y + 2 + size // 2, x + size, y + 2 + size // 2), fill=item.rgb, width=3)
        draw.text((x + size + 6, y + 1), item.text, fill=_INK, font=font)
        x += size + 8 + int(font.getlength(item.text)) + 22
