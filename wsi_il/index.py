"""Rank patches by distance to the query vector: the only module that imports faiss."""

from __future__ import annotations

import numpy as np


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
