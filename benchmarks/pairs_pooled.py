"""Pool the seeds of several `benchmarks/loop_pairs.py --json` files (slides, seed ranges) into one comparison.

    python benchmarks/pairs_pooled.py A.json A-s5.json B.json D.json [--strategy cnfp]

Prints, over every seed of every file, the paired difference OTHER − BASE in balanced accuracy (mean, 95%
interval, seeds ahead), each side's mean and the range of its share called tumour; for files written with
`--readout`, also each read-out side against the run's own map on the same patches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from loop_pairs import SIDES, paired_summary


def pooled_rows(files: list[Path], strategy: str) -> list[dict]:
    rows = []
    for path in files:
        found = [s for s in json.loads(path.read_text())["strategies"] if s["strategy"] == strategy]
        if not found:
            raise SystemExit(f"{path} holds no {strategy} runs")
        rows.extend(found[0]["rows"])
    return rows


def _line(name: str, differences: list[float]) -> str:
    paired = paired_summary(differences)
    if paired is None:
        return f"{name}: fewer than two seeds"
    low, high = paired["ci"]
    return f"{name}: {paired['mean']:+.3f} [{low:+.3f}, {high:+.3f}], ahead on {paired['ahead']} of {len(differences)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--strategy", default="cnfp")
    args = parser.parse_args()
    rows = pooled_rows(args.files, args.strategy)
    for side in SIDES:
        scores = [r[side]["balanced_accuracy"] for r in rows]
        called = [r[side]["called"] for r in rows]
        print(f"{side}: balanced accuracy {np.mean(scores):.3f}, called {min(called):.0%}–{max(called):.0%}")
    print(_line("other − base", [r["other"]["balanced_accuracy"] - r["base"]["balanced_accuracy"] for r in rows]))
    for side in SIDES:
        if all("run_map" in r[side] for r in rows):
            own = [r[side]["run_map"]["balanced_accuracy"] for r in rows]
            print(f"{side}: the run's own map {np.mean(own):.3f}")
            gains = [r[side]["balanced_accuracy"] - r[side]["run_map"]["balanced_accuracy"] for r in rows]
            print(_line(f"{side}: read-out − the run's own map", gains))
    if all("run_map" in r[side] for r in rows for side in SIDES):
        own_gap = [r["other"]["run_map"]["balanced_accuracy"] - r["base"]["run_map"]["balanced_accuracy"] for r in rows]
        print(_line("other − base, the runs' own maps", own_gap))


if __name__ == "__main__":
    main()
