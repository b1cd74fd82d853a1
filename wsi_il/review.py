"""Write a review batch: patch images, contact sheet, labels.csv, batch GeoJSON, README and, last, batch.json.

A batch folder is complete when it holds ``batch.json``, which is written last. The pathologist fills
``labels.csv`` (in any spreadsheet program) or classifies the patch objects of ``batch.geojson`` in QuPath
and exports them; ``wsi_il.labels.read_labels`` reads either file back.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shlex
import textwrap
from concurrent import futures
from pathlib import Path
from typing import Any

from PIL import Image

from wsi_il.batch import (
    BATCH_FORMAT,
    BATCH_FORMAT_VERSION,
    BATCH_GEOJSON,
    BATCH_JSON,
    CONFIDENT,
    CONTACT_SHEET,
    CSV_COLUMNS,
    LABELS_CSV,
    README,
    UNCERTAIN,
    UNCERTAIN_BELOW,
    BatchInfo,
    BatchPatch,
    accepted_labels,
    image_names,
    negative_label,
    patch_number,
    patch_object_id,
    read_batch,
    suggestion_certainty,
)
from wsi_il.errors import ProjectStateError, WsiIlError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir
from wsi_il.sheet import render_contact_sheet

_UNSAFE_ID = re.compile(r'[/\\:*?"<>|\x00-\x1f]')

_README_WIDTH = 92


def write_batch(
    folder: Path,
    info: BatchInfo,
    patches: list[BatchPatch],
    images: list[Image.Image],
    offsets: dict[str, tuple[float, float]] | None = None,
    project_hint: str = "PROJECT",
    contexts: list[Image.Image | None] | None = None,
) -> None:
    """Write the batch folder: patch PNGs, labels.csv, contact sheet, batch.geojson, README, batch.json.

    ``contexts`` are what the contact sheet shows of each patch (its neighbourhood with the patch outlined, from
    ``context.context_image``; None for a patch without a slide around it); without them, the patches alone.

    Raises ValueError when the arguments do not describe one batch (a caller bug), ProjectStateError when
    ``folder`` already holds another batch. Writing the same batch again (a command rerun after a kill)
    replaces what a killed run left, but keeps a labels.csv the expert may have started to fill.
    """
    folder = Path(folder)
    _check_batch_args(patches, images)
    if contexts is not None and len(contexts) != len(patches):
        raise ValueError(f"{len(patches)} patches but {len(contexts)} context images")
    same = _check_folder_free(folder, info, patches)
    folder.mkdir(parents=True, exist_ok=True)
    names = image_names(patches)
    _remove_stale_images(folder, names)
    writes = _write_pngs(folder, render_contact_sheet(info, patches, images, contexts), names, images)
    try:
        if not (same and (folder / LABELS_CSV).is_file()):
            atomic_write_text(folder / LABELS_CSV, _labels_csv_text(info, patches, names), sync_dir=False)
        _write_batch_geojson(folder / BATCH_GEOJSON, info, patches, offsets or {})
        with_context = contexts is not None and any(c is not None for c in contexts)
        atomic_write_text(
            folder / README, _readme_text(folder, info, patches, project_hint, with_context), sync_dir=False
        )
    finally:
        futures.wait(writes)  # none outlives the call: a caller may remove the folder after an error
    for write in writes:
        write.result()
    # The other files' renames are durable before batch.json's can be, whatever order a file system
    # persists renames in; batch.json's own write syncs the folder again.
    fsync_dir(folder)
    atomic_write_text(folder / BATCH_JSON, _batch_json_text(info, patches))


def _check_batch_args(patches: list[BatchPatch], images: list[Image.Image]) -> None:
    if not patches:
        raise ValueError("a review batch needs at least one patch")
    if len(patches) != len(images):
        raise ValueError(f"{len(patches)} patches but {len(images)} images")
    ids = [p.patch_id for p in patches]
    if len(set(ids)) != len(ids):
        raise ValueError("patch ids in a batch must be unique")
    bad = [i for i in ids if not i or i.startswith(".") or _UNSAFE_ID.search(i)]
    if bad:
        raise ValueError(f"patch id {bad[0]!r} is not filename-safe")


def _check_folder_free(folder: Path, info: BatchInfo, patches: list[BatchPatch]) -> bool:
    """Refuse a folder that holds another batch; return True when it holds this very batch, complete."""
    if not (folder / BATCH_JSON).exists():
        return False
    try:
        existing, existing_patches = read_batch(folder)
    except WsiIlError:
        return False  # a broken batch.json is overwritten by the new batch
    if existing.batch_id != info.batch_id:
        raise ProjectStateError(
            f"{folder} already holds batch {existing.batch_id}, not {info.batch_id}",
            "choose another folder or remove that one",
        )
    return existing == info and [p.patch_id for p in existing_patches] == [p.patch_id for p in patches]


_IMAGE_NAME = re.compile(r"^\d{2,}_.+\.png$")


def _remove_stale_images(folder: Path, names: list[str]) -> None:
    """Delete patch images a killed run wrote for other patches, so that the folder shows this batch only."""
    if not folder.is_dir():
        return
    keep = set(names)
    for path in folder.iterdir():
        if _IMAGE_NAME.match(path.name) and path.name not in keep and path.is_file():
            path.unlink(missing_ok=True)


PNG_COMPRESS_LEVEL = 3
"""zlib level of the batch's patch PNGs (lossless at any level): 3 encodes a patch in a third of the time of PIL's
default 6 for files about 7% larger (a round writes its PNGs while the expert waits)."""


SHEET_COMPRESS_LEVEL = 1
"""zlib level of the contact sheet, the largest picture of a batch (several megapixels of context images): level 1
costs half the time of 3 for a file a few percent larger."""


def _png_bytes(image: Image.Image, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def _write_pngs(
    folder: Path, sheet: Image.Image, names: list[str], images: list[Image.Image]
) -> list[futures.Future[None]]:
    """Start encoding and writing the contact sheet and each image as ``folder / name`` on every core (PIL's
    encoder, zlib and the writes leave the interpreter lock free). The sheet's stripes go first (``wsi_il.png``:
    its compression shared by every core), then its assembly and write, then one task a patch, which overlaps one
    file's fsync with another's encoding; the renames are left for one sync of the folder by the caller."""
    import numpy as np

    from wsi_il import png
    from wsi_il.threads import core_threads, default_workers

    pool = core_threads()
    rgb = np.asarray(sheet.convert("RGB"))
    stripes = [
        pool.submit(png.encode_stripe, rgb, start, stop, SHEET_COMPRESS_LEVEL)
        for start, stop in png.stripe_bounds(rgb.shape[0], default_workers())
    ]
    # The sheet's task comes after its stripes in the queue, so it only ever waits for stripes already running.
    writes = [pool.submit(_write_sheet, folder / CONTACT_SHEET, sheet.size, stripes)]
    # Each task gets its own RGB copy: no image is shared with this thread or another task.
    return writes + [
        pool.submit(_write_png, folder / name, image.convert("RGB")) for name, image in zip(names, images, strict=True)
    ]


def _write_sheet(path: Path, size: tuple[int, int], stripes: list[futures.Future[Any]]) -> None:
    atomic_write_bytes(path, _assemble_png(size, [stripe.result() for stripe in stripes]), sync_dir=False)


def _assemble_png(size: tuple[int, int], stripes: list[Any]) -> bytes:
    from wsi_il import png

    return png.assemble(*size, stripes)


def _write_png(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, _png_bytes(image), sync_dir=False)


def _labels_csv_text(info: BatchInfo, patches: list[BatchPatch], names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for n, (patch, name) in enumerate(zip(patches, names, strict=True), start=1):
        writer.writerow(_csv_row(n, len(patches), patch, name, info.batch_id))
    return buffer.getvalue()


def _csv_row(n: int, count: int, patch: BatchPatch, image: str, batch_id: str) -> list[str]:
    probability = patch.suggestion_probability
    return [
        patch_number(n, count), patch.patch_id, patch.slide, str(patch.x), str(patch.y),
        str(patch.width), str(patch.height), image, "", patch.suggestion or "",
        "" if probability is None else f"{probability:.3f}", suggestion_certainty(patch),
        "" if patch.rank is None else str(patch.rank), batch_id,
    ]  # fmt: skip


def _write_batch_geojson(
    path: Path, info: BatchInfo, patches: list[BatchPatch], offsets: dict[str, tuple[float, float]]
) -> None:
    from shapely.geometry import box

    from wsi_il import qupath

    features = []
    for n, patch in enumerate(patches, start=1):
        tag = {
            "wsi_il.batch": info.batch_id,
            "wsi_il.patch_id": patch.patch_id,
            "wsi_il.n": patch_number(n, len(patches)),
        }
        if patch.suggestion is not None:
            tag["wsi_il.suggestion"] = f"{patch.suggestion} ({suggestion_certainty(patch)})"
        features.append(
            qupath.make_feature(
                box(patch.x, patch.y, patch.x + patch.width, patch.y + patch.height),
                object_type="annotation",
                name=patch.patch_id,
                measurements=_suggestion_measurements(patch),
                metadata=tag,
                offset=offsets.get(patch.slide, (0.0, 0.0)),
                feature_id=patch_object_id(info, patch.patch_id),
            )
        )
    qupath.write_features(path, features)


def _suggestion_measurements(patch: BatchPatch) -> dict[str, float] | None:
    if patch.suggestion is None or patch.suggestion_probability is None:
        return None
    return {"Suggestion probability": float(patch.suggestion_probability)}


def _batch_json_text(info: BatchInfo, patches: list[BatchPatch]) -> str:
    document = {
        "format": BATCH_FORMAT,
        "version": BATCH_FORMAT_VERSION,
        "info": {**dataclasses.asdict(info), "classes": list(info.classes)},
        "patches": [dataclasses.asdict(p) for p in patches],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _readme_text(
    folder: Path, info: BatchInfo, patches: list[BatchPatch], project_hint: str, with_context: bool = False
) -> str:
    labels = ", ".join(accepted_labels(info))
    negative = negative_label(info)
    shown = (
        " inside its surroundings (3 x 3 patches read from the slide, the patch itself outlined in cyan)"
        if with_context
        else ""
    )
    sheet = textwrap.fill(
        f"Open {CONTACT_SHEET}: it shows every patch{shown}, with its number (NN, the column n of {LABELS_CSV}), "
        "its full patch id and the model's suggestion where it has one; the single patches, at full resolution, "
        "are the NN_<patch_id>.png files.",
        _README_WIDTH,
    )
    hint = textwrap.fill(
        f"The model's suggestion is only a hint. Where its probability is below {UNCERTAIN_BELOW:.2f} it is close to "
        f'a coin toss: the sheet then writes "model uncertain: <class>? <probability>" in grey, and {LABELS_CSV} '
        f'says "{UNCERTAIN}" in its column suggestion_certainty ("{CONFIDENT}" otherwise). Judge those patches '
        "yourself rather than copy the suggestion. Then either",
        _README_WIDTH,
    )
    return f"""\
wsi-il review batch {info.batch_id}
Session {info.session}, round {info.round} of {info.rounds}: looking for "{info.query_label}".
{len(patches)} patches, chosen by the {info.strategy} strategy.

WHAT TO DO
{sheet}

{hint}

A) fill the "label" column of {LABELS_CSV} (one row per patch; keep the other columns):
   accepted labels: {labels}
   - a class name says what the patch shows;
   - yes / no (also 1 / 0, relevant / irrelevant) answer "is this {info.query_label}?";
     no is recorded as "{negative}";
   - skip: the patch is not informative (blurred, background, unsure).
   Any spreadsheet program will do; save as CSV (comma, semicolon or tab).

B) or use QuPath: open the slide, File > Import objects > {BATCH_GEOJSON} (or drag the file
   onto the image), set a class on each patch object (named by its patch id), then
   File > Object data > Export as GeoJSON (all objects) and give that file instead of
   {LABELS_CSV} in the command below.

THEN RUN
   {_ingest_command(project_hint, folder / LABELS_CSV)}
(add --partial to ingest a batch in which some labels are still empty)
"""


def _ingest_command(project_hint: str, labels: Path) -> str:
    return f"wsi-il ingest {shlex.quote(project_hint)} {shlex.quote(str(labels))}"
