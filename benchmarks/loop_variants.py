"""`wsi-il simulate` with another use of a large query region, to find what a region changes in the loop.

    LOOP_REGION_ROWS=30 python benchmarks/loop_variants.py simulate ...   # a round's most rows of the region
    LOOP_REGION_FIXED=1 python benchmarks/loop_variants.py simulate ...   # the same region rows every round
    LOOP_QUERY_TEN=1    python benchmarks/loop_variants.py simulate ...   # q from ten of the region's patches
    LOOP_CNFP_TYPICAL=1 python benchmarks/loop_variants.py simulate ...   # one of CNFP's negatives at random
    LOOP_FIRST_RANDOM=1 python benchmarks/loop_variants.py simulate ...   # the first batch random, not FME
    LOOP_COLD=1         python benchmarks/loop_variants.py simulate ...   # every round's training from the start
    LOOP_REGION_HARD=1  python benchmarks/loop_variants.py simulate ...   # the region's rows it predicts worst
    LOOP_FIT_ALL=1      python benchmarks/loop_variants.py simulate ...   # the linear layer fitted to all of it
    LOOP_CNFP_RANDOM=1  python benchmarks/loop_variants.py simulate ...   # one of CNFP's patches at random
    LOOP_RANK_NEAREST=1 python benchmarks/loop_variants.py simulate ...   # ranked by the nearest query patch
    LOOP_CNFP_POSITIVES=1 python benchmarks/loop_variants.py simulate ... # CNFP's odd patch a far positive
    LOOP_UNWEIGHTED=1   python benchmarks/loop_variants.py simulate ...   # the selected rows unweighted
    LOOP_PROBE=all      python benchmarks/loop_variants.py simulate ...   # predicted by a probe, pretrained block

Every variant is off by default, and then the run is `wsi-il simulate`'s own. The runs in docs/quality.md made
before the read-out map (`--map-from readout`, the default since) were scored on the classifier head's map: add
`--map-from heads` to rerun them as they were. `LOOP_REGION_ROWS` and
`LOOP_REGION_FIXED` replace `heads.training_selection` for balanced training: the region's rows are drawn at
random as there, but up to the given number, and (fixed) seeded by the training seed and the session only, so
that every round trains on the same ones. `LOOP_QUERY_TEN` computes the session's query vector (at the start and
at every refinement) from ten of the region's patches, drawn once, instead of all of them; the region still
counts as labelled and is left out of the ranked list. With `LOOP_QUERY_TEN=1 LOOP_REGION_FIXED=1` a large region
differs from ten patches only in what it takes out of the ranked list. `LOOP_CNFP_TYPICAL` changes the sampling,
not the region: of CNFP's ceil(K/2) predicted negatives, the last is drawn at random among the predicted negatives
instead of being the next closest to q, so that typical tissue of the other class is labelled too.
`LOOP_FIRST_RANDOM` draws the batches made before any classifier exists (CNFP's, hybrid's and entropy's first)
at random instead of by front-mid-end. `LOOP_COLD` starts every round's training from the pretrained heads, as the
paper's schedule does, instead of the fast schedule's warm start from the previous round's model.
`LOOP_REGION_HARD` takes, of a region larger than a round's rows, the rows the current model gives the lowest
probability of the region's class (at random before any model exists). `LOOP_FIT_ALL` fits the classifier's
linear layer (before and after the round's training) to every reviewed label and every patch of the region, the
region's patches together weighing as much as ten labels, while the block still trains on the round's ten rows.
`LOOP_CNFP_RANDOM` is `LOOP_CNFP_TYPICAL` with the replacement drawn among all unreviewed patches, whatever their
prediction. `LOOP_RANK_NEAREST` ranks the unreviewed patches (exact rounds) by their distance to the nearest of q and
the query's patches, in the current embedding, instead of by their distance to q alone. `LOOP_CNFP_POSITIVES` gives
CNFP's odd patch (K odd) to the predicted positives farthest from q instead of to the closest predicted negatives:
ceil(K/2) positives, floor(K/2) negatives. `LOOP_PROBE` trains the block as built (warm-started, for the
embedding that ranks), but predicts with the pretrained block and a linear layer fitted (``heads.fit_linear``) to
every reviewed label and the region: all of it at the weight of ten labels (`all`, as `LOOP_FIT_ALL`), or the
round's training rows only (`rows`). `LOOP_UNWEIGHTED` keeps balanced training's choice of rows (every reviewed
label, ten of the region's) but weighs every row once, so that the classes weigh as the labels fall.
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
_train, _rows_of = heads.train_heads, session._training_rows
_hard = os.environ.get("LOOP_REGION_HARD") == "1"
_context, _all_rows, _batch_session = [], [], []
_write_batch = session._write_next_batch


def _training_selection(targets, groups, balance, seed=0, query_cap=heads.QUERY_GROUP_SIZE):
    if balance != "classes":
        return _selection(targets, groups, balance, seed, query_cap)
    targets, groups = np.asarray(targets), np.asarray(groups)
    keep = [np.flatnonzero(groups < 0)]
    for group in np.unique(groups[groups >= 0]):
        rows = np.flatnonzero(groups == group)
        if _hard and len(rows) > _rows and _context:
            worst = _hardest(_context[-1], int(group), _rows)
            if worst is not None:
                keep.append(np.sort(rows[worst]))
                continue
        rng = np.random.default_rng([seed, int(group)] if _fixed else [seed, len(targets)])
        keep.append(np.sort(rng.choice(rows, size=min(len(rows), _rows), replace=False)))
    keep = np.concatenate(keep)
    if os.environ.get("LOOP_UNWEIGHTED") == "1":
        return keep, None
    return keep, heads.training_weights(targets[keep])


def _hardest(ctx, number, n):
    """Positions, within session ``number``'s query, of the n patches the current predictions give the lowest
    probability of the session's class; None before any prediction exists."""
    path = ctx.project.predictions_path()
    if not path.exists():
        return None
    found = session.list_sessions(ctx.project)[number]
    index = ctx.table.index_of()
    probability = ctx.project.read_array(path)[
        [index[i] for i in found["query"]["patch_ids"]], ctx.class_index(found["label"])
    ]
    return np.argsort(probability, kind="stable")[:n]


def _training_rows(ctx):
    _context[:] = [ctx]
    found = _rows_of(ctx)
    _all_rows[:] = [found]
    return found


def _whole_region():
    """The round's every reviewed label and query patch, with ``readout.readout_weights``'s weights (each region
    together as ten labels)."""
    from wsi_il.readout import readout_weights

    features, targets, groups = _all_rows.pop()
    return features, targets, readout_weights(targets, groups)


def _fit_all(*args, **kwargs):
    if _all_rows and kwargs.get("fit_set") is None:
        kwargs["fit_set"] = _whole_region()
    return _train(*args, **kwargs)


def _probe(*args, **kwargs):
    import torch

    init, n_classes = args[2], args[3]
    start = args[6] if len(args) > 6 else kwargs.get("start")
    if start is not None:  # the shared block trains on from the previous round's block, not from the probe's
        fc = {k: v for k, v in start.classifier.items() if k.startswith("fc.")}
        args, kwargs = _with_start(
            args, kwargs, heads.TrainedHeads(start.retrieval, {**start.retrieval, **fc}, n_classes, {})
        )
    trained = _train(*args, **kwargs)
    features, targets, weights = _whole_region()
    if os.environ["LOOP_PROBE"] == "rows":
        features, targets, weights = args[0], args[1], kwargs.get("weights")
    probe = heads.ClassifierHead(init, n_classes)
    probe.eval()
    x, y = heads._on_device(features, targets, torch.device("cpu"))
    heads.fit_linear(probe, x, None, y, heads._weights_on(weights, torch.device("cpu")), n_classes)
    return heads.TrainedHeads(
        trained.retrieval, heads._cpu_state(probe), n_classes, trained.losses, shared=False, schedule=trained.schedule
    )


def _with_start(args, kwargs, start):
    """``train_heads``'s arguments with ``start`` (its seventh, positional or by name) replaced."""
    if len(args) > 6:
        return (*args[:6], start, *args[7:]), kwargs
    return args, {**kwargs, "start": start}


def _cold(*args, **kwargs):
    args, kwargs = _with_start(args, kwargs, None)
    return _train(*args, **kwargs)


def _query_of_ten(ctx, features):
    if len(features) > heads.QUERY_GROUP_SIZE:
        pick = np.random.default_rng(0).choice(len(features), heads.QUERY_GROUP_SIZE, replace=False)
        features = features[np.sort(pick)]
    return _embed(ctx, features)


def _cnfp_typical(positive, k, anywhere=False):
    chosen = _cnfp(positive, k)
    pool = np.arange(len(positive)) if anywhere else np.flatnonzero(~positive)
    closest = [int(i) for i in chosen if not positive[i]]
    if len(closest) < 2:
        return chosen
    others = np.setdiff1d(pool, chosen)
    if len(others) == 0:
        return chosen
    pick = int(np.random.default_rng(len(positive)).choice(others))
    chosen = np.array([i for i in chosen if i != closest[-1]] + [pick], dtype=np.int64)
    return chosen


def _cnfp_random(positive, k):
    return _cnfp_typical(positive, k, anywhere=True)


def _write_next_batch(ctx, found, *args, **kwargs):
    _context[:] = [ctx]
    _batch_session[:] = [found]
    return _write_batch(ctx, found, *args, **kwargs)


def _rank_nearest(embeddings, query, candidates):
    import faiss

    ctx, found = _context[-1], _batch_session[-1]
    candidates = np.asarray(candidates, dtype=np.int64)
    index = ctx.table.index_of()
    rows = [index[i] for i in found["query"]["patch_ids"]]
    anchors = np.ascontiguousarray(np.vstack([query[None, :], embeddings[rows]]), dtype=np.float32)
    flat = faiss.IndexFlatL2(anchors.shape[1])
    flat.add(anchors)
    squared, _ = flat.search(np.ascontiguousarray(embeddings[candidates], dtype=np.float32), 1)
    distance = np.sqrt(np.maximum(squared[:, 0], 0.0))
    order = np.argsort(distance, kind="stable")
    return candidates[order], distance[order]


def _cnfp_positives(positive, k):
    """``sampling.sample_cnfp`` with the sides' shares swapped (ceil(K/2) far positives, the rest close negatives):
    CNFP of the mirrored list, whose "closest negatives" are the farthest predicted positives, mapped back."""
    return len(positive) - 1 - _cnfp(~positive[::-1], k)


def _first_random(strategy, k, m, rng, probabilities, positive_class):
    if probabilities is None and strategy in ("cnfp", "hybrid", "entropy"):
        return sampling.sample_random(m, k, rng), "random"
    return _sample(strategy, k, m, rng, probabilities, positive_class)


if __name__ == "__main__":
    heads.training_selection = _training_selection
    if os.environ.get("LOOP_QUERY_TEN") == "1":
        session.embed_features = _query_of_ten
    for name, attribute, replacement in (
        ("LOOP_CNFP_TYPICAL", "sample_cnfp", _cnfp_typical),
        ("LOOP_CNFP_RANDOM", "sample_cnfp", _cnfp_random),
        ("LOOP_CNFP_POSITIVES", "sample_cnfp", _cnfp_positives),
        ("LOOP_FIRST_RANDOM", "sample", _first_random),
    ):
        if os.environ.get(name) == "1":
            setattr(sampling, attribute, replacement)
    if _hard or os.environ.get("LOOP_FIT_ALL") == "1" or os.environ.get("LOOP_PROBE"):
        session._training_rows = _training_rows
    if os.environ.get("LOOP_FIT_ALL") == "1":
        heads.train_heads = _fit_all
    if os.environ.get("LOOP_PROBE"):
        heads.train_heads = _probe
    if os.environ.get("LOOP_COLD") == "1":
        heads.train_heads = _cold
    if os.environ.get("LOOP_RANK_NEAREST") == "1":
        import wsi_il.index

        session._write_next_batch = _write_next_batch
        wsi_il.index.rank_by_distance = _rank_nearest
    from wsi_il.cli import main

    sys.argv = ["wsi-il", *sys.argv[1:]]
    main()
