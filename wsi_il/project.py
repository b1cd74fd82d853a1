"""The on-disk project: the only module that names the project's files.

Layout::

    PROJECT/
      project.json                 manifest: settings, classes, slides, normalisation, weights, and the
                                   provenance of the features (package versions, settings as recorded)
      lock                         held by the command that writes the project (pid, host, command)
      labels.jsonl                 the label ledger (append-only, fsync'ed, one JSON object a line)
      slides/<id>/patches.npy      int64 (N, 4): x, y, width, height in level-0 px
      slides/<id>/candidates.npy   int64 (M, 2): grid tiles inside the thumbnail tissue mask (slides)
      slides/<id>/tissue.npy       uint8 (M,): the pixel rule's verdict on each candidate (0 unread, 1 kept, 2 dropped)
      slides/<id>/tiling.json      channel sums for the normalisation statistics (patch folders, older slides)
      slides/<id>/features.npy     float16 (N, 512, 7, 7), memory-mapped ((N, 256, 14, 14) with --trainable layer4);
                                   while a slide is read it has M rows, the first ones the kept tiles' features
      slides/<id>/progress.json    how many candidates (patches, for reextract) are done
      slides/<id>/images.json      patch-folder databases: image paths and folder labels
      slides/<id>/features.next.npy  features under new weights while `reextract` runs
      pretrain/                    self-supervised pretraining: its own lock, checkpoint, weights, and the features
                                   staged under the new weights until the switch (``pretrain/staged/``)
      pass/                        a pooled round's full pass outside the project lock: its own lock and its
                                   arrays (``<model>.embeddings.npy``, ``<model>.predictions.npy``) until entered
      pass/attempts/<attempt>/     on a cluster, one worker's try at a slide's rows of the pass (``<model>.<slide>.
                                   <random>``: embeddings.npy, predictions.npy, stems.npy, progress.json,
                                   worker.json), read back into the pass when whole, removed either way
      sessions/<sid>.json          one query session and its rounds
      sessions/<sid>.query.npy     the session's query features (float16)
      models/init.pt               the pretrained layer4[1] every round starts from (--trainable layer4: all of layer4)
      models/<sid>-r<n>.pt         both heads after a round
      state/embeddings.npy         retrieval embeddings of every patch under the current model
      state/predictions.npy        classifier probabilities of every patch under the current model
      batches/<sid>-r<n>/          review batches
      incoming/<attempt>/          a cluster worker's attempt at a slide (``slides/<id>/`` as above, and
                                   attempt.json), moved into slides/ when whole, removed when it fails
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il import __version__
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir

FORMAT_VERSION = 1
MANIFEST = "project.json"
_LEDGER_KEYS = ("patch_id", "label", "batch")


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
    precision: str | None = None
    """What the trunk computed in: 'bf16' or 'fp32' (None: not recorded, before wsi-il 0.2)."""
    mpp_given: bool = False
    """True when ``mpp`` came from ``--slide-mpp`` (the slide records none)."""


def features_pending(slide: dict[str, Any]) -> bool:
    """True while a manifest slide entry's features are not all cached (not tiled yet, or tiled, not extracted)."""
    return not slide["extracted"] and (slide["n_patches"] > 0 or not slide["tiled"])


def now_iso() -> str:
    """Return the current UTC time as an ISO 8601 string."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- versions and settings that made the features ----------------------------------------------
_REQUIRED_KEYS = frozenset({"format", "uid", "classes", "slides", "tiling", "features", "train"})
_PROTECTED = ("classes", "tiling", "features")
"""Manifest sections the cached features, patches and models depend on: never changed once recorded."""
_VERSIONED = ("torch", "torchvision", "numpy", "openslide-python", "openslide-bin", "pillow")
_FEATURE_VERSIONS = ("torch", "torchvision", "openslide-bin")
"""Packages whose version can change the features (numerics, image decoding): a difference is warned about."""


def current_versions() -> dict[str, str | None]:
    """Return the versions of wsi-il, Python and the packages that compute features (without importing them)."""
    import platform
    from importlib import metadata

    versions: dict[str, str | None] = {"wsi-il": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _settings_snapshot(manifest: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({key: manifest.get(key) for key in _PROTECTED}))


def _stamp_provenance(manifest: dict[str, Any]) -> None:
    """Record the protected settings, and the package versions whenever the feature settings change.

    Only wsi-il writes the manifest, after checking it (``check_settings``), so the record is what the
    features, patches and models were made with; a later hand edit of project.json shows up as a difference.
    """
    snapshot = _settings_snapshot(manifest)
    record = manifest.get("provenance")
    if isinstance(record, dict) and record.get("settings") == snapshot:
        return
    if not isinstance(record, dict) or record.get("settings", {}).get("features") != snapshot["features"]:
        legacy = record is None and manifest.get("normalisation") is not None  # made before versions were kept
        record = {"versions": None if legacy else current_versions(), "since": now_iso()}
    manifest["provenance"] = {**record, "settings": snapshot}


def _major(version: Any) -> str | None:
    return str(version).split(".")[0] if version else None


def _check_format(path: Path, manifest: dict[str, Any]) -> None:
    made_with = manifest.get("wsi_il_version")
    fmt = manifest.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT_VERSION:
        raise ProjectStateError(
            f"{path} was written by a newer wsi-il ({made_with}, project format {fmt}); this is wsi-il "
            f"{__version__}, which reads format {FORMAT_VERSION}",
            f"upgrade wsi-il to {made_with} or later (pip install -U wsi-il)",
        )
    if fmt != FORMAT_VERSION:
        raise ProjectStateError(
            f"{path} has project format {fmt!r}; this wsi-il {__version__} reads format {FORMAT_VERSION}",
            f"use the wsi-il version that made the project ({made_with})",
        )
    if _major(made_with) != _major(__version__):
        raise ProjectStateError(
            f"{path} was made by wsi-il {made_with}, whose major version differs from this wsi-il {__version__}",
            f"use wsi-il {_major(made_with)}.x for this project (pip install 'wsi-il=={_major(made_with)}.*')",
        )


def check_settings(path: Path, manifest: dict[str, Any]) -> list[str]:
    """Refuse a manifest whose protected settings were edited; return warnings about other package versions."""
    record = manifest.get("provenance")
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return []
    changed = _differences(record["settings"], _settings_snapshot(manifest))
    if changed:
        raise ProjectStateError(
            f"{path} was edited after the features were made: {'; '.join(changed[:3])}"
            + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""),
            "restore the recorded values (provenance.settings in project.json); other settings need a new "
            "project (`wsi-il init`), other weights `wsi-il reextract`",
        )
    recorded = record.get("versions") or {}
    now = current_versions()
    differ = [
        f"{name} {recorded[name]} (now {now.get(name)})"
        for name in _FEATURE_VERSIONS
        if recorded.get(name) and now.get(name) and recorded[name] != now[name]
    ]
    if not differ:
        return []
    return [
        f"the project's features were computed with {', '.join(differ)}: features computed now (new "
        "slides, query images) may differ slightly from the cached ones; install the recorded versions "
        "to match them exactly"
    ]


def _differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        old, new = recorded.get(key), current.get(key)
        if old == new or (prefix == "features." and key == "weights" and _same_weights_file(recorded, current)):
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out.extend(_differences(old, new, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key} is {json.dumps(new)}, was {json.dumps(old)}")
    return out


def _same_weights_file(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """A weights file may move: the path may change while its recorded SHA-256 stays the same."""
    named = ("imagenet", "random")
    return (
        recorded.get("weights") not in named
        and current.get("weights") not in named
        and recorded.get("weights_sha256") is not None
        and recorded.get("weights_sha256") == current.get("weights_sha256")
    )


def current_labels(entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each patch's newest ledger entry (its label now: a correction is a newer entry), in the order the patches
    were first labelled."""
    newest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        newest[entry["patch_id"]] = entry
    return newest


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

    def candidates_path(self, slide_id: str) -> Path:
        """Grid tiles inside the thumbnail tissue mask, before the pixel rule (level-0 top-left corners)."""
        return self.slide_dir(slide_id) / "candidates.npy"

    def tissue_path(self, slide_id: str) -> Path:
        """The pixel rule's verdict on each candidate tile (0 not read yet, 1 tissue, 2 dropped)."""
        return self.slide_dir(slide_id) / "tissue.npy"

    def images_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "images.json"

    def next_features_path(self, slide_id: str) -> Path:
        """Features being computed with new weights (``wsi-il reextract``), swapped in when all are done."""
        return self.slide_dir(slide_id) / "features.next.npy"

    def next_progress_path(self, slide_id: str) -> Path:
        return self.slide_dir(slide_id) / "progress.next.json"

    def pretrain_dir(self) -> Path:
        return self.root / "pretrain"

    def staged_features_path(self, slide_id: str) -> Path:
        """Features computed with freshly pretrained weights outside the project lock, until the switch."""
        return self.pretrain_dir() / "staged" / f"{slide_id}.features.npy"

    def staged_progress_path(self, slide_id: str) -> Path:
        return self.pretrain_dir() / "staged" / f"{slide_id}.progress.json"

    def staged_info_path(self) -> Path:
        """What the staged features are: the feature settings they were computed for."""
        return self.pretrain_dir() / "staged" / "staged.json"

    def pass_dir(self) -> Path:
        """Where a full pass run outside the project lock keeps its lock and its arrays until they are entered."""
        return self.root / "pass"

    def pass_arrays(self, model_id: str) -> tuple[Path, Path]:
        """The embeddings and predictions a full pass computed with model ``model_id``, before they are entered."""
        return self.pass_dir() / f"{model_id}.embeddings.npy", self.pass_dir() / f"{model_id}.predictions.npy"

    def pass_attempts_dir(self) -> Path:
        """Where cluster workers write their slides' rows of a full pass, one folder an attempt."""
        return self.pass_dir() / "attempts"

    def pass_attempt_file(self, attempt: str, name: str) -> Path:
        """A file of one worker's attempt at a slide's rows of a full pass: ``embeddings.npy``,
        ``predictions.npy``, ``stems.npy`` (the frozen stem's output, when the pass fills that cache),
        ``progress.json`` (rows done) or ``worker.json`` (the process computing it)."""
        return self.pass_attempts_dir() / attempt / name

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

    def map_path(self) -> Path:
        """Every patch's class probabilities as shown and exported (``wsi_il.readout``)."""
        return self.root / "state" / "map.npy"

    def state_path(self) -> Path:
        return self.root / "state" / "state.json"

    def frozen_embeddings_path(self) -> Path:
        """Every patch's embedding under the pretrained block, float16: what a pooled round searches
        (``wsi_il.pool``)."""
        return self.root / "state" / "frozen.npy"

    def frozen_norms_path(self) -> Path:
        """The L2 norm of every patch's pooled output under the pretrained block, float32: the frozen embedding times
        it is that output (what the map's read-out fits, ``wsi_il.readout``)."""
        return self.root / "state" / "frozen_norms.npy"

    def frozen_meta_path(self) -> Path:
        return self.root / "state" / "frozen.json"

    def frozen_index_path(self) -> Path:
        """The approximate (IVF-PQ) index over the frozen embeddings of a large project (``wsi_il.index``)."""
        return self.root / "state" / "frozen.faiss"

    def stems_path(self) -> Path:
        """The frozen stem's output of every patch (``wsi_il.stems``): float16, shaped as the features."""
        return self.root / "state" / "stems.npy"

    def stems_meta_path(self) -> Path:
        return self.root / "state" / "stems.json"

    def batch_dir(self, batch_id: str) -> Path:
        return self.root / "batches" / batch_id

    def incoming_dir(self) -> Path:
        """Where cluster workers write the slides they compute, one folder an attempt, until each is entered."""
        return self.root / "incoming"

    def attempt_dir(self, attempt: str) -> Path:
        """One worker's attempt at a slide: laid out as a project (``slides/<id>/``), so extraction writes it as
        it writes the project."""
        return self.incoming_dir() / attempt

    def attempt_info_path(self) -> Path:
        """In an attempt's folder: which worker process computes it (host, pid, slide)."""
        return self.root / "attempt.json"

    # ---- manifest ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path().is_file()

    def create(self, manifest: dict[str, Any]) -> None:
        """Create the folder and write its first manifest (with the versions that will make the features)."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT_VERSION,
            "uid": uuid.uuid4().hex,
            "created": now_iso(),
            "wsi_il_version": __version__,
            "slides": [],
            **manifest,
        }
        self.write_manifest(manifest)

    def read_manifest(self) -> dict[str, Any]:
        """Read project.json, checking that this version of wsi-il can use it."""
        path = self.manifest_path()
        if not path.is_file():
            raise ProjectStateError(
                f"{self.root} is not a wsi-il project (no {MANIFEST})",
                f"create one with `wsi-il init {self.root} --slide SLIDE`",
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProjectStateError(
                f"{path} cannot be read: {exc}", "restore it from a backup; the project cannot be used without it"
            ) from exc
        if not isinstance(manifest, dict) or not _REQUIRED_KEYS <= set(manifest):
            raise ProjectStateError(
                f"{path} is not a wsi-il project manifest (keys missing)",
                "restore it from a backup; the project cannot be used without it",
            )
        _check_format(path, manifest)
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write project.json atomically, recording the settings the features are made with (see provenance)."""
        _stamp_provenance(manifest)
        atomic_write_text(self.manifest_path(), json.dumps(manifest, indent=2) + "\n")

    def slides(self, manifest: dict[str, Any] | None = None) -> list[SlideRecord]:
        manifest = manifest if manifest is not None else self.read_manifest()
        return [SlideRecord(**{**s, "offset": tuple(s["offset"])}) for s in manifest["slides"]]

    # ---- small JSON and array files ----------------------------------------------------------
    def read_json(self, path: Path, default: Any = None) -> Any:
        if not path.is_file():
            return default
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProjectStateError(
                f"{path} is damaged: {exc}",
                "restore it from a backup (wsi-il writes it whole, so something else changed it)",
            ) from exc

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
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill mid-write: it was never acknowledged
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in _LEDGER_KEYS):
                raise ProjectStateError(
                    f"{path} line {number} is not a label entry: {line[:80]!r}",
                    "restore labels.jsonl from a backup (wsi-il only ever appends to it)",
                )
            entries.append(entry)
        return entries

    def append_ledger(self, entries: list[dict[str, Any]]) -> None:
        """Append entries to the ledger and make them durable before returning."""
        path = self.ledger_path()
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
        new = not path.exists()
        with open(path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")  # close a line torn by an earlier kill
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            fsync_dir(path.parent)

    # ---- lock --------------------------------------------------------------------------------
    def lock_path(self) -> Path:
        return self.root / "lock"

    def pretrain_lock_path(self) -> Path:
        return self.pretrain_dir() / "lock"

    def pass_lock_path(self) -> Path:
        return self.pass_dir() / "lock"

    def _scope_dir(self, scope: str) -> Path:
        """The folder a lock scope guards: the project (less the other scopes' folders), ``pretrain/`` or ``pass/``."""
        folders = {"project": self.root, "pretrain": self.pretrain_dir(), "pass": self.pass_dir()}
        if scope not in folders:
            raise ValueError(f"unknown lock scope {scope!r}")
        return folders[scope]

    @contextlib.contextmanager
    def lock(self, command: str, create: bool = False, scope: str = "project") -> Iterator[None]:
        """Hold the project's write lock (or, with ``scope="pretrain"`` or ``"pass"``, pretraining's or the full
        pass's) for a command.

        The lock file names the holder (pid, host, command); it appears whole (written aside, then
        hard-linked into place), and a lock whose process is gone is taken over. ``create`` allows a
        project folder that does not exist yet (``init``). Leftover temporary files of killed commands
        are removed once the lock is held: the project lock's in the project less ``pretrain/`` and ``pass/``,
        the other scopes' in their own folder. Pretraining writes only under ``pretrain/`` and a full pass under
        ``pass/`` (until it enters its arrays under the project lock), so they run beside the commands that hold
        the project lock.
        """
        if not create and not self.root.is_dir():
            self.read_manifest()  # says that this is not a wsi-il project, and creates nothing
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self._scope_dir(scope)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "lock"
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": now_iso(),
            "started": _process_start(os.getpid()),
        }
        self._acquire(path, json.dumps(info).encode("utf-8"))
        try:
            self._remove_temporaries(folder)
            yield
        finally:
            if self._lock_is_ours(path, info):
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock_when_free(
        self,
        command: str,
        on_wait: Callable[[str], None],
        poll_s: float = 1.0,
        scope: str = "project",
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[None]:
        """Hold a lock as ``lock`` does, first waiting for the command that holds it (a round in progress) to
        end; ``on_wait`` gets the holder's description once, when there is one to wait for. ``stop`` is asked
        while waiting whether to give up: the wait then ends with the holder's ``ProjectStateError``."""
        import time

        waited = False
        while True:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(self.lock(command, scope=scope))
            except ProjectStateError as busy:
                if stop is not None and stop():
                    raise
                if not waited:
                    on_wait(busy.message)
                    waited = True
                time.sleep(poll_s)
                continue
            with stack:
                yield
            return

    def _acquire(self, path: Path, data: bytes) -> None:
        for _ in range(3):
            if _create_whole(path, data):
                return
            with _directory_guard(path.parent):  # one taker at a time decides that a lock is stale
                if not self._lock_is_stale(path):
                    raise ProjectStateError(self._lock_message(path), _LOCK_HINT)
                path.unlink(missing_ok=True)
        raise ProjectStateError(self._lock_message(path), _LOCK_HINT)

    def _lock_message(self, path: Path) -> str:
        try:
            other = json.loads(path.read_text())
            return (
                f"{self.root} is in use by `wsi-il {other.get('command')}` (pid {other.get('pid')} "
                f"on {other.get('host')}, since {other.get('since')})"
            )
        except (OSError, ValueError, AttributeError):
            return f"{self.root} is in use by another wsi-il command (lock file {path})"

    @staticmethod
    def _lock_is_ours(path: Path, info: dict[str, Any]) -> bool:
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(other, dict) and all(other.get(k) == info[k] for k in ("pid", "host", "started"))

    @staticmethod
    def _lock_is_stale(path: Path) -> bool:
        try:
            other = json.loads(path.read_text())
            pid, host = int(other["pid"]), other.get("host")
        except FileNotFoundError:
            return True  # released meanwhile
        except (OSError, ValueError, TypeError, KeyError):
            return True  # a lock file torn or damaged: no process can be named as its holder
        if host != socket.gethostname():
            return False  # another machine's process cannot be checked from here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, ValueError):
            return False
        started = other.get("started")
        now = _process_start(pid)
        return started is not None and now is not None and started != now  # the pid was reused

    def _remove_temporaries(self, top: Path) -> None:
        """Delete the temporary files that killed commands left (``.<name>.<random>.tmp``, lock claims) under
        ``top``; the project's own walk leaves ``pretrain/`` and ``pass/`` to their locks, and ``.ahead/`` (rounds
        the review desk prepares ahead, ``wsi_il.desk.ahead``) to the desk."""
        skip = {self.pretrain_dir(), self.pass_dir(), self.root / ".ahead"} if top == self.root else set()
        for folder, subfolders, files in os.walk(top):
            if skip and Path(folder) == self.root:
                subfolders[:] = [d for d in subfolders if self.root / d not in skip]
            for name in files:
                if (name.startswith(".") and name.endswith(".tmp")) or name.endswith(".claim"):
                    Path(folder, name).unlink(missing_ok=True)

    # ---- what a command created ------------------------------------------------------------------
    def remove_slide_files(self, slide_id: str) -> None:
        """Delete a slide's cached files (tiling, features): a slide whose adding failed."""
        import shutil

        shutil.rmtree(self.slide_dir(slide_id), ignore_errors=True)

    def entries(self) -> set[str] | None:
        """Return the names in the project folder (None when it does not exist)."""
        return set(os.listdir(self.root)) if self.root.is_dir() else None

    def remove_created(self, before: set[str] | None) -> None:
        """Remove what a failed first ``init`` created: the folder if it was new, else only the new entries."""
        import shutil

        if before is None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for name in sorted((self.entries() or set()) - before):
            target = self.root / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


_LOCK_HINT = "wait for it to finish, or stop it; a lock left by a command that was killed is taken over automatically"


def _create_whole(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; readers never see it empty."""
    claim = path.with_name(f"{path.name}-{os.getpid()}-{threading.get_ident()}.claim")  # threads claim apart
    try:
        claim.write_bytes(data)
        try:
            os.link(claim, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: create exclusively, then fill
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
    finally:
        claim.unlink(missing_ok=True)


@contextlib.contextmanager
def _directory_guard(folder: Path) -> Iterator[None]:
    """Serialise lock takeovers between processes (flock on the folder; released by the kernel on exit)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: go on unguarded
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _process_start(pid: int) -> int | None:
    """Return when a process started (clock ticks since boot, Linux), to tell a reused pid; else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


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
