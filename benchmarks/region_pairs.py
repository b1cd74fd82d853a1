"""Seed-by-seed comparison of `benchmarks/quality_region.py` runs against ten connected query patches.

    python benchmarks/region_pairs.py run1.json [run2.json ...] [--metric balanced_accuracy]

Merges the runs (a later file's row replaces an earlier one of the same seed and variant) and, for every variant
(region, query pick, query cap, fit of the whole region, classifier's start), prints its mean over seeds and the
paired difference from the small region (10 connected patches) of the same seed and classifier's start: mean,
95% confidence interval (Student's t over seeds) and on how many seeds the variant is ahead. A seed gives every
variant the same reviewed patches and the same scored patches, so pairing removes the spread between seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from scipy import stats


def _variant(row: dict, run: dict) -> tuple[str, ...]:
    """What distinguishes a row of a run from the small region's row of the same seed."""
    if row["region"] == "small":
        return ("small", row.get("head_init", "random"), row["balance"])
    options = run.get("options", {})
    extra = [f"{k}={v}" for k, v in sorted(options.items()) if v]
    return ("large", row.get("head_init", "random"), row["balance"], row.get("query_pick", "random"), *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--metric", default="balanced_accuracy")
    args = parser.parse_args()
    values: dict[tuple[str, ...], dict[int, float]] = defaultdict(dict)
    for path in args.runs:
        run = json.loads(path.read_text())
        for row in run["runs"]:
            values[_variant(row, run)][row["seed"]] = row[args.metric]
    for variant, by_seed in sorted(values.items()):
        mean = sum(by_seed.values()) / len(by_seed)
        line = f"{' '.join(variant):<60} {len(by_seed):>3} seeds  mean {mean:.3f}"
        small = values.get(("small", *variant[1:3]), {})
        seeds = sorted(set(by_seed) & set(small))
        if variant[0] != "small" and len(seeds) > 1:
            diff = [by_seed[s] - small[s] for s in seeds]
            d = sum(diff) / len(diff)
            se = math.sqrt(sum((x - d) ** 2 for x in diff) / (len(diff) - 1) / len(diff))
            half = stats.t.ppf(0.975, len(diff) - 1) * se
            ahead = sum(x > 0 for x in diff)
            line += f"  - small: {d:+.3f} [{d - half:+.3f}, {d + half:+.3f}] over {len(seeds)}, ahead on {ahead}"
        print(line)


if __name__ == "__main__":
    main()
