"""Pseudo-feedback experiments (docs/method.md "How the paper measured it"): the expert replaced by ground truth.

Every run drives the same engine as ``wsi-il query`` / ``wsi-il ingest``: ``session.start_session`` writes a
real review batch, its labels.csv is filled from the truth, ``session.ingest`` records it, trains both heads
and writes the next batch. Nothing here ranks, samples or trains the interactive loop itself; the only
training done here is the full-supervision reference (the runs' map, or heads, on every database label).

Layout of an output folder::

    base/<name>/                 one project per slide (or patch dataset): features computed once
    runs/<name>/<strategy>-seed<n>/  a copy of the base project per run, with its batches and models
    results.csv  per_slide.csv  summary.json  <metric>.png
    suggestions.csv              every patch shown: the model's suggestion, its probability and the truth
    rounds.csv                   per round: how the suggestions shown fared (``suggestion_scores``)

Slides need exact patch-level truth to be scored (a mosaic of per-patch-labelled patches such as PCam,
``wsi_il.measure.mosaic.make_patch_mosaic``); a mosaic of whole labelled fields (BACH) is for looks (docs/quality.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.config import (
    BALANCES,
    SCHEDULES,
    STRATEGIES,
    FeatureSettings,
    RoundSettings,
    SessionSettings,
    TilingSettings,
    TrainSettings,
    frozen_conv1_default,
    new_manifest,
    settings_of,
    to_dict,
)
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.events import Reporter, SilentReporter
from wsi_il.fsutil import atomic_write_text
from wsi_il.metrics import accuracy, area_under_curve, binary_scores, labels_to_reach, precision_at_k
from wsi_il.project import Project

TUMOUR, NORMAL = "Tumor", "Normal"
COLUMNS = (
    "strategy",
    "seed",
    "session",
    "labels",
    "label_share",
    "reviewed",
    "query_patches",
    "accuracy",
    "p_at_10",
    "f1",
    "jaccard",
    "precision",
    "recall",
    "balanced_accuracy",
    "f1_unlabelled",
    "jaccard_unlabelled",
    "balanced_accuracy_unlabelled",
    "called_unlabelled",
    "suggestion_accuracy",
    "confident_share",
    "confident_accuracy",
    "seconds",
)
PATCH_METRICS = ("accuracy", "p_at_10")
SLIDE_METRICS = ("f1", "jaccard", "f1_unlabelled", "jaccard_unlabelled", "balanced_accuracy_unlabelled")
SUGGESTION_COLUMNS = ("strategy", "seed", "session", "round", "patch_id", "suggestion", "probability", "truth")
SUGGESTION_SCORES = ("suggestion_accuracy", "confident_share", "confident_accuracy")
REFERENCE = "full-supervision"
"""The strategy name of the reference rows (session 0): on slides, the runs' map (the read-out, or both heads:
``map_from``) trained on all but one fold of the patches with their true labels and scored on the held-out fold,
for every fold (cross-validated); on patch datasets, trained on every database label and scored on the held-out
test set."""


@dataclass(frozen=True)
class SimulationSettings:
    """One simulate run: which strategies and seeds, and the engine's settings (docs/method.md options)."""

    strategies: tuple[str, ...] = ("cnfp", "entropy", "random")
    seeds: int = 1
    """Seeds first_seed .. first_seed + seeds - 1; each seeds the query set, sampling and training of a run."""
    first_seed: int = 0
    """The first seed (a long experiment can run in pieces: --seeds 1 --first-seed 1, then 2, ...)."""
    sessions: int = 10
    k: int = 5
    """Patches per review batch (the paper: 5 for slides, 10 for CRC)."""
    rounds: int = 5
    queries: int = 10
    """Size of the query set (per class for patch datasets); each session draws one patch of it."""
    epochs: int = 50
    lr: float = 1e-4
    margin: float = 0.2
    warm_start: bool = False
    refine_query: bool = True
    schedule: str = "auto"
    """The rounds' training schedule (TrainSettings.schedule): auto, paper or fast."""
    fast_budget: int = TrainSettings.fast_budget
    """The fast schedule's most training patch passes per round; 0: its default (TrainSettings.fast_budget)."""
    fast_frozen_conv1: bool | None = None
    """The fast schedule keeps the block's first convolution frozen (TrainSettings.fast_frozen_conv1); None: as
    ``init`` decides for ``weights`` (``config.frozen_conv1_default``)."""
    reference: bool = True
    """Train the full-supervision reference (once, seed 0); without it the 95%/100% columns stay empty."""
    reference_folds: int = 5
    """Slides: the reference's folds (each patch scored by heads that never saw it)."""
    reference_epochs: int = 0
    """The reference's epochs per fold; 0: ``epochs``."""
    balance: str = TrainSettings.balance
    """TrainSettings.balance of the runs: classes (the default) or none (every label once, the paper)."""
    head_init: str = TrainSettings.head_init
    """TrainSettings.head_init of the runs."""
    map_from: str = TrainSettings.map_from
    """TrainSettings.map_from of the runs: what their scores (and maps) come from."""
    query_patches: int = 1
    """Slides: each session's query is a connected region of this many tumour patches grown from a random tumour
    patch (1: one random tumour patch, the paper)."""
    query_island_share: float = 0.0
    """Slides: when above 0, each session's query is this share of the slide's largest tumour island (a connected
    region grown from a random patch of it), in place of ``query_patches``."""
    tile_size_px: int = 256
    weights: str = "imagenet"
    trainable: str = "last"
    """FeatureSettings.trainable of the base projects: last (the paper) or layer4 (the paper's ablation)."""
    round: RoundSettings = RoundSettings()
    """How the runs' rounds pick their batches (RoundSettings: exact, pool or auto, and the pool's size)."""

    def check(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise InputError(
                f"unknown strategy {', '.join(unknown) or '(none)'}",
                f"use a comma-separated list of {', '.join(STRATEGIES)}",
            )
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        from wsi_il.features import check_trainable

        check_trainable(self.trainable)
        if self.balance not in BALANCES:
            raise InputError(f"unknown balance {self.balance!r}", f"use one of {', '.join(BALANCES)}")
        if not 0 <= self.query_island_share <= 1:
            raise InputError(
                f"--query-island-share {self.query_island_share} is not in 0..1",
                "e.g. 0.8 for most of the largest tumour island, or 0 for --query-patches",
            )
        for name in (
            "seeds",
            "sessions",
            "k",
            "rounds",
            "queries",
            "epochs",
            "fast_budget",
            "reference_folds",
            "reference_epochs",
            "query_patches",
            "first_seed",
        ):
            zero_ok = name in ("fast_budget", "reference_epochs", "first_seed")  # 0: the default, or seed 0
            least = 0 if zero_ok else 2 if name == "reference_folds" else 1
            if getattr(self, name) < least:
                raise InputError(
                    f"--{name.replace('_', '-')} must be at least {least}, not {getattr(self, name)}",
                    f"e.g. {least} or more",
                )

    def seed_range(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    def train(self, seed: int) -> TrainSettings:
        return TrainSettings(
            epochs=self.epochs,
            lr=self.lr,
            margin=self.margin,
            warm_start=self.warm_start,
            refine_query=self.refine_query,
            seed=seed,
            schedule=self.schedule,
            fast_budget=self.fast_budget,
            balance=self.balance,
            head_init=self.head_init,
            map_from=self.map_from,
            fast_frozen_conv1=(
                frozen_conv1_default(self.weights) if self.fast_frozen_conv1 is None else self.fast_frozen_conv1
            ),
        )


@dataclass(frozen=True)
class SlideCase:
    """A slide with its tumour truth; ``query_from`` names another case whose tumour gives the queries."""

    slide: Path
    truth: Path
    query_from: SlideCase | None = None


@dataclass
class Outcome:
    """What a simulation produced."""

    rows: list[dict[str, Any]]
    per_slide: list[dict[str, Any]] = field(default_factory=list)
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    """Every patch shown with a suggestion: SUGGESTION_COLUMNS."""
    summary: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


class RunJournal:
    """The runs of one experiment that have ended, kept in ``OUT/runs.jsonl`` one line a run as each ends.

    A simulate stopped (a dropped SSH link, a kill) and started again with the same settings and ``--out`` takes
    the runs recorded here and does only the rest; more seeds or strategies with the same settings add to them.
    The first line records the experiment (every setting that changes a run's result); other settings in the same
    folder are refused rather than mixed.
    """

    def __init__(self, out: Path, settings: SimulationSettings, about: dict[str, Any], reporter: Reporter) -> None:
        self.path = out / "runs.jsonl"
        shape = {k: v for k, v in asdict(settings).items() if k not in ("strategies", "seeds", "first_seed")}
        if settings.round == RoundSettings():  # experiments recorded before the setting existed stay comparable
            del shape["round"]
        self.experiment = json.loads(json.dumps({**about, **shape}, default=_json_default))
        self.done: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"experiment": self.experiment}) + "\n")
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0]) if lines else {}
        if head.get("experiment") != self.experiment:
            changed = sorted(
                k
                for k in {*self.experiment, *head.get("experiment", {})}
                if head.get("experiment", {}).get(k) != self.experiment.get(k)
            )
            raise InputError(
                f"{out} holds the runs of another experiment (different {', '.join(changed) or 'settings'})",
                "give another --out folder, or remove that one to start again",
            )
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short: that run is done again
                continue
            self.done[entry["run"]] = entry
            kept.append(line)
        atomic_write_text(self.path, "\n".join(kept) + "\n")
        if self.done:
            reporter.info(f"{len(self.done)} run(s) already done in {self.path}: reused, the others run now")

    def get(self, run: str) -> dict[str, Any] | None:
        """The recorded rows and suggestions of ``run``, or None when it has not ended yet."""
        return self.done.get(run)

    def add(self, run: str, rows: list[dict[str, Any]], suggestions: list[dict[str, Any]]) -> None:
        """Record an ended run (appended and synced, so that a kill afterwards keeps it)."""
        entry = {"run": run, "rows": rows, "suggestions": suggestions}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[run] = json.loads(json.dumps(entry, default=_json_default))


def _reuse(
    done: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    suggestions: list[dict[str, Any]],
    advance: Callable[[int], None] | None = None,
    settings: SimulationSettings | None = None,
) -> bool:
    """Add a recorded run's rows and suggestions; with ``advance``, count its rounds as done. False: not run yet."""
    if done is None:
        return False
    rows.extend(done["rows"])
    suggestions.extend(done["suggestions"])
    if advance is not None and settings is not None:
        advance(settings.sessions * settings.rounds)
    return True


# ---- projects -----------------------------------------------------------------------------------
def build_base(
    folder: Path,
    settings: SimulationSettings,
    reporter: Reporter,
    device: str,
    *,
    slide: Path | None = None,
    patches: Path | None = None,
) -> Project:
    """Create (or finish) a project over one slide or one patch folder; reused when already complete."""
    from wsi_il.database import folder_classes, register_patch_folder, register_slide
    from wsi_il.extraction import build_database
    from wsi_il.features import resolve_weights

    project = Project(folder)
    if project.exists():
        manifest = project.read_manifest()
        cached = settings_of(manifest).features.trainable
        if cached != settings.trainable:
            raise InputError(
                f"{folder} caches features for --trainable {cached}, not {settings.trainable}",
                "use another --out folder for the other setting",
            )
        build_database(project, manifest, reporter, device)
        return project
    weights = resolve_weights(settings.weights)
    classes = folder_classes(patches) if patches is not None else [TUMOUR, NORMAL]
    if len(classes) < 2:
        raise InputError(f"{patches} has fewer than two class subfolders", "give a folder of class subfolders")
    features = FeatureSettings(
        weights=settings.weights if weights.kind != "file" else weights.source,
        weights_sha256=weights.sha256,
        trainable=settings.trainable,
    )
    manifest = new_manifest(classes, TilingSettings(tile_size_px=settings.tile_size_px), features, settings.train(0))
    if slide is not None:
        register_slide(manifest, slide)
    else:
        register_patch_folder(manifest, patches)
    project.create(manifest)
    build_database(project, project.read_manifest(), reporter, device, weights)
    return project


def fork_project(
    base: Project, target: Path, train: TrainSettings, round_settings: RoundSettings | None = None
) -> Project:
    """Copy a project made before any session (its feature files too), with its own uid, training and round
    settings."""
    if target.exists():
        shutil.rmtree(target)
    if (base.root / "sessions").exists() or base.ledger_path().exists():
        raise ProjectStateError(f"{base.root} already has sessions", "fork a project before its first session")
    shutil.copytree(base.root, target, ignore=shutil.ignore_patterns("lock"))
    project = Project(target)
    manifest = project.read_manifest()
    manifest["uid"] = uuid.uuid4().hex
    manifest["train"] = to_dict(train)
    manifest["round"] = to_dict(round_settings or RoundSettings())
    project.write_manifest(manifest)
    return project


def fill_labels_from_classes(batch_dir: Path, truth: dict[str, str]) -> dict[str, str]:
    """Fill a review batch's labels.csv with each patch's true class name, as an expert would."""
    from wsi_il.measure.truth import write_batch_labels

    return write_batch_labels(batch_dir, truth)


# ---- one run: sessions through the engine ---------------------------------------------------------
def _run_sessions(
    ctx: Any,
    queries: list[tuple[str, dict[str, Any]]],
    settings: SimulationSettings,
    strategy: str,
    label_batch: Callable[[Path], dict[str, str]],
    score: Callable[[Any], dict[str, Any]],
    advance: Callable[[int], None],
    shown: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run one session per query through start_session/ingest, scoring after each; returns the rows. ``advance``
    (a reporter's task) moves one step per round, ingested or not.

    ``shown`` collects every patch shown with a suggestion (SUGGESTION_COLUMNS, less strategy and seed).
    """
    from wsi_il.session import ingest, start_session

    rows, labels, query_patches = [], 0, 0
    shown = [] if shown is None else shown
    for number, (label, query) in enumerate(queries, start=1):
        started = time.perf_counter()
        try:
            result = start_session(
                ctx, label, SessionSettings(strategy, settings.k, settings.rounds), source="simulate", **query
            )
        except ProjectStateError as exc:  # every patch reviewed: the curve ends here
            if not _exhausted(exc):
                raise
            break
        added = len(query.get("query_indices", query.get("query_features", [])))
        labels, query_patches = labels + added, query_patches + added
        rounds_done, first = 0, len(shown)
        while result.batch_dir is not None:
            answers = label_batch(result.batch_dir)
            shown.extend(_shown(result.batch_dir, answers, number, rounds_done + 1))
            labels += len(answers)
            try:
                result = ingest(ctx, result.batch_dir / "labels.csv")
            except ProjectStateError as exc:  # the last candidates were used: no next batch to write
                if not _exhausted(exc):
                    raise
                result = None
                break
            rounds_done += 1
            advance(1)
        advance(settings.rounds - rounds_done)
        seconds = time.perf_counter() - started
        row = {
            "strategy": strategy,
            "session": number,
            "labels": labels,
            "reviewed": labels - query_patches,
            "query_patches": query_patches,
            "seconds": round(seconds, 3),
            **suggestion_scores(shown[first:]),
            **score(ctx),
        }
        rows.append(row)
        if result is None:
            break
    return rows


def _exhausted(exc: ProjectStateError) -> bool:
    return "every patch of the project has been reviewed" in exc.message


def _shown(batch_dir: Path, answers: dict[str, str], session: int, round_number: int) -> list[dict[str, Any]]:
    """The batch's patches that came with a suggestion, with the answer the truth gave."""
    from wsi_il.batch import read_batch

    return [
        {
            "session": session,
            "round": round_number,
            "patch_id": p.patch_id,
            "suggestion": p.suggestion,
            "probability": p.suggestion_probability,
            "truth": answers[p.patch_id],
        }
        for p in read_batch(batch_dir)[1]
        if p.suggestion is not None and p.patch_id in answers
    ]


def suggestion_rounds(shown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``suggestion_scores`` of every round (per slide, strategy, seed, session and round) of shown patches."""
    keys = ("slide", "strategy", "seed", "session", "round")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for patch in shown:
        groups.setdefault(tuple(patch.get(k) for k in keys), []).append(patch)
    return [
        {
            **{k: v for k, v in zip(keys, key, strict=True) if v is not None},
            "shown": len(patches),
            **suggestion_scores(patches),
        }
        for key, patches in groups.items()
    ]


def suggestion_scores(shown: list[dict[str, Any]]) -> dict[str, Any]:
    """How the suggestions shown in a session's batches fared: the share that matched the truth, the share shown
    as confident (``batch.suggestion_is_uncertain`` false) and the share of those that matched.

    The last two say what one "accept every confident suggestion" action would record, and how well.
    """
    from wsi_il.batch import suggestion_is_uncertain

    if not shown:
        return {"suggestion_accuracy": "", "confident_share": "", "confident_accuracy": ""}
    right = np.array([s["suggestion"] == s["truth"] for s in shown])
    confident = np.array([not suggestion_is_uncertain(s["probability"]) for s in shown])
    return {
        "suggestion_accuracy": float(right.mean()),
        "confident_share": float(confident.mean()),
        "confident_accuracy": float(right[confident].mean()) if confident.any() else "",
    }


def _current_heads(ctx: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from wsi_il.model import load_tensors

    state = ctx.project.read_json(ctx.project.state_path(), {})
    model = load_tensors(ctx.project.model_path(state["model"]))
    return model["retrieval"], model["classifier"], load_tensors(ctx.project.init_model_path())


# ---- slides ---------------------------------------------------------------------------------------
def _slide_truth(ctx: Any, truth: Path) -> np.ndarray:
    from wsi_il.measure.truth import truth_mask

    slide = ctx.table.slides[0]
    return truth_mask(ctx.table.boxes, truth, slide.offset)


def _slide_scores(ctx: Any, truth: np.ndarray) -> dict[str, Any]:
    from wsi_il.readout import current_map
    from wsi_il.session import reviewed_ids

    predicted = current_map(ctx).argmax(axis=1) == ctx.class_index(TUMOUR)
    seen = reviewed_ids(ctx.project)
    unlabelled = np.array([pid not in seen for pid in ctx.table.ids])
    return _score_columns(binary_scores(predicted, truth), binary_scores(predicted[unlabelled], truth[unlabelled]))


def _score_columns(every: Any, rest: Any) -> dict[str, Any]:
    """The slide columns of a row from the scores on every tissue patch and on the unlabelled ones."""
    return {
        "f1": every.f1,
        "jaccard": every.jaccard,
        "precision": every.precision,
        "recall": every.recall,
        "balanced_accuracy": every.balanced_accuracy,
        "f1_unlabelled": rest.f1,
        "jaccard_unlabelled": rest.jaccard,
        "balanced_accuracy_unlabelled": rest.balanced_accuracy,
        "called_unlabelled": rest.called_share,
    }


def _slide_reference(
    ctx: Any, truth: np.ndarray, train: TrainSettings, folds: int, epochs: int, reporter: Reporter
) -> dict[str, Any]:
    """Cross-validated full supervision: per fold, the runs' map trained on every other fold's patches with their
    true labels, predicting the fold; scored on all patches, each predicted by a model that never saw it. The map
    is the runs' ``map_from``: the read-out of the pretrained block (``wsi_il.readout``), or both heads."""
    from wsi_il.heads import predict

    targets = np.where(truth, ctx.class_index(TUMOUR), ctx.class_index(NORMAL)).astype(np.int64)
    fold_of = np.random.default_rng(train.seed).permutation(len(targets)) % folds
    predicted = np.zeros(len(targets), dtype=bool)
    for fold in range(folds):
        reporter.status(f"full-supervision reference, fold {fold + 1} of {folds}")
        held_out, rows = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        if train.map_from == "readout":
            probs = _readout_reference(ctx, rows, held_out, targets)
        else:
            heads, init = _full_supervision(ctx, rows, targets, train, epochs)
            features = ctx.store.take(held_out)
            probs = predict(heads.classifier, init, len(ctx.classes), [(0, features)], len(held_out), ctx.device)
        predicted[held_out] = probs.argmax(axis=1) == ctx.class_index(TUMOUR)
    scores = binary_scores(predicted, truth)
    return _score_columns(scores, scores)


def _readout_reference(ctx: Any, rows: np.ndarray, held_out: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The read-out fitted to the database patches ``rows`` with their true classes (each a reviewed label), and
    its class probabilities of the patches ``held_out``."""
    from wsi_il.pool import frozen_embeddings, frozen_norms
    from wsi_il.readout import map_probabilities, project_readout

    fitted = project_readout(ctx, None, targets[rows], np.full(len(rows), -1), rows)
    return map_probabilities(frozen_embeddings(ctx)[held_out], frozen_norms(ctx)[held_out], fitted)


def _full_supervision(
    ctx: Any, rows: np.ndarray, targets: np.ndarray, train: TrainSettings, epochs: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Both heads trained on the database patches ``rows`` with their true classes, with the runs' schedule.

    The fast schedule's per-round pass budget and early stopping are lifted here: the reference trains its
    full epochs (``epochs``, else the runs' ``epochs``), so it is a ceiling for the runs, not a peer. Its
    classes weigh as the runs' ``balance`` says.
    """
    from dataclasses import replace

    from wsi_il.config import fast_budget
    from wsi_il.heads import train_heads, training_weights
    from wsi_il.model import load_tensors

    init = load_tensors(ctx.project.init_model_path())
    epochs = epochs or train.epochs
    unbounded = replace(train, epochs=epochs, fast_budget=max(fast_budget(train), epochs * len(rows)))
    chosen = targets[rows]
    weights = None if train.balance == "none" else training_weights(chosen)
    heads = train_heads(
        ctx.store.take(rows),
        chosen,
        init,
        len(ctx.classes),
        unbounded,
        ctx.device,
        early_stopping=False,
        weights=weights,
    )
    return heads, init


def _tumour_query_images(
    case: SlideCase, base: Project, count: int, rng: np.random.Generator, folder: Path
) -> list[Path]:
    """Save ``count`` random tumour patches of a query slide as PNG files (inter-slide queries)."""
    from PIL import Image

    from wsi_il.database import patch_table
    from wsi_il.measure.truth import truth_mask
    from wsi_il.slide import TileReader

    table = patch_table(base, base.read_manifest())
    tumour = np.flatnonzero(truth_mask(table.boxes, case.truth, table.slides[0].offset))
    if len(tumour) == 0:
        raise InputError(
            f"{case.truth}: no tissue patch of {case.slide.name} is at least 50% tumour",
            "check that the truth belongs to the query slide",
        )
    chosen = rng.choice(tumour, size=min(count, len(tumour)), replace=False)
    folder.mkdir(parents=True, exist_ok=True)
    reader = TileReader(case.slide)
    paths = []
    try:
        for i in chosen:
            x, y, w, h = (int(v) for v in table.boxes[i])
            paths.append(folder / f"query_{x}_{y}.png")
            Image.fromarray(reader.read(x, y, w, h)).save(paths[-1])
    finally:
        reader.close()
    return paths


def simulate_slides(
    cases: list[SlideCase],
    out: Path,
    settings: SimulationSettings,
    device: str,
    reporter: Reporter | None = None,
) -> Outcome:
    """Run every strategy and seed on every slide; rows are macro-averaged over slides per session."""
    from wsi_il.model import current_embeddings, open_context
    from wsi_il.session import extract_query_images

    settings.check()
    reporter = reporter or SilentReporter()
    advance = reporter.task("simulate", total_rounds(settings, max(1, len(cases))), unit="rounds")
    names = _unique_names([c.slide for c in cases])
    bases: dict[Path, Project] = {}
    for case in cases:
        for source in (case, case.query_from) if case.query_from else (case,):
            if source.slide.resolve() not in bases:
                reporter.status(f"features of {source.slide.name}")
                bases[source.slide.resolve()] = build_base(
                    out / "base" / _unique_names([source.slide])[0], settings, reporter, device, slide=source.slide
                )
    journal = RunJournal(
        out,
        settings,
        {
            "mode": "slides",
            "cases": [
                [
                    str(c.slide.resolve()),
                    str(c.truth.resolve()),
                    str(c.query_from.slide.resolve()) if c.query_from else "",
                ]
                for c in cases
            ],
        },
        reporter,
    )
    per_slide: list[dict[str, Any]] = []
    suggestions: list[dict[str, Any]] = []
    for case, name in zip(cases, names, strict=True):
        base = bases[case.slide.resolve()]
        current_embeddings(open_context(base, device, SilentReporter()))  # the pretrained embeddings, once
        for seed in settings.seed_range():
            train = settings.train(seed)
            ctx = open_context(base, device, SilentReporter())
            truth = _slide_truth(ctx, case.truth)
            if not truth.any():
                raise InputError(
                    f"{case.truth}: no tissue patch of {case.slide.name} is at least 50% inside the truth",
                    "check that the truth GeoJSON belongs to the slide",
                )
            rng = np.random.default_rng(seed)
            if case.query_from is None:
                queries = [
                    (TUMOUR, {"query_indices": region, "slide": ctx.table.slides[0].id})
                    for region in query_regions(ctx.table.boxes, truth, settings, rng)
                ]
            else:
                images = _tumour_query_images(
                    case.query_from,
                    bases[case.query_from.slide.resolve()],
                    settings.queries,
                    rng,
                    out / "runs" / name / f"queries-seed{seed}",
                )
                features = extract_query_images(ctx, images)
                queries = [
                    (TUMOUR, {"query_features": features[i : i + 1], "images": [str(images[i])]})
                    for i in range(len(images))
                ]
            queries = [queries[i % len(queries)] for i in range(settings.sessions)]
            n = len(ctx.table)
            reference_run = f"{name}/{REFERENCE}/seed{seed}"
            if seed == settings.first_seed and settings.reference:  # once per slide (not a seed spread)
                if journal.get(reference_run) is None:
                    reporter.status(f"{name}: full-supervision reference")
                    reference = _slide_reference(
                        ctx, truth, train, settings.reference_folds, settings.reference_epochs, reporter
                    )
                    row = {"slide": name, "strategy": REFERENCE, "seed": seed, "session": 0, "labels": n}
                    journal.add(reference_run, [{**row, "label_share": 1.0, "seconds": "", **reference}], [])
                per_slide.extend(journal.done[reference_run]["rows"])
            for strategy in settings.strategies:
                run_name = f"{name}/{strategy}/seed{seed}"
                if _reuse(journal.get(run_name), per_slide, suggestions, advance, settings):
                    continue
                reporter.status(f"{name}: {strategy}, seed {seed}")
                project = fork_project(base, out / "runs" / name / f"{strategy}-seed{seed}", train, settings.round)
                run_ctx = open_context(project, device, SilentReporter())
                offset = run_ctx.table.slides[0].offset

                def label_batch(batch: Path, truth_path: Path = case.truth, offset=offset) -> dict[str, str]:
                    from wsi_il.measure.truth import fill_labels_from_truth

                    return fill_labels_from_truth(batch, truth_path, offset)

                shown: list[dict[str, Any]] = []
                rows = _run_sessions(
                    run_ctx,
                    queries,
                    settings,
                    strategy,
                    label_batch,
                    lambda c, t=truth: _slide_scores(c, t),
                    advance,
                    shown,
                )
                journal.add(
                    run_name,
                    [{"slide": name, "seed": seed, "label_share": row["labels"] / n, **row} for row in rows],
                    [{"slide": name, "strategy": strategy, "seed": seed, **s} for s in shown],
                )
                _reuse(journal.done[run_name], per_slide, suggestions)
    rows = _macro_average(per_slide)
    outcome = Outcome(rows, per_slide if len(cases) > 1 else [], suggestions)
    return finish(out, outcome, SLIDE_METRICS, settings, {"mode": "slides", "slides": names})


def query_regions(
    boxes: np.ndarray, truth: np.ndarray, settings: SimulationSettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """One query per session, as patch indices: a connected region of tumour patches grown from a random seed.

    ``query_island_share`` > 0: that share of the largest tumour island; else ``query_patches`` patches (1: a
    random tumour patch, the paper; more: grown inside an island at least that large, or the largest one). With
    ``query_patches`` 1 the sessions cycle through ``queries`` random tumour patches, as before regions existed.
    """
    tumour = np.flatnonzero(truth)
    if settings.query_island_share == 0 and settings.query_patches == 1:
        chosen = rng.choice(tumour, size=min(settings.queries, len(tumour)), replace=False)
        return [np.array([chosen[i % len(chosen)]]) for i in range(settings.sessions)]
    islands = tumour_islands(boxes, truth)
    largest = max(islands, key=len)
    regions = []
    for _ in range(settings.sessions):
        if settings.query_island_share > 0:
            island, size = largest, max(1, round(settings.query_island_share * len(largest)))
        else:
            big = [i for i in islands if len(i) >= settings.query_patches] or [largest]
            island = big[int(rng.integers(len(big)))]
            size = min(settings.query_patches, len(island))
        regions.append(grow_region(boxes, island, size, rng))
    return regions


def tumour_islands(boxes: np.ndarray, truth: np.ndarray) -> list[np.ndarray]:
    """The connected groups (edge neighbours on the patch grid) of the patches whose truth is True."""
    cells = _grid_cells(boxes)
    where = {cells[i]: int(i) for i in np.flatnonzero(truth)}
    islands, seen = [], set()
    for start in where.values():
        if start in seen:
            continue
        group, stack = [], [start]
        seen.add(start)
        while stack:
            i = stack.pop()
            group.append(i)
            for j in _neighbours(cells[i], where):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        islands.append(np.array(sorted(group)))
    return islands


def grow_region(boxes: np.ndarray, island: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` connected patches of ``island`` grown from a random one, nearest first (a compact blob, as a
    pathologist's outline of part of an island)."""
    cells = _grid_cells(boxes)
    where = {cells[i]: int(i) for i in island}
    seed = int(island[int(rng.integers(len(island)))])
    centre = np.array(cells[seed], dtype=np.float64)
    chosen, frontier = {seed}, set(_neighbours(cells[seed], where))
    while len(chosen) < size and frontier:
        ordered = sorted(frontier)
        distance = [np.hypot(*(np.array(cells[j]) - centre)) + rng.uniform(0, 0.5) for j in ordered]
        nearest = ordered[int(np.argmin(distance))]
        frontier.discard(nearest)
        chosen.add(nearest)
        frontier.update(j for j in _neighbours(cells[nearest], where) if j not in chosen)
    return np.array(sorted(chosen), dtype=np.int64)


def _grid_cells(boxes: np.ndarray) -> list[tuple[int, int]]:
    """Each box's (column, row) on its tile grid."""
    return [(int(x // w), int(y // h)) for x, y, w, h in np.asarray(boxes)]


def _neighbours(cell: tuple[int, int], where: dict[tuple[int, int], int]) -> list[int]:
    col, row = cell
    return [where[c] for c in ((col - 1, row), (col + 1, row), (col, row - 1), (col, row + 1)) if c in where]


def _macro_average(per_slide: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average the rows of several slides per (strategy, seed, session)."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in per_slide:
        groups.setdefault((row["strategy"], row["seed"], row["session"]), []).append(row)
    out = []
    for (strategy, seed, session), rows in groups.items():
        merged: dict[str, Any] = {"strategy": strategy, "seed": seed, "session": session}
        for column in COLUMNS[3:]:  # (a column no row has, e.g. a suggestion score of a first round, stays empty)
            values = [r[column] for r in rows if r.get(column) not in (None, "")]
            merged[column] = float(np.mean(values)) if values else ""
        out.append(merged)
    return out


def _unique_names(paths: Iterable[Path]) -> list[str]:
    from wsi_il.project import safe_id

    names: list[str] = []
    for path in paths:
        stem = Path(path).name.split(".")[0]
        base, n = safe_id(stem), 2
        candidate = base
        while candidate in names:
            candidate, n = f"{base}-{n}", n + 1
        names.append(candidate)
    return names


# ---- patch datasets -------------------------------------------------------------------------------
def _test_set(ctx: Any, test: Path, base: Project) -> tuple[np.ndarray, np.ndarray]:
    """Trunk features and class indices of a held-out folder of class subfolders (cached in the base)."""
    from wsi_il.database import IMAGE_SUFFIXES
    from wsi_il.session import extract_query_images

    files, labels = [], []
    for c, name in enumerate(ctx.classes):
        found = sorted(p for p in (Path(test) / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(found)
        labels.extend([c] * len(found))
    if not files:
        raise InputError(
            f"the test folder {test} has no images in subfolders named {', '.join(ctx.classes)}",
            "give a held-out folder with the same class subfolders as --patches",
        )
    cache = base.root / "simulate-test.npz"
    names = np.array([str(p.resolve()) for p in files])
    if cache.is_file():
        with np.load(cache) as stored:
            if stored["names"].tolist() == names.tolist():
                return stored["features"], stored["labels"]
    features = np.concatenate([extract_query_images(ctx, files[i : i + 64]) for i in range(0, len(files), 64)])
    np.savez(cache, names=names, features=features, labels=np.array(labels))
    return features, np.array(labels)


def _patch_truth(ctx: Any) -> np.ndarray:
    """Class index of every database patch, from its class subfolder."""
    slide = ctx.table.slides[0]
    labels = ctx.project.read_json(ctx.project.images_path(slide.id))["labels"]
    if any(label is None for label in labels):
        raise InputError(
            f"{slide.path} holds images outside class subfolders",
            "simulate needs every database patch in a class subfolder",
        )
    return np.array([ctx.class_index(label) for label in labels], dtype=np.int64)


def _head_scores(
    retrieval: dict[str, Any],
    classifier: dict[str, Any],
    init: dict[str, Any],
    ctx: Any,
    database_embeddings: np.ndarray,
    database_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    readout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The test set's accuracy under the map (the read-out where there is one, else the classifier head) and the
    retrieval head's P@10 against the database."""
    from wsi_il.heads import embed, predict
    from wsi_il.readout import readout_of_features

    if readout is not None:
        probs = readout_of_features(readout, test_x, init, ctx.device)
    else:
        probs = predict(classifier, init, len(ctx.classes), [(0, test_x)], len(test_x), ctx.device)
    test_embeddings = embed(retrieval, init, [(0, test_x)], len(test_x), ctx.device)
    return {
        "accuracy": accuracy(probs.argmax(axis=1), test_y),
        "p_at_10": precision_at_k(test_embeddings, test_y, database_embeddings, database_y, 10),
    }


def _patch_scores(ctx: Any, database_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
    from wsi_il.model import current_embeddings, load_model, model_state

    retrieval, classifier, init = _current_heads(ctx)
    readout = load_model(ctx, model_state(ctx)["model"]).get("readout")
    return _head_scores(retrieval, classifier, init, ctx, current_embeddings(ctx), database_y, test_x, test_y, readout)


def _patch_reference(
    ctx: Any, database_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, train: TrainSettings
) -> dict[str, Any]:
    """Both heads trained on every database patch with its class (full supervision), scored on the test set; the
    map the runs' ``map_from`` (the read-out of every database patch, or the classifier head)."""
    from wsi_il.heads import embed
    from wsi_il.readout import fit_readout

    every = np.arange(len(database_y))
    heads, init = _full_supervision(ctx, every, database_y, train)
    readout = None
    if train.map_from == "readout":
        groups = np.full(len(every), -1)
        readout = fit_readout(ctx.store.take(every), database_y, groups, init, len(ctx.classes), ctx.device)
    database_embeddings = embed(heads.retrieval, init, ctx.store.chunks(256), len(ctx.store), ctx.device)
    return _head_scores(
        heads.retrieval, heads.classifier, init, ctx, database_embeddings, database_y, test_x, test_y, readout
    )


def simulate_patches(
    patches: Path,
    test: Path,
    out: Path,
    settings: SimulationSettings,
    device: str,
    reporter: Reporter | None = None,
) -> Outcome:
    """Run every strategy and seed on a patch dataset with explicit class labels, scored on a held-out set."""
    from wsi_il.model import current_embeddings, open_context

    settings.check()
    reporter = reporter or SilentReporter()
    advance = reporter.task("simulate", total_rounds(settings), unit="rounds")
    reporter.status(f"features of {Path(patches).name}")
    name = _unique_names([patches])[0]
    base = build_base(out / "base" / name, settings, reporter, device, patches=patches)
    ctx = open_context(base, device, SilentReporter())
    current_embeddings(ctx)
    reporter.status(f"features of {Path(test).name}")
    test_x, test_y = _test_set(ctx, test, base)
    database_y = _patch_truth(ctx)
    classes = ctx.classes
    if settings.sessions > settings.queries * len(classes):
        raise InputError(
            f"{settings.sessions} sessions need more than the {settings.queries} x {len(classes)} query patches",
            f"raise --queries to at least {math.ceil(settings.sessions / len(classes))}",
        )
    journal = RunJournal(
        out,
        settings,
        {"mode": "patches", "patches": str(Path(patches).resolve()), "test": str(Path(test).resolve())},
        reporter,
    )
    rows: list[dict[str, Any]] = []
    suggestions: list[dict[str, Any]] = []
    for seed in settings.seed_range():
        train = settings.train(seed)
        rng = np.random.default_rng(seed)
        query_sets = [rng.permutation(np.flatnonzero(database_y == c))[: settings.queries] for c in range(len(classes))]
        order = [
            int(c) for _ in range(math.ceil(settings.sessions / len(classes))) for c in rng.permutation(len(classes))
        ]
        taken = [0] * len(classes)
        queries = []
        for c in order[: settings.sessions]:
            if taken[c] < len(query_sets[c]):
                queries.append((classes[c], {"query_indices": query_sets[c][taken[c] : taken[c] + 1]}))
                taken[c] += 1
        truth = {pid: classes[y] for pid, y in zip(ctx.table.ids, database_y, strict=True)}
        reference_run = f"{name}/{REFERENCE}/seed{seed}"
        if seed == settings.first_seed and settings.reference:  # trained once (not a seed spread)
            if journal.get(reference_run) is None:
                reporter.status(f"{name}: full-supervision reference")
                reference = _patch_reference(ctx, database_y, test_x, test_y, train)
                row = {"strategy": REFERENCE, "seed": seed, "session": 0, "labels": len(ctx.table), "label_share": 1.0}
                journal.add(reference_run, [{**row, "seconds": "", **reference}], [])
            rows.extend(journal.done[reference_run]["rows"])
        for strategy in settings.strategies:
            run_name = f"{name}/{strategy}/seed{seed}"
            if _reuse(journal.get(run_name), rows, suggestions, advance, settings):
                continue
            reporter.status(f"{name}: {strategy}, seed {seed}")
            project = fork_project(base, out / "runs" / name / f"{strategy}-seed{seed}", train, settings.round)
            run_ctx = open_context(project, device, SilentReporter())
            shown: list[dict[str, Any]] = []
            found = _run_sessions(
                run_ctx,
                queries,
                settings,
                strategy,
                lambda batch: fill_labels_from_classes(batch, truth),  # noqa: B023
                lambda c: _patch_scores(c, database_y, test_x, test_y),
                advance,
                shown,
            )
            journal.add(
                run_name,
                [{"seed": seed, "label_share": r["labels"] / len(ctx.table), **r} for r in found],
                [{"strategy": strategy, "seed": seed, **s} for s in shown],
            )
            _reuse(journal.done[run_name], rows, suggestions)
    return finish(
        out,
        Outcome(rows, suggestions=suggestions),
        PATCH_METRICS,
        settings,
        {"mode": "patches", "patches": str(patches), "test": str(test)},
    )


def total_rounds(settings: SimulationSettings, cases: int = 1) -> int:
    """The number of progress steps a simulation takes (one per review round)."""
    return cases * settings.seeds * len(settings.strategies) * settings.sessions * settings.rounds


# ---- reports --------------------------------------------------------------------------------------
def finish(
    out: Path, outcome: Outcome, metrics: tuple[str, ...], settings: SimulationSettings, about: dict[str, Any]
) -> Outcome:
    """Write results.csv (and per_slide.csv), summary.json and one plot per metric."""
    write_rows(out / "results.csv", outcome.rows, COLUMNS)
    if outcome.per_slide:
        write_rows(out / "per_slide.csv", outcome.per_slide, ("slide", *COLUMNS))
    slide_column = ("slide",) if any("slide" in s for s in outcome.suggestions) else ()
    write_rows(out / "suggestions.csv", outcome.suggestions, (*slide_column, *SUGGESTION_COLUMNS))
    write_rows(
        out / "rounds.csv",
        suggestion_rounds(outcome.suggestions),
        (*slide_column, "strategy", "seed", "session", "round", "shown", *SUGGESTION_SCORES),
    )
    outcome.summary = {
        **about,
        "settings": {**asdict(settings), "strategies": list(settings.strategies)},
        "metrics": list(metrics),
        "strategies": summarise(outcome.rows, metrics),
    }
    atomic_write_text(out / "summary.json", json.dumps(outcome.summary, indent=2, default=_json_default) + "\n")
    outcome.plots = [plot_metric(outcome.rows, metric, out / f"{metric}.png") for metric in metrics]
    return outcome


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_rows(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Write rows as CSV with fixed columns; a metric that does not apply is left empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())


def _cell(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return str(value)


def _spread(values: list[float]) -> dict[str, float | int | None]:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(np.mean(clean)),
        "std": float(np.std(clean)),
        "min": float(np.min(clean)),
        "max": float(np.max(clean)),
        "n": len(clean),
    }


def summarise(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    """Per strategy: final metrics, labels to reach 95% / 100% of the reference, area under the curve."""
    reference = {
        m: _spread([float(r[m]) for r in rows if r["strategy"] == REFERENCE and r.get(m) != ""]) for m in metrics
    }
    out: dict[str, Any] = {REFERENCE: {m: reference[m] for m in metrics}}
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != REFERENCE):
        entry: dict[str, Any] = {}
        seeds = sorted({r["seed"] for r in rows if r["strategy"] == strategy})
        curves = {
            s: sorted((r for r in rows if r["strategy"] == strategy and r["seed"] == s), key=lambda r: r["session"])
            for s in seeds
        }
        entry["seeds"] = len(seeds)
        entry["final_labels"] = _spread([float(c[-1]["labels"]) for c in curves.values() if c])
        for m in metrics:
            finals = [float(c[-1][m]) for c in curves.values() if c]
            target = reference[m]["mean"]
            reach: dict[str, Any] = {}
            for share in (0.95, 1.0):
                needed = [
                    labels_to_reach(
                        np.array([r["labels"] for r in c]), np.array([float(r[m]) for r in c]), share * target
                    )
                    if target is not None
                    else None
                    for c in curves.values()
                ]
                reach[f"labels_to_{round(share * 100)}pct"] = {
                    "per_seed": needed,
                    "reached": sum(n is not None for n in needed),
                    **_spread([n for n in needed if n is not None]),
                }
            auc = [
                area_under_curve(np.array([r["labels"] for r in c]), np.array([float(r[m]) for r in c]))
                for c in curves.values()
                if c
            ]
            entry[m] = {"final": _spread(finals), "auc": _spread(auc), **reach}
        out[strategy] = entry
    return out


def curve(rows: list[dict[str, Any]], strategy: str, metric: str) -> tuple[np.ndarray, ...]:
    """Mean labels, mean, min and max of a metric per session over seeds."""
    sessions = sorted({r["session"] for r in rows if r["strategy"] == strategy})
    labels, mean, low, high = [], [], [], []
    for s in sessions:
        chosen = [r for r in rows if r["strategy"] == strategy and r["session"] == s and r.get(metric) != ""]
        if not chosen:
            continue
        values = np.array([float(r[metric]) for r in chosen])
        labels.append(np.mean([r["labels"] for r in chosen]))
        mean.append(values.mean())
        low.append(values.min())
        high.append(values.max())
    return np.array(labels), np.array(mean), np.array(low), np.array(high)


def plot_metric(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Plot a metric against the number of labels: one line per strategy, a band over seeds (min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != REFERENCE))
    for strategy in strategies:
        labels, mean, low, high = curve(rows, strategy, metric)
        if len(labels) == 0:
            continue
        line = axes.plot(
            labels, mean, marker="o", markersize=3, label=strategy, linewidth=2.2 if strategy == "cnfp" else 1.4
        )[0]
        axes.fill_between(labels, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    reference = [float(r[metric]) for r in rows if r["strategy"] == REFERENCE and r.get(metric) != ""]
    if reference:
        axes.axhline(float(np.mean(reference)), color="black", linestyle="--", linewidth=1, label="full supervision")
    seeds = len({r["seed"] for r in rows})
    axes.set_xlabel("labels (query patches + reviewed patches)")
    axes.set_ylabel(metric.replace("_", " "))
    axes.set_title(f"{metric.replace('_', ' ')} vs labels ({seeds} seed{'s' if seeds != 1 else ''}, band: min-max)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


# ---- evaluate a real project ------------------------------------------------------------------------
def evaluate_project(
    ctx: Any, truth_path: Path, slide_id: str | None = None, label: str | None = None
) -> dict[str, Any]:
    """Score a project's current mask of one slide against a truth annotation (patch- and pixel-level).

    Patch level: a patch is truly ``label`` when at least half of it lies in the truth; scored on all tissue
    patches and on those nobody labelled. Pixel level: IoU of the union of the predicted squares (the
    exported mask) with the truth polygons.
    """
    from wsi_il.metrics import polygon_iou
    from wsi_il.model import slides_matching
    from wsi_il.qupath import read_region, union_squares
    from wsi_il.readout import require_map
    from wsi_il.regions import fraction_inside
    from wsi_il.session import reviewed_ids

    predictions = require_map(ctx)
    slides = slides_matching(ctx, slide_id)
    if len(slides) != 1:
        known = ", ".join(s.id for s in ctx.table.slides if s.kind == "slide") or "none"
        raise InputError(
            "say which slide the truth belongs to"
            if slide_id is None and len(slides) > 1
            else f"slide {slide_id!r} is not a slide of the project",
            f"add --slide with one of: {known}",
        )
    slide = slides[0]
    label = ctx.classes[ctx.class_index(label or ctx.classes[0])]
    region, warnings = read_region(Path(truth_path), offset=slide.offset)
    indices = ctx.table.of_slide(slide.id)
    boxes = ctx.table.boxes[indices]
    predicted = predictions[indices].argmax(axis=1) == ctx.class_index(label)
    truth = fraction_inside(boxes, region) >= 0.5
    seen = reviewed_ids(ctx.project)
    unlabelled = np.array([ctx.table.ids[i] not in seen for i in indices], dtype=bool)
    mask = (
        union_squares(boxes[predicted, 0], boxes[predicted, 1], int(boxes[0, 2]), int(boxes[0, 3]))
        if predicted.any()
        else region.difference(region)
    )
    return {
        "slide": slide.id,
        "label": label,
        "patches": int(len(indices)),
        "truth_patches": int(truth.sum()),
        "predicted_patches": int(predicted.sum()),
        "labelled_patches": int((~unlabelled).sum()),
        "patch": binary_scores(predicted, truth).as_dict(),
        "patch_unlabelled": binary_scores(predicted[unlabelled], truth[unlabelled]).as_dict(),
        "pixel_iou": polygon_iou(mask, region),
        "warnings": warnings,
    }
