"""Tests for wsi_il.measure.mosaic: pyramidal TIFFs that OpenSlide opens, and mosaic slides with known truth."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openslide
import pytest
from shapely.geometry import Point, box, shape

from wsi_il.errors import InputError
from wsi_il.measure.mosaic import (
    PCAM_MPP,
    MosaicSlide,
    bach_images,
    labelled_patches,
    make_block_slide,
    make_island_slide,
    make_patch_mosaic,
    random_blob,
    rasterise,
    write_pyramidal_tiff,
)

QUPATH_CHECK = Path(__file__).resolve().parents[1] / "tools" / "qupath-check" / "check.sh"
QUPATH_CHECK_JARS = (Path("/usr/share/java/jts-core.jar"), Path("/usr/share/java/gson.jar"))
SIZE_PX = (1536, 1024)
BLOCK = (512, 512, 1024, 768)


PIECE_PX = 96  # whole PCam patches


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory, dense_pcam: tuple[list[Path], list[Path]]) -> MosaicSlide:
    tumour, normal = dense_pcam
    path = tmp_path_factory.mktemp("mosaic") / "block.tiff"
    return make_block_slide(path, tumour, normal, size_px=SIZE_PX, mpp=0.42, seed=3, piece_px=PIECE_PX)


def _rgb(slide: openslide.OpenSlide, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    return np.asarray(slide.read_region(location, 0, size).convert("RGB"), dtype=np.float64)


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.extra_data
def test_bach_images_splits_classes(shared_data: Path) -> None:
    tumour, normal = bach_images(shared_data)
    assert {p.parent.name for p in tumour} == {"Invasive", "InSitu"}
    assert {p.parent.name for p in normal} == {"Normal"}


def test_bach_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bach_images(tmp_path)


def test_mosaic_opens_in_openslide(mosaic: MosaicSlide) -> None:
    with openslide.OpenSlide(mosaic.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count >= 2
        assert slide.dimensions == SIZE_PX == (mosaic.width, mosaic.height)
        # TIFF keeps the resolution as a rational number: tifffile before 2024 rounds it to about 2e-6
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.42, rel=1e-5)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.42, rel=1e-5)


def test_mosaic_truth_is_the_block(mosaic: MosaicSlide) -> None:
    collection = json.loads(mosaic.truth_path.read_text(encoding="utf-8"))
    assert mosaic.truth_path.name == "block.truth.geojson"
    [feature] = collection["features"]
    assert shape(feature["geometry"]).equals(box(*BLOCK))
    assert mosaic.tumour.equals(box(*BLOCK))
    assert mosaic.tissue.contains(mosaic.tumour)
    props = feature["properties"]
    assert props["objectType"] == "annotation" and props["name"] == "truth" and "isLocked" not in props
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}


def test_mosaic_truth_passes_qupath_check(mosaic: MosaicSlide) -> None:
    if shutil.which("javac") is None or not all(jar.is_file() for jar in QUPATH_CHECK_JARS):
        pytest.skip("QuPath import check (java, JTS, Gson) not available")
    result = subprocess.run(
        ["bash", str(QUPATH_CHECK), str(mosaic.truth_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 objects, 0 problems" in result.stdout


def test_mosaic_tumour_differs_from_normal(mosaic: MosaicSlide) -> None:
    with openslide.OpenSlide(mosaic.path) as slide:
        tumour = _rgb(slide, (512, 512), (512, 256)).mean(axis=(0, 1))
        normal = _rgb(slide, (256, 256), (1024, 256)).mean(axis=(0, 1))
    assert np.abs(tumour - normal).max() > 10


def test_mosaic_background_is_near_white(mosaic: MosaicSlide) -> None:
    with openslide.OpenSlide(mosaic.path) as slide:
        background = _rgb(slide, (0, 0), (SIZE_PX[0], 200))
    assert background.mean() > 230 and background.min() > 220


def test_mosaic_is_deterministic(tmp_path: Path, dense_pcam: tuple[list[Path], list[Path]]) -> None:
    tumour, normal = dense_pcam
    first, second = (
        make_block_slide(
            tmp_path / name, tumour[:2], normal[:2], size_px=(768, 768), tile_px=128, seed=7, piece_px=PIECE_PX
        )
        for name in ("a.tiff", "b.tiff")
    )
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.truth_path.read_text() == second.truth_path.read_text()


def test_mosaic_rejects_block_outside_tissue(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not inside the tissue"):
        make_block_slide(tmp_path / "x.tiff", [Path("t.jpg")], [Path("n.jpg")], block=(0, 0, 512, 512))
    with pytest.raises(InputError, match="piece size 0 px"):
        make_block_slide(tmp_path / "x.tiff", [Path("t.jpg")], [Path("n.jpg")], piece_px=0)


def test_block_pieces_are_whole_patches(mosaic: MosaicSlide, dense_pcam: tuple[list[Path], list[Path]]) -> None:
    """With ``piece_px`` the patches' own side, the tissue's first piece is one whole patch, turned or flipped."""
    from PIL import Image

    with openslide.OpenSlide(mosaic.path) as slide:
        piece = _rgb(slide, (256, 256), (PIECE_PX, PIECE_PX))
    gaps = []
    for path in dense_pcam[1]:
        with Image.open(path) as image:
            patch = np.asarray(image.convert("RGB"), dtype=np.float64)
        turns = [np.rot90(patch, k) for k in range(4)]
        gaps.append(min(np.abs(piece - t).mean() for t in turns + [t[:, ::-1] for t in turns]))
    assert min(gaps) < 4 < sorted(gaps)[1]  # one patch matches (up to JPEG), no other does


def test_pyramidal_tiff_lossless_round_trip(tmp_path: Path) -> None:
    rgb = _gradient(700, 900)
    write_pyramidal_tiff(tmp_path / "exact.tiff", rgb, mpp=0.25, tile_px=256, jpeg_quality=None)
    with openslide.OpenSlide(tmp_path / "exact.tiff") as slide:
        assert slide.level_dimensions[:2] == ((900, 700), (450, 350))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        np.testing.assert_array_equal(_rgb(slide, (0, 0), (900, 700)), rgb)


def test_pyramidal_tiff_jpeg_round_trip(tmp_path: Path) -> None:
    rgb = _gradient(600, 520)
    write_pyramidal_tiff(tmp_path / "jpeg.tiff", rgb, tile_px=128, jpeg_quality=90)
    with openslide.OpenSlide(tmp_path / "jpeg.tiff") as slide:
        assert slide.level_count == 4
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert np.abs(_rgb(slide, (0, 0), (520, 600)) - rgb).mean() < 3


def test_pyramidal_tiff_has_two_levels_when_small(tmp_path: Path) -> None:
    write_pyramidal_tiff(tmp_path / "small.tiff", _gradient(100, 120), tile_px=256)
    with openslide.OpenSlide(tmp_path / "small.tiff") as slide:
        assert slide.level_dimensions == ((120, 100), (60, 50))


def test_pyramidal_tiff_rejects_non_rgb(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not RGB uint8"):
        write_pyramidal_tiff(tmp_path / "bad.tiff", np.zeros((64, 64), dtype=np.uint8))


# ---- island slides ------------------------------------------------------------------------------
ISLAND_SIZE = (1536, 1280)


@pytest.fixture(scope="module")
def islands(tmp_path_factory: pytest.TempPathFactory, dense_pcam: tuple[list[Path], list[Path]]) -> MosaicSlide:
    tumour, normal = dense_pcam
    path = tmp_path_factory.mktemp("islands") / "islands.tiff"
    return make_island_slide(
        path, tumour, normal, size_px=ISLAND_SIZE, tile_px=128, islands=4, seed=5, piece_px=PIECE_PX
    )


def test_island_slide_opens_in_openslide(islands: MosaicSlide) -> None:
    with openslide.OpenSlide(islands.path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.dimensions == ISLAND_SIZE and slide.level_count >= 2


def test_island_truth_is_irregular_and_inside_tissue(islands: MosaicSlide, qupath_valid) -> None:
    qupath_valid(islands.truth_path)
    [feature] = json.loads(islands.truth_path.read_text(encoding="utf-8"))["features"]
    truth = shape(feature["geometry"])
    assert truth.is_valid and truth.geom_type in ("Polygon", "MultiPolygon")
    assert truth.symmetric_difference(islands.tumour).area < 1e-4 * truth.area  # the file holds the geometry
    assert islands.tissue.buffer(1).contains(truth)
    assert 0.03 < truth.area / islands.tissue.area < 0.6
    assert truth.area < 0.9 * truth.envelope.area  # not a rectangle
    assert islands.tissue.area < 0.9 * islands.width * islands.height  # background around the tissue
    assert feature["properties"]["classification"]["name"] == "Tumor"


def test_island_pixels_follow_the_layout(islands: MosaicSlide) -> None:
    with openslide.OpenSlide(islands.path) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, ISLAND_SIZE).convert("RGB"), dtype=np.float64)
    inside = rasterise(islands.tissue, ISLAND_SIZE)
    assert rgb[~inside].mean() > 230  # background
    assert rgb[inside].mean() < 215  # stained tissue


def test_island_slide_is_deterministic(tmp_path: Path, dense_pcam: tuple[list[Path], list[Path]]) -> None:
    tumour, normal = dense_pcam
    first, second = (
        make_island_slide(
            tmp_path / name, tumour[:2], normal[:2], size_px=(640, 640), tile_px=128, seed=2, piece_px=PIECE_PX
        )
        for name in ("a.tiff", "b.tiff")
    )
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.truth_path.read_text() == second.truth_path.read_text()


def test_random_blob_and_rasterise() -> None:
    blob = random_blob((50.0, 50.0), 20.0, np.random.default_rng(0))
    assert blob.is_valid and blob.contains(Point(50, 50)) and 200 < blob.area < 2500
    mask = rasterise(box(10, 20, 30, 25), (40, 40))
    assert abs(int(mask.sum()) - 20 * 5) <= 30 and mask[22, 20] and not mask[27, 20]  # borders within a pixel


def test_island_slide_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="too small"):
        make_island_slide(tmp_path / "x.tiff", [Path("t.jpg")], [Path("n.jpg")], size_px=(512, 512))
    with pytest.raises(InputError, match="tumour share"):
        make_island_slide(tmp_path / "x.tiff", [Path("t.jpg")], [Path("n.jpg")], tumour_share=1.5)


PCAM = Path(__file__).resolve().parent / "data" / "pcam"


def test_patch_mosaic_has_exact_patch_level_truth(tmp_path: Path) -> None:
    """Every 96 px tile of a patch mosaic is one labelled PCam patch; the truth marks exactly the tumour tiles."""
    import csv

    from wsi_il.measure.truth import truth_mask

    tumour, normal = labelled_patches(PCAM)
    made = make_patch_mosaic(
        tmp_path / "pcam.tiff", tumour, normal, cells=(12, 10), islands=2, seed=1, jpeg_quality=None
    )
    cells = list(csv.DictReader((tmp_path / "pcam.cells.csv").open()))
    assert len(cells) == made.tumour_cells + made.normal_cells and made.reused == 0
    assert made.tumour_cells > 0 and made.normal_cells > made.tumour_cells / 4
    boxes = np.array([[int(c[k]) for k in ("x", "y", "width", "height")] for c in cells])
    truth = truth_mask(boxes, made.slide.truth_path)
    assert truth.tolist() == [c["label"] == "tumor" for c in cells]  # exact, cell by cell
    assert all((PCAM / c["label"] / c["source"]).is_file() for c in cells)  # each from its own class
    assert len({c["source"] for c in cells}) == len(cells)  # drawn without replacement
    with openslide.OpenSlide(str(made.slide.path)) as slide:
        assert slide.dimensions == (12 * 96, 10 * 96)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(PCAM_MPP, rel=1e-3)
        first = cells[0]
        tile = _rgb(slide, (int(first["x"]), int(first["y"])), (96, 96)).astype(np.uint8)
    from PIL import Image

    source = np.asarray(Image.open(PCAM / first["label"] / first["source"]).convert("RGB"))
    variants = [np.rot90(source, k) for k in range(4)]
    variants += [v[:, ::-1] for v in variants]
    assert any(np.array_equal(tile, v) for v in variants)  # lossless: the patch itself, turned or flipped


def test_patch_mosaic_reuses_a_short_pool_and_refuses_bad_input(tmp_path: Path) -> None:
    tumour, normal = labelled_patches(PCAM)
    made = make_patch_mosaic(tmp_path / "short.tiff", tumour[:5], normal[:5], cells=(10, 10), seed=2)
    assert made.reused == made.tumour_cells + made.normal_cells - 10
    with pytest.raises(InputError, match="too small"):
        make_patch_mosaic(tmp_path / "x.tiff", tumour, normal, cells=(4, 20))
    with pytest.raises(InputError, match="no tumour or no normal"):
        make_patch_mosaic(tmp_path / "x.tiff", [], normal)
    with pytest.raises(InputError, match="tumor or"):
        labelled_patches(tmp_path)


def test_mosaic_command_writes_a_patch_mosaic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_il.measure.mosaic import main

    main([str(tmp_path / "m.tiff"), "--patches", str(PCAM), "--cells", "10x8", "--part", "2/2", "--seed", "5"])
    assert "tumour and" in capsys.readouterr().out and (tmp_path / "m.truth.geojson").is_file()
    sources = {row.split(",")[-1] for row in (tmp_path / "m.cells.csv").read_text().splitlines()[1:]}
    tumour, normal = labelled_patches(PCAM)
    assert sources <= {p.name for p in tumour[1::2] + normal[1::2]}  # part 2 of 2: every other file
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "x.tiff"), "--patches", str(PCAM), "--cells", "4x4"])
    assert exit_info.value.code == 3 and "too small" in capsys.readouterr().err
