"""The frozen stem's output of every patch, cached on disk for the fast schedule's rounds.

With ``TrainSettings.fast_frozen_conv1`` the trained block's first convolution (and its BatchNorm and ReLU,
``heads.block_stem``) keeps its starting weights in every round, so its output for a patch never changes.
The first round's pass over the database writes it here; later rounds read it and run only the rest of the
block (``heads.block_tail``): half the arithmetic of re-embedding.

One float16 array in ``state/`` laid out as the feature store (a patch's stem output has the shape of its
features), plus a key: the stem's weights and the identity of every features file. A change of either (new
weights, ``reextract``, ``add-slide``) makes the cache stale and the next pass rebuilds it. The array is
written under a temporary name with positioned writes (as the features: a writable memory map would keep every
page in memory, and a full disk would kill the process instead of raising an error) and renamed when complete,
so a killed pass leaves no half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.database import RowWriter
from wsi_il.errors import ProjectStateError
from wsi_il.fsutil import atomic_write_text, fsync_dir
from wsi_il.project import Project

STEM_KEYS = ("conv1.", "bn1.")
"""The block's stem: its parameters and buffers start with these (``heads.block_stem``)."""


def stem_key(classifier_state: dict[str, Any], project: Project, manifest: dict[str, Any]) -> str:
    """A digest of the stem's weights and of the feature files the cache is computed from."""
    digest = hashlib.sha256()
    for name in sorted(classifier_state):
        local = name.removeprefix("block.")
        if name.startswith("block.") and local.startswith(STEM_KEYS):
            tensor = classifier_state[name].detach().cpu()
            digest.update(f"{local}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(np.ascontiguousarray(tensor.float().numpy()).tobytes())
    add_feature_files(digest, project, manifest)
    return digest.hexdigest()


def add_feature_files(digest, project: Project, manifest: dict[str, Any]) -> None:
    """Feed ``digest`` what identifies the project's feature files as they are now (per slide: its patches, and
    the file's inode, size and modification time), so that a cache keyed by it is dropped when they change."""
    for slide in project.slides(manifest):
        path = project.features_path(slide.id)
        if slide.tiled and slide.n_patches > 0 and path.is_file():
            stat = path.stat()
            digest.update(f"{slide.id}:{slide.n_patches}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}".encode())


class ProjectStems:
    """The stem cache of a project for one key (``heads.StemCache``): read when complete, else written."""

    def __init__(self, project: Project, key: str, n: int, shape: tuple[int, ...]) -> None:
        self.path, self.meta_path = project.stems_path(), project.stems_meta_path()
        self.key, self.n, self.shape = key, n, shape
        self.rows: np.ndarray | None = None
        self.writer: RowWriter | None = None
        try:
            meta = project.read_json(self.meta_path, default={})
        except ProjectStateError:  # a damaged key: the cache is rebuilt, nothing is lost
            meta = {}
        if isinstance(meta, dict) and meta.get("key") == key and self.path.is_file():
            rows = np.load(self.path, mmap_mode="r", allow_pickle=False)
            if rows.shape == (n, *shape) and rows.dtype == np.float16:
                self.rows = rows

    @property
    def complete(self) -> bool:
        """Whether the cache holds every patch's stem output for this key."""
        return self.rows is not None

    def get(self, start: int, count: int) -> np.ndarray | None:
        return None if self.rows is None else np.asarray(self.rows[start : start + count])

    def put(self, start: int, rows: np.ndarray) -> None:
        if self.rows is not None:
            return
        if self.writer is None:
            self.meta_path.unlink(missing_ok=True)  # the old cache is stale from now on
            self.path.unlink(missing_ok=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = RowWriter(self._partial(), (self.n, *self.shape), np.float16, create=True)
        self.writer.write(start, rows, durable=False)

    def finish(self) -> None:
        """Make a cache written in this pass durable and current (call after the pass covered every patch)."""
        if self.writer is None:
            return
        self.writer.sync()
        self.writer.close()
        self.writer = None
        os.replace(self._partial(), self.path)
        fsync_dir(self.path.parent)
        atomic_write_text(self.meta_path, json.dumps({"key": self.key, "patches": self.n}) + "\n")
        self.rows = np.load(self.path, mmap_mode="r", allow_pickle=False)

    def _partial(self) -> Path:
        return self.path.with_name(f".{self.path.name}.partial")
