"""The on-disk project: the only module that names the project's files.

Layout::

    PROJECT/
      project.json                 manifest: settings, classes, slides, normalisation, weights
      lock                         held by the command that writes the project
      labels.jsonl                 the label ledger (append-only, one JSON object a line)
      slides/<id>/patches.npy      int64 (N, 4): x, y, width, height in level-0 px
      slides/<id>/tiling.json      tiling result: channel sums for the normalisation statistics
      slides/<id>/features.npy     float16 (N, 512, 7, 7), memory-mapped
      slides/<id>/progress.json    how many patches of features.npy are final
      slides/<id>/images.json      patch-folder databases: image paths and folder labels
      sessions/<sid>.json          one query session and its rounds
      sessions/<sid>.query.npy     the session's query features (float16)
      models/init.pt               the pretrained layer4[1] every round starts from
      models/<sid>-r<n>.pt         both heads after a round
      state/embeddings.npy         retrieval embeddings of every patch under the current model
      state/predictions.npy        classifier probabilities of every patch under the current model
      batches/<sid>-r<n>/          review batches
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il import __version__
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "project.json"


@dataclass(frozen=True)
class SlideRecord:
    """One slide (or patch-folder dataset) of the project, as stored in the manifest."""

    id: str
    kind: str  # "slide" or "patches"
    path: str
    width: int
    height: int
    mpp: float | None
    offset: tuple[float, float]
    n_patches: int
    tiled: bool
    extracted: bool


def now_iso() -> str:
    """Return the current UTC time as an ISO 8601 string."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Project:
    """A wsi-il project folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- paths -------------------------------------------------------------------------------
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def slide_dir(self, slide_id: str) -> Path:
        return self.root / "slides" / slide_id

    def patches_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "patches.npy"

    def tiling_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "tiling.json"

    def features_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "features.npy"

    def progress_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "progress.json"

    def images_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "images.json"

    def ledger_path(self) -> Path:
        return self.root / "labels.jsonl"

    def session_path(self, session_id: str) -> Path:
        return self.root / "sessions" / f"{session_id}.json"

    def query_features_path(self, session_id: str) -> Path:
        return self.root / "sessions" / f"{session_id}.query.npy"

    def init_model_path(self) -> Path:
        return self.root / "models" / "init.pt"

    def model_path(self, model_id: str) -> Path:
        return self.root / "models" / f"{model_id}.pt"

    def embeddings_path(self) -> Path:
        return self.root / "state" / "embeddings.npy"

    def predictions_path(self) -> Path:
        return self.root / "state" / "predictions.npy"

    def state_path(self) -> Path:
        return self.root / "state" / "state.json"

    def batch_dir(self, batch_id: str) -> Path:
        return self.root / "batches" / batch_id

    # ---- manifest ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path().is_file()

    def create(self, manifest: dict[str, Any]) -> None:
        """Create the folder and write its first manifest."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT_VERSION, "uid": uuid.uuid4().hex, "created": now_iso(),
                    "wsi_il_version": __version__, "slides": [], **manifest}
        self.write_manifest(manifest)

    def read_manifest(self) -> dict[str, Any]:
        """Read project.json, checking that this version of wsi-il can use it."""
        path = self.manifest_path()
        if not path.is_file():
            raise ProjectStateError(f"{self.root} is not a wsi-il project (no {MANIFEST})",
                                    f"create one with `wsi-il init {self.root} --slide SLIDE`")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProjectStateError(f"{path} cannot be read: {exc}",
                                    "restore it from a backup; the project cannot be used without it") from exc
        if manifest.get("format") != FORMAT_VERSION:
            raise ProjectStateError(
                f"{path} has format {manifest.get('format')!r}, this wsi-il reads format {FORMAT_VERSION}",
                "use the wsi-il version that made the project (see wsi_il_version in project.json)")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path(), json.dumps(manifest, indent=2) + "\n")

    def slides(self, manifest: dict[str, Any] | None = None) -> list[SlideRecord]:
        manifest = manifest if manifest is not None else self.read_manifest()
        return [SlideRecord(**{**s, "offset": tuple(s["offset"])}) for s in manifest["slides"]]

    # ---- small JSON and array files ----------------------------------------------------------
    def read_json(self, path: Path, default: Any = None) -> Any:
        if not path.is_file():
            return default
        return json.loads(path.read_text(encoding="utf-8"))

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def write_array(self, path: Path, array: np.ndarray) -> None:
        """Save a small array atomically as .npy."""
        import io

        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())

    def read_array(self, path: Path, mmap: bool = False) -> np.ndarray:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    # ---- label ledger ------------------------------------------------------------------------
    def read_ledger(self) -> list[dict[str, Any]]:
        """Read every complete entry of the label ledger (a torn last line is ignored)."""
        path = self.ledger_path()
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill mid-write: it was never acknowledged
        return entries

    def append_ledger(self, entries: list[dict[str, Any]]) -> None:
        """Append entries to the ledger and make them durable before returning."""
        path = self.ledger_path()
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
        with open(path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")  # close a line torn by an earlier kill
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    # ---- lock --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the project's write lock for the duration of a command."""
        path = self.root / "lock"
        self.root.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": now_iso()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._lock_is_stale(path):
                    raise ProjectStateError(self._lock_message(path),
                                            "wait for it to finish, or stop it first") from None
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(info, handle)
            break
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def _lock_message(self, path: Path) -> str:
        try:
            other = json.loads(path.read_text())
            return (f"{self.root} is in use by `wsi-il {other.get('command')}` (pid {other.get('pid')} "
                    f"on {other.get('host')}, since {other.get('since')})")
        except (OSError, ValueError):
            return f"{self.root} is in use by another wsi-il command (lock file {path})"

    @staticmethod
    def _lock_is_stale(path: Path) -> bool:
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            return True  # a lock file torn by a kill
        if other.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(other["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
        return False


def open_project(root: Path) -> tuple[Project, dict[str, Any]]:
    """Open an existing project and read its manifest."""
    project = Project(root)
    return project, project.read_manifest()


def safe_id(text: str) -> str:
    """Turn a file stem or folder name into a filename-safe id."""
    cleaned = "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-.")
    if not cleaned:
        raise InputError(f"cannot make an id from {text!r}", "rename the file")
    return cleaned[:60]
