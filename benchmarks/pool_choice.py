"""What a pooled round's choice of candidates costs as the project grows: the frozen index built from the
float16 frozen embeddings (``wsi_il.index.build_index``: exact up to ``FLAT_UP_TO``) and the searches a round
makes (``search_index``: the query's nearest quarter of the pool, and the nearest of ten labelled positives).

usage: python benchmarks/pool_choice.py [--sizes 100000,1000000] [--pool 50000] [--out FILE.json]

Synthetic 512-d embeddings around 256 centres (as ``index_scale.py``), stored float16 as a project stores them.
Each size runs in this process one after the other; wall and CPU seconds are printed per step, one JSON line a
size.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

DIM = 512


def frozen(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float16)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[rng.integers(0, 256, stop - start)]
        out[start:stop] = block + 0.6 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
    return out


def timed(step, result: dict, name: str):
    wall, cpu = time.perf_counter(), time.process_time()
    value = step()
    result[f"{name}_s"] = round(time.perf_counter() - wall, 3)
    result[f"{name}_cpu_s"] = round(time.process_time() - cpu, 3)
    return value


def one_size(n: int, pool: int) -> dict:
    from wsi_il.index import build_index, is_exact, search_index

    vectors = frozen(n)
    result: dict = {"n": n, "pool": pool}
    index = timed(lambda: build_index(vectors), result, "build")
    result["exact"] = is_exact(index)
    share = pool // 4
    query = vectors[:1].astype(np.float32)
    positives = vectors[1:11].astype(np.float32)
    timed(lambda: search_index(index, query, share + 100), result, "query_search")
    timed(lambda: search_index(index, positives, math.ceil(share / 10) + 100), result, "positives_search")
    mask = np.ones(n, dtype=bool)
    timed(lambda: np.random.default_rng(0).choice(np.flatnonzero(mask), pool // 4, replace=False), result, "random")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--pool", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append(one_size(n, args.pool))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
