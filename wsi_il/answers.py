"""Write answers given on the page into a batch's ``labels.csv``, one cell at a time.

Only the label cells of the answered rows change: the header, the other columns, the delimiter, a byte-order mark
and the line ends stay as the file has them, so a file also open in a spreadsheet or being watched by
``wsi-il watch`` reads as before. Each write reads the file anew and replaces it whole (atomic rename); the caller
serialises writes, so answers from two tabs never overwrite each other.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from wsi_il.batch import LABELS_CSV, NOT_PREFIX, BatchInfo, BatchPatch, normalize_label, patch_number
from wsi_il.errors import LabelsError
from wsi_il.fsutil import atomic_write_bytes
from wsi_il.labels import column_key, csv_delimiter, read_labels, row_place

_BOM = b"\xef\xbb\xbf"


def answer_text(raw: str, info: BatchInfo, sheet_number: str, row: int) -> str:
    """The text written for an answer: a class name, ``no`` (for "not the query's class"), ``skip``, or "" (no
    answer). A label ``ingest`` would refuse raises the ``LabelsError`` it would raise for that row."""
    label = normalize_label(raw, info, where=row_place(LABELS_CSV, sheet_number, row))
    if label is None:
        return ""
    return "no" if label.startswith(NOT_PREFIX) else label


def read_answers(batch_dir: Path, info: BatchInfo, patches: list[BatchPatch]) -> dict[str, str]:
    """The labels filled in so far, as ``ingest`` reads them (class names, ``not:<class>``, ``skip``)."""
    return read_labels(Path(batch_dir) / LABELS_CSV, info, patches, allow_partial=True, allow_empty=True)


def write_answers(batch_dir: Path, info: BatchInfo, patches: list[BatchPatch], answers: dict[str, str]) -> None:
    """Set the label cell of each patch in ``answers`` ({patch_id: label as written}; "" clears it)."""
    path = Path(batch_dir) / LABELS_CSV
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelsError(
            f"cannot read {path}: {exc.strerror or exc}", "the batch folder may have been moved; restore it"
        ) from exc
    bom = data.startswith(_BOM)
    try:
        text = data[len(_BOM) if bom else 0 :].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelsError(
            f"{path} is not UTF-8 text (saved by a spreadsheet in another encoding)",
            "save it as CSV UTF-8, or label this batch in labels.csv itself",
        ) from exc
    newline = "\r\n" if "\r\n" in text else "\n"
    header = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = csv_delimiter(header)
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    start = next((i for i, r in enumerate(records) if any(f.strip() for f in r)), None)
    if start is None:
        raise LabelsError(f"{path} is empty", "restore the labels.csv the batch came with")
    keys = [column_key(h) for h in records[start]]
    if "patch_id" not in keys or "label" not in keys:
        raise LabelsError(
            f"{path.name} has no 'patch_id' or 'label' column in its first line",
            "keep the header line of the labels.csv the batch came with",
        )
    id_col, label_col = keys.index("patch_id"), keys.index("label")
    pending = dict(answers)
    sheet = {p.patch_id: patch_number(n, len(patches)) for n, p in enumerate(patches, start=1)}
    for number, record in enumerate(records[start + 1 :], start=start + 2):
        patch_id = record[id_col].strip() if id_col < len(record) else ""
        if patch_id not in pending:
            continue
        text_now = answer_text(pending.pop(patch_id), info, sheet[patch_id], number)
        record.extend([""] * (label_col + 1 - len(record)))
        record[label_col] = text_now
    if pending:
        raise LabelsError(
            f"{path.name} lacks the rows of {', '.join(sorted(pending)[:5])}",
            "restore the rows (leave the label empty for patches not labelled yet)",
        )
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator=newline).writerows(records)
    atomic_write_bytes(path, (_BOM if bom else b"") + buffer.getvalue().encode("utf-8"))
