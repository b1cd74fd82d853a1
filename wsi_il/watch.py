"""``wsi-il watch``: ingest each review batch as soon as its labels are filled in, in one long-lived process.

The expert fills ``labels.csv`` (in a spreadsheet or an editor, over SSH or a mounted folder) and saves it, or
classifies the batch's objects in QuPath and exports them as GeoJSON into the batch folder; the watcher
notices, and once every patch holds a label it ingests the batch and writes the next one, as ``wsi-il ingest``
would. Between saves it says how many rows are labelled, and a mistyped label as ``ingest`` would say
it, then waits for the next save. It ends when no session waits for labels any more.

Why a process that stays: each ``wsi-il ingest`` starts Python, imports torch and, on a GPU, creates a CUDA
context and loads the kernels training needs: seconds before the round starts, and a first training in a
process costs about twice the next on an H100 (docs/speed.md, "GPU"). The command also rehearses the first
round while the expert labels (``session.rehearse``), so that the first round is as quick as the next (0.84 s
against 1.23-1.35 s for the paper's round on an H100). Nothing is kept in memory between
rounds that the project folder does not hold: the context is opened anew for each round, so a command run
beside the watcher (``status``, ``query``) is seen, and a killed watcher loses nothing.

A file is read once it has not changed for one polling interval (an editor may write it in several steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wsi_il.batch import BATCH_GEOJSON, LABELS_CSV, read_batch
from wsi_il.errors import WsiIlError
from wsi_il.events import Reporter
from wsi_il.labels import read_labels
from wsi_il.project import Project


@dataclass(frozen=True)
class Waiting:
    """A batch that waits for labels: its folder and labels file."""

    session: str
    batch_dir: Path

    @property
    def labels(self) -> Path:
        return self.batch_dir / LABELS_CSV

    def files(self) -> list[Path]:
        """The files that may hold its labels: ``labels.csv``, and GeoJSON exported from QuPath into the folder."""
        exports = sorted(p for p in self.batch_dir.glob("*.geojson") if p.name != BATCH_GEOJSON and p.is_file())
        return [self.labels, *exports]


def waiting_batches(project: Project) -> list[Waiting]:
    """The batches of the sessions that wait for labels (one a session: its current round's)."""
    from wsi_il.session import list_sessions

    return [
        Waiting(s["id"], project.batch_dir(f"{s['id']}-r{s['round']}"))
        for s in list_sessions(project)
        if s["state"] == "reviewing"
    ]


def slide_offsets(project: Project) -> dict[str, tuple[float, float]]:
    """Each slide's QuPath offset, which reading a GeoJSON export of a batch needs (``labelled``)."""
    return {slide.id: slide.offset for slide in project.slides(project.read_manifest())}


def labelled(batch: Waiting, path: Path, offsets: dict[str, tuple[float, float]]) -> tuple[int, int]:
    """(patches labelled, patches) of a batch in a labels file (``offsets``: each slide's QuPath offset, for a
    GeoJSON export); raises the LabelsError ``ingest`` would for a bad file."""
    info, patches = read_batch(batch.batch_dir)
    labels = read_labels(path, info, patches, allow_partial=True, allow_empty=True, offsets=offsets)
    return len(labels), len(patches)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def watch(
    project: Project,
    ingest_batch: Callable[[Path], object],
    reporter: Reporter,
    interval: float = 1.0,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Call ``ingest_batch(labels_path)`` for each waiting batch once its labels file is complete; return how
    many batches were ingested.

    The reporter's status says, once each, what is waited for and what is wrong with a file (or with an ingest, which is
    tried again at the next poll). Ends when no batch waits (or when ``stop()``).
    """
    examined: dict[Path, tuple[int, int] | None] = {}
    settling: dict[Path, tuple[int, int] | None] = {}
    said: dict[Path, str] = {}

    def tell(path: Path, text: str) -> None:
        if said.get(path) != text:
            said[path] = text
            reporter.status(text)

    rounds = 0
    while not stop():
        batches = waiting_batches(project)
        if not batches:
            return rounds
        offsets = slide_offsets(project)
        for batch, path in [(waiting, path) for waiting in batches for path in waiting.files()]:
            signature = _signature(path)
            if signature is None or examined.get(path) == signature:
                continue
            if settling.get(path) != signature:
                settling[path] = signature  # new, or changed since the last poll: read it once it settles
                continue
            examined[path] = signature
            try:
                done, total = labelled(batch, path, offsets)
            except WsiIlError as exc:
                tell(path, f"{path}: {exc}")
                continue
            if done < total:
                tell(
                    path,
                    f"batch {batch.batch_dir.name}: {done} of {total} patches labelled; waiting for the rest ({path})",
                )
                continue
            try:
                ingest_batch(path)
            except WsiIlError as exc:  # e.g. another command holds the project: try again at the next poll
                examined.pop(path, None)
                tell(path, f"{path}: {exc}")
                continue
            rounds += 1
            break  # this batch is done: look at the sessions anew
        time.sleep(interval)
    return rounds
