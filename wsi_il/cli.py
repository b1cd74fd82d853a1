"""The wsi-il command line: thin commands over the library; the only module that prints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
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
from wsi_il.config import TilingSettings, TrainSettings, settings_of
from wsi_il.errors import InputError, ProjectStateError, WsiIlError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="Annotate whole slide images by reviewing a few well-chosen patches (QuPath-compatible).",
)
console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

ProjectArg = Annotated[Path, typer.Argument(help="The project folder.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="Where to compute: auto (CUDA when present), cpu or cuda.")]
SlidesOpt = Annotated[
    list[str] | None,
    typer.Option("--slides", help="A glob pattern of slide files, in quotes (e.g. 'cohort/*.svs'; repeatable)."),
]
SlideListOpt = Annotated[
    Path | None, typer.Option("--slide-list", help="A text file naming a slide file a line (# comments).")
]
ClusterOpt = Annotated[
    str | None,
    typer.Option(
        help="Compute the slides on a Dask cluster: a scheduler's address (tcp://host:8786) or local:N "
        "(N worker processes here); needs pip install 'wsi-il[cluster]' (docs/cluster.md)."
    ),
]
PassClusterOpt = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        help="Run a pooled round's full pass on a Dask cluster's workers, a slide a task: a scheduler's address "
        "(tcp://host:8786) or local:N; --device is then the workers' (docs/cluster.md).",
    ),
]
BalanceOpt = Annotated[
    str,
    typer.Option(
        help="How labels weigh in training: classes (each class the same, a "
        "session's query as at most 10 labels) or none (each once, the paper)."
    ),
]
MapFromOpt = Annotated[
    str,
    typer.Option(
        help="Where the map (export, the desk's overlay and suggestions) comes "
        "from: readout (a fit of every label and the query region on the "
        "pretrained block's embedding each round, docs/quality.md) or heads "
        "(the trained classifier head, the paper)."
    ),
]
HeadInitOpt = Annotated[
    str,
    typer.Option(
        help="The classifier's linear layer each round: refit (fitted to the "
        "labels on the block's output before and after the round's training), "
        "fit (before only) or random (trained from scratch with the block, the "
        "paper)."
    ),
]
RoundOpt = Annotated[
    str,
    typer.Option(
        "--round",
        help="How a round picks its batch: exact (every patch re-embedded and "
        "ranked), pool (a bounded candidate pool ranked exactly, the full pass "
        "after the batch is written) or auto (exact up to 100,000 patches).",
    ),
]
PoolSizeOpt = Annotated[int, typer.Option(help="The most unreviewed patches a pooled round re-embeds and ranks.")]
ScheduleOpt = Annotated[
    str,
    typer.Option(
        help="Training each round: paper (two heads, 50 epochs from the pretrained "
        "block), fast (one shared block, warm start, early stopping) or auto "
        "(paper on a GPU, fast on CPU)."
    ),
]
FastBudgetOpt = Annotated[
    int,
    typer.Option(
        help="Fast schedule: the most training patch passes (labels x epochs) "
        "per round; 0 = 7500 with a frozen first convolution, else 2500.",
        min=0,
    ),
]
FrozenConv1Opt = Annotated[
    bool | None,
    typer.Option(
        "--fast-frozen-conv1/--no-fast-frozen-conv1",
        help="Fast schedule: keep the trained block's first convolution at its starting weights and cache its output "
        "(as much disk again as the feature cache; shorter rounds) [default: on, off with --weights random].",
        show_default=False,
    ),
]


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

    def status(self, message: str) -> None:
        """Show ``message`` as the description of the oldest unfinished bar (the outermost work: a simulation's
        rounds, not the extraction inside one), or as a dim line when there is none."""
        running = [task for task in self.progress.tasks if not task.finished]
        if running:
            self.progress.update(running[0].id, description=message)
            return
        from rich.markup import escape

        self.progress.console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)

    def info(self, message: str) -> None:
        from rich.markup import escape

        self.progress.console.print(escape(message), soft_wrap=True)

    def warn(self, message: str) -> None:
        _warn(message, self.progress.console)


def _warn(message: str, where: Console | None = None) -> None:
    """Print a warning on one line (it may hold file names with brackets: no markup)."""
    from rich.markup import escape

    (where or console).print(f"[bold yellow]warning:[/] {escape(' '.join(message.split()))}", soft_wrap=True)


@contextlib.contextmanager
def _reporter() -> Iterator[RichReporter]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        _SpeedColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    reporter = RichReporter(progress)
    try:
        yield reporter
    finally:
        if reporter.started:
            progress.stop()


class _SpeedColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f}/s" if speed else "     -/s", style="cyan")


def _device(choice: str, cluster: str | None = None) -> str:
    """The device of this machine for ``--device``; with a cluster, ``cuda`` is the workers' (this machine
    computes only what stays here, on its GPU where it has one)."""
    if choice not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {choice!r} is not auto, cpu or cuda", "pick one of them")
    import torch

    if choice == "auto" or (cluster and choice == "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", "use --device cpu")
    return choice


def _check_cluster(cluster: str | None) -> None:
    """Refuse a ``--cluster`` value that names no cluster before any work is done."""
    if cluster is not None:
        from wsi_il.cluster import parse_cluster

        parse_cluster(cluster)


def _build(
    proj: Any,
    manifest: dict[str, Any],
    reporter: RichReporter,
    dev: str,
    weights: Any,
    cluster: str | None,
    device: str,
) -> dict[str, Any]:
    """Build the project's feature cache here, or on the cluster ``--cluster`` names; then, where features were
    computed, the pretrained block's embedding of every patch, where the project's map or its pooled rounds read
    it."""
    from wsi_il.pool import frozen_key

    features_before = frozen_key(proj, manifest)
    if cluster is None:
        from wsi_il.extraction import build_database

        built = build_database(proj, manifest, reporter, dev, weights)
    else:
        from wsi_il.cluster import build_on_cluster, connect, parse_cluster

        spec = parse_cluster(cluster)
        with connect(spec) as client:
            reporter.info(f"cluster: {client.scheduler.address}, {len(client.nthreads())} worker(s)")
            built = build_on_cluster(proj, manifest, reporter, client, device, dev, weights)
    if frozen_key(proj, built) != features_before:  # a resumed init that computed nothing changes nothing
        _frozen_ahead(proj, built, reporter, dev)
    return built


def _frozen_ahead(proj: Any, manifest: dict[str, Any], reporter: RichReporter, dev: str) -> None:
    """Compute the frozen embedding (``pool.frozen_embeddings``) while the features are made, so that the first
    round, which the expert waits for, does not: the read-out map and pooled rounds need it."""
    from wsi_il.config import round_is_pooled
    from wsi_il.model import open_context
    from wsi_il.pool import frozen_embeddings

    settings = settings_of(manifest)
    patches = sum(s["n_patches"] for s in manifest["slides"])
    if settings.train.map_from == "readout" or round_is_pooled(settings.round, patches):
        frozen_embeddings(open_context(proj, dev, reporter))


def _fail(exc: WsiIlError) -> None:
    from rich.markup import escape

    def one_line(text: str) -> str:  # messages may quote a file's or a library's multi-line text
        return escape(" ".join(str(text).split()))

    hint = f" [dim]({one_line(exc.hint)})[/]" if exc.hint else ""
    console.print(f"[bold red]error:[/] {one_line(exc.message)}{hint}", soft_wrap=True)
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
        _fail(
            WsiIlError(
                f"{exc.strerror or exc}{where}",
                "check free disk space and permissions, then run the same command again",
            )
        )
    except Exception as exc:
        if os.environ.get("WSI_IL_DEBUG"):
            raise
        _fail(
            WsiIlError(
                f"unexpected {type(exc).__name__}: {exc}",
                "this is a bug in wsi-il: please report it with the command you ran "
                "(WSI_IL_DEBUG=1 shows the traceback)",
            )
        )


def _random_warning(manifest: dict[str, Any], project: Path | None = None) -> None:
    features = settings_of(manifest).features
    if features.weights == "random":
        where = project if project is not None else "PROJECT"
        if project is not None and (run := _pretraining_now(project)) is not None:
            console.print(
                "[yellow]features from random weights for now: pretraining is running "
                f"(since {str(run.get('since', '?'))[:19]}, "
                "see `wsi-il status`); the batch waiting for review is drawn again with the new features when "
                "they are ready, labels kept[/]",
                soft_wrap=True,
            )
            return
        console.print(
            "[bold yellow on red] WARNING [/] [bold yellow]this project's features come from a RANDOMLY "
            f"initialised {features.arch} (--weights random): fine for tests "
            "and demos, poor for real annotation. Offline, run "
            f"`wsi-il pretrain {where} --apply` (a few minutes, no labels, the review goes on meanwhile); "
            f"or `wsi-il reextract {where} --weights imagenet|FILE`.[/]",
            soft_wrap=True,
        )


def _pretraining_now(project: Path) -> dict[str, Any] | None:
    from wsi_il.project import Project
    from wsi_il.status import pretraining_run

    return pretraining_run(Project(project))


def _warn_unknown_mpp(record: dict[str, Any], tiling: TilingSettings) -> None:
    if record.get("kind") == "slide" and record.get("mpp") is None:
        _warn(
            f"slide {record['id']} ({Path(record['path']).name}) records no pixel size (mpp); it is kept as "
            f"unknown. Tiles are {tiling.tile_size_px} px of level 0 whatever the magnification: put only "
            "slides scanned at the same magnification in one project, or give its pixel size with --slide-mpp "
            "and tile at a physical resolution with --mpp"
        )


def _say_tiles(manifest: dict[str, Any]) -> None:
    """Print what a tile is (its side in px and µm) and what a patch costs in the feature store."""
    from wsi_il.backbones import bytes_per_patch
    from wsi_il.features import store_shape

    tiling, settings = settings_of(manifest).tiling, settings_of(manifest).features
    where = (
        f"at {tiling.target_mpp:g} µm/px ({tiling.tile_size_px * tiling.target_mpp:g} µm)"
        if tiling.target_mpp
        else "of level 0"
    )
    out.print(
        f"tiles: {tiling.tile_size_px} px {where}; features: {settings.arch} --trainable {settings.trainable}, "
        f"{bytes_per_patch(store_shape(settings)) / 1000:.1f} kB a patch"
    )


# `init` options that are recorded in project.json: parameter -> (flag, where it is recorded)
_INIT_SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classes": ("--classes", ("classes",)),
    "tile_size": ("--tile-size", ("tiling", "tile_size_px")),
    "norm_sample": ("--norm-sample", ("tiling", "normalisation_sample")),
    "weights": ("--weights", ("features", "weights")),
    "arch": ("--arch", ("features", "arch")),
    "mpp": ("--mpp", ("tiling", "target_mpp")),
    "batch_size": ("--batch-size", ("features", "batch_size")),
    "epochs": ("--epochs", ("train", "epochs")),
    "lr": ("--lr", ("train", "lr")),
    "margin": ("--margin", ("train", "margin")),
    "warm_start": ("--warm-start", ("train", "warm_start")),
    "refine_query": ("--refine-query", ("train", "refine_query")),
    "seed": ("--seed", ("train", "seed")),
    "schedule": ("--schedule", ("train", "schedule")),
    "fast_budget": ("--fast-budget", ("train", "fast_budget")),
    "fast_frozen_conv1": ("--fast-frozen-conv1", ("train", "fast_frozen_conv1")),
    "balance": ("--balance", ("train", "balance")),
    "head_init": ("--head-init", ("train", "head_init")),
    "map_from": ("--map-from", ("train", "map_from")),
    "trainable": ("--trainable", ("features", "trainable")),
    "round_mode": ("--round", ("round", "round_mode")),
    "pool_size": ("--pool-size", ("round", "pool_size")),
}


def _schedule(value: str) -> str:
    from wsi_il.config import SCHEDULES

    if value.lower() not in SCHEDULES:
        raise InputError(f"--schedule {value!r} is not one of {', '.join(SCHEDULES)}", "e.g. --schedule paper")
    return value.lower()


def _round_settings(mode: str, pool_size: int) -> Any:
    from wsi_il.config import ROUND_MODES, RoundSettings

    if mode.lower() not in ROUND_MODES:
        raise InputError(f"--round {mode!r} is not one of {', '.join(ROUND_MODES)}", "e.g. --round auto")
    if pool_size < 1:
        raise InputError(f"--pool-size must be at least 1, not {pool_size}", "e.g. --pool-size 50000")
    return RoundSettings(round_mode=mode.lower(), pool_size=pool_size)


def _frozen_conv1(value: bool | None, weights: str, features: Any = None) -> bool:
    from wsi_il.config import frozen_conv1_default

    if features is not None and features.arch_args is not None:
        return False  # a timm model's trainable part has no first convolution to keep
    return frozen_conv1_default(weights) if value is None else value


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """A setting's value, refused in one line when it is not one of ``choices``."""
    value = value.strip().lower()
    if value not in choices:
        raise InputError(f"{flag} {value!r} is not one of {', '.join(choices)}", "pick one of them")
    return value


def _balance(value: str) -> str:
    from wsi_il.config import BALANCES

    return _choice("--balance", value, BALANCES)


def _head_init(value: str) -> str:
    from wsi_il.config import HEAD_INITS

    return _choice("--head-init", value, HEAD_INITS)


def _map_from(value: str) -> str:
    from wsi_il.config import MAPS_FROM

    return _choice("--map-from", value, MAPS_FROM)


def _trainable(value: str) -> str:
    from wsi_il.features import check_trainable

    return check_trainable(value.lower())


def _check_init_options(typer_ctx: typer.Context, project: Path, manifest: dict[str, Any]) -> None:
    """Refuse `init` on an existing project with options (given explicitly) other than those it recorded."""
    settings = settings_of(manifest)  # a setting older than the project reads as the value it had then
    asked, recorded = [], []
    for name, (flag, keys) in _INIT_SETTINGS.items():
        source = typer_ctx.get_parameter_source(name) if name in typer_ctx.params else None
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # not given: keeps what is recorded
            continue
        value = typer_ctx.params[name]
        stored = getattr(getattr(settings, keys[0]), keys[1]) if len(keys) == 2 else manifest.get(keys[0])
        if not _same_setting(name, value, stored, manifest):
            asked.append(_option_text(flag, value))
            recorded.append(_option_text(flag, stored))
    if asked:
        raise ProjectStateError(
            f"{project} was created with {', '.join(recorded)}, not {', '.join(asked)}",
            f"run `wsi-il init {project}` without these options to resume it; other settings "
            "need a new project (other weights: `wsi-il reextract`)",
        )


def _same_setting(name: str, value: Any, stored: Any, manifest: dict[str, Any]) -> bool:
    import math

    if name in ("trainable", "balance", "head_init", "map_from", "round_mode"):
        return str(value).strip().lower() == stored
    if name == "classes":
        wanted = [c.strip().casefold() for c in str(value).split(",") if c.strip()]
        return wanted == [str(c).casefold() for c in stored or []]
    if name == "weights" and value == "pretrain":  # random features until the pretraining is switched in
        return stored == "random" or Path(str(stored)).parent.name == "pretrain"
    if name == "weights" and (value == stored or (Path(value).is_dir() and str(Path(value).resolve()) == stored)):
        return True  # the same hub id or snapshot folder
    if name == "weights" and value not in ("imagenet", "random"):
        path = Path(value)
        if stored in ("imagenet", "random") or not path.is_file():
            return False
        if str(path.resolve()) == stored:
            return True
        from wsi_il.features import file_sha256

        return file_sha256(path) == settings_of(manifest).features.weights_sha256
    if isinstance(value, float) and isinstance(stored, int | float) and not isinstance(stored, bool):
        return math.isclose(value, stored, rel_tol=1e-9)
    return value == stored


def _option_text(flag: str, value: Any) -> str:
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, list):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False) -> None:
    if version:
        out.print(f"wsi-il {__version__}")
        raise typer.Exit(0)


@app.command()
def init(
    typer_ctx: typer.Context,
    project: ProjectArg,
    slide: Annotated[list[Path] | None, typer.Option("--slide", help="A slide file (repeat for several).")] = None,
    slides: SlidesOpt = None,
    slide_list: SlideListOpt = None,
    patches: Annotated[Path | None, typer.Option(help="A folder of patch images (class subfolders optional).")] = None,
    classes: Annotated[
        str | None,
        typer.Option(help="Comma-separated classes [default: Tumor,Normal, or the class subfolders of --patches]."),
    ] = None,
    tile_size: Annotated[
        int | None,
        typer.Option(
            help="Tile side in pixels: of level 0, or at --mpp where given "
            "[default: 256, or the input side of a model trained at a known "
            "resolution]."
        ),
    ] = None,
    tile_um: Annotated[float | None, typer.Option(help="Tile side in µm (with --mpp or --magnification).")] = None,
    mpp: Annotated[
        float | None,
        typer.Option(
            help="Read tiles at this resolution (µm/px), from the best pyramid "
            "level, resized [default: level-0 pixels, or the resolution a known "
            "pathology model was trained at]."
        ),
    ] = None,
    magnification: Annotated[
        float | None, typer.Option(help="Read tiles at this magnification (10/x µm/px: 20 is 0.5 µm/px).")
    ] = None,
    slide_mpp: Annotated[float | None, typer.Option(help="Pixel size (µm/px) of slides that record none.")] = None,
    norm_sample: Annotated[
        int,
        typer.Option(
            help="Tissue tiles read at random for the normalisation mean and "
            "std; 0 = every tile (the paper's exact statistics; each tile is then "
            "read twice).",
            min=0,
        ),
    ] = 1024,
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet, pretrain (offline: learn the backbone from these slides, "
            "a few minutes on a CPU, no labels; the review can start meanwhile), "
            "random (tests/demos only), a weights file, a timm snapshot folder, or "
            "hf-hub:ORG/NAME (local cache only)."
        ),
    ] = "imagenet",
    arch: Annotated[
        str | None,
        typer.Option(
            help="resnet18 (default, the paper), resnet34, resnet50, or any timm "
            "architecture [default: resnet18, or what a --weights file or hub "
            "config names]."
        ),
    ] = None,
    arch_args: Annotated[
        str | None,
        typer.Option(help="A timm architecture's keyword arguments, as JSON (e.g. '{\"init_values\": 1e-5}')."),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs per round.")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    margin: Annotated[float, typer.Option(help="Triplet loss margin.")] = 0.2,
    warm_start: Annotated[bool, typer.Option(help="Start each round from the previous heads.")] = False,
    refine_query: Annotated[bool, typer.Option(help="Move the query towards relevant patches.")] = True,
    schedule: ScheduleOpt = "auto",
    fast_budget: FastBudgetOpt = 0,
    fast_frozen_conv1: FrozenConv1Opt = None,
    balance: BalanceOpt = "classes",
    head_init: HeadInitOpt = TrainSettings.head_init,
    map_from: MapFromOpt = TrainSettings.map_from,
    round_mode: RoundOpt = "auto",
    pool_size: PoolSizeOpt = 50_000,
    batch_size: Annotated[int, typer.Option(help="Patches per feature-extraction batch.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for sampling, training and random weights.")] = 0,
    trainable: Annotated[
        str | None,
        typer.Option(
            help="What the heads train: last (the last block of layer4, the "
            "paper; a ViT's last block) or layer4 (all of layer4, the paper's "
            "ablation; 4x the store); for timm models embedding (the heads on "
            "the frozen embedding) [default: last; embedding for timm]."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    cluster: ClusterOpt = None,
) -> None:
    """Create a project: tile the slides, compute normalisation statistics and cache the features.

    Run it again to resume an interrupted run.
    """
    from wsi_il.config import new_manifest
    from wsi_il.database import folder_classes, register_patch_folder, register_slide, slide_paths
    from wsi_il.project import Project, check_settings
    from wsi_il.resolution import target_mpp, tile_side_px

    with _errors():
        proj = Project(project)
        before = proj.entries()
        dev = _device(device, cluster)
        slide = slide_paths(slide or [], slides or [], slide_list)
        _check_cluster(cluster)
        if proj.exists():
            manifest = proj.read_manifest()
            known = {Path(s["path"]) for s in manifest["slides"]}
            asked = {p.resolve() for p in (slide or [])} | ({patches.resolve()} if patches else set())
            if asked - known:
                raise InputError(
                    f"{project} already exists with other slides",
                    f"add slides with `wsi-il add-slide {project} --slide FILE`",
                )
            _check_init_options(typer_ctx, project, manifest)
            for warning in check_settings(proj.manifest_path(), manifest):
                _warn(warning)
            weights_obj = None
        else:
            if not slide and patches is None:
                raise InputError("no slides given", "add --slide FILE (repeatable), --slides PATTERN or --patches DIR")
            feature_settings, weights_obj, model_mpp = _feature_settings(
                "random" if weights == "pretrain" else weights, arch, arch_args, trainable, batch_size, seed
            )
            if weights == "pretrain" and feature_settings.arch_args is not None:
                raise InputError(
                    f"--weights pretrain trains a ResNet; {feature_settings.arch} is a timm model",
                    "give the timm model's weights (a file, a snapshot folder or hf-hub:ORG/NAME), or "
                    "leave out --arch to pretrain a ResNet-18",
                )
            target = target_mpp(mpp, magnification) if mpp or magnification or not model_mpp else model_mpp
            # a timm model at a physical resolution: tiles at its input side, unless told
            tile_side = tile_side_px(
                tile_size,
                tile_um,
                target,
                feature_settings.input_px if target and feature_settings.arch_args is not None else 256,
            )
            names = (
                [c.strip() for c in classes.split(",")]
                if classes
                else (folder_classes(patches) if patches and folder_classes(patches) else ["Tumor", "Normal"])
            )
            names = [n for n in names if n]
            if len(names) < 2 or len({n.lower() for n in names}) != len(names):
                raise InputError(
                    f"--classes {classes!r} must name at least two different classes", "e.g. --classes Tumor,Normal"
                )
            manifest = new_manifest(
                names,
                TilingSettings(tile_size_px=tile_side, target_mpp=target, normalisation_sample=norm_sample),
                feature_settings,
                TrainSettings(
                    epochs=epochs,
                    lr=lr,
                    margin=margin,
                    warm_start=warm_start,
                    refine_query=refine_query,
                    seed=seed,
                    schedule=_schedule(schedule),
                    fast_budget=fast_budget,
                    fast_frozen_conv1=_frozen_conv1(fast_frozen_conv1, weights, feature_settings),
                    balance=_balance(balance),
                    head_init=_head_init(head_init),
                    map_from=_map_from(map_from),
                ),
                _round_settings(round_mode, pool_size),
            )
            for path in slide or []:
                _warn_unknown_mpp(register_slide(manifest, path, slide_mpp), settings_of(manifest).tiling)
            if patches is not None:
                register_patch_folder(manifest, patches)
        if weights != "pretrain":
            _random_warning(manifest, project)
        with proj.lock("init", create=True), _reporter() as reporter:
            created = weights_obj is not None
            if created:
                if proj.exists():
                    raise ProjectStateError(
                        f"{project} was created by another command meanwhile",
                        f"run `wsi-il init {project}` to resume it",
                    )
                proj.create(manifest)
                manifest = proj.read_manifest()
            else:
                console.print(f"resuming {project}")
            try:
                manifest = _build(proj, manifest, reporter, dev, weights_obj, cluster, device)
            except InputError:
                if created:  # a slide that cannot be read, no tissue: leave no half-made project behind
                    proj.remove_created(before)
                raise
        total = sum(s["n_patches"] for s in manifest["slides"])
        out.print(
            f"[green]ready:[/] {project} holds {total} tissue patches from {len(manifest['slides'])} "
            f"source(s); classes {', '.join(manifest['classes'])}"
        )
        _say_tiles(manifest)
        if weights == "pretrain" and settings_of(manifest).features.weights == "random":
            _init_pretrain(proj, dev, seed, manifest["classes"][0])
            return
        out.print(f"next: wsi-il query {project} --region QUERY.geojson --label {manifest['classes'][0]}")


def _init_pretrain(proj: Any, dev: str, seed: int, first_class: str) -> None:
    """`init --weights pretrain`: the quick pretraining recipe on the new project, then the switch to it."""
    from wsi_il.pretrain import PretrainSettings

    base = PretrainSettings.for_device(dev, None, None, None, "quick")
    settings = PretrainSettings(base.steps, base.batch, base.crop_px, field_scale=base.field_scale, seed=seed)
    console.print(
        f"pretraining the backbone on this project's tissue (no labels). Meanwhile, in another shell, "
        f"you can start: `wsi-il query {proj.root} --region QUERY.geojson --label {first_class}`; "
        "its batch is drawn again with the new features when they are ready, labels kept"
    )
    _run_pretrain(proj, settings, dev, _free_weights_path(proj), restart=False, apply=True)


@app.command("add-slide")
def add_slide(
    project: ProjectArg,
    slide: Annotated[list[Path] | None, typer.Option("--slide", help="A slide file (repeat for several).")] = None,
    slides: SlidesOpt = None,
    slide_list: SlideListOpt = None,
    patches: Annotated[Path | None, typer.Option(help="A folder of patch images.")] = None,
    slide_mpp: Annotated[float | None, typer.Option(help="Pixel size (µm/px) of slides that record none.")] = None,
    device: DeviceOpt = "auto",
    cluster: ClusterOpt = None,
) -> None:
    """Add slides to a project and cache their features (with the project's normalisation)."""
    import copy

    from wsi_il.database import register_patch_folder, register_slide, slide_paths
    from wsi_il.project import Project, check_settings

    with _errors():
        proj = Project(project)
        proj.read_manifest()
        slide = slide_paths(slide or [], slides or [], slide_list)
        if not slide and patches is None:
            raise InputError("no slides given", "add --slide FILE (repeatable), --slides PATTERN or --patches DIR")
        dev = _device(device, cluster)
        _check_cluster(cluster)
        with proj.lock("add-slide"):
            manifest = proj.read_manifest()
            for warning in check_settings(proj.manifest_path(), manifest):
                _warn(warning)
            before = copy.deepcopy(manifest)
            for path in slide or []:
                _warn_unknown_mpp(register_slide(manifest, path, slide_mpp), settings_of(manifest).tiling)
            if patches is not None:
                register_patch_folder(manifest, patches)
            added = [s["id"] for s in manifest["slides"][len(before["slides"]) :]]
            proj.write_manifest(manifest)
            _random_warning(manifest, project)
            try:
                with _reporter() as reporter:
                    manifest = _build(proj, manifest, reporter, dev, None, cluster, device)
            except InputError:  # a slide that cannot be read: the project goes back to what it was
                proj.write_manifest(before)
                for slide_id in added:
                    proj.remove_slide_files(slide_id)
                raise
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
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import extract_query_images, query_from_patch_ids, query_from_region, start_session

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
            _random_warning(ctx.manifest, project)
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
                files = [
                    f
                    for p in images or []
                    for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
                    if f.suffix.lower() in IMAGE_SUFFIXES
                ]
                if not files:
                    raise InputError("--images names no image files", "give image files or a folder of them")
                kwargs = {
                    "query_features": extract_query_images(ctx, files),
                    "source": f"{len(files)} images",
                    "images": [str(f.resolve()) for f in files],
                }
            result = start_session(ctx, label, SessionSettings(strategy, k, rounds), abandon=abandon, **kwargs)
        n = kwargs.get("query_indices")
        n = len(n) if isinstance(n, np.ndarray) else len(kwargs.get("query_features", []))
        _report_round(project, result, f"session {result.session}: {n} query patches, looking for {label}")


def _report_round(project: Path, result: Any, headline: str, watching: bool = False) -> None:
    out.print(f"[green]{headline}[/]")
    if result.batch_dir is not None:
        out.print(f"review batch {result.round}/{result.rounds} ({result.rule}): {result.batch_dir}")
        if watching:
            out.print(
                f"  open {result.batch_dir / 'contact_sheet.png'}, fill the label column of labels.csv and "
                "save it: it is ingested as soon as every row is labelled"
            )
        else:
            out.print(f"  open {result.batch_dir / 'contact_sheet.png'}, fill the label column of labels.csv, then:")
            out.print(f"  wsi-il ingest {project} {result.batch_dir / 'labels.csv'}")
    else:
        _print_next(project)
    out.print(f"[dim]{result.seconds:.1f} s[/]")


def _print_next(project: Path) -> None:
    """Say what waits in the project now (a batch to label, an export, a query): the same as `status`."""
    from wsi_il.status import project_status

    out.print(f"next: {project_status(project)['next']}")


@app.command()
def ingest(
    project: ProjectArg,
    labels: Annotated[Path, typer.Argument(help="The batch's labels.csv, or the GeoJSON QuPath exported for it.")],
    partial: Annotated[bool, typer.Option(help="Accept a half-filled batch (only the filled rows count).")] = False,
    device: DeviceOpt = "auto",
    cluster: PassClusterOpt = None,
) -> None:
    """Record a batch's labels, train both heads, refine the query and write the next batch."""
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest as ingest_labels

    with _errors():
        proj = Project(project)
        dev = _device(device, cluster)
        _check_cluster(cluster)
        with proj.lock("ingest"), _reporter() as reporter:
            ctx = open_context(proj, dev, reporter)
            result = ingest_labels(ctx, labels, allow_partial=partial, pass_later=True)
        _report_round(project, result, result.message)
        _run_pass(proj, dev, result, cluster, device)


def _run_pass(proj: Any, dev: str, result: Any, cluster: str | None = None, device: str = "auto") -> None:
    """Run the full pass a pooled round left (``fullpass.run_pass``), after the project lock was released: here,
    or on the cluster ``--cluster`` names (``device``: the workers')."""
    from wsi_il.clusterpass import pass_cluster
    from wsi_il.fullpass import run_pass
    from wsi_il.model import open_context

    if result.pass_model is None:
        return
    ready = f"batch {result.batch_dir.name} is ready; " if result.batch_dir is not None else ""
    where = "on the cluster" if cluster else "in this command"
    out.print(
        f"{ready}updating every patch's predictions (the full pass) {where}, outside the project's "
        "lock: you can review and ingest meanwhile"
    )
    with _reporter() as reporter, pass_cluster(cluster, device, reporter) as on:
        ctx = open_context(proj, dev, reporter)
        outcome = run_pass(
            ctx, result.pass_model, on_wait=lambda holder: out.print(f"[dim]waiting: {holder}[/]"), cluster=on
        )
    colour = "green" if outcome.entered else "yellow"
    out.print(f"[{colour}]{outcome.message}[/] [dim]({outcome.seconds:.1f} s)[/]")


@app.command()
def end(project: ProjectArg) -> None:
    """End the open session now: the labels given so far are kept, the waiting batch is closed unlabelled."""
    from wsi_il.project import Project
    from wsi_il.session import end_session

    with _errors():
        proj = Project(project)
        with proj.lock("end"):
            message = end_session(proj)
        out.print(f"[green]{message}[/]")
        _print_next(project)


@app.command()
def relabel(
    project: ProjectArg,
    patch: Annotated[
        str | None, typer.Argument(help="The patch id (as in labels.csv or the contact sheet).", show_default=False)
    ] = None,
    label: Annotated[
        str | None, typer.Argument(help="Its new label: a class name, yes/no or skip.", show_default=False)
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="A batch's corrected labels.csv (or QuPath GeoJSON): every filled row that differs from "
            "the label recorded becomes a correction.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Correct labels already given: the ledger keeps every answer, the newest wins, the next round trains on it."""
    from wsi_il.corrections import correct_labels
    from wsi_il.database import patch_table
    from wsi_il.project import Project

    with _errors():
        if (labels is None) == (patch is None) or (patch is not None and label is None):
            raise InputError(
                "give either PATCH LABEL or --labels FILE", f"e.g. wsi-il relabel {project} CMU-1_x1024_y512 Tumor"
            )
        proj = Project(project)
        with proj.lock("relabel"):
            manifest = proj.read_manifest()
            ids = set(patch_table(proj, manifest).ids)
            answers = [(patch, label)] if patch is not None else _answers_in(proj, manifest, labels)
            written = correct_labels(proj, manifest, ids, answers, via="cli")
        for entry in written:
            out.print(f"[green]corrected[/] {entry['patch_id']}: {entry['label']}")
        if not written:
            out.print("nothing to correct: every label given is already the one recorded")
        else:
            out.print("the next round (wsi-il ingest) trains on the corrected labels")


def _answers_in(proj: Any, manifest: dict[str, Any], labels: Path) -> list[tuple[str, str]]:
    """The filled rows of a batch's labels file, as (patch id, label) answers."""
    from wsi_il.batch import read_batch
    from wsi_il.labels import read_labels
    from wsi_il.session import find_batch_dir
    from wsi_il.watch import slide_offsets

    batch_dir = find_batch_dir(proj, labels)
    if labels.is_dir():
        labels = batch_dir / "labels.csv"
    info, patches = read_batch(batch_dir)
    if info.project_uid != manifest["uid"]:
        raise InputError(
            f"{labels} belongs to another project (uid {info.project_uid[:8]})",
            "correct it in the project that wrote the batch",
        )
    read = read_labels(labels, info, patches, allow_partial=True, offsets=slide_offsets(proj))
    return [(pid, lab) for pid, lab in read.items()]


@app.command()
def watch(
    project: ProjectArg,
    interval: Annotated[float, typer.Option(help="Seconds between looks at the labels files.")] = 1.0,
    device: DeviceOpt = "auto",
    cluster: PassClusterOpt = None,
) -> None:
    """Ingest each review batch as soon as its labels.csv is filled in and saved (or a GeoJSON exported from
    QuPath into its folder): every round in one process, no start-up between rounds. Stops when every session
    is complete; Ctrl-C stops it, losing nothing."""
    from wsi_il.cluster import ClusterError
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest as ingest_labels
    from wsi_il.watch import waiting_batches
    from wsi_il.watch import watch as watch_batches

    with _errors():
        if not interval > 0:
            raise InputError(f"--interval {interval} is not a positive number of seconds", "e.g. --interval 1")
        proj = Project(project)
        proj.read_manifest()
        dev = _device(device, cluster)
        _check_cluster(cluster)
        waiting = waiting_batches(proj)
        if not waiting:
            raise ProjectStateError(
                f"no review batch of {project} waits for labels",
                f"start a session with `wsi-il query {project} ...`, or export the mask",
            )
        for batch in waiting:
            out.print(f"watching {batch.labels}")
        out.print(
            "[dim]fill in the label column and save (or export the classified batch from QuPath into its "
            "folder); each batch is ingested once every patch is labelled (Ctrl-C stops watching; nothing "
            "is lost)[/]"
        )

        _rehearse(proj, dev, waiting[0])

        def ingest_batch(labels: Path) -> None:
            with proj.lock("watch"), _reporter() as reporter:
                result = ingest_labels(open_context(proj, dev, reporter), labels, pass_later=True)
            _report_round(project, result, result.message, watching=True)
            try:
                _run_pass(proj, dev, result, cluster, device)
            except ClusterError as exc:  # the round is done; watching goes on, with the older predictions
                out.print(f"[yellow]{exc.message}[/] [dim]({exc.hint})[/]")

        with _reporter() as reporter:
            rounds = watch_batches(proj, ingest_batch, reporter, interval)
        out.print(
            f"[green]no batch waits for labels any more[/] ({rounds} ingested here); next: "
            f"wsi-il export {project} --out mask.geojson"
        )


def _rehearse(proj: Any, dev: str, batch: Any) -> None:
    """Warm the device up for the first round while the expert labels (``session.rehearse``), not when the batch
    is labelled already (the round would only wait for it). Without the project's lock: the rehearsal writes
    nothing, and taking the lock removes temporary files, which would race with a labels file being saved."""
    from wsi_il.events import SilentReporter
    from wsi_il.model import open_context
    from wsi_il.session import rehearse
    from wsi_il.watch import labelled, slide_offsets

    try:
        done, total = labelled(batch, batch.labels, slide_offsets(proj))
    except WsiIlError:
        done, total = 0, 1  # the rehearsal or the watcher will say what is wrong
    if done == total:
        return
    try:
        with out.status("warming up for the first round ..."):
            seconds = rehearse(open_context(proj, dev, SilentReporter()), batch.batch_dir)
    except WsiIlError as exc:
        out.print(f"[dim]not warmed up for the first round ({exc})[/]")
        return
    out.print(f"[dim]warmed up for the first round in {seconds:.1f} s (its own start-up, paid while you label)[/]")


@app.command()
def review(
    project: ProjectArg,
    port: Annotated[int, typer.Option(help="Port to listen on; 0 takes a free one.", min=0, max=65535)] = 8765,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Keep 127.0.0.1 and reach it through an SSH "
            "tunnel; another address needs --allow-remote."
        ),
    ] = "127.0.0.1",
    allow_remote: Annotated[
        bool,
        typer.Option(
            help="Allow --host to be an address other people on the network "
            "can reach (only the token then protects the project)."
        ),
    ] = False,
    warm_up: Annotated[
        bool,
        typer.Option(
            help="Rehearse the first round while you label, so that it starts faster (costs CPU while you label)."
        ),
    ] = True,
    prepare_ahead: Annotated[
        bool,
        typer.Option(
            help="While the last patch of a batch waits for its answer, "
            "compute the next round for its likely answers, so that it is "
            "ready when you submit (costs CPU and disk while you label)."
        ),
    ] = True,
    device: DeviceOpt = "auto",
    cluster: PassClusterOpt = None,
) -> None:
    """Serve the review desk: label batches in a browser (keyboard first), see the slide with the predictions,
    correct labels, export. Prints the URL with its secret token and the SSH tunnel line; Ctrl-C stops it."""
    import getpass
    import secrets
    import socket
    import threading

    from wsi_il.desk.desk import Desk
    from wsi_il.desk.server import LOOPBACK_NAMES, bind, create_app, serve

    with _errors():
        loopback = host in LOOPBACK_NAMES
        if not loopback and not allow_remote:
            raise InputError(
                f"--host {host} would let other machines reach the project's slides and labels",
                "keep the default 127.0.0.1 and use an SSH tunnel, or add --allow-remote",
            )
        _check_cluster(cluster)
        dev = _device(device, cluster)
        desk = Desk(project, dev, prepare_ahead=prepare_ahead, cluster=cluster, cluster_device=device)
        _random_warning(desk.project.read_manifest(), project)
        sock = bind(host, port)
        port = sock.getsockname()[1]
        token = secrets.token_urlsafe(24)
        names = _host_names(host)
        app = create_app(desk, token, set(LOOPBACK_NAMES) | names, port)
        if warm_up:
            threading.Thread(target=desk.warm_up, name="warm-up", daemon=True).start()
        else:
            desk.warmup = {"state": "off"}
        if not loopback:
            _warn(
                f"listening on {host}:{port}, reachable from other machines: anyone with the URL below can read "
                "and change this project; prefer 127.0.0.1 with an SSH tunnel"
            )
        shown = "127.0.0.1" if loopback or host in ("0.0.0.0", "::") else host
        out.print(f"review desk for {project} (Ctrl-C stops it; answers are saved as you give them)")
        out.print(
            f"on your laptop, open the tunnel: ssh -N -L {port}:{shown}:{port} {getpass.getuser()}@{socket.getfqdn()}"
        )
        if not loopback:
            out.print(f"or, from another machine: http://{_url_host(host)}:{port}/?token={token}", soft_wrap=True)
        out.print(f"then open: http://127.0.0.1:{port}/?token={token}", soft_wrap=True)
        try:
            serve(app, sock)
        finally:
            if desk.busy():
                out.print("finishing the work under way (the warm-up, a submit or an export) ...")
            desk.close()
        out.print("review desk stopped; every answer given is in the batch's labels.csv")


def _host_names(host: str) -> set[str]:
    """The Host header names that reach a desk bound to ``host``: itself, and for every address (0.0.0.0, ::) the
    machine's names and addresses."""
    import socket

    names = {host.lower()}
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        with contextlib.suppress(OSError):
            names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    return names


def _url_host(host: str) -> str:
    import socket

    if host in ("0.0.0.0", "::"):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host


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
    backbone = info.get("backbone") or {}
    if backbone.get("arch_args") is not None:
        what = {
            "embedding": "the heads train on the frozen embedding",
            "last": "the last block trains on the tokens entering it",
        }[backbone["trainable"]]
        out.print(
            f"backbone: timm {backbone['arch']} {backbone['arch_args']}, {backbone['input_px']} px input; "
            f"--trainable {backbone['trainable']} ({what}), {backbone['bytes_per_patch'] / 1000:.1f} kB a patch"
        )
    elif info.get("trainable", "last") != "last":
        out.print(f"trainable: {info['trainable']} (the heads train all of layer4; features cached after layer3)")
    norm = info.get("normalisation")
    if backbone.get("mean") is not None:
        out.print(
            f"normalisation: the model's own, mean {_triple(backbone['mean'])}, std {_triple(backbone['std'])}, "
            f"{backbone['interpolation']} resize"
        )
    elif norm:
        source = (
            f"a random sample of {norm['tiles_read']:,} of {norm['candidate_tiles']:,} candidate tiles"
            if norm.get("tiles_read", 0) < norm.get("candidate_tiles", 0)
            else "every tissue tile"
        )
        out.print(f"normalisation: mean {_triple(norm['mean'])}, std {_triple(norm['std'])} ({source})")
    tiling = info["settings"]["tiling"]
    at = f"at {tiling['target_mpp']:g} µm/px" if tiling.get("target_mpp") else "of level 0"
    out.print(f"tiles: {tiling['tile_size_px']} px {at}")
    table = Table("slide", "kind", "size (px)", "mpp", "tile (µm)", "patches", "features")
    for s in info["slides"]:
        mpp = "-" if not s["mpp"] else f"{s['mpp']:g}" + (" (given)" if s.get("mpp_given") else "")
        table.add_row(
            s["id"],
            s["kind"],
            f"{s['width']} x {s['height']}",
            mpp,
            "-" if s.get("tile_um") is None else f"{s['tile_um']:.1f}",
            str(s["patches"]),
            "done" if s["extracted"] else "[yellow]pending[/]",
        )
    out.print(table)
    sessions = Table("session", "label", "strategy", "k", "round", "state", "query", "s/round", "batch drawn with")
    for s in info["sessions"]:
        sessions.add_row(
            s["id"],
            s["label"],
            s["strategy"],
            str(s["k"]),
            f"{s['round']}/{s['rounds']}",
            s["state"],
            str(s["query_patches"]),
            f"{s['seconds_per_round']:.1f}" if s["seconds_per_round"] else "-",
            s.get("batch_features") or "-",
        )
    if info["sessions"]:
        out.print(sessions)
    labels = ", ".join(f"{k}: {v}" for k, v in info["labels"].items()) or "none yet"
    out.print(f"labels: {info['n_labels']} ({labels}); model: {info['model'] or 'none (pretrained head)'}")
    if info["model"]:
        shown = "the classifier head's predictions (--map-from heads)"
        if info.get("map_from") == "readout":
            shown = (
                "read out of the pretrained block with every label and query region (docs/quality.md)"
                if info.get("map_of") == info["model"]
                else "the classifier head's predictions (its labels are of one kind: no read-out yet)"
            )
        out.print(f"map: {shown}")
    rounds = info.get("rounds") or {}
    if rounds.get("pooled"):
        out.print(
            f"rounds: pooled (--round {rounds['round_mode']}): each round ranks at most {rounds['pool_size']:,} "
            "candidates, then re-embeds every patch after writing the batch, outside the project's lock"
        )
    passing = info.get("full_pass")
    if info["model"] and info.get("predictions_of") != info["model"]:
        why = (
            f"its full pass is running: `wsi-il {passing.get('command')}`, pid {passing.get('pid')}, since "
            f"{passing.get('since')}"
            if passing
            else "its full pass did not finish: the next ingest or export redoes it"
        )
        out.print(
            f"[yellow]predictions: from model {info.get('predictions_of') or 'none'}, not the current "
            f"{info['model']}[/] ({why})"
        )
    fixes = info.get("corrections") or []
    if fixes:
        out.print(f"corrections: {len(fixes)} (newest last; the ledger keeps every answer)")
        for fix in fixes[-5:]:
            out.print(
                f"  {fix['patch_id']}: {fix['previous'] or 'unlabelled'} -> {fix['label']}  "
                f"({fix['via']}, {fix['time']})"
            )
    running = info.get("pretraining")
    if running:
        out.print(
            f"pretraining: running since {running.get('since')} (pid {running.get('pid')}); the review goes "
            "on with the current features until it switches them"
        )
    out.print(f"next: {info['next']}")


def _triple(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


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
    from wsi_il.model import open_context
    from wsi_il.project import Project

    with _errors():
        proj = Project(project)
        with proj.lock("export"), _reporter() as reporter:
            ctx = open_context(proj, _device(device), reporter)
            _random_warning(ctx.manifest, project)
            if out_path.suffix.lower() == ".csv":
                path = export_table(ctx, out_path)
                out.print(f"[green]wrote[/] {path}")
                return
            written = export_masks(ctx, out_path, slide, label, detections, overview)
        for item in written:
            counts = ", ".join(f"{k}: {v}" for k, v in item.patches_per_class.items())
            out.print(
                f"[green]wrote[/] {item.geojson} ({counts} patches)"
                + (f" and {item.overview}" if item.overview else "")
            )


def _feature_settings(
    weights: str, arch: str | None, arch_args: str | None, trainable: str | None, batch_size: int, seed: int
):
    """The feature settings, weights and trained-at resolution (None: unknown) of a new project."""
    from wsi_il import backbones
    from wsi_il.config import FeatureSettings
    from wsi_il.features import build_resnet

    timm = (
        (arch is not None and backbones.is_timm(arch))
        or weights.startswith(backbones.HUB_PREFIX)
        or (weights not in ("imagenet", "random") and Path(weights).is_dir())
        or arch_args is not None
    )
    if timm:
        choice = backbones.choose_timm(weights, arch, backbones.parse_args(arch_args))
        weights_obj = backbones.weights_of(choice)
        settings = backbones.timm_feature_settings(
            choice, weights_obj, trainable and trainable.lower(), batch_size, seed
        )
        return settings, weights_obj, choice.mpp
    weights_obj, arch = _weights_and_arch(weights, arch)
    build_resnet(weights_obj, seed, arch)  # a file that does not fit fails here, before anything is written
    settings = FeatureSettings(
        arch=arch,
        weights=weights if weights_obj.kind != "file" else weights_obj.source,
        weights_sha256=weights_obj.sha256,
        batch_size=batch_size,
        seed=seed,
        trainable=_trainable(trainable or "last"),
    )
    return settings, weights_obj, None


def _weights_and_arch(spec: str, arch: str | None):
    """Resolve --weights and --arch together: a weights file names its own architecture."""
    from wsi_il.features import ARCHES, detect_arch, get_arch, resolve_weights

    if arch is not None:
        get_arch(arch)
    if spec in ("imagenet", "random"):
        return resolve_weights(spec, arch or "resnet18"), arch or "resnet18"
    weights = resolve_weights(spec)
    found = detect_arch(weights.state or {})
    if arch is None and found is None:
        raise InputError(
            f"{spec} holds no ResNet that wsi-il knows ({', '.join(ARCHES)})",
            "give a torchvision or timm ResNet state dict, or name its architecture with --arch "
            "(any timm architecture, with --arch-args)",
        )
    return weights, arch or found


@app.command()
def pretrain(
    project: ProjectArg,
    recipe: Annotated[
        str,
        typer.Option(
            help="quick (CPU: 112 steps of 64 fields, 64 px views; 0.3 of full's time) "
            "or full (CPU: 200 steps of 64 fields, 96 px views). On CUDA both are 500 "
            "steps of 512 fields, 224 px views."
        ),
    ] = "quick",
    apply: Annotated[
        bool,
        typer.Option(
            help="Then compute the features with the new weights (the review goes on "
            "meanwhile) and switch the project to them between two rounds."
        ),
    ] = False,
    steps: Annotated[int | None, typer.Option(help="Training steps [default: the recipe's].")] = None,
    batch: Annotated[int | None, typer.Option(help="Fields per step [default: the recipe's].")] = None,
    crop: Annotated[int | None, typer.Option(help="View side in px [default: the recipe's].")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine schedule, 10% warm-up).")] = 1e-3,
    start: Annotated[str, typer.Option(help="Start from the project's weights ('project') or 'random'.")] = "project",
    weights_out: Annotated[
        Path | None, typer.Option("--out", help="Weights file to write [default: PROJECT/pretrain/weights.pt].")
    ] = None,
    restart: Annotated[bool, typer.Option(help="Discard an interrupted run's checkpoint and start over.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the run.")] = 0,
    method: Annotated[
        str,
        typer.Option(
            help="Self-supervised method: moco (MoCo v2: momentum encoder + queue of "
            "negatives; measured best, docs/pretraining.md) or simclr (SimCLR, "
            "NT-Xent)."
        ),
    ] = "moco",
    device: DeviceOpt = "auto",
) -> None:
    """Train the backbone self-supervised (SimCLR or MoCo v2) on the project's own tissue; no labels are used.

    It does not stop the review: `status`, `review`, `ingest`, `watch` and `export` go on with the current
    features meanwhile. With --apply the project then switches to the new features between two rounds (a
    batch waiting for review is drawn again, its labels kept). Interrupted runs resume from their checkpoint.
    """
    from wsi_il.pretrain import METHOD_NAMES, PretrainSettings
    from wsi_il.project import Project

    with _errors():
        if start not in ("project", "random"):
            raise InputError(f"--start {start!r} is not 'project' or 'random'", "pick one of them")
        if method not in METHOD_NAMES:
            raise InputError(f"--method {method!r} is not {' or '.join(METHOD_NAMES)}", "pick one of them")
        proj = Project(project)
        proj.read_manifest()
        dev = _device(device)
        base = PretrainSettings.for_device(dev, steps, batch, crop, recipe)
        settings = PretrainSettings(
            base.steps,
            base.batch,
            base.crop_px,
            field_scale=base.field_scale,
            lr=lr,
            seed=seed,
            start=start,
            method=method,
        )
        _run_pretrain(proj, settings, dev, weights_out or _free_weights_path(proj), restart, apply)


def _free_weights_path(proj: Any) -> Path:
    """PROJECT/pretrain/weights.pt, or weights-2.pt when the project's features come from the first: a new run must
    not overwrite the weights that the project's features (and any slide added later) are computed with."""
    current = Path(settings_of(proj.read_manifest()).features.weights)
    first = proj.pretrain_dir() / "weights.pt"
    return first if first.resolve() != current else proj.pretrain_dir() / "weights-2.pt"


def _run_pretrain(proj: Any, settings: Any, dev: str, target: Path, restart: bool, apply: bool) -> None:
    """Pretrain under the pretraining lock (not the project's), then, with ``apply``, switch the features."""
    from wsi_il.pretrain import METHOD_NAMES, checkpoint_path
    from wsi_il.pretrain import pretrain as run_pretrain

    project = proj.root
    with proj.lock("pretrain", scope="pretrain"):
        if restart:
            checkpoint_path(proj).unlink(missing_ok=True)
        console.print(
            f"{METHOD_NAMES[settings.method]} on {dev}: {settings.steps} steps of {settings.batch} fields, "
            f"{settings.crop_px} px views; the review can go on meanwhile (`wsi-il review {project}`)"
        )
        with _reporter() as reporter:
            result = run_pretrain(proj, settings, dev, target, reporter)
        losses = f"; loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}" if result.losses else ""
        out.print(f"[green]wrote[/] {result.weights} ({result.steps} steps, {result.seconds / 60:.1f} min{losses})")
        if settings.method == "moco" and len(result.losses) > 1 and result.losses[-1] > result.losses[0]:
            console.print(
                "[dim]MoCo's loss rises while its queue of negatives fills with real keys (it starts "
                "random, so the first steps are easy): expected, not a failed run[/]"
            )
        if not apply:
            out.print(
                f"next: wsi-il pretrain {project} --apply   (or wsi-il reextract {project} --weights {result.weights})"
            )
            return
        _apply_weights(proj, result.weights, dev)


def _apply_weights(proj: Any, weights_path: Path, dev: str) -> None:
    """Stage the features under the new weights without the project lock, then switch under it between rounds."""
    import shutil

    from wsi_il.rebuild import reextract as run_reextract
    from wsi_il.rebuild import stage_features

    weights_obj, arch_name = _weights_and_arch(str(weights_path), None)
    with _reporter() as reporter:
        stage_features(proj, weights_obj, arch_name, reporter, dev)

    def waiting(holder: str) -> None:
        console.print(f"switching features: waiting for the round in progress to end ({holder})")

    with proj.lock_when_free("pretrain --apply (switching features)", waiting):
        console.print(
            "switching features: the project is locked until the heads are retrained on the new "
            "features (seconds to a minute)"
        )
        with _reporter() as reporter:
            manifest = run_reextract(proj, weights_obj, arch_name, reporter, dev)
    shutil.rmtree(proj.staged_info_path().parent, ignore_errors=True)
    retrained = "labels kept, heads retrained on them" if proj.read_ledger() else "no labels yet"
    out.print(f"[green]switched[/] {proj.root} to the features of {manifest['features']['weights']}; {retrained}")
    _print_next(proj.root)


@app.command()
def reextract(
    project: ProjectArg,
    weights: Annotated[str, typer.Option(help="imagenet, random, or a weights file (e.g. from wsi-il pretrain).")],
    arch: Annotated[
        str | None,
        typer.Option(help="resnet18, resnet34 or resnet50 [default: what the file holds, else the project's]."),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Recompute the project's features with other weights; labels are kept and the heads retrained."""
    from wsi_il.project import Project, check_settings
    from wsi_il.rebuild import reextract as run_reextract

    with _errors():
        proj = Project(project)
        manifest = proj.read_manifest()
        for warning in check_settings(proj.manifest_path(), manifest):
            console.print(f"[bold yellow]warning:[/] {warning}")
        weights_obj, arch_name = _weights_and_arch(
            weights, arch or (settings_of(manifest).features.arch if weights in ("imagenet", "random") else None)
        )
        with proj.lock("reextract"), _reporter() as reporter:
            manifest = run_reextract(proj, weights_obj, arch_name, reporter, _device(device))
        _random_warning(manifest, project)
        retrained = "labels kept, heads retrained on them" if proj.read_ledger() else "no labels yet"
        out.print(f"[green]features recomputed[/] with {manifest['features']['weights']} ({arch_name}); {retrained}")


@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (results.csv, summary.json, plots, runs).")],
    slide: Annotated[list[Path] | None, typer.Option("--slide", help="A slide (repeatable; with --truth).")] = None,
    truth: Annotated[
        list[Path] | None,
        typer.Option("--truth", help="The slide's tumour truth, QuPath GeoJSON (repeatable, in --slide order)."),
    ] = None,
    query_slide: Annotated[
        Path | None,
        typer.Option(help="Inter-slide mode: take the queries from this slide's tumour and annotate each --slide."),
    ] = None,
    query_truth: Annotated[Path | None, typer.Option(help="The tumour truth of --query-slide.")] = None,
    patches: Annotated[Path | None, typer.Option(help="Patch dataset: a folder of class subfolders.")] = None,
    test: Annotated[Path | None, typer.Option(help="Held-out test folder (class subfolders) for --patches.")] = None,
    strategy: Annotated[
        str, typer.Option(help="Comma-separated strategies: random, topk, fme, cnfp, hybrid, entropy.")
    ] = "cnfp,entropy,random",
    seeds: Annotated[int, typer.Option(help="Seeds per strategy (--first-seed .. --first-seed + N - 1).")] = 1,
    first_seed: Annotated[int, typer.Option(help="The first seed (to run a long experiment in pieces).")] = 0,
    sessions: Annotated[int, typer.Option(help="Query sessions per run.")] = 10,
    k: Annotated[
        int | None, typer.Option("-k", "--k", help="Patches per batch [default: 5 for slides, 10 for patches].")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Review rounds per session.")] = 5,
    queries: Annotated[int, typer.Option(help="Query set size (per class for patches); one per session.")] = 10,
    epochs: Annotated[int, typer.Option(help="Training epochs per round (the paper: 50).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    margin: Annotated[float, typer.Option(help="Triplet loss margin.")] = 0.2,
    warm_start: Annotated[bool, typer.Option(help="Start each round from the previous heads.")] = False,
    refine_query: Annotated[bool, typer.Option(help="Move the query towards relevant patches.")] = True,
    schedule: ScheduleOpt = "auto",
    fast_budget: FastBudgetOpt = 0,
    fast_frozen_conv1: FrozenConv1Opt = None,
    tile_size: Annotated[int, typer.Option(help="Tile side in level-0 pixels.")] = 256,
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet, pretrain (offline: learn the backbone from these slides, "
            "a few minutes on a CPU, no labels; the review can start meanwhile), "
            "random (tests/demos only), or a weights file."
        ),
    ] = "imagenet",
    trainable: Annotated[
        str,
        typer.Option(
            help="What the heads train: last (the last block of layer4, the paper) "
            "or layer4 (all of layer4, the paper's ablation)."
        ),
    ] = "last",
    reference: Annotated[
        bool, typer.Option(help="Train the full-supervision reference (all labels; slow on big data).")
    ] = True,
    reference_folds: Annotated[
        int,
        typer.Option(
            help="Slides: folds of the cross-validated reference (each patch scored by heads that never saw it)."
        ),
    ] = 5,
    reference_epochs: Annotated[int, typer.Option(help="The reference's epochs per fold [default: --epochs].")] = 0,
    balance: BalanceOpt = "classes",
    head_init: HeadInitOpt = TrainSettings.head_init,
    map_from: MapFromOpt = TrainSettings.map_from,
    round_mode: RoundOpt = "auto",
    pool_size: PoolSizeOpt = 50_000,
    query_patches: Annotated[
        int,
        typer.Option(
            help="Slides: each session's query is a connected region of this "
            "many tumour patches (1: one random patch, the paper)."
        ),
    ] = 1,
    query_island_share: Annotated[
        float,
        typer.Option(
            help="Slides: each session's query is this share of the largest tumour island (0: use --query-patches)."
        ),
    ] = 0.0,
    device: DeviceOpt = "auto",
) -> None:
    """Measure what the expert gains: run strategies with ground truth as the expert (the paper's experiments).

    Every run goes through the same code as `query` and `ingest`: real review batches, filled from the truth.
    """
    from wsi_il.config import STRATEGIES
    from wsi_il.measure.simulate import (
        REFERENCE,
        SimulationSettings,
        SlideCase,
        simulate_patches,
        simulate_slides,
    )

    with _errors():
        names = tuple(s.strip().lower() for s in strategy.split(",") if s.strip())
        if (patches is None) == (not slide):
            raise InputError(
                "give either --slide with --truth, or --patches with --test",
                "e.g. --slide s.tiff --truth s.truth.geojson",
            )
        if slide and len(truth or []) != len(slide):
            raise InputError(f"{len(slide)} --slide but {len(truth or [])} --truth", "give one --truth per --slide")
        if patches is not None and test is None:
            raise InputError("--patches needs a held-out --test folder", "e.g. --test CRC-VAL-HE-7K/")
        if (query_slide is None) != (query_truth is None):
            raise InputError("--query-slide needs --query-truth (and the other way round)", "give both")
        unknown = [s for s in names if s not in STRATEGIES]
        if unknown:
            raise InputError(f"--strategy {', '.join(unknown)} is not one of {', '.join(STRATEGIES)}", "pick them")
        settings = SimulationSettings(
            strategies=names,
            seeds=seeds,
            first_seed=first_seed,
            sessions=sessions,
            k=k or (10 if patches is not None else 5),
            rounds=rounds,
            queries=queries,
            epochs=epochs,
            lr=lr,
            margin=margin,
            warm_start=warm_start,
            refine_query=refine_query,
            schedule=_schedule(schedule),
            fast_budget=fast_budget,
            fast_frozen_conv1=_frozen_conv1(fast_frozen_conv1, weights),
            tile_size_px=tile_size,
            weights=weights,
            trainable=_trainable(trainable),
            reference=reference,
            reference_folds=reference_folds,
            reference_epochs=reference_epochs,
            balance=balance.strip().lower(),
            head_init=_head_init(head_init),
            map_from=_map_from(map_from),
            query_patches=query_patches,
            query_island_share=query_island_share,
            round=_round_settings(round_mode, pool_size),
        )
        settings.check()
        if weights == "random":
            console.print(
                "[bold yellow on red] WARNING [/] [bold yellow]--weights random: features of a RANDOMLY "
                "initialised ResNet-18; the numbers say nothing about pretrained features.[/]",
                soft_wrap=True,
            )
        dev = _device(device)
        source = SlideCase(query_slide, query_truth) if query_slide and query_truth else None
        cases = [SlideCase(s, t, source) for s, t in zip(slide or [], truth or [], strict=True)]
        with _reporter() as reporter:
            if patches is not None:
                outcome = simulate_patches(patches, test, out_dir, settings, dev, reporter)
            else:
                outcome = simulate_slides(cases, out_dir, settings, dev, reporter)
        metrics = outcome.summary["metrics"]
        table = Table("strategy", "labels", *[f"final {m}" for m in metrics], f"labels to 95% ({metrics[0]})")
        for name, entry in outcome.summary["strategies"].items():
            if name == REFERENCE:
                table.add_row(name, "all", *[_mean_std(entry[m]) for m in metrics], "-")
                continue
            reach = entry[metrics[0]]["labels_to_95pct"]
            reached = (
                f"{_mean_std(reach)} ({reach['reached']}/{entry['seeds']} seeds)"
                if reach["reached"]
                else f"not reached (0/{entry['seeds']} seeds)"
            )
            table.add_row(
                name, _mean_std(entry["final_labels"], 0), *[_mean_std(entry[m]["final"]) for m in metrics], reached
            )
        out.print(table)
        out.print(
            f"[green]wrote[/] {out_dir / 'results.csv'}, {out_dir / 'summary.json'} and "
            f"{', '.join(p.name for p in outcome.plots)}"
        )


def _mean_std(spread: dict[str, Any], digits: int = 3) -> str:
    if spread.get("mean") is None:
        return "-"
    if spread.get("n", 1) > 1:
        return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"
    return f"{spread['mean']:.{digits}f}"


@app.command()
def evaluate(
    project: ProjectArg,
    truth: Annotated[Path, typer.Option(help="The truth annotation, QuPath GeoJSON.")],
    slide: Annotated[str | None, typer.Option(help="The slide the truth belongs to (id or file name).")] = None,
    label: Annotated[str | None, typer.Option(help="The class the truth marks [default: the first class].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Score the project's current mask against a truth annotation: patch-level P/R/F1/Jaccard, balanced accuracy
    and the share called, pixel IoU. Needs truth exact at patch level (docs/quality.md)."""
    from wsi_il.measure.simulate import evaluate_project
    from wsi_il.model import open_context
    from wsi_il.project import Project

    with _errors():
        proj = Project(project)
        with proj.lock("evaluate"), _reporter() as reporter:
            ctx = open_context(proj, _device(device), reporter)
            _random_warning(ctx.manifest, project)
            result = evaluate_project(ctx, truth, slide, label)
        for warning in result["warnings"]:
            _warn(warning)
        if as_json:
            out.print_json(json.dumps(result))
            return
        table = Table("patches", "precision", "recall", "F1", "Jaccard", "balanced acc.", "n")
        for name, key, n in (
            ("all tissue", "patch", result["patches"]),
            ("not labelled", "patch_unlabelled", result["patches"] - result["labelled_patches"]),
        ):
            s = result[key]
            table.add_row(
                name,
                f"{s['precision']:.3f}",
                f"{s['recall']:.3f}",
                f"{s['f1']:.3f}",
                f"{s['jaccard']:.3f}",
                f"{s['balanced_accuracy']:.3f}",
                str(n),
            )
        out.print(
            f"{result['slide']}: {result['label']} predicted on {result['predicted_patches']} patches, "
            f"{result['truth_patches']} in the truth"
        )
        out.print(table)
        rest = result["patch_unlabelled"]
        out.print(
            f"not labelled: {rest['called_share']:.0%} called {result['label']}, {rest['truth_share']:.0%} "
            "truly (balanced accuracy 0.5 is chance: calling everything or nothing)"
        )
        out.print(f"pixel-level IoU of the mask polygons with the truth: {result['pixel_iou']:.3f}")


@app.command()
def bench(
    slide: Annotated[
        Path | None,
        typer.Option(
            help="A slide to measure on [default: build an island mosaic of "
            "real BACH fields with --patches tissue patches]."
        ),
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            help="The slide's tumour truth (QuPath GeoJSON), for the round's "
            "labels [default: random labels; latency only]."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding bach-iciar2018-1536jpeg-sample/ (to build the mosaic) [default: $WSI_IL_DATA]."
        ),
    ] = None,
    patches: Annotated[int, typer.Option(help="About this many tissue patches in the built slide.")] = 12_500,
    labels: Annotated[int, typer.Option(help="Labels in the project when the round is timed.")] = 250,
    paper: Annotated[bool, typer.Option(help="Also time a round with the paper's settings (slow on CPU).")] = True,
    weights: Annotated[
        str, typer.Option(help="random (same compute as ImageNet), imagenet or a weights file.")
    ] = "random",
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Working folder (slide, project, exports), kept afterwards [default: a temporary folder, "
            "removed at the end].",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    backbone: Annotated[
        list[str] | None,
        typer.Option(
            "--backbone",
            help="Also measure this timm backbone, under each split it supports: NAME[:JSON args] "
            "(random weights, the same compute), a snapshot folder or hf-hub:ORG/NAME (repeat for several).",
        ),
    ] = None,
    backbones_only: Annotated[bool, typer.Option(help="Measure only the --backbone ones (needs --slide).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Measure extraction, round latency, export and memory on this machine, next to limits and a naive baseline."""
    with _errors():
        if patches < 100 or labels < 30:
            raise InputError(
                f"--patches {patches} / --labels {labels} are too small to measure",
                "use at least 100 patches and 30 labels",
            )
        dev = _device(device)
        work = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix="wsi-il-bench-"))
        if out_dir is None:
            console.print(f"[dim]working in {work} (removed at the end; --out DIR keeps it)[/]")
        if backbones_only and (slide is None or not backbone):
            raise InputError(
                "--backbones-only needs --slide and at least one --backbone",
                "e.g. --slide S.svs --backbone vit_small_patch16_224 --backbones-only",
            )
        try:
            if not backbones_only:
                _run_bench(work, slide, truth, data, patches, labels, weights, dev, paper, json_path)
            if backbone:
                _bench_backbones(
                    backbone,
                    slide or _bench_slide(work),
                    work / "backbones",
                    dev,
                    json_path.with_suffix(".backbones.json") if json_path else None,
                )
        finally:
            if out_dir is None:
                shutil.rmtree(work, ignore_errors=True)


def _bench_slide(work: Path) -> Path:
    """The slide the main bench measured on (the mosaic it built)."""
    built = sorted(work.glob("bench-[0-9]*.tiff"))
    if not built:
        raise InputError("no slide to measure the backbones on", "give --slide")
    return built[0]


def _bench_backbones(specs: list[str], slide: Path, work: Path, dev: str, json_path: Path | None) -> None:
    import json

    from wsi_il.fsutil import atomic_write_text
    from wsi_il.measure.bench_backbones import bench_backbone, results_json

    results = []
    sample = 4096 if dev.startswith("cuda") else 64
    with console.status("measuring backbones") as status:
        for spec in specs:
            status.update(f"backbone {spec}")
            results.extend(bench_backbone(spec, slide, work / f"b{len(results)}", dev, sample))
    table = Table(
        "backbone",
        "split",
        "kB a patch",
        "patches/s",
        "trunk limit/s",
        "ratio",
        "CPU s",
        "wall s",
        title=f"backbones on {slide.name} ({dev}; load {max(r.load_average for r in results):.1f} at most)",
    )
    for r in results:
        table.add_row(
            f"{r.backbone} ({r.input_px} px)",
            r.trainable,
            f"{r.bytes_per_patch / 1000:.1f}",
            f"{r.extract_patches_per_s:.1f}",
            f"{r.trunk_limit_patches_per_s:.1f}",
            f"{r.extract_ratio_to_limit:.2f}",
            f"{r.extract_cpu_seconds:.1f}",
            f"{r.extract_seconds:.1f}",
        )
    out.print(table)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(results_json(results), indent=2))
        out.print(f"wrote {json_path}")


def _run_bench(
    out_dir: Path,
    slide: Path | None,
    truth: Path | None,
    data: Path | None,
    patches: int,
    labels: int,
    weights: str,
    dev: str,
    paper: bool,
    json_path: Path | None,
) -> None:
    from wsi_il.fsutil import atomic_write_text
    from wsi_il.measure.bench import BenchSettings, result_json, run_bench

    settings = BenchSettings(
        out=out_dir,
        slide=slide,
        truth=truth,
        data=data,
        patches=patches,
        labels=labels,
        weights=weights,
        device=dev,
        paper=paper,
    )
    started = time.perf_counter()
    with _reporter() as reporter:
        result = run_bench(settings, reporter)
    table = Table(
        "stage",
        "measured",
        "reference",
        "ratio",
        title=f"wsi-il bench on {result.device_name} "
        f"({result.device}, {result.precision}, {result.torch_threads} threads)",
    )
    table.add_row(
        "extraction, end to end",
        f"{result.extract_patches_per_s:.1f} patches/s",
        f"trunk limit {result.trunk_limit_patches_per_s:.1f}/s",
        f"{result.extract_ratio_to_limit:.2f} of the limit",
    )
    table.add_row(
        "",
        f"({result.patches:,} patches: mask + statistics {result.tiling_seconds:.1f} s, features "
        f"{result.features_seconds:.1f} s; setup before it {result.setup_seconds:.1f} s)",
        f"naive {result.naive_patches_per_s:.1f}/s",
        f"{result.extract_ratio_to_naive:.2f}x naive",
    )
    table.add_row("", "", f"reading limit {result.read_limit_patches_per_s:.1f}/s", "")
    paper_text = (
        f"paper's settings {result.round_seconds_paper_settings:.1f} s"
        if result.round_seconds_paper_settings is not None
        else "paper's settings: not run"
    )
    ratio = f"{result.round_ratio_paper_to_default:.1f}x faster" if result.round_ratio_paper_to_default else ""
    frozen = ", first convolution frozen" if result.round_frozen_conv1 else ""
    table.add_row(
        f"round at {result.round_labels} labels",
        f"{result.round_seconds:.1f} s "
        f"({result.round_schedule} schedule{frozen}; training {result.round_train_seconds:.1f} s)",
        paper_text,
        ratio,
    )
    if result.round_seconds_next is not None:
        table.add_row(
            "",
            f"{result.round_seconds_next:.1f} s for the round after it, in the same process (as under wsi-il watch)",
            "",
            "",
        )
    if result.round_seconds_full_block is not None:
        table.add_row(
            "",
            f"{result.round_seconds_full_block:.1f} s training the whole block (training "
            f"{result.round_train_seconds_full_block:.1f} s)",
            "",
            "",
        )
    table.add_row(
        "export",
        f"{result.export_seconds:.1f} s ({result.patches:,} patches)",
        f"{result.export_synthetic_seconds:.1f} s for {result.export_synthetic_patches:,} synthetic patches",
        "",
    )
    stems = (
        f" + {result.stem_cache_bytes_per_patch / 1000:.1f} kB of frozen-convolution cache"
        if result.stem_cache_bytes_per_patch
        else ""
    )
    table.add_row(
        "memory",
        f"peak RSS {result.peak_rss_mb:.0f} MB during extraction",
        f"{result.bytes_per_patch / 1000:.1f} kB per patch (memory-mapped){stems}",
        "",
    )
    if result.gpu_utilisation is not None:
        table.add_row("GPU utilisation", f"{result.gpu_utilisation:.0f}% during extraction", "", "")
    out.print(table)
    for note in result.notes:
        _warn(note)
    if json_path is not None:
        atomic_write_text(json_path, result_json(result))
        out.print(f"wrote {json_path}")
    console.print(f"[dim]bench took {time.perf_counter() - started:.0f} s[/]")


def main() -> None:
    """Entry point for `python -m wsi_il`."""
    app(prog_name="wsi-il")


if __name__ == "__main__":
    sys.exit(main())
