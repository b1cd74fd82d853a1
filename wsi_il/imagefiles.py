"""Patch image files (PNG, JPEG, TIFF ...) read as RGB arrays, with a clear refusal of what cannot be a patch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_il.errors import InputError

MAX_IMAGE_PIXELS = 25_000_000
"""The most pixels a patch image may have; a larger file is a slide or a scan, not a patch."""


def load_image(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{path} is {image.width} x {image.height} px, more than a patch image may have "
                    f"({MAX_IMAGE_PIXELS // 1_000_000} megapixels)",
                    "tile large images into patches",
                )
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path} cannot be read as an image: {exc}", "remove or replace the file") from exc
