"""Which label each patch has now, and expert corrections of labels already given.

The ledger (``labels.jsonl``) is append-only: a correction is one more entry for the patch, marked
``"source": "correction"``, and the newest entry of a patch is its label. Nothing is ever rewritten, so the
whole history of every patch stays readable (``wsi-il status``), and the next round trains on the labels as
they stand (``session.training_set``). A correction can name a patch that no batch ever showed (a patch
clicked on the slide): it is then an expert label outside the sampler, recorded as such.

Callers hold the project's lock while they append.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from wsi_il.batch import NOT_PREFIX, SKIP, BatchInfo, normalize_label
from wsi_il.errors import InputError
from wsi_il.project import Project, current_labels, now_iso

CORRECTION = "correction"
"""The ``source`` (and the ``batch``) of a correction's ledger entry."""


def is_correction(entry: dict[str, Any]) -> bool:
    return entry.get("source") == CORRECTION


def corrections(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every correction, oldest first, with the label it replaced (``previous``; None for a new patch)."""
    before: dict[str, str] = {}
    found = []
    for entry in entries:
        if is_correction(entry):
            found.append(
                {
                    "patch_id": entry["patch_id"],
                    "previous": before.get(entry["patch_id"]),
                    "label": entry["label"],
                    "time": entry.get("time"),
                    "via": entry.get("via"),
                }
            )
        before[entry["patch_id"]] = entry["label"]
    return found


def patch_history(entries: Iterable[dict[str, Any]], patch_id: str) -> list[dict[str, Any]]:
    """Every ledger entry of one patch, oldest first."""
    return [e for e in entries if e["patch_id"] == patch_id]


def correct_labels(
    project: Project, manifest: dict[str, Any], patch_ids: Collection[str], answers: Iterable[tuple[str, str]], via: str
) -> list[dict[str, Any]]:
    """Validate answers ``(patch_id, label as written)`` and append those that change a patch's label.

    Labels are read as ``ingest`` reads them (class names in any case, yes/no answering the patch's session's
    question, ``skip``). ``patch_ids`` are the project's patches. Returns the entries appended; an answer that
    equals the patch's label now appends nothing. Raises ``InputError`` before anything is written when any
    answer is invalid.
    """
    from wsi_il.session import list_sessions

    ledger = project.read_ledger()
    now = current_labels(ledger)
    sessions = list_sessions(project)
    entries = []
    for patch_id, raw in answers:
        if patch_id not in patch_ids:
            raise InputError(
                f"patch {patch_id!r} is not in {project.root}",
                "copy the patch id from labels.csv, the contact sheet or `wsi-il status`",
            )
        session = _session_of(now.get(patch_id), sessions)
        if session is None and raw.strip().casefold() not in {c.casefold() for c in manifest["classes"]} | {SKIP}:
            raise InputError(
                f"patch {patch_id}: {raw.strip()!r} answers no session's question",
                f"give a class name: {', '.join(manifest['classes'])}",
            )
        label = _label(raw, manifest, session, patch_id)
        if label is None:
            raise InputError(
                f"patch {patch_id}: the new label is empty",
                f"give one of {', '.join(manifest['classes'])}, yes, no or skip",
            )
        if label == SKIP and patch_id not in now:
            raise InputError(f"patch {patch_id} has no label to skip", "skip only takes back a label given before")
        if now.get(patch_id, {}).get("label") == label:
            continue
        entry = {
            "patch_id": patch_id,
            "label": label,
            "batch": CORRECTION,
            "source": CORRECTION,
            "via": via,
            "time": now_iso(),
        }
        if session is not None:
            entry["session"] = session["id"]
        entries.append(entry)
        now[patch_id] = entry
    if entries:
        project.append_ledger(entries)
    return entries


def _label(raw: str, manifest: dict[str, Any], session: dict[str, Any] | None, patch_id: str) -> str | None:
    """Read an answer as ``ingest`` does; a ``not:<class>`` that a labels file already resolved is kept."""
    if raw.startswith(NOT_PREFIX) and raw[len(NOT_PREFIX) :] in manifest["classes"]:
        return raw
    return normalize_label(raw, _question(manifest, session), where=f"patch {patch_id}")


def _session_of(entry: dict[str, Any] | None, sessions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The session whose question a yes/no about this patch answers: the one it was labelled in, else the newest."""
    wanted = (entry or {}).get("session")
    for session in sessions:
        if session["id"] == wanted:
            return session
    return sessions[-1] if sessions else None


def _question(manifest: dict[str, Any], session: dict[str, Any] | None) -> BatchInfo:
    classes = tuple(manifest["classes"])
    label = session["label"] if session is not None else classes[0]
    return BatchInfo(CORRECTION, manifest["uid"], session["id"] if session else "", 0, 0, label, classes, "")
