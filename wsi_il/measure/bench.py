"""``wsi-il bench``: how fast each stage runs on this machine, next to its limit and a naive baseline.

Stages (each measured in the same run, on the same device):

- **extraction**, end to end: tiling (read the thumbnail and every candidate tile, tissue filter) and features
  (read, decode, resize, normalise, trunk, write float16), as ``wsi-il init`` runs them;
- **trunk limit**: the trunk alone on batches already in memory (the compute limit of extraction);
- **naive baseline**: one OpenSlide handle, tiles read one after another, then the trunk in float32, no
  overlap between reading and computing;
- **round latency**: one ``ingest`` of a filled batch until the next batch is written, at ``labels`` labels,
  with the default schedule of the device and with the paper's settings;
- **export**: the project's mask (``export_masks``) and, separately, the geometry + GeoJSON stage on a
  synthetic grid of 100,000 patches (the union of the predicted squares is what grows with slide size);
- **memory**: peak RSS of the extraction (run in a child process, so the figure is that of ``init``) and bytes
  per patch of the memory-mapped feature cache.

Nothing here is a separate implementation: every stage calls the functions the commands call.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from wsi_il.config import FeatureSettings, SessionSettings, TilingSettings, TrainSettings, new_manifest, settings_of
from wsi_il.errors import InputError
from wsi_il.events import Reporter, SilentReporter
from wsi_il.project import Project

TUMOUR, NORMAL = "Tumor", "Normal"
TISSUE_SHARE = 0.65
"""About this share of an island mosaic is tissue (measured: 18,524 of 28,224 tiles; sizes the slide)."""


@dataclass(frozen=True)
class BenchSettings:
    """What ``wsi-il bench`` measures and at which size (defaults: the issue's 12,500 patches, 250 labels)."""

    out: Path
    slide: Path | None = None
    truth: Path | None = None
    data: Path | None = None
    """Folder holding bach-iciar2018-1536jpeg-sample/ (to build the benchmark slide when no --slide)."""
    patches: int = 12_500
    labels: int = 250
    k: int = 10
    queries: int = 10
    weights: str = "random"
    device: str = "cpu"
    paper: bool = True
    """Also time a round with the paper's settings (two heads, 50 epochs, full re-embedding)."""
    export_patches: int = 100_000
    sample: int = 0
    """Patches for the trunk-limit and naive-baseline measurements (0: 256 on CPU, 4096 on CUDA)."""
    seed: int = 0


@dataclass
class BenchResult:
    """The JSON written by ``wsi-il bench --json``."""

    device: str
    device_name: str
    precision: str
    torch_threads: int
    cpus: int
    slide: str
    patches: int
    setup_seconds: float = 0.0
    """Once per command, outside extraction's time: importing torch/torchvision, the network, the CUDA context."""
    tiling_seconds: float = 0.0
    """Before the trunk runs: the thumbnail tissue mask and the normalisation statistics' sample of tiles."""
    features_seconds: float = 0.0
    """One read of every candidate tile: pixel rule, resize, normalise, trunk, write."""
    extract_timeline: dict[str, list[float]] = field(default_factory=dict)
    """Each stage of extraction (progress task): seconds from the start of extraction to its start, its first
    progress and its end. The statistics sample starts once the thumbnails are masked and the trunk is ready."""
    extract_patches_per_s: float = 0.0
    trunk_limit_patches_per_s: float = 0.0
    extract_ratio_to_limit: float = 0.0
    read_limit_patches_per_s: float = 0.0
    """Reading alone (read, decode and the pixel rule in extraction's reader pool; no resize, no trunk): the other
    limit of extraction."""
    naive_patches_per_s: float = 0.0
    extract_ratio_to_naive: float = 0.0
    gpu_utilisation: float | None = None
    round_labels: int = 0
    round_seconds: float = 0.0
    round_train_seconds: float = 0.0
    """The round's training; the rest is re-embedding and predicting every patch, then writing the batch."""
    round_schedule: str = ""
    round_seconds_next: float | None = None
    """The round after the timed one, in the same process (at ``labels`` + ``k`` labels): what each round after
    the first costs under ``wsi-il watch``, which keeps one process (no start-up, a GPU's first-use costs paid)."""
    round_phases: dict[str, float] = field(default_factory=dict)
    """The timed round's seconds by phase: train (with saving the heads), pass (embedding and predicting every
    patch, saving both), batch (ranking, sampling, writing the next batch), rest."""
    round_phases_next: dict[str, float] | None = None
    round_frozen_conv1: bool = False
    """The default round's block kept its first convolution frozen (the default for pretrained weights; the
    timing is the same with random ones)."""
    round_seconds_full_block: float | None = None
    """The fast schedule training the whole block (``--no-fast-frozen-conv1``, 2,500 passes), where the default
    is the fast schedule."""
    round_train_seconds_full_block: float | None = None
    round_seconds_paper_settings: float | None = None
    round_ratio_paper_to_default: float | None = None
    export_seconds: float = 0.0
    export_synthetic_patches: int = 0
    export_synthetic_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    bytes_per_patch: float = 0.0
    stem_cache_bytes_per_patch: float = 0.0
    """Disk held by the frozen first convolution's output (``wsi_il.stems``) after the default round; 0 without."""
    feature_cache_memory_mapped: bool = True
    notes: list[str] = field(default_factory=list)


def run_bench(settings: BenchSettings, reporter: Reporter | None = None) -> BenchResult:
    """Run every stage and return the figures (the reporter's status says what is being measured)."""
    import torch

    from wsi_il.precision import precision_name
    from wsi_il.threads import default_workers

    say = (reporter or SilentReporter()).status

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    slide, truth = settings.slide, settings.truth
    if slide is None:
        say(f"building a mosaic slide of about {settings.patches:,} tissue patches")
        data = data_dir(settings.data, "give --slide YOUR.svs, or --data DIR holding bach-iciar2018-1536jpeg-sample/")
        slide, truth = build_bench_slide(out, settings.patches, data, settings.seed)
    device = settings.device
    result = BenchResult(
        device=device,
        device_name=_device_name(device),
        precision=precision_name(device),
        torch_threads=torch.get_num_threads(),
        cpus=default_workers(),
        slide=str(slide),
        patches=0,
    )
    project = Project(out / "project")
    say("extraction, end to end (tissue mask, statistics sample, features), in a child process")
    stage = _extract_in_child(project, slide, settings)
    result.patches = stage["patches"]
    if result.patches < settings.labels + 2 * settings.k:  # the timed round needs a next batch to write
        raise InputError(
            f"the slide has {result.patches:,} tissue patches, too few for a round at {settings.labels} labels",
            f"give --labels {max(1, result.patches - 2 * settings.k)} or less, or a larger slide (--patches, --slide)",
        )
    result.setup_seconds = stage["setup_seconds"]
    result.tiling_seconds, result.features_seconds = stage["tiling_seconds"], stage["features_seconds"]
    result.extract_timeline = stage["timeline"]
    result.extract_patches_per_s = result.patches / max(1e-9, stage["tiling_seconds"] + stage["features_seconds"])
    result.peak_rss_mb = stage["peak_rss_mb"]
    result.gpu_utilisation = stage.get("gpu_utilisation")
    if device.startswith("cuda") and result.gpu_utilisation is None:
        why = stage.get("gpu_utilisation_error")
        result.notes.append(
            f"GPU utilisation not measured: NVML did not answer ({why}); "
            "pip install nvidia-ml-py (or wsi-il[gpu]) and re-run"
        )
    result.bytes_per_patch = _bytes_per_patch(project)
    sample = settings.sample or (4096 if device.startswith("cuda") else 256)
    say("trunk limit (batches already in memory)")
    result.trunk_limit_patches_per_s = trunk_limit(project, device, sample)
    result.extract_ratio_to_limit = result.extract_patches_per_s / result.trunk_limit_patches_per_s
    say("reading limit (the reader pool alone, no trunk)")
    result.read_limit_patches_per_s = read_limit(project, device, min(4 * sample, result.patches))
    say("naive baseline (one handle, float32, no overlap)")
    result.naive_patches_per_s = naive_baseline(project, slide, device, min(sample, result.patches))
    result.extract_ratio_to_naive = result.extract_patches_per_s / result.naive_patches_per_s
    labels = _label_all(project, truth, settings.seed)
    say(f"round latency at {settings.labels} labels (default schedule)")
    default = TrainSettings()  # the default of pretrained weights (random ones cost the same time)
    timing = round_latency(project, out / "round-default", labels, settings, default, next_round=True)
    seconds, result.round_train_seconds, schedule = timing.seconds, timing.train_seconds, timing.schedule
    result.round_seconds_next = timing.next_seconds
    result.round_phases, result.round_phases_next = timing.phases or {}, timing.next_phases
    result.round_labels, result.round_seconds, result.round_schedule = settings.labels, seconds, schedule
    result.round_frozen_conv1 = schedule == "fast" and default.fast_frozen_conv1
    stems = Project(out / "round-default").stems_path()
    result.stem_cache_bytes_per_patch = stems.stat().st_size / result.patches if stems.is_file() else 0.0
    if result.round_frozen_conv1:
        say(f"round latency at {settings.labels} labels (fast schedule training the whole block)")
        full = round_latency(
            project, out / "round-full-block", labels, settings, replace(default, fast_frozen_conv1=False)
        )
        result.round_seconds_full_block, result.round_train_seconds_full_block = full.seconds, full.train_seconds
    if settings.paper:
        say(f"round latency at {settings.labels} labels (the paper's settings)")
        paper_seconds = round_latency(
            project, out / "round-paper", labels, settings, TrainSettings(schedule="paper")
        ).seconds
        result.round_seconds_paper_settings = paper_seconds
        result.round_ratio_paper_to_default = paper_seconds / seconds
    say("export of the project's mask")
    result.export_seconds = export_latency(out / "round-default", out / "export" / "mask.geojson", device)
    say(f"export geometry + GeoJSON of {settings.export_patches:,} synthetic patches")
    result.export_synthetic_patches = settings.export_patches
    result.export_synthetic_seconds = synthetic_export(
        out / "export" / "synthetic.geojson", settings.export_patches, settings.seed
    )
    if settings.weights == "random":
        result.notes.append(
            "random weights: the same compute as ImageNet weights (timings are valid), but the "
            "predictions are meaningless"
        )
    if truth is None:
        result.notes.append("no truth: the round's labels are random (latency only)")
    return result


# ---- the slide ------------------------------------------------------------------------------------------
def data_dir(data: Path | None, fix: str = "give --data DIR holding bach-iciar2018-1536jpeg-sample/") -> Path:
    """The folder holding the BACH sample: ``data`` when given, else $WSI_IL_DATA."""
    candidates = [data] if data else [Path(os.environ.get("WSI_IL_DATA", ""))]
    for folder in candidates:
        if folder and str(folder) and (folder / "bach-iciar2018-1536jpeg-sample").is_dir():
            return folder
    raise InputError("no BACH sample to build a mosaic slide from", f"{fix} (or set $WSI_IL_DATA)")


def build_bench_slide(out: Path, patches: int, data: Path, seed: int) -> tuple[Path, Path]:
    """Write (or reuse) a JPEG pyramidal slide with about ``patches`` tissue tiles of 256 px.

    A slide of tens of thousands of pixels a side would not fit in memory as one image, so an island mosaic
    of real BACH fields (at most 8192 px a side) is written once and tiled, mirrored, into the large slide.
    """
    from wsi_il.measure.mosaic import bach_images, make_island_slide, write_mirrored_tiling

    tile = TilingSettings().tile_size_px
    side = int(math.ceil(math.sqrt(patches / TISSUE_SHARE))) * tile
    copies = max(1, math.ceil(side / (32 * tile)))  # the small mosaic stays at most 32 tiles a side
    small_side = math.ceil(side / copies / tile) * tile
    path = out / f"bench-{small_side * copies}.tiff"
    truth = path.with_name(f"{path.stem}.truth.geojson")
    if not (path.is_file() and truth.is_file()):
        tumour, normal = bach_images(data)
        target = out / f"bench-tile-{small_side}.tiff" if copies > 1 else path
        small = make_island_slide(target, tumour, normal, size_px=(small_side, small_side), seed=seed, tile_px=tile)
        if copies > 1:
            write_mirrored_tiling(path, small, copies)
    return path, truth


# ---- extraction ---------------------------------------------------------------------------------------
class _TimingReporter(SilentReporter):
    """Remembers when each stage (progress task) started, first advanced and last advanced."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[tuple[str, float]] = []
        self.times: dict[str, list[float]] = {}

    def task(self, description: str, total: int, unit: str = "patches") -> Callable[[int], None]:
        now = time.perf_counter()
        self.started.append((description, now))
        times = self.times[description] = [now, now, now]

        def advance(n: int) -> None:
            if n:
                now = time.perf_counter()
                times[1:] = [now if times[1] == times[0] else times[1], now]

        return advance

    def timeline(self, origin: float) -> dict[str, list[float]]:
        """``times`` in seconds from ``origin``."""
        return {name: [round(t - origin, 3) for t in times] for name, times in self.times.items()}


def _extract_in_child(project: Project, slide: Path, settings: BenchSettings) -> dict[str, Any]:
    """Run tiling and extraction in a child process (so its peak RSS is that of init, not of the bench)."""
    if project.root.exists():
        import shutil

        shutil.rmtree(project.root)
    args = json.dumps(
        {
            "project": str(project.root),
            "slide": str(slide),
            "weights": settings.weights,
            "device": settings.device,
            "seed": settings.seed,
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "wsi_il.measure.bench", args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the extraction stage failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extract_stage(project_dir: Path, slide: Path, weights_spec: str, device: str, seed: int) -> dict[str, Any]:
    """Create a project over one slide and build it as ``init`` does; return stage times and peak RSS."""
    from wsi_il.database import register_slide
    from wsi_il.extraction import build_database
    from wsi_il.features import resolve_weights

    weights = resolve_weights(weights_spec)
    project = Project(project_dir)
    manifest = new_manifest(
        [TUMOUR, NORMAL],
        features=FeatureSettings(
            weights=weights_spec if weights.kind != "file" else weights.source,
            weights_sha256=weights.sha256,
            seed=seed,
        ),
        train=TrainSettings(seed=seed),
    )
    register_slide(manifest, slide)
    project.create(manifest)
    reporter = _TimingReporter()
    gpu = _GpuSampler(device)
    setup_started = time.perf_counter()
    _setup(weights, seed, device)
    started = time.perf_counter()
    with gpu:
        manifest = build_database(project, project.read_manifest(), reporter, device, weights)
    ended = time.perf_counter()
    feature_start = next((t for name, t in reporter.started if name.startswith("features")), ended)
    return {
        "patches": sum(s["n_patches"] for s in manifest["slides"]),
        "setup_seconds": started - setup_started,
        "tiling_seconds": feature_start - started,
        "features_seconds": ended - feature_start,
        "peak_rss_mb": peak_rss_mb(),
        "timeline": reporter.timeline(started),
        "gpu_utilisation": gpu.mean(),
        "gpu_utilisation_error": gpu.error,
    }


def _setup(weights: Any, seed: int, device: str) -> None:
    """What a command pays once before it reads a slide, kept out of extraction's time as ``init`` keeps it
    before tiling: importing torch and torchvision, building the network, and on a GPU its CUDA context."""
    import torch

    from wsi_il.features import build_resnet

    build_resnet(weights, seed)
    if device.startswith("cuda"):
        torch.zeros(1, device=device)
        torch.cuda.synchronize()


class _GpuSampler:
    """Samples the GPU's utilisation (NVML through torch) while extraction runs; None without CUDA."""

    def __init__(self, device: str) -> None:
        self.enabled = str(device).startswith("cuda")
        self.samples: list[float] = []
        self.error: str | None = None
        """Why no sample could be taken (NVML missing or failing), else None."""
        self._stop = False

    def __enter__(self) -> _GpuSampler:
        if self.enabled:
            import threading

            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        import torch

        while not self._stop:
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        if self.enabled:
            self._thread.join(timeout=2)

    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def _bytes_per_patch(project: Project) -> float:
    manifest = project.read_manifest()
    files = [project.features_path(s["id"]) for s in manifest["slides"]]
    n = sum(s["n_patches"] for s in manifest["slides"])
    return sum(f.stat().st_size for f in files) / max(1, n)


def _extractor(project: Project, device: str):
    from wsi_il.extraction import project_extractor

    return project_extractor(project.read_manifest(), device)


TRUNK_REPEATS = 3
"""The trunk limit is the fastest of this many timings of its sample: one timing of a few seconds varied by up to
a fifth between runs on a shared CPU, and the limit is what the machine can do at its best."""


def trunk_limit(project: Project, device: str, sample: int) -> float:
    """Patches/s of normalisation + trunk + float16 on in-memory batches of tiles already at the trunk's input
    size (no reading, no resize): the compute limit (the fastest of ``TRUNK_REPEATS`` timings, so that the ratio
    to it errs low). As in extraction, on a GPU the batches run as a captured graph, one batch in flight while
    the previous one's features come back."""
    extractor, settings = _extractor(project, device)
    size = extractor.batch_size(settings.batch_size)  # the batch extraction uses on this device
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (size, settings.input_px, settings.input_px, 3), dtype=np.uint8)
    extractor.warm_up(size, settings.input_px)  # on a GPU: kernel selection, CUDA context, the graph
    extractor(tiles)
    _sync(device)
    batches = max(3, sample // size)
    rates = []
    for _ in range(TRUNK_REPEATS):
        started = time.perf_counter()
        previous = None
        for _ in range(batches):
            current = extractor.submit(tiles)
            if previous is not None:
                previous.result()
            previous = current
        previous.result()
        _sync(device)
        rates.append(batches * size / (time.perf_counter() - started))
    return max(rates)


def read_limit(project: Project, device: str, sample: int) -> float:
    """Patches/s of extraction's reader pool alone over the slide's first ``sample`` candidate tiles (read,
    decode and the pixel rule, into shared memory; no trunk): with the trunk limit, the two ceilings of
    end-to-end extraction. Counted as extraction counts, in tissue patches kept."""
    from wsi_il.extraction import slide_readers, tile_spec
    from wsi_il.features import batch_ranges, trunk_batch_size
    from wsi_il.threads import default_workers

    manifest = project.read_manifest()
    settings, tiling = settings_of(manifest).features, settings_of(manifest).tiling
    record = project.slides(manifest)[0]
    corners = project.read_array(project.candidates_path(record.id))[:sample]
    px, path, size = tiling.tile_size_px, Path(record.path), trunk_batch_size(device, settings.batch_size)
    batches = batch_ranges(0, len(corners), size)
    started = time.perf_counter()  # the readers' start counted, as in extraction
    with slide_readers(tiling, default_workers(), size) as readers:
        kept = sum(
            int(tissue.sum())
            for _, tissue in readers.read(batches, (px, px, 3), np.uint8, lambda i: tile_spec(path, "tile", corners[i]))
        )
    return kept / (time.perf_counter() - started)


def naive_baseline(project: Project, slide: Path, device: str, sample: int) -> float:
    """Patches/s of a plain loop: read a batch with one handle, then run the trunk in float32 (no overlap)."""
    from wsi_il.database import patch_table
    from wsi_il.features import resize_tile
    from wsi_il.slide import open_slide

    extractor, settings = _extractor(project, device)
    table = patch_table(project, project.read_manifest())
    extractor.precision = "fp32"
    handle = open_slide(slide)
    try:
        extractor(np.zeros((1, settings.input_px, settings.input_px, 3), dtype=np.uint8))  # warm-up
        started = time.perf_counter()
        for begin in range(0, sample, settings.batch_size):
            tiles = []
            for x, y, w, h in table.boxes[begin : min(sample, begin + settings.batch_size)]:
                region = np.asarray(handle.read_region((int(x), int(y)), 0, (int(w), int(h))).convert("RGB"))
                tiles.append(resize_tile(region, settings.input_px))
            extractor(np.stack(tiles))
        _sync(device)
        return sample / (time.perf_counter() - started)
    finally:
        handle.close()


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---- rounds -------------------------------------------------------------------------------------------
def _label_all(project: Project, truth: Path | None, seed: int) -> np.ndarray:
    """True where a patch is tumour (from the truth; random when there is none)."""
    from wsi_il.database import patch_table
    from wsi_il.measure.truth import truth_mask

    table = patch_table(project, project.read_manifest())
    if truth is not None:
        return truth_mask(table.boxes, truth, table.slides[0].offset)
    return np.random.default_rng(seed).random(len(table)) < 0.3


class RoundTiming(NamedTuple):
    seconds: float
    train_seconds: float
    schedule: str
    next_seconds: float | None = None
    phases: dict[str, float] | None = None
    next_phases: dict[str, float] | None = None


def round_phases(history: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    """The seconds of the last ingested round's phases, from the session's history: training (with saving the
    heads), the pass over every patch (embedding, predicting, saving both), writing the next batch, and the rest
    (reading the labels, recording them, refining the query, saving the session)."""
    entry = [e for e in history if "train_seconds" in e][-1]
    phases = {name: float(entry.get(f"{name}_seconds", 0.0)) for name in ("train", "pass", "batch")}
    phases["rest"] = round(seconds - sum(phases.values()), 3)
    return phases


def round_latency(
    base: Project,
    folder: Path,
    tumour: np.ndarray,
    settings: BenchSettings,
    train: TrainSettings,
    next_round: bool = False,
    rehearsed: bool = False,
) -> RoundTiming:
    """Seconds of one ingest (filled batch -> next batch written) at ``settings.labels`` labels, its training
    seconds, the schedule, and with ``next_round`` the seconds of the ingest after it, in the same process.

    The project holds earlier labels (``labels`` minus the batches ingested here minus the query); for a
    warm-starting schedule one round is ingested first, so that it has a previous model as it would in real
    use, and the next is timed. ``rehearsed``: ``session.rehearse`` runs before the timed ingest, as ``wsi-il
    watch`` does while the expert labels.
    """
    from wsi_il.batch import read_batch
    from wsi_il.config import resolve_schedule
    from wsi_il.measure.simulate import fork_project
    from wsi_il.measure.truth import write_batch_labels
    from wsi_il.model import open_context
    from wsi_il.project import now_iso
    from wsi_il.session import ingest, rehearse, start_session

    project = fork_project(base, folder, replace(train, seed=settings.seed))
    ctx = open_context(project, settings.device, SilentReporter())
    rng = np.random.default_rng(settings.seed)
    positives = np.flatnonzero(tumour)
    query = rng.choice(positives, size=min(settings.queries, len(positives)), replace=False)
    rest = rng.permutation(np.setdiff1d(np.arange(len(tumour)), query))
    batches = 2 if resolve_schedule(train, settings.device) == "fast" or train.warm_start else 1
    prior = rest[: max(0, settings.labels - batches * settings.k - len(query))]
    if len(prior):
        project.append_ledger(
            [
                {
                    "patch_id": ctx.table.ids[i],
                    "label": TUMOUR if tumour[i] else NORMAL,
                    "batch": "bench-earlier",
                    "session": "bench",
                    "round": 0,
                    "time": now_iso(),
                }
                for i in prior
            ]
        )
    rounds = 4 if next_round else 3  # the next round must write a batch too
    result = start_session(
        ctx, TUMOUR, SessionSettings("cnfp", settings.k, rounds), query_indices=query, source="bench"
    )
    index = ctx.table.index_of()

    def fill(batch: Path) -> None:  # the pseudo-expert: each patch's true class
        ids = [p.patch_id for p in read_batch(batch)[1]]
        write_batch_labels(batch, {pid: TUMOUR if tumour[index[pid]] else NORMAL for pid in ids})

    schedule = resolve_schedule(train, settings.device)
    if schedule == "fast" or train.warm_start:  # a round first, so that the timed one starts warm
        fill(result.batch_dir)
        result = ingest(ctx, result.batch_dir / "labels.csv")
    if rehearsed:
        rehearse(ctx, result.batch_dir)
    fill(result.batch_dir)
    timed = ingest(ctx, result.batch_dir / "labels.csv")
    phases = round_phases(project.read_json(project.session_path(timed.session))["history"], timed.seconds)
    next_seconds, next_phases = None, None
    if next_round and timed.batch_dir is not None:
        fill(timed.batch_dir)
        after = ingest(ctx, timed.batch_dir / "labels.csv")
        next_seconds = after.seconds
        next_phases = round_phases(project.read_json(project.session_path(after.session))["history"], after.seconds)
    return RoundTiming(timed.seconds, phases["train"], schedule, next_seconds, phases, next_phases)


def export_latency(project_dir: Path, out: Path, device: str) -> float:
    """Seconds of ``export_masks`` (GeoJSON + overview) once the last round's predictions exist."""
    from wsi_il.export import export_masks
    from wsi_il.model import open_context

    ctx = open_context(Project(project_dir), device, SilentReporter())
    started = time.perf_counter()
    export_masks(ctx, out)
    return time.perf_counter() - started


def synthetic_export(out: Path, patches: int, seed: int) -> float:
    """Seconds to write the mask GeoJSON of a slide of ``patches`` tissue patches (irregular tumour islands).

    As ``export`` does by default: one valid MultiPolygon annotation per class (tumour and normal), made from
    the union of the patch squares predicted as that class.
    """
    from wsi_il.measure.mosaic import island_layout, rasterise
    from wsi_il.qupath import class_color, make_feature, union_squares, write_features

    tile = TilingSettings().tile_size_px
    side = int(math.ceil(math.sqrt(patches / 0.6)))  # the island layout's tissue covers about 60% of the grid
    rng = np.random.default_rng(seed)
    tissue, tumour = island_layout((side, side), rng, islands=max(6, patches // 5000), tumour_share=0.3, margin_px=1)
    inside = rasterise(tissue, (side, side))
    rows, cols = np.nonzero(inside)
    keep = rng.permutation(len(rows))[:patches]  # exactly ``patches`` tissue squares
    rows, cols = rows[keep], cols[keep]
    is_tumour = rasterise(tumour, (side, side))[rows, cols]
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    features = []
    for name, chosen in ((TUMOUR, is_tumour), (NORMAL, ~is_tumour)):
        shape = union_squares(cols[chosen] * tile, rows[chosen] * tile, tile, tile)
        features.append(
            make_feature(
                shape,
                name=f"{name} (wsi-il)",
                classification=name,
                color=class_color(name),
                measurements={"Patches": float(chosen.sum())},
            )
        )
    write_features(out, features)
    return time.perf_counter() - started


def _device_name(device: str) -> str:
    import platform

    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def result_json(result: BenchResult) -> str:
    return json.dumps(asdict(result), indent=2) + "\n"


if __name__ == "__main__":  # the extraction stage, run as a child process by run_bench
    spec = json.loads(sys.argv[1])
    print(
        json.dumps(
            extract_stage(Path(spec["project"]), Path(spec["slide"]), spec["weights"], spec["device"], spec["seed"])
        )
    )
