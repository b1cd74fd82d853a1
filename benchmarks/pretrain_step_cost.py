"""What a pretraining step of each recipe costs on this machine: CPU seconds and wall seconds, back to back.

usage: python benchmarks/pretrain_step_cost.py [--steps 3] [--rounds 2]
Builds each CPU recipe's model (random ResNet-18, MoCo v2), runs one warm-up step and then ``--steps`` timed steps
on synthetic fields of the recipe's size, alternating the recipes ``--rounds`` times so that both see the same load.
Prints the CPU and wall seconds a step, the whole run's CPU minutes and the load average. On a shared machine the
CPU seconds grow with the contention; the ratio between the recipes much less.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from wsi_il.features import Weights, build_resnet
from wsi_il.pretrain import RECIPES, _build_model, _train_step


def step_cost(name: str, steps: int) -> tuple[float, float]:
    """Return (CPU seconds, wall seconds) of one step of a CPU recipe, after a warm-up step."""
    settings = RECIPES[name]["cpu"]
    field = max(int(96 * settings.field_scale), settings.crop_px)
    model = _build_model(settings, build_resnet(Weights(None, "random", "random", None), 0))
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    fields = np.random.default_rng(0).integers(0, 255, (settings.batch, field, field, 3), dtype=np.uint8)
    device = torch.device("cpu")
    _train_step(model, optimizer, schedule, fields, settings, 0, device, mean, std)
    cpu, wall = time.process_time(), time.perf_counter()
    for step in range(1, steps + 1):
        _train_step(model, optimizer, schedule, fields, settings, step, device, mean, std)
    return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for name in ("full", "quick"):
            load = os.getloadavg()[0]
            cpu, wall = step_cost(name, args.steps)
            total = RECIPES[name]["cpu"].steps
            print(
                f"{name}: {cpu:.2f} CPU-s a step, {wall:.2f} s wall; {total} steps = {cpu * total / 60:.1f} "
                f"CPU-min (load average {load:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
