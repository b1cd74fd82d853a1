"""What the read-out map (wsi_il.readout) costs: the pretrained block's pass over every patch (once per project, at
`init`), and each round's fit and map, at the round target's size.

    python benchmarks/readout_cost.py [--patches 12500] [--labels 250] [--region 300] [--runs 3] [--device cpu]

Random trunk features shaped as ResNet-18's cache (512 x 7 x 7, float16) and a random `layer4[1]`: the cost does
not depend on the weights. Prints one JSON line: the seconds of the pass (`pooled_output` over every patch, then
the frozen embedding and its norm), and the median seconds of a round's `fit_readout` (labels + one query region,
their pooled output read from the frozen embedding as `readout.project_readout` does) and `map_probabilities` over
every patch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    import torch
    import torchvision

    from wsi_il.heads import pooled_output, pretrained_retrieval
    from wsi_il.readout import fit_readout, map_probabilities

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=12500)
    parser.add_argument("--labels", type=int, default=250)
    parser.add_argument("--region", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in torchvision.models.resnet18().layer4[1].state_dict().items()}
    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.patches, 512, 7, 7)).astype(np.float16)
    np.maximum(features, 0, out=features)  # the trunk's output is a ReLU's

    started = time.perf_counter()
    chunks = ((s, features[s : s + 256]) for s in range(0, args.patches, 256))
    pooled = pooled_output(pretrained_retrieval(init), init, chunks, args.patches, args.device)
    norms = np.linalg.norm(pooled, axis=1)
    frozen = (pooled / norms[:, None]).astype(np.float16)
    pass_seconds = time.perf_counter() - started

    rows = args.labels + args.region
    targets = np.concatenate([rng.integers(0, 2, args.labels), np.zeros(args.region, dtype=np.int64)])
    groups = np.concatenate([np.full(args.labels, -1), np.zeros(args.region, dtype=np.int64)])
    fits, maps = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        pooled_rows = frozen[:rows].astype(np.float32) * norms[:rows, None]  # as a round reads its database rows
        readout = fit_readout(None, targets, groups, init, 2, args.device, pooled_rows)
        fits.append(time.perf_counter() - started)
        started = time.perf_counter()
        map_probabilities(frozen, norms, readout)
        maps.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "patches": args.patches,
                "labels": args.labels,
                "region": args.region,
                "threads": torch.get_num_threads(),
                "pass_seconds": round(pass_seconds, 2),
                "fit_seconds": round(statistics.median(fits), 3),
                "map_seconds": round(statistics.median(maps), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
