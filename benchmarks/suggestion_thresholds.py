"""How would other "uncertain below" thresholds fare? Reads `simulate`'s suggestions.csv files.

For each threshold: the share of shown patches whose suggestion would be shown as confident, and how often those
confident suggestions matched the truth (what one "accept every confident suggestion" would record).

usage: python benchmarks/suggestion_thresholds.py RUN/suggestions.csv [...] [--thresholds 0.6,0.75,0.9]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--thresholds", default="0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95")
    args = parser.parse_args()
    shown = [row for path in args.files for row in csv.DictReader(path.open(encoding="utf-8"))]
    right = [row["suggestion"] == row["truth"] for row in shown]
    print(f"{len(shown)} suggestions shown, {sum(right) / max(1, len(shown)):.1%} right")
    print("threshold  confident  right among confident")
    for threshold in (float(t) for t in args.thresholds.split(",")):
        confident = [r for r, row in zip(right, shown, strict=True) if float(row["probability"]) >= threshold]
        accuracy = f"{sum(confident) / len(confident):.1%}" if confident else "-"
        print(f"{threshold:9.2f}  {len(confident) / max(1, len(shown)):9.1%}  {accuracy:>8} of {len(confident)}")


if __name__ == "__main__":
    main()
