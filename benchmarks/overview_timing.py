"""Seconds and peak memory of the export's overview picture (``export.write_overview``) for a slide of many patches.

usage: python benchmarks/overview_timing.py [--patches 100000] [--labelled 1000] [--runs 5] [--out DIR]

The bundled CMU slide (2220 x 2967 px) is cut into ``--patches`` square patches of equal size (7 px for 100,000),
each predicted tumour or normal from a smooth random field, as a large slide's patches look on a 1,400 px
thumbnail (a few pixels each); ``--labelled`` of them are labelled and 40 form a query. Each run is a fresh process
(so that its peak resident memory is its own); the median seconds and the largest peak RSS rise above the process's
state before the call are printed as one JSON line. Give PYTHONPATH to time another checkout (the marks are left
out where its ``write_overview`` takes none).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLIDE = Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="keep the last picture here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one_run(args.patches, args.labelled, args.out)))
        return
    runs = [
        json.loads(
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    "--patches",
                    str(args.patches),
                    "--labelled",
                    str(args.labelled),
                    *(["--out", str(args.out)] if args.out else []),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for _ in range(args.runs)
    ]
    import wsi_il

    print(
        json.dumps(
            {
                "wsi_il": str(Path(wsi_il.__file__).parent),
                "patches": runs[0]["patches"],
                "runs": args.runs,
                "seconds": round(statistics.median(r["seconds"] for r in runs), 3),
                "peak_rss_rise_mb": max(r["peak_rss_rise_mb"] for r in runs),
            }
        )
    )


def _one_run(patches: int, labelled: int, out: Path | None) -> dict[str, float]:
    from wsi_il import export
    from wsi_il.project import SlideRecord
    from wsi_il.slide import read_info

    info = read_info(SLIDE)
    side = max(1, int(math.sqrt(info.width * info.height / patches)))
    xs, ys = np.meshgrid(np.arange(0, info.width - side + 1, side), np.arange(0, info.height - side + 1, side))
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, side), np.full(xs.size, side)], axis=1)
    rng = np.random.default_rng(0)
    field = np.sin(boxes[:, 0] / 300.0 + rng.uniform(0, 6)) + np.cos(boxes[:, 1] / 250.0)
    predicted = (field > 0.6).astype(np.int64)
    slide = SlideRecord(
        id="CMU-1-Small-Region",
        kind="slide",
        path=str(SLIDE),
        width=info.width,
        height=info.height,
        mpp=info.mpp,
        offset=info.offset,
        n_patches=len(boxes),
        tiled=True,
        extracted=True,
    )
    extra = {}
    if "marks" in inspect.signature(export.write_overview).parameters:
        from wsi_il.overview import Marks

        chosen = rng.choice(len(boxes), labelled, replace=False)
        query = np.flatnonzero(predicted == 0)[:40]
        extra["marks"] = Marks(chosen, tuple(("Normal", "Tumor")[int(p)] for p in predicted[chosen]), (("s1", query),))
    import importlib

    for module in (
        "PIL.PngImagePlugin",
        "wsi_il.qupath",
        "wsi_il.slide",
        "wsi_il.tifftiles",
        "wsi_il.features",
        "wsi_il.overview",
        "wsi_il.png",
    ):  # imported before the measure, where the checkout has them
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    folder = out or Path(tempfile.mkdtemp(prefix="overview-timing-"))
    folder.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    export.write_overview(folder / "overview.png", slide, boxes, predicted, [0, 1], ["Normal", "Tumor"], **extra)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"patches": len(boxes), "seconds": seconds, "peak_rss_rise_mb": round((peak - before) / 1024, 1)}


if __name__ == "__main__":
    main()
