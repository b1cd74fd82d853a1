"""Tiles at a physical resolution: the target µm/px, the tile's side, and each slide's level-0 grid.

Without a target resolution a tile is ``tile_size_px`` level-0 pixels a side, whatever the slide's scan. With
one (``TilingSettings.target_mpp``), ``tile_size_px`` is the side at that resolution: on a slide of ``mpp`` µm/px
the grid's tiles are ``tile_size_px * target_mpp / mpp`` level-0 pixels a side (rounded), read from the
coarsest pyramid level still at least as fine as the target (``extraction.read_at_resolution``) and resized to
``tile_size_px``. The grid, the patch boxes and every export stay in level-0 pixels.
"""

from __future__ import annotations

import math
from typing import Any

from wsi_il.errors import InputError

MAGNIFICATION_MPP = 10.0
"""µm/px at 1x by the usual convention (40x = 0.25 µm/px, 20x = 0.5, 10x = 1.0)."""


def target_mpp(mpp: float | None, magnification: float | None) -> float | None:
    """The target µm/px from ``--mpp`` and/or ``--magnification`` (None: tile in level-0 pixels)."""
    if mpp is not None and not mpp > 0:
        raise InputError(f"--mpp {mpp} is not positive", "give microns per pixel, e.g. --mpp 0.5")
    if magnification is not None and not magnification > 0:
        raise InputError(f"--magnification {magnification} is not positive", "e.g. --magnification 20")
    from_magnification = None if magnification is None else MAGNIFICATION_MPP / magnification
    if mpp is not None and from_magnification is not None and not math.isclose(mpp, from_magnification, rel_tol=0.01):
        raise InputError(
            f"--mpp {mpp} and --magnification {magnification} ({from_magnification:g} µm/px) disagree",
            "give one of them",
        )
    return mpp if mpp is not None else from_magnification


def tile_side_px(tile_size: int | None, tile_um: float | None, mpp: float | None, default: int = 256) -> int:
    """The tile's side in pixels at the target resolution, from ``--tile-size`` (px) or ``--tile-um`` (µm)."""
    if tile_um is None:
        return default if tile_size is None else tile_size
    if tile_size is not None:
        raise InputError("--tile-size and --tile-um both give the tile's side", "give one of them")
    if mpp is None:
        raise InputError("--tile-um needs a target resolution", "add --mpp (e.g. --mpp 0.5) or --magnification")
    if not tile_um > 0:
        raise InputError(f"--tile-um {tile_um} is not positive", "e.g. --tile-um 112")
    return max(1, round(tile_um / mpp))


def slide_mpp(record: dict[str, Any]) -> float | None:
    """A slide's µm/px: what the slide records, or what ``--slide-mpp`` gave for it."""
    value = record.get("mpp")
    return float(value) if value else None


def check_slide_mpp(record: dict[str, Any], tiling: Any) -> None:
    """Refuse a slide without a pixel size in a project that tiles at a physical resolution (``tiling``:
    ``TilingSettings``)."""
    if tiling.target_mpp and record.get("kind") == "slide" and slide_mpp(record) is None:
        raise InputError(
            f"slide {record['path']} records no pixel size (µm/px), and tiles are to be read at "
            f"{tiling.target_mpp:g} µm/px",
            "give its pixel size with --slide-mpp (e.g. --slide-mpp 0.25 for a 40x scan; the scanner's "
            "report or the file's metadata says it)",
        )


def level0_tile_px(tiling: Any, mpp: float | None) -> int:
    """The side of a slide's grid tiles in level-0 pixels (``tiling``: ``TilingSettings``)."""
    if not tiling.target_mpp:
        return int(tiling.tile_size_px)
    if mpp is None:
        raise InputError(
            f"tiles are read at {tiling.target_mpp:g} µm/px and a slide records no pixel size",
            "give it with --slide-mpp",
        )
    return max(1, round(tiling.tile_size_px * tiling.target_mpp / mpp))


def tile_um(tiling: Any, mpp: float | None) -> float | None:
    """The side of a tile in µm (None where the slide's pixel size is unknown)."""
    if tiling.target_mpp:
        return tiling.tile_size_px * tiling.target_mpp
    return None if mpp is None else tiling.tile_size_px * mpp
