"""A review batch folder's vocabulary: its file names, its patches and what they belong to, the labels an expert may
write, the rule that marks a suggestion uncertain, and reading ``batch.json`` back.

Writing a batch is ``wsi_il.review``'s; reading the expert's labels back is ``wsi_il.labels``'.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_il.errors import LabelsError, ProjectStateError

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


UNCERTAIN_BELOW = 0.75
"""A suggestion whose probability is below this is shown as uncertain (contact sheet, labels.csv, review page)."""


def suggestion_is_uncertain(probability: float | None) -> bool:
    """Whether the model's suggestion is too close to a coin toss to be shown like a decision."""
    return probability is not None and probability < UNCERTAIN_BELOW


def suggestion_certainty(patch: BatchPatch) -> str:
    """labels.csv's mark of a suggestion: ``uncertain`` below ``UNCERTAIN_BELOW``, else ``confident``; empty
    without a suggestion."""
    if patch.suggestion is None or patch.suggestion_probability is None:
        return ""
    return UNCERTAIN if suggestion_is_uncertain(patch.suggestion_probability) else CONFIDENT


def accepted_labels(info: BatchInfo) -> list[str]:
    """List the labels an expert may write: class names, binary answers, then ``skip``."""
    return [*info.classes, *_BINARY_SHOWN, SKIP]


def normalize_label(raw: str, info: BatchInfo, where: str = "") -> str | None:
    """Turn what the expert wrote into a class name, ``not:<query>``, ``skip``, or None when empty."""
    text = clean_text(raw)
    if not text:
        return None
    key = text.casefold()
    for name in info.classes:
        if name.casefold() == key:
            return name
    if key in _YES:
        return info.query_label
    if key in _NO:
        return negative_label(info)
    if key == SKIP:
        return SKIP
    prefix = f"{where}: " if where else ""
    near = difflib.get_close_matches(key, [c.casefold() for c in info.classes], n=1, cutoff=0.6)
    guess = f"did you mean {info.classes[[c.casefold() for c in info.classes].index(near[0])]!r}? " if near else ""
    raise LabelsError(
        f"{prefix}label {shorten(text)!r} is not one of {', '.join(accepted_labels(info))}",
        f"{guess}yes/no answer 'is this {info.query_label}?'; skip leaves the patch out",
    )


def negative_label(info: BatchInfo) -> str:
    """What a 'no' answer records: the other class of a two-class project, else ``not:<query>``."""
    others = [name for name in info.classes if name != info.query_label]
    if len(info.classes) == 2 and len(others) == 1:
        return others[0]
    return NOT_PREFIX + info.query_label


def clean_text(raw: str) -> str:
    """A cell or name as the expert meant it: outer spaces, zero-width spaces and byte-order marks removed."""
    return raw.strip().strip(_STRIP_CHARS).strip()


def shorten(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, for quoting what the expert wrote in messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_names(patches: list[BatchPatch]) -> list[str]:
    """Name each patch's PNG ``NN_<patch_id>.png``, NN numbered from 01 in batch order."""
    return [f"{patch_number(n, len(patches))}_{p.patch_id}.png" for n, p in enumerate(patches, start=1)]


def patch_number(n: int, count: int) -> str:
    """The number a batch gives its ``n``-th patch of ``count``: ``01``, ``02`` ... (three digits from 100 on)."""
    return str(n).zfill(max(2, len(str(count))))


def patch_object_id(info: BatchInfo, patch_id: str) -> str:
    """The id of a patch's object in ``batch.geojson``: a UUID fixed by the project, the batch and the patch, so
    the object QuPath sends back (QuPath keeps ids) names its patch even when its name was changed."""
    return str(uuid.uuid5(uuid.UUID(info.project_uid), f"{info.batch_id}/{patch_id}"))


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
            raise TypeError(f"{field.name} = {shorten(repr(value))} has the wrong type")
        if isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
            raise TypeError(f"{field.name} must hold strings")
