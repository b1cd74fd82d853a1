"""The contact sheet of a review batch: every patch in a numbered grid, inside its neighbourhood where it has one.

Each cell shows the patch's context image (``context.context_image``: its 3 x 3 neighbourhood read from the slide,
the patch outlined) or, for a patch-folder image, the patch alone; under it, the number the batch gives the patch
(the column ``n`` of labels.csv), the model's suggestion (in grey with a question mark when it is uncertain,
``batch.suggestion_is_uncertain``) and the patch's full id, wrapped over as many lines as it needs, never cut.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from wsi_il.batch import LABELS_CSV, UNCERTAIN_BELOW, BatchInfo, BatchPatch, patch_number, suggestion_is_uncertain

_MAX_COLUMNS = 5


def sheet_picture_px(patch_px: int, context: bool) -> int:
    """The side at which the contact sheet shows a patch of ``patch_px``: with ``context``, its 3 x 3 neighbourhood
    as read (at least 384 px, so that a small patch is not a thumbnail; at most 512, so that a sheet of 10 stays
    a few megapixels), else the patch alone (256 to 512 px)."""
    shown = 3 * patch_px if context else patch_px
    return min(max(shown, _CONTEXT_MIN_PX if context else _PATCH_MIN_PX), _PICTURE_MAX_PX)


def render_contact_sheet(
    info: BatchInfo,
    patches: list[BatchPatch],
    images: list[Image.Image],
    contexts: list[Image.Image | None] | None = None,
) -> Image.Image:
    """Draw all patches in a numbered grid under a title: each inside its context where ``contexts`` gives one
    (``context.context_image``: the patch outlined in its neighbourhood), else alone; under each, its sheet
    number, the model's suggestion (an uncertain one in grey, with a question mark) and its full id, wrapped."""
    layout = sheet_layout(info, patches, images, contexts)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    _draw_lines(draw, (_PAD_PX, _PAD_PX), layout.title)
    for i, (picture, caption) in enumerate(zip(layout.pictures, layout.captions, strict=True)):
        _draw_cell(sheet, draw, layout.picture_corner(i), layout.side, picture, caption, layout.caption_px)
    return sheet


@dataclass(frozen=True)
class SheetLayout:
    """Where everything of a contact sheet goes: a title, then a grid of cells, each a picture over its caption."""

    pictures: list[Image.Image]
    """What each cell shows: the context image, else the patch."""
    captions: list[_Caption]
    title: list[_Line]
    side: int
    """The side of each cell's picture square, px."""
    columns: int
    title_px: int
    caption_px: int

    @property
    def size(self) -> tuple[int, int]:
        rows = math.ceil(len(self.pictures) / self.columns)
        return (
            self.columns * (self.side + _PAD_PX) + _PAD_PX,
            self.title_px + rows * (self.side + self.caption_px + _PAD_PX) + _PAD_PX,
        )

    def picture_corner(self, i: int) -> tuple[int, int]:
        """The top-left corner of cell ``i``'s picture square."""
        return (
            _PAD_PX + (i % self.columns) * (self.side + _PAD_PX),
            self.title_px + (i // self.columns) * (self.side + self.caption_px + _PAD_PX),
        )


def sheet_layout(
    info: BatchInfo,
    patches: list[BatchPatch],
    images: list[Image.Image],
    contexts: list[Image.Image | None] | None = None,
) -> SheetLayout:
    """Lay out the contact sheet: the pictures' side, the columns (wider than tall), the captions' lines."""
    pictures = [c if c is not None else i for c, i in zip(contexts or [None] * len(images), images, strict=True)]
    with_context = any(c is not None for c in contexts or [])
    side = (
        max(max(p.size) for p in pictures)
        if with_context
        else sheet_picture_px(max(max(i.size) for i in images), context=False)
    )
    captions = _captions(patches, side - 2 * _CAPTION_INSET_PX)
    columns = _sheet_columns(len(patches))
    title = _title_lines(info, len(patches), with_context, columns * (side + _PAD_PX) - _PAD_PX)
    title_px = _PAD_PX + sum(line.height_px for line in title) + _PAD_PX
    return SheetLayout(pictures, captions, title, side, columns, title_px, max(c.height_px for c in captions))


_PAD_PX = 10
_CAPTION_INSET_PX = 6
_CONTEXT_MIN_PX = 384
_PATCH_MIN_PX = 256
_PICTURE_MAX_PX = 512
_NUMBER_FONT_PX = 24
_SUGGESTION_FONT_PX = 16
_ID_FONT_PX = (14, 12)
"""Font sizes tried for the patch ids, largest first: a smaller one where the larger needs more than two lines."""
_ID_MAX_LINES = 2
_TITLE_FONT_PX = (22, 16)
_INK = (20, 20, 20)
_ID_INK = (70, 70, 70)
_MUTED_INK = (135, 135, 135)
_FRAME = (170, 170, 170)


@dataclass(frozen=True)
class _Line:
    text: str
    font: Any
    fill: tuple[int, int, int]
    bold: bool = False

    @property
    def height_px(self) -> int:
        return int(self.font.size * 1.3)


@dataclass(frozen=True)
class _Caption:
    number: _Line
    suggestion: list[_Line]
    ids: list[_Line]
    swatch: tuple[int, int, int] | None
    """The suggested class's colour, drawn as a filled square before a confident suggestion."""

    @property
    def head_px(self) -> int:
        """The height of the number and the suggestion, whose first line sits on the number's baseline."""
        return self.number.height_px - self.suggestion[0].height_px + sum(line.height_px for line in self.suggestion)

    @property
    def height_px(self) -> int:
        return _CAPTION_INSET_PX + self.head_px + sum(line.height_px for line in self.ids) + _CAPTION_INSET_PX


def _sheet_columns(count: int) -> int:
    """Columns of a grid wider than tall (a laptop screen), at most ``_MAX_COLUMNS``."""
    return max(1, min(_MAX_COLUMNS, count, math.ceil(math.sqrt(count * 1.5))))


def suggestion_text(patch: BatchPatch) -> str:
    """The model's suggestion as the contact sheet writes it: ``model: Tumor 0.93`` (``>0.99`` rather than a
    rounded 1.00), or, below ``UNCERTAIN_BELOW``, ``model uncertain: Tumor? 0.51``; empty without a suggestion."""
    if patch.suggestion is None:
        return ""
    probability = patch.suggestion_probability
    shown = "" if probability is None else f" {probability:.2f}" if round(probability, 2) < 1 else " >0.99"
    if suggestion_is_uncertain(probability):
        return f"model uncertain: {patch.suggestion}?{shown}"
    return f"model: {patch.suggestion}{shown}"


def _captions(patches: list[BatchPatch], width_px: int) -> list[_Caption]:
    from wsi_il.qupath import class_color

    number_font = ImageFont.load_default(size=_NUMBER_FONT_PX)
    suggestion_font = ImageFont.load_default(size=_SUGGESTION_FONT_PX)
    id_font = _id_font([p.patch_id for p in patches], width_px)
    captions = []
    for n, patch in enumerate(patches, start=1):
        number = _Line(patch_number(n, len(patches)), number_font, _INK, bold=True)
        uncertain = suggestion_is_uncertain(patch.suggestion_probability)
        swatch = None if patch.suggestion is None or uncertain else class_color(patch.suggestion)
        room = width_px - int(number_font.getlength(number.text + "  ")) - (_SUGGESTION_FONT_PX if swatch else 0)
        suggestion = [
            _Line(text, suggestion_font, _MUTED_INK if uncertain else _INK)
            for text in wrap_text(suggestion_text(patch), suggestion_font, room, breaks=" ")
        ]
        ids = [_Line(text, id_font, _ID_INK) for text in wrap_text(patch.patch_id, id_font, width_px)]
        captions.append(_Caption(number, suggestion, ids, swatch))
    return captions


def _id_font(ids: list[str], width_px: int) -> Any:
    """The largest id font in which every id takes at most ``_ID_MAX_LINES`` lines (else the smallest)."""
    for size in _ID_FONT_PX:
        font = ImageFont.load_default(size=size)
        if all(len(wrap_text(i, font, width_px)) <= _ID_MAX_LINES for i in ids):
            return font
    return font


_BREAK_AFTER = "_-. "


def wrap_text(text: str, font: Any, width_px: int, breaks: str = _BREAK_AFTER) -> list[str]:
    """Split ``text`` into lines no wider than ``width_px`` in ``font``, nothing left out: lines end after one of
    ``breaks`` where one fits, else inside a word. ``"".join`` of the lines gives ``text`` back."""
    words = re.findall(f"[^{re.escape(breaks)}]*[{re.escape(breaks)}]+|[^{re.escape(breaks)}]+", text)
    lines: list[str] = []
    line = ""
    for word in words:
        if font.getlength(line + word.rstrip()) <= width_px:
            line += word
            continue
        if line:
            lines.append(line)
        line = ""
        while font.getlength(word.rstrip()) > width_px and len(word) > 1:
            cut = _longest_fitting(word, font, width_px)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line or not lines:
        lines.append(line)
    return lines


def _longest_fitting(word: str, font: Any, width_px: int) -> int:
    """The length of the longest start of ``word`` that fits ``width_px`` (at least one character)."""
    low, high = 1, len(word)
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(word[:middle]) <= width_px:
            low = middle
        else:
            high = middle - 1
    return low


def _title_lines(info: BatchInfo, count: int, with_context: bool, width_px: int) -> list[_Line]:
    big = ImageFont.load_default(size=_TITLE_FONT_PX[0])
    small = ImageFont.load_default(size=_TITLE_FONT_PX[1])
    where = "Each patch is outlined in cyan inside its surroundings (3 x 3 patches). " if with_context else ""
    texts = [
        (f"Batch {info.batch_id}: is this {info.query_label}?", big, _INK),
        (
            f"Round {info.round} of {info.rounds}, {count} patches. {where}Fill the 'label' column of {LABELS_CSV} "
            "(its column n is the number shown here).",
            small,
            _INK,
        ),
        (
            f"'model uncertain' (grey, with a question mark): the model's probability is below {UNCERTAIN_BELOW:.2f}, "
            "close to a coin toss; judge those patches yourself.",
            small,
            _MUTED_INK,
        ),
    ]
    return [_Line(line, font, fill) for text, font, fill in texts for line in wrap_text(text, font, width_px, " ")]


def _draw_lines(draw: ImageDraw.ImageDraw, corner: tuple[int, int], lines: list[_Line]) -> int:
    """Draw ``lines`` one under the other from ``corner``; return the y under the last."""
    x, y = corner
    for line in lines:
        draw.text(
            (x, y), line.text, fill=line.fill, font=line.font, stroke_width=1 if line.bold else 0, stroke_fill=line.fill
        )
        y += line.height_px
    return y


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    corner: tuple[int, int],
    side: int,
    picture: Image.Image,
    caption: _Caption,
    caption_px: int,
) -> None:
    left, top = corner
    if max(picture.size) != side:
        picture = ImageOps.contain(picture, (side, side), Image.Resampling.LANCZOS)
    sheet.paste(picture.convert("RGB"), (left + (side - picture.width) // 2, top + (side - picture.height) // 2))
    draw.rectangle((left - 1, top - 1, left + side, top + side + caption_px), outline=_FRAME)
    x, y = left + _CAPTION_INSET_PX, top + side + _CAPTION_INSET_PX
    _draw_lines(draw, (x, y), [caption.number])
    x += int(caption.number.font.getlength(caption.number.text + "  "))
    top_px = y + caption.number.height_px - caption.suggestion[0].height_px
    if caption.swatch is not None:
        size = _SUGGESTION_FONT_PX - 4
        draw.rectangle((x, top_px + 4, x + size, top_px + 4 + size), fill=caption.swatch, outline=_INK)
        x += _SUGGESTION_FONT_PX
    _draw_lines(draw, (x, top_px), caption.suggestion)
    _draw_lines(draw, (left + _CAPTION_INSET_PX, y + caption.head_px), caption.ids)
