"""Patches/s of extraction's reader pool alone (read, decode, the pixel rule; no trunk) with the slide's JPEG tiles
decoded directly (``wsi_il.tifftiles``) and through OpenSlide, interleaved, on a project `wsi-il bench` left
behind: what direct decoding changes on this machine's cores.

usage: python benchmarks/reading_ab.py BENCH_OUT [--patches 4096] [--runs 2] [--device cpu]

BENCH_OUT is the folder given to `wsi-il bench --out` (it holds `project/`). ``--device`` only sets the batch
size, as extraction would on that device. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_out", type=Path)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch  # noqa: F401 - imported before the readers fork, as in `init`

    from wsi_il.measure.bench import read_limit
    from wsi_il.project import Project
    from wsi_il.tifftiles import DIRECT_ENV

    project = Project(args.bench_out / "project")
    rates: dict[str, list[float]] = {"direct": [], "openslide": []}
    for _ in range(args.runs):
        for name, value in (("direct", "1"), ("openslide", "0")):
            os.environ[DIRECT_ENV] = value
            rates[name].append(round(read_limit(project, args.device, args.patches), 1))
    os.environ.pop(DIRECT_ENV, None)
    print(json.dumps({"patches": args.patches, "workers": os.cpu_count(), "reading_limit_patches_per_s": rates}))


if __name__ == "__main__":
    main()
