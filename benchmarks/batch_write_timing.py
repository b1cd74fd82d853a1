"""Seconds to write a review batch: ``review.write_batch`` alone, and ``session._write_batch_files`` (the patches
and their context images read from the slide, then written), on one slide of real H&E tissue (BACH fields), median
of several runs.

usage: python benchmarks/batch_write_timing.py [--slide S.tiff] [--data DIR] [--patches 20] [--runs 7]
                                               [--work DIR]

Without --slide, a 4096 x 3072 px mosaic slide of JPEG tiles is built from the BACH sample under --data (default
$WSI_IL_DATA, else ../shared/data). Patches are tile-aligned 256 px squares, as the bench's slides have. --work
is where the batches are written (a temporary folder there, removed after): give a folder on the file system
the projects live on, as the fsyncs are a large part of the cost (a tmpfs has none). Besides the medians, it
prints the single-thread cost of each part (reading the patches and their contexts, rendering the contact sheet,
encoding the patches and the sheet, writing and fsyncing each file as
``atomic_write_bytes`` does by default), from which the effect of more cores can be reasoned about. To compare
two checkouts, run it from outside the repository with PYTHONPATH naming each, interleaved. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=None, help="a tiled slide; default: a BACH mosaic, built")
    parser.add_argument("--data", type=Path, default=None, help="the folder holding the BACH sample")
    parser.add_argument("--patches", type=int, default=20)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="default: the system's temporary folder")
    args = parser.parse_args()

    import wsi_il
    from wsi_il.threads import default_workers

    work = Path(tempfile.mkdtemp(prefix="batch-write-timing-", dir=args.work))
    try:
        slide = args.slide or _build_slide(work, args.data)
        times = _time_runs(work, slide, args.patches, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "wsi_il": str(Path(wsi_il.__file__).parent),
                "cpus": os.cpu_count(),
                "core_threads": default_workers(),
                "patches": args.patches,
                "runs": args.runs,
                **{key: round(statistics.median(values), 4) for key, values in times.items()},
            }
        )
    )


def _build_slide(work: Path, data: Path | None) -> Path:
    from wsi_il.measure.bench import data_dir
    from wsi_il.measure.mosaic import bach_images, make_block_slide

    tumour, normal = bach_images(data_dir(data))
    return make_block_slide(work / "slide.tiff", tumour, normal, size_px=(4096, 3072), seed=1).path


def _time_runs(work: Path, slide_path: Path, count: int, runs: int) -> dict[str, list[float]]:
    """Time every part once untimed (imports, fonts, the slide's first opening), then ``runs`` times."""
    from wsi_il import png
    from wsi_il.fsutil import atomic_write_bytes
    from wsi_il.review import SHEET_COMPRESS_LEVEL, _png_bytes, write_batch
    from wsi_il.session import _write_batch_files
    from wsi_il.sheet import render_contact_sheet

    ctx, info, patches = _context(work, slide_path, count)
    chosen = np.arange(count)
    predictions = np.random.default_rng(0).dirichlet((1.0, 1.0), size=count).astype(np.float32)
    times: dict[str, list[float]] = {}
    for run in range(-1, runs):

        def timed(key: str, call: Callable[..., Any], *args: Any, run: int = run) -> Any:
            start = time.perf_counter()
            result = call(*args)
            if run >= 0:
                times.setdefault(key, []).append(time.perf_counter() - start)
            return result

        session = {"id": f"s{run + 2}", "round": 1, "rounds": 3, "label": "tumor"}
        timed(
            "write_batch_files_s",
            _write_batch_files,
            ctx,
            session,
            f"{session['id']}-r1",
            chosen,
            chosen,
            predictions[chosen],
            "uncertainty",
        )
        images, contexts = timed("single_thread_read_s", _read, ctx, slide_path, chosen)
        timed(
            "write_batch_s",
            write_batch,
            work / f"write-batch-{run + 1}",
            info,
            patches,
            images,
            None,
            "PROJECT",
            contexts,
        )
        encoded = timed("single_thread_encode_patches_s", lambda pictures: [_png_bytes(p) for p in pictures], images)
        sheet = timed("single_thread_render_sheet_s", render_contact_sheet, info, patches, images, contexts)
        encoded.append(timed("single_thread_encode_sheet_s", png.encode, np.asarray(sheet), SHEET_COMPRESS_LEVEL))
        folder = work / f"writes-{run + 1}"
        timed("single_thread_write_fsync_pngs_s", _write_each, folder, encoded, atomic_write_bytes)
    return times


def _write_each(folder: Path, encoded: list[bytes], write: Callable[[Path, bytes], None]) -> None:
    """Write the PNGs one after the other, each with its own sync of the folder, as the batch wrote them before."""
    folder.mkdir()
    for n, data in enumerate(encoded):
        write(folder / f"{n:02d}.png", data)


def _read(ctx: Any, slide_path: Path, chosen: np.ndarray) -> tuple[list[Any], list[Any]]:
    """The patches' images and context images, read one after the other from a reader opened for them, as each of
    ``_write_batch_files``'s threads reads them."""
    from wsi_il.session import _patch_image
    from wsi_il.slide import TileReader

    readers = {"slide": TileReader(slide_path)}
    try:
        pictures = [_patch_image(ctx, index, readers) for index in chosen.tolist()]
    finally:
        readers["slide"].close()
    return [image for image, _ in pictures], [context for _, context in pictures]


def _context(work: Path, slide_path: Path, count: int):
    """A session context holding one slide and ``count`` patches of its tissue: what ``_write_batch_files`` reads,
    without computing features."""
    from wsi_il.batch import BatchInfo, BatchPatch
    from wsi_il.database import PatchTable
    from wsi_il.model import Context
    from wsi_il.project import Project, SlideRecord
    from wsi_il.slide import read_info

    slide_info = read_info(slide_path)
    px = 256
    rng = np.random.default_rng(1)
    cells = [(x, y) for y in range(px, slide_info.height - px, px) for x in range(px, slide_info.width - px, px)]
    boxes = np.array([(*cells[i], px, px) for i in rng.choice(len(cells), count, replace=False)], dtype=np.int64)
    record = SlideRecord(
        id="slide",
        kind="slide",
        path=str(slide_path),
        width=slide_info.width,
        height=slide_info.height,
        mpp=slide_info.mpp,
        offset=slide_info.offset,
        n_patches=count,
        tiled=True,
        extracted=True,
    )
    ids = [f"slide_x{x}_y{y}" for x, y, _, _ in boxes.tolist()]
    table = PatchTable(slide_index=np.zeros(count, dtype=np.int64), boxes=boxes, ids=ids, slides=[record])
    uid = "00000000-0000-0000-0000-000000000000"
    manifest = {"uid": uid, "classes": ["tumor", "normal"]}
    # No feature store nor reporter: writing a batch uses neither.
    ctx = Context(Project(work / "project"), manifest, table, store=None, device="cpu", reporter=None)
    info = BatchInfo("s1-r1", uid, "s1", 1, 3, "tumor", ("tumor", "normal"), "uncertainty")
    patches = [BatchPatch(pid, "slide", x, y, w, h) for pid, (x, y, w, h) in zip(ids, boxes.tolist(), strict=True)]
    return ctx, info, patches


if __name__ == "__main__":
    main()
