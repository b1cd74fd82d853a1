"""Safe on a shared server: no pickle is ever run, inputs name no paths, files follow the umask, inputs are bounded."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from test_trust_support import (
    CPU,
    INIT,
    QUERY_BOX,
    assert_unchanged,
    cli,
    copy_project,
    error_line,
    ingested_project,
    ledger,
    record,
    rows,
    session_project,
    snapshot,
    write_region,
    write_rows,
)

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_il"


def _calls(tree: ast.AST, module: str, function: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == function
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == module
    ]


def _keyword(call: ast.Call, name: str) -> object:
    return next(
        (k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), "missing"
    )


def test_no_code_path_can_unpickle():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            assert _keyword(call, "weights_only") is True, f"{path.name}:{call.lineno} torch.load without weights_only"
        for call in _calls(tree, "np", "load"):
            assert _keyword(call, "allow_pickle") in (False, "missing"), f"{path.name}:{call.lineno} allow_pickle"
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {"dill", "joblib", "cloudpickle", "shelve", "marshal"} & imported, path.name
        for call in _calls(tree, "pickle", "load") + _calls(tree, "pickle", "loads"):
            pytest.fail(f"{path.name}:{call.lineno} unpickles")


class _Payload:
    """Unpickling this would create the file ``target``: proof that a pickle ran."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture()
def trained(block_slide, tmp_path_factory, tmp_path) -> Path:
    base = ingested_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path)
    return copy_project(base, tmp_path / "p")


@pytest.mark.parametrize("name", ["s1-r1.pt", "init.pt"])
def test_a_pickle_planted_in_the_models_folder_is_refused_not_run(name, trained, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save(
        {"retrieval": _Payload(marker), "classifier": {}, "classes": ["Tumor", "Normal"]}, trained / "models" / name
    )
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    before = snapshot(trained)
    line = error_line(cli("query", trained, "--region", region, "--abandon", "-k", "2", *CPU, code=4))
    assert f"models/{name} holds pickled Python objects, not plain tensors: it was not loaded" in line, line
    assert not marker.exists(), "the planted pickle was executed"
    assert_unchanged(trained, before)
    record(f"a pickle planted as models/{name}", line, True)


def test_a_damaged_model_file_is_refused(trained, tmp_path):
    model = trained / "models" / "s1-r1.pt"
    model.write_bytes(model.read_bytes()[:1000])
    before = snapshot(trained)
    line = error_line(
        cli("query", trained, "--region", write_region(tmp_path / "q.geojson", *QUERY_BOX), "--abandon", *CPU, code=4)
    )
    assert "models/s1-r1.pt is damaged and was not loaded" in line, line
    assert_unchanged(trained, before)
    record("models/s1-r1.pt cut short", line, True)


def test_a_pickled_weights_file_is_refused_not_run(block_slide, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    line = error_line(cli("init", tmp_path / "p", "--slide", block_slide.path, "--weights", weights, *CPU, code=3))
    assert "holds pickled Python objects; only plain tensors are loaded" in line
    assert not marker.exists() and not (tmp_path / "p").exists()
    record("init --weights: a pickle with code", line, "yes (no project)")


def test_paths_in_a_labels_csv_are_never_used(block_slide, tmp_path_factory, tmp_path):
    project = copy_project(
        session_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path),
        tmp_path / "work" / "p",
    )
    outside = tmp_path / "work" / "secret.txt"
    outside.write_text("keep")
    batch = project / "batches" / "s1-r1"
    records = rows(batch)
    hostile = [
        dict(r, image="../../../secret.txt", slide="../../../etc", label=label)
        for r, label in zip(records, ["yes", "no", "no", "yes"], strict=True)
    ]
    write_rows(batch / "labels.csv", hostile)
    before = snapshot(tmp_path / "work")
    bad = [dict(hostile[0], patch_id="../../../secret.txt"), *hostile[1:]]
    write_rows(batch / "labels.csv", bad)
    line = error_line(cli("ingest", project, batch / "labels.csv", *CPU, code=3))
    assert "patch '../../../secret.txt' is not in batch s1-r1" in line
    record("ingest labels.csv with patch_id ../../../secret.txt", line, True)
    write_rows(batch / "labels.csv", hostile)
    assert_unchanged(tmp_path / "work", before)
    cli("ingest", project, batch / "labels.csv", *CPU)  # the image and slide columns are not read
    assert outside.read_text() == "keep" and len(ledger(project)) == 4
    assert not any(p.name == "secret.txt" for p in project.rglob("*"))


def test_object_names_in_a_qupath_export_are_never_used_as_paths(block_slide, tmp_path_factory, tmp_path):
    project = copy_project(
        session_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path), tmp_path / "p"
    )
    batch = project / "batches" / "s1-r1"
    data = json.loads((batch / "batch.geojson").read_text())
    for feature in data["features"]:
        feature["properties"]["classification"] = {"name": "Tumor", "color": [200, 0, 0]}
    data["features"].append(
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1, 1]},
            "properties": {"name": "../../../../tmp/evil", "objectType": "annotation"},
        }
    )
    (batch / "exported.geojson").write_text(json.dumps(data))
    cli("ingest", project, batch / "exported.geojson", *CPU)
    assert len(ledger(project)) == 4 and not Path("/tmp/evil").exists()


def test_inputs_read_whole_are_bounded(block_slide, tmp_path_factory, tmp_path):
    project = copy_project(
        session_project(tmp_path_factory.getbasetemp(), block_slide.path, block_slide.truth_path), tmp_path / "p"
    )
    batch = project / "batches" / "s1-r1"
    with open(batch / "labels.csv", "r+b") as handle:
        handle.truncate(65 * 2**20)  # sparse: a 65 MiB labels file
    before = snapshot(project)
    line = error_line(cli("ingest", project, batch / "labels.csv", *CPU, code=3))
    assert "labels.csv is 65.0 MiB, more than the 64.0 MiB a labels file may have" in line
    record("ingest a 65 MiB labels.csv", line, True)
    assert_unchanged(project, before)


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (only a few bytes of pixel data follow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)))
    return path


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((6000, 5000), "is 6000 x 5000 px, more than a query image may have (25 megapixels)"),
        ((60000, 40000), "is far too large for a query image"),  # a decompression bomb by Pillow's own limit
    ],
)
def test_a_huge_query_image_is_refused_before_it_is_decoded(size, expected, block_slide, tmp_path_factory, tmp_path):
    from test_trust_support import init_project

    project = copy_project(init_project(tmp_path_factory.getbasetemp(), block_slide.path), tmp_path / "p")
    image = _png_claiming(tmp_path / "whole-slide.png", *size)
    before = snapshot(project)
    line = error_line(cli("query", project, "--images", image, *CPU, code=3))
    assert expected in line, line
    assert_unchanged(project, before)
    record(f"query --images: a PNG of {size[0]} x {size[1]} px", line, True)


UMASK_SCRIPT = """
import os, sys
from pathlib import Path
from typer.testing import CliRunner
from wsi_il.cli import app
from wsi_il.measure.truth import fill_labels_from_truth

def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output

slide, truth, region = sys.argv[1:4]
for mask, folder in zip((0o077, 0o022), sys.argv[4:6]):
    os.umask(mask)
    project = Path(folder) / "p"
    run("init", project, "--slide", slide, *sys.argv[6:])
    run("query", project, "--region", region, "-k", "2", "--rounds", "2", "--device", "cpu")
    fill_labels_from_truth(project / "batches" / "s1-r1", Path(truth))
    run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")
    run("export", project, "--out", Path(folder) / "out" / "mask.geojson", "--detections")
"""


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [*folder.rglob("*")]}


def test_files_follow_the_users_umask(block_slide, tmp_path):
    region = write_region(tmp_path / "q.geojson", *QUERY_BOX)
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir(mode=0o755)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            UMASK_SCRIPT,
            str(block_slide.path),
            str(block_slide.truth_path),
            str(region),
            str(private),
            str(shared),
            *INIT,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    modes = _modes(private)
    assert len(modes) > 20 and any(name.endswith("features.npy") for name in modes)
    assert {name: oct(mode) for name, mode in modes.items() if mode & 0o077} == {}, "umask 077 not respected"
    modes = _modes(shared)
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o755 if (shared / name).is_dir() else 0o644)}
    assert wrong == {}, "umask 022: every file 644, every folder 755 (none world-writable, none made private)"
    assert not os.path.exists(shared / "p" / "lock")
