"""What the review page can do, without HTTP: show a batch, record answers, submit, correct, find similar patches,
draw the slide's overlays, export and report status.

Files remain the contract. The desk holds no lock while idle: an answer is written into the batch's
``labels.csv`` when it is given (as an editor would save it, so ``wsi-il watch`` and ``status`` see it); a submit
runs ``session.ingest`` under the project's lock, as ``wsi-il ingest`` does; a correction appends to the ledger
under the lock through ``corrections.correct_labels``. Ids from the page (batch, patch, slide) are checked against
the project before anything is read; the page never names a file.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.answers import read_answers, write_answers
from wsi_il.batch import BATCH_JSON, LABELS_CSV, SKIP, read_batch, suggestion_is_uncertain
from wsi_il.config import settings_of
from wsi_il.desk.ahead import Preparer, Stale, commit, likely_answers
from wsi_il.desk.ahead import clear as clear_shadows
from wsi_il.desk.images import (
    BATCH_RGB,
    QUERY_RGB,
    SKIP_RGB,
    SlideImages,
    marks_overlay,
    probability_overlay,
)
from wsi_il.errors import InputError, ProjectStateError, WsiIlError
from wsi_il.events import SilentReporter
from wsi_il.project import Project

BATCH_ID = re.compile(r"^s[0-9]{1,6}-r[0-9]{1,6}$")
OVERLAYS = ("probability", "labelled", "query", "batch")
EXPORTS = "exports"
"""The folder of the project that the page's exports are written into."""
SIMILAR_MAX = 48


class NotFound(WsiIlError):
    """The page asked for a batch, patch, slide or file the project does not have."""

    exit_code = 3


@dataclass(frozen=True)
class _Table:
    """The project's patches as the desk needs them, reloaded when the manifest changes (``add-slide``)."""

    stamp: tuple[int, int]
    manifest: dict[str, Any]
    table: Any
    index: dict[str, int]


class Desk:
    """One project served to the page."""

    def __init__(
        self,
        root: Path,
        device: str,
        prepare_ahead: bool = True,
        cluster: str | None = None,
        cluster_device: str = "auto",
    ) -> None:
        self.project = Project(Path(root))
        self.project.read_manifest()  # says now, in one line, when this is not a project
        self.device = device
        self.cluster, self.cluster_device = cluster, cluster_device
        """Where a pooled round's full pass runs: ``--cluster`` (None: here) and the workers' ``--device``."""
        self.images = SlideImages(self.project)
        self._answers = threading.Lock()
        self._work = threading.Lock()  # one training at a time: the warm-up, a submit, an export
        self._tables = threading.Lock()
        self._table: _Table | None = None
        self.warmup: dict[str, Any] = {"state": "not started"}
        self.passing: dict[str, Any] = {"state": "none"}
        """The full pass a pooled round left to this desk (``fullpass.run_pass``, in a thread of its own)."""
        self._locking = threading.Lock()  # this process's turns at the project lock: a submit, the pass entering
        self._passes: list[threading.Thread] = []
        self._stop_passes = threading.Event()
        self._closed = False
        clear_shadows(self.project)  # rounds prepared ahead by a desk that was killed
        self.ahead = Preparer(self.project, device) if prepare_ahead else None

    def busy(self) -> bool:
        """Whether a training (the warm-up, a submit, an export) is under way."""
        return self._work.locked()

    def close(self) -> None:
        """Wait for the training under way, if any (a process must not end inside torch), then close the slides.
        A full pass under way stops at its next chunk, entering nothing: the next ingest of its batch redoes it."""
        if self.ahead is not None:
            self.ahead.close()
        self._stop_passes.set()
        for thread in self._passes:
            thread.join()
        with self._work:
            self._closed = True
            self.images.close()

    # ---- the project's patches ------------------------------------------------------------------
    def _patches(self) -> _Table:
        from wsi_il.database import patch_table

        stat = self.project.manifest_path().stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._tables:
            if self._table is None or self._table.stamp != stamp:
                manifest = self.project.read_manifest()
                table = patch_table(self.project, manifest)
                self._table = _Table(stamp, manifest, table, table.index_of())
            return self._table

    def _patch(self, patch_id: str) -> tuple[_Table, int]:
        known = self._patches()
        if patch_id not in known.index:
            raise NotFound(f"patch {patch_id[:80]!r} is not in {self.project.root}", "reload the page")
        return known, known.index[patch_id]

    def _slide(self, slide_id: str) -> Any:
        for slide in self._patches().table.slides:
            if slide.id == slide_id:
                return slide
        raise NotFound(f"slide {slide_id[:80]!r} is not in {self.project.root}", "reload the page")

    def _batch_dir(self, batch_id: str) -> Path:
        folder = self.project.batch_dir(batch_id) if BATCH_ID.match(batch_id) else None
        if folder is None or not (folder / BATCH_JSON).is_file():
            raise NotFound(f"batch {batch_id[:80]!r} is not in {self.project.root}", "reload the page")
        return folder

    # ---- overview -----------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """The project's classes, slides, the batch that waits for labels, and the warm-up's state."""
        from wsi_il.watch import waiting_batches

        known = self._patches()
        manifest = known.manifest
        waiting = waiting_batches(self.project)
        slides = [
            {"id": s.id, "kind": s.kind, "width": s.width, "height": s.height, "patches": s.n_patches}
            for s in known.table.slides
        ]
        return {
            "project": self.project.root.name,
            "classes": list(manifest["classes"]),
            "random_weights": settings_of(manifest).features.weights == "random",
            "slides": slides,
            "batch": waiting[0].batch_dir.name if waiting else None,
            "warmup": dict(self.warmup),
            "ahead": self.ahead_state(),
            "pass": dict(self.passing),
        }

    def ahead_state(self) -> dict[str, Any] | None:
        """Whether a round is being prepared ahead, and how many wait ready (None: not preparing ahead)."""
        return None if self.ahead is None else self.ahead.state()

    # ---- a batch --------------------------------------------------------------------------------
    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch's patches in the order shown (confident suggestions first), with the answers given so far."""
        folder = self._batch_dir(batch_id)
        info, patches = read_batch(folder)
        known = self._patches()
        error = None
        try:
            answers = read_answers(folder, info, patches)
        except WsiIlError as exc:  # e.g. a typo saved from a spreadsheet: the page says what ingest would say
            answers, error = {}, str(exc)
        slides = {s.id: s for s in known.table.slides}
        shown = []
        for n, patch in enumerate(patches, start=1):
            slide = slides.get(patch.slide)
            confident = patch.suggestion is not None and not suggestion_is_uncertain(patch.suggestion_probability)
            shown.append(
                {
                    "patch_id": patch.patch_id,
                    "n": n,
                    "slide": patch.slide,
                    "box": [patch.x, patch.y, patch.width, patch.height],
                    "slide_size": [slide.width, slide.height] if slide else None,
                    "has_slide": bool(slide and slide.kind == "slide"),
                    "suggestion": patch.suggestion,
                    "probability": patch.suggestion_probability,
                    "confident": confident,
                    "label": answers.get(patch.patch_id),
                }
            )
        shown.sort(key=lambda p: (not p["confident"], p["n"]))
        return {
            "batch": info.batch_id,
            "session": info.session,
            "round": info.round,
            "rounds": info.rounds,
            "query_label": info.query_label,
            "classes": list(info.classes),
            "strategy": info.strategy,
            "ingested": self._ingested(info),
            "patches": shown,
            "error": error,
        }

    def _ingested(self, info: Any) -> bool:
        session = self.project.read_json(self.project.session_path(info.session)) or {}
        history = session.get("history", [])
        return len(history) >= info.round and bool(history[info.round - 1].get("ingested"))

    def answer(self, batch_id: str, answers: list[tuple[str, str]]) -> dict[str, str]:
        """Write answers ({patch id, label as typed; "" clears}) into the batch's labels.csv; returns the labels
        filled in now. Refused for a batch already ingested (its labels are changed by corrections)."""
        folder = self._batch_dir(batch_id)
        info, patches = read_batch(folder)
        in_batch = {p.patch_id for p in patches}
        for patch_id, _ in answers:
            if patch_id not in in_batch:
                raise NotFound(f"patch {patch_id[:80]!r} is not in batch {batch_id}", "reload the page")
        with self._answers:
            if self._ingested(info):
                raise ProjectStateError(
                    f"batch {batch_id} was already ingested",
                    "change its labels as corrections: click the patch on the slide view",
                )
            write_answers(folder, info, patches, dict(answers))
            now = read_answers(folder, info, patches)
            self._prepare_ahead(info, patches, now)
            return now

    def _prepare_ahead(self, info: Any, patches: list[Any], answers: dict[str, str]) -> None:
        """Once at most one patch of the batch is unanswered, prepare the round for its likeliest answers (every
        answer given: for those answers) while the expert looks at it (``wsi_il.ahead``)."""
        if self.ahead is None:
            return
        left = [p for p in patches if p.patch_id not in answers]
        if len(left) > 1:
            self.ahead.want(info.batch_id, [])
            return
        if not left:
            self.ahead.want(info.batch_id, [answers])
            return
        last = left[0]
        choices = likely_answers(list(info.classes), info.query_label, last.suggestion)
        self.ahead.want(info.batch_id, [{**answers, last.patch_id: choice} for choice in choices])

    def submit(self, batch_id: str) -> dict[str, Any]:
        """Ingest a fully answered batch exactly as ``wsi-il ingest`` does (same validation, the project's lock);
        returns what it did and the next batch, if any."""
        from wsi_il.model import open_context
        from wsi_il.session import ingest

        folder = self._batch_dir(batch_id)
        started = time.perf_counter()
        with self._answers, self._work, self._locking, self.project.lock("review"):
            done = self._commit_prepared(folder)
            if done is None:
                ctx = open_context(self.project, self.device, SilentReporter())
                result = ingest(ctx, folder / LABELS_CSV, pass_later=True)
                done = {
                    "message": result.message,
                    "changed": result.changed,
                    "prepared_ahead": False,
                    "next_batch": result.batch_dir.name if result.batch_dir is not None else None,
                    "pass_model": result.pass_model,
                }
        owed = done.pop("pass_model")
        if owed is not None:
            self._start_pass(owed)
        return {**done, "seconds": round(time.perf_counter() - started, 3), "pass": dict(self.passing)}

    # ---- a pooled round's full pass ----------------------------------------------------------------
    def _start_pass(self, model_id: str) -> None:
        """Run a pooled round's full pass in a thread, outside the project lock (an older one still running stops
        at its next chunk: its model is no longer current)."""
        self._passes = [t for t in self._passes if t.is_alive()]
        if any(t.name == f"pass {model_id}" for t in self._passes):
            return  # a second submit of the same batch (another tab): its pass is under way
        self.passing = {"state": "running", "model": model_id}
        thread = threading.Thread(target=self._run_pass, args=(model_id,), name=f"pass {model_id}", daemon=True)
        self._passes.append(thread)
        thread.start()

    def _run_pass(self, model_id: str) -> None:
        from wsi_il.clusterpass import pass_cluster
        from wsi_il.fullpass import run_pass
        from wsi_il.model import open_context

        try:
            ctx = open_context(self.project, self.device, SilentReporter())
            with pass_cluster(self.cluster, self.cluster_device, ctx.reporter) as on:
                outcome = run_pass(ctx, model_id, stop=self._stop_passes.is_set, guard=self._locking, cluster=on)
            done = {"state": "done" if outcome.entered else "not entered", "seconds": round(outcome.seconds, 2)}
            result = {**done, "message": outcome.message}
        except Exception as exc:  # a thread's failure is shown on the page, not lost with the thread
            result = {"state": "failed", "message": str(exc) or type(exc).__name__}
        if self.passing.get("model") == model_id:  # a newer round's pass reports for itself
            self.passing = {**result, "model": model_id}

    def _commit_prepared(self, folder: Path) -> dict[str, Any] | None:
        """Put in place the round prepared ahead for the batch's labels as they stand, if there is one and the
        project has not changed since (``wsi_il.ahead.commit``); None: the round must be computed."""
        if self.ahead is None:
            return None
        info, patches = read_batch(folder)
        try:
            answers = read_answers(folder, info, patches)
        except WsiIlError:
            answers = {}
        prepared = self.ahead.take(info.batch_id, answers) if len(answers) == len(patches) else None
        if prepared is None:
            return None
        try:
            commit(self.project, prepared)
        except Stale:
            return None
        return {
            "message": prepared.message,
            "changed": True,
            "prepared_ahead": True,
            "next_batch": prepared.next_batch,
            "pass_model": prepared.pass_model,
        }

    # ---- warm-up --------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Rehearse the first round while the expert labels (``session.rehearse``, as ``wsi-il watch`` does);
        without the lock: it writes nothing. Run in a thread; its state is in ``self.warmup``."""
        from wsi_il.model import open_context
        from wsi_il.session import rehearse
        from wsi_il.watch import waiting_batches

        waiting = waiting_batches(self.project)
        if not waiting:
            self.warmup = {"state": "skipped", "why": "no batch waits for labels"}
            return
        self.warmup = {"state": "running"}
        try:
            with self._work:
                if self._closed:
                    return
                seconds = rehearse(open_context(self.project, self.device, SilentReporter()), waiting[0].batch_dir)
        except WsiIlError as exc:
            self.warmup = {"state": "failed", "why": str(exc)}
            return
        self.warmup = {"state": "done", "seconds": round(seconds, 2)}

    # ---- corrections and labels outside the batch --------------------------------------------------
    def correct(self, answers: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Record expert labels outside the sampler (a patch clicked on the slide, a "more like this" group):
        ``correct_labels(via="page")`` under the project's lock."""
        from wsi_il.corrections import correct_labels

        known = self._patches()
        for patch_id, _ in answers:
            self._patch(patch_id)
        with self._answers, self._locking, self.project.lock("review"):
            return correct_labels(self.project, known.manifest, known.index.keys(), answers, via="page")

    def patch(self, patch_id: str) -> dict[str, Any]:
        """One patch: where it is, its label now and its history, the model's suggestion, its batch if it waits."""
        from wsi_il.corrections import patch_history
        from wsi_il.project import current_labels
        from wsi_il.watch import waiting_batches

        known, index = self._patch(patch_id)
        ledger = self.project.read_ledger()
        now = current_labels(ledger).get(patch_id)
        slide = known.table.slides[int(known.table.slide_index[index])]
        suggestion, probability = self._suggestion(index, known)
        waiting = None
        for batch in waiting_batches(self.project):
            if any(p.patch_id == patch_id for p in read_batch(batch.batch_dir)[1]):
                waiting = batch.batch_dir.name
        return {
            "patch_id": patch_id,
            "slide": slide.id,
            "box": known.table.boxes[index].tolist(),
            "has_slide": slide.kind == "slide",
            "label": now["label"] if now else None,
            "history": [
                {"label": e["label"], "batch": e["batch"], "time": e.get("time"), "via": e.get("via")}
                for e in patch_history(ledger, patch_id)
            ],
            "suggestion": suggestion,
            "probability": probability,
            "confident": suggestion is not None and not suggestion_is_uncertain(probability),
            "waiting_batch": waiting,
            "classes": list(known.manifest["classes"]),
        }

    def _suggestion(self, index: int, known: _Table) -> tuple[str | None, float | None]:
        predictions = self._predictions()
        if predictions is None:
            return None, None
        best = int(predictions[index].argmax())
        return known.manifest["classes"][best], round(float(predictions[index, best]), 3)

    def _predictions(self) -> np.ndarray | None:
        from wsi_il.readout import shown_path

        path = shown_path(self.project)
        return self.project.read_array(path) if path.is_file() else None

    def patch_at(self, slide_id: str, x: float, y: float) -> str | None:
        """The id of the slide's patch under level-0 point (x, y), if any."""
        known = self._patches()
        slide = self._slide(slide_id)
        rows = known.table.of_slide(slide.id)
        boxes = known.table.boxes[rows]
        inside = (
            (boxes[:, 0] <= x) & (x < boxes[:, 0] + boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 1] + boxes[:, 3])
        )
        hits = rows[inside]
        return known.table.ids[int(hits[0])] if len(hits) else None

    def similar(self, patch_id: str, count: int) -> list[dict[str, Any]]:
        """The unlabelled patches nearest ``patch_id`` by the current embeddings (not labelled, not a query patch,
        not in a batch that waits), nearest first."""
        from wsi_il.index import rank_by_distance
        from wsi_il.project import current_labels
        from wsi_il.session import list_sessions
        from wsi_il.watch import waiting_batches

        known, index = self._patch(patch_id)
        path = self.project.embeddings_path()
        if not path.is_file():
            raise ProjectStateError(
                "there are no embeddings yet to find similar patches with",
                "ingest a batch first: each round embeds every patch",
            )
        embeddings = self.project.read_array(path, mmap=True)
        taken = set(current_labels(self.project.read_ledger())) | {patch_id}
        for session in list_sessions(self.project):
            taken |= set(session["query"].get("patch_ids") or [])
        for batch in waiting_batches(self.project):
            taken |= {p.patch_id for p in read_batch(batch.batch_dir)[1]}
        candidates = np.array([i for i, pid in enumerate(known.table.ids) if pid not in taken], dtype=np.int64)
        ranked, distances = rank_by_distance(embeddings, np.asarray(embeddings[index], dtype=np.float32), candidates)
        found = []
        for i, distance in zip(ranked[: max(1, min(count, SIMILAR_MAX))].tolist(), distances.tolist(), strict=False):
            suggestion, probability = self._suggestion(i, known)
            slide = known.table.slides[int(known.table.slide_index[i])]
            found.append(
                {
                    "patch_id": known.table.ids[i],
                    "slide": slide.id,
                    "distance": round(distance, 4),
                    "suggestion": suggestion,
                    "probability": probability,
                    "confident": suggestion is not None and not suggestion_is_uncertain(probability),
                }
            )
        return found

    # ---- pictures ---------------------------------------------------------------------------------
    def context(self, patch_id: str, tiles: int) -> bytes:
        if tiles not in (1, 3, 5, 7):
            raise InputError(f"tiles={tiles} is not 1, 3, 5 or 7", "use 3, or 7 to zoom out")
        known, index = self._patch(patch_id)
        position = int(known.table.slide_index[index])
        slide = known.table.slides[position]
        local = index - int(np.flatnonzero(known.table.slide_index == position)[0])
        box = tuple(int(v) for v in known.table.boxes[index])
        return self.images.context(slide, box, tiles, local)

    def thumbnail(self, slide_id: str) -> bytes:
        return self.images.thumbnail(self._slide_with_pixels(slide_id))

    def deep_zoom(self, slide_id: str) -> dict[str, Any]:
        return self.images.deep_zoom(self._slide_with_pixels(slide_id))

    def tile(self, slide_id: str, level: int, column: int, row: int) -> bytes:
        tile = self.images.tile(self._slide_with_pixels(slide_id), level, column, row)
        if tile is None:
            raise NotFound(f"tile {level}/{column}_{row} is not in slide {slide_id}", "reload the page")
        return tile

    def _slide_with_pixels(self, slide_id: str) -> Any:
        slide = self._slide(slide_id)
        if slide.kind != "slide":
            raise NotFound(f"{slide_id} is a folder of patches, not a slide", "use the batch view")
        return slide

    def overlay(self, slide_id: str, kind: str) -> bytes:
        """One overlay of the slide view as a transparent PNG the size of the slide's overview."""
        from wsi_il.project import current_labels
        from wsi_il.qupath import class_color
        from wsi_il.session import list_sessions
        from wsi_il.watch import waiting_batches

        if kind not in OVERLAYS:
            raise NotFound(f"overlay {kind[:40]!r} is not one of {', '.join(OVERLAYS)}", "reload the page")
        known = self._patches()
        slide = self._slide_with_pixels(slide_id)
        rows = known.table.of_slide(slide.id)
        boxes = known.table.boxes
        classes = list(known.manifest["classes"])
        if kind == "probability":
            predictions = self._predictions()
            if predictions is None:
                return marks_overlay(slide, boxes[:0], [], fill=False)
            sessions = list_sessions(self.project)
            target = classes.index(sessions[-1]["label"]) if sessions else 0
            return probability_overlay(slide, boxes[rows], predictions[rows, target])
        ids = [known.table.ids[i] for i in rows.tolist()]
        where = dict(zip(ids, rows.tolist(), strict=True))
        if kind == "labelled":
            marked = [
                (where[pid], _label_colour(e["label"], classes, class_color))
                for pid, e in current_labels(self.project.read_ledger()).items()
                if pid in where
            ]
        elif kind == "query":
            wanted = {pid for s in list_sessions(self.project) for pid in s["query"].get("patch_ids") or []}
            marked = [(where[pid], QUERY_RGB) for pid in wanted if pid in where]
        else:
            wanted = {p.patch_id for b in waiting_batches(self.project) for p in read_batch(b.batch_dir)[1]}
            marked = [(where[pid], BATCH_RGB) for pid in wanted if pid in where]
        chosen = np.array([m[0] for m in marked], dtype=np.int64)
        return marks_overlay(slide, boxes[chosen].reshape(-1, 4), [m[1] for m in marked], fill=kind == "labelled")

    # ---- status and export -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        from wsi_il.status import project_status

        return project_status(self.project.root)

    def export(self) -> list[str]:
        """Write the predicted masks (GeoJSON and overview picture; a CSV for patch folders) into the project's
        ``exports/`` folder, as ``wsi-il export`` would; returns the file names written."""
        from wsi_il.export import export_masks, export_table
        from wsi_il.model import open_context

        folder = self.project.root / EXPORTS
        with self._answers, self._work, self._locking, self.project.lock("review"):
            ctx = open_context(self.project, "cpu", SilentReporter())
            if all(s.kind == "patches" for s in ctx.table.slides):
                return [export_table(ctx, folder / "predictions.csv").name]
            written = export_masks(ctx, folder / "mask.geojson")
        names = []
        for item in written:
            names.append(item.geojson.name)
            if item.overview is not None:
                names.append(item.overview.name)
        return names

    def export_file(self, name: str) -> Path:
        """An exported file by its name, only when the exports folder lists it."""
        folder = self.project.root / EXPORTS
        listed = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
        if name not in listed:
            raise NotFound(f"{name[:80]!r} is not in {folder}", "export first")
        return folder / name


def _label_colour(label: str, classes: list[str], class_color: Any) -> tuple[int, int, int]:
    if label == SKIP:
        return SKIP_RGB
    if label.startswith("not:"):
        return SKIP_RGB
    return tuple(class_color(label)) if label in classes else SKIP_RGB
