"""Does the model follow the size of the query region? What do more labels buy? Heads trained directly.

On a project whose features are computed (e.g. ``<simulate --out>/base/<slide>``) and the slide's exact truth
(a patch mosaic, ``python -m wsi_il.measure.mosaic --patches``), trains both heads as one round of the loop does (the
project's training settings and schedule, from the pretrained block) on

- a query region: ``small`` (10 connected tumour patches) or ``large`` (80% of the largest tumour island), and
- ``R`` reviewed patches drawn at random with their true labels (R from ``--reviewed``), outside both regions
  (the same patches whichever region is trained),

once with every label weighing once (``balance none``, the paper) and once class-balanced with at most 10 patches
of the query (``balance classes``), and scores the patches labelled in no run of the seed (neither region nor the
reviewed patches: the same patches for both regions): Jaccard, balanced accuracy, share called tumour.
It also gives two cross-validated references on the same features: a linear probe on the
pooled trunk features (``--folds`` folds) and the heads themselves (``--head-folds`` folds, the round's schedule
and pass budget).

usage: python benchmarks/quality_region.py PROJECT TRUTH [--seeds 2] [--reviewed 15,30,75] [--regions small,large]
                                           [--balances none,classes] [--head-inits random,refit] [--head-folds 3]
                                           [--schedule fast|paper] [--fast-budget PASSES] [--lr LR] [--epochs N]
                                           [--first-seed 0] [--out FILE.json]

``--head-inits`` compares how a round starts and ends the classifier's linear layer (TrainSettings.head_init);
``--lr 0 --epochs 1 --head-inits fit`` leaves the block as it is and fits the linear layer alone (a linear probe
on the block's output).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    from wsi_il.config import TrainSettings, from_dict
    from wsi_il.events import SilentReporter
    from wsi_il.measure.simulate import grow_region, tumour_islands
    from wsi_il.measure.truth import truth_mask
    from wsi_il.metrics import binary_scores
    from wsi_il.model import open_context
    from wsi_il.project import Project

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("truth", type=Path)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--reviewed", default="15,30,75")
    parser.add_argument("--regions", default="small,large")
    parser.add_argument("--balances", default="none,classes")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--head-folds", type=int, default=3)
    parser.add_argument("--schedule", default="fast", help="the rounds' schedule: fast (the CPU default) or paper")
    parser.add_argument("--fast-budget", type=int, default=0, help="the fast schedule's pass budget; 0: the project's")
    parser.add_argument("--head-inits", default="", help="TrainSettings.head_init values; default: the project's")
    parser.add_argument("--lr", type=float, default=None, help="the rounds' learning rate; default: the project's")
    parser.add_argument("--epochs", type=int, default=None, help="the rounds' epochs; default: the project's")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--fit-query",
        type=int,
        default=0,
        help="the linear layer's fit takes up to this many query patches (0: the training rows)",
    )
    parser.add_argument(
        "--query-picks",
        default="random",
        help="how a round picks its rows of a large region: random (as wsi-il does), spread, typical (_pick_rows)",
    )
    parser.add_argument("--query-cap", type=int, default=0, help="a round's most rows of the region (0: default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ctx = open_context(Project(args.project), "cpu", SilentReporter())
    truth = truth_mask(ctx.table.boxes, args.truth, ctx.table.slides[0].offset)
    settings = replace(from_dict(TrainSettings, ctx.manifest["train"]), schedule=args.schedule)
    if args.fast_budget:
        settings = replace(settings, fast_budget=args.fast_budget)
    if args.lr is not None:
        settings = replace(settings, lr=args.lr)
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    head_inits = args.head_inits.split(",") if args.head_inits else [settings.head_init]
    largest = max(tumour_islands(ctx.table.boxes, truth), key=len)
    n = len(truth)
    print(f"{n} tissue patches, {truth.mean():.1%} tumour, largest island {len(largest)} patches", flush=True)
    results: dict = {
        "patches": n,
        "tumour_share": float(truth.mean()),
        "largest_island": len(largest),
        "settings": {
            k: getattr(settings, k)
            for k in ("epochs", "lr", "fast_budget", "fast_frozen_conv1", "schedule", "head_init")
        },
        "options": {"query_cap": args.query_cap, "fit_query": args.fit_query},
        "probe": _probe_cv(ctx, truth, args.folds),
        "runs": [],
    }
    print(f"linear probe, {args.folds}-fold: {results['probe']}", flush=True)
    if args.head_folds:
        results["heads_cv"] = _heads_cv(ctx, truth, settings, args.head_folds)
        print(f"heads, {args.head_folds}-fold: {results['heads_cv']}", flush=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rng = np.random.default_rng(seed)
        queries = {
            "small": grow_region(ctx.table.boxes, largest, 10, rng),
            "large": grow_region(ctx.table.boxes, largest, round(0.8 * len(largest)), rng),
        }
        order = rng.permutation(n)
        pool = order[~np.isin(order, np.concatenate(list(queries.values())))]  # the same reviewed patches for both
        for region in args.regions.split(","):
            query = queries[region]
            for reviewed in (int(r) for r in args.reviewed.split(",")):
                picked = pool[:reviewed]
                for balance, head_init, pick in (
                    (b, h, p) for b in args.balances.split(",") for h in head_inits for p in args.query_picks.split(",")
                ):
                    started = time.perf_counter()
                    predicted = _train_and_predict(
                        ctx,
                        picked,
                        query,
                        truth,
                        replace(settings, balance=balance, seed=seed, head_init=head_init),
                        args.fit_query,
                        pick,
                        args.query_cap,
                    )
                    rest = np.ones(n, dtype=bool)  # labelled in no run of this seed: one set for every region
                    rest[picked] = False
                    for other in queries.values():
                        rest[other] = False
                    s = binary_scores(predicted[rest], truth[rest])
                    row = {
                        "seed": seed,
                        "region": region,
                        "query_patches": len(query),
                        "reviewed": reviewed,
                        "reviewed_tumour": int(truth[picked].sum()),
                        "balance": balance,
                        "head_init": head_init,
                        "query_pick": pick,
                        "jaccard": s.jaccard,
                        "balanced_accuracy": s.balanced_accuracy,
                        "f1": s.f1,
                        "called": s.called_share,
                        "truth_share": s.truth_share,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        args.out.write_text(json.dumps(results, indent=1) + "\n")


def _train_and_predict(ctx, picked, query, truth, settings, fit_query=0, pick="random", query_cap=0):
    from wsi_il.heads import QUERY_GROUP_SIZE, embed_and_predict, train_heads, training_selection, training_weights
    from wsi_il.model import load_tensors

    tumour, normal = ctx.class_index("Tumor"), ctx.class_index("Normal")
    rows = np.concatenate([picked, query])
    targets = np.concatenate([np.where(truth[picked], tumour, normal), np.full(len(query), tumour)]).astype(np.int64)
    groups = np.concatenate([np.full(len(picked), -1), np.zeros(len(query), dtype=np.int64)])
    cap = query_cap or QUERY_GROUP_SIZE
    keep, weights = training_selection(targets, groups, settings.balance, settings.seed, cap)
    if pick != "random" and len(query) > cap:
        vectors = ctx.store.take(query).astype(np.float32).mean(axis=(2, 3))
        chosen = _pick_rows(vectors, cap, pick, _kmeans_seed(settings.seed, len(targets)))
        keep = np.concatenate([np.arange(len(picked)), len(picked) + chosen])
        weights = training_weights(targets[keep])
    init = load_tensors(ctx.project.init_model_path())
    fit_set = None
    if fit_query:
        fit_rows, fit_weights = training_selection(targets, groups, settings.balance, settings.seed, fit_query)
        fit_set = (ctx.store.take(rows[fit_rows]), targets[fit_rows], fit_weights)
    heads = train_heads(
        ctx.store.take(rows[keep]), targets[keep], init, 2, settings, "cpu", weights=weights, fit_set=fit_set
    )
    _, probs = embed_and_predict(heads.model(), init, 2, ctx.store.chunks(512), len(ctx.store), "cpu")
    return probs.argmax(axis=1) == tumour


def _kmeans_seed(seed: int, rows: int) -> int:
    """The k-means seed of a round's 'spread' pick: the first draw of the generator ``training_selection`` uses
    for the same training set (the seed the published runs used)."""
    return int(np.random.default_rng([seed, rows]).integers(2**31))


def _pick_rows(vectors: np.ndarray, count: int, pick: str, seed: int) -> np.ndarray:
    """``count`` rows of a region's pooled features other than at random: 'spread' (the row nearest each centre of
    a k-means with ``count`` centres) or 'typical' (the rows nearest the region's mean)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if pick == "typical":
        return np.sort(np.argsort(((vectors - vectors.mean(axis=0)) ** 2).sum(axis=1))[:count])
    if pick != "spread":
        raise ValueError(f"unknown pick {pick!r}")
    kmeans = faiss.Kmeans(vectors.shape[1], count, niter=25, seed=seed, min_points_per_centroid=1)
    kmeans.train(vectors)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    _, nearest = index.search(kmeans.centroids, count)
    chosen: list[int] = []
    for row in nearest:  # each centre's nearest row not yet taken
        chosen.append(int(next(r for r in row if r not in chosen)))
    return np.sort(np.array(chosen, dtype=np.int64))


def _pooled(ctx):
    return np.concatenate([block.astype(np.float32).mean(axis=(2, 3)) for _, block in ctx.store.chunks(512)])


def _probe_cv(ctx, truth, folds):
    """Class-balanced logistic regression on the pooled features, cross-validated."""

    from wsi_il.metrics import binary_scores

    x = _pooled(ctx)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    fold_of = np.random.default_rng(0).permutation(len(truth)) % folds
    predicted = np.zeros(len(truth), dtype=bool)
    for fold in range(folds):
        train = fold_of != fold
        predicted[~train] = _fit_probe(x[train], truth[train]).predict(x[~train])
    s = binary_scores(predicted, truth)
    return {"jaccard": s.jaccard, "balanced_accuracy": s.balanced_accuracy, "f1": s.f1, "called": s.called_share}


class _fit_probe:
    """Logistic regression, class-balanced, L2 1e-3, fitted by L-BFGS."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        import torch

        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        self.w = torch.zeros(x.shape[1], 2, requires_grad=True)
        self.b = torch.zeros(2, requires_grad=True)
        weight = torch.tensor([1 / max(1, int((yt == 0).sum())), 1 / max(1, int((yt == 1).sum()))])
        weight = weight / weight.sum() * 2
        optimiser = torch.optim.LBFGS([self.w, self.b], max_iter=200)

        def closure():
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ self.w + self.b, yt, weight=weight)
            loss = loss + 1e-3 * (self.w**2).sum()
            loss.backward()
            return loss

        optimiser.step(closure)

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return (torch.from_numpy(x) @ self.w + self.b).argmax(1).numpy() == 1


def _heads_cv(ctx, truth, settings, folds):
    """Both heads, the round's schedule and pass budget, trained on all but one fold (class-balanced)."""
    from wsi_il.metrics import binary_scores

    fold_of = np.random.default_rng(0).permutation(len(truth)) % folds
    predicted = np.zeros(len(truth), dtype=bool)
    started = time.perf_counter()
    for fold in range(folds):
        train = np.flatnonzero(fold_of != fold)
        held = fold_of == fold
        predicted[held] = _train_and_predict(
            ctx, train, np.zeros(0, dtype=np.int64), truth, replace(settings, balance="classes")
        )[held]
    s = binary_scores(predicted, truth)
    return {
        "jaccard": s.jaccard,
        "balanced_accuracy": s.balanced_accuracy,
        "f1": s.f1,
        "called": s.called_share,
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    main()
