"""Synthetic slides with known truth: real labelled H&E images pasted into a pyramidal TIFF.

A *patch mosaic* (``make_patch_mosaic``) puts one per-patch-labelled patch (PatchCamelyon) in each cell of a
grid whose cells are the project's tiles: its truth is exact at the patch level, so it can score label quality.
The field mosaics below paste crops of labelled images: crops of whole fields (BACH), whose truth holds for the
field, not for every patch cut from it, so they are for looks and speed, not for scoring (docs/quality.md); or,
with ``piece_px`` their own side, whole per-patch-labelled patches (PCam) side by side.

Two kinds of field mosaic. A *block* slide is white background around a rectangle of tissue; a
tile-aligned block of that tissue is made of tumour fields and the rest of normal fields. An *island*
slide (``make_island_slide``) has an irregular tissue outline with irregular tumour islands inside it,
their borders crossing patches at any angle, as in a real slide. Either way the tumour region is known
exactly and written as QuPath GeoJSON. The slide is a tiled, JPEG-compressed, pyramidal TIFF that
OpenSlide opens as ``generic-tiff`` with ``openslide.mpp-x/-y`` taken from the TIFF resolution tags.
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
from shapely.geometry import MultiPolygon, Point, Polygon, box

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
    piece_px: int | None = None,
) -> MosaicSlide:
    """Compose and write a slide whose tumour is the rectangle ``block`` = (x0, y0, x1, y1), level-0 px.

    Tissue is the rectangle ``size_px`` inset by ``background_margin_px``; ``block`` defaults to a
    tile-aligned block in the middle-left of it, about a quarter of its area. The block is filled with
    randomly flipped and rotated crops of ``tumour_images``, the rest of the tissue with crops of
    ``normal_images``, laid side by side from the region's top-left corner and cut off at its edges. A crop is
    ``piece_px`` square (default: two tiles); for small labelled patches pass their own side, so that each
    crop is one whole patch. Crops are used at their own scale unless ``source_mpp`` (the images' microns per
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
    piece_px = _piece_px(piece_px, tile_px)
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


def _piece_px(piece_px: int | None, tile_px: int) -> int:
    if piece_px is None:
        return 2 * tile_px
    if piece_px < 1:
        raise InputError(f"piece size {piece_px} px is not positive", "pass the side of the crops, e.g. 96")
    return piece_px


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
    """Near-white background with faint noise, made in strips (a few bytes per pixel at most)."""
    width, height = size_px
    out = np.empty((height, width, 3), dtype=np.uint8)
    base = np.asarray(BACKGROUND_RGB, dtype=np.float32)
    for top in range(0, height, 512):
        rows = min(512, height - top)
        noise = rng.normal(0.0, _BACKGROUND_NOISE, size=(rows, width, 1)).astype(np.float32)
        out[top : top + rows] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return out


def _fill(
    rgb: np.ndarray,
    region: tuple[int, int, int, int],
    images: list[Path],
    piece_px: int,
    scale: float,
    rng: np.random.Generator,
    stain_jitter: float = 0.0,
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
            if stain_jitter > 0:
                piece = _jitter_stain(piece, stain_jitter, rng)
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
        },
    }
    return json.dumps({"type": "FeatureCollection", "features": [feature]}) + "\n"


def _jitter_stain(piece: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Scale each channel's optical density by a random factor near 1 (a mild stain variation)."""
    density = -np.log((piece.astype(np.float64) + 1.0) / 256.0)
    factors = 1.0 + rng.normal(0.0, strength, size=3)
    return np.clip(256.0 * np.exp(-density * factors) - 1.0, 0, 255).astype(np.uint8)


# ---- island slides ------------------------------------------------------------------------------
def random_blob(
    center: tuple[float, float], radius: float, rng: np.random.Generator, roughness: float = 0.3, points: int = 128
) -> Polygon:
    """A smooth irregular closed shape: a circle whose radius varies with a few random harmonics."""
    theta = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    r = np.ones(points)
    for k in range(2, 7):
        r += rng.normal(0.0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.3, None)
    shape = Polygon(np.column_stack([center[0] + r * np.cos(theta), center[1] + r * np.sin(theta)]))
    return shape if shape.is_valid else shape.buffer(0)


def island_layout(
    size_px: tuple[int, int],
    rng: np.random.Generator,
    *,
    islands: int = 6,
    tumour_share: float = 0.25,
    margin_px: int = 128,
) -> tuple[Polygon | MultiPolygon, Polygon | MultiPolygon]:
    """Return (tissue, tumour) in level-0 px: an irregular tissue piece holding irregular tumour islands.

    The tumour islands cover about ``tumour_share`` of the tissue; some may touch or merge.
    """
    import shapely
    from shapely import affinity, union_all

    width, height = size_px
    side = min(width, height)
    outline = random_blob((width / 2, height / 2), side * 0.46, rng, roughness=0.35)
    outline = affinity.scale(outline, xfact=width / side, yfact=height / side)
    tissue = outline.intersection(box(margin_px, margin_px, width - margin_px, height - margin_px))
    tissue = _largest_parts(tissue)
    mean_radius = np.sqrt(tumour_share * tissue.area / islands / np.pi)
    blobs = []
    inner = tissue.buffer(-mean_radius * 0.6)
    inner = inner if not inner.is_empty else tissue
    minx, miny, maxx, maxy = inner.bounds
    attempts = 0
    while len(blobs) < islands and attempts < 1000:
        attempts += 1
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        if inner.contains(Point(x, y)):
            blobs.append(random_blob((x, y), mean_radius * float(rng.lognormal(0.0, 0.3)), rng, roughness=0.45))
    tumour = union_all(blobs).intersection(tissue)
    if tumour.is_empty:
        raise InputError(f"no tumour island fits in a {width}x{height} px slide", "make size_px larger")
    tumour = _largest_parts(shapely.set_precision(tumour, 0.01), min_area=1.0)  # QuPath's 0.01 px grid
    return _largest_parts(shapely.set_precision(tissue, 0.01)), tumour


def _largest_parts(shape, min_area: float = 0.0):
    """Keep the polygonal parts of a shapely result (and drop slivers smaller than ``min_area``)."""
    parts = [p for p in getattr(shape, "geoms", [shape]) if isinstance(p, Polygon) and p.area > min_area]
    if not parts:
        return Polygon()
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def rasterise(shape: Polygon | MultiPolygon, size_px: tuple[int, int]) -> np.ndarray:
    """Return a boolean (height, width) mask of the pixels whose centres lie inside ``shape``."""
    from PIL import ImageDraw

    mask = Image.new("1", size_px, 0)
    draw = ImageDraw.Draw(mask)
    for polygon in getattr(shape, "geoms", [shape]):
        if polygon.is_empty:
            continue
        draw.polygon([(x - 0.5, y - 0.5) for x, y in polygon.exterior.coords], fill=1)
        for hole in polygon.interiors:
            draw.polygon([(x - 0.5, y - 0.5) for x, y in hole.coords], fill=0)
    return np.asarray(mask, dtype=bool)


def make_island_slide(
    path: Path,
    tumour_images: list[Path],
    normal_images: list[Path],
    *,
    size_px: tuple[int, int] = (4096, 4096),
    islands: int = 6,
    tumour_share: float = 0.25,
    tile_px: int = 256,
    mpp: float = 0.5,
    seed: int = 0,
    source_mpp: float | None = None,
    stain_jitter: float = 0.03,
    piece_px: int | None = None,
) -> MosaicSlide:
    """Compose and write a slide with irregular tumour islands inside irregular normal tissue.

    Tissue is a smooth random blob inside a background margin; tumour is a union of smaller random blobs
    inside it, covering about ``tumour_share`` of the tissue. Both are filled with randomly flipped, rotated
    and mildly stain-jittered crops of real fields (``stain_jitter``: the spread of the per-channel
    optical-density factor; 0 turns it off), ``piece_px`` square as in ``make_block_slide``. The truth GeoJSON
    is one valid (Multi)Polygon annotation. The same seed gives the same slide.
    """
    from wsi_il.qupath import make_feature, write_features

    if not tumour_images or not normal_images:
        raise InputError("no tumour or no normal images to build a mosaic from", "pass both lists")
    if not 0 < tumour_share < 1 or islands < 1:
        raise InputError(
            f"tumour share {tumour_share} must lie in (0, 1) and islands ({islands}) be at least 1",
            "e.g. tumour_share=0.25, islands=6",
        )
    if min(size_px) < 4 * tile_px:
        raise InputError(
            f"slide {size_px[0]}x{size_px[1]} px is too small for islands of {tile_px} px tiles",
            f"make both sides at least {4 * tile_px} px",
        )
    rng = np.random.default_rng(seed)
    tissue, tumour = island_layout(size_px, rng, islands=islands, tumour_share=tumour_share, margin_px=tile_px // 2)
    scale = 1.0 if source_mpp is None else source_mpp / mpp
    piece = _piece_px(piece_px, tile_px)
    rgb = _background(size_px, rng)
    for shape, images in ((tissue, normal_images), (tumour, tumour_images)):
        x0, y0, x1, y1 = (int(v) for v in np.round(shape.bounds))
        texture = np.zeros_like(rgb)
        _fill(texture, (x0, y0, x1, y1), images, piece, scale, rng, stain_jitter)
        inside = rasterise(shape, size_px)
        rgb[inside] = texture[inside]
        del texture
    path = Path(path)
    write_pyramidal_tiff(path, rgb, mpp=mpp, tile_px=tile_px)
    truth_path = path.with_name(f"{path.stem}.truth.geojson")
    feature = make_feature(
        tumour,
        name="truth",
        classification=TUMOR_CLASS["name"],
        color=TUMOR_CLASS["color"],
        feature_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
    )
    write_features(truth_path, [feature])
    return MosaicSlide(
        path=path,
        truth_path=truth_path,
        width=size_px[0],
        height=size_px[1],
        tile_px=tile_px,
        tumour=tumour,
        tissue=tissue,
        mpp=mpp,
    )


# ---- patch mosaics: exact patch-level truth ----------------------------------------------------------
PCAM_MPP = 0.97
"""PatchCamelyon's scale in microns per pixel (Camelyon16 level 0 downsampled about 4 times, "10x")."""


@dataclass(frozen=True)
class PatchMosaic:
    """A written patch mosaic: a slide whose every tissue grid cell is one labelled patch."""

    slide: MosaicSlide
    cells_path: Path
    """``<stem>.cells.csv``: x, y, width, height (level-0 px), label (tumor/normal) and source of every cell."""
    tumour_cells: int
    normal_cells: int
    reused: int
    """Cells that show a patch already used elsewhere on the slide (rotated or flipped): 0 when the pools sufficed."""


def labelled_patches(folder: Path) -> tuple[list[Path], list[Path]]:
    """Return (tumour, normal) image paths of a per-patch-labelled folder with ``tumor/`` and ``normal/``."""
    folder = Path(folder)
    tumour, normal = _jpegs(folder / "tumor"), _jpegs(folder / "normal")
    if not tumour or not normal:
        raise InputError(
            f"no images in {folder}/tumor or {folder}/normal",
            "give a folder of per-patch-labelled images in tumor/ and normal/ (e.g. a PCam sample)",
        )
    return tumour, normal


def make_patch_mosaic(
    path: Path,
    tumour_images: list[Path],
    normal_images: list[Path],
    *,
    cells: tuple[int, int] = (48, 48),
    islands: int = 5,
    tumour_share: float = 0.35,
    tile_px: int = 96,
    mpp: float = PCAM_MPP,
    seed: int = 0,
    jpeg_quality: int | None = 90,
) -> PatchMosaic:
    """Compose and write a slide of ``cells`` = (columns, rows) grid cells of ``tile_px`` with exact truth.

    An irregular tissue outline and irregular tumour islands are laid out as in ``make_island_slide``, then
    snapped to the grid: a cell is tissue (or tumour) when its centre lies in the tissue (or in a tumour
    island). Each tissue cell shows one patch of its class, drawn without replacement (randomly rotated and
    flipped; a pool that runs out is reused, counted in ``reused``). Images of another size are resized to
    ``tile_px``. The truth GeoJSON is the union of the tumour cells, so a patch of a ``tile_px`` grid starting at
    (0, 0) is tumour exactly when its cell is. Pass the images' own scale as ``mpp`` (PCam: ``PCAM_MPP``).
    """
    from wsi_il.qupath import make_feature, union_squares, write_features

    _check_patch_mosaic(tumour_images, normal_images, cells, islands, tumour_share)
    rng = np.random.default_rng(seed)
    size_px = (cells[0] * tile_px, cells[1] * tile_px)
    tissue, tumour = island_layout(size_px, rng, islands=islands, tumour_share=tumour_share, margin_px=tile_px // 2)
    is_tissue, is_tumour = _cell_classes(tissue, tumour, cells, tile_px)
    rgb = _background(size_px, rng)
    pools = {True: _Pool(tumour_images, rng), False: _Pool(normal_images, rng)}
    rows = []
    for row, col in zip(*np.nonzero(is_tissue), strict=True):
        label = bool(is_tumour[row, col])
        source, image = pools[label].draw(tile_px)
        x, y = int(col) * tile_px, int(row) * tile_px
        rgb[y : y + tile_px, x : x + tile_px] = image
        rows.append((x, y, tile_px, tile_px, "tumor" if label else "normal", source.name))
    path = Path(path)
    write_pyramidal_tiff(path, rgb, mpp=mpp, tile_px=_tiff_tile(tile_px), jpeg_quality=jpeg_quality)
    ys, xs = np.nonzero(is_tumour)
    truth = union_squares(xs * tile_px, ys * tile_px, tile_px, tile_px)
    truth_path = path.with_name(f"{path.stem}.truth.geojson")
    feature = make_feature(
        truth,
        name="truth",
        classification=TUMOR_CLASS["name"],
        color=TUMOR_CLASS["color"],
        feature_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
    )
    write_features(truth_path, [feature])
    cells_path = path.with_name(f"{path.stem}.cells.csv")
    atomic_write_text(
        cells_path, "x,y,width,height,label,source\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)
    )
    ys, xs = np.nonzero(is_tissue)
    slide = MosaicSlide(
        path=path,
        truth_path=truth_path,
        width=size_px[0],
        height=size_px[1],
        tile_px=tile_px,
        tumour=truth,
        tissue=union_squares(xs * tile_px, ys * tile_px, tile_px, tile_px),
        mpp=mpp,
    )
    return PatchMosaic(
        slide,
        cells_path,
        int(is_tumour.sum()),
        int((is_tissue & ~is_tumour).sum()),
        pools[True].reused + pools[False].reused,
    )


def _check_patch_mosaic(
    tumour_images: list[Path], normal_images: list[Path], cells: tuple[int, int], islands: int, tumour_share: float
) -> None:
    if not tumour_images or not normal_images:
        raise InputError("no tumour or no normal images to build a mosaic from", "pass both lists")
    if min(cells) < 8:
        raise InputError(
            f"a grid of {cells[0]}x{cells[1]} cells is too small for tumour islands", "use at least 8 cells a side"
        )
    if not 0 < tumour_share < 1 or islands < 1:
        raise InputError(
            f"tumour share {tumour_share} must lie in (0, 1) and islands ({islands}) be at least 1",
            "e.g. tumour_share=0.35, islands=5",
        )


def _tiff_tile(tile_px: int) -> int:
    """The TIFF's tile side: the grid's cell when it is a multiple of 16, else 256."""
    return tile_px if tile_px % 16 == 0 else 256


def _cell_classes(
    tissue: Polygon | MultiPolygon, tumour: Polygon | MultiPolygon, cells: tuple[int, int], tile_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) boolean grids: cells whose centre lies in the tissue, and in a tumour island as well."""
    import shapely

    columns, rows = cells
    ys, xs = np.mgrid[0:rows, 0:columns]
    centres = shapely.points((xs.ravel() + 0.5) * tile_px, (ys.ravel() + 0.5) * tile_px)
    in_tissue = shapely.contains(tissue, centres).reshape(rows, columns)
    in_tumour = shapely.contains(tumour, centres).reshape(rows, columns) & in_tissue
    return in_tissue, in_tumour


class _Pool:
    """Images of one class drawn in a random order without replacement, then again (counted as reused)."""

    def __init__(self, images: list[Path], rng: np.random.Generator) -> None:
        self.images, self.rng = list(images), rng
        self.order: list[int] = []
        self.reused, self.rounds = 0, 0

    def draw(self, tile_px: int) -> tuple[Path, np.ndarray]:
        if not self.order:
            self.order = list(self.rng.permutation(len(self.images)))
            self.rounds += 1
        self.reused += self.rounds > 1
        source = self.images[self.order.pop()]
        image = _load_rgb(source)
        if image.shape[:2] != (tile_px, tile_px):
            image = np.asarray(Image.fromarray(image).resize((tile_px, tile_px), Image.Resampling.LANCZOS))
        image = np.rot90(image, k=int(self.rng.integers(4)))
        return source, image[:, ::-1] if self.rng.integers(2) else image


def write_mirrored_tiling(path: Path, small: MosaicSlide, copies: int, jpeg_quality: int = 90) -> MosaicSlide:
    """Write a large slide made of ``copies`` x ``copies`` mirror images of a small mosaic, tile by tile.

    Copy (i, j) is flipped left-right when j is odd and top-bottom when i is odd, so neighbours join
    seamlessly and a patch appears in four orientations. Memory stays that of the small slide: tiles are
    cut from its levels as they are written. For speed and memory benchmarks of large slides, not for
    measuring annotation quality (the same tissue repeats).
    """
    from shapely import affinity

    from wsi_il.qupath import make_feature, write_features

    with tifffile.TiffFile(small.path) as tif:
        levels = [page.asarray() for page in tif.pages]
    tile = small.tile_px
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    big = levels[0].shape[0] * copies * levels[0].shape[1] * copies * 3
    with tifffile.TiffWriter(partial, bigtiff=big > _BIGTIFF_BYTES) as writer:
        for index, level in enumerate(levels):
            height, width = level.shape[0] * copies, level.shape[1] * copies
            writer.write(
                _mirrored_tiles(level, copies, tile),
                shape=(height, width, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                resolution=(10_000.0 / (small.mpp * 2**index),) * 2,
                resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1,
                description="wsi-il synthetic slide" if index == 0 else None,
                software=False,
                metadata=None,
            )
    partial.replace(path)
    w, h = small.width, small.height
    parts = []
    for i in range(copies):
        for j in range(copies):
            shape = small.tumour
            if j % 2:
                shape = affinity.scale(shape, xfact=-1, yfact=1, origin=(w / 2, 0))
            if i % 2:
                shape = affinity.scale(shape, xfact=1, yfact=-1, origin=(0, h / 2))
            parts.append(affinity.translate(shape, xoff=j * w, yoff=i * h))
    from shapely import union_all

    tumour = union_all(parts)
    truth_path = path.with_name(f"{path.stem}.truth.geojson")
    feature = make_feature(
        tumour,
        name="truth",
        classification=TUMOR_CLASS["name"],
        color=TUMOR_CLASS["color"],
        feature_id=str(uuid.uuid4()),
    )
    write_features(truth_path, [feature])
    return MosaicSlide(
        path=path,
        truth_path=truth_path,
        width=w * copies,
        height=h * copies,
        tile_px=tile,
        tumour=tumour,
        tissue=small.tissue,
        mpp=small.mpp,
    )


def _mirrored_tiles(level: np.ndarray, copies: int, tile: int):
    """Yield the tiles (row by row) of ``level`` repeated copies x copies times with mirrored neighbours."""
    h, w = level.shape[:2]

    def mirrored(positions: np.ndarray, size: int) -> np.ndarray:
        copy, local = np.divmod(positions, size)
        return np.where(copy % 2 == 1, size - 1 - local, local)

    height, width = h * copies, w * copies
    for y in range(0, height, tile):
        rows = mirrored(np.minimum(np.arange(y, y + tile), height - 1), h)
        for x in range(0, width, tile):
            cols = mirrored(np.minimum(np.arange(x, x + tile), width - 1), w)
            yield level[np.ix_(rows, cols)]


def main(argv: list[str] | None = None) -> None:
    """Write a mosaic slide and its truth: ``python -m wsi_il.measure.mosaic OUT.tiff --data DIR`` (BACH islands, for
    looks) or ``--patches DIR`` (a per-patch-labelled folder such as PCam: exact patch-level truth, for scoring)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wsi_il.measure.mosaic", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the pyramidal TIFF to write (the truth goes beside it)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="folder holding bach-iciar2018-1536jpeg-sample/")
    source.add_argument("--patches", type=Path, help="folder of per-patch-labelled images in tumor/ and normal/")
    parser.add_argument("--size", default="4096x4096", help="BACH: level-0 WIDTHxHEIGHT in px")
    parser.add_argument("--cells", default="48x48", help="--patches: grid COLUMNSxROWS, one patch a cell")
    parser.add_argument("--tile", type=int, default=96, help="--patches: cell side in px (the patches' own side)")
    parser.add_argument(
        "--part",
        default="1/1",
        help="--patches: use only part I of N of each class (I/N), so "
        "that slides built with different parts share no patch",
    )
    parser.add_argument("--islands", type=int, default=6)
    parser.add_argument("--tumour-share", type=float, default=None, help="[default: 0.25 BACH, 0.35 --patches]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mpp", type=float, default=None, help=f"[default: 0.5 BACH, {PCAM_MPP} --patches]")
    args = parser.parse_args(argv)
    try:
        _write_from_args(args)
    except (InputError, FileNotFoundError) as exc:
        parser.exit(3, f"error: {exc}\n")


def _write_from_args(args) -> None:
    if args.patches is not None:
        tumour, normal = labelled_patches(args.patches)
        index, parts = (int(v) for v in args.part.split("/"))
        tumour, normal = tumour[index - 1 :: parts], normal[index - 1 :: parts]
        columns, rows = (int(v) for v in args.cells.lower().split("x"))
        made = make_patch_mosaic(
            args.out,
            tumour,
            normal,
            cells=(columns, rows),
            islands=args.islands,
            tumour_share=args.tumour_share or 0.35,
            tile_px=args.tile,
            mpp=args.mpp or PCAM_MPP,
            seed=args.seed,
        )
        print(
            f"wrote {made.slide.path} ({made.slide.width}x{made.slide.height} px, {made.tumour_cells} tumour and "
            f"{made.normal_cells} normal cells, {made.reused} reused), {made.slide.truth_path} and {made.cells_path}"
        )
        return
    width, height = (int(v) for v in args.size.lower().split("x"))
    tumour, normal = bach_images(args.data)
    slide = make_island_slide(
        args.out,
        tumour,
        normal,
        size_px=(width, height),
        islands=args.islands,
        tumour_share=args.tumour_share or 0.25,
        seed=args.seed,
        mpp=args.mpp or 0.5,
    )
    print(f"wrote {slide.path} ({slide.width}x{slide.height} px) and {slide.truth_path}")


if __name__ == "__main__":
    main()
