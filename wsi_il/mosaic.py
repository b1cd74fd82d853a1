"""Synthetic slides with known truth: real labelled H&E fields pasted into a pyramidal TIFF.

A mosaic slide is white background around a rectangle of tissue; a tile-aligned block of that tissue
is made of tumour fields and the rest of normal fields, so the tumour region is known exactly. The
slide is a tiled, JPEG-compressed, pyramidal TIFF that OpenSlide opens as ``generic-tiff`` with
``openslide.mpp-x/-y`` taken from the TIFF resolution tags.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon, box

from wsi_il.errors import InputError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text

BACH_FOLDER = "bach-iciar2018-1536jpeg-sample"
BACKGROUND_RGB = (240, 238, 242)
TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
_BACKGROUND_NOISE = 2.0
_BIGTIFF_BYTES = 2**31


@dataclass(frozen=True)
class MosaicSlide:
    """A written mosaic slide and its truth, in level-0 pixels."""

    path: Path
    """The pyramidal TIFF."""
    truth_path: Path
    """The truth GeoJSON (QuPath annotations) beside it: ``<stem>.truth.geojson``."""
    width: int
    """Level-0 width in pixels."""
    height: int
    """Level-0 height in pixels."""
    tile_px: int
    """TIFF tile size, and the grid the tumour block is aligned to."""
    tumour: Polygon | MultiPolygon
    """The tumour region (the truth)."""
    tissue: Polygon | MultiPolygon
    """All tissue, tumour included."""
    mpp: float
    """Microns per level-0 pixel written into the TIFF."""


def write_pyramidal_tiff(
    path: Path, rgb: np.ndarray, mpp: float = 0.5, tile_px: int = 256, jpeg_quality: int | None = 90
) -> None:
    """Write an RGB uint8 (H, W, 3) image as a tiled pyramidal TIFF that OpenSlide opens.

    Levels halve until the smaller side is below ``tile_px`` (at least two levels when the image can be
    halved) and sit in consecutive IFDs, which is what OpenSlide's generic-tiff reader expects. Without
    ``jpeg_quality`` the tiles are deflate-compressed (lossless).
    """
    _check_tiff_args(rgb, mpp, tile_px, jpeg_quality)
    levels = _pyramid(rgb, tile_px)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, bigtiff=rgb.nbytes * 4 // 3 > _BIGTIFF_BYTES) as writer:
        for index, level in enumerate(levels):
            _write_level(writer, level, index, mpp * 2**index, tile_px, jpeg_quality)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _check_tiff_args(rgb: np.ndarray, mpp: float, tile_px: int, jpeg_quality: int | None) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise InputError(
            f"image of dtype {rgb.dtype} and shape {rgb.shape} is not RGB uint8",
            "pass a non-empty (height, width, 3) uint8 array",
        )
    if not mpp > 0:
        raise InputError(f"mpp {mpp} is not positive", "pass microns per pixel, e.g. 0.5")
    if tile_px <= 0 or tile_px % 16:
        raise InputError(f"tile size {tile_px} px is not a positive multiple of 16", "use e.g. 256")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise InputError(f"JPEG quality {jpeg_quality} is not in 1..100", "use e.g. 90, or None")


def _pyramid(rgb: np.ndarray, tile_px: int) -> list[np.ndarray]:
    levels = [rgb]
    while min(levels[-1].shape[:2]) >= 2 and (len(levels) < 2 or min(levels[-1].shape[:2]) >= tile_px):
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


def _write_level(
    writer: tifffile.TiffWriter,
    level: np.ndarray,
    index: int,
    level_mpp: float,
    tile_px: int,
    jpeg_quality: int | None,
) -> None:
    pixels_per_cm = 10_000.0 / level_mpp
    if jpeg_quality is None:
        compression, args = "zlib", None
    else:
        compression, args = "jpeg", {"level": jpeg_quality}
    writer.write(
        level,
        photometric="rgb",
        tile=(tile_px, tile_px),
        compression=compression,
        compressionargs=args,
        resolution=(pixels_per_cm, pixels_per_cm),
        resolutionunit="CENTIMETER",
        subfiletype=0 if index == 0 else 1,
        description="wsi-il synthetic slide" if index == 0 else None,
        software=False,
        metadata=None,
    )


def make_block_slide(
    path: Path,
    tumour_images: list[Path],
    normal_images: list[Path],
    *,
    size_px: tuple[int, int] = (2048, 1536),
    block: tuple[int, int, int, int] | None = None,
    tile_px: int = 256,
    mpp: float = 0.5,
    seed: int = 0,
    background_margin_px: int = 256,
    source_mpp: float | None = None,
) -> MosaicSlide:
    """Compose and write a slide whose tumour is the rectangle ``block`` = (x0, y0, x1, y1), level-0 px.

    Tissue is the rectangle ``size_px`` inset by ``background_margin_px``; ``block`` defaults to a
    tile-aligned block in the middle-left of it, about a quarter of its area. The block is filled with
    randomly flipped and rotated crops of ``tumour_images``, the rest of the tissue with crops of
    ``normal_images``. Crops are used at their own scale unless ``source_mpp`` (the images' microns per
    pixel) is given; then they are resampled to ``mpp``. The same seed gives the same slide.
    """
    if not tumour_images or not normal_images:
        raise InputError("no tumour or no normal images to build a mosaic from", "pass both lists")
    if source_mpp is not None and not source_mpp > 0:
        raise InputError(f"source mpp {source_mpp} is not positive", "pass the images' microns per pixel")
    tissue = _tissue_box(size_px, background_margin_px, tile_px)
    block = block if block is not None else _default_block(tissue, tile_px)
    _check_block(block, tissue)
    rng = np.random.default_rng(seed)
    rgb = _background(size_px, rng)
    scale = 1.0 if source_mpp is None else source_mpp / mpp
    piece_px = 2 * tile_px
    _fill(rgb, tissue, normal_images, piece_px, scale, rng)
    _fill(rgb, block, tumour_images, piece_px, scale, rng)
    path = Path(path)
    write_pyramidal_tiff(path, rgb, mpp=mpp, tile_px=tile_px)
    truth_path = path.with_name(f"{path.stem}.truth.geojson")
    atomic_write_text(truth_path, _truth_geojson(block, uuid.UUID(bytes=rng.bytes(16), version=4)))
    return MosaicSlide(
        path=path,
        truth_path=truth_path,
        width=size_px[0],
        height=size_px[1],
        tile_px=tile_px,
        tumour=box(*block),
        tissue=box(*tissue),
        mpp=mpp,
    )


def bach_images(data_dir: Path) -> tuple[list[Path], list[Path]]:
    """Return (tumour, normal) BACH fields under ``data_dir``: tumour = Invasive + InSitu, normal = Normal.

    BACH's Benign class is left out of both so that a mosaic's tumour and normal parts are clearly
    separable (the BACH paper grouped benign with the lesions).
    """
    folder = Path(data_dir) / BACH_FOLDER
    tumour = _jpegs(folder / "Invasive") + _jpegs(folder / "InSitu")
    normal = _jpegs(folder / "Normal")
    if not tumour or not normal:
        raise FileNotFoundError(
            f"no BACH images in {folder}/{{Invasive,InSitu,Normal}}; put the BACH sample folder there"
        )
    return tumour, normal


def _jpegs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg"})


def _tissue_box(size_px: tuple[int, int], margin_px: int, tile_px: int) -> tuple[int, int, int, int]:
    width, height = size_px
    if margin_px < 0 or min(width, height) - 2 * margin_px < tile_px:
        raise InputError(
            f"slide {width}x{height} px with a {margin_px} px margin leaves less than one {tile_px} px tile",
            "make size_px larger or background_margin_px smaller",
        )
    return margin_px, margin_px, width - margin_px, height - margin_px


def _default_block(tissue: tuple[int, int, int, int], tile_px: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = tissue
    width = max(tile_px, _round_to(x1 - x0, 2 * tile_px) // 2)
    height = max(tile_px, _round_to(y1 - y0, 2 * tile_px) // 2)
    left = _ceil_to(x0 + (x1 - x0) // 8, tile_px)
    top = _ceil_to((y0 + y1 - height) // 2, tile_px)
    left, top = min(left, _floor_to(x1 - width, tile_px)), min(top, _floor_to(y1 - height, tile_px))
    return left, top, left + width, top + height


def _round_to(value: int, step: int) -> int:
    return max(step, round(value / step) * step)


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def _floor_to(value: int, step: int) -> int:
    return value // step * step


def _check_block(block: tuple[int, int, int, int], tissue: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = block
    tx0, ty0, tx1, ty1 = tissue
    if not (tx0 <= x0 < x1 <= tx1 and ty0 <= y0 < y1 <= ty1):
        raise InputError(
            f"tumour block {block} is empty or not inside the tissue {tissue}",
            "pass block=(x0, y0, x1, y1) with x0 < x1 and y0 < y1 inside the tissue",
        )


def _background(size_px: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    width, height = size_px
    noise = rng.normal(0.0, _BACKGROUND_NOISE, size=(height, width, 1))
    return np.clip(np.asarray(BACKGROUND_RGB, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def _fill(
    rgb: np.ndarray,
    region: tuple[int, int, int, int],
    images: list[Path],
    piece_px: int,
    scale: float,
    rng: np.random.Generator,
) -> None:
    """Fill ``region`` of ``rgb`` in place with a grid of random crops of ``images``."""
    x0, y0, x1, y1 = region
    cache: dict[Path, np.ndarray] = {}
    for top in range(y0, y1, piece_px):
        for left in range(x0, x1, piece_px):
            image = images[int(rng.integers(len(images)))]
            if image not in cache:
                cache[image] = _load_rgb(image)
            piece = _random_piece(cache[image], piece_px, scale, rng)
            height, width = min(piece_px, y1 - top), min(piece_px, x1 - left)
            rgb[top : top + height, left : left + width] = piece[:height, :width]


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc}", "pass readable JPEG or PNG files") from exc


def _random_piece(image: np.ndarray, piece_px: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Cut a random crop that becomes ``piece_px`` square after scaling, flip and rotate it at random."""
    crop_px = min(max(1, round(piece_px / scale)), *image.shape[:2])
    top = int(rng.integers(image.shape[0] - crop_px + 1))
    left = int(rng.integers(image.shape[1] - crop_px + 1))
    crop = image[top : top + crop_px, left : left + crop_px]
    if crop_px != piece_px:
        crop = np.asarray(Image.fromarray(crop).resize((piece_px, piece_px), Image.Resampling.LANCZOS))
    crop = np.rot90(crop, k=int(rng.integers(4)))
    return crop[:, ::-1] if rng.integers(2) else crop


def _truth_geojson(block: tuple[int, int, int, int], feature_id: uuid.UUID) -> str:
    x0, y0, x1, y1 = block
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    feature = {
        "type": "Feature",
        "id": str(feature_id),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "annotation",
            "name": "truth",
            "classification": TUMOR_CLASS,
            "isLocked": False,
        },
    }
    return json.dumps({"type": "FeatureCollection", "features": [feature]}) + "\n"
