"""The search database's storage: the slides and patch folders a project registers, its patch table, and the
feature cache (one float16 file per slide, memory-mapped, written in place and durably).

Extraction, which fills the cache, is ``wsi_il.extraction``; spreading it over a cluster is ``wsi_il.cluster``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.config import settings_of
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.project import Project, SlideRecord, safe_id
from wsi_il.resolution import check_slide_mpp
from wsi_il.slide import read_info

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class PatchTable:
    """Every patch of the project in global order (slides in manifest order)."""

    slide_index: np.ndarray  # (N,) index into ``slides``
    boxes: np.ndarray  # (N, 4) x, y, width, height in level-0 px
    ids: list[str]
    slides: list[SlideRecord]

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self) -> dict[str, int]:
        return {pid: i for i, pid in enumerate(self.ids)}

    def of_slide(self, slide_id: str) -> np.ndarray:
        position = [s.id for s in self.slides].index(slide_id)
        return np.flatnonzero(self.slide_index == position)


# ---- registering ------------------------------------------------------------------------------
def _unique_id(stem: str, manifest: dict[str, Any]) -> str:
    base = safe_id(stem)
    taken = {s["id"] for s in manifest["slides"]}
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def slide_paths(files: list[Path], patterns: list[str], list_file: Path | None) -> list[Path]:
    """The slides a command is given, each once, in order: files, then glob patterns (expanded here, each
    sorted: ``'dir/*.svs'`` in quotes lists thousands of files that a shell could not pass), then a list file
    (one path a line; blank lines and lines starting with # are skipped; relative paths are from the list's
    folder)."""
    import glob

    found = [Path(f) for f in files]
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise InputError(f"--slides {pattern!r} matches no file", "check the pattern (quote it for the shell)")
        found.extend(Path(m) for m in matched)
    if list_file is not None:
        try:
            lines = Path(list_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(
                f"--slide-list {list_file} cannot be read: {exc}", "give a text file, a path a line"
            ) from exc
        base = Path(list_file).resolve().parent
        listed = [
            (n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.strip().startswith("#")
        ]
        missing = [
            f"line {n}: {base / Path(text).expanduser()}"
            for n, text in listed
            if not (base / Path(text).expanduser()).is_file()
        ]
        if missing:
            raise InputError(
                f"--slide-list {list_file} names {len(missing)} file(s) that do not exist ({'; '.join(missing[:3])}"
                + ("; ..." if len(missing) > 3 else "")
                + ")",
                "correct the list: one slide's path a line, relative paths from the list's folder",
            )
        found.extend(base / Path(text).expanduser() for _, text in listed)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def register_slide(manifest: dict[str, Any], path: Path, mpp: float | None = None) -> dict[str, Any]:
    """Add a slide to the manifest (not yet tiled); checks that OpenSlide can read it. ``mpp``: its pixel size where
    the slide records none (``--slide-mpp``); refused in a project that tiles at a physical resolution without
    it."""
    path = Path(path).resolve()
    if any(Path(s["path"]) == path for s in manifest["slides"]):
        raise InputError(f"{path} is already in the project", "each slide is added once")
    info = read_info(path)
    record = {
        "id": _unique_id(path.stem, manifest),
        "kind": "slide",
        "path": str(path),
        "width": info.width,
        "height": info.height,
        "mpp": info.mpp,
        "offset": list(info.offset),
        "n_patches": 0,
        "tiled": False,
        "extracted": False,
    }
    if mpp is not None and info.mpp is None:
        record.update(mpp=float(mpp), mpp_given=True)
    check_slide_mpp(record, settings_of(manifest).tiling)
    manifest["slides"].append(record)
    return record


def register_patch_folder(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Add a folder of patch images (optionally in class subfolders) as a database."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise InputError(f"patch folder {folder} does not exist or is not a folder", "check the path")
    record = {
        "id": _unique_id(folder.name, manifest),
        "kind": "patches",
        "path": str(folder),
        "width": 0,
        "height": 0,
        "mpp": None,
        "offset": [0.0, 0.0],
        "n_patches": 0,
        "tiled": False,
        "extracted": False,
    }
    manifest["slides"].append(record)
    return record


def folder_classes(folder: Path) -> list[str]:
    """Return the class subfolders of a patch folder that hold images (empty when unlabelled)."""
    return sorted(
        d.name
        for d in Path(folder).iterdir()
        if d.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.rglob("*"))
    )


# ---- the feature store --------------------------------------------------------------------------


def _npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype, int, int]:
    """Read a .npy header: (shape, fortran order, dtype, where the header text starts, where the data starts)."""
    version = np.lib.format.read_magic(handle)
    text_start = handle.tell() + (2 if version == (1, 0) else 4)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(handle)
    return tuple(shape), fortran, np.dtype(dtype), text_start, handle.tell()


def cut_rows(path: Path, rows: int) -> None:
    """Keep the first ``rows`` rows of a .npy file in place: rewrite its shape (same header length), truncate."""
    with open(path, "r+b") as handle:
        shape, fortran, dtype, text_start, offset = _npy_header(handle)
        if shape[0] != rows:
            text = repr(
                {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (rows, *shape[1:])}
            )
            handle.seek(text_start)
            handle.write(text.ljust(offset - text_start - 1).encode("latin1") + b"\n")
        handle.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        handle.flush()
        os.fsync(handle.fileno())


class Commits:
    """When extraction makes its progress durable (rows synced, then the count that covers them).

    After every batch, unless the last commit took more than a tenth of the time since it ended: a commit
    costs about 11 ms here (three syncs), more than a GPU computes a batch of 32, while a CPU batch takes
    ~0.4 s. So a run spends at most about a tenth of its time committing, and an interruption loses at most
    that much work (on a CPU, at most the batch in flight).
    """

    def __init__(self) -> None:
        self.ended = time.perf_counter()
        self.cost = 0.0

    def due(self) -> bool:
        return time.perf_counter() - self.ended >= 10 * self.cost

    def commit(self, make_durable: Callable[[], Any]) -> None:
        started = time.perf_counter()
        make_durable()
        self.ended = time.perf_counter()
        self.cost = self.ended - started


class RowWriter:
    """Writes rows of a .npy file in place and durably, without mapping it.

    A writable memory map would keep every written page resident in the process (its RSS would grow with the
    slide); positioned writes keep extraction's memory flat whatever the slide's size.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any, create: bool) -> None:
        if create:
            created = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # header + sparse body
            created.flush()
            del created
        with open(path, "rb") as handle:
            found_shape, _, found_dtype, _, self.offset = _npy_header(handle)
        if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
            raise ProjectStateError(
                f"{path} holds {found_shape} {found_dtype}, not {shape} {np.dtype(dtype)}",
                "delete it and run the command again to recompute it",
            )
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray, durable: bool = True) -> None:
        """Write rows from row ``start`` on, durable before returning unless ``durable`` is False (then
        ``sync`` makes them so)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        written = os.pwrite(self.fd, data, self.offset + start * self.row_bytes)
        if written != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        if durable:
            self.sync()

    def sync(self) -> None:
        """Make every row written so far durable."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def patch_table(project: Project, manifest: dict[str, Any]) -> PatchTable:
    """Load the patch coordinates and ids of every slide."""
    slides = project.slides(manifest)
    index, boxes, ids = [], [], []
    for position, record in enumerate(slides):
        if not record.tiled:
            continue
        slide_boxes = project.read_array(project.patches_path(record.id))
        boxes.append(slide_boxes)
        index.append(np.full(len(slide_boxes), position, dtype=np.int64))
        if record.kind == "patches":
            ids.extend(project.read_json(project.images_path(record.id))["ids"])
        else:
            ids.extend(f"{record.id}_x{x}_y{y}" for x, y in slide_boxes[:, :2].tolist())
    if not boxes:
        return PatchTable(np.zeros(0, np.int64), np.zeros((0, 4), np.int64), [], slides)
    return PatchTable(np.concatenate(index), np.concatenate(boxes), ids, slides)


class FeatureStore:
    """Read-only access to every patch's cached features, memory-mapped, in global order."""

    def __init__(self, project: Project, manifest: dict[str, Any]) -> None:
        self.parts = [
            np.load(project.features_path(s.id), mmap_mode="r")
            for s in project.slides(manifest)
            if s.tiled and s.n_patches > 0
        ]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = tuple(self.parts[0].shape[1:]) if self.parts else (512, 7, 7)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Return float16 features of the given global indices, in order."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.shape), dtype=np.float16)
        part = np.searchsorted(self.offsets, indices, side="right") - 1
        for p in np.unique(part):
            where = np.flatnonzero(part == p)
            local = indices[where] - self.offsets[p]
            order = np.argsort(local)
            out[where[order]] = self.parts[p][local[order]]
        return out

    def chunks(self, size: int):
        """Yield (start, float16 block) over all patches in global order."""
        for p, part in enumerate(self.parts):
            for start in range(0, len(part), size):
                yield int(self.offsets[p]) + start, np.asarray(part[start : start + size])
