"""Ground truth from a QuPath annotation: which patches are positive (the paper's 50% rule).

Used by the pseudo-expert (examples, benchmarks, ``simulate``) in place of a pathologist.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from wsi_il.batch import read_batch
from wsi_il.fsutil import atomic_write_text
from wsi_il.qupath import read_region
from wsi_il.regions import fraction_inside


def truth_mask(boxes: np.ndarray, truth_path: Path, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Return True for each box (x, y, width, height) at least half inside the truth region."""
    region, _ = read_region(truth_path, offset=offset)
    return fraction_inside(boxes, region) >= 0.5


def fill_labels_from_truth(
    batch_dir: Path, truth_path: Path, offset: tuple[float, float] = (0.0, 0.0)
) -> dict[str, str]:
    """Fill a review batch's labels.csv as an expert would: the query's class inside the truth, else the other."""
    info, patches = read_batch(batch_dir)
    boxes = np.array([[p.x, p.y, p.width, p.height] for p in patches]).reshape(-1, 4)
    inside = truth_mask(boxes, truth_path, offset)
    positive = info.query_label
    negative = next(c for c in info.classes if c != positive) if len(info.classes) == 2 else "no"
    labels = {p.patch_id: positive if hit else negative for p, hit in zip(patches, inside, strict=True)}
    return write_batch_labels(batch_dir, labels)


def write_batch_labels(batch_dir: Path, labels: dict[str, str]) -> dict[str, str]:
    """Fill the label column of a batch's labels.csv from {patch_id: label}; returns what was written."""
    path = Path(batch_dir) / "labels.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    for row in rows:
        row["label"] = labels[row["patch_id"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return {row["patch_id"]: row["label"] for row in rows}
