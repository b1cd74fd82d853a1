"""Each strategy's choice on small hand-made ranked lists (docs/method.md, round step 4)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_il.sampling import (
    sample,
    sample_cnfp,
    sample_entropy,
    sample_fme,
    sample_hybrid,
    sample_random,
    sample_topk,
)


def _probs(positive: list[bool]) -> np.ndarray:
    p = np.array([[0.9, 0.1] if pos else [0.2, 0.8] for pos in positive])
    return p


def test_topk_takes_the_front():
    assert sample_topk(20, 5).tolist() == [0, 1, 2, 3, 4]


def test_fme_front_mid_end():
    # K=10, M=100: ceil(10/3)=4 front, floor(10/3)=3 end, 3 centred on 50
    picked = sample_fme(100, 10).tolist()
    assert picked[:4] == [0, 1, 2, 3]
    assert picked[-3:] == [97, 98, 99]
    assert picked[4:7] == [49, 50, 51]


def test_fme_k5_matches_paper_split():
    picked = sample_fme(30, 5).tolist()
    assert picked == [0, 1, 14, 15, 29]  # 2 front, 1 end, 2 starting at M/2 - Nmid/2 (the paper)


def test_fewer_than_k_left_takes_all():
    rng = np.random.default_rng(0)
    for positions in (
        sample_topk(3, 5),
        sample_fme(3, 5),
        sample_random(3, 5, rng),
        sample_cnfp(np.array([True, False, True]), 5),
        sample_entropy(np.full((3, 2), 0.5), 5),
        sample_hybrid(np.array([True, False, True]), 5),
    ):
        assert sorted(positions.tolist()) == [0, 1, 2]


def test_fme_small_m_has_no_duplicates():
    for m in range(5, 12):
        picked = sample_fme(m, 5)
        assert len(set(picked.tolist())) == 5
        assert picked.max() < m


def test_cnfp_closest_negatives_farthest_positives():
    #            0     1      2     3      4      5     6     7      8      9
    positive = [True, False, True, False, False, True, True, False, True, True]
    picked = sample_cnfp(np.array(positive), 4).tolist()
    assert picked == [1, 3, 9, 8]  # 2 closest negatives, then 2 farthest positives


def test_cnfp_odd_k_gives_negatives_the_extra():
    positive = np.array([True, False, False, True, False, True])
    assert sample_cnfp(positive, 3).tolist() == [1, 2, 5]


def test_cnfp_one_side_empty_fills_from_the_other():
    all_positive = np.ones(8, dtype=bool)
    assert sample_cnfp(all_positive, 4).tolist() == [7, 6, 5, 4]
    all_negative = np.zeros(8, dtype=bool)
    assert sample_cnfp(all_negative, 4).tolist() == [0, 1, 2, 3]
    one_negative = np.array([True, True, False, True, True])
    assert sample_cnfp(one_negative, 4).tolist() == [2, 4, 3, 1]


def test_hybrid_has_cnfp_half_and_fme_rest_without_duplicates():
    positive = np.array([i % 2 == 0 for i in range(30)])
    picked = sample_hybrid(positive, 6).tolist()
    assert picked[:3] == sample_cnfp(positive, 3).tolist()
    assert len(set(picked)) == 6


def test_entropy_picks_the_most_uncertain():
    probs = np.array([[0.99, 0.01], [0.5, 0.5], [0.7, 0.3], [0.55, 0.45], [1.0, 0.0]])
    assert sample_entropy(probs, 2).tolist() == [1, 3]


def test_random_is_seeded_and_unique():
    a = sample_random(100, 10, np.random.default_rng(3))
    b = sample_random(100, 10, np.random.default_rng(3))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10


@pytest.mark.parametrize("strategy", ["cnfp", "hybrid", "entropy"])
def test_no_classifier_yet_falls_back_to_fme(strategy):
    positions, rule = sample(strategy, 5, 30, np.random.default_rng(0), None, 0)
    assert rule == "fme" and positions.tolist() == sample_fme(30, 5).tolist()


def test_dispatch_uses_the_query_class_as_positive():
    probs = _probs([True, False, True, False, True, False])
    pos_class_0, _ = sample("cnfp", 2, 6, np.random.default_rng(0), probs, 0)
    pos_class_1, _ = sample("cnfp", 2, 6, np.random.default_rng(0), probs, 1)
    assert pos_class_0.tolist() == [1, 4]
    assert pos_class_1.tolist() == [0, 5]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError):
        sample("greedy", 5, 10, np.random.default_rng(0), None, 0)
