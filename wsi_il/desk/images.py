"""The pictures the page shows: a patch in its context, slide thumbnails, Deep Zoom tiles, and the overlays of the
slide view (probability map, labelled patches, query patches, the batch), each encoded for the browser."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsi_il.context import context_image
from wsi_il.imagefiles import load_image
from wsi_il.project import Project, SlideRecord

JPEG_QUALITY = 90
"""Context images and thumbnails: fine detail of nuclei stays, a 384 px context is about 40 KB."""
TILE_QUALITY = 80
"""Deep Zoom tiles (many, each seen briefly while panning)."""
THUMBNAIL_PX = 768
OVERLAY_PX = 2048
"""The longer side of an overlay picture; OpenSeadragon stretches it over the slide."""
DZ_TILE_PX = 254
DZ_OVERLAP_PX = 1

LOW_RGB = np.array([44, 123, 182], dtype=np.float32)
MID_RGB = np.array([255, 255, 191], dtype=np.float32)
HIGH_RGB = np.array([215, 25, 28], dtype=np.float32)
"""The probability map's colours at 0, 0.5 and 1: blue, pale yellow (a coin toss), red."""
QUERY_RGB = (255, 215, 0)
BATCH_RGB = (0, 200, 255)
SKIP_RGB = (160, 160, 160)


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


class SlideImages:
    """Open slides once and serve pictures of them from many threads (OpenSlide handles are thread-safe)."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self._lock = threading.Lock()
        self._readers: dict[str, Any] = {}
        self._zooms: dict[str, Any] = {}
        self._thumbnails: dict[str, bytes] = {}

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            for _, slide in self._zooms.values():
                slide.close()
            self._readers.clear()
            self._zooms.clear()

    def _reader(self, slide: SlideRecord) -> Any:
        from wsi_il.slide import TileReader

        with self._lock:
            if slide.id not in self._readers:
                self._readers[slide.id] = TileReader(Path(slide.path))
            return self._readers[slide.id]

    def context(self, slide: SlideRecord, box: tuple[int, int, int, int], tiles: int, local: int) -> bytes:
        """The patch at ``box`` inside ``tiles`` x ``tiles`` patch sizes, outlined (a patch-folder image: itself;
        ``local`` is its index in its folder)."""
        if slide.kind == "patches":
            files = self.project.read_json(self.project.images_path(slide.id))["files"]
            return jpeg_bytes(Image.fromarray(load_image(Path(slide.path) / files[local])))
        size = min(768, box[2] * tiles)
        return jpeg_bytes(context_image(self._reader(slide), box, (slide.width, slide.height), tiles, size))

    def thumbnail(self, slide: SlideRecord) -> bytes:
        from wsi_il.slide import read_thumbnail

        with self._lock:
            cached = self._thumbnails.get(slide.id)
        if cached is None:
            pixels, _ = read_thumbnail(Path(slide.path), THUMBNAIL_PX)
            cached = jpeg_bytes(Image.fromarray(pixels))
            with self._lock:
                self._thumbnails[slide.id] = cached
        return cached

    def _zoom(self, slide: SlideRecord) -> Any:
        # OpenSlide's Deep Zoom generator (the one openslide import outside wsi_il.slide: it cuts the pyramid
        # into the tiles the viewer asks for).
        from openslide.deepzoom import DeepZoomGenerator

        from wsi_il.slide import open_slide

        with self._lock:
            if slide.id not in self._zooms:
                handle = open_slide(Path(slide.path))
                self._zooms[slide.id] = (
                    DeepZoomGenerator(handle, DZ_TILE_PX, DZ_OVERLAP_PX, limit_bounds=False),
                    handle,
                )
            return self._zooms[slide.id][0]

    def deep_zoom(self, slide: SlideRecord) -> dict[str, Any]:
        """The Deep Zoom description of a slide (level-0 size, tile size, overlap), as OpenSeadragon reads it."""
        width, height = self._zoom(slide).level_dimensions[-1]
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Format": "jpeg",
                "Overlap": str(DZ_OVERLAP_PX),
                "TileSize": str(DZ_TILE_PX),
                "Size": {"Width": str(width), "Height": str(height)},
            }
        }

    def tile(self, slide: SlideRecord, level: int, column: int, row: int) -> bytes | None:
        """One Deep Zoom tile, or None when there is no such tile."""
        zoom = self._zoom(slide)
        if not 0 <= level < zoom.level_count:
            return None
        columns, rows = zoom.level_tiles[level]
        if not (0 <= column < columns and 0 <= row < rows):
            return None
        return jpeg_bytes(zoom.get_tile(level, (column, row)), TILE_QUALITY)


def _overlay_canvas(slide: SlideRecord) -> tuple[Image.Image, float]:
    scale = max(slide.width, slide.height) / OVERLAY_PX
    size = (max(1, round(slide.width / scale)), max(1, round(slide.height / scale)))
    return Image.new("RGBA", size, (0, 0, 0, 0)), scale


def _rect(box: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in box)
    return x / scale, y / scale, (x + w) / scale - 1, (y + h) / scale - 1


def probability_overlay(slide: SlideRecord, boxes: np.ndarray, probability: np.ndarray) -> bytes:
    """Each patch tinted by the probability of one class: blue (0), pale yellow (0.5), red (1)."""
    image, scale = _overlay_canvas(slide)
    draw = ImageDraw.Draw(image)
    p = np.clip(probability.astype(np.float32), 0.0, 1.0)[:, None]
    low = LOW_RGB + (MID_RGB - LOW_RGB) * np.minimum(p * 2, 1)
    rgb = np.where(p < 0.5, low, MID_RGB + (HIGH_RGB - MID_RGB) * np.maximum(p * 2 - 1, 0)).astype(np.uint8)
    for box, colour in zip(boxes, rgb.tolist(), strict=True):
        draw.rectangle(_rect(box, scale), fill=(*colour, 150))
    return png_bytes(image)


def marks_overlay(slide: SlideRecord, boxes: np.ndarray, colours: list[tuple[int, int, int]], fill: bool) -> bytes:
    """Patches outlined (and with ``fill``, lightly filled) in their colours."""
    image, scale = _overlay_canvas(slide)
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 300))
    for box, colour in zip(boxes, colours, strict=True):
        draw.rectangle(_rect(box, scale), fill=(*colour, 90) if fill else None, outline=(*colour, 255), width=width)
    return png_bytes(image)
