"""Does a large region train a worse model because its ten training rows include its rim? The same measurement as
``quality_region.py``, with a large region's ten rows taken from its interior (the patches farthest from the
region's edge, ties at random) instead of at random.

    python benchmarks/region_interior.py PROJECT TRUTH --seeds 3 --reviewed 40 --regions small,large \
        --balances classes --head-inits refit --head-folds 0 --folds 2 --out region-interior.json
"""

import runpy
import sys
from collections import deque
from pathlib import Path

import numpy as np

import wsi_il.heads as heads
import wsi_il.measure.simulate as sim

orig_grow, orig_sel = sim.grow_region, heads.training_selection
state = {}


def grow(boxes, island, size, rng):
    region = orig_grow(boxes, island, size, rng)
    if size > heads.QUERY_GROUP_SIZE:
        cells = sim._grid_cells(boxes)
        inside = {cells[i]: k for k, i in enumerate(region)}
        depth = np.full(len(region), -1)
        queue = deque()
        for (c, r), k in inside.items():
            if any((c + dc, r + dr) not in inside for dc, dr in ((1, 0), (-1, 0), (0, 1), (0, -1))):
                depth[k] = 0
                queue.append((c, r))
        while queue:
            c, r = queue.popleft()
            for dc, dr in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                k = inside.get((c + dc, r + dr))
                if k is not None and depth[k] < 0:
                    depth[k] = depth[inside[(c, r)]] + 1
                    queue.append((c + dc, r + dr))
        state[len(region)] = depth
    return region


def selection(targets, groups, balance, seed=0, query_cap=heads.QUERY_GROUP_SIZE):
    groups = np.asarray(groups)
    query = np.flatnonzero(groups >= 0)
    depth = state.get(len(query))
    if balance != "classes" or depth is None or len(query) <= query_cap:
        return orig_sel(targets, groups, balance, seed, query_cap)
    rng = np.random.default_rng([seed, len(targets)])
    order = np.lexsort((rng.random(len(query)), -depth))  # deepest first, ties at random
    rows = np.concatenate([np.flatnonzero(groups < 0), np.sort(query[order[:query_cap]])])
    return rows, heads.training_weights(np.asarray(targets)[rows])


sim.grow_region, heads.training_selection = grow, selection
sys.argv = ["quality_region.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).with_name("quality_region.py")), run_name="__main__")
