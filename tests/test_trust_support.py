"""Helpers shared by the test_trust_* modules (no tests here): CLI runs, project snapshots, small inputs.

Projects are built once per test session (the block slide, 256 px tiles, random weights, 2 epochs) and
copied by each test that changes one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import shapely
import shapely.geometry
from typer.testing import CliRunner

from wsi_il.cli import app

runner = CliRunner()
CPU = ("--device", "cpu")
INIT = ("--tile-size", "256", "--weights", "random", "--epochs", "2", *CPU)
QUERY_BOX = (512, 512, 1024, 1024)  # inside the block slide's tumour
_BUILT: dict[str, Path] = {}


def cli(*args: object, code: int | None = 0):
    """Run the CLI in-process; check the exit code unless ``code`` is None."""
    result = runner.invoke(app, [str(a) for a in args])
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}: {result.output}"
    return result


def error_line(result) -> str:
    """Return the one line a refused command printed, checking that it is one line without a traceback."""
    text = result.output
    assert "Traceback" not in text, text
    lines = [
        line
        for line in text.strip().splitlines()
        if "RANDOMLY initialised" not in line and not line.startswith("warning: ")
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> SHA-256 of its bytes) and every folder."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root) + "/"] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def assert_unchanged(root: Path, before: dict[str, str]) -> None:
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the project changed: {changed[:10]}"


def copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_geojson(path: Path, geometries: list[Any], **properties: Any) -> Path:
    features = [
        {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(g) if not isinstance(g, dict) else g,
            "properties": {"objectType": "annotation", **properties},
        }
        for g in geometries
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_region(path: Path, x0: float, y0: float, x1: float, y1: float) -> Path:
    return write_geojson(path, [shapely.box(x0, y0, x1, y1)], name="query")


def rows(batch: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((batch / "labels.csv").read_text(encoding="utf-8"))))


def write_rows(path: Path, records: list[dict[str, str]], **fmt: Any) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator=fmt.pop("lineterminator", "\n"), **fmt)
    writer.writeheader()
    writer.writerows(records)
    path.write_bytes(buffer.getvalue().encode("utf-8"))
    return path


def fill(batch: Path, labels: list[str]) -> list[dict[str, str]]:
    """Fill a batch's labels.csv in row order; return the rows."""
    records = rows(batch)
    for record, label in zip(records, labels, strict=True):
        record["label"] = label
    write_rows(batch / "labels.csv", records)
    return records


def ledger(project: Path) -> list[dict[str, Any]]:
    from wsi_il.project import Project

    return Project(project).read_ledger()


def init_project(base: Path, slide: Path) -> Path:
    """An initialised project on ``slide`` (built once per test session; copy it before changing it)."""
    key = f"init:{slide}"
    if key not in _BUILT:
        project = base / "trust-init"
        cli("init", project, "--slide", slide, *INIT)
        _BUILT[key] = project
    return _BUILT[key]


def session_project(base: Path, slide: Path, truth: Path) -> Path:
    """The initialised project with session s1 (k 4, 3 rounds) whose batch s1-r1 is filled from the truth."""
    key = f"session:{slide}"
    if key not in _BUILT:
        from wsi_il.measure.truth import fill_labels_from_truth

        project = copy_project(init_project(base, slide), base / "trust-session")
        region = write_region(base / "trust-query.geojson", *QUERY_BOX)
        cli("query", project, "--region", region, "-k", "4", "--rounds", "3", *CPU)
        fill_labels_from_truth(project / "batches" / "s1-r1", truth)
        _BUILT[key] = project
    return _BUILT[key]


def ingested_project(base: Path, slide: Path, truth: Path) -> Path:
    """The session project after batch s1-r1 was ingested (a model exists)."""
    key = f"ingested:{slide}"
    if key not in _BUILT:
        project = copy_project(session_project(base, slide, truth), base / "trust-ingested")
        cli("ingest", project, project / "batches" / "s1-r1" / "labels.csv", *CPU)
        _BUILT[key] = project
    return _BUILT[key]


def wsi_il(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m wsi_il`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "wsi_il", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def record(case: str, message: str, unchanged: bool | str) -> None:
    """Print one row of the bad-input table (shown with `pytest -s`)."""
    shown = " ".join(message.split())
    print(f"TRUST-TABLE | {case} | {shown} | {'yes' if unchanged is True else unchanged or 'no'}")
