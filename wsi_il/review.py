"""Write a review batch (patch images, contact sheet, labels.csv, batch GeoJSON); read the labels back.

A batch folder is complete when it holds ``batch.json``, which is written last. The pathologist fills
``labels.csv`` (in any spreadsheet program) or classifies the patch objects of ``batch.geojson`` in QuPath
and exports them; ``read_labels`` accepts either file and checks it against the batch.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import re
import shlex
import textwrap
import uuid
import zlib
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from wsi_il.errors import LabelsError, ProjectStateError, WsiIlError
from wsi_il.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir

if TYPE_CHECKING:
    from wsi_il.qupath import QuPathObject

BATCH_JSON = "batch.json"
LABELS_CSV = "labels.csv"
CONTACT_SHEET = "contact_sheet.png"
BATCH_GEOJSON = "batch.geojson"
README = "README.txt"
BATCH_FORMAT = "wsi-il review batch"
BATCH_FORMAT_VERSION = 1
CSV_COLUMNS = (
    "n", "patch_id", "slide", "x", "y", "width", "height", "image",
    "label", "suggestion", "suggestion_probability", "suggestion_certainty", "rank", "batch",
)  # fmt: skip
UNCERTAIN = "uncertain"
CONFIDENT = "confident"
SKIP = "skip"
NOT_PREFIX = "not:"

_YES = frozenset({"yes", "y", "1", "true", "relevant", "positive", "+"})
_NO = frozenset({"no", "n", "0", "false", "irrelevant", "negative", "-"})
_BINARY_SHOWN = ("yes", "no", "1", "0", "relevant", "irrelevant")
_STRIP_CHARS = "\u200b\ufeff"
_UNSAFE_ID = re.compile(r'[/\\:*?"<>|\x00-\x1f]')
_CSV_SUFFIXES = frozenset({".csv", ".tsv", ".txt"})
_GEOJSON_SUFFIXES = frozenset({".geojson", ".json", ".gz"})
_DELIMITERS = (",", ";", "\t")
_MAX_LISTED = 5

_README_WIDTH = 92


@dataclass(frozen=True)
class BatchPatch:
    """One patch shown to the expert: where it is, and what the model suggests."""

    patch_id: str
    """Filename-safe id, e.g. ``CMU-1_x1024_y512``."""
    slide: str
    """Slide id (or dataset id for a patch-folder database)."""
    x: int
    """Level-0 x of the top-left corner, px."""
    y: int
    """Level-0 y of the top-left corner, px."""
    width: int
    """Level-0 width, px."""
    height: int
    """Level-0 height, px."""
    suggestion: str | None = None
    """The model's suggested class; None when there is no classifier yet."""
    suggestion_probability: float | None = None
    """The model's probability of ``suggestion``."""
    rank: int | None = None
    """1-based position in the ranked list; None when the patch does not come from a ranking."""


@dataclass(frozen=True)
class BatchInfo:
    """What a batch belongs to: project, session, round, and what the session looks for."""

    batch_id: str
    """``<session>-r<round>``, e.g. ``s1-r2``."""
    project_uid: str
    """UUID of the project."""
    session: str
    """Session id, e.g. ``s1``."""
    round: int
    """1-based round number."""
    rounds: int
    """Rounds in this session."""
    query_label: str
    """The class the session looks for, e.g. ``tumor``."""
    classes: tuple[str, ...]
    """The project's classes, e.g. ``("tumor", "normal")``."""
    strategy: str
    """The sampling strategy that chose the patches."""


# ---------------------------------------------------------------------------------------------- labels

UNCERTAIN_BELOW = 0.75
"""A suggestion whose probability is below this is shown as uncertain (contact sheet, labels.csv, review page)."""


def suggestion_is_uncertain(probability: float | None) -> bool:
    """Whether the model's suggestion is too close to a coin toss to be shown like a decision."""
    return probability is not None and probability < UNCERTAIN_BELOW


def accepted_labels(info: BatchInfo) -> list[str]:
    """List the labels an expert may write: class names, binary answers, then ``skip``."""
    return [*info.classes, *_BINARY_SHOWN, SKIP]


def normalize_label(raw: str, info: BatchInfo, where: str = "") -> str | None:
    """Turn what the expert wrote into a class name, ``not:<query>``, ``skip``, or None when empty."""
    text = _clean(raw)
    if not text:
        return None
    key = text.casefold()
    for name in info.classes:
        if name.casefold() == key:
            return name
    if key in _YES:
        return info.query_label
    if key in _NO:
        return _negative_label(info)
    if key == SKIP:
        return SKIP
    prefix = f"{where}: " if where else ""
    near = difflib.get_close_matches(key, [c.casefold() for c in info.classes], n=1, cutoff=0.6)
    guess = f"did you mean {info.classes[[c.casefold() for c in info.classes].index(near[0])]!r}? " if near else ""
    raise LabelsError(
        f"{prefix}label {_short(text)!r} is not one of {', '.join(accepted_labels(info))}",
        f"{guess}yes/no answer 'is this {info.query_label}?'; skip leaves the patch out",
    )


def _negative_label(info: BatchInfo) -> str:
    others = [name for name in info.classes if name != info.query_label]
    if len(info.classes) == 2 and len(others) == 1:
        return others[0]
    return NOT_PREFIX + info.query_label


def _clean(raw: str) -> str:
    return raw.strip().strip(_STRIP_CHARS).strip()


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------- write_batch


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
    from wsi_il.sheet import render_contact_sheet

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


def image_names(patches: list[BatchPatch]) -> list[str]:
    """Name each patch's PNG ``NN_<patch_id>.png``, NN numbered from 01 in batch order."""
    return [f"{patch_number(n, len(patches))}_{p.patch_id}.png" for n, p in enumerate(patches, start=1)]


def patch_number(n: int, count: int) -> str:
    """The number a batch gives its ``n``-th patch of ``count``: ``01``, ``02`` ... (three digits from 100 on)."""
    return str(n).zfill(max(2, len(str(count))))


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
    from wsi_il.features import core_threads, default_workers

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


def patch_object_id(info: BatchInfo, patch_id: str) -> str:
    """The id of a patch's object in ``batch.geojson``: a UUID fixed by the project, the batch and the patch, so
    the object QuPath sends back (QuPath keeps ids) names its patch even when its name was changed."""
    return str(uuid.uuid5(uuid.UUID(info.project_uid), f"{info.batch_id}/{patch_id}"))


def suggestion_certainty(patch: BatchPatch) -> str:
    """labels.csv's mark of a suggestion: ``uncertain`` below ``UNCERTAIN_BELOW``, else ``confident``; empty
    without a suggestion."""
    if patch.suggestion is None or patch.suggestion_probability is None:
        return ""
    return UNCERTAIN if suggestion_is_uncertain(patch.suggestion_probability) else CONFIDENT


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
    negative = _negative_label(info)
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


# ------------------------------------------------------------------------------------------ read_batch


def read_batch(folder: Path) -> tuple[BatchInfo, list[BatchPatch]]:
    """Read a batch folder's batch.json back into its info and patches."""
    path = Path(folder) / BATCH_JSON
    if not path.is_file():
        raise ProjectStateError(
            f"{folder} is not a complete review batch: {BATCH_JSON} is missing",
            "give the folder that the last round wrote, or write the batch again",
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return _info_from_dict(document["info"]), [_patch_from_dict(p) for p in document["patches"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ProjectStateError(
            f"{path} is corrupt: {exc}", "write the batch again (the labels you filled are kept elsewhere)"
        ) from exc


def _info_from_dict(data: dict[str, Any]) -> BatchInfo:
    info = BatchInfo(**{**data, "classes": tuple(data["classes"])})
    _check_types(info)
    return info


def _patch_from_dict(data: dict[str, Any]) -> BatchPatch:
    patch = BatchPatch(**data)
    _check_types(patch)
    if not patch.patch_id or (patch.width <= 0 or patch.height <= 0):
        raise ValueError(f"patch {patch.patch_id!r} has no id or an empty size")
    return patch


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "float | None": (float, int, type(None)),
    "tuple[str, ...]": (tuple,),
}


def _check_types(obj: Any) -> None:
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, bool) or not isinstance(value, _TYPES[str(field.type)]):
            raise TypeError(f"{field.name} = {_short(repr(value))} has the wrong type")
        if isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
            raise TypeError(f"{field.name} must hold strings")


# ----------------------------------------------------------------------------------------- read_labels


def read_labels(
    path: Path,
    info: BatchInfo,
    patches: list[BatchPatch],
    *,
    allow_partial: bool = False,
    allow_empty: bool = False,
    offsets: dict[str, tuple[float, float]] | None = None,
    max_bytes: int = 64 * 2**20,
) -> dict[str, str]:
    """Read a filled labels CSV or a GeoJSON exported from QuPath; return {patch_id: label}.

    Only labelled patches are returned, in batch order; raises LabelsError for anything the expert
    must fix (with ``allow_partial``, also a file without any label, unless ``allow_empty``).
    """
    path = Path(path)
    head = _read_head(path, max_bytes)
    if _is_geojson(path, head):
        labels = _labels_from_geojson(path, info, patches, allow_partial, offsets or {}, max_bytes)
    else:
        labels = _labels_from_csv(path, info, patches, allow_partial)
    return _filled(path, labels, patches, allow_empty)


def _read_head(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise LabelsError(f"{path} is not a file", "give the labels.csv or the GeoJSON exported from QuPath")
        with path.open("rb") as handle:
            head = handle.read(64)
    except FileNotFoundError as exc:
        raise LabelsError(f"{path} does not exist", "check the path of the labels file") from exc
    except OSError as exc:
        raise LabelsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise LabelsError(
            f"{path.name} is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.1f} MiB a labels file may have",
            "give the labels.csv of the batch or the GeoJSON exported from QuPath",
        )
    return head


def _is_geojson(path: Path, head: bytes) -> bool:
    suffix = path.suffix.lower()
    if suffix in _GEOJSON_SUFFIXES:
        return True
    if head.startswith(b"\x1f\x8b"):
        return True
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")


# ----------------------------------------------------------------------------------------- CSV route


def _labels_from_csv(
    path: Path, info: BatchInfo, patches: list[BatchPatch], allow_partial: bool
) -> dict[str, str | None]:
    records = _csv_records(path)
    start = next((i for i, record in enumerate(records) if any(_clean(f) for f in record)), len(records))
    columns = _column_positions(path, records[start] if records[start:] else [])
    rows = _data_rows(path, records, start, columns)
    _check_batch_column(path, rows, info)
    labels = _labels_by_patch(path, rows, info, patches)
    _check_no_missing_rows(path, labels, patches)
    if not allow_partial:
        _check_filled(path, labels, patches)
    return labels


def _csv_records(path: Path) -> list[list[str]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    text = _decode(data)
    header = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=csv_delimiter(header)))
    except csv.Error as exc:
        raise LabelsError(f"{path.name} is not a readable CSV file: {exc}", _CSV_HINT) from exc


_CSV_HINT = "save the sheet again as CSV (comma, semicolon or tab separated) with the columns patch_id and label"


def _decode(data: bytes) -> str:
    """Decode what spreadsheet programs write: UTF-8 (with or without BOM), UTF-16, else Windows-1252."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def csv_delimiter(header: str) -> str:
    """Pick the delimiter that splits the header into the required columns, else the most fields."""
    best, best_fields = ",", 0
    for delimiter in _DELIMITERS:
        try:
            fields = [column_key(f) for f in next(csv.reader([header], delimiter=delimiter), [])]
        except csv.Error:
            continue
        if "patch_id" in fields and "label" in fields:
            return delimiter
        if len(fields) > best_fields:
            best, best_fields = delimiter, len(fields)
    return best


def column_key(name: str) -> str:
    """A header cell as the readers match it: case, spaces and dashes ignored (``Patch ID`` is ``patch_id``)."""
    return re.sub(r"[\s\-]+", "_", _clean(name).casefold())


def _column_positions(path: Path, header: list[str]) -> dict[str, int]:
    keys = [column_key(h) for h in header]
    missing = [c for c in ("patch_id", "label") if c not in keys]
    if missing:
        raise LabelsError(
            f"{path.name} has no {' and no '.join(repr(m) for m in missing)} column in its first line",
            "keep the header line of the labels.csv the batch came with and fill its 'label' column",
        )
    positions: dict[str, int] = {}
    for i, key in enumerate(keys):
        positions.setdefault(key, i)
    return positions


def row_place(file_name: str, sheet_number: str, line: int) -> str:
    """Name a labels.csv row in messages as the expert sees it: the contact sheet's number, then the spreadsheet's
    row, e.g. ``labels.csv patch 05 (row 6)``."""
    return f"{file_name} patch {sheet_number} (row {line})"


@dataclass(frozen=True)
class _Row:
    line: int
    where: str
    patch_id: str
    label: str
    batch: str


def _data_rows(path: Path, records: list[list[str]], start: int, columns: dict[str, int]) -> list[_Row]:
    """Turn the records after the header into rows, numbered as a spreadsheet numbers them."""
    rows = []
    for number, record in enumerate(records[start + 1 :], start=start + 2):
        if not any(_clean(field) for field in record):
            continue
        row = _Row(
            line=number,
            where=f"{path.name} row {number}",
            patch_id=_clean(_field(record, columns.get("patch_id"))),
            label=_field(record, columns.get("label")),
            batch=_clean(_field(record, columns.get("batch"))),
        )
        if not row.patch_id:
            raise LabelsError(f"{row.where} has no patch_id", "delete the row or restore its patch_id")
        rows.append(row)
    return rows


def _field(record: list[str], index: int | None) -> str:
    return record[index] if index is not None and index < len(record) else ""


def _check_batch_column(path: Path, rows: list[_Row], info: BatchInfo) -> None:
    for row in rows:
        if row.batch and row.batch != info.batch_id:
            raise LabelsError(
                f"{row.where}: this is the labels file of batch {_short(row.batch)}, not {info.batch_id}",
                f"give the labels.csv from the folder of batch {info.batch_id}",
            )


def _labels_by_patch(path: Path, rows: list[_Row], info: BatchInfo, patches: list[BatchPatch]) -> dict[str, str | None]:
    known = {p.patch_id for p in patches}
    if rows and not any(row.patch_id in known for row in rows):
        raise LabelsError(
            f"{path.name} holds none of the patches of batch {info.batch_id}",
            f"give the labels.csv from the folder of batch {info.batch_id}",
        )
    labels: dict[str, str | None] = {}
    sheet = {p.patch_id: patch_number(n, len(patches)) for n, p in enumerate(patches, start=1)}
    for row in rows:
        if row.patch_id not in known:
            raise LabelsError(
                f"{row.where}: patch {_short(row.patch_id)!r} is not in batch {info.batch_id}",
                "delete the row; add no rows to labels.csv",
            )
        where = row_place(path.name, sheet[row.patch_id], row.line)
        _merge(labels, row.patch_id, normalize_label(row.label, info, where), where)
    return labels


def _merge(labels: dict[str, str | None], patch_id: str, label: str | None, where: str) -> None:
    """Record ``label`` for ``patch_id``; an empty label never overrides nor conflicts with a filled one."""
    earlier = labels.get(patch_id)
    if earlier is not None and label is not None and earlier != label:
        raise LabelsError(
            f"{where}: patch {patch_id!r} is labelled both {earlier!r} and {label!r}",
            "keep one label per patch",
        )
    labels[patch_id] = earlier if label is None else label


def _check_filled(path: Path, labels: dict[str, str | None], patches: list[BatchPatch]) -> None:
    empty = [p.patch_id for p in patches if labels.get(p.patch_id) is None]
    if empty:
        raise LabelsError(
            f"{len(empty)} of {len(patches)} patches have no label in {path.name} ({_listing(empty)})",
            "fill them (skip for a patch that is not informative) or pass --partial",
        )


def _filled(
    path: Path, labels: dict[str, str | None], patches: list[BatchPatch], allow_empty: bool = False
) -> dict[str, str]:
    """Return the filled labels in batch order; raise when there are none (unless ``allow_empty``)."""
    filled: dict[str, str] = {}
    for patch in patches:
        label = labels.get(patch.patch_id)
        if label is not None:
            filled[patch.patch_id] = label
    if not filled and not allow_empty:
        raise LabelsError(f"{path.name} has no labels filled in", "fill the label of at least one patch")
    return filled


def _check_no_missing_rows(path: Path, labels: dict[str, str | None], patches: list[BatchPatch]) -> None:
    missing = [p.patch_id for p in patches if p.patch_id not in labels]
    if missing:
        raise LabelsError(
            f"{path.name} lacks the rows of {len(missing)} patches of the batch ({_listing(missing)})",
            "restore the rows (leave the label empty and pass --partial for patches you did not label)",
        )


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------- GeoJSON route


def _labels_from_geojson(
    path: Path,
    info: BatchInfo,
    patches: list[BatchPatch],
    allow_partial: bool,
    offsets: dict[str, tuple[float, float]],
    max_bytes: int,
) -> dict[str, str | None]:
    slide_offsets = {offsets.get(p.slide, (0.0, 0.0)) for p in patches}
    by_geometry = len(slide_offsets) == 1
    from wsi_il.qupath import drawn_objects

    objects = _read_qupath_objects(path, next(iter(slide_offsets)) if by_geometry else (0.0, 0.0), max_bytes)
    objects, _ = drawn_objects(objects)  # a cell or detection inside a patch never gives the patch its label
    ids = {patch_object_id(info, p.patch_id): p.patch_id for p in patches}
    matches = [(obj, _match(obj, patches, by_geometry, ids)) for obj in objects]
    matched = [(obj, patch_id) for obj, patch_id in matches if patch_id is not None]
    if not matched:
        raise LabelsError(
            f"{path.name} holds none of the patches of batch {info.batch_id}",
            f"import {BATCH_GEOJSON} of batch {info.batch_id} in QuPath, classify its patch objects, "
            "and export all objects as GeoJSON",
        )
    labels: dict[str, str | None] = {}
    for obj, patch_id in matched:
        where = f"{path.name} object {obj.index + 1} ({_short(obj.name or patch_id)})"
        _merge(labels, patch_id, normalize_label(obj.classification or "", info, where), where)
    if not allow_partial:
        _check_classified(path, labels, patches)
    return labels


def _read_qupath_objects(path: Path, offset: tuple[float, float], max_bytes: int) -> list[QuPathObject]:
    from wsi_il import qupath

    try:
        return qupath.read_objects(path, offset=offset, max_bytes=max_bytes)
    except LabelsError:
        raise
    except WsiIlError as exc:
        raise LabelsError(exc.message, exc.hint) from exc
    except (ValueError, OSError, EOFError, RecursionError, zlib.error) as exc:  # undecodable data
        raise LabelsError(f"{path.name} is not a readable GeoJSON file: {exc}", _GEOJSON_HINT) from exc


_GEOJSON_HINT = "export the objects again from QuPath (File > Object data > Export as GeoJSON)"


def _match(obj: QuPathObject, patches: list[BatchPatch], by_geometry: bool, ids: dict[str, str]) -> str | None:
    """Find the patch an annotation stands for: by the patch id in its metadata, its name or its object id (the
    batch writes all three, QuPath keeps them), else by its shape (a square over the patch, as imported)."""
    known = {p.patch_id for p in patches}
    for candidate in (obj.metadata.get("wsi_il.patch_id"), _clean(obj.name or ""), ids.get(obj.id or "")):
        if candidate in known:
            return candidate
    if not by_geometry or obj.geometry is None or obj.geometry.is_empty:
        return None
    same = [p.patch_id for p in patches if _overlap(p, obj.geometry) >= _SAME_SQUARE]
    return same[0] if len(same) == 1 else None


_SAME_SQUARE = 0.9
"""An annotation is a patch's square when their intersection over union reaches this (QuPath rounds to 0.01 px)."""


def _overlap(patch: BatchPatch, geometry: Any) -> float:
    from shapely.geometry import box

    square = box(patch.x, patch.y, patch.x + patch.width, patch.y + patch.height)
    union = square.union(geometry).area
    return square.intersection(geometry).area / union if union else 0.0


def _check_classified(path: Path, labels: dict[str, str | None], patches: list[BatchPatch]) -> None:
    unclassified = [p.patch_id for p in patches if p.patch_id in labels and labels[p.patch_id] is None]
    absent = [p.patch_id for p in patches if p.patch_id not in labels]
    if unclassified:
        raise LabelsError(
            f"{len(unclassified)} objects in {path.name} have no classification ({_listing(unclassified)})",
            "classify every patch in QuPath (or pass --partial)",
        )
    if absent:
        raise LabelsError(
            f"{len(absent)} patches of the batch are not in {path.name} ({_listing(absent)})",
            "export all objects from QuPath, not a selection (or pass --partial)",
        )
