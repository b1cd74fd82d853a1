"""A pooled round's candidates (docs/cluster.md "Rounds at cohort scale").

Every patch's *frozen* embedding, the pretrained block's, is computed once per project and kept as float16
(``FROZEN_DTYPE``: 1 KB a patch at 512 values), with a search index over it (``wsi_il.index``: exact up to
``index.FLAT_UP_TO`` patches, IVF-PQ above, saved whole). A pooled round picks at most ``pool_size`` unreviewed
patches with them, without reading any patch's features: the frozen embedding's nearest patches to the query and
to the session's labelled positives, the last full pass's predicted positives nearest to and farthest from the
query, and a seeded random sample of the rest. ``session`` then re-embeds only the pool with the round's heads
(``embed_rows``) and ranks it exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_il.database import RowWriter
from wsi_il.errors import ProjectStateError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir
from wsi_il.model import Context, counted, embed_chunk, init_state, load_model, stem_cache
from wsi_il.project import Project, current_labels
from wsi_il.stems import ProjectStems, add_feature_files

FROZEN_DTYPE = np.float16
"""The frozen embedding's storage: 2 bytes a value (1,024 bytes a patch for a 512-wide block)."""
QUERY_SHARE = 0.25
"""The share of a pool taken from the frozen embedding's nearest patches to the session's query."""
POSITIVES_SHARE = 0.25
"""The share taken from the nearest patches to the session's labelled positives (shared among them)."""
PREDICTED_SHARE = 0.25
"""The share taken from the last full pass's predicted positives: half nearest to the query, half farthest."""
PREDICTED_SAMPLE = 4
"""The predicted positives measured against the query: at most this many times their share, drawn at random, so
that choosing them costs the pool's size, not the cohort's."""
FROZEN_BLOCK = 16
"""Chunks of the database embedded per call while the frozen embedding is computed (``model.embed_chunk``)."""


@dataclass(frozen=True)
class Pool:
    """The unreviewed patches a pooled round ranks, and where they came from."""

    rows: np.ndarray
    """Global patch indices, ascending."""
    unreviewed: int
    """How many unreviewed patches the pool was chosen from."""
    parts: dict[str, int] = field(default_factory=dict)
    """How many patches each source added (query, positives, predicted, random; 'all' when the pool holds every
    unreviewed patch)."""
    predictions_of: str | None = None
    """The model whose full pass's predictions chose the predicted positives (None: there were none)."""

    def record(self) -> dict[str, Any]:
        """What the session history keeps of the pool."""
        return {"size": int(len(self.rows)), "parts": self.parts, "predictions_of": self.predictions_of}


# ---- the frozen embedding and its index ------------------------------------------------------------
def frozen_key(project: Project, manifest: dict[str, Any]) -> str:
    """A digest of what the frozen embedding is computed from: the pretrained block and every features file."""
    digest = hashlib.sha256()
    model = project.init_model_path()
    if model.is_file():
        stat = model.stat()
        digest.update(f"init:{stat.st_size}:{stat.st_mtime_ns}".encode())
    add_feature_files(digest, project, manifest)
    return digest.hexdigest()


def _frozen_meta(project: Project) -> dict[str, Any]:
    try:
        meta = project.read_json(project.frozen_meta_path(), default={})
    except ProjectStateError:  # a damaged record: the embedding is computed again, nothing is lost
        meta = {}
    return meta if isinstance(meta, dict) else {}


def frozen_embeddings(ctx: Context) -> np.ndarray:
    """Every patch's frozen embedding (float16, memory-mapped), computed once and again after the features change
    (``add-slide``, ``reextract``), with its norm before normalisation (``frozen_norms``). Each is written under a
    temporary name and renamed when complete, so a killed computation leaves no half array behind."""
    project = ctx.project
    key, path = frozen_key(project, ctx.manifest), project.frozen_embeddings_path()
    meta = _frozen_meta(project)
    if meta.get("key") == key and path.is_file() and project.frozen_norms_path().is_file():
        frozen = np.load(path, mmap_mode="r", allow_pickle=False)
        norms = np.load(project.frozen_norms_path(), mmap_mode="r", allow_pickle=False)
        if len(frozen) == len(norms) == len(ctx.store) and frozen.dtype == FROZEN_DTYPE:
            return frozen
    _compute_frozen(ctx, path, project.frozen_norms_path())
    project.frozen_index_path().unlink(missing_ok=True)
    atomic_write_text(project.frozen_meta_path(), json.dumps({"key": key, "patches": len(ctx.store)}) + "\n")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def frozen_norms(ctx: Context) -> np.ndarray:
    """Every patch's pooled output's L2 norm under the pretrained block (float32, memory-mapped): the frozen
    embedding times it is the pooled output itself. Computed with the frozen embedding."""
    frozen_embeddings(ctx)
    return np.load(ctx.project.frozen_norms_path(), mmap_mode="r", allow_pickle=False)


def _compute_frozen(ctx: Context, path: Any, norms_path: Any) -> None:
    from wsi_il.heads import block_width, pooled_output, pretrained_retrieval

    init = init_state(ctx)
    retrieval = pretrained_retrieval(init)
    n = len(ctx.store)
    partial = path.with_name(f".{path.name}.partial")
    partial_norms = norms_path.with_name(f".{norms_path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = RowWriter(partial, (n, block_width(init)), FROZEN_DTYPE, create=True)
    norms = RowWriter(partial_norms, (n,), np.float32, create=True)
    advance = ctx.reporter.task("pretrained embedding (once)", n)
    size = FROZEN_BLOCK * embed_chunk(ctx.device)
    pending: list[tuple[int, np.ndarray]] = []
    first = 0

    def flush() -> None:
        count = sum(len(block) for _, block in pending)
        pooled = pooled_output(retrieval, init, pending, count, ctx.device)
        norm = np.linalg.norm(pooled, axis=1)
        writer.write(first, (pooled / np.maximum(norm, 1e-12)[:, None]).astype(FROZEN_DTYPE), durable=False)
        norms.write(first, norm.astype(np.float32), durable=False)
        advance(count)
        pending.clear()

    try:
        for start, block in ctx.store.chunks(embed_chunk(ctx.device)):
            if not pending:
                first = start
            pending.append((start - first, block))
            if start + len(block) - first >= size:
                flush()
        if pending:
            flush()
        writer.sync()
        norms.sync()
    finally:
        writer.close()
        norms.close()
    os.replace(partial_norms, norms_path)
    os.replace(partial, path)
    fsync_dir(path.parent)


def frozen_index(ctx: Context, frozen: np.ndarray) -> Any:
    """The search index over the frozen embeddings: an exact one is built when asked (it holds the vectors
    themselves), an approximate one is built once and saved whole."""
    from wsi_il import index as search

    if len(frozen) <= search.FLAT_UP_TO:
        return search.build_index(frozen)
    project = ctx.project
    meta = _frozen_meta(project)
    path = project.frozen_index_path()
    if meta.get("index") == meta.get("key") and path.is_file():
        built = search.index_from_bytes(path.read_bytes())
        if built.ntotal == len(frozen):
            return built
    ctx.reporter.status(f"building the search index over {len(frozen)} patches (once, for pooled rounds)")
    built = search.build_index(frozen, seed=0, flat_up_to=search.FLAT_UP_TO)
    atomic_write_bytes(path, search.index_bytes(built))
    atomic_write_text(project.frozen_meta_path(), json.dumps({**meta, "index": meta.get("key")}) + "\n")
    return built


def frozen_query(ctx: Context, features: np.ndarray) -> np.ndarray:
    """The frozen embedding of a query: the mean of its patches' embeddings under the pretrained block."""
    from wsi_il.heads import embed, pretrained_retrieval

    init = init_state(ctx)
    return embed(pretrained_retrieval(init), init, [(0, features)], len(features), ctx.device).mean(axis=0)


# ---- the pool -------------------------------------------------------------------------------------
def choose_pool(
    ctx: Context,
    session: dict[str, Any],
    unreviewed: np.ndarray,
    pool_size: int,
    rng: np.random.Generator,
    predictions: tuple[np.ndarray, str] | None,
) -> Pool:
    """Choose at most ``pool_size`` of the ``unreviewed`` patches (a boolean mask over the database) for a round.

    ``predictions``: the last full pass's class probabilities of every patch and the model they come from."""
    free = unreviewed.copy()
    total = int(free.sum())
    if total <= pool_size:
        return Pool(np.flatnonzero(free), total, {"all": total})
    frozen = frozen_embeddings(ctx)
    index = frozen_index(ctx, frozen)
    reviewed = len(free) - total
    query = np.asarray(session["frozen_q"], dtype=np.float32)
    parts: dict[str, int] = {}
    taken: list[np.ndarray] = []

    def take(name: str, rows: np.ndarray, most: int) -> None:
        rows = rows[rows >= 0]
        rows = rows[free[rows]]
        _, first = np.unique(rows, return_index=True)
        rows = rows[np.sort(first)][:most]  # in the order given, each once
        free[rows] = False
        parts[name] = int(len(rows))
        taken.append(rows)

    share = int(pool_size * QUERY_SHARE)
    from wsi_il.index import search_index

    take("query", search_index(index, query, share + reviewed)[0], share)
    positives = _session_positives(ctx, session)
    if len(positives):
        share = int(pool_size * POSITIVES_SHARE)
        each = math.ceil(share / len(positives)) + reviewed
        found = search_index(index, np.asarray(frozen[positives], dtype=np.float32), each)
        take("positives", found.T.reshape(-1), share)  # the first neighbour of each, then the second, ...
    predictions_of = None
    if predictions is not None:
        probabilities, predictions_of = predictions
        share = int(pool_size * PREDICTED_SHARE)
        take("predicted", _predicted_ends(ctx, session, probabilities, frozen, query, free, share, rng), share)
    rest = np.flatnonzero(free)
    need = min(pool_size - sum(parts.values()), len(rest))
    take("random", rng.choice(rest, size=need, replace=False) if need > 0 else rest[:0], need)
    return Pool(np.sort(np.concatenate(taken)), total, parts, predictions_of)


def _session_positives(ctx: Context, session: dict[str, Any]) -> np.ndarray:
    """The patches labelled as the session's class in this session (as their labels stand now), ascending."""
    index = ctx.table.index_of()
    labels = current_labels(ctx.project.read_ledger()).values()
    wanted = session["label"].lower()
    rows = [
        index[e["patch_id"]]
        for e in labels
        if e.get("session") == session["id"] and str(e["label"]).lower() == wanted and e["patch_id"] in index
    ]
    return np.unique(np.array(rows, dtype=np.int64))


def _predicted_ends(
    ctx: Context,
    session: dict[str, Any],
    probabilities: np.ndarray,
    frozen: np.ndarray,
    query: np.ndarray,
    free: np.ndarray,
    share: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Free patches the last pass predicted as the session's class: half nearest to the query, half farthest
    (CNFP's two ends), among at most ``PREDICTED_SAMPLE`` x ``share`` of them drawn at random."""
    positive = np.flatnonzero(free & (probabilities.argmax(axis=1) == ctx.class_index(session["label"])))
    if len(positive) > PREDICTED_SAMPLE * share:
        positive = np.sort(rng.choice(positive, size=PREDICTED_SAMPLE * share, replace=False))
    distances = np.linalg.norm(np.asarray(frozen[positive], dtype=np.float32) - query[None, :], axis=1)
    order = positive[np.argsort(distances, kind="stable")]
    near = order[: math.ceil(share / 2)]
    far = order[::-1][: share // 2]
    return np.concatenate([near, far])


# ---- the pool through a round's heads -----------------------------------------------------------------
class _RowStems:
    """A project's complete stem cache read for given rows (a pool's): ``heads.StemCache`` over positions in
    ``rows``. An incomplete cache reads as absent, and nothing is written to it (the full pass fills it)."""

    def __init__(self, stems: ProjectStems | None, rows: np.ndarray) -> None:
        self.stems, self.rows = stems, rows

    def get(self, start: int, count: int) -> np.ndarray | None:
        if self.stems is None or self.stems.rows is None:
            return None
        return np.asarray(self.stems.rows[self.rows[start : start + count]])

    def put(self, start: int, rows: np.ndarray) -> None:
        return None


def embed_rows(ctx: Context, rows: np.ndarray, model_id: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Embed and predict the patches ``rows`` (ascending) with a round's heads: (embeddings, probabilities), or
    the pretrained block's embeddings and no probabilities before any round (``model_id`` None)."""
    from wsi_il.heads import embed, embed_and_predict, pretrained_retrieval

    init = init_state(ctx)
    size = embed_chunk(ctx.device)
    advance = ctx.reporter.task("re-embedding the candidate pool", len(rows))
    chunks = counted(((s, ctx.store.take(rows[s : s + size])) for s in range(0, len(rows), size)), advance)
    if model_id is None:
        retrieval = pretrained_retrieval(init)
        stems = stem_cache(ctx, retrieval, init)
        return embed(retrieval, init, chunks, len(rows), ctx.device, _RowStems(stems, rows) if stems else None), None
    model = load_model(ctx, model_id)
    stems = stem_cache(ctx, model["classifier"], init) if model.get("frozen_stem") else None
    return embed_and_predict(
        model, init, len(ctx.classes), chunks, len(rows), ctx.device, _RowStems(stems, rows) if stems else None
    )
