"""Extraction: tile a project's slides and patch folders and cache their features, on this machine.

Every step is resumable: tiling results and feature batches are written as they finish, so a command that is
interrupted picks up where it stopped when it is run again. ``wsi_il.cluster`` runs the same per-slide work on
the workers of a Dask cluster.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.backbones import check_store_fits
from wsi_il.config import FeatureSettings, TilingSettings, settings_of
from wsi_il.database import (
    IMAGE_SUFFIXES,
    Commits,
    RowWriter,
    cut_rows,
    folder_classes,
)
from wsi_il.errors import InputError
from wsi_il.events import Reporter
from wsi_il.features import (
    FeatureExtractor,
    Features,
    Weights,
    batch_ranges,
    build_backbone,
    channel_sums,
    head_block_of,
    load_project_weights,
    mean_std,
    resize_tile,
    store_shape,
    trunk_batch_size,
)
from wsi_il.imagefiles import load_image
from wsi_il.project import Project, SlideRecord, features_pending
from wsi_il.readers import ReaderPool, prefetch, read_batches
from wsi_il.resolution import level0_tile_px, slide_mpp
from wsi_il.slide import TileReader, read_info, read_thumbnail
from wsi_il.threads import default_workers
from wsi_il.tiling import candidate_tiles, grid, is_tissue_tile, tissue_mask


def slide_candidates(
    project: Project, slide_id: str, slide: Path, settings: TilingSettings, side0: int | None = None
) -> np.ndarray:
    """Return the grid tiles of a slide inside its thumbnail tissue mask (computed once, then read back);
    ``side0``: the grid's side in level-0 px (``resolution.level0_tile_px``; default ``tile_size_px``)."""
    path = project.candidates_path(slide_id)
    if path.is_file():
        return project.read_array(path)
    side0 = side0 or settings.tile_size_px
    info = read_info(slide)
    thumb, scale = read_thumbnail(info.path, settings.thumbnail_px)
    corners = candidate_tiles(
        grid(info.bounds, side0), tissue_mask(thumb, settings), scale, side0, settings.min_mask_fraction
    )
    project.write_array(path, corners)
    return corners


def read_at_resolution(reader: TileReader, x: int, y: int, side0: int, out_px: int) -> np.ndarray:
    """Return the square level-0 region of ``side0`` px at ``(x, y)`` as ``out_px`` a side: read from the best
    pyramid level (``TileReader.read_downsampled``) and resized from there (antialiased bilinear); read as it is
    where ``side0 == out_px``."""
    if side0 == out_px:
        return reader.read(x, y, side0, side0)
    return resize_tile(reader.read_downsampled(x, y, side0, side0 / out_px), out_px)


def read_tissue_tile(
    reader: TileReader, corner: Any, settings: TilingSettings, input_px: int | None = None, side0: int | None = None
) -> Any:
    """Read one candidate tile (``side0`` level-0 px a side, ``tile_size_px`` by default, as ``tile_size_px``):
    when the pixel rule keeps it, the tile (resized to ``input_px`` where given), else None."""
    tile = settings.tile_size_px
    rgb = read_at_resolution(reader, int(corner[0]), int(corner[1]), side0 or tile, tile)
    if not is_tissue_tile(rgb, settings):
        return None
    return rgb if input_px is None else resize_tile(rgb, input_px)


def slide_readers(settings: TilingSettings, workers: int, batch_size: int) -> ReaderPool:
    """The readers of slides' candidate tiles, started once for the statistics sample and the features (made
    before the trunk's thread and its GPU start: ``build_database``). Items are ``tile_spec`` tuples."""
    px = settings.tile_size_px
    return ReaderPool(functools.partial(_slide_loads, settings), workers, batch_size, batch_size * px * px * 3)


def tile_spec(path: Path, kind: str, corner: np.ndarray, side0: int = 0) -> tuple[str, str, int, int, int]:
    """A candidate tile for ``slide_readers``: kind 'tile' (its pixels where the pixel rule keeps it) or 'sums'
    (its channel sums at the trunk's 224 px, zeros where the rule drops it); ``side0``: its side in level-0 px
    (0: the tiling's ``tile_size_px``)."""
    return str(path), kind, int(corner[0]), int(corner[1]), int(side0)


def _slide_loads(settings: TilingSettings) -> tuple[Callable[[Any], np.ndarray | None], Callable[[], None]]:
    """In each reader: the load of ``tile_spec`` items, one slide open at a time (read, decode, the pixel rule)."""
    open_slides: dict[str, TileReader] = {}

    def close() -> None:
        for reader in open_slides.values():
            reader.close()
        open_slides.clear()

    def load(item: tuple[str, str, int, int, int]) -> np.ndarray | None:
        path, kind, x, y, side0 = item
        if path not in open_slides:
            close()
            open_slides[path] = TileReader(Path(path))
        rgb = read_tissue_tile(open_slides[path], (x, y), settings, 224 if kind == "sums" else None, side0)
        if kind == "sums":
            return np.zeros(7) if rgb is None else channel_sums(rgb)
        return rgb

    return load, close


def normalisation(
    project: Project,
    manifest: dict[str, Any],
    settings: TilingSettings,
    seed: int,
    reporter: Reporter,
    readers: ReaderPool | None,
) -> dict[str, Any]:
    """Per-channel mean and std of the project's tissue tiles (docs/method.md, "Patches and features" 3).

    Patch folders and slides tiled before count whole (their sums were kept). Over the other slides' candidate
    tiles, ``settings.normalisation_sample`` tiles drawn at random (all of them when there are fewer, or when
    the setting is 0) are read and put through the pixel rule; their sums are scaled up to all candidates.
    """
    sums = np.zeros(7)
    for record in manifest["slides"]:
        if record["tiled"]:
            sums += np.array(project.read_json(project.tiling_path(record["id"]))["channel_sums"])
    slides = [r for r in manifest["slides"] if not r["tiled"]]
    sides = [level0_tile_px(settings, slide_mpp(r)) for r in slides]
    candidates = [
        slide_candidates(project, r["id"], Path(r["path"]), settings, side)
        for r, side in zip(slides, sides, strict=True)
    ]
    total = sum(len(c) for c in candidates)
    size = total if settings.normalisation_sample <= 0 else min(total, settings.normalisation_sample)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size, replace=False)) if total else np.zeros(0, int)
    advance = reporter.task("tissue statistics", size, "tiles")
    sampled, starts = np.zeros(7), np.cumsum([0] + [len(c) for c in candidates])
    for record, corners, side, first, stop in zip(slides, candidates, sides, starts[:-1], starts[1:], strict=True):
        picked = corners[chosen[(chosen >= first) & (chosen < stop)] - first]
        path = Path(record["path"])
        if readers is None:
            raise ValueError("normalisation over slides needs their readers (slide_readers)")
        batches = batch_ranges(0, len(picked), 64)
        for rows, kept in readers.read(batches, (7,), np.float64, lambda i: tile_spec(path, "sums", picked[i], side)):  # noqa: B023
            sampled += rows[kept].sum(0)
            advance(len(rows))
    if size:
        sums += sampled * (total / size)
    if sums[6] == 0:
        if 0 < size < total:  # a sample without tissue says little: look at every tile before giving up
            return normalisation(project, manifest, replace(settings, normalisation_sample=0), seed, reporter, readers)
        raise InputError(
            "no tissue patch was found in the project's slides",
            "check the slides, or lower the tissue filter's thresholds",
        )
    mean, std = mean_std(sums)
    return {"mean": mean, "std": std, "tiles_read": int(size), "candidate_tiles": int(total)}


def tile_patch_folder(project: Project, record: dict[str, Any], reporter: Reporter, workers: int) -> None:
    """List the images of a patch folder, with their folder labels, and their colour statistics."""
    folder = Path(record["path"])
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(
            f"patch folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
            "point --patches at a folder of patch images or of class subfolders",
        )
    classes = set(folder_classes(folder))
    advance = reporter.task(f"reading {record['id']}", len(files), "images")

    def load(i: int) -> np.ndarray:
        rgb = load_image(files[i])
        return np.concatenate([[rgb.shape[1], rgb.shape[0]], channel_sums(resize_tile(rgb, 224))])

    rows = []
    batches = batch_ranges(0, len(files), 64)
    for stats in prefetch(load, batches, workers):
        rows.extend(stats)
        advance(len(stats))
    table = np.array(rows)
    boxes = np.zeros((len(files), 4), dtype=np.int64)
    boxes[:, 2:] = table[:, :2]
    relative = [p.relative_to(folder) for p in files]
    labels = [r.parts[0] if len(r.parts) > 1 and r.parts[0] in classes else None for r in relative]
    ids = _image_ids(record["id"], relative)
    project.write_json(
        project.images_path(record["id"]), {"files": [str(r) for r in relative], "labels": labels, "ids": ids}
    )
    _finish_tiling(project, record, boxes, table[:, 2:].sum(0))


def _image_ids(prefix: str, relative: list[Path]) -> list[str]:
    ids, seen = [], set()
    for rel in relative:
        base = f"{prefix}_" + "".join(c if c.isalnum() or c in "-." else "-" for c in str(rel.with_suffix("")))
        candidate, n = base, 2
        while candidate in seen:
            candidate, n = f"{base}-{n}", n + 1
        seen.add(candidate)
        ids.append(candidate)
    return ids


def _finish_tiling(project: Project, record: dict[str, Any], boxes: np.ndarray, sums: np.ndarray) -> None:
    project.write_array(project.patches_path(record["id"]), boxes)
    project.write_json(project.tiling_path(record["id"]), {"channel_sums": sums.tolist()})
    record["n_patches"] = int(len(boxes))
    record["tiled"] = True


def loaded_px(project: Project, record: SlideRecord, input_px: int, tiling: TilingSettings | None = None) -> int:
    """The side of the tiles extraction's readers load: a slide's own tile size where its patches all have one
    (the extractor resizes them on its device), or the tiling's side at its target resolution where it has one;
    else ``input_px`` (patch images vary in size)."""
    if record.kind == "patches":
        return input_px
    if tiling is not None and tiling.target_mpp:
        return tiling.tile_size_px
    sizes = np.unique(project.read_array(project.patches_path(record.id))[:, 2:])
    return int(sizes[0]) if len(sizes) == 1 else input_px


def reader_for(project: Project, record: SlideRecord, px: int):
    """Return (load(i) -> RGB tile ``px`` a side, close()) for a slide or patch folder."""
    boxes = project.read_array(project.patches_path(record.id))
    if record.kind == "patches":
        files = project.read_json(project.images_path(record.id))["files"]
        root = Path(record.path)
        return (lambda i: resize_tile(load_image(root / files[i]), px)), (lambda: None)
    reader = TileReader(Path(record.path))

    def load(i: int) -> np.ndarray:
        x, y, w, h = (int(v) for v in boxes[i])
        if w == h:  # from the best pyramid level (a tile at a physical resolution; the same read otherwise)
            return read_at_resolution(reader, x, y, w, px)
        return resize_tile(reader.read(x, y, w, h), px)

    return load, reader.close


def extract_slide(
    project: Project,
    record: SlideRecord,
    extractor: FeatureExtractor,
    settings: FeatureSettings,
    reporter: Reporter,
    workers: int,
    staged: bool = False,
    paths: tuple[Path, Path] | None = None,
) -> None:
    """Compute the features of every patch of a slide, resuming after the last committed batch.

    ``staged`` writes the next features (new weights) beside the current ones; ``paths`` (features, progress)
    writes them elsewhere.
    """
    n = record.n_patches
    path = project.next_features_path(record.id) if staged else project.features_path(record.id)
    progress_path = project.next_progress_path(record.id) if staged else project.progress_path(record.id)
    if paths is not None:
        path, progress_path = paths
    progress = project.read_json(progress_path, {"done": 0})
    done = int(progress["done"]) if path.is_file() else 0
    store = RowWriter(path, (n, *store_shape(settings)), np.float16, create=done == 0)
    batches = batch_ranges(done, n, extractor.batch_size(settings.batch_size))
    advance = reporter.task(f"features {record.id}", n, "patches")
    advance(done)
    commits = Commits()
    tiling = settings_of(project.read_manifest()).tiling
    px = loaded_px(project, record, settings.input_px, tiling)
    extractor.warm_up(extractor.batch_size(settings.batch_size), px)

    def commit(stop: int) -> None:  # features durable before the count that covers them
        store.sync()
        project.write_json(progress_path, {"done": stop})

    try:
        loaded = read_batches(lambda: reader_for(project, record, px), batches, workers, (px, px, 3))
        for batch, features, _ in one_behind(extractor, zip(batches, loaded, strict=True)):
            store.write(batch.start, features.result(), durable=False)
            if batch is batches[-1] or commits.due():
                commits.commit(lambda: commit(batch.stop))  # noqa: B023 - called at once
            advance(len(batch))
    finally:
        store.close()


def extract_tissue(
    project: Project,
    record: SlideRecord,
    tiling: TilingSettings,
    extractor: FeatureExtractor,
    settings: FeatureSettings,
    reporter: Reporter,
    readers: ReaderPool,
) -> int:
    """Apply the pixel rule to a slide's candidate tiles and compute the features of those kept, reading each
    tile once; returns the number of tissue patches.

    Resumable: the pixel rule's verdicts (``tissue.npy``) and the features of the tiles kept so far are written
    batch by batch before the progress that counts them; at the end the patch list is written and the feature
    file is cut to the tiles kept.
    """
    side0 = level0_tile_px(tiling, record.mpp)
    corners = slide_candidates(project, record.id, Path(record.path), tiling, side0)
    n = len(corners)
    features_path, status_path = project.features_path(record.id), project.tissue_path(record.id)
    progress_path = project.progress_path(record.id)
    progress = project.read_json(progress_path, {"done": 0})
    done = int(progress["done"]) if features_path.is_file() and status_path.is_file() else 0
    advance = reporter.task(f"features {record.id}", n, "tiles")
    advance(done)
    if done < n:
        shape = (n, *store_shape(settings))
        store = RowWriter(features_path, shape, np.float16, create=done == 0)
        status = RowWriter(status_path, (n,), np.uint8, create=done == 0)
        kept = int(np.count_nonzero(np.load(status_path)[:done] == 1))
        px, path = tiling.tile_size_px, Path(record.path)
        batches = batch_ranges(done, n, extractor.batch_size(settings.batch_size))
        commits = Commits()

        def commit(stop: int) -> None:  # features and verdicts durable before the count that covers them
            store.sync()
            status.sync()
            project.write_json(progress_path, {"done": stop})

        try:
            loaded = readers.read(batches, (px, px, 3), np.uint8, lambda i: tile_spec(path, "tile", corners[i], side0))
            for batch, features, tissue in one_behind(extractor, zip(batches, loaded, strict=True)):
                if features is not None:
                    store.write(kept, features.result(), durable=False)
                status.write(batch.start, np.where(tissue, 1, 2).astype(np.uint8), durable=False)
                kept += int(tissue.sum())
                if batch is batches[-1] or commits.due():
                    commits.commit(lambda: commit(batch.stop))  # noqa: B023 - called at once
                advance(len(batch))
        finally:
            store.close()
            status.close()
    keep = np.flatnonzero(np.load(status_path) == 1) if n else np.zeros(0, np.int64)
    boxes = np.zeros((len(keep), 4), dtype=np.int64)
    boxes[:, :2] = corners[keep]
    boxes[:, 2:] = side0
    project.write_array(project.patches_path(record.id), boxes)
    if len(keep):
        cut_rows(features_path, len(keep))
    else:
        features_path.unlink(missing_ok=True)
    return len(keep)


def one_behind(
    extractor: FeatureExtractor, loaded: Iterable[tuple[range, tuple[np.ndarray, np.ndarray]]]
) -> Iterator[tuple[range, Features | None, np.ndarray]]:
    """Yield (batch, its features on their way (None where no tile was kept), kept) one batch behind the readers:
    a batch's features are handed over once the next batch's are submitted, so that on a GPU the trunk computes
    one batch while the host writes the one before and waits for the next (on a CPU nothing changes)."""
    previous = None
    for batch, (tiles, kept) in loaded:
        current = (batch, extractor.submit(tiles, kept) if kept.any() else None, kept)
        if previous is not None:
            yield previous
        previous = current
    if previous is not None:
        yield previous


def build_database(
    project: Project,
    manifest: dict[str, Any],
    reporter: Reporter,
    device: str,
    weights: Weights | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Tile and extract every slide of the project that is not done yet; returns the manifest.

    The slides' readers start first (``slide_readers``: forked once for the statistics sample and the features,
    before the trunk's thread and the GPU start, from a smaller process). The trunk then gets ready (weights
    loaded, network built, on a GPU its graph captured) in a thread while the slides' thumbnails are read and
    masked and the statistics sample is read.
    """
    workers = workers or default_workers()
    tiling = settings_of(manifest).tiling
    settings = settings_of(manifest).features
    needed = any(features_pending(entry) for entry in manifest["slides"])
    slides_to_read = any(not entry["tiled"] and entry["kind"] != "patches" for entry in manifest["slides"])
    with contextlib.ExitStack() as stack:
        readers = (
            stack.enter_context(slide_readers(tiling, workers, trunk_batch_size(device, settings.batch_size)))
            if slides_to_read
            else None
        )
        ahead = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-il-trunk"))
        trunk = ahead.submit(_ready_trunk, project, settings, weights, device, tiling.tile_size_px) if needed else None
        tile_sources(project, manifest, reporter, workers)
        if trunk is not None and trunk.done():
            trunk.result()  # a trunk that failed already (its weights, most often) is reported before the sample
        ensure_normalisation(project, manifest, reporter, readers)
        # the trunk's thread ends before any other reader is forked (a patch folder's, a tiled slide's; on an
        # error above, leaving the ExitStack waits for it the same way), and before the trunk computes: kept idle
        # to the end, it slowed a CPU's features stage by 5-10% (three interleaved runs each; the thread that
        # built the network keeps its own pool of compute threads)
        extractor = trunk.result() if trunk is not None else None
        ahead.shutdown()
        if extractor is None:
            return manifest
        pending = [
            record
            for record, entry in zip(project.slides(manifest), manifest["slides"], strict=True)
            if features_pending(entry)
        ]  # read now: tiling a patch folder changed its record
        extractor.normalise_with(*normalisation_of(settings, manifest))
        for record in pending:
            if record.tiled:
                extract_slide(project, record, extractor, settings, reporter, workers)
                n_patches = record.n_patches
            else:  # the pixel rule and the features in one read of each tile
                assert readers is not None  # an untiled slide made them
                n_patches = extract_tissue(project, record, tiling, extractor, settings, reporter, readers)
            for entry in manifest["slides"]:
                if entry["id"] == record.id:
                    entry.update(
                        tiled=True,
                        n_patches=n_patches,
                        extracted=n_patches > 0,
                        precision=extractor.precision if n_patches else None,
                    )
            project.write_manifest(manifest)
    return manifest


def tile_sources(project: Project, manifest: dict[str, Any], reporter: Reporter, workers: int) -> None:
    """List the images of patch folders not tiled yet and the candidate tiles of slides not tiled yet (computed
    once, then read back), then check that the features still to compute fit on the disk."""
    tiling = settings_of(manifest).tiling
    settings = settings_of(manifest).features
    for record in manifest["slides"]:
        if not record["tiled"] and record["kind"] == "patches":
            tile_patch_folder(project, record, reporter, workers)
            project.write_manifest(manifest)
        elif not record["tiled"]:
            slide_candidates(project, record["id"], Path(record["path"]), tiling, slide_side0(tiling, record))
    if any(features_pending(entry) for entry in manifest["slides"]):
        check_store_fits(project.root, pending_patches(project, manifest), store_shape(settings), settings.trainable)


def slide_side0(tiling: TilingSettings, entry: dict[str, Any]) -> int:
    """A slide's tile side in level-0 px (its manifest entry)."""
    return level0_tile_px(tiling, slide_mpp(entry))


def ensure_normalisation(
    project: Project, manifest: dict[str, Any], reporter: Reporter, readers: ReaderPool | None
) -> None:
    """Compute the project's tissue statistics once (``normalisation``) and record them in the manifest."""
    if manifest.get("normalisation") is None:
        tiling = settings_of(manifest).tiling
        seed = settings_of(manifest).features.seed
        manifest["normalisation"] = normalisation(project, manifest, tiling, seed, reporter, readers)
        project.write_manifest(manifest)


def pending_patches(project: Project, manifest: dict[str, Any]) -> int:
    """The most patches whose features are still to compute (a slide's candidate tiles before the pixel rule)."""
    total = 0
    for entry in manifest["slides"]:
        if not features_pending(entry):
            continue
        if entry["tiled"]:
            total += int(entry["n_patches"])
        elif entry["kind"] != "patches":
            total += len(project.read_array(project.candidates_path(entry["id"])))
    return total


def _ready_trunk(
    project: Project, settings: FeatureSettings, weights: Weights | None, device: str, tile_px: int
) -> FeatureExtractor:
    """The project's trunk on its device, its first batch run (its normalisation is set once it is known)."""
    weights = weights or load_project_weights(settings)
    model = build_backbone(weights, settings)
    save_init_block(project, model, settings.trainable)
    extractor = FeatureExtractor(
        model, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], device, settings.trainable, settings.input_px, settings.interpolation
    )
    extractor.warm_up(extractor.batch_size(settings.batch_size), tile_px)
    return extractor


def project_extractor(manifest: dict[str, Any], device: str) -> tuple[FeatureExtractor, FeatureSettings]:
    """The trunk that made a project's features (its weights, checked), with its normalisation."""
    settings = settings_of(manifest).features
    model = build_backbone(load_project_weights(settings), settings)
    return FeatureExtractor(
        model,
        *normalisation_of(settings, manifest),
        device,
        settings.trainable,
        settings.input_px,
        settings.interpolation,
    ), settings


def normalisation_of(settings: FeatureSettings, manifest: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The mean and std tiles are normalised with: a timm model's own where recorded, else the project's tissue
    statistics (the paper's)."""
    if settings.mean is not None and settings.std is not None:
        return list(settings.mean), list(settings.std)
    return manifest["normalisation"]["mean"], manifest["normalisation"]["std"]


def save_init_block(project: Project, model, trainable: str = "last") -> None:
    """Store the trainable part's pretrained weights (the last block of layer4, or all of layer4)."""
    path = project.init_model_path()
    if path.is_file():
        return
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(head_block_of(model, trainable).state_dict(), buffer)
    from wsi_il.fsutil import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue())
