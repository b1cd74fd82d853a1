"""Seconds of one round's head training (``train_heads``) on random features: isolates training from the rest
of a round, to compare code versions on one machine.

usage: python benchmarks/heads_timing.py [--device cuda] [--labels 250] [--schedule paper] [--epochs 50]
                                        [--frozen-conv1 | --no-frozen-conv1] [--graphs | --no-graphs]

Prints one JSON line: the seconds of two runs (the first includes CUDA warm-up and kernel selection), the
first and last epoch's losses (equal across versions that compute the same thing), and which wsi_il was
imported. To compare with an earlier commit: ``git worktree add /tmp/before COMMIT`` and run this script
with ``PYTHONPATH=/tmp/before``, then without, on the same machine. docs/results/heads_sync_ab_h100.json
holds such a comparison on an H100.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--labels", type=int, default=250)
    parser.add_argument("--schedule", choices=["paper", "fast"], default="paper")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--frozen-conv1",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fast schedule: keep the block's first convolution frozen (default: the settings')",
    )
    parser.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA: each training step one captured graph (default: on CUDA, unless $WSI_IL_CUDA_GRAPHS=0)",
    )
    args = parser.parse_args()

    import wsi_il.heads
    from wsi_il.config import TrainSettings
    from wsi_il.features import Weights, build_resnet

    init = build_resnet(Weights(None, "random", "random", None), 0, "resnet18").layer4[1].state_dict()
    rng = np.random.default_rng(0)
    targets = (rng.random(args.labels) < 0.4).astype(np.int64)
    features = (rng.standard_normal((args.labels, 512, 7, 7)) + targets[:, None, None, None] * 0.3).astype(np.float16)
    settings = TrainSettings(seed=0, epochs=args.epochs)
    if args.frozen_conv1 is not None:
        settings = replace(settings, fast_frozen_conv1=args.frozen_conv1)
    seconds = []
    for _ in range(2):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        heads = wsi_il.heads.train_heads(
            features,
            targets,
            init,
            2,
            settings,
            args.device,
            schedule=args.schedule,
            early_stopping=False,
            graphs=args.graphs,
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - started, 3))
    print(
        json.dumps(
            {
                "device": args.device,
                "schedule": args.schedule,
                "frozen_conv1": settings.fast_frozen_conv1,
                "graphs": args.graphs,
                "labels": args.labels,
                "seconds": seconds,
                "first_losses": [heads.losses["triplet"][0], heads.losses["cross_entropy"][0]],
                "last_losses": [heads.losses["triplet"][-1], heads.losses["cross_entropy"][-1]],
                "wsi_il": wsi_il.heads.__file__,
            }
        )
    )


if __name__ == "__main__":
    main()
