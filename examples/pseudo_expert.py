"""Fill a review batch's labels.csv from a truth annotation, standing in for the pathologist.

A patch gets the query's class when at least half of it lies inside the truth region, else the
other class. usage: python examples/pseudo_expert.py BATCH_DIR TRUTH.geojson
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from wsi_il.measure.truth import fill_labels_from_truth

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    labels = fill_labels_from_truth(Path(sys.argv[1]), Path(sys.argv[2]))
    counts = ", ".join(f"{n} {label}" for label, n in sorted(Counter(labels.values()).items()))
    print(f"pseudo-expert labelled {Path(sys.argv[1]).name}: {counts}")
