"""The time split of `wsi-il simulate` rounds, exact against pooled, from the sessions' round records.

    python benchmarks/pool_rounds.py runs/exact runs/pool300 runs/pool75 [--json F.json]

Each argument is a simulate ``--out`` folder; every session file of its runs (``runs/<slide>/<run>/sessions``)
is read. Per folder it prints the mean seconds a round spent training, choosing the pool, re-embedding the pool,
in the pass over the whole database, and in all until the next batch was written (what the expert waits for:
``round_seconds``; in a pooled round the full pass comes after it), over the rounds that ingested labels; and
the pool's mean size and make-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

KEYS = ("train_seconds", "pool_seconds", "pool_embed_seconds", "pass_seconds", "round_seconds")


def rounds_of(folder: Path) -> list[dict]:
    """Every ingested round of every session of a simulate output, with the pool its next batch came from."""
    found = []
    for path in sorted(folder.glob("runs/*/*/sessions/s*.json")):
        history = json.loads(path.read_text(encoding="utf-8"))["history"]
        for number, entry in enumerate(history):
            if "ingested" not in entry:
                continue
            following = history[number + 1] if number + 1 < len(history) else {}
            found.append(
                {
                    **{k: entry[k] for k in ("train_seconds", "pass_seconds", "round_seconds") if k in entry},
                    **{k: following[k] for k in ("pool_seconds", "pool_embed_seconds") if k in following},
                    "pool": following.get("pool"),
                    "candidates": following.get("candidates"),
                }
            )
    return found


def summary(folder: Path) -> dict:
    rows = rounds_of(folder)
    out: dict = {"folder": str(folder), "rounds": len(rows)}
    for key in KEYS:
        values = [r[key] for r in rows if key in r]
        out[key] = round(mean(values), 3) if values else None
    pools = [r["pool"] for r in rows if r.get("pool")]
    if pools:
        out["pool_size"] = round(mean(p["size"] for p in pools), 1)
        parts = {name for p in pools for name in p["parts"]}
        out["pool_parts"] = {name: round(mean(p["parts"].get(name, 0) for p in pools), 1) for name in sorted(parts)}
        out["candidates"] = round(mean(r["candidates"] for r in rows if r.get("pool")), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = [summary(folder) for folder in args.folders]
    print("| run | rounds | train s | pool choice s | pool embed s | full pass s | until the next batch s | pool |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        pool = f"{r['pool_size']:g} of {r['candidates']:g} ({r['pool_parts']})" if r.get("pool_size") else "-"
        cells = [str(r[k]) if r[k] is not None else "-" for k in KEYS]
        print(f"| {Path(r['folder']).name} | {r['rounds']} | {' | '.join(cells)} | {pool} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
