"""The project records the versions and settings that made its features; other ones are refused or warned about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trust_support import (
    CPU,
    QUERY_BOX,
    assert_unchanged,
    cli,
    copy_project,
    error_line,
    init_project,
    record,
    snapshot,
    write_region,
)


@pytest.fixture()
def fresh(block_slide, tmp_path_factory, tmp_path) -> Path:
    return copy_project(init_project(tmp_path_factory.getbasetemp(), block_slide.path), tmp_path / "p")


def edit(project: Path, change) -> None:
    manifest = json.loads((project / "project.json").read_text())
    change(manifest)
    (project / "project.json").write_text(json.dumps(manifest, indent=2))


def test_versions_and_settings_are_recorded(fresh):
    import torch

    manifest = json.loads((fresh / "project.json").read_text())
    versions = manifest["provenance"]["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert {"wsi-il", "python", "torchvision", "numpy", "openslide-python", "openslide-bin"} <= set(versions)
    assert manifest["provenance"]["settings"] == {k: manifest[k] for k in ("classes", "tiling", "features")}
    assert json.loads(cli("status", fresh, "--json").stdout)["versions"] == versions


NEWER = {
    "a newer project format": (lambda m: m.update(format=2, wsi_il_version="0.9.0"), "was written by a newer wsi-il"),
    "another major version": (lambda m: m.update(wsi_il_version="1.2.0"), "whose major version differs"),
    "an unknown format": (lambda m: m.update(format="one"), "has project format 'one'"),
}


@pytest.mark.parametrize("case", list(NEWER))
def test_a_project_from_an_incompatible_wsi_il_is_refused_by_every_command(case, fresh, tmp_path):
    change, expected = NEWER[case]
    edit(fresh, change)
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    before = snapshot(fresh)
    for args in (
        ("status", fresh),
        ("init", fresh, *CPU),
        ("query", fresh, "--region", region, *CPU),
        ("export", fresh, "--out", tmp_path / "m.geojson"),
        ("add-slide", fresh, "--slide", region, *CPU),
    ):
        line = error_line(cli(*args, code=4))
        assert expected in line, line
    assert_unchanged(fresh, before)
    record(f"a project made by {case}", line, True)


EDITED = {
    "tile size": (lambda m: m["tiling"].update(tile_size_px=128), "tiling.tile_size_px is 128, was 256"),
    "weights": (lambda m: m["features"].update(weights="imagenet"), 'features.weights is "imagenet", was "random"'),
    "classes": (lambda m: m.update(classes=["Tumor", "Stroma"]), 'classes is ["Tumor", "Stroma"]'),
}


@pytest.mark.parametrize("case", list(EDITED))
def test_settings_edited_after_the_features_were_made_are_refused(case, fresh, tmp_path):
    change, expected = EDITED[case]
    edit(fresh, change)
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    before = snapshot(fresh)
    for args in (("init", fresh, *CPU), ("query", fresh, "--region", region, *CPU)):
        line = error_line(cli(*args, code=4))
        assert "was edited after the features were made" in line and expected in line, line
    assert_unchanged(fresh, before)
    record(f"project.json edited by hand: {case}", line, True)


def test_training_settings_may_be_edited(fresh, tmp_path):
    edit(fresh, lambda m: m["train"].update(epochs=1))
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    cli("query", fresh, "--region", region, "-k", "2", "--rounds", "1", *CPU)


def test_other_torch_versions_are_warned_about(fresh, tmp_path):
    edit(fresh, lambda m: m["provenance"]["versions"].update(torch="1.13.0", torchvision="0.14.0"))
    for args in (
        ("init", fresh, *CPU),
        (
            "query",
            fresh,
            "--region",
            write_region(tmp_path / "q.geojson", *QUERY_BOX),
            "-k",
            "2",
            "--rounds",
            "1",
            *CPU,
        ),
    ):
        output = " ".join(cli(*args).output.split())
        assert "warning: the project's features were computed with torch 1.13.0 (now " in output, output
        assert "torchvision 0.14.0" in output and "may differ slightly" in output


OPTIONS = {
    "--tile-size": (("--tile-size", "128"), "created with --tile-size 256, not --tile-size 128"),
    "--classes": (("--classes", "Tumor,Stroma"), "created with --classes Tumor,Normal, not --classes Tumor,Stroma"),
    "--weights": (("--weights", "imagenet"), "created with --weights random, not --weights imagenet"),
    "--epochs": (("--epochs", "7"), "created with --epochs 2, not --epochs 7"),
    "--no-refine-query and --lr": (
        ("--no-refine-query", "--lr", "0.001"),
        "created with --lr 0.0001, --refine-query, not --lr 0.001, --no-refine-query",
    ),
    "--schedule": (("--schedule", "paper"), "created with --schedule auto, not --schedule paper"),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_init_again_with_other_settings_is_refused(case, fresh, block_slide):
    options, expected = OPTIONS[case]
    before = snapshot(fresh)
    line = error_line(cli("init", fresh, "--slide", block_slide.path, *options, *CPU, code=4))
    assert expected in line and "without these options to resume" in line, line
    assert_unchanged(fresh, before)
    record(f"init again with {case}", line, True)


def test_init_again_with_the_recorded_settings_resumes(fresh, block_slide):
    before = snapshot(fresh)
    output = cli(
        "init",
        fresh,
        "--slide",
        block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--classes",
        "tumor, normal",
        "--epochs",
        "2",
        "--refine-query",
        *CPU,
    ).output
    assert "resuming" in output and "ready" in output
    assert_unchanged(fresh, before)
