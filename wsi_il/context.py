"""A patch inside its neighbourhood: the tissue around it, with the patch outlined.

Pathologists judge a patch by what surrounds it (a nest's border, stroma, crushed edges), so the contact sheet
and the review page show each patch within a square of ``tiles`` x ``tiles`` patch sizes read from the slide,
the patch outlined at its true place. Near the slide's edge the square is shifted inward, never cut, so every
context image has the same scale; a slide smaller than the square is shown whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

OUTLINE_RGB = (0, 200, 255)
"""The patch's outline: a cyan that stands out on H&E's pinks and purples."""


def context_box(
    box: tuple[int, int, int, int], slide_size: tuple[int, int], tiles: int = 3
) -> tuple[int, int, int, int]:
    """The level-0 square (x, y, width, height) of ``tiles`` patch sizes centred on ``box`` (x, y, w, h), moved
    inside the slide of ``slide_size`` (width, height)."""
    x, y, w, h = (int(v) for v in box)
    width, height = min(w * tiles, slide_size[0]), min(h * tiles, slide_size[1])
    left = min(max(x + w // 2 - width // 2, 0), slide_size[0] - width)
    top = min(max(y + h // 2 - height // 2, 0), slide_size[1] - height)
    return left, top, width, height


def context_image(
    reader: Any, box: tuple[int, int, int, int], slide_size: tuple[int, int], tiles: int = 3, size_px: int | None = None
) -> Image.Image:
    """Read the neighbourhood of ``box`` with ``reader`` (``slide.TileReader`` or anything with the same
    ``read(x, y, w, h)``), outline the patch, and scale the square to ``size_px`` on its longer side (None: as
    read)."""
    left, top, width, height = context_box(box, slide_size, tiles)
    image = Image.fromarray(np.ascontiguousarray(reader.read(left, top, width, height)))
    scale = 1.0
    if size_px is not None and max(width, height) != size_px:
        scale = size_px / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    x, y, w, h = (int(v) for v in box)
    outline = [(x - left) * scale, (y - top) * scale, (x - left + w) * scale - 1, (y - top + h) * scale - 1]
    line = max(2, round(min(image.size) / 120))
    ImageDraw.Draw(image).rectangle(outline, outline=OUTLINE_RGB, width=line)
    return image
