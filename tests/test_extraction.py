"""Extraction reads each tile once: the pixel rule and the features in one pass; the normalisation statistics
come from a random sample of tissue tiles (or from every tile with ``--norm-sample 0``, the paper's way)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_trust_support import cli

from wsi_il.config import TilingSettings
from wsi_il.database import cut_rows
from wsi_il.extraction import project_extractor
from wsi_il.features import channel_sums, mean_std, resize_tile
from wsi_il.measure.mosaic import write_pyramidal_tiff
from wsi_il.project import Project
from wsi_il.slide import TileReader
from wsi_il.tiling import is_tissue_tile

TILE = 128


def test_cut_rows_leaves_a_valid_npy_file(tmp_path):
    array = np.arange(1200 * 3 * 2, dtype=np.float16).reshape(1200, 3, 2)
    path = tmp_path / "rows.npy"
    np.save(path, array)
    cut_rows(path, 7)  # four digits to one: the header keeps its length
    got = np.load(path, mmap_mode="r")
    assert got.shape == (7, 3, 2) and got.dtype == np.float16 and np.array_equal(got, array[:7])
    assert path.stat().st_size == got.offset + 7 * 3 * 2 * 2
    cut_rows(path, 7)  # again: nothing changes
    assert np.array_equal(np.load(path), array[:7])


@pytest.fixture(scope="module")
def striped_slide(tissue_field, tmp_path_factory) -> Path:
    """Real tissue on the left; on the right, white with thin pink stripes: the thumbnail mask takes the
    stripes for tissue, the pixel rule drops their tiles (over 80% white, fewer than 10 components)."""
    rgb = np.full((768, 1280, 3), 245, np.uint8)
    rgb[:768, :640] = tissue_field[:768, :640]
    for y in range(0, 768, TILE):
        rgb[y + 40 : y + 48, 640:] = (225, 140, 190)  # 8 px: 6% of a tile, over the 5% a candidate needs
    path = tmp_path_factory.mktemp("striped") / "striped.tiff"
    write_pyramidal_tiff(path, rgb, tile_px=256, jpeg_quality=None)
    return path


def _init(project: Path, slide: Path, *extra: object) -> dict:
    cli(
        "init",
        project,
        "--slide",
        slide,
        "--tile-size",
        TILE,
        "--batch-size",
        8,
        "--weights",
        "random",
        "--device",
        "cpu",
        *extra,
    )
    return json.loads((project / "project.json").read_text())


def test_one_read_drops_blank_tiles_and_keeps_features_in_patch_order(striped_slide, tmp_path):
    manifest = _init(tmp_path / "p", striped_slide, "--norm-sample", 0)
    project = Project(tmp_path / "p")
    record = project.slides(manifest)[0]
    candidates = np.load(project.candidates_path(record.id))
    verdicts = np.load(project.tissue_path(record.id))
    settings = TilingSettings(tile_size_px=TILE)
    reader = TileReader(striped_slide)
    tiles = [reader.read(int(x), int(y), TILE, TILE) for x, y in candidates]
    expected = np.array([is_tissue_tile(t, settings) for t in tiles])
    assert (~expected).sum() >= 4 and expected.sum() >= 4, "the slide should have both kinds of candidate"
    assert np.array_equal(verdicts, np.where(expected, 1, 2))

    patches = np.load(project.patches_path(record.id))
    assert np.array_equal(patches[:, :2], candidates[expected]) and (patches[:, 2:] == TILE).all()
    assert record.n_patches == len(patches) and record.tiled and record.extracted

    features = np.load(project.features_path(record.id), mmap_mode="r")
    assert features.shape == (len(patches), 512, 7, 7)
    extractor, _ = project_extractor(manifest, "cpu")
    kept = [resize_tile(t, 224) for t, keep in zip(tiles, expected, strict=True) if keep]
    direct = extractor(np.stack(kept))
    assert np.allclose(features.astype(np.float32), direct.astype(np.float32), atol=2e-2)

    # --norm-sample 0: the paper's statistics, from every tissue tile
    mean, std = mean_std(sum(channel_sums(t) for t in kept))
    assert np.allclose(manifest["normalisation"]["mean"], mean) and np.allclose(manifest["normalisation"]["std"], std)
    assert manifest["normalisation"]["tiles_read"] == len(candidates)


def test_a_sample_of_tiles_gives_close_statistics(striped_slide, tmp_path):
    exact = _init(tmp_path / "exact", striped_slide, "--norm-sample", 0)["normalisation"]
    sampled = _init(tmp_path / "sample", striped_slide, "--norm-sample", 12)["normalisation"]
    assert sampled["tiles_read"] == 12 and exact["tiles_read"] == sampled["candidate_tiles"] > 12
    assert sampled["mean"] != exact["mean"]
    assert np.allclose(sampled["mean"], exact["mean"], atol=0.06)
    assert np.allclose(sampled["std"], exact["std"], atol=0.06)
    again = _init(tmp_path / "again", striped_slide, "--norm-sample", 12)["normalisation"]
    assert again == sampled, "the sample is seeded: the same project settings give the same statistics"
    assert (
        f"a random sample of 12 of {sampled['candidate_tiles']} candidate tiles"
        in cli("status", tmp_path / "sample").output
    )
    assert "(every tissue tile)" in cli("status", tmp_path / "exact").output


def test_the_extractor_resizes_raw_tiles_as_the_readers_did(tissue_field):
    """Readers hand slides' tiles over at their own size; the extractor's batched resize gives the values the
    readers' per-tile resize gave (on a CPU, to the bit), so the features are the same."""
    import torch

    from wsi_il.features import FeatureExtractor, build_resnet, resize_batch, resolve_weights

    field = tissue_field
    tiles = np.stack([field[y : y + 256, x : x + 256] for y, x in ((0, 0), (300, 500), (700, 1000), (1100, 200))])
    resized = np.stack([resize_tile(t, 224) for t in tiles])
    pixels = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    assert np.array_equal(resize_batch(pixels, 224).permute(0, 2, 3, 1).numpy(), resized)
    # the float kernel a GPU runs (no uint8 kernel there), rounded: within one grey level
    floated = torch.nn.functional.interpolate(pixels.float(), size=(224, 224), mode="bilinear", antialias=True)
    gap = np.abs(floated.round().permute(0, 2, 3, 1).numpy() - resized.astype(np.float32))
    assert gap.max() <= 1.0

    model = build_resnet(resolve_weights("random"), 0)
    extractor = FeatureExtractor(model, [0.7, 0.5, 0.7], [0.15, 0.2, 0.15], "cpu")
    assert np.array_equal(extractor(tiles), extractor(resized))
    keep = np.array([True, False, True, False])
    assert np.array_equal(extractor(tiles, keep), extractor(resized[keep]))


def test_one_behind_hands_each_batch_over_after_the_next_is_submitted():
    from wsi_il.extraction import one_behind

    events = []

    class Recorder:
        def submit(self, tiles, keep):
            events.append(("submit", int(tiles[0, 0, 0, 0])))
            return int(tiles[0, 0, 0, 0])

    batches = [range(0, 2), range(2, 4), range(4, 5)]
    loaded = [(np.full((len(b), 1, 1, 3), k, np.uint8), np.array([k != 1] * len(b))) for k, b in enumerate(batches)]
    for batch, features, kept in one_behind(Recorder(), zip(batches, loaded, strict=True)):
        events.append(("handed", batch.start, features, bool(kept.any())))
    assert events == [
        ("submit", 0),
        ("handed", 0, 0, True),
        ("submit", 2),
        ("handed", 2, None, False),
        ("handed", 4, 2, True),
    ]


def test_blank_pixels_is_the_three_channel_rule():
    from wsi_il.tiling import blank_pixels

    settings = TilingSettings()
    rng = np.random.default_rng(0)
    levels = np.array(
        [
            0,
            settings.black_level - 1,
            settings.black_level,
            settings.black_level + 1,
            settings.white_level - 1,
            settings.white_level,
            settings.white_level + 1,
            255,
        ],
        np.uint8,
    )
    rgb = np.concatenate(
        [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.choice(levels, (64, 64, 3)).astype(np.uint8)]
    )
    white = (rgb > settings.white_level).all(axis=-1)
    black = (rgb < settings.black_level).all(axis=-1)
    assert np.array_equal(blank_pixels(rgb, settings), white | black)
    assert (white | black).sum() > 100


def test_reader_threads_give_the_project_reader_processes_give(striped_slide, tmp_path, monkeypatch):
    """The slides' readers (one start for the statistics sample and the features) as threads
    (``WSI_IL_READERS=threads``): the same statistics, verdicts and features as the processes, to the bit."""
    from wsi_il.readers import READERS_ENV

    made = {}
    for kind in ("processes", "threads"):
        monkeypatch.setenv(READERS_ENV, kind)
        manifest = _init(tmp_path / kind, striped_slide, "--norm-sample", 12)
        project = Project(tmp_path / kind)
        record = project.slides(manifest)[0]
        made[kind] = (
            manifest["normalisation"],
            np.load(project.tissue_path(record.id)),
            np.load(project.features_path(record.id)),
        )
    (stats, verdicts, features), (stats_t, verdicts_t, features_t) = made["processes"], made["threads"]
    assert stats == stats_t and np.array_equal(verdicts, verdicts_t) and np.array_equal(features, features_t)


def test_a_changed_weights_file_is_refused_in_one_line_and_stops_the_readers(striped_slide, tmp_path):
    """The trunk gets ready in a thread while the readers (forked first) read: its failure (here the project's
    weights file changed since init) is the command's one-line error, and no reader outlives it."""
    import multiprocessing
    import shutil

    import torch
    from test_trust_support import error_line
    from torchvision.models import resnet18

    weights = tmp_path / "weights.pt"
    torch.manual_seed(3)
    torch.save(resnet18().state_dict(), weights)
    cli(
        "init",
        tmp_path / "p",
        "--slide",
        striped_slide,
        "--tile-size",
        TILE,
        "--batch-size",
        8,
        "--weights",
        weights,
        "--device",
        "cpu",
    )
    torch.manual_seed(4)
    torch.save(resnet18().state_dict(), weights)
    other = shutil.copy(striped_slide, tmp_path / "other.tiff")
    line = error_line(cli("add-slide", tmp_path / "p", "--slide", other, "--device", "cpu", code=3))
    assert "have changed since the project's features were made" in line and "restore the original" in line
    assert not multiprocessing.active_children()
