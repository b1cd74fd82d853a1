"""Scores of docs/method.md "How the paper measured it": accuracy, P@10, F1, Jaccard, learning-curve summaries.

Pure functions of numpy arrays (and shapely geometries for the pixel-level IoU); nothing here reads files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from shapely.geometry.base import BaseGeometry


@dataclass(frozen=True)
class BinaryScores:
    """Patch-level agreement of a predicted mask with the truth (positives = the target class)."""

    precision: float
    recall: float
    f1: float
    jaccard: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    specificity: float = 1.0
    """Share of true negatives called negative (1 when there are none)."""
    balanced_accuracy: float = 1.0
    """Mean of recall and specificity: 0.5 for a mask that calls everything (or nothing) the target class, whatever
    the prevalence, where Jaccard rewards calling everything with the prevalence itself."""
    called_share: float = 0.0
    """Share of the scored patches called the target class (compare with ``truth_share``)."""
    truth_share: float = 0.0
    """Share of the scored patches that truly are the target class."""

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def binary_scores(predicted: np.ndarray, truth: np.ndarray) -> BinaryScores:
    """Score boolean predictions against boolean truth; an empty denominator scores 1 when both are empty."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ in shape")
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    tn = int((~predicted & ~truth).sum())
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    n = max(1, len(truth))
    return BinaryScores(
        precision=_ratio(tp, tp + fp),
        recall=recall,
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        jaccard=_ratio(tp, tp + fp + fn),
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        true_negatives=tn,
        specificity=specificity,
        balanced_accuracy=(recall + specificity) / 2,
        called_share=(tp + fp) / n,
        truth_share=(tp + fn) / n,
    )


def _ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, where 0/0 means nothing was to be found and nothing was claimed: 1."""
    return 1.0 if denominator == 0 else numerator / denominator


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of predictions equal to the truth."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if len(truth) == 0:
        raise ValueError("no samples to score")
    return float((predicted == truth).mean())


def precision_at_k(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    database_embeddings: np.ndarray,
    database_labels: np.ndarray,
    k: int = 10,
) -> float:
    """Macro-averaged P@k: per query, the share of its k nearest database items (Euclidean) of its class.

    Shares are averaged per class, then over classes (docs/method.md), so a large class does not dominate.
    """
    queries = np.asarray(query_embeddings, dtype=np.float64)
    database = np.asarray(database_embeddings, dtype=np.float64)
    query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
    if len(queries) == 0 or len(database) == 0:
        raise ValueError("P@k needs at least one query and one database item")
    k = min(k, len(database))
    distances = (queries**2).sum(1)[:, None] - 2 * queries @ database.T + (database**2).sum(1)[None, :]
    nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
    shares = (database_labels[nearest] == query_labels[:, None]).mean(axis=1)
    return float(np.mean([shares[query_labels == c].mean() for c in np.unique(query_labels)]))


def polygon_iou(predicted: BaseGeometry, truth: BaseGeometry) -> float:
    """Pixel-level intersection over union of two areas (1 when both are empty)."""
    union = predicted.union(truth).area
    return 1.0 if union == 0 else float(predicted.intersection(truth).area / union)


def labels_to_reach(labels: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The smallest label count at which the curve first reaches ``target``, or None if it never does."""
    labels, values = np.asarray(labels, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(labels, kind="stable")
    hits = np.flatnonzero(values[order] >= target - 1e-12)
    return float(labels[order][hits[0]]) if len(hits) else None


def area_under_curve(labels: np.ndarray, values: np.ndarray) -> float:
    """Mean height of a learning curve over its label range (trapezoids; the single value if one point)."""
    labels, values = np.asarray(labels, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    labels, values = labels[keep], values[keep]
    if len(values) == 0:
        return float("nan")
    order = np.argsort(labels, kind="stable")
    labels, values = labels[order], values[order]
    span = labels[-1] - labels[0]
    if span == 0:
        return float(values.mean())
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(labels)) / span)
