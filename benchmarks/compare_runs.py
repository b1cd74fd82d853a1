"""Compare `wsi-il simulate` runs session by session: mean, min and max over seeds of one metric.

    python benchmarks/compare_runs.py runs/fast/results.csv runs/paper/results.csv --metric jaccard [--plot F.png]

Prints one row per (run, strategy, session) and, for two runs of the same strategy, the difference of the
means at equal labels (the check behind docs/speed.md's "gives up no more than 0.02"). Where both runs hold
the same seeds, it adds the seed-by-seed (paired) difference: its mean, standard error and range. A seed gives
both runs the same queries, so pairing removes part of the spread between seeds. ``--plot`` draws each run's
mean curve over labels with its seed range as a band.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path


def _curves(path: Path, metric: str) -> dict[tuple[str, int], tuple[float, dict[int, float]]]:
    """(strategy, session) -> (mean labels, {seed: metric})."""
    groups: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row[metric] != "":
                groups[(row["strategy"], int(row["session"]))].append(row)
    return {
        key: (sum(float(r["labels"]) for r in rows) / len(rows), {int(r["seed"]): float(r[metric]) for r in rows})
        for key, rows in sorted(groups.items())
    }


def _name(path: Path) -> str:
    """A run's name: its folder for a simulate output's results.csv, else the file's stem."""
    return path.parent.name if path.name == "results.csv" else path.stem


def _paired(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return ""
    diffs = [a[s] - b[s] for s in seeds]
    mean = sum(diffs) / len(diffs)
    error = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return (
        f"; paired over {len(seeds)} seeds {mean:+.3f} ± {error:.3f} (s.e.), "
        f"range {min(diffs):+.3f} .. {max(diffs):+.3f}"
    )


def _plot(curves: dict[Path, dict[tuple[str, int], tuple[float, dict[int, float]]]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for run, curve in curves.items():
        for strategy in sorted({key[0] for key in curve}):
            points = [
                (labels, list(by_seed.values())) for (s, _), (labels, by_seed) in sorted(curve.items()) if s == strategy
            ]
            x = [labels for labels, _ in points]
            (line,) = axes.plot(
                x,
                [sum(v) / len(v) for _, v in points],
                marker="o",
                label=f"{_name(run)} ({strategy}, {len(points[0][1])} seeds)",
            )
            axes.fill_between(
                x, [min(v) for _, v in points], [max(v) for _, v in points], alpha=0.15, color=line.get_color()
            )
    axes.set_xlabel("labels")
    axes.set_ylabel(f"{metric} (mean; band: min to max over seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.csv files of simulate runs")
    parser.add_argument("--metric", default="jaccard")
    parser.add_argument("--plot", type=Path, help="also draw the curves into this PNG")
    args = parser.parse_args()
    curves = {path: _curves(path, args.metric) for path in args.results}
    print(f"run | strategy | session | labels | {args.metric} mean | min | max | seeds")
    for path, curve in curves.items():
        for (strategy, session), (labels, by_seed) in curve.items():
            values = list(by_seed.values())
            print(
                f"{_name(path)} | {strategy} | {session} | {labels:.0f} | {sum(values) / len(values):.3f} | "
                f"{min(values):.3f} | {max(values):.3f} | {len(values)}"
            )
    if len(curves) == 2:
        (name_a, a), (name_b, b) = ((_name(p), c) for p, c in curves.items())
        print(f"\ndifference of the means, {name_a} - {name_b}, at equal sessions (labels)")
        for key in sorted(set(a) & set(b)):
            values_a, values_b = a[key][1], b[key][1]
            mean_a, mean_b = (sum(v.values()) / len(v) for v in (values_a, values_b))
            print(
                f"{key[0]} session {key[1]} ({a[key][0]:.0f} labels): {mean_a - mean_b:+.3f}"
                f"{_paired(values_a, values_b)}"
            )
    if args.plot:
        _plot(curves, args.metric, args.plot)


if __name__ == "__main__":
    main()
