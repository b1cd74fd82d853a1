"""Sessions and rounds: query -> rank -> sample -> review batch; labels -> train -> next batch.

``simulate`` and the CLI both drive these functions; nothing here prints.
Crash safety: labels are appended to the ledger first, the session file is rewritten last; a command
killed in between is completed by running it again (training is seeded, so the result is the same).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.batch import BatchInfo, BatchPatch, read_batch
from wsi_il.config import FeatureSettings, SessionSettings, round_is_pooled, settings_of
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.imagefiles import load_image
from wsi_il.labels import read_labels
from wsi_il.model import (
    Context,
    counted,
    current_embeddings,
    current_predictions,
    embed_chunk,
    embed_features,
    init_state,
    last_pass_predictions,
    load_model,
    model_state,
    pass_title,
    save_model,
    stem_cache,
)
from wsi_il.project import Project, now_iso
from wsi_il.review import write_batch

REGION_MAX_BYTES = 64 * 2**20
"""The largest query GeoJSON read (after decompression): a few annotations take kilobytes."""
QUERY_IMAGE_MAX_PX = 25_000_000
"""The largest query image decoded (query images are patches of a few hundred px)."""


@dataclass(frozen=True)
class RoundResult:
    """What a session command did: the batch written (if any) and what to tell the user."""

    session: str
    round: int
    """The round of the batch written, else of the batch ingested."""
    rounds: int
    batch_dir: Path | None
    rule: str | None
    seconds: float
    changed: bool
    message: str
    pass_model: str | None = None
    """A model whose full pass the caller runs after releasing the project lock (``fullpass.run_pass``): a pooled
    round's, with ``ingest(pass_later=True)``."""


# ---- sessions ---------------------------------------------------------------------------------
def list_sessions(project: Project) -> list[dict[str, Any]]:
    """Return every session of the project, oldest first."""
    folder = project.root / "sessions"
    sessions = [project.read_json(p) for p in folder.glob("s*.json")] if folder.is_dir() else []
    return sorted(sessions, key=lambda s: int(s["id"][1:]))


def _open_session(project: Project) -> dict[str, Any] | None:
    return next((s for s in list_sessions(project) if s["state"] == "reviewing"), None)


def reviewed_ids(project: Project) -> set[str]:
    """Patches that never come back: every labelled patch and every query patch."""
    seen = {e["patch_id"] for e in project.read_ledger()}
    for session in list_sessions(project):
        seen.update(session["query"]["patch_ids"])
    return seen


def query_from_region(ctx: Context, region_path: Path, slide_id: str | None) -> tuple[np.ndarray, str, list[str]]:
    """Return the global indices of the tissue patches at least half inside a QuPath region."""
    from shapely.geometry import box

    from wsi_il.qupath import read_region
    from wsi_il.regions import patches_inside

    slides = [s for s in ctx.table.slides if s.kind == "slide"]
    if slide_id is None:
        if len(slides) != 1:
            raise InputError(
                f"the project has {len(slides)} slides; say which one the region was drawn on",
                f"add --slide with one of: {', '.join(s.id for s in slides)}",
            )
        slide = slides[0]
    else:
        matches = [s for s in slides if s.id == slide_id or Path(s.path).name == slide_id]
        if not matches:
            raise InputError(
                f"slide {slide_id!r} is not in the project", f"use one of: {', '.join(s.id for s in slides)}"
            )
        slide = matches[0]
    region, warnings = read_region(region_path, offset=slide.offset, max_bytes=REGION_MAX_BYTES)
    minx, miny, maxx, maxy = region.bounds
    if maxx <= 0 or maxy <= 0 or minx >= slide.width or miny >= slide.height:
        raise InputError(
            f"{region_path}: the region ({minx:.0f}, {miny:.0f})-({maxx:.0f}, {maxy:.0f}) lies "
            f"outside slide {slide.id} ({slide.width} x {slide.height} px)",
            "export the annotation from the same image in QuPath, or pick the slide with --slide",
        )
    indices = ctx.table.of_slide(slide.id)
    inside = indices[patches_inside(ctx.table.boxes[indices], region)]
    if len(inside) == 0 and region.difference(box(0, 0, slide.width, slide.height)).area > region.area / 2:
        raise InputError(
            f"{region_path}: no tissue patch of slide {slide.id} lies inside the region, and most of "
            f"the region lies outside the slide ({slide.width} x {slide.height} px): was it drawn on "
            "another slide?",
            "export the annotation from the same image in QuPath, or pick the slide with --slide",
        )
    if len(inside) == 0:
        raise InputError(
            f"{region_path}: no tissue patch of slide {slide.id} lies at least 50% inside the region",
            "draw a larger region over tissue (a patch is "
            f"{int(ctx.table.boxes[indices[0], 2]) if len(indices) else 0} px wide)",
        )
    return inside, slide.id, warnings


def query_from_patch_ids(ctx: Context, patch_ids: list[str]) -> np.ndarray:
    """Return the global indices of database patches named by id."""
    index = ctx.table.index_of()
    unknown = [p for p in patch_ids if p not in index]
    if unknown:
        raise InputError(
            f"patch ids not in the project: {', '.join(unknown[:5])}",
            "take ids from a batch's labels.csv or `wsi-il status --json`",
        )
    return np.array([index[p] for p in patch_ids], dtype=np.int64)


def extract_query_images(ctx: Context, paths: list[Path]) -> np.ndarray:
    """Compute trunk features of query images from outside the database."""
    from wsi_il.extraction import project_extractor
    from wsi_il.features import resize_tile

    extractor, settings = project_extractor(ctx.manifest, ctx.device)
    for path in paths:
        _check_image_size(path)
    tiles = np.stack([resize_tile(load_image(p), settings.input_px) for p in paths])
    return extractor(tiles)


def _check_image_size(path: Path) -> None:
    """Refuse a query image too large to be a patch before it is decoded (its header says its size)."""
    from PIL import Image, UnidentifiedImageError

    hint = "crop the patches you look for (a few hundred px each), or draw a region with --region"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path} is far too large for a query image ({exc})", hint) from exc
    except (OSError, UnidentifiedImageError, ValueError):
        return  # load_image says what is wrong with it
    if width * height > QUERY_IMAGE_MAX_PX:
        raise InputError(
            f"{path} is {width} x {height} px, more than a query image may have "
            f"({QUERY_IMAGE_MAX_PX / 1e6:g} megapixels)",
            hint,
        )


def start_session(
    ctx: Context,
    label: str,
    settings: SessionSettings,
    *,
    query_indices: np.ndarray | None = None,
    query_features: np.ndarray | None = None,
    source: str = "",
    slide: str | None = None,
    abandon: bool = False,
    images: list[str] | None = None,
) -> RoundResult:
    """Start a query session and write its first review batch."""
    started = time.perf_counter()
    project = ctx.project
    label_index = ctx.class_index(label)
    open_session = _open_session(project)
    if open_session is not None:
        if not abandon:
            batch = f"{open_session['id']}-r{open_session['round']}"
            raise ProjectStateError(
                f"session {open_session['id']} is waiting for the labels of batch {batch}",
                f"ingest them with `wsi-il ingest {project.root} {project.batch_dir(batch)}/labels.csv`, "
                f"or end that session with `wsi-il end {project.root}` (or pass --abandon)",
            )
    ids: list[str] = []
    if query_indices is not None:
        ids = [ctx.table.ids[i] for i in query_indices]
        query_features = ctx.store.take(query_indices)
    if query_features is None or len(query_features) == 0:
        raise InputError("the query is empty", "give a region, patch ids or query images")
    session_id = f"s{len(list_sessions(project)) + 1}"
    q = embed_features(ctx, query_features).mean(axis=0)
    session = {
        "id": session_id,
        "label": ctx.classes[label_index],
        "strategy": settings.strategy,
        "k": settings.k,
        "rounds": settings.rounds,
        "round": 1,
        "state": "reviewing",
        "query": {
            "source": source,
            "slide": slide,
            "patch_ids": ids,
            "n": int(len(query_features)),
            "images": images or [],
        },
        "q": q.tolist(),
        "created": now_iso(),
        "history": [],
    }
    rule = _write_next_batch(ctx, session, query_features)
    session["history"][-1]["seconds"] = round(time.perf_counter() - started, 3)
    # Nothing is recorded before the batch is written: a refusal or a kill up to here leaves the project as it
    # was (a half-written batch folder has no batch.json and is overwritten by the next try).
    if open_session is not None:
        open_session["state"] = "abandoned"
        project.write_json(project.session_path(open_session["id"]), open_session)
    project.write_array(project.query_features_path(session_id), query_features.astype(np.float16))
    project.write_json(project.session_path(session_id), session)
    batch_dir = project.batch_dir(f"{session_id}-r1")
    return RoundResult(
        session_id,
        1,
        settings.rounds,
        batch_dir,
        rule,
        time.perf_counter() - started,
        True,
        f"session {session_id} started with {len(query_features)} query patches",
    )


def end_session(project: Project) -> str:
    """End the open session before its last round: the labels given so far stay and the model trained on them
    stays current; the batch waiting for labels is closed unlabelled. Returns what was done, in words."""
    session = _open_session(project)
    if session is None:
        raise ProjectStateError("no session is open", f"start one with `wsi-il query {project.root} --region ...`")
    batch = f"{session['id']}-r{session['round']}"
    session["state"] = "ended"
    session["ended"] = now_iso()
    project.write_json(project.session_path(session["id"]), session)
    return (
        f"session {session['id']} ended after {session['round'] - 1} of {session['rounds']} rounds; "
        f"batch {batch} was closed unlabelled"
    )


def _round_seed(ctx: Context, session: dict[str, Any]) -> int:
    """The seed of a round's sampling: the project's seed, the session and the round."""
    return settings_of(ctx.manifest).train.seed * 1000 + int(session["id"][1:]) * 100 + session["round"]


def _unreviewed(ctx: Context, session: dict[str, Any], refuse_none: bool = True) -> np.ndarray:
    """A mask over the database of the patches neither reviewed nor in the session's query; with
    ``refuse_none``, a one-line error when there is none left."""
    seen = reviewed_ids(ctx.project) | set(session["query"]["patch_ids"])
    free = np.array([pid not in seen for pid in ctx.table.ids], dtype=bool)
    if refuse_none and not free.any():
        raise ProjectStateError(
            "every patch of the project has been reviewed",
            f"export the mask with `wsi-il export {ctx.project.root} --out mask.geojson`",
        )
    return free


def _write_next_batch(ctx: Context, session: dict[str, Any], query_features: np.ndarray | None = None) -> str:
    """Rank the unreviewed patches, sample K with the session's strategy and write the batch: all of them
    (exact), or a pool of them where the project's rounds are pooled (``query_features``: the query's, when the
    session file does not hold them yet)."""
    from wsi_il.index import rank_by_distance
    from wsi_il.sampling import sample

    settings = settings_of(ctx.manifest).round
    if round_is_pooled(settings, len(ctx.store)):
        return _write_pooled_batch(ctx, session, settings.pool_size, query_features)
    embeddings = current_embeddings(ctx)
    predictions = current_predictions(ctx)
    candidates = np.flatnonzero(_unreviewed(ctx, session))
    ranked, _ = rank_by_distance(embeddings, np.asarray(session["q"], dtype=np.float32), candidates)
    seed = _round_seed(ctx, session)
    rng = np.random.default_rng(seed)
    probs = predictions[ranked] if predictions is not None else None
    positions, rule = sample(
        session["strategy"], session["k"], len(ranked), rng, probs, ctx.class_index(session["label"])
    )
    chosen = ranked[positions]
    batch_id = f"{session['id']}-r{session['round']}"
    _write_batch_files(ctx, session, batch_id, chosen, positions, _suggestions(ctx, chosen, predictions), rule)
    session["history"].append(
        {
            "round": session["round"],
            "batch": batch_id,
            "rule": rule,
            "written": now_iso(),
            "candidates": int(len(ranked)),
            "features": features_name(settings_of(ctx.manifest).features),
        }
    )
    return rule


def _write_pooled_batch(
    ctx: Context, session: dict[str, Any], pool_size: int, query_features: np.ndarray | None
) -> str:
    """Choose a pool of unreviewed patches in the frozen embedding, re-embed and rank only the pool with the
    current heads, sample K with the session's strategy and write the batch."""
    from wsi_il.index import rank_by_distance
    from wsi_il.pool import choose_pool, embed_rows, frozen_query
    from wsi_il.sampling import sample

    started = time.perf_counter()
    free = _unreviewed(ctx, session)
    if "frozen_q" not in session:
        if query_features is None:
            query_features = ctx.project.read_array(ctx.project.query_features_path(session["id"]))
        session["frozen_q"] = frozen_query(ctx, query_features).tolist()
    seed = _round_seed(ctx, session)
    pool = choose_pool(ctx, session, free, pool_size, np.random.default_rng([seed, 1]), last_pass_predictions(ctx))
    rows, drawn = pool.rows, None
    if session["strategy"] == "random" and len(pool.rows) < pool.unreviewed:
        # A random batch needs no ranking: it is drawn from every unreviewed patch, not from the pool (which
        # leans towards the query), and joins the pool only to be ranked and given its suggestions.
        drawn = np.random.default_rng([seed, 2]).choice(
            np.flatnonzero(free), size=min(session["k"], int(free.sum())), replace=False
        )
        rows = np.union1d(pool.rows, drawn)
    chosen_at = time.perf_counter()
    embeddings, probabilities = embed_rows(ctx, rows, model_state(ctx)["model"])
    embedded_at = time.perf_counter()
    order, _ = rank_by_distance(embeddings, np.asarray(session["q"], dtype=np.float32), np.arange(len(rows)))
    ranked = rows[order]
    probs = probabilities[order] if probabilities is not None else None
    if drawn is not None:
        positions, rule = np.flatnonzero(np.isin(ranked, drawn)), "random"
    else:
        positions, rule = sample(
            session["strategy"],
            session["k"],
            len(ranked),
            np.random.default_rng(seed),
            probs,
            ctx.class_index(session["label"]),
        )
    batch_id = f"{session['id']}-r{session['round']}"
    chosen = ranked[positions]
    _write_batch_files(ctx, session, batch_id, chosen, positions, _suggestions(ctx, chosen, probs, positions), rule)
    session["history"].append(
        {
            "round": session["round"],
            "batch": batch_id,
            "rule": rule,
            "written": now_iso(),
            "candidates": pool.unreviewed,
            "pool": pool.record(),
            "pool_seconds": round(chosen_at - started, 3),
            "pool_embed_seconds": round(embedded_at - chosen_at, 3),
            "features": features_name(settings_of(ctx.manifest).features),
        }
    )
    return rule


def features_name(features: FeatureSettings) -> str:
    """A short name of the weights a project's features come from: imagenet, random or the file's name."""
    source = str(features.weights)
    name = source if source in ("imagenet", "random") else Path(source).name
    sha = features.weights_sha256
    return f"{name} ({sha[:8]})" if sha and source not in ("imagenet", "random") else name


def redraw_waiting_batch(ctx: Context, session: dict[str, Any]) -> str | None:
    """Draw a session's waiting batch again with the current features; the labels given so far are kept.

    The patches already labelled in its labels.csv (by hand or from the review desk) stay in the batch with their
    labels; the other places are drawn again. Returns the batch id, or None when the session waits for no batch.
    """
    from wsi_il.answers import read_answers

    batch_id = f"{session['id']}-r{session['round']}"
    folder = ctx.project.batch_dir(batch_id)
    entry = session["history"][-1] if session["history"] else None
    if session["state"] != "reviewing" or entry is None or entry.get("batch") != batch_id or entry.get("ingested"):
        return None
    _finish_swap(folder)
    info, patches = read_batch(folder)
    for _ in range(3):  # the review desk may write an answer meanwhile (it does not take the project lock)
        answers = {pid: label for pid, label in read_answers(folder, info, patches).items() if label}
        fresh = _draw_again(ctx, session, batch_id, answers)
        if {pid: label for pid, label in read_answers(folder, info, patches).items() if label} == answers:
            break
    old = folder.with_name(f".{batch_id}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    _finish_swap(folder)
    entry.update(
        {
            "rule": fresh[0],
            "features": features_name(settings_of(ctx.manifest).features),
            "redrawn": now_iso(),
            "kept_labels": len(answers),
            "candidates": fresh[1],
        }
    )
    return batch_id


def _draw_again(ctx: Context, session: dict[str, Any], batch_id: str, answers: dict[str, str]) -> tuple[str, int]:
    """Write the redrawn batch beside the waiting one (``.<batch>.redraw``); return its rule and candidates."""
    from wsi_il.answers import write_answers
    from wsi_il.batch import NOT_PREFIX
    from wsi_il.index import rank_by_distance
    from wsi_il.sampling import sample

    folder = ctx.project.batch_dir(batch_id)
    entry = session["history"][-1]
    index = ctx.table.index_of()
    kept = np.array([index[pid] for pid in answers], dtype=np.int64)
    candidates = np.flatnonzero(_unreviewed(ctx, session, refuse_none=False))
    ranked, _ = rank_by_distance(current_embeddings(ctx), np.asarray(session["q"], dtype=np.float32), candidates)
    rest = ranked[~np.isin(ranked, kept)]
    predictions = current_predictions(ctx)
    seed = _round_seed(ctx, session)
    drawn, rule = np.zeros(0, dtype=np.int64), str(entry.get("rule", session["strategy"]))
    if session["k"] > len(kept) and len(rest):
        drawn, rule = sample(
            session["strategy"],
            session["k"] - len(kept),
            len(rest),
            np.random.default_rng(seed),
            predictions[rest] if predictions is not None else None,
            ctx.class_index(session["label"]),
        )
    chosen = np.concatenate([kept, rest[drawn]]).astype(np.int64)
    place = {int(i): n for n, i in enumerate(ranked.tolist())}
    positions = np.array([place.get(int(i), 0) for i in chosen], dtype=np.int64)
    fresh = folder.with_name(f".{batch_id}.redraw")
    shutil.rmtree(fresh, ignore_errors=True)
    suggestions = _suggestions(ctx, chosen, predictions)
    _write_batch_files(ctx, session, batch_id, chosen, positions, suggestions, rule, folder=fresh)
    new_info, new_patches = read_batch(fresh)
    write_answers(
        fresh,
        new_info,
        new_patches,
        {pid: "no" if label.startswith(NOT_PREFIX) else label for pid, label in answers.items()},
    )
    return rule, int(len(ranked))


def _finish_swap(folder: Path) -> None:
    """Complete a batch redraw that a kill interrupted: put the new folder in place of the old one."""
    fresh = folder.with_name(f".{folder.name}.redraw")
    old = folder.with_name(f".{folder.name}.replaced")
    if not folder.exists() and fresh.is_dir() and (fresh / "batch.json").is_file():
        os.replace(fresh, folder)
    elif not folder.exists() and old.is_dir():
        os.replace(old, folder)
    if folder.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)


def _suggestions(
    ctx: Context, chosen: np.ndarray, predictions: np.ndarray | None, rows: np.ndarray | None = None
) -> np.ndarray | None:
    """The class probabilities a batch shows for its patches ``chosen``: the map's (``wsi_il.readout``) where the
    current model has a read-out, else the classifier head's ``predictions`` (at ``rows``, or at ``chosen``: every
    patch's) where there are any."""
    from wsi_il.readout import kept_map

    shown = kept_map(ctx)
    if shown is not None:
        return np.asarray(shown[chosen])
    return None if predictions is None else predictions[chosen if rows is None else rows]


def _write_batch_files(
    ctx: Context,
    session: dict[str, Any],
    batch_id: str,
    chosen: np.ndarray,
    positions: np.ndarray,
    suggestions: np.ndarray | None,
    rule: str,
    folder: Path | None = None,
) -> None:
    """Write a batch of the patches ``chosen`` at ``positions`` of the ranking, with the classifier's
    probabilities of each (``suggestions``, in the order of ``chosen``) where one exists."""
    from wsi_il.slide import TileReader
    from wsi_il.threads import core_threads

    info = BatchInfo(
        batch_id=batch_id,
        project_uid=ctx.manifest["uid"],
        session=session["id"],
        round=session["round"],
        rounds=session["rounds"],
        query_label=session["label"],
        classes=tuple(ctx.classes),
        strategy=rule,
    )
    patches = []
    for number, (index, position) in enumerate(zip(chosen.tolist(), positions.tolist(), strict=True)):
        slide = ctx.table.slides[int(ctx.table.slide_index[index])]
        x, y, w, h = (int(v) for v in ctx.table.boxes[index])
        suggestion, probability = None, None
        if suggestions is not None:
            best = int(suggestions[number].argmax())
            suggestion, probability = ctx.classes[best], float(suggestions[number, best])
        patches.append(
            BatchPatch(
                ctx.table.ids[index],
                slide.id,
                x,
                y,
                w,
                h,
                suggestion,
                probability,
                None if rule == "random" else position + 1,
            )
        )
    readers: dict[str, Any] = {}  # one open slide for all the batch's patches of it, shared by the threads
    try:
        for position in np.unique(ctx.table.slide_index[chosen]).tolist():
            slide = ctx.table.slides[position]
            if slide.kind != "patches":
                readers[slide.id] = TileReader(Path(slide.path))
        pictures = list(core_threads().map(lambda index: _patch_image(ctx, index, readers), chosen.tolist()))
    finally:
        for reader in readers.values():
            reader.close()
    write_batch(
        folder or ctx.project.batch_dir(batch_id),
        info,
        patches,
        [image for image, _ in pictures],
        ctx.offsets(),
        project_hint=str(ctx.project.root),
        contexts=[context for _, context in pictures],
    )


class _ReadRegion:
    """Pixels already read from a slide, handed out as a ``TileReader`` would read them (level-0 boxes)."""

    def __init__(self, pixels: np.ndarray, left: int, top: int) -> None:
        self.pixels, self.left, self.top = pixels, left, top

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self.pixels[y - self.top : y - self.top + height, x - self.left : x - self.left + width]


def _patch_image(ctx: Context, index: int, readers: dict[str, Any]):
    """The patch's pixels and what the contact sheet shows of it: its 3 x 3 neighbourhood with the patch outlined
    (None for a patch-folder image, which has no slide around it). The neighbourhood is read once from the slide's
    reader in ``readers`` and the patch cut from it."""
    from PIL import Image

    from wsi_il.context import context_box, context_image
    from wsi_il.sheet import sheet_picture_px

    slide = ctx.table.slides[int(ctx.table.slide_index[index])]
    if slide.kind == "patches":
        local = index - int(np.flatnonzero(ctx.table.slide_index == ctx.table.slide_index[index])[0])
        files = ctx.project.read_json(ctx.project.images_path(slide.id))["files"]
        return Image.fromarray(load_image(Path(slide.path) / files[local])), None
    x, y, w, h = (int(v) for v in ctx.table.boxes[index])
    size = (slide.width, slide.height)
    left, top, width, height = context_box((x, y, w, h), size)
    region = _ReadRegion(readers[slide.id].read(left, top, width, height), left, top)
    patch = Image.fromarray(np.ascontiguousarray(region.read(x, y, w, h)))
    return patch, context_image(region, (x, y, w, h), size, size_px=sheet_picture_px(max(w, h), context=True))


# ---- ingest -----------------------------------------------------------------------------------
def find_batch_dir(project: Project, labels_path: Path) -> Path:
    """Return the batch folder that a labels file belongs to (its own folder, or named in it)."""
    labels_path = Path(labels_path)
    if labels_path.is_dir():
        return labels_path
    if (labels_path.parent / "batch.json").is_file():
        return labels_path.parent
    raise InputError(
        f"{labels_path} is not inside a review batch folder (no batch.json beside it)",
        f"give the labels.csv inside {project.root / 'batches'}/<batch>/, or copy the file back there",
    )


def ingest(ctx: Context, labels_path: Path, allow_partial: bool = False, pass_later: bool = False) -> RoundResult:
    """Record a batch's labels, train both heads, refine the query and write the next batch.

    A pooled round then runs the full pass here, or with ``pass_later`` leaves it to the caller, who runs it
    outside the project lock (``RoundResult.pass_model``); so does an ingest run again to finish a pass."""
    started = time.perf_counter()
    project = ctx.project
    labels_path = Path(labels_path)
    batch_dir = find_batch_dir(project, labels_path)
    if labels_path.is_dir():
        labels_path = batch_dir / "labels.csv"
    info, patches = read_batch(batch_dir)
    if info.project_uid != ctx.manifest["uid"]:
        raise InputError(
            f"{labels_path} belongs to another project (uid {info.project_uid[:8]})",
            "ingest it into the project that wrote the batch",
        )
    labels = read_labels(labels_path, info, patches, allow_partial=allow_partial, offsets=ctx.offsets())
    session = project.read_json(project.session_path(info.session))
    if session is None:
        raise ProjectStateError(
            f"session {info.session} of batch {info.batch_id} is not in the project",
            "the project folder may be incomplete",
        )
    entry = session["history"][info.round - 1] if len(session["history"]) >= info.round else None
    if entry is not None and entry.get("ingested"):
        previous = _labels_now(project, info.batch_id)
        if previous != labels:
            changed = sorted(p for p in set(previous) | set(labels) if previous.get(p) != labels.get(p))
            raise ProjectStateError(
                f"batch {info.batch_id} was already ingested with other labels (differences: {', '.join(changed[:5])})",
                "labels already given are kept; to correct them run "
                f"`wsi-il relabel {project.root} --labels {labels_path}` (the next round trains on the correction)",
            )
        # Run again after a pooled round: the pass it owes is left to the caller (``pass_later``) or run here.
        owed = unfinished_pass(ctx) if pass_later else None
        finished = None if pass_later else finish_full_pass(ctx)
        if owed is not None:
            news = "; its full pass is unfinished"
        elif finished is not None:
            news = "; the full pass it left unfinished is done now"
        else:
            news = "; nothing changed"
        return RoundResult(
            session["id"],
            info.round,
            session["rounds"],
            None,
            None,
            time.perf_counter() - started,
            finished is not None,
            f"batch {info.batch_id} was already ingested{news}",
            owed,
        )
    if session["state"] != "reviewing" or session["round"] != info.round:
        raise ProjectStateError(
            f"batch {info.batch_id} is not the batch session {session['id']} waits for "
            f"(state {session['state']}, round {session['round']})",
            "ingest the newest batch of the open session",
        )
    # Crash safety: the labels are made durable first, the session file is rewritten last. A command killed
    # in between is finished by running it again: the ledger is completed, not duplicated, and training is
    # seeded, so the round comes out as it would have.
    # A pooled round writes the next batch before the full pass, and the session file with it: the expert can
    # start while the pass runs. A pass cut short is finished by the same ingest run again, or redone by the
    # next round's (every command reads the predictions of a model whose pass is complete, or none).
    pooled = round_is_pooled(settings_of(ctx.manifest).round, len(ctx.store))
    recorded = _record_labels(ctx, info, labels)
    train_seconds, pass_seconds = train_round(ctx, info.batch_id, full_pass=not pooled)
    relevant = [pid for pid, lab in labels.items() if lab == session["label"]]
    session["q"] = refined_query(ctx, session, relevant, pooled).tolist()
    entry["ingested"] = now_iso()
    entry["labels"] = len(labels)
    entry["train_seconds"] = round(train_seconds, 3)
    if not pooled:
        entry["pass_seconds"] = round(pass_seconds, 3)
    batch_out, rule = None, None
    if session["round"] < session["rounds"]:
        session["round"] += 1
        batch_started = time.perf_counter()
        rule = _write_next_batch(ctx, session)
        entry["batch_seconds"] = round(time.perf_counter() - batch_started, 3)
        batch_out = project.batch_dir(f"{session['id']}-r{session['round']}")
        message = f"{recorded} labels recorded; batch {session['id']}-r{session['round']} is ready"
    else:
        session["state"] = "done"
        message = f"{recorded} labels recorded; session {session['id']} is complete ({session['rounds']} rounds)"
    entry["round_seconds"] = round(time.perf_counter() - started, 3)
    project.write_json(project.session_path(session["id"]), session)
    if pooled and not pass_later:
        ctx.reporter.info(f"{message}; now updating every patch's predictions (the full pass)")
        entry["pass_seconds"] = round(full_pass(ctx, info.batch_id), 3)
        project.write_json(project.session_path(session["id"]), session)
    return RoundResult(
        session["id"],
        session["round"],
        session["rounds"],
        batch_out,
        rule,
        time.perf_counter() - started,
        True,
        message,
        info.batch_id if pooled and pass_later else None,
    )


def _ledger_labels(project: Project, batch_id: str, ledger: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """The labels a batch's ingest recorded (corrections made since are entries of their own)."""
    return {
        e["patch_id"]: e["label"]
        for e in (project.read_ledger() if ledger is None else ledger)
        if e.get("batch") == batch_id and e.get("source") != "correction"
    }


def _labels_now(project: Project, batch_id: str) -> dict[str, str]:
    """A batch's patches with their labels as they stand now (corrections made since included)."""
    from wsi_il.project import current_labels

    ledger = project.read_ledger()
    now = current_labels(ledger)
    return {pid: now[pid]["label"] for pid in _ledger_labels(project, batch_id, ledger)}


def _record_labels(ctx: Context, info: BatchInfo, labels: dict[str, str]) -> int:
    """Append a batch's labels to the ledger once; an append cut short by a kill is completed, never repeated."""
    previous = _ledger_labels(ctx.project, info.batch_id)
    changed = sorted(p for p in previous if labels.get(p) != previous[p])
    if changed:
        raise ProjectStateError(
            f"batch {info.batch_id}'s labels were recorded by an ingest that did not finish, with other labels "
            f"for {', '.join(changed[:5])}",
            "labels already given are kept: restore them in the labels file and "
            "run the same ingest again to finish the round",
        )
    missing = [(pid, label) for pid, label in labels.items() if pid not in previous]
    if missing:
        when = now_iso()
        ctx.project.append_ledger(
            [
                {
                    "patch_id": pid,
                    "label": label,
                    "batch": info.batch_id,
                    "session": info.session,
                    "round": info.round,
                    "time": when,
                }
                for pid, label in missing
            ]
        )
    return len(labels)


def training_set(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """Return features and targets of every label as it stands (newest answer wins) plus every session's query
    patches."""
    features, targets, _ = _training_rows(ctx)
    return features, targets


def _training_rows(ctx: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``training_set`` and each row's group: -1 for a label, the session's number for its query patches."""
    features, targets, groups, _ = training_entries(ctx)
    return features, targets, groups


def training_entries(ctx: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_training_rows`` and each row's database index (-1 for a query patch from outside the database: a query
    of images)."""
    from wsi_il.project import current_labels

    index = ctx.table.index_of()
    labelled = current_labels(ctx.project.read_ledger()).values()  # a corrected patch counts once, as corrected
    entries = [e for e in labelled if e["label"] != "skip" and e["patch_id"] in index]
    targets = [_target(ctx, e["label"]) for e in entries]
    rows = [np.array([index[e["patch_id"]] for e in entries], dtype=np.int64)]
    features = [ctx.store.take(rows[0])]
    groups = [-1] * len(entries)
    for number, session in enumerate(list_sessions(ctx.project)):
        query = ctx.project.read_array(ctx.project.query_features_path(session["id"]))
        ids = session["query"].get("patch_ids") or []
        known = len(ids) == len(query) and all(i in index for i in ids)
        rows.append(np.array([index[i] for i in ids] if known else [-1] * len(query), dtype=np.int64))
        features.append(query)
        targets.extend([ctx.class_index(session["label"])] * len(query))
        groups.extend([number] * len(query))
    return (
        np.concatenate(features),
        np.array(targets, dtype=np.int64),
        np.array(groups, dtype=np.int64),
        np.concatenate(rows),
    )


def _target(ctx: Context, label: str) -> int:
    if label.startswith("not:"):
        return -(ctx.class_index(label[4:]) + 1)
    return ctx.class_index(label)


def train_round(ctx: Context, model_id: str, full_pass: bool = True) -> tuple[float, float]:
    """Train both heads on all labels, then (with ``full_pass``) embed and predict every patch with them (one
    pass); returns the seconds of each (the heads saved with the training, the results saved with the pass)."""
    from wsi_il.config import resolve_schedule
    from wsi_il.heads import TrainedHeads, planned_epochs, train_heads, training_selection
    from wsi_il.readout import train_readout, write_map

    started = time.perf_counter()
    settings = settings_of(ctx.manifest).train
    schedule = resolve_schedule(settings, ctx.device)
    features, targets, groups, patches = training_entries(ctx)
    rows, weights = training_selection(targets, groups, settings.balance, settings.seed)
    init = init_state(ctx)
    state = model_state(ctx)
    # A rerun after a kill may find this round's own model already current: start from the one before it.
    base = state.get("previous") if state["model"] == model_id else state["model"]
    start = None
    if (settings.warm_start or schedule == "fast") and base:
        previous = load_model(ctx, base)
        start = TrainedHeads(previous["retrieval"], previous["classifier"], len(ctx.classes), {})
    advance = ctx.reporter.task(
        f"training on {len(rows)} labels ({schedule} schedule)", planned_epochs(settings, len(rows), schedule), "epochs"
    )
    heads = train_heads(
        features[rows],
        targets[rows],
        init,
        len(ctx.classes),
        settings,
        ctx.device,
        start,
        advance,
        schedule,
        weights=weights,
    )
    readout = train_readout(ctx, features, targets, groups, patches)  # the map's: every row, not only ``rows``
    model = {**heads.model(), "classes": ctx.classes, "n_labels": int(len(targets)), "readout": readout}
    save_model(ctx, model_id, model)
    # The model is current from here; the cached embeddings and predictions stay those of the model they were
    # computed with until the pass replaces them (the map is its read-out's, computed next).
    ctx.project.write_json(
        ctx.project.state_path(),
        {
            "model": model_id,
            "embeddings": state.get("embeddings"),
            "predictions": state.get("predictions"),
            "n_labels": int(len(targets)),
            "previous": base,
        },
    )
    write_map(ctx, model_id, readout)
    trained = time.perf_counter()
    if not full_pass:
        return trained - started, 0.0
    return trained - started, _full_pass(ctx, model_id, heads.model(), init)


def full_pass(ctx: Context, model_id: str) -> float:
    """Embed and predict every patch with a round's saved heads and make them the cached ones; returns its
    seconds."""
    return _full_pass(ctx, model_id, load_model(ctx, model_id), init_state(ctx))


def unfinished_pass(ctx: Context) -> str | None:
    """The current model when its full pass has not been entered yet (cut short, or still running), else None."""
    state = model_state(ctx)
    if not state["model"] or (state.get("embeddings") == state.get("predictions") == state["model"]):
        return None
    return str(state["model"])


def finish_full_pass(ctx: Context) -> float | None:
    """Run the current model's full pass when a command cut short left it undone; returns its seconds, or None
    when there was nothing to finish."""
    model_id = unfinished_pass(ctx)
    return None if model_id is None else full_pass(ctx, model_id)


def _full_pass(ctx: Context, model_id: str, model: dict[str, Any], init: dict[str, Any]) -> float:
    from wsi_il.heads import embed_and_predict

    started = time.perf_counter()
    stems = stem_cache(ctx, model["classifier"], init) if model.get("frozen_stem") else None
    advance = ctx.reporter.task(pass_title("re-embedding and predicting", stems), len(ctx.store))
    chunks = counted(ctx.store.chunks(embed_chunk(ctx.device)), advance)
    embeddings, predictions = embed_and_predict(
        model, init, len(ctx.classes), chunks, len(ctx.store), ctx.device, stems
    )
    if stems is not None:
        stems.finish()
    ctx.project.write_array(ctx.project.embeddings_path(), embeddings)
    ctx.project.write_array(ctx.project.predictions_path(), predictions)
    ctx.project.write_json(
        ctx.project.state_path(), {**model_state(ctx), "embeddings": model_id, "predictions": model_id}
    )
    return time.perf_counter() - started


def rehearse(ctx: Context, batch_dir: Path) -> float:
    """Train the heads for one epoch on the training set the ingest of ``batch_dir`` will have (every label so
    far and the queries, and the batch's patches with placeholder classes), put one block of features through
    the result, and discard it all: nothing is written. Returns its seconds.

    What the first training of a process pays once is then paid before the labels arrive (``wsi-il watch``
    rehearses while the expert labels): the optimiser's first step imports ``torch._dynamo`` (about a second on
    a 2-core machine), and on a GPU the kernels load and the steps' graphs are captured at these batch sizes for
    the first time (about half of a first round on an H100, docs/speed.md).
    """
    from wsi_il.heads import embed_and_predict, train_heads

    started = time.perf_counter()
    settings = settings_of(ctx.manifest).train
    features, targets = training_set(ctx)
    index = ctx.table.index_of()
    rows = np.array([index[p.patch_id] for p in read_batch(batch_dir)[1] if p.patch_id in index], dtype=np.int64)
    features = np.concatenate([features, ctx.store.take(rows)])
    targets = np.concatenate([targets, np.arange(len(rows)) % len(ctx.classes)])
    init = init_state(ctx)
    heads = train_heads(
        features, targets, init, len(ctx.classes), replace(settings, epochs=1), ctx.device, early_stopping=False
    )
    chunk = min(len(ctx.store), embed_chunk(ctx.device))
    embed_and_predict(heads.model(), init, len(ctx.classes), [(0, ctx.store.take(np.arange(chunk)))], chunk, ctx.device)
    return time.perf_counter() - started


def refined_query(ctx: Context, session: dict[str, Any], relevant: list[str], pooled: bool = False) -> np.ndarray:
    """Recompute q with the new head; with refinement, average it with this round's relevant patches (in a pooled
    round embedded on their own, the full pass being still to come)."""
    settings = settings_of(ctx.manifest).train
    query = ctx.project.read_array(ctx.project.query_features_path(session["id"]))
    q = embed_features(ctx, query).mean(axis=0)
    if not settings.refine_query or not relevant:
        return q
    index = ctx.table.index_of()
    rows = np.array([index[p] for p in relevant], dtype=np.int64)
    if pooled:
        from wsi_il.pool import embed_rows

        order = np.argsort(rows, kind="stable")
        embedded = np.empty((len(rows), len(q)), dtype=np.float32)
        embedded[order] = embed_rows(ctx, rows[order], model_state(ctx)["model"])[0]
    else:
        embedded = current_embeddings(ctx)[rows]
    return np.vstack([q[None, :], embedded]).mean(axis=0)
