"""Tiles at a physical resolution: the level-0 grid, reads from the best pyramid level, slides without a pixel size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from wsi_il.cli import app
from wsi_il.config import TilingSettings
from wsi_il.errors import InputError
from wsi_il.extraction import read_at_resolution
from wsi_il.features import resize_tile
from wsi_il.measure.mosaic import write_pyramidal_tiff
from wsi_il.resolution import level0_tile_px, target_mpp, tile_side_px, tile_um
from wsi_il.slide import TileReader, open_slide

runner = CliRunner()
SLIDE_MPP = 0.25


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def tissue_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth pink-and-purple image with structure at every scale (resampling it is not trivial)."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.random((1, 3, height // 16, width // 16))).float()
    smooth = torch.nn.functional.interpolate(noise, size=(height, width), mode="bicubic")[0].permute(1, 2, 0).numpy()
    base = np.array([200.0, 120.0, 170.0]) + 50 * (smooth - 0.5)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    """A lossless three-level pyramid at 0.25 µm/px (a 40x scan); each level the 2x2 mean of the one above."""
    path = tmp_path_factory.mktemp("pyramid") / "forty.tif"
    write_pyramidal_tiff(path, tissue_like(1024, 1536), mpp=SLIDE_MPP, tile_px=128, jpeg_quality=None)
    return path


def test_the_target_resolution_and_tile_side_from_the_options():
    assert target_mpp(None, 20) == 0.5 and target_mpp(0.5, 20) == 0.5 and target_mpp(None, None) is None
    with pytest.raises(InputError, match="disagree"):
        target_mpp(0.25, 20)
    assert tile_side_px(None, 112, 0.5) == 224 and tile_side_px(128, None, None) == 128
    with pytest.raises(InputError, match="needs a target resolution"):
        tile_side_px(None, 112, None)
    at_half = TilingSettings(tile_size_px=224, target_mpp=0.5)
    assert level0_tile_px(at_half, 0.25) == 448 and level0_tile_px(at_half, 0.5) == 224
    assert level0_tile_px(at_half, 0.499) == 224 and tile_um(at_half, 0.25) == 112
    assert level0_tile_px(TilingSettings(tile_size_px=256), 0.25) == 256


def test_reads_come_from_the_best_level_and_match_a_reference_resize(pyramid):
    reader = TileReader(pyramid)
    slide = open_slide(pyramid)
    try:
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        assert len(slide.level_downsamples) >= 3
    finally:
        slide.close()
    x, y = 384, 256
    # 0.5 µm/px: a 128 px level-0 square is level 1 (each pixel the mean of 2 x 2) read as it is
    half = read_at_resolution(reader, x, y, 128, 64)
    box = level0[y : y + 128, x : x + 128].astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert half.shape == (64, 64, 3) and np.abs(half - box).max() <= 1
    # 1.0 µm/px: level 2 read as it is
    quarter = read_at_resolution(reader, x, y, 256, 64)
    box4 = level0[y : y + 256, x : x + 256].astype(np.float64).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(quarter.astype(np.float64) - box4).max() <= 2
    # 0.375 µm/px lies between levels 0 and 1: level 0 is read and resized
    between = read_at_resolution(reader, x, y, 96, 64)
    assert np.array_equal(between, resize_tile(np.ascontiguousarray(level0[y : y + 96, x : x + 96]), 64))
    # level-0 tiles are what they always were
    assert np.array_equal(read_at_resolution(reader, x, y, 64, 64), level0[y : y + 64, x : x + 64])
    reader.close()


def test_init_at_a_physical_resolution_keeps_the_grid_in_level0_pixels(pyramid, tmp_path):
    project = tmp_path / "p"
    out = run(
        "init",
        project,
        "--slide",
        pyramid,
        "--magnification",
        "20",
        "--tile-um",
        "32",
        "--weights",
        "random",
        "--device",
        "cpu",
    )
    assert "64 px at 0.5 µm/px (32 µm)" in out
    manifest = json.loads((project / "project.json").read_text())
    assert manifest["tiling"]["tile_size_px"] == 64 and manifest["tiling"]["target_mpp"] == 0.5
    slide_id = manifest["slides"][0]["id"]
    boxes = np.load(project / "slides" / slide_id / "patches.npy")
    assert len(boxes) > 0 and (boxes[:, 2:] == 128).all()  # 64 px at 0.5 µm/px = 128 level-0 px at 0.25
    assert (boxes[:, :2] % 128 == 0).all()
    assert boxes[:, 0].max() + 128 <= 1536 and boxes[:, 1].max() + 128 <= 1024
    status = json.loads(run("status", project, "--json"))
    assert status["slides"][0]["tile_um"] == pytest.approx(32.0)
    region = tmp_path / "query.geojson"
    x, y = (int(v) for v in boxes[len(boxes) // 2, :2])
    square = [[x, y], [x + 256, y], [x + 256, y + 256], [x, y + 256], [x, y]]
    region.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [square]},
                        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
                    }
                ],
            }
        )
    )
    run("query", project, "--region", region, "--label", "Tumor", "-k", "4", "--rounds", "1", "--device", "cpu")
    batch = json.loads((project / "batches" / "s1-r1" / "batch.geojson").read_text())
    for feature in batch["features"]:
        xs, ys = zip(*feature["geometry"]["coordinates"][0], strict=True)
        assert max(xs) - min(xs) == 128 and max(ys) - min(ys) == 128 and min(xs) % 128 == 0


def test_a_slide_without_a_pixel_size_needs_slide_mpp(tmp_path):
    path = tmp_path / "no-mpp.tif"
    image = tissue_like(512, 768, seed=1)
    with tifffile.TiffWriter(path) as writer:  # no resolution tags: OpenSlide reports no mpp
        writer.write(image, photometric="rgb", tile=(128, 128), subfiletype=0, software=False, metadata=None)
        writer.write(
            image[::2, ::2].copy(), photometric="rgb", tile=(128, 128), subfiletype=1, software=False, metadata=None
        )
    out = run(
        "init", tmp_path / "refused", "--slide", path, "--mpp", "0.5", "--weights", "random", "--device", "cpu", code=3
    )
    assert "records no pixel size" in out and "--slide-mpp" in out and not (tmp_path / "refused").exists()
    run(
        "init",
        tmp_path / "p",
        "--slide",
        path,
        "--mpp",
        "0.5",
        "--tile-size",
        "64",
        "--slide-mpp",
        "0.25",
        "--weights",
        "random",
        "--device",
        "cpu",
    )
    status = json.loads(run("status", tmp_path / "p", "--json"))
    assert status["slides"][0]["mpp"] == 0.25 and status["slides"][0]["mpp_given"]
    assert "(given)" in run("status", tmp_path / "p")
