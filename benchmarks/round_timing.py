"""Seconds of a round (ingest of a filled batch -> next batch written) under several training settings,
interleaved, on a project `wsi-il bench` left behind: the round stage of the bench alone, repeated, to compare
settings on one machine without re-extracting.

usage: python benchmarks/round_timing.py BENCH_OUT [--truth T] [--runs 2] [--labels 250] [--device cpu]
                                         [--variant frozen] [--variant whole-block] [--variant paper]
                                         [--rehearse]

BENCH_OUT is the folder given to `wsi-il bench --out` (it holds `project/`, the extracted slide). Variants:
``frozen`` (the fast schedule's default for pretrained weights), ``whole-block`` (``--no-fast-frozen-conv1``)
and ``paper``. Prints one JSON line per round and a summary line with each variant's seconds. ``--rehearse``: each
timed round after ``session.rehearse``, as under ``wsi-il watch`` (compare the first run's round in a fresh process
with and without it).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

VARIANTS = ("frozen", "whole-block", "paper")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_out", type=Path)
    parser.add_argument("--truth", type=Path, default=None, help="default: the bench slide's truth beside it")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--labels", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--rehearse", action="store_true", help="rehearse before each timed round (wsi-il watch)")
    args = parser.parse_args()

    from wsi_il.config import TrainSettings
    from wsi_il.measure.bench import BenchSettings, _label_all, round_latency
    from wsi_il.project import Project

    settings_of = {
        "frozen": TrainSettings(),
        "whole-block": TrainSettings(fast_frozen_conv1=False),
        "paper": TrainSettings(schedule="paper"),
    }
    project = Project(args.bench_out / "project")
    truth = args.truth or next(iter(sorted(args.bench_out.glob("bench-*[0-9].truth.geojson"))), None)
    labels = _label_all(project, truth, 0)
    bench = BenchSettings(out=args.bench_out, labels=args.labels, device=args.device)
    seconds: dict[str, list[float]] = {}
    for run in range(args.runs):
        for variant in args.variant or ["frozen", "whole-block"]:
            folder = args.bench_out / f"round-timing-{variant}"
            timing = round_latency(project, folder, labels, bench, settings_of[variant], rehearsed=args.rehearse)
            shutil.rmtree(folder)
            seconds.setdefault(variant, []).append(round(timing.seconds, 2))
            print(
                json.dumps(
                    {
                        "run": run,
                        "variant": variant,
                        "schedule": timing.schedule,
                        "rehearsed": args.rehearse,
                        "round_seconds": round(timing.seconds, 2),
                        "train_seconds": round(timing.train_seconds, 2),
                        "phases": timing.phases,
                    }
                ),
                flush=True,
            )
    print(json.dumps({"labels": args.labels, "patches": len(labels), "device": args.device, "seconds": seconds}))


if __name__ == "__main__":
    main()
