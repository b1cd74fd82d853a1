"""The wsi-il command line: thin commands over the library; the only module that prints."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from wsi_il import __version__
from wsi_il.errors import InputError, WsiIlError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Annotate whole slide images by reviewing a few well-chosen patches (QuPath-compatible).")
console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

ProjectArg = Annotated[Path, typer.Argument(help="The project folder.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="Where to compute: auto (CUDA when present), cpu or cuda.")]


class RichReporter:
    """Show library progress as Rich progress bars and messages on stderr (the bars start on first use)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started = False

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        if not self.started:
            self.progress.start()
            self.started = True
        task_id = self.progress.add_task(description, total=max(total, 0), unit=unit)
        return lambda n: self.progress.advance(task_id, n)

    def info(self, message: str) -> None:
        self.progress.console.print(message)

    def warn(self, message: str) -> None:
        self.progress.console.print(f"[bold yellow]warning:[/] {message}")


@contextlib.contextmanager
def _reporter() -> Iterator[RichReporter]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                        TextColumn("{task.fields[unit]}"), _SpeedColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    reporter = RichReporter(progress)
    try:
        yield reporter
    finally:
        if reporter.started:
            progress.stop()


class _SpeedColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[no-untyped-def]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f}/s" if speed else "     -/s", style="cyan")


def _device(choice: str) -> str:
    if choice not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {choice!r} is not auto, cpu or cuda", "pick one of them")
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", "use --device cpu")
    return choice


def _fail(exc: WsiIlError) -> None:
    from rich.markup import escape

    hint = f" [dim]({escape(exc.hint)})[/]" if exc.hint else ""
    console.print(f"[bold red]error:[/] {escape(exc.message)}{hint}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except WsiIlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/]: nothing finished was lost; run the same command again to go on")
        raise typer.Exit(130) from None
    except OSError as exc:  # disk full, permissions, a file removed underneath us
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(WsiIlError(f"{exc.strerror or exc}{where}", "check free disk space and permissions, then run the "
                         "same command again"))
    except Exception as exc:
        if os.environ.get("WSI_IL_DEBUG"):
            raise
        _fail(WsiIlError(f"unexpected {type(exc).__name__}: {exc}",
                         "this is a bug in wsi-il: please report it with the command you ran "
                         "(WSI_IL_DEBUG=1 shows the traceback)"))


def _random_warning(manifest: dict[str, Any]) -> None:
    if manifest["features"]["weights"] == "random":
        console.print("[bold yellow on red] WARNING [/] [bold yellow]this project's features come from a RANDOMLY "
                      "initialised ResNet-18 (--weights random): fine for tests and demos, useless for real "
                      "annotation. Re-create the project with ImageNet or your own weights.[/]")


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False) -> None:
    if version:
        out.print(f"wsi-il {__version__}")
        raise typer.Exit(0)


@app.command()
def init(
    project: ProjectArg,
    slide: Annotated[list[Path] | None, typer.Option("--slide", help="A slide file (repeat for several).")] = None,
    patches: Annotated[Path | None, typer.Option(help="A folder of patch images (class subfolders optional).")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated classes [default: Tumor,Normal, or the "
                                                "class subfolders of --patches].")] = None,
    tile_size: Annotated[int, typer.Option(help="Tile side in level-0 pixels.")] = 256,
    weights: Annotated[str, typer.Option(help="imagenet, random (tests/demos only), or a weights file.")] = "imagenet",
    epochs: Annotated[int, typer.Option(help="Training epochs per round.")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    margin: Annotated[float, typer.Option(help="Triplet loss margin.")] = 0.2,
    warm_start: Annotated[bool, typer.Option(help="Start each round from the previous heads.")] = False,
    refine_query: Annotated[bool, typer.Option(help="Move the query towards relevant patches.")] = True,
    batch_size: Annotated[int, typer.Option(help="Patches per feature-extraction batch.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for sampling, training and random weights.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Create a project: tile the slides, compute normalisation statistics and cache the features.

    Run it again to resume an interrupted run.
    """
    from wsi_il.config import FeatureSettings, TilingSettings, TrainSettings, to_dict
    from wsi_il.database import build_database, folder_classes, register_patch_folder, register_slide
    from wsi_il.features import build_resnet, resolve_weights
    from wsi_il.project import Project

    with _errors():
        proj = Project(project)
        if proj.exists():
            manifest = proj.read_manifest()
            known = {Path(s["path"]) for s in manifest["slides"]}
            asked = {p.resolve() for p in (slide or [])} | ({patches.resolve()} if patches else set())
            if asked - known:
                raise InputError(f"{project} already exists with other slides",
                                 f"add slides with `wsi-il add-slide {project} --slide FILE`")
            console.print(f"resuming {project}")
            weights_obj = None
        else:
            if not slide and patches is None:
                raise InputError("no slides given", "add --slide FILE (repeatable) or --patches DIR")
            weights_obj = resolve_weights(weights)
            build_resnet(weights_obj, seed)  # a file that does not fit fails here, before anything is written
            names = [c.strip() for c in classes.split(",")] if classes else (
                folder_classes(patches) if patches and folder_classes(patches) else ["Tumor", "Normal"])
            names = [n for n in names if n]
            if len(names) < 2 or len({n.lower() for n in names}) != len(names):
                raise InputError(f"--classes {classes!r} must name at least two different classes",
                                 "e.g. --classes Tumor,Normal")
            feature_settings = FeatureSettings(weights=weights if weights_obj.kind != "file" else weights_obj.source,
                                               weights_sha256=weights_obj.sha256, batch_size=batch_size, seed=seed)
            manifest = {"classes": names, "tiling": to_dict(TilingSettings(tile_size_px=tile_size)),
                        "features": to_dict(feature_settings),
                        "train": to_dict(TrainSettings(epochs=epochs, lr=lr, margin=margin, warm_start=warm_start,
                                                       refine_query=refine_query, seed=seed)),
                        "normalisation": None, "slides": []}
            for path in slide or []:
                register_slide(manifest, path)
            if patches is not None:
                register_patch_folder(manifest, patches)
            proj.create(manifest)
            manifest = proj.read_manifest()
        _random_warning(manifest)
        with proj.lock("init"), _reporter() as reporter:
            manifest = build_database(proj, manifest, reporter, _device(device), weights_obj)
        total = sum(s["n_patches"] for s in manifest["slides"])
        out.print(f"[green]ready:[/] {project} holds {total} tissue patches from {len(manifest['slides'])} "
                  f"source(s); classes {', '.join(manifest['classes'])}")
        out.print(f"next: wsi-il query {project} --region QUERY.geojson --label {manifest['classes'][0]}")


@app.command("add-slide")
def add_slide(
    project: ProjectArg,
    slide: Annotated[list[Path] | None, typer.Option("--slide", help="A slide file (repeat for several).")] = None,
    patches: Annotated[Path | None, typer.Option(help="A folder of patch images.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Add slides to a project and cache their features (with the project's normalisation)."""
    from wsi_il.database import build_database, register_patch_folder, register_slide
    from wsi_il.project import Project

    with _errors():
        proj = Project(project)
        manifest = proj.read_manifest()
        if not slide and patches is None:
            raise InputError("no slides given", "add --slide FILE (repeatable) or --patches DIR")
        with proj.lock("add-slide"):
            for path in slide or []:
                register_slide(manifest, path)
            if patches is not None:
                register_patch_folder(manifest, patches)
            proj.write_manifest(manifest)
            _random_warning(manifest)
            with _reporter() as reporter:
                manifest = build_database(proj, manifest, reporter, _device(device))
        out.print(f"[green]added:[/] the project now holds {sum(s['n_patches'] for s in manifest['slides'])} patches")


@app.command()
def query(
    project: ProjectArg,
    region: Annotated[Path | None, typer.Option(help="QuPath GeoJSON of the query region.")] = None,
    slide: Annotated[str | None, typer.Option(help="The slide the region was drawn on (id or file name).")] = None,
    patch: Annotated[list[str] | None, typer.Option("--patch", help="A database patch id (repeatable).")] = None,
    images: Annotated[list[Path] | None, typer.Option("--images", help="Query image files or folders.")] = None,
    label: Annotated[str | None, typer.Option(help="The class to look for [default: the first class].")] = None,
    strategy: Annotated[str, typer.Option(help="random, topk, fme, cnfp, hybrid or entropy.")] = "cnfp",
    k: Annotated[int, typer.Option("-k", "--k", help="Patches per review batch.")] = 10,
    rounds: Annotated[int, typer.Option(help="Review rounds in this session.")] = 5,
    abandon: Annotated[bool, typer.Option(help="Close a session still waiting for labels.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Start a query session from a QuPath region (or patches/images) and write the first review batch."""
    import numpy as np

    from wsi_il.config import STRATEGIES, SessionSettings
    from wsi_il.database import IMAGE_SUFFIXES
    from wsi_il.project import Project
    from wsi_il.session import (
        extract_query_images,
        open_context,
        query_from_patch_ids,
        query_from_region,
        start_session,
    )

    with _errors():
        if strategy not in STRATEGIES:
            raise InputError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}", "pick one of them")
        if k < 1 or rounds < 1:
            raise InputError("-k and --rounds must be at least 1", "e.g. -k 10 --rounds 5")
        if sum(x is not None and x != [] for x in (region, patch, images)) != 1:
            raise InputError("give exactly one query: --region, --patch or --images", "e.g. --region query.geojson")
        proj = Project(project)
        with proj.lock("query"), _reporter() as reporter:
            ctx = open_context(proj, _device(device), reporter)
            _random_warning(ctx.manifest)
            label = label or ctx.classes[0]
            kwargs: dict[str, Any] = {}
            if region is not None:
                indices, slide_id, warnings = query_from_region(ctx, region, slide)
                for warning in warnings:
                    reporter.warn(warning)
                kwargs = {"query_indices": indices, "source": str(region), "slide": slide_id}
            elif patch:
                kwargs = {"query_indices": query_from_patch_ids(ctx, patch), "source": "patch ids"}
            else:
                files = [f for p in images or [] for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
                         if f.suffix.lower() in IMAGE_SUFFIXES]
                if not files:
                    raise InputError("--images names no image files", "give image files or a folder of them")
                kwargs = {"query_features": extract_query_images(ctx, files), "source": f"{len(files)} images"}
            result = start_session(ctx, label, SessionSettings(strategy, k, rounds), abandon=abandon, **kwargs)
        n = kwargs.get("query_indices")
        n = len(n) if isinstance(n, np.ndarray) else len(kwargs.get("query_features", []))
        _report_round(project, result, f"session {result.session}: {n} query patches, looking for {label}")


def _report_round(project: Path, result: Any, headline: str) -> None:
    out.print(f"[green]{headline}[/]")
    if result.batch_dir is not None:
        out.print(f"review batch {result.round}/{result.rounds} ({result.rule}): {result.batch_dir}")
        out.print(f"  open {result.batch_dir / 'contact_sheet.png'}, fill the label column of labels.csv, then:")
        out.print(f"  wsi-il ingest {project} {result.batch_dir / 'labels.csv'}")
    else:
        out.print(f"next: wsi-il export {project} --out mask.geojson   (or start another query with wsi-il query)")
    out.print(f"[dim]{result.seconds:.1f} s[/]")


@app.command()
def ingest(
    project: ProjectArg,
    labels: Annotated[Path, typer.Argument(help="The batch's labels.csv, or the GeoJSON QuPath exported for it.")],
    partial: Annotated[bool, typer.Option(help="Accept a half-filled batch (only the filled rows count).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Record a batch's labels, train both heads, refine the query and write the next batch."""
    from wsi_il.project import Project
    from wsi_il.session import ingest as ingest_labels
    from wsi_il.session import open_context

    with _errors():
        proj = Project(project)
        with proj.lock("ingest"), _reporter() as reporter:
            ctx = open_context(proj, _device(device), reporter)
            result = ingest_labels(ctx, labels, allow_partial=partial)
        _report_round(project, result, result.message)


@app.command()
def status(
    project: ProjectArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show slides, sessions, labels, weights, time per round and what to do next."""
    from wsi_il.status import project_status

    with _errors():
        info = project_status(Path(project))
        if as_json:
            out.print_json(json.dumps(info))
            return
        _print_status(info)


def _print_status(info: dict[str, Any]) -> None:
    weights = info["weights"]
    style = "bold yellow on red" if weights["kind"] == "random" else "green"
    out.print(f"[bold]{info['project']}[/]  wsi-il project {info['uid'][:8]}  classes: {', '.join(info['classes'])}")
    out.print(f"weights: [{style}]{weights['description']}[/]")
    table = Table("slide", "kind", "size (px)", "mpp", "patches", "features")
    for s in info["slides"]:
        table.add_row(s["id"], s["kind"], f"{s['width']} x {s['height']}", str(s["mpp"] or "-"), str(s["patches"]),
                      "done" if s["extracted"] else "[yellow]pending[/]")
    out.print(table)
    sessions = Table("session", "label", "strategy", "k", "round", "state", "query", "s/round")
    for s in info["sessions"]:
        sessions.add_row(s["id"], s["label"], s["strategy"], str(s["k"]), f"{s['round']}/{s['rounds']}", s["state"],
                         str(s["query_patches"]), f"{s['seconds_per_round']:.1f}" if s["seconds_per_round"] else "-")
    if info["sessions"]:
        out.print(sessions)
    labels = ", ".join(f"{k}: {v}" for k, v in info["labels"].items()) or "none yet"
    out.print(f"labels: {info['n_labels']} ({labels}); model: {info['model'] or 'none (pretrained head)'}")
    out.print(f"next: {info['next']}")


@app.command()
def export(
    project: ProjectArg,
    out_path: Annotated[Path, typer.Option("--out", help="Output GeoJSON (or .csv for a patch-folder project).")],
    slide: Annotated[str | None, typer.Option(help="Only this slide.")] = None,
    label: Annotated[str | None, typer.Option(help="Only this class [default: every class].")] = None,
    detections: Annotated[bool, typer.Option(help="Also write one detection per patch with probabilities.")] = False,
    overview: Annotated[bool, typer.Option(help="Write an overview PNG beside the GeoJSON.")] = True,
    device: DeviceOpt = "cpu",
) -> None:
    """Write the predicted mask as QuPath GeoJSON (one file per slide) and an overview picture."""
    from wsi_il.export import export_masks, export_table
    from wsi_il.project import Project
    from wsi_il.session import open_context

    with _errors():
        proj = Project(project)
        with proj.lock("export"), _reporter() as reporter:
            ctx = open_context(proj, _device(device), reporter)
            _random_warning(ctx.manifest)
            if out_path.suffix.lower() == ".csv":
                path = export_table(ctx, out_path)
                out.print(f"[green]wrote[/] {path}")
                return
            written = export_masks(ctx, out_path, slide, label, detections, overview)
        for item in written:
            counts = ", ".join(f"{k}: {v}" for k, v in item.patches_per_class.items())
            out.print(f"[green]wrote[/] {item.geojson} ({counts} patches)"
                      + (f" and {item.overview}" if item.overview else ""))


def main() -> None:
    """Entry point for `python -m wsi_il`."""
    app(prog_name="wsi-il")


if __name__ == "__main__":
    sys.exit(main())
