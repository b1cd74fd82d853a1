"""How fast the review desk answers, in a real browser (headless Debian chromium through Playwright), and what
bulk answers give in labels per expert action.

usage: python benchmarks/desk_timing.py PROJECT --truth T [--labels 250] [--k 10] [--runs 2] [--device cpu]
                                        [--look 20] [--modes ahead,warm,cold] [--screenshots DIR] [--out FILE.json]

PROJECT is a project whose features are computed (e.g. the `project/` folder `wsi-il bench --out B` leaves, or
`wsi-il init` of the bench slide), T its slide's tumour truth (QuPath GeoJSON), used as the expert. Each run
copies the project (with the default training settings, as `wsi-il bench` does), records ``--labels`` labels as
earlier work (minus one round and the query), starts a CNFP session (10 query patches from the truth), ingests
its first batch (so that the timed round warm-starts, as in `wsi-il bench`), and serves the copy with
`wsi-il review`. In the browser it then measures:

- first paint of the batch page (first contentful paint) and the batch ready (every patch image loaded), both
  from the start of navigation;
- a key's response: from the keydown event to the frame painted after it (the answer shown, the next patch
  current), over every answer of the batch;
- from the last answer's key to the next batch on screen (Enter right after it; the next batch's first image
  loaded), in three modes, interleaved: ``ahead`` (the default desk: the warm-up, ``session.rehearse``, waited
  for before the timed answers, as an expert takes longer than it, and the round prepared ahead while the expert
  looks ``--look`` seconds at the last patch: ``wsi_il.desk.ahead``), ``warm`` (the warm-up, no round prepared
  ahead: ``--no-prepare-ahead``) and ``cold`` (neither: ``--no-warm-up --no-prepare-ahead``);

and, from the batch and the truth: how many labels `a` gives in one key (confident suggestions) and how often they
are right, and how many a "more like this" group gives (the 12 nearest unlabelled patches of each batch patch,
labelled like it) and how often they are right. Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def prepare(base: Path, folder: Path, truth: Path, labels: int, k: int, device: str, seed: int) -> tuple[Path, str]:
    """A copy of ``base`` with earlier labels, a session and its first batch ingested; returns (copy, batch)."""
    from wsi_il.config import SessionSettings, TrainSettings
    from wsi_il.events import SilentReporter
    from wsi_il.measure.simulate import fork_project
    from wsi_il.measure.truth import truth_mask, write_batch_labels
    from wsi_il.model import open_context
    from wsi_il.project import Project, now_iso
    from wsi_il.session import ingest, start_session

    project = fork_project(Project(base), folder, TrainSettings())  # the settings `wsi-il bench` times a round with
    ctx = open_context(project, device, SilentReporter())
    tumour = truth_mask(ctx.table.boxes, truth, ctx.table.slides[0].offset)
    rng = np.random.default_rng(seed)
    query = rng.choice(np.flatnonzero(tumour), size=10, replace=False)
    rest = rng.permutation(np.setdiff1d(np.arange(len(tumour)), query))
    prior = rest[: max(0, labels - k - len(query))]
    project.append_ledger(
        [
            {
                "patch_id": ctx.table.ids[i],
                "label": "Tumor" if tumour[i] else "Normal",
                "batch": "earlier",
                "session": "earlier",
                "round": 0,
                "time": now_iso(),
            }
            for i in prior
        ]
    )
    result = start_session(ctx, "Tumor", SessionSettings("cnfp", k, 3), query_indices=query, source="benchmark")
    index = ctx.table.index_of()

    def fill(batch: Path) -> None:
        from wsi_il.batch import read_batch

        ids = [p.patch_id for p in read_batch(batch)[1]]
        write_batch_labels(batch, {pid: "Tumor" if tumour[index[pid]] else "Normal" for pid in ids})

    fill(result.batch_dir)
    result = ingest(ctx, result.batch_dir / "labels.csv")
    return folder, result.batch_dir.name


def serve(project: Path, device: str, mode: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "wsi_il", "review", str(project), "--port", "0", "--device", device]
    if mode == "cold":
        command.append("--no-warm-up")
    if mode != "ahead":
        command.append("--no-prepare-ahead")
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    while True:
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"wsi-il review did not start: {server.stdout.read()}")
        found = re.search(r"then open: (\S+)", line)
        if found:
            return server, found.group(1)


KEY_TIMER = """() => {
  window.keyTimes = [];
  document.addEventListener('keydown', (e) => {
    const t0 = e.timeStamp;
    requestAnimationFrame(() => setTimeout(() => window.keyTimes.push(performance.now() - t0), 0));
  });
}"""


def answers_for(project: Path, batch: str, truth: Path) -> dict[str, str]:
    from wsi_il.batch import read_batch
    from wsi_il.measure.truth import truth_mask

    _, patches = read_batch(project / "batches" / batch)
    inside = truth_mask(np.array([[p.x, p.y, p.width, p.height] for p in patches]), truth)
    return {p.patch_id: "y" if hit else "n" for p, hit in zip(patches, inside, strict=True)}


def time_run(
    page, url: str, project: Path, batch: str, truth: Path, mode: str, look: float, shots: Path | None
) -> dict:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("() => [...document.querySelectorAll('#strip img')].every(i => i.complete)")
    timing = page.evaluate("""() => {
        const paint = performance.getEntriesByName('first-contentful-paint')[0];
        return {fcp: paint ? paint.startTime : null, ready: performance.now()};
    }""")
    if mode != "cold":  # the expert takes longer than the warm-up: let it finish, as it would
        page.wait_for_function(
            "() => document.getElementById('warmup').textContent.startsWith('warmed up')", timeout=600_000
        )
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
        page.keyboard.press("y")
        page.keyboard.press("n")
        page.wait_for_timeout(600)
        page.screenshot(path=str(shots / "desk-batch.png"))
        page.keyboard.press("u")
        page.keyboard.press("u")
        page.wait_for_function("() => window.deskState.pending === 0")
    page.evaluate(KEY_TIMER)
    answers = answers_for(project, batch, truth)
    order = page.evaluate("() => window.deskState.order")
    for patch in order[:-1]:
        page.keyboard.press(answers[patch])
    page.wait_for_function("() => window.deskState.pending === 0")
    page.wait_for_timeout(look * 1000)  # the expert looks at the last patch
    started = time.perf_counter()
    page.keyboard.press(answers[order[-1]])
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"""() => {{
        const s = window.deskState;
        if (!s.batch || s.batch.batch === {json.dumps(batch)}) return false;
        const img = document.getElementById('current-image');
        return img.complete && img.naturalWidth > 0;
    }}""",
        timeout=600_000,
    )
    next_seconds = time.perf_counter() - started
    keys = page.evaluate("() => window.keyTimes")[: len(order)]
    server_seconds = page.evaluate("() => window.deskState.lastRound && window.deskState.lastRound.server")
    if shots is not None:
        page.keyboard.press("v")
        page.wait_for_function(
            "() => window.deskSlideView && window.deskSlideView.ready && window.deskSlideView.overlays.probability"
        )
        page.keyboard.press("p")
        page.wait_for_timeout(1500)
        _click_patch(page, project, batch)
        page.wait_for_selector("#picked:not([hidden])")
        page.wait_for_function("() => document.getElementById('picked-image').complete")
        page.screenshot(path=str(shots / "desk-slide.png"))
        page.keyboard.press("b")
    return {
        "first_paint_ms": round(timing["fcp"] or -1, 1),
        "batch_ready_ms": round(timing["ready"], 1),
        "key_ms_median": round(float(np.median(keys)), 1),
        "key_ms_max": round(float(np.max(keys)), 1),
        "last_answer_to_next_batch_s": round(next_seconds, 3),
        "submit_server_s": server_seconds,
    }


def _click_patch(page, project: Path, batch: str) -> None:
    """Click, on the slide view, the middle of the first patch of ``batch`` (a labelled one by now)."""
    from wsi_il.batch import read_batch

    patch = read_batch(project / "batches" / batch)[1][0]
    x, y = page.evaluate(
        """([x, y]) => {
        const v = window.deskSlideView.viewer;
        const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        const r = document.getElementById('viewer').getBoundingClientRect();
        return [r.left + p.x, r.top + p.y];
    }""",
        [patch.x + patch.width / 2, patch.y + patch.height / 2],
    )
    page.mouse.click(x, y)


def bulk_quality(project: Path, batch: str, truth: Path) -> dict:
    """Labels per action and their accuracy for `a` (confident suggestions) and "more like this" (12 nearest)."""
    from wsi_il.desk.desk import Desk
    from wsi_il.measure.truth import truth_mask

    desk = Desk(project, "cpu")
    view = desk.batch(batch)
    table = desk._patches().table
    tumour = truth_mask(table.boxes, truth, table.slides[0].offset)
    index = table.index_of()

    def truly(pid: str) -> str:
        return "Tumor" if tumour[index[pid]] else "Normal"

    confident = [p for p in view["patches"] if p["confident"]]
    accept_right = sum(p["suggestion"] == truly(p["patch_id"]) for p in confident)
    groups, group_right = [], 0
    for p in view["patches"]:
        found = desk.similar(p["patch_id"], 12)
        groups.append(len(found))
        group_right += sum(truly(q["patch_id"]) == truly(p["patch_id"]) for q in found)
    desk.close()
    return {
        "batch_patches": len(view["patches"]),
        "accept_labels_per_key": len(confident),
        "accept_accuracy": round(accept_right / len(confident), 3) if confident else None,
        "similar_labels_per_action": float(np.mean(groups)),
        "similar_accuracy": round(group_right / max(1, sum(groups)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--labels", type=int, default=250)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--look",
        type=float,
        default=20.0,
        help="seconds the expert looks at the last patch before answering it (the trial: 3-4 min a batch of 10)",
    )
    parser.add_argument("--modes", default="ahead,warm,cold")
    parser.add_argument("--screenshots", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    results = []
    with tempfile.TemporaryDirectory(prefix="desk-timing-") as scratch, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        for run in range(args.runs):
            for n, mode in enumerate(args.modes.split(",")):
                where = Path(scratch) / f"{run}{mode}" / args.project.name
                folder, batch = prepare(args.project, where, args.truth, args.labels, args.k, args.device, seed=run)
                quality = bulk_quality(folder, batch, args.truth) if n == 0 else {}
                server, url = serve(folder, args.device, mode)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 950})
                    shots = args.screenshots if run == 0 and n == 0 else None
                    row = {
                        "run": run,
                        "mode": mode,
                        **time_run(page, url, folder, batch, args.truth, mode, args.look, shots),
                        **quality,
                    }
                    page.close()
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(timeout=60)
                    shutil.rmtree(folder, ignore_errors=True)
                print(json.dumps(row), flush=True)
                results.append(row)
        browser.close()
    summary = {
        "project": str(args.project),
        "labels": args.labels,
        "k": args.k,
        "device": args.device,
        "look_s": args.look,
    }
    for mode in args.modes.split(","):
        rows = [r for r in results if r["mode"] == mode]
        summary[mode] = {key: [r.get(key) for r in rows] for key in rows[0] if key not in ("run", "mode")}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"runs": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
