"""Seed-by-seed comparison of two `wsi-il simulate` outputs on the patches that neither labelled.

    python benchmarks/loop_pairs.py BASE_OUT OTHER_OUT --slide A --truth A.truth.geojson \
        [--strategies cnfp,random] [--rounds] [--retrieval] [--readout base|other|both] [--json pairs.json]

Each output's `runs/<slide>/<strategy>-seed<n>/` holds the project a run left: its current model's predictions
and its labels (reviewed patches and the query region). Two runs with different query regions leave different
patches unlabelled, so `simulate`'s own "unlabelled" scores are taken on different patches; here both runs of a
seed are scored on the patches that neither of them labelled (reviewed or query), with their final models.
Prints, per strategy, each seed's balanced accuracy and share called tumour for both runs, and the paired
difference OTHER − BASE: mean, 95% confidence interval (Student's t over seeds), and on how many seeds OTHER is
ahead. With `--rounds`, every round's saved model of both runs (`models/<session>-r<n>.pt`) is scored on the
same patches too, so that one sees in which round two runs part. With `--retrieval`, each run's search is scored
too: in its final embedding, the share of true tumour among the `RETRIEVAL_K` patches of the common set nearest to
its session's query vector q (what the loop ranks by), with the paired differences. A run's map is what it shows
(`readout.current_map`); with `--readout base|other|both` that side's map is instead the read-out of its final
labels (`map_from` 'readout'), so that runs made with the classifier head's map are scored as the read-out would
show them (`--readout other` on the same output twice: the read-out against the run's own classifier).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from wsi_il.events import SilentReporter
from wsi_il.measure.simulate import TUMOUR, _slide_truth
from wsi_il.metrics import binary_scores
from wsi_il.model import open_context
from wsi_il.project import Project
from wsi_il.readout import current_map


def _labelled(project: Project) -> set[str]:
    """Every patch a run labelled: the reviewed ones and its sessions' query patches."""
    from wsi_il.session import list_sessions, reviewed_ids

    seen = set(reviewed_ids(project))
    for session in list_sessions(project):
        seen.update(session["query"].get("patch_ids", []))
    return seen


def _final(out: Path, slide: str, strategy: str, seed: int, readout: bool = False):
    project = Project(out / "runs" / slide / f"{strategy}-seed{seed}")
    ctx = open_context(project, "cpu", SilentReporter())
    shown = readout_map(ctx) if readout else current_map(ctx)
    return ctx, shown.argmax(axis=1) == ctx.class_index(TUMOUR), _labelled(project)


def readout_map(ctx) -> np.ndarray:
    """The map the run's final labels give under ``map_from`` 'readout' (``wsi_il.readout``): for a run made before
    the read-out existed, or with 'heads', what the product now shows for the same labels."""
    from wsi_il.pool import frozen_embeddings, frozen_norms
    from wsi_il.readout import map_probabilities, project_readout
    from wsi_il.session import training_entries

    return map_probabilities(frozen_embeddings(ctx), frozen_norms(ctx), project_readout(ctx, *training_entries(ctx)))


def score_model(ctx, model: dict, init: dict, truth: np.ndarray, common: np.ndarray) -> dict:
    """A model's balanced accuracy and share called tumour on the ``common`` patches (every patch predicted)."""
    from wsi_il.heads import embed_and_predict
    from wsi_il.model import embed_chunk

    chunks = ctx.store.chunks(embed_chunk("cpu"))
    _, probs = embed_and_predict(model, init, len(ctx.classes), chunks, len(ctx.store), "cpu")
    s = binary_scores(probs.argmax(axis=1)[common] == ctx.class_index(TUMOUR), truth[common])
    return {"balanced_accuracy": s.balanced_accuracy, "called": s.called_share}


RETRIEVAL_K = (10, 50, 100)
SIDES = ("base", "other")


def retrieval_precision(ctx, truth: np.ndarray, common: np.ndarray) -> dict:
    """The share of true tumour among the k ``common`` patches nearest to the first session's q in the run's
    current embedding, for each k of ``RETRIEVAL_K``."""
    from wsi_il.model import current_embeddings
    from wsi_il.session import list_sessions

    q = np.asarray(list_sessions(ctx.project)[0]["q"], dtype=np.float32)
    distance = np.linalg.norm(current_embeddings(ctx) - q, axis=1)
    nearest = np.flatnonzero(common)[np.argsort(distance[common], kind="stable")]
    return {f"p_at_{k}": float(truth[nearest[:k]].mean()) for k in RETRIEVAL_K}


def _round_scores(ctx, truth: np.ndarray, common: np.ndarray) -> list[dict]:
    """Each saved round model's balanced accuracy and share called tumour on the ``common`` patches."""
    from wsi_il.model import init_state, load_model

    paths = sorted(ctx.project.root.joinpath("models").glob("s*-r*.pt"), key=lambda p: _round_key(p.stem))
    init = init_state(ctx)
    return [{"model": p.stem, **score_model(ctx, load_model(ctx, p.stem), init, truth, common)} for p in paths]


def _round_key(model_id: str) -> tuple[int, int]:
    session, round_number = model_id.split("-r")
    return int(session[1:]), int(round_number)


def _seeds(out: Path, slide: str, strategy: str) -> set[int]:
    folder = out / "runs" / slide
    return {int(p.name.rsplit("seed", 1)[1]) for p in folder.glob(f"{strategy}-seed*") if p.is_dir()}


def compare(
    base: Path,
    other: Path,
    slide: str,
    truth_path: Path,
    strategy: str,
    rounds: bool = False,
    retrieval: bool = False,
    readout: tuple[str, ...] = (),
) -> dict:
    rows = []
    for seed in sorted(_seeds(base, slide, strategy) & _seeds(other, slide, strategy)):
        ctx, called_a, seen_a = _final(base, slide, strategy, seed, "base" in readout)
        ctx_b, called_b, seen_b = _final(other, slide, strategy, seed, "other" in readout)
        if list(ctx.table.ids) != list(ctx_b.table.ids):
            raise SystemExit(f"{base} and {other} were not run on the same slide and tiling")
        truth = _slide_truth(ctx, truth_path)
        common = np.array([pid not in seen_a and pid not in seen_b for pid in ctx.table.ids])
        a = binary_scores(called_a[common], truth[common])
        b = binary_scores(called_b[common], truth[common])
        rows.append(
            {
                "seed": seed,
                "scored": int(common.sum()),
                "truth_share": float(truth[common].mean()),
                "base": {"balanced_accuracy": a.balanced_accuracy, "called": a.called_share, "jaccard": a.jaccard},
                "other": {"balanced_accuracy": b.balanced_accuracy, "called": b.called_share, "jaccard": b.jaccard},
            }
        )
        if rounds:
            rows[-1]["base"]["rounds"] = _round_scores(ctx, truth, common)
            rows[-1]["other"]["rounds"] = _round_scores(ctx_b, truth, common)
        if retrieval:
            rows[-1]["base"].update(retrieval_precision(ctx, truth, common))
            rows[-1]["other"].update(retrieval_precision(ctx_b, truth, common))
        for side, side_ctx in zip(SIDES, (ctx, ctx_b), strict=True):
            if side in readout:  # what the run itself shows, on the same patches
                own = binary_scores(
                    current_map(side_ctx).argmax(axis=1)[common] == side_ctx.class_index(TUMOUR), truth[common]
                )
                rows[-1][side]["run_map"] = {"balanced_accuracy": own.balanced_accuracy, "called": own.called_share}
    summary = {"strategy": strategy, "seeds": len(rows), "rows": rows}
    for side in readout:
        gain = paired_summary([r[side]["balanced_accuracy"] - r[side]["run_map"]["balanced_accuracy"] for r in rows])
        if gain:
            summary[f"{side}_readout_gain"] = gain
    for metric in ("balanced_accuracy", *(f"p_at_{k}" for k in RETRIEVAL_K if retrieval)):
        paired = paired_summary([r["other"][metric] - r["base"][metric] for r in rows])
        if paired:
            summary.update(paired if metric == "balanced_accuracy" else {metric: paired})
    return summary


def paired_summary(differences: list[float]) -> dict | None:
    """Mean, 95% interval and count ahead of paired differences; None for fewer than two."""
    diff = np.array(differences)
    if len(diff) < 2:
        return None
    low, high = paired_ci(diff)
    return {"mean": float(diff.mean()), "ci": [low, high], "ahead": int((diff > 0).sum())}


def paired_ci(diff: np.ndarray) -> tuple[float, float]:
    """The 95% confidence interval of the mean of paired differences (Student's t over seeds)."""
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return float(diff.mean() - half), float(diff.mean() + half)


def pair_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments both paired benchmarks take: two `simulate` outputs, the slide and its truth."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--slide", required=True, help="the slide's name in the runs (its file name's stem)")
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="write every seed's scores (and the paired differences) here")
    return parser


def save_json(args: argparse.Namespace, payload: dict) -> None:
    """Write a paired benchmark's results, with the two outputs and the slide they came from, to ``--json``."""
    if args.json:
        about = {"base": str(args.base), "other": str(args.other), "slide": args.slide}
        args.json.write_text(json.dumps({**about, **payload}, indent=1) + "\n")


def main() -> None:
    parser = pair_parser(__doc__)
    parser.add_argument("--strategies", default="cnfp,random")
    parser.add_argument("--rounds", action="store_true", help="also score every round's saved model")
    parser.add_argument("--retrieval", action="store_true", help="also score each run's search (tumour near q)")
    parser.add_argument(
        "--readout",
        choices=("base", "other", "both"),
        help="score that side's map as the read-out of its final labels (map_from 'readout'), whatever its run used",
    )
    args = parser.parse_args()
    readout = {None: (), "both": SIDES}.get(args.readout, (args.readout,))
    results = []
    for strategy in args.strategies.split(","):
        result = compare(args.base, args.other, args.slide, args.truth, strategy, args.rounds, args.retrieval, readout)
        results.append(result)
        for r in result["rows"]:
            print(
                f"{strategy} seed {r['seed']}: {r['scored']} patches scored ({r['truth_share']:.0%} tumour); "
                f"balanced accuracy {r['base']['balanced_accuracy']:.3f} → {r['other']['balanced_accuracy']:.3f}, "
                f"called {r['base']['called']:.0%} → {r['other']['called']:.0%}"
            )
            for side in ("base", "other") if args.rounds else ():
                each = ", ".join(f"{x['balanced_accuracy']:.3f} ({x['called']:.0%})" for x in r[side]["rounds"])
                print(f"  {side} by round: {each}")
        if "mean" in result:
            low, high = result["ci"]
            print(
                f"{strategy}: {args.other.name} − {args.base.name} = {result['mean']:+.3f} "
                f"[{low:+.3f}, {high:+.3f}], ahead on {result['ahead']} of {result['seeds']} seeds"
            )
        for side in readout:
            gain = result.get(f"{side}_readout_gain")
            if gain:
                own = np.mean([r[side]["run_map"]["balanced_accuracy"] for r in result["rows"]])
                mine = np.mean([r[side]["balanced_accuracy"] for r in result["rows"]])
                print(
                    f"{strategy}: {side}, the read-out {mine:.3f} against the run's own map {own:.3f}: "
                    f"{gain['mean']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}], ahead on {gain['ahead']}"
                )
        for k in RETRIEVAL_K if args.retrieval else ():
            base_mean, other_mean = (np.mean([r[side][f"p_at_{k}"] for r in result["rows"]]) for side in SIDES)
            line = f"{strategy}: tumour among the {k} nearest q {base_mean:.3f} → {other_mean:.3f}"
            if f"p_at_{k}" in result:
                paired = result[f"p_at_{k}"]
                line += f", {paired['mean']:+.3f} [{paired['ci'][0]:+.3f}, {paired['ci'][1]:+.3f}]"
            print(line)
    save_json(args, {"strategies": results})


if __name__ == "__main__":
    main()
