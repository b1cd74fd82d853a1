"""The sampling strategies of docs/method.md: pure functions of a ranked list and a numpy Generator.

Every strategy returns positions into the ranked list (0 = closest to the query), in the order in
which the patches are shown to the expert. M = len(ranked) may be smaller than K: then all are taken.
"""

from __future__ import annotations

import math

import numpy as np

from wsi_il.config import STRATEGIES


def sample_random(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """K positions uniformly at random."""
    return np.sort(rng.choice(m, size=min(k, m), replace=False))


def sample_topk(m: int, k: int) -> np.ndarray:
    """The first K positions."""
    return np.arange(min(k, m))


def sample_fme(m: int, k: int) -> np.ndarray:
    """ceil(K/3) from the front, floor(K/3) from the end, the rest centred on M/2."""
    if m <= k:
        return np.arange(m)
    n_front, n_end = math.ceil(k / 3), k // 3
    n_mid = k - n_front - n_end
    front = list(range(n_front))
    end = list(range(m - n_end, m))
    mid_start = min(max(n_front, m // 2 - n_mid // 2), m - n_end - n_mid)
    mid = list(range(mid_start, mid_start + n_mid))
    return np.array(front + mid + end, dtype=np.int64)


def sample_cnfp(positive: np.ndarray, k: int) -> np.ndarray:
    """ceil(K/2) predicted negatives closest to q, floor(K/2) predicted positives farthest from q.

    ``positive[i]`` says whether the classifier predicts the query's class for ranked position i.
    When one side runs short, the other side fills the gap.
    """
    negatives = np.flatnonzero(~positive)  # ascending distance: closest first
    positives = np.flatnonzero(positive)[::-1]  # farthest first
    n_neg = min(math.ceil(k / 2), len(negatives))
    n_pos = min(k - n_neg, len(positives))
    n_neg = min(k - n_pos, len(negatives))
    return np.concatenate([negatives[:n_neg], positives[:n_pos]]).astype(np.int64)


def sample_hybrid(positive: np.ndarray, k: int) -> np.ndarray:
    """ceil(K/2) by CNFP, the rest by front-mid-end over the remaining positions."""
    m = len(positive)
    first = sample_cnfp(positive, math.ceil(k / 2))
    rest = np.setdiff1d(np.arange(m), first)
    second = rest[sample_fme(len(rest), min(k - len(first), len(rest)))]
    return np.concatenate([first, second]).astype(np.int64)


def sample_entropy(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The K positions whose predicted class distribution has the highest entropy."""
    p = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=1)
    return np.argsort(-entropy, kind="stable")[: min(k, len(entropy))].astype(np.int64)


def sample(
    strategy: str, k: int, m: int, rng: np.random.Generator, probabilities: np.ndarray | None, positive_class: int
) -> tuple[np.ndarray, str]:
    """Pick K positions of a ranked list of M with ``strategy``; returns them and the rule applied.

    ``probabilities`` (M, C) are the previous round's classifier predictions for the ranked list,
    or None before any classifier exists: then cnfp, hybrid and entropy use front-mid-end.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "random":
        return sample_random(m, k, rng), "random"
    if strategy == "topk":
        return sample_topk(m, k), "topk"
    if strategy == "fme" or probabilities is None:
        return sample_fme(m, k), "fme"
    if strategy == "entropy":
        return sample_entropy(probabilities, k), "entropy"
    positive = probabilities.argmax(axis=1) == positive_class
    if strategy == "cnfp":
        return sample_cnfp(positive, k), "cnfp"
    return sample_hybrid(positive, k), "hybrid"
