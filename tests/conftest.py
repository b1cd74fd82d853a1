"""Shared fixtures: small slides and patch folders built from the real tissue in tests/data.

Every fixture here needs only the repository. ``shared_data`` is the one exception: tests that use it read
optional extra data from ../shared/data (or $WSI_IL_DATA) and carry the ``extra_data`` marker, which the default
run deselects (``pytest -m extra_data`` runs them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
PCAM = TEST_DATA / "pcam"
CRC = TEST_DATA / "crc"
SHARED_DATA = Path(os.environ.get("WSI_IL_DATA") or REPO.parent / "shared" / "data")
"""Optional extra data (WSI_IL_DATA names it where ../shared is not beside the checkout, e.g. on a GPU machine)."""
EXAMPLES = REPO / "examples"
CRC_CLASSES = ("lympho", "stroma", "tumor")
"""The classes of ``crc_patches``, in the order a project lists them (sorted folder names)."""
DENSE_WHITE_SHARE = 0.3
"""PCam patches with less than this share of near-white pixels count as dense tissue (about two in three)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The optional extra data (mark the test ``extra_data``: the default run must not need it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"optional extra data not found at {SHARED_DATA} (set $WSI_IL_DATA)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that reads the optional data without the ``extra_data`` marker (it would skip on a clone)."""
    unmarked = [
        item.nodeid
        for item in items
        if "shared_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("extra_data") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"mark these tests @pytest.mark.extra_data (they read {SHARED_DATA}): " + ", ".join(unmarked)
        )


def _white_share(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return float((rgb.min(axis=2) > 200).mean())


@pytest.fixture(scope="session")
def dense_pcam() -> tuple[list[Path], list[Path]]:
    """(tumour, normal) PCam patches of dense tissue: without the mostly white fat and background patches, so
    that every tile of a block slide's tissue is kept by the tissue filter, as in a section's dense part."""
    from wsi_il.measure.mosaic import labelled_patches

    tumour, normal = labelled_patches(PCAM)
    return (
        [p for p in tumour if _white_share(p) < DENSE_WHITE_SHARE],
        [p for p in normal if _white_share(p) < DENSE_WHITE_SHARE],
    )


def _block_slide(path: Path, dense_pcam, seed: int, block=None):
    from wsi_il.measure.mosaic import PCAM_MPP, make_block_slide

    tumour, normal = dense_pcam
    return make_block_slide(
        path, tumour, normal, size_px=(2048, 1536), block=block, mpp=PCAM_MPP, seed=seed, piece_px=96
    )


@pytest.fixture(scope="session")
def block_slide(dense_pcam, tmp_path_factory):
    """A 2048 x 1536 pyramidal TIFF of real lymph-node tissue (whole PCam patches, 96 px, at PCam's scale) in a
    white margin, with a tumour block (512, 512, 1280, 1024) of tumour patches; the rest of the tissue is
    normal patches. The block is aligned to 128 and 256 px tiles: such a tile is all tumour or all normal."""
    return _block_slide(tmp_path_factory.mktemp("slides") / "block.tiff", dense_pcam, seed=1)


@pytest.fixture(scope="session")
def second_block_slide(dense_pcam, tmp_path_factory):
    """Another slide of the same kind, with its tumour block elsewhere."""
    return _block_slide(
        tmp_path_factory.mktemp("slides2") / "other.tiff", dense_pcam, seed=2, block=(1024, 512, 1792, 1024)
    )


@pytest.fixture(scope="session")
def bench_slide(tmp_path_factory):
    """A PCam patch mosaic of 3456 x 3456 px with exact truth: about 125 tissue tiles of 256 px for ``bench``."""
    from wsi_il.measure.mosaic import labelled_patches, make_patch_mosaic

    tumour, normal = labelled_patches(PCAM)
    folder = tmp_path_factory.mktemp("bench-slide")
    return make_patch_mosaic(folder / "bench.tiff", tumour, normal, cells=(36, 36), islands=4, seed=6).slide


@pytest.fixture(scope="session")
def example_slide() -> Path:
    return EXAMPLES / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tissue_field(example_slide) -> np.ndarray:
    """A 1400 x 1300 px field (RGB, level 0) of the CC0 example slide, nearly all tissue."""
    import openslide

    with openslide.OpenSlide(str(example_slide)) as slide:
        return np.asarray(slide.read_region((500, 1500), 0, (1300, 1400)).convert("RGB"))


@pytest.fixture(scope="session")
def crc_patches(tmp_path_factory) -> Path:
    """A patch folder of real colorectal tissue in class subfolders ``CRC_CLASSES``, 16 images a class.

    Each tile of tests/data/crc is cut into its four quadrants: twelve images a class from the three Kather 2016
    tiles (75 px), then four from the NCT-CRC-HE-100K tile (112 px), in sorted file-name order. Shared by the
    session: copy what a test needs rather than adding files here.
    """
    import csv

    from PIL import Image

    target = tmp_path_factory.mktemp("crc") / "crc"
    with open(CRC / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        source = CRC / row["path"]
        folder = target / row["class"]
        folder.mkdir(parents=True, exist_ok=True)
        dataset = row["path"].split("/")[0]
        with Image.open(source) as image:
            rgb = image.convert("RGB")
        half_w, half_h = rgb.width // 2, rgb.height // 2
        for q, (x, y) in enumerate(((0, 0), (half_w, 0), (0, half_h), (half_w, half_h))):
            rgb.crop((x, y, x + half_w, y + half_h)).save(folder / f"{dataset}-{source.stem}-q{q}.png")
    return target


@pytest.fixture(scope="session")
def copy_crc(crc_patches):
    """Return ``copy(target, chosen)``: copy the ``chosen`` images (a slice of each class's sorted files) of
    ``crc_patches`` into class subfolders of ``target``, and return ``target``."""

    def copy(target: Path, chosen: slice = slice(None)) -> Path:
        for cls in CRC_CLASSES:
            (target / cls).mkdir(parents=True)
            for image in sorted((crc_patches / cls).glob("*.png"))[chosen]:
                shutil.copy(image, target / cls / image.name)
        return target

    return copy


QUPATH_CHECK = REPO / "tools" / "qupath-check" / "check.sh"
"""QuPath's own import rules (its JTS and Gson libraries), run where Java is installed."""


QUPATH_JARS = (Path("/usr/share/java/jts-core.jar"), Path("/usr/share/java/gson.jar"))
"""The checker's libraries (Debian's libjts-java and libgoogle-gson-java)."""


def qupath_checker_runs() -> bool:
    """Whether tools/qupath-check can run here: java, javac and QuPath's geometry and JSON libraries."""
    return all(shutil.which(tool) for tool in ("java", "javac")) and all(jar.is_file() for jar in QUPATH_JARS)


def _python_qupath_rules(path: Path) -> None:
    """docs/qupath.md's rules, checked in Python (always run, with or without Java)."""
    import json

    import shapely.geometry

    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and data["features"], path
    for feature in data["features"]:
        assert feature["type"] == "Feature" and "id" in feature
        props = feature["properties"]
        assert props["objectType"] in ("annotation", "detection", "tile")
        if "classification" in props:
            cls = props["classification"]
            assert isinstance(cls["name"], str) and len(cls["color"]) == 3, "classification without colour"
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid and not geometry.is_empty
        assert geometry.geom_type in ("Polygon", "MultiPolygon")
        coords = shapely.get_coordinates(geometry)
        assert (abs(coords * 100 - (coords * 100).round()) < 1e-6).all(), "coordinates not on a 0.01 px grid"


@pytest.fixture(scope="session")
def qupath_valid():
    """Return a checker: docs/qupath.md's rules in Python, plus QuPath's own libraries when Java is there."""
    import subprocess

    use_java = qupath_checker_runs()

    def check(*paths: Path) -> None:
        for path in paths:
            _python_qupath_rules(Path(path))
        if use_java:
            result = subprocess.run(
                ["bash", str(QUPATH_CHECK), *map(str, paths)], capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, result.stdout + result.stderr

    return check
