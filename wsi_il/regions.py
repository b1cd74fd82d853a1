"""Which patches lie in a region: the 50% rule of docs/method.md, vectorised with shapely."""

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
    near = np.flatnonzero(
        (boxes[:, 0] < maxx)
        & (boxes[:, 0] + boxes[:, 2] > minx)
        & (boxes[:, 1] < maxy)
        & (boxes[:, 1] + boxes[:, 3] > miny)
    )
    if len(near) == 0:
        return out
    b = boxes[near]
    squares = shapely.box(b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3])
    shapely.prepare(region)
    # only boxes across the region's boundary need an intersection (5.7 s for 12,882 boxes and a real truth
    # region, against milliseconds for the two tests with the prepared region)
    whole = shapely.contains_properly(region, squares)
    edge = np.flatnonzero(~whole & shapely.intersects(region, squares))
    share = whole.astype(np.float64)
    share[edge] = shapely.area(shapely.intersection(squares[edge], region)) / np.maximum(b[edge, 2] * b[edge, 3], 1e-9)
    out[near] = share
    return out


def patches_inside(boxes: np.ndarray, region: BaseGeometry, min_fraction: float = 0.5) -> np.ndarray:
    """Return the indices of the boxes of which at least ``min_fraction`` lies inside ``region``."""
    return np.flatnonzero(fraction_inside(boxes, region) >= min_fraction - 1e-9)
