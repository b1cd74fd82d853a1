"""A patch inside its neighbourhood, read from the bundled real slide."""

from __future__ import annotations

import numpy as np

from wsi_il.context import OUTLINE_RGB, context_box, context_image
from wsi_il.slide import TileReader, read_info


def test_context_box_is_centred_and_moved_inside_the_slide():
    assert context_box((1000, 1000, 100, 100), (5000, 4000)) == (900, 900, 300, 300)
    assert context_box((0, 0, 100, 100), (5000, 4000)) == (0, 0, 300, 300)  # shifted, not cut
    assert context_box((4900, 3900, 100, 100), (5000, 4000)) == (4700, 3700, 300, 300)
    assert context_box((0, 0, 100, 100), (250, 120), tiles=3) == (0, 0, 250, 120)  # a slide smaller than the square


def test_context_image_outlines_the_patch_at_its_place(example_slide):
    info = read_info(example_slide)
    reader = TileReader(example_slide)
    try:
        box = (0, 512, 256, 256)  # at the left edge: the square is shifted right, the patch sits at its left
        image = context_image(reader, box, (info.width, info.height), size_px=384)
        patch = reader.read(*box)
    finally:
        reader.close()
    assert image.size == (384, 384)
    pixels = np.asarray(image)
    scale = 384 / 768
    top = round((512 - 256) * scale)  # centred vertically: the square starts one patch above
    assert tuple(pixels[top, 50]) == OUTLINE_RGB and tuple(pixels[top + 60, 0]) == OUTLINE_RGB
    inside = pixels[top + 10 : top + 118, 10:118].astype(float)
    reference = np.asarray(patch[20:236, 20:236].astype(float))[::2, ::2]
    assert abs(inside.mean() - reference.mean()) < 6  # the tissue inside the outline is the patch's own
