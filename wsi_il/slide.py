"""Open slides and read their pixels: the only module that imports openslide."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.errors import SlideError

SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
"""File name suffixes of the formats OpenSlide reads."""


@dataclass(frozen=True)
class SlideInfo:
    """What wsi-il needs to know about a slide; sizes and positions in level-0 px."""

    path: Path
    width: int
    height: int
    mpp: float | None
    bounds: tuple[int, int, int, int]
    """The scanned area (x, y, width, height); the whole image when the slide has no bounds."""
    offset: tuple[float, float]
    """QuPath coordinate = wsi-il coordinate - offset (QuPath crops to OpenSlide's bounds)."""
    vendor: str


def _openslide():
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: the shared library is missing
        raise SlideError(
            f"OpenSlide cannot be loaded: {exc}", "install it with `pip install openslide-python openslide-bin`"
        ) from exc
    return openslide


def open_slide(path: Path):
    """Open a slide with OpenSlide, turning every failure into a SlideError."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"slide {path} does not exist", "check the path")
    if path.is_dir():
        raise SlideError(f"slide {path} is a folder", "give the slide file (for a patch folder use --patches)")
    openslide = _openslide()
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        if path.suffix.lower() in SLIDE_SUFFIXES:  # the right name, unreadable content: cut short or damaged
            raise SlideError(
                f"{path} cannot be read by OpenSlide although it is named like a slide: it is "
                "truncated (an interrupted copy), damaged, or not a tiled pyramidal slide",
                "copy it again and compare its size with the original; convert a plain image with "
                "`vips tiffsave IN OUT.tif --tile --pyramid`",
            ) from exc
        raise SlideError(
            f"{path} is not a slide format OpenSlide reads",
            "convert it to a pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid`)",
        ) from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"{path} cannot be opened: {exc}", "the file may be truncated or corrupt") from exc


def read_info(path: Path, use_bounds: bool = True) -> SlideInfo:
    """Read a slide's size, resolution and bounds."""
    slide = open_slide(path)
    try:
        props = dict(slide.properties)
        width, height = slide.dimensions
        mpp = _float(props.get("openslide.mpp-x"))
        bounds, offset = bounds_and_offset(props, width, height, use_bounds)
        return SlideInfo(Path(path), width, height, mpp, bounds, offset, props.get("openslide.vendor", "unknown"))
    except (ValueError, TypeError) as exc:
        raise SlideError(f"{path} has unreadable properties: {exc}", "the file may be damaged") from exc
    finally:
        slide.close()


def bounds_and_offset(
    props: Mapping[str, str], width: int, height: int, use_bounds: bool = True
) -> tuple[tuple[int, int, int, int], tuple[float, float]]:
    """Return the scanned area (x, y, width, height) and QuPath's offset from OpenSlide's properties.

    QuPath crops a slide with ``openslide.bounds-*`` properties (MRXS, some others) to those bounds, so its
    coordinates are OpenSlide's minus (bounds-x, bounds-y); a slide without them has no offset.
    """
    if not use_bounds or "openslide.bounds-x" not in props:
        return (0, 0, width, height), (0.0, 0.0)
    bx = int(props.get("openslide.bounds-x", 0))
    by = int(props.get("openslide.bounds-y", 0))
    bw = int(props.get("openslide.bounds-width", width - bx))
    bh = int(props.get("openslide.bounds-height", height - by))
    return (bx, by, bw, bh), (float(bx), float(by))


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def read_thumbnail(path: Path, max_px: int) -> tuple[np.ndarray, float]:
    """Return an RGB thumbnail whose longest side is at most ``max_px`` and its level-0 px per pixel."""
    slide = open_slide(path)
    try:
        width, height = slide.dimensions
        thumb = _direct_thumbnail(path, slide, max_px)
        if thumb is None:
            thumb = np.asarray(slide.get_thumbnail((max_px, max_px)).convert("RGB"))
        return thumb, width / thumb.shape[1]
    except Exception as exc:
        if isinstance(exc, SlideError):
            raise
        raise SlideError(f"{path}: cannot read a thumbnail: {exc}", "the file may be corrupt") from exc
    finally:
        slide.close()


def _direct_thumbnail(path: Path, slide: Any, max_px: int) -> np.ndarray | None:
    """OpenSlide's thumbnail (``get_thumbnail``: the level it picks, shrunk with PIL's Lanczos filter) from the
    level's own JPEG tiles where ``tifftiles`` reads them (the same pixels), else None. Half the thumbnail's time
    on the development CPU (0.08 of 0.2 s went to OpenSlide's reading and compositing of the level), before
    the trunk can start."""
    from PIL import Image

    from wsi_il.tifftiles import read_level

    downsample = max(dim / max_px for dim in slide.dimensions)
    rgb = read_level(Path(path), slide, slide.get_best_level_for_downsample(downsample))
    if rgb is None:
        return None
    image = Image.fromarray(rgb)
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _flatten(region: Any) -> np.ndarray:
    """OpenSlide's RGBA region as RGB, composited onto white (transparent = outside the scanned area)."""
    if region.mode == "RGBA" and region.getextrema()[3][0] == 255:  # inside the scanned area (nearly every tile)
        return np.array(region.convert("RGB"))  # nothing to composite: PIL drops alpha in half numpy's time
    rgba = np.asarray(region)
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    # OpenSlide returns premultiplied colour: add white for the missing coverage.
    out = rgb + (255 - alpha)
    return np.clip(out, 0, 255).astype(np.uint8)


class TileReader:
    """Read level-0 regions of one slide from many threads, one OpenSlide handle per thread; where the slide's
    JPEG tiles can be decoded directly (bit-identical to OpenSlide, 2-7 times faster), from those
    (``wsi_il.tifftiles``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._forget_handles()
        open_slide(self.path).close()  # fail early, in the caller's thread

    def _forget_handles(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._handles: list = []
        self._lock = threading.Lock()

    def _handle(self):
        if self._pid != os.getpid():  # a forked reader process: its own handles, never the parent's
            self._forget_handles()
        handle = getattr(self._local, "slide", None)
        if handle is None:
            from wsi_il.tifftiles import open_direct

            handle = open_slide(self.path)
            self._local.slide = handle
            self._local.tiles = open_direct(self.path, handle)
            with self._lock:
                self._handles.append(handle)
                if self._local.tiles is not None:
                    self._handles.append(self._local.tiles)
        return handle

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return the RGB pixels of a level-0 region (read-only where it is a decoded tile, shared with a cache)."""
        handle = self._handle()
        if self._local.tiles is not None:
            try:
                rgb = self._local.tiles.read(int(x), int(y), int(width), int(height))
            except Exception:
                rgb = None
            if rgb is not None:
                return rgb
        try:
            region = handle.read_region((int(x), int(y)), 0, (int(width), int(height)))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read the region at ({x}, {y}): {exc}", "the slide file may be damaged"
            ) from exc
        return _flatten(region)

    def read_downsampled(self, x: int, y: int, side0: int, downsample: float) -> np.ndarray:
        """Return the square level-0 region of ``side0`` px at ``(x, y)`` as the pyramid level with the largest
        downsample not above ``downsample`` holds it (``side0`` divided by that level's downsample, rounded, a side;
        level 0 read as ``read`` reads it)."""
        handle = self._handle()
        level = handle.get_best_level_for_downsample(downsample) if downsample > 1 else 0
        if level == 0:
            return self.read(x, y, side0, side0)
        size = max(1, round(side0 / handle.level_downsamples[level]))
        try:
            return _flatten(handle.read_region((int(x), int(y)), level, (size, size)))
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read the region at ({x}, {y}) from level {level}: {exc}",
                "the slide file may be damaged",
            ) from exc

    def close(self) -> None:
        with self._lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()
