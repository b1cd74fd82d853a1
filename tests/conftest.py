"""Shared fixtures: real data from ../shared/data and small generated slides built from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_IL_DATA") or REPO.parent / "shared" / "data")
"""The real data (WSI_IL_DATA names it where ../shared is not beside the checkout, e.g. on a GPU machine)."""
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def block_slide(shared_data, tmp_path_factory):
    """A 2048 x 1536 pyramidal TIFF of real breast tissue with a known tumour block (BACH fields)."""
    from wsi_il.mosaic import bach_images, make_block_slide

    try:
        tumour, normal = bach_images(shared_data)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("slides")
    return make_block_slide(folder / "block.tiff", tumour, normal, size_px=(2048, 1536), seed=1)


@pytest.fixture(scope="session")
def second_block_slide(shared_data, tmp_path_factory):
    """Another slide of the same kind, with its tumour block elsewhere."""
    from wsi_il.mosaic import bach_images, make_block_slide

    tumour, normal = bach_images(shared_data)
    folder = tmp_path_factory.mktemp("slides2")
    return make_block_slide(folder / "other.tiff", tumour, normal, size_px=(2048, 1536),
                            block=(1024, 512, 1792, 1024), seed=2)


@pytest.fixture(scope="session")
def example_slide() -> Path:
    return EXAMPLES / "CMU-1-Small-Region.svs"


@pytest.fixture()
def patch_folder(shared_data, tmp_path) -> Path:
    """LC25000 lung tiles in class subfolders (a few per class), copied so tests may add files."""
    source = shared_data / "lc25000-lung-224-dedup"
    if not source.is_dir():
        pytest.skip("LC25000 sample not found")
    target = tmp_path / "lung"
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        (target / cls).mkdir(parents=True)
        for image in sorted((source / cls).glob("*.jpeg"))[:12]:
            shutil.copy(image, target / cls / image.name)
    return target


QUPATH_CHECK = REPO.parent / "shared" / "tools" / "qupath-check" / "check.sh"


def _python_qupath_rules(path: Path) -> None:
    """QUPATH.md's rules, checked in Python (always run, with or without Java)."""
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
    """Return a checker: QUPATH.md's rules in Python, plus QuPath's own libraries when Java is there."""
    import subprocess

    use_java = shutil.which("java") is not None and QUPATH_CHECK.is_file()

    def check(*paths: Path) -> None:
        for path in paths:
            _python_qupath_rules(Path(path))
        if use_java:
            result = subprocess.run(["bash", str(QUPATH_CHECK), *map(str, paths)], capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, result.stdout + result.stderr

    return check
