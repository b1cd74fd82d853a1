"""Rounds prepared ahead: the next round computed while the expert still looks at the batch's last patch.

A round (``session.ingest``) depends only on the project's files and the batch's labels. So while one patch of
a batch is still unanswered, the review desk can run the very same ``ingest`` on a **shadow** of the project for
each likely answer to it, and when the expert's last answer matches one of them, put that round's files in
place instead of computing the round again.

- A shadow is a folder inside the project (``.ahead/<n>``, so that moving its files in is a rename on the same
  file system) holding hard links to every file of the project except the ledger, which is copied: ``ingest``
  appends to the ledger in place and replaces every other file whole (write, then rename), so nothing written
  in the shadow reaches the project's own files.
- ``commit`` checks, under the project's lock, that the project has not changed since the shadow was made (the
  ledger, the sessions, the model state and the manifest as they were), appends the shadow's new ledger lines to
  the project's ledger (stamped with the time of the commit), then moves every file the round wrote or replaced
  into the project, the session files last: the order ``ingest`` writes in, so a commit cut short by a kill is
  finished by running the same ingest again, as an ingest cut short would be.
- The round is the one ``ingest`` computes for those labels on those files (the same code, seeded training),
  so a committed round is the round the expert would otherwise have waited for.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wsi_il.errors import WsiIlError
from wsi_il.events import SilentReporter
from wsi_il.project import Project, now_iso

AHEAD_DIR = ".ahead"
"""The project's folder of shadows (skipped by everything that walks the project)."""
_numbers = itertools.count(1)


class Cancelled(Exception):
    """A prepared round was given up before it finished (its labels can no longer be the batch's)."""


class _CancellableReporter(SilentReporter):
    """A silent reporter whose progress calls raise ``Cancelled`` once ``cancel`` is set: the training stops at
    its next epoch and the pass at its next chunk."""

    def __init__(self, cancel: threading.Event) -> None:
        super().__init__()
        self.cancel = cancel

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        self._check()

        def advance(amount: int) -> None:
            self._check()

        return advance

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()


def fingerprint(project: Project) -> str:
    """A digest of what a round reads that another command may change: the ledger, the sessions, the model state
    and the manifest. Equal digests: a round computed on one is the round of the other."""
    digest = hashlib.sha256()
    paths = [project.ledger_path(), project.state_path(), project.manifest_path()]
    sessions = project.root / "sessions"
    if sessions.is_dir():
        paths += sorted(sessions.glob("s*.json"))
    for path in paths:
        digest.update(str(path.relative_to(project.root)).encode())
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            digest.update(b"\0missing")
    return digest.hexdigest()


@dataclass
class Prepared:
    """A round computed on a shadow: the labels it was computed for, and what the ingest said."""

    batch_id: str
    labels: dict[str, str]
    fingerprint: str
    shadow: Path
    message: str
    next_batch: str | None
    seconds: float
    pass_model: str | None = None
    """The model whose full pass is left to run after the commit (a pooled round's)."""


def make_shadow(project: Project) -> Path:
    """A shadow of the project: hard links to its files, a copy of its ledger. Nothing in the shadow is the
    lock: commands on the shadow never wait for the project's. A full pass's folder (``pass/``: its lock and
    arrays not entered yet) stays out too: a commit must never move them back."""
    shadow = project.root / AHEAD_DIR / f"{os.getpid()}-{next(_numbers)}"
    shutil.rmtree(shadow, ignore_errors=True)
    lock = project.lock_path().name
    for folder, dirs, files in os.walk(project.root):
        here = Path(folder)
        if here == project.root:
            dirs[:] = [d for d in dirs if d not in (AHEAD_DIR, project.pass_dir().name)]
        target = shadow / here.relative_to(project.root)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            source = here / name
            if source == project.ledger_path():
                shutil.copy2(source, target / name)
            elif not (here == project.root and name == lock) and not name.endswith((".tmp", ".claim")):
                os.link(source, target / name)
    return shadow


def prepare(
    project: Project, batch_id: str, labels: dict[str, str], device: str, cancel: threading.Event | None = None
) -> Prepared:
    """Run the ingest of batch ``batch_id`` with ``labels`` ({patch id: label}) on a shadow of the project; the
    project itself is not written. Raises ``Cancelled`` when ``cancel`` is set before it ends, and what
    ``ingest`` raises (the shadow is then removed)."""
    from wsi_il.answers import write_answers
    from wsi_il.batch import LABELS_CSV, read_batch
    from wsi_il.model import open_context
    from wsi_il.session import ingest

    started = time.perf_counter()
    before = fingerprint(project)
    shadow = make_shadow(project)
    try:
        copy = Project(shadow)
        folder = copy.batch_dir(batch_id)
        info, patches = read_batch(folder)
        labels_file = folder / LABELS_CSV  # replaced whole (a new file), so the project's own stays as it is
        write_answers(folder, info, patches, {p.patch_id: labels.get(p.patch_id, "") for p in patches})
        ctx = open_context(copy, device, _CancellableReporter(cancel or threading.Event()))
        result = ingest(ctx, labels_file, pass_later=True)
    except BaseException:
        shutil.rmtree(shadow, ignore_errors=True)
        raise
    return Prepared(
        batch_id,
        dict(labels),
        before,
        shadow,
        result.message,
        result.batch_dir.name if result.batch_dir is not None else None,
        time.perf_counter() - started,
        result.pass_model,
    )


class Stale(WsiIlError):
    """The project changed after the round was prepared: it must be computed again."""


def commit(project: Project, prepared: Prepared) -> None:
    """Put a prepared round's files in place (the caller holds the project's lock); raises ``Stale`` when the
    project changed since the round was prepared. The shadow is removed afterwards."""
    if fingerprint(project) != prepared.fingerprint:
        discard(prepared)
        raise Stale("the project changed while the round was prepared", "the round is computed again")
    shadow = Project(prepared.shadow)
    own = project.read_ledger()
    added = shadow.read_ledger()[len(own) :]
    when = now_iso()
    if added:
        project.append_ledger([{**entry, "time": when} for entry in added])
    later: list[tuple[Path, Path]] = []
    skip = {shadow.ledger_path(), shadow.batch_dir(prepared.batch_id) / "labels.csv"}
    for folder, _, files in os.walk(prepared.shadow):
        for name in files:
            source = Path(folder, name)
            target = project.root / source.relative_to(prepared.shadow)
            if source in skip or _same_file(source, target):
                continue
            if source.parent.name == "sessions":
                later.append((source, target))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    for source, target in later:  # the session files last, as ingest writes them
        os.replace(source, target)
    discard(prepared)


def _same_file(source: Path, target: Path) -> bool:
    try:
        return os.path.samefile(source, target)
    except FileNotFoundError:
        return False


def discard(prepared: Prepared | None) -> None:
    """Remove a prepared round's shadow."""
    if prepared is not None:
        shutil.rmtree(prepared.shadow, ignore_errors=True)


def clear(project: Project, own: bool = False) -> None:
    """Remove the shadows left by processes that are no longer running (``own``: this process's too)."""
    folder = project.root / AHEAD_DIR
    if not folder.is_dir():
        return
    for shadow in folder.iterdir():
        pid = int(shadow.name.split("-")[0]) if shadow.name.split("-")[0].isdigit() else 0
        if (own and pid == os.getpid()) or not _running(pid):
            shutil.rmtree(shadow, ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def likely_answers(classes: list[str], query_label: str, suggestion: str | None, limit: int = 2) -> list[str]:
    """The answers to prepare a round for, likeliest first: the model's suggestion, then the query's class, then
    the other classes (at most ``limit``)."""
    ordered = [suggestion, query_label, *classes]
    return list(dict.fromkeys(a for a in ordered if a))[:limit]


def labels_key(labels: dict[str, str]) -> str:
    """A stable key of a label set."""
    return json.dumps(sorted(labels.items()))


class Preparer:
    """Prepares rounds in one background thread for the label sets last asked for (``want``), likeliest first, and
    hands over the one that matches the labels submitted (``take``)."""

    def __init__(self, project: Project, device: str) -> None:
        self.project, self.device = project, device
        self._cond = threading.Condition()
        self._wanted: list[tuple[str, str, dict[str, str]]] = []  # (key, batch id, labels)
        self._done: dict[str, Prepared] = {}
        self._failed: set[str] = set()
        self._running: tuple[str, threading.Event] | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.prepared_rounds = 0
        """Rounds this preparer has finished (the page's status shows it)."""

    def state(self) -> dict[str, int | bool]:
        """Whether a round is being prepared, and how many are ready."""
        with self._cond:
            return {"preparing": self._running is not None or self._next() is not None, "ready": len(self._done)}

    def want(self, batch_id: str, label_sets: list[dict[str, str]]) -> None:
        """Prepare these label sets of a batch (likeliest first) and nothing else: a round being prepared for
        another set is cancelled, a finished one discarded."""
        with self._cond:
            if self._closed:
                return
            self._wanted = [(_key(batch_id, labels), batch_id, dict(labels)) for labels in label_sets]
            self._drop_unwanted()
            if self._thread is None and self._wanted:
                self._thread = threading.Thread(target=self._work, name="wsi-il-ahead", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, batch_id: str, labels: dict[str, str]) -> Prepared | None:
        """The round prepared for exactly these labels (waiting for it when it is being prepared), or None; every
        other prepared round is given up."""
        key = _key(batch_id, labels)
        with self._cond:
            while self._running is not None and self._running[0] == key:
                self._cond.wait()
            prepared = self._done.pop(key, None)
            self._wanted = []
            self._drop_unwanted()
            return prepared

    def close(self) -> None:
        """Stop preparing (the round under way stops at its next epoch or chunk) and remove every shadow."""
        with self._cond:
            self._closed = True
            self._wanted = []
            self._drop_unwanted()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        clear(self.project, own=True)

    def _drop_unwanted(self) -> None:
        keys = {key for key, _, _ in self._wanted}
        if self._running is not None and self._running[0] not in keys:
            self._running[1].set()
        for key in [k for k in self._done if k not in keys]:
            discard(self._done.pop(key))
        self._failed &= keys

    def _next(self) -> tuple[str, str, dict[str, str]] | None:
        return next((w for w in self._wanted if w[0] not in self._done and w[0] not in self._failed), None)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._next() is None:
                    self._cond.wait()
                if self._closed:
                    self._thread = None
                    return
                key, batch_id, labels = self._next()
                cancel = threading.Event()
                self._running = (key, cancel)
            prepared = None
            try:
                prepared = prepare(self.project, batch_id, labels, self.device, cancel)
            except Cancelled:
                pass
            except Exception:
                with self._cond:
                    self._failed.add(key)
            with self._cond:
                self._running = None
                if prepared is not None:
                    if any(key == k for k, _, _ in self._wanted) and not self._closed:
                        self._done[key] = prepared
                        self.prepared_rounds += 1
                    else:
                        discard(prepared)
                self._cond.notify_all()


def _key(batch_id: str, labels: dict[str, str]) -> str:
    return batch_id + "\n" + labels_key(labels)
