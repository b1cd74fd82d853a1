"""Rank patches by distance to the query vector, and search a project's frozen embeddings for a round's candidate
pool: the only module that imports faiss.

The search index is exact (a flat index, every distance computed) up to ``FLAT_UP_TO`` patches and an IVF-PQ
index above (docs/cluster.md measured it: milliseconds a query and about 80 bytes a patch at 10⁶ patches, with a
recall that falls with size, which is why a pooled round ranks its pool exactly afterwards).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FLAT_UP_TO = 200_000
"""The most patches searched with an exact flat index, rebuilt from the frozen embeddings when a round needs it
(2 KB a patch in memory; about 1 CPU s to build at 2 x 10⁵, 5 at 10⁶: benchmarks/pool_choice.py); above, an
IVF-PQ index (``IVF_SUBQUANTIZERS`` bytes a patch), built once and saved."""
IVF_SUBQUANTIZERS = 64
"""Product-quantizer codes of an IVF-PQ index: sub-quantizers of 8 bits, so this many bytes a patch."""
IVF_TRAIN_MAX = 100_000
"""The most vectors an IVF-PQ index is trained on (a random sample; training is the slow part of building)."""


def rank_by_distance(
    embeddings: np.ndarray, query: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return the candidate indices sorted by Euclidean distance to ``query``, and the distances."""
    import faiss

    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) == 0:
        return candidates, np.zeros(0, dtype=np.float32)
    vectors = np.ascontiguousarray(embeddings[candidates], dtype=np.float32)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    squared, order = index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), len(candidates))
    return candidates[order[0]], np.sqrt(np.maximum(squared[0], 0.0))


def build_index(vectors: np.ndarray, seed: int = 0, flat_up_to: int = FLAT_UP_TO) -> Any:
    """Build a search index over ``vectors`` (n, d): flat up to ``flat_up_to`` rows, IVF-PQ above (``nlist`` =
    4 sqrt(n) lists, trained on at most ``IVF_TRAIN_MAX`` rows drawn with ``seed``)."""
    import faiss

    n, dim = vectors.shape
    if n <= flat_up_to:
        index = faiss.IndexFlatL2(dim)
    else:
        subquantizers = IVF_SUBQUANTIZERS if dim % IVF_SUBQUANTIZERS == 0 else math.gcd(dim, IVF_SUBQUANTIZERS)
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, max(1, int(4 * math.sqrt(n))), subquantizers, 8)
        sample = np.random.default_rng(seed).choice(n, min(n, IVF_TRAIN_MAX), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
    for start in range(0, n, 100_000):
        index.add(np.ascontiguousarray(vectors[start : start + 100_000], dtype=np.float32))
    return index


def is_exact(index: Any) -> bool:
    """Whether an index computes every distance (a flat index) rather than approximating them."""
    import faiss

    return isinstance(index, faiss.IndexFlat)


def index_bytes(index: Any) -> bytes:
    """An index as bytes, to be saved whole by the caller (``faiss.serialize_index``)."""
    import faiss

    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> Any:
    """An index saved by ``index_bytes``."""
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def search_index(index: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest rows to each query (queries, k), nearest first; -1 where an IVF index found fewer.

    An IVF index probes enough lists to hold about twice ``k`` rows, so that a large ``k`` is not cut short by
    the lists probed."""
    import faiss

    k = int(min(k, index.ntotal))
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if k <= 0:
        return np.zeros((len(queries), 0), dtype=np.int64)
    if not is_exact(index):
        ivf = faiss.extract_index_ivf(index)
        per_list = max(1.0, index.ntotal / ivf.nlist)
        ivf.nprobe = int(min(ivf.nlist, max(16, math.ceil(2 * k / per_list))))
    _, rows = index.search(queries, k)
    return rows.astype(np.int64)
