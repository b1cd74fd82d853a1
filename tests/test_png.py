"""The PNG encoder that compresses a picture's rows in stripes on several threads."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from wsi_il import png
from wsi_il.slide import TileReader


def _idat(data: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG file."""
    position, payload = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            payload += data[position + 8 : position + 8 + length]
        position += 12 + length
    return payload


@pytest.mark.parametrize("parts", [1, 2, 3, 16, 500])
def test_striped_png_decodes_to_the_same_pixels(example_slide, parts: int) -> None:
    reader = TileReader(example_slide)
    try:
        tissue = np.ascontiguousarray(reader.read(700, 900, 301, 257))
    finally:
        reader.close()
    data = png.encode(tissue, level=1, parts=parts)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB" and image.size == (301, 257)
        assert np.array_equal(np.asarray(image), tissue)
    raw = zlib.decompress(_idat(data))  # zlib checks the combined Adler-32 of the stripes
    assert len(raw) == 257 * (301 * 3 + 1)
    one = png.encode(tissue, level=1, parts=1)
    assert abs(len(data) - len(one)) < 0.02 * len(one) + 64 * min(parts, 257)  # stripes cost little


def test_striped_png_of_extreme_sizes() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (1, 5, 3), (7, 1, 3), (3, 4, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        with Image.open(io.BytesIO(png.encode(pixels, level=6, parts=4))) as image:
            assert np.array_equal(np.asarray(image), pixels)
    assert png.stripe_bounds(5, 8) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert png.stripe_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
