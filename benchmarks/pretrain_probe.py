"""Does self-supervised pretraining (`wsi-il pretrain`) make the features useful? A linear probe.

Two slides of real tissue with known truth: either exact-truth PCam patch mosaics that you built
(``--slides A.tiff B.tiff``, each with its ``.truth.geojson`` beside it, ``--tile-size 96``; see
docs/quality.md) or, without ``--slides``, two BACH field mosaics built here (tumour block = Invasive +
InSitu; coarse truth). Makes a project with RANDOM weights, pretrains the backbone on the project's own
tissue with the chosen recipe, re-extracts, and compares, on the global-average-pooled trunk features:
- a linear probe (logistic regression): 5-fold cross-validation over all patches, and inter-slide
  (train on slide A, test on slide B and back): tumour F1, Jaccard and balanced accuracy;
- retrieval P@10 (share of a patch's 10 nearest neighbours with its label), per class;
- the same for plain colour statistics (mean and std of RGB) as a floor.

usage: python benchmarks/pretrain_probe.py [--out DIR] [--slides A.tiff B.tiff --tile-size 96]
           [--recipe quick|full] [--steps N] [--batch B] [--crop PX] [--device cpu|cuda]
           [--method moco|simclr] [--data DIR] [--seed S]
Prints a table and writes DIR/pretrain_probe.json, with the pretraining's wall time and CPU seconds and the
load average around it. Caveat for the BACH mosaics: they are built from 36 fields, so patches of both
slides (and of CV folds) share source fields; the PCam mosaics built from halves of a sample share none.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def cli(*args: str) -> float:
    """Run a wsi-il command, return its wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsi_il", *args], check=True)
    return time.perf_counter() - started


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def gap_features(project: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return pooled features, patch boxes and slide index of every patch of a project."""
    from wsi_il.database import FeatureStore, patch_table
    from wsi_il.project import Project

    proj = Project(project)
    manifest = proj.read_manifest()
    table = patch_table(proj, manifest)
    store = FeatureStore(proj, manifest)
    pooled = np.concatenate([block.astype(np.float32).mean(axis=(2, 3)) for _, block in store.chunks(512)])
    return pooled, table.boxes, table.slide_index


def colour_features(project: Path) -> np.ndarray:
    """Mean and std of RGB per patch (the floor any learnt feature should beat)."""
    from wsi_il.database import patch_table
    from wsi_il.extraction import reader_for
    from wsi_il.project import Project

    proj = Project(project)
    manifest = proj.read_manifest()
    rows = []
    for record in proj.slides(manifest):
        load, close = reader_for(proj, record, 64)
        rows.extend(
            np.concatenate([t.reshape(-1, 3).mean(0), t.reshape(-1, 3).std(0)])
            for t in (load(i).astype(np.float32) for i in range(record.n_patches))
        )
        close()
    assert len(rows) == len(patch_table(proj, manifest))
    return np.array(rows)


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Fit an L2-regularised logistic regression (L-BFGS) and predict the test set."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy((train_x - mean) / std).float()
    y = torch.from_numpy(train_y).float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    test = torch.from_numpy((test_x - mean) / std).float()
    return ((test @ w + b) > 0).detach().numpy()


def f1_jaccard(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Tumour F1, tumour Jaccard and balanced accuracy (the mean of the two classes' recalls)."""
    tp = float((truth & pred).sum())
    fp = float((~truth & pred).sum())
    fn = float((truth & ~pred).sum())
    tn = float((~truth & ~pred).sum())
    balanced = (tp / max(tp + fn, 1) + tn / max(tn + fp, 1)) / 2
    return 2 * tp / max(2 * tp + fp + fn, 1), tp / max(tp + fp + fn, 1), balanced


def cross_validated(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[float, float, float]:
    order = np.random.default_rng(seed).permutation(len(y))
    pred = np.zeros(len(y), dtype=bool)
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        pred[part] = logistic_probe(x[train], y[train], x[part])
    return f1_jaccard(y, pred)


def inter_slide(x: np.ndarray, y: np.ndarray, slide: np.ndarray) -> tuple[float, float, float]:
    pred = np.zeros(len(y), dtype=bool)
    for s in np.unique(slide):
        test = slide == s
        pred[test] = logistic_probe(x[~test], y[~test], x[test])
    return f1_jaccard(y, pred)


def precision_at_10(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-9
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argsort(-sims, axis=1)[:, :10]
    hits = (y[neighbours] == y[:, None]).mean(axis=1)
    return {"tumour": float(hits[y].mean()), "normal": float(hits[~y].mean())}


def evaluate(name: str, x: np.ndarray, y: np.ndarray, slide: np.ndarray) -> dict[str, object]:
    f1, jac, bal = cross_validated(x, y)
    f1_is, jac_is, bal_is = inter_slide(x, y, slide)
    return {
        "features": name,
        "cv_f1": f1,
        "cv_jaccard": jac,
        "cv_balanced_accuracy": bal,
        "inter_slide_f1": f1_is,
        "inter_slide_jaccard": jac_is,
        "inter_slide_balanced_accuracy": bal_is,
        "p_at_10": precision_at_10(x, y),
    }


def main() -> int:
    from wsi_il.pretrain import METHOD_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-pretrain"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed of the pretraining run (default: 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--method",
        choices=list(METHOD_NAMES),
        default="moco",
        help="self-supervised method (default: wsi-il pretrain's)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder holding bach-iciar2018-1536jpeg-sample/ [default: $WSI_IL_DATA or ../shared/data]",
    )
    parser.add_argument("--size", type=int, default=7680, help="side of each BACH mosaic slide in px")
    parser.add_argument(
        "--slides",
        type=Path,
        nargs=2,
        default=None,
        help="two exact-truth mosaic slides (python -m wsi_il.measure.mosaic --patches), truth beside each",
    )
    parser.add_argument("--tile-size", type=int, default=256, help="the project's tile side (96 for PCam mosaics)")
    parser.add_argument("--recipe", default=None, help="wsi-il pretrain --recipe [default: the command's default]")
    args = parser.parse_args()
    from wsi_il.measure.truth import truth_mask

    args.out.mkdir(parents=True, exist_ok=True)
    if args.slides:
        slide_paths = [s.resolve() for s in args.slides]
        truths = [s.with_suffix(".truth.geojson") for s in slide_paths]
    else:
        from wsi_il.measure.bench import data_dir
        from wsi_il.measure.mosaic import bach_images, make_block_slide

        tumour, normal = bach_images(data_dir(args.data))
        made = [
            make_block_slide(
                args.out / f"mosaic{i + 1}.tiff",
                tumour,
                normal,
                size_px=(args.size, args.size),
                block=block,
                seed=11 + i,
            )
            for i, block in enumerate([(1280, 1280, 4352, 3840), (3328, 3840, 6400, 6400)])
        ]
        slide_paths, truths = [m.path for m in made], [m.truth_path for m in made]
    project = args.out / "project"
    if not (project / "project.json").is_file():
        cli(
            "init",
            str(project),
            "--slide",
            str(slide_paths[0]),
            "--slide",
            str(slide_paths[1]),
            "--weights",
            "random",
            "--device",
            "cpu",
            "--tile-size",
            str(args.tile_size),
        )
    x_random, boxes, slide_index = gap_features(project)
    y = np.zeros(len(boxes), dtype=bool)
    for i, truth in enumerate(truths):
        y[slide_index == i] = truth_mask(boxes[slide_index == i], truth)
    results = [
        evaluate("colour statistics", colour_features(project), y, slide_index),
        evaluate("random ResNet-18", x_random, y, slide_index),
    ]
    chosen = (
        ("steps", args.steps),
        ("batch", args.batch),
        ("crop", args.crop),
        ("seed", args.seed),
        ("recipe", args.recipe),
    )
    options = [f"--{k} {v}" for k, v in chosen if v is not None]
    weights = args.out / "pretrained.pt"
    load_before, cpu_before = os.getloadavg()[0], children_cpu_seconds()
    seconds = cli(
        "pretrain",
        str(project),
        "--start",
        "random",
        "--out",
        str(weights),
        "--device",
        args.device,
        "--method",
        args.method,
        *" ".join(options).split(),
    )
    cpu_seconds, load_after = children_cpu_seconds() - cpu_before, os.getloadavg()[0]
    cli("reextract", str(project), "--weights", str(weights), "--device", args.device)
    x_pre, _, _ = gap_features(project)
    results.append(evaluate(f"{METHOD_NAMES[args.method]}-pretrained ResNet-18", x_pre, y, slide_index))
    summary = {
        "patches": int(len(y)),
        "tumour_patches": int(y.sum()),
        "method": args.method,
        "pretrain_seconds": seconds,
        "pretrain_cpu_seconds": cpu_seconds,
        "load_average_before_after": [load_before, load_after],
        "pretrain_options": options or ["defaults"],
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    (args.out / "pretrain_probe.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{len(y)} patches ({int(y.sum())} tumour); pretraining took {seconds / 60:.1f} min wall, "
        f"{cpu_seconds / 60:.1f} CPU-min (load average {load_before:.1f} before, {load_after:.1f} after)"
    )
    print(
        f"{'features':30} {'CV F1':>6} {'CV Jac':>6} {'CV BA':>6} {'A<->B F1':>8} {'A<->B Jac':>9} "
        f"{'A<->B BA':>8} {'P@10 tum/norm':>14}"
    )
    for r in results:
        p = r["p_at_10"]
        print(
            f"{r['features']:30} {r['cv_f1']:6.3f} {r['cv_jaccard']:6.3f} {r['cv_balanced_accuracy']:6.3f} "
            f"{r['inter_slide_f1']:8.3f} {r['inter_slide_jaccard']:9.3f} {r['inter_slide_balanced_accuracy']:8.3f} "
            f"{p['tumour']:7.2f}/{p['normal']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
