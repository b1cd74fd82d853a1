"""Which patches lie in a region: the 50% rule of METHOD.md, vectorised with shapely."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry


def fraction_inside(boxes: np.ndarray, region: BaseGeometry) -> np.ndarray:
    """Return the share of each box (x, y, width, height) that lies inside ``region``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros(len(boxes))
    if len(boxes) == 0 or region.is_empty:
        return out
    minx, miny, maxx, maxy = region.bounds
    near = np.flatnonzero((boxes[:, 0] < maxx) & (boxes[:, 0] + boxes[:, 2] > minx)
                          & (boxes[:, 1] < maxy) & (boxes[:, 1] + boxes[:, 3] > miny))
    if len(near) == 0:
        return out
    b = boxes[near]
    squares = shapely.box(b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3])
    shapely.prepare(region)
    inside = shapely.area(shapely.intersection(squares, region))
    out[near] = inside / np.maximum(b[:, 2] * b[:, 3], 1e-9)
    return out


def patches_inside(boxes: np.ndarray, region: BaseGeometry, min_fraction: float = 0.5) -> np.ndarray:
    """Return the indices of the boxes of which at least ``min_fraction`` lies inside ``region``."""
    return np.flatnonzero(fraction_inside(boxes, region) >= min_fraction - 1e-9)
