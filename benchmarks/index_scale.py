"""The ranking part of a round at cohort scale: exact search (what a round does today) against a FAISS IVF-PQ
index, at 1e4, 1e5 and 1e6 patches of synthetic 512-d embeddings, for time, memory and recall.

usage: python benchmarks/index_scale.py [--sizes 10000,100000,1000000] [--queries 20] [--out FILE.json]

Each size runs in a child process of its own, so that its peak memory (max RSS) is its own. The embeddings are
float32 vectors drawn around 256 random centres (so that neighbours exist, as with tissue types), a round's
retrieval embedding being 512-d float32 (2 KB a patch). Measured per size:

- ``exact_rank_s``: ``wsi_il.index.rank_by_distance`` over every patch (a flat index built, every distance,
  the whole order), as ``session`` ranks candidates today, per query;
- ``exact_topk_s``: a flat index's top 1,000 (built once), per query;
- IVF-PQ (``nlist`` = 4 sqrt(N) lists, 64 sub-quantizers of 8 bits: 64 bytes a patch, trained on at most
  100,000 vectors): training and adding (once a round, in the background), search per query at two ``nprobe``,
  the index's bytes, and the recall of the exact top 10 and top 100 in its top 100 and top 1,000.

Prints one JSON line per size, then a fit of each quantity's growth (a power of N) and its projection to 2e7.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DIM = 512
CENTRES = 256
TOPK = 1000


def embeddings(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, CENTRES, stop - start)]
        out[start:stop] += 0.6 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
    return out


def one_size(n: int, queries: int) -> dict:
    import faiss
    import numpy as np

    from wsi_il.index import rank_by_distance

    x = embeddings(n)
    rng = np.random.default_rng(1)
    q = x[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, DIM), dtype=np.float32)
    everything = np.arange(n)
    result: dict = {"n": n, "threads": faiss.omp_get_max_threads()}
    cpu0, start = time.process_time(), time.perf_counter()
    for row in q[: min(3, queries)]:
        rank_by_distance(x, row, everything)
    runs = min(3, queries)
    result["exact_rank_s"] = round((time.perf_counter() - start) / runs, 4)
    result["exact_rank_cpu_s"] = round((time.process_time() - cpu0) / runs, 4)
    flat = faiss.IndexFlatL2(DIM)
    flat.add(x)
    start = time.perf_counter()
    _, truth = flat.search(q, TOPK)
    result["exact_topk_s"] = round((time.perf_counter() - start) / queries, 5)
    del flat
    nlist = int(4 * math.sqrt(n))
    quantiser = faiss.IndexFlatL2(DIM)
    index = faiss.IndexIVFPQ(quantiser, DIM, nlist, 64, 8)
    train = x[rng.choice(n, min(n, 100_000), replace=False)]
    cpu0, start = time.process_time(), time.perf_counter()
    index.train(train)
    result["ivfpq_train_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    index.add(x)
    result["ivfpq_add_s"] = round(time.perf_counter() - start, 2)
    result["ivfpq_build_cpu_s"] = round(time.process_time() - cpu0, 2)
    result["ivfpq_bytes_per_patch"] = round(len(faiss.serialize_index(index)) / n, 1)
    result["nlist"] = nlist
    for nprobe in (16, 64):
        index.nprobe = nprobe
        start = time.perf_counter()
        _, found = index.search(q, TOPK)
        result[f"ivfpq_search_s_nprobe{nprobe}"] = round((time.perf_counter() - start) / queries, 5)
        for k, within in ((10, 100), (100, 1000)):
            hits = [len(set(truth[i, :k]) & set(found[i, :within])) / k for i in range(queries)]
            result[f"recall{k}_in_{within}_nprobe{nprobe}"] = round(float(np.mean(hits)), 4)
    result["embeddings_bytes_per_patch"] = DIM * 4
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def projection(rows: list[dict], key: str, target: float = 2e7) -> dict:
    """Fit key = a * N^b on the two largest sizes and project it to ``target``."""

    points = [(r["n"], r[key]) for r in rows if r.get(key)]
    if len(points) < 2:
        return {}
    (n1, v1), (n2, v2) = points[-2], points[-1]
    b = math.log(v2 / v1) / math.log(n2 / n1) if v1 > 0 and v2 > 0 else 1.0
    return {"exponent": round(b, 2), "at_2e7": float(f"{v2 * (target / n2) ** b:.4g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.queries)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--queries", str(args.queries)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    keys = ("exact_rank_s", "exact_topk_s", "ivfpq_search_s_nprobe16", "ivfpq_search_s_nprobe64", "ivfpq_add_s")
    keys += ("peak_rss_mb",)
    report = {"sizes": rows, "projection_2e7": {k: projection(rows, k) for k in keys}, "load": os.getloadavg()}
    print(json.dumps(report["projection_2e7"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
