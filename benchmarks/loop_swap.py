"""Which part of two `wsi-il simulate` runs' labels makes their models differ: the reviewed labels or the region.

    python benchmarks/loop_swap.py BASE_OUT OTHER_OUT --slide A --truth A.truth.geojson [--strategy cnfp] \
        [--blocks] [--json swap.json]

For each seed both outputs hold, the classifier's linear layer alone (on the pretrained block, left untrained: the
fit `heads.fit_linear` makes at the start of every `refit` round) is fitted to each pairing of one run's reviewed
labels with one run's query region, and scored on the patches that neither run labelled. Every patch of the region
takes part, the region together weighing as much as `heads.QUERY_GROUP_SIZE` labels, and each class weighs the same
in total. Such a fit depends on its labels alone (no training seed, no draw of the region's rows), so the four
pairings show how much of the runs' difference the reviewed labels carry and how much the region. With `--blocks`,
each run's own labels are also fitted the same way on the block of the run's final model (as trained by the loop),
and the run's own final model is scored: the gap between the three says what the loop's training of the block and
its fit to a round's rows do with the same labels.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from loop_pairs import SIDES, _seeds, pair_parser, paired_ci, save_json, score_model

from wsi_il.config import settings_of
from wsi_il.events import SilentReporter
from wsi_il.heads import TrainedHeads, train_heads
from wsi_il.measure.simulate import TUMOUR, _slide_truth
from wsi_il.model import init_state, load_model, model_state, open_context
from wsi_il.project import Project, current_labels
from wsi_il.readout import readout_weights
from wsi_il.session import list_sessions


def _parts(project: Project) -> tuple[dict[str, str], list[str]]:
    """A run's reviewed labels (patch id → label, skips left out) and its query regions' patches."""
    reviewed = {e["patch_id"]: e["label"] for e in current_labels(project.read_ledger()).values()}
    region = [pid for session in list_sessions(project) for pid in session["query"].get("patch_ids", [])]
    return {pid: label for pid, label in reviewed.items() if label != "skip"}, region


def swap(base: Path, other: Path, slide: str, truth_path: Path, strategy: str, blocks: bool = False) -> dict:
    rows = []
    for seed in sorted(_seeds(base, slide, strategy) & _seeds(other, slide, strategy)):
        projects = [Project(out / "runs" / slide / f"{strategy}-seed{seed}") for out in (base, other)]
        ctx = open_context(projects[0], "cpu", SilentReporter())
        index, truth = ctx.table.index_of(), _slide_truth(ctx, truth_path)
        parts = [_parts(p) for p in projects]
        seen = {pid for reviewed, region in parts for pid in (*reviewed, *region)}
        common = np.array([pid not in seen for pid in ctx.table.ids])
        settings = replace(settings_of(ctx.manifest).train, lr=0.0, epochs=1, head_init="fit", schedule="paper")
        init = init_state(ctx)
        row = {"seed": seed, "scored": int(common.sum())}
        for labels_from, (reviewed, _) in zip(SIDES, parts, strict=True):
            for region_from, (_, region) in zip(SIDES, parts, strict=True):
                ids = [*reviewed, *region]
                targets = np.array(
                    [ctx.class_index(reviewed.get(pid, TUMOUR)) for pid in ids[: len(reviewed)]]
                    + [ctx.class_index(TUMOUR)] * len(region)
                )
                groups = np.where(np.arange(len(ids)) >= len(reviewed), 0, -1)
                features = ctx.store.take(np.array([index[pid] for pid in ids], dtype=np.int64))
                weights = readout_weights(targets, groups)
                heads = train_heads(features, targets, init, len(ctx.classes), settings, "cpu", weights=weights)
                row[f"{labels_from} labels, {region_from} region"] = score_model(
                    ctx, heads.model(), init, truth, common
                )
                if blocks and labels_from == region_from:
                    own = open_context(projects[SIDES.index(labels_from)], "cpu", SilentReporter())
                    final = load_model(own, model_state(own)["model"])
                    start = TrainedHeads(final["retrieval"], final["classifier"], len(ctx.classes), {})
                    heads = train_heads(
                        features, targets, init, len(ctx.classes), settings, "cpu", start, weights=weights
                    )
                    row[f"{labels_from} run, its trained block"] = score_model(ctx, heads.model(), init, truth, common)
                    row[f"{labels_from} run, its own model"] = score_model(own, final, init, truth, common)
        rows.append(row)
    return {"strategy": strategy, "seeds": len(rows), "rows": rows}


def _paired(rows: list[dict], a: str, b: str) -> str:
    diff = np.array([r[b]["balanced_accuracy"] - r[a]["balanced_accuracy"] for r in rows])
    if len(diff) < 2:
        return f"{diff.mean():+.3f}"
    low, high = paired_ci(diff)
    return f"{diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = pair_parser(__doc__)
    parser.add_argument("--strategy", default="cnfp")
    parser.add_argument("--blocks", action="store_true", help="also fit on each run's own trained block")
    args = parser.parse_args()
    result = swap(args.base, args.other, args.slide, args.truth, args.strategy, args.blocks)
    rows = result["rows"]
    pairings = [f"{labels} labels, {region} region" for labels in SIDES for region in SIDES]
    extra = [f"{side} run, {what}" for side in SIDES for what in ("its trained block", "its own model")]
    for name in pairings + [name for name in extra if name in rows[0]]:
        scores = [r[name]["balanced_accuracy"] for r in rows]
        called = [r[name]["called"] for r in rows]
        print(
            f"{name}: balanced accuracy {np.mean(scores):.3f} ({' / '.join(f'{x:.3f}' for x in scores)}), "
            f"called {min(called):.0%}–{max(called):.0%}"
        )
    print(f"the region swapped, base labels:  {_paired(rows, pairings[0], pairings[1])}")
    print(f"the region swapped, other labels: {_paired(rows, pairings[2], pairings[3])}")
    print(f"the labels swapped, base region:  {_paired(rows, pairings[0], pairings[2])}")
    print(f"the labels swapped, other region: {_paired(rows, pairings[1], pairings[3])}")
    save_json(args, result)


if __name__ == "__main__":
    main()
