"""``wsi-il bench --backbone``: extraction speed and store size of timm backbones, per split, on one slide.

For each backbone (``NAME``, ``NAME:{JSON keyword arguments}``, a weights folder or ``hf-hub:ORG/NAME`` from the
local cache) and each split it supports (``embedding``, and ``last`` for vision transformers), a project over the
slide is built as ``init`` builds it, and measured: end-to-end extraction (tissue mask, statistics sample, read,
resize, normalise, trunk, write) in patches/s, with the process's CPU seconds beside the wall time; the trunk alone
on batches already in memory (``bench.trunk_limit``), and bytes a patch in the store. A name without weights gets
random ones: the same computation.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsi_il.config import new_manifest
from wsi_il.events import SilentReporter
from wsi_il.project import Project


@dataclass
class BackboneResult:
    """One backbone under one split."""

    backbone: str
    arch: str
    trainable: str
    input_px: int
    bytes_per_patch: int
    patches: int
    extract_seconds: float
    extract_cpu_seconds: float
    """CPU seconds of this process and of its readers over the same run (several cores: more than the wall)."""
    extract_patches_per_s: float
    trunk_limit_patches_per_s: float
    extract_ratio_to_limit: float
    load_average: float
    """The machine's one-minute load average when the extraction ended (other work slows a shared machine)."""


def parse_backbone(text: str) -> tuple[str, str | None, dict[str, Any]]:
    """Split ``--backbone`` into (weights, arch, args): ``NAME[:JSON]`` (random weights), a folder, or a hub id."""
    from wsi_il.backbones import HUB_PREFIX, parse_args

    if text.startswith(HUB_PREFIX) or Path(text).is_dir():
        return text, None, {}
    name, _, args = text.partition(":")
    return "random", name, parse_args(args or None)


def splits_of(model: Any) -> list[str]:
    """The splits a timm model supports."""
    from wsi_il.backbones import TIMM_TRAINABLE, check_trainable
    from wsi_il.errors import InputError

    kept = []
    for trainable in TIMM_TRAINABLE:
        try:
            kept.append(check_trainable(model, trainable))
        except InputError:
            continue
    return kept


def bench_backbone(text: str, slide: Path, out: Path, device: str, sample: int, seed: int = 0) -> list[BackboneResult]:
    """Measure one ``--backbone`` under each split it supports."""
    from wsi_il import backbones

    weights_spec, arch, args = parse_backbone(text)
    choice = backbones.choose_timm(weights_spec, arch, args)
    weights = backbones.weights_of(choice)
    model = backbones.build_timm(choice.arch, choice.args, weights, seed)
    results = []
    for trainable in splits_of(model):
        settings = backbones.timm_feature_settings(choice, weights, trainable, 32, seed)
        results.append(_measure(text, settings, weights, slide, out / f"{len(results)}-{trainable}", device, sample))
    return results


def _measure(
    text: str, settings: Any, weights: Any, slide: Path, folder: Path, device: str, sample: int
) -> BackboneResult:
    import os
    import shutil

    from wsi_il.backbones import bytes_per_patch
    from wsi_il.database import register_slide
    from wsi_il.extraction import build_database
    from wsi_il.features import store_shape
    from wsi_il.measure.bench import trunk_limit

    if folder.exists():
        shutil.rmtree(folder)
    project = Project(folder)
    manifest = new_manifest(["Tumor", "Normal"], features=settings)
    register_slide(manifest, slide)
    project.create(manifest)
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    manifest = build_database(project, project.read_manifest(), SilentReporter(), device, weights)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    patches = sum(s["n_patches"] for s in manifest["slides"])
    limit = trunk_limit(project, device, sample)
    rate = patches / max(seconds, 1e-9)
    return BackboneResult(
        text,
        settings.arch,
        settings.trainable,
        settings.input_px,
        bytes_per_patch(store_shape(settings)),
        patches,
        seconds,
        cpu,
        rate,
        limit,
        rate / limit,
        os.getloadavg()[0],
    )


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def results_json(results: list[BackboneResult]) -> list[dict[str, Any]]:
    """The results as JSON-ready dicts."""
    return [asdict(r) for r in results]
