"""Level-0 regions of tiled, JPEG-compressed TIFF slides, decoded straight from the file's own tiles.

OpenSlide decodes the same JPEG tiles with the same library (libjpeg-turbo), then converts each region to
premultiplied ARGB and back, which took three quarters of a tile's read: 2.2 ms a 256 px tile against
0.56 ms for the decode alone on the development CPU. Reading is what bounds extraction on a GPU machine
(docs/speed.md, "GPU"), so for the formats where it is simple and safe, wsi-il reads the tiles itself:

- generic tiled TIFF and Aperio SVS (OpenSlide's vendors ``generic-tiff`` and ``aperio``), whose level 0 is the
  file's first page: tiled, 8-bit RGB or YCbCr, JPEG-compressed, one plane;
- regions wholly inside that page whose tiles are all present (anything else: OpenSlide, as before);
- checked at opening: one whole tile must come out identical, to the bit, to OpenSlide's region, or the slide
  is read through OpenSlide.

``$WSI_IL_DIRECT_TILES=0`` reads everything through OpenSlide (for comparisons).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

DIRECT_ENV = "WSI_IL_DIRECT_TILES"
VENDORS = frozenset({"generic-tiff", "aperio"})
_JPEG, _RGB, _YCBCR = 7, 2, 6
CACHE_TILES = 32
"""Decoded tiles kept per reader: the neighbours a row of patches shares where tiles and patches differ in size."""


class JpegTiles:
    """Decode level-0 regions of one slide from its JPEG tiles (one instance per thread: it holds a small cache)."""

    def __init__(self, path: Path, page: Any) -> None:
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.across = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.tables = page.jpegtables
        self.colorspace = "RGB" if int(page.photometric) == _RGB else "YCBCR"
        self.fd = os.open(path, os.O_RDONLY)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _tile(self, index: int) -> np.ndarray | None:
        """The decoded tile (read-only), or None where the file has none."""
        tile = self.cache.get(index)
        if tile is not None:
            self.cache.move_to_end(index)
            return tile
        if index >= len(self.counts) or self.counts[index] <= 0:
            return None
        import imagecodecs

        data = os.pread(self.fd, int(self.counts[index]), int(self.offsets[index]))
        tile = imagecodecs.jpeg8_decode(data, tables=self.tables, colorspace=self.colorspace, outcolorspace="RGB")
        if tile.shape[:2] != (self.tile_h, self.tile_w) or tile.ndim != 3 or tile.shape[2] != 3:
            return None
        tile.flags.writeable = False
        self.cache[index] = tile
        if len(self.cache) > CACHE_TILES:
            self.cache.popitem(last=False)
        return tile

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """The RGB pixels of a level-0 region, or None when they must come from OpenSlide (outside the page, a
        missing tile)."""
        if x < 0 or y < 0 or x + width > self.width or y + height > self.height or width <= 0 or height <= 0:
            return None
        cols = range(x // self.tile_w, (x + width - 1) // self.tile_w + 1)
        rows = range(y // self.tile_h, (y + height - 1) // self.tile_h + 1)
        if (width, height) == (self.tile_w, self.tile_h) and x % self.tile_w == 0 and y % self.tile_h == 0:
            return self._tile(rows[0] * self.across + cols[0])  # a region that is one tile
        out = np.empty((height, width, 3), np.uint8)
        for row in rows:
            for col in cols:
                tile = self._tile(row * self.across + col)
                if tile is None:
                    return None
                left, top = col * self.tile_w, row * self.tile_h
                x0, y0 = max(x, left), max(y, top)
                x1, y1 = min(x + width, left + self.tile_w), min(y + height, top + self.tile_h)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
        return out


def open_direct(path: Path, slide: Any, level: int = 0) -> JpegTiles | None:
    """A ``JpegTiles`` for OpenSlide level ``level`` of a slide OpenSlide has open (``slide``), or None where its
    tiles are not read directly."""
    if os.environ.get(DIRECT_ENV, "1").strip() == "0":
        return None
    if slide.properties.get("openslide.vendor") not in VENDORS:
        return None
    dimensions = tuple(slide.level_dimensions[level])
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            if level == 0:
                page = tiff.pages.first if hasattr(tiff.pages, "first") else tiff.pages[0]
            else:  # the tiled page of the level's size (Aperio keeps stripped thumbnail, label and macro pages)
                page = next((p for p in tiff.pages if p.is_tiled and (p.imagewidth, p.imagelength) == dimensions), None)
            if page is None or not _eligible(page, dimensions):
                return None
            tiles = JpegTiles(path, page)
    except Exception:
        return None
    if not _agrees(tiles, slide, level):
        tiles.close()
        return None
    tiles.cache.clear()
    return tiles


def read_level(path: Path, slide: Any, level: int) -> np.ndarray | None:
    """The whole of OpenSlide level ``level`` as RGB decoded from the file's tiles (what ``read_region`` gives
    where every tile is there), or None where OpenSlide must read it (``tifftiles`` does not read the slide, a
    tile is missing)."""
    tiles = open_direct(path, slide, level)
    if tiles is None:
        return None
    try:
        return tiles.read(0, 0, tiles.width, tiles.height)
    except Exception:
        return None
    finally:
        tiles.close()


def _eligible(page: Any, dimensions: tuple[int, int]) -> bool:
    return (
        bool(page.is_tiled)
        and int(page.compression) == _JPEG
        and int(page.photometric) in (_RGB, _YCBCR)
        and int(page.samplesperpixel) == 3
        and int(page.planarconfig) == 1
        and all(int(bits) == 8 for bits in np.atleast_1d(page.bitspersample))
        and not page.extrasamples
        and int(getattr(page, "imagedepth", 1)) == 1
        and (int(page.imagewidth), int(page.imagelength)) == tuple(dimensions)
    )


def _agrees(tiles: JpegTiles, slide: Any, level: int = 0) -> bool:
    """Whether a whole tile near the middle of the page decodes exactly as OpenSlide reads that region."""
    full_cols, full_rows = tiles.width // tiles.tile_w, tiles.height // tiles.tile_h
    if full_cols == 0 or full_rows == 0:
        return False
    x, y = (full_cols // 2) * tiles.tile_w, (full_rows // 2) * tiles.tile_h
    scale = slide.level_downsamples[level]
    if scale != round(scale):  # (OpenSlide's level-0 coordinates of that tile would be rounded; not of the first)
        x = y = 0
    try:
        mine = tiles.read(x, y, tiles.tile_w, tiles.tile_h)
        theirs = np.asarray(
            slide.read_region((round(x * scale), round(y * scale)), level, (tiles.tile_w, tiles.tile_h))
        )
    except Exception:
        return False
    if mine is None or theirs.shape[-1] != 4 or theirs[..., 3].min() != 255:
        return False
    return bool(np.array_equal(mine, theirs[..., :3]))
