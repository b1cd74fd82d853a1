"""`wsi-il simulate` with another use of a large query region, to find what a region changes in the loop.

    LOOP_REGION_ROWS=30 python benchmarks/loop_variants.py simulate ...   # a round's most rows of the region
    LOOP_REGION_FIXED=1 python benchmarks/loop_variants.py simulate ...   # the same region rows every round
    LOOP_QUERY_TEN=1    python benchmarks/loop_variants.py simulate ...   # q from ten of the region's patches
    LOOP_CNFP_TYPICAL=1 python benchmarks/loop_variants.py simulate ...   # one of CNFP's negatives at random
    LOOP_FIRST_RANDOM=1 python benchmarks/loop_variants.py simulate ...   # the first batch random, not FME

Every variant is off by default, and then the run is `wsi-il simulate`'s own. `LOOP_REGION_ROWS` and
`LOOP_REGION_FIXED` replace `heads.training_selection` for balanced training: the region's rows are drawn at
random as there, but up to the given number, and (fixed) seeded by the training seed and the session only, so
that every round trains on the same ones. `LOOP_QUERY_TEN` computes the session's query vector (at the start and
at every refinement) from ten of the region's patches, drawn once, instead of all of them; the region still
counts as labelled and is left out of the ranked list. With `LOOP_QUERY_TEN=1 LOOP_REGION_FIXED=1` a large region
differs from ten patches only in what it takes out of the ranked list. `LOOP_CNFP_TYPICAL` changes the sampling,
not the region: of CNFP's ceil(K/2) predicted negatives, the last is drawn at random among the predicted negatives
instead of being the next closest to q, so that typical tissue of the other class is labelled too.
`LOOP_FIRST_RANDOM` draws the batches made before any classifier exists (CNFP's, hybrid's and entropy's first)
at random instead of by front-mid-end.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import wsi_il.heads as heads
import wsi_il.sampling as sampling
import wsi_il.session as session

_rows = int(os.environ.get("LOOP_REGION_ROWS", heads.QUERY_GROUP_SIZE))
_fixed = os.environ.get("LOOP_REGION_FIXED") == "1"
_selection, _embed, _cnfp = heads.training_selection, session.embed_features, sampling.sample_cnfp
_sample = sampling.sample


def _training_selection(targets, groups, balance, seed=0, query_cap=heads.QUERY_GROUP_SIZE):
    if balance != "classes":
        return _selection(targets, groups, balance, seed, query_cap)
    targets, groups = np.asarray(targets), np.asarray(groups)
    keep = [np.flatnonzero(groups < 0)]
    for group in np.unique(groups[groups >= 0]):
        rows = np.flatnonzero(groups == group)
        rng = np.random.default_rng([seed, int(group)] if _fixed else [seed, len(targets)])
        keep.append(np.sort(rng.choice(rows, size=min(len(rows), _rows), replace=False)))
    keep = np.concatenate(keep)
    return keep, heads.training_weights(targets[keep])


def _query_of_ten(ctx, features):
    if len(features) > heads.QUERY_GROUP_SIZE:
        pick = np.random.default_rng(0).choice(len(features), heads.QUERY_GROUP_SIZE, replace=False)
        features = features[np.sort(pick)]
    return _embed(ctx, features)


def _cnfp_typical(positive, k):
    chosen = _cnfp(positive, k)
    negatives = np.flatnonzero(~positive)
    closest = [int(i) for i in chosen if not positive[i]]
    if len(closest) < 2:
        return chosen
    others = np.setdiff1d(negatives, chosen)
    if len(others) == 0:
        return chosen
    pick = int(np.random.default_rng(len(positive)).choice(others))
    chosen = np.array([i for i in chosen if i != closest[-1]] + [pick], dtype=np.int64)
    return chosen


def _first_random(strategy, k, m, rng, probabilities, positive_class):
    if probabilities is None and strategy in ("cnfp", "hybrid", "entropy"):
        return sampling.sample_random(m, k, rng), "random"
    return _sample(strategy, k, m, rng, probabilities, positive_class)


if __name__ == "__main__":
    heads.training_selection = _training_selection
    if os.environ.get("LOOP_QUERY_TEN") == "1":
        session.embed_features = _query_of_ten
    if os.environ.get("LOOP_CNFP_TYPICAL") == "1":
        sampling.sample_cnfp = _cnfp_typical
    if os.environ.get("LOOP_FIRST_RANDOM") == "1":
        sampling.sample = _first_random
    from wsi_il.cli import main

    sys.argv = ["wsi-il", *sys.argv[1:]]
    main()
