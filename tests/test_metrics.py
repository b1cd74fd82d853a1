"""Tests for wsi_il.metrics: hand-computed values, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from wsi_il.metrics import (
    accuracy,
    area_under_curve,
    binary_scores,
    labels_to_reach,
    polygon_iou,
    precision_at_k,
)


def test_binary_scores_by_hand() -> None:
    predicted = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    truth = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    s = binary_scores(predicted, truth)
    assert (s.true_positives, s.false_positives, s.false_negatives, s.true_negatives) == (2, 1, 1, 2)
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 / 3) and s.jaccard == pytest.approx(0.5)
    assert s.f1 == pytest.approx(2 * s.jaccard / (1 + s.jaccard))


def test_balanced_accuracy_sees_over_calling() -> None:
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)  # 30% tumour
    everything = binary_scores(np.ones(10, dtype=bool), truth)
    assert everything.jaccard == pytest.approx(0.3)  # calling everything scores the prevalence...
    assert everything.balanced_accuracy == pytest.approx(0.5)  # ...and chance in balanced accuracy
    assert everything.called_share == 1.0 and everything.truth_share == pytest.approx(0.3)
    s = binary_scores(np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool), truth)
    assert s.specificity == pytest.approx(6 / 7) and s.recall == pytest.approx(2 / 3)
    assert s.balanced_accuracy == pytest.approx((2 / 3 + 6 / 7) / 2) and s.called_share == pytest.approx(0.3)


def test_binary_scores_empty_cases() -> None:
    nothing = np.zeros(4, dtype=bool)
    assert binary_scores(nothing, nothing).jaccard == 1.0  # nothing to find, nothing claimed
    missed = binary_scores(nothing, np.array([1, 0, 0, 0], dtype=bool))
    assert missed.f1 == 0.0 and missed.recall == 0.0 and missed.precision == 1.0
    assert binary_scores(np.zeros(0, bool), np.zeros(0, bool)).f1 == 1.0
    with pytest.raises(ValueError, match="shape"):
        binary_scores(nothing, np.zeros(3, dtype=bool))


def test_accuracy() -> None:
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError):
        accuracy(np.array([]), np.array([]))


def test_precision_at_k_is_macro_averaged() -> None:
    database = np.array([[0.0], [0.1], [0.2], [10.0], [10.1]])
    database_y = np.array([0, 0, 0, 1, 1])
    queries = np.array([[0.05], [10.05], [9.0]])
    query_y = np.array([0, 1, 1])
    # k=2: class 0 query -> 2/2; both class 1 queries -> 2/2
    assert precision_at_k(queries, query_y, database, database_y, k=2) == 1.0
    # k=3: class 0 -> 3/3; class 1 queries -> 2/3 each; macro = (1 + 2/3) / 2
    assert precision_at_k(queries, query_y, database, database_y, k=3) == pytest.approx((1 + 2 / 3) / 2)
    # class 0 has more queries than class 1, but each class weighs the same
    many = np.vstack([queries, [[0.0]] * 5])
    many_y = np.concatenate([query_y, [0] * 5])
    assert precision_at_k(many, many_y, database, database_y, k=3) == pytest.approx((1 + 2 / 3) / 2)
    # k larger than the database is capped
    assert precision_at_k(queries[:1], query_y[:1], database, database_y, k=50) == pytest.approx(3 / 5)


def test_polygon_iou() -> None:
    assert polygon_iou(box(0, 0, 2, 2), box(1, 0, 3, 2)) == pytest.approx(2 / 6)
    assert polygon_iou(Polygon(), Polygon()) == 1.0
    assert polygon_iou(Polygon(), box(0, 0, 1, 1)) == 0.0


def test_labels_to_reach() -> None:
    labels = np.array([10, 20, 30, 40])
    values = np.array([0.5, 0.9, 0.8, 0.95])
    assert labels_to_reach(labels, values, 0.9) == 20  # the first time it gets there
    assert labels_to_reach(labels, values, 0.95) == 40
    assert labels_to_reach(labels, values, 0.99) is None


def test_area_under_curve_is_mean_height() -> None:
    assert area_under_curve(np.array([0, 10]), np.array([0.0, 1.0])) == pytest.approx(0.5)
    assert area_under_curve(np.array([0, 10, 20]), np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert area_under_curve(np.array([5]), np.array([0.4])) == pytest.approx(0.4)
    assert np.isnan(area_under_curve(np.array([]), np.array([])))
