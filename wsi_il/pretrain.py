"""Self-supervised pretraining of the backbone on a project's own tissue (SimCLR or MoCo v2, no labels).

Two augmented views of random fields anywhere in the tissue of the project's slides are pulled
together and pushed away from other fields. SimCLR pushes them away from the other fields of the
batch (NT-Xent loss). MoCo v2 matches each view's embedding to the other view's embedding by a
momentum (EMA) copy of the network, the key encoder, and pushes it away from a queue of keys of
earlier batches (InfoNCE loss), so its negatives do not depend on the batch size. The augmentations run
as batched tensor operations on the training device (the GPU when there is one): random resized crop,
flips and 90-degree rotations in one affine resampling, H&E stain jitter in optical-density space,
brightness/contrast/saturation jitter, grayscale and Gaussian blur.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from wsi_il.config import settings_of
from wsi_il.errors import InputError, ProjectStateError
from wsi_il.events import Reporter, SilentReporter
from wsi_il.features import Weights, build_resnet, load_project_weights
from wsi_il.fsutil import atomic_write_bytes
from wsi_il.imagefiles import load_image
from wsi_il.project import Project
from wsi_il.readers import read_batches
from wsi_il.threads import default_workers

METHOD_NAMES = {"simclr": "SimCLR", "moco": "MoCo v2"}
"""The self-supervised methods, by the name that selects them."""

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB), optical density per RGB.
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)


@dataclass(frozen=True)
class PretrainSettings:
    """One pretraining run (recorded in its checkpoint so that a resumed run is the same run)."""

    steps: int
    batch: int
    crop_px: int
    """Side of the views fed to the network."""
    field_scale: float = 1.5
    """Side of the field read around a random tissue point, in project tiles."""
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.2
    checkpoint_every: int = 25
    seed: int = 0
    start: str = "project"
    """'project' (the weights that made the project's features) or 'random'."""
    method: str = "moco"
    """'moco' (MoCo v2) or 'simclr', see ``METHOD_NAMES``. MoCo v2 is the default: at equal steps on the CPU
    setting its features gave a linear probe tumour Jaccard of 0.77 against SimCLR's 0.66 (docs/pretraining.md)."""
    moco_momentum: float = 0.99
    """MoCo's key encoder momentum; 0.99 rather than the paper's 0.999, which barely moves in a 200-step run."""
    moco_queue: int = 4096
    """MoCo's number of negative keys kept from earlier batches."""

    @staticmethod
    def for_device(
        device: str, steps: int | None, batch: int | None, crop_px: int | None, recipe: str = "full"
    ) -> PretrainSettings:
        """A recipe's setting on a device (see ``RECIPES``); given steps, batch or view side override it."""
        if recipe not in RECIPES:
            raise InputError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}", "pick one of them")
        base = RECIPES[recipe]["cuda" if device == "cuda" else "cpu"]
        return PretrainSettings(
            steps or base.steps, batch or base.batch, crop_px or base.crop_px, field_scale=base.field_scale
        )


RECIPES: dict[str, dict[str, PretrainSettings]] = {
    "quick": {"cpu": PretrainSettings(112, 64, 64, field_scale=1.0), "cuda": PretrainSettings(500, 512, 224)},
    "full": {"cpu": PretrainSettings(200, 64, 96), "cuda": PretrainSettings(500, 512, 224)},
}
"""The pretraining recipes by name, per device. On a CPU, ``quick`` takes 64 px views of one-tile fields rather than
96 px views of 1.5-tile fields (a step costs 0.52 of ``full``'s CPU time, measured) and 112 steps rather than 200:
0.3 of ``full``'s CPU time, so about 2.5 minutes on the 2-core machine where ``full`` takes 8.5. docs/pretraining.md
says how to measure its quality against ``full``'s. On CUDA both are the paper-sized run."""


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run produced."""

    weights: Path
    steps: int
    seconds: float
    losses: list[float]
    resumed_from: int


class TissueSampler:
    """Draw random level-0 fields inside the tissue of a project's slides (or its patch images)."""

    def __init__(self, project: Project, manifest: dict[str, Any], field_px: int) -> None:
        from wsi_il.slide import TileReader, read_thumbnail
        from wsi_il.tiling import tissue_mask

        tiling = settings_of(manifest).tiling
        self.field_px = field_px
        self.sources: list[tuple[str, Any, np.ndarray, float]] = []
        for record in project.slides(manifest):
            if record.kind == "patches":
                files = project.read_json(project.images_path(record.id))["files"]
                self.sources.append(("patches", [Path(record.path) / f for f in files], np.zeros((0, 2)), 1.0))
                continue
            thumb, scale = read_thumbnail(Path(record.path), tiling.thumbnail_px)
            points = np.argwhere(tissue_mask(thumb, tiling))[:, ::-1].astype(np.float64)  # (x, y) thumbnail px
            if len(points):
                self.sources.append(("slide", TileReader(Path(record.path)), points, scale))
        if not self.sources:
            raise ProjectStateError("the project has no tissue to pretrain on", "add slides with tissue")
        weights = np.array([len(p) if kind == "slide" else len(r) for kind, r, p, _ in self.sources], float)
        self.source_p = weights / weights.sum()

    def field(self, rng: np.random.Generator) -> np.ndarray:
        """Return one RGB field (field_px x field_px) centred on a random tissue point."""
        kind, reader, points, scale = self.sources[rng.choice(len(self.sources), p=self.source_p)]
        if kind == "patches":
            from wsi_il.features import resize_tile

            return resize_tile(load_image(reader[rng.integers(len(reader))]), self.field_px)
        x, y = (points[rng.integers(len(points))] + rng.random(2)) * scale
        half = self.field_px // 2
        return reader.read(int(x) - half, int(y) - half, self.field_px, self.field_px)

    def close(self) -> None:
        for kind, reader, _, _ in self.sources:
            if kind == "slide":
                reader.close()


# ---- augmentations (batched tensor operations on the device) --------------------------------
def augment(fields, crop_px: int, generator, mean, std):
    """Return one augmented, normalised view (B, 3, crop, crop) of uint8 fields (B, 3, H, W) in [0, 255]."""
    b = fields.shape[0]
    dev = fields.device

    def uniform(lo: float, hi: float, *shape: int):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=generator, device="cpu").to(dev)

    x = fields.float() / 255.0
    # random resized crop (area 0.25-1, aspect 3/4-4/3) + flip + 90-degree rotation as one affine map
    area, log_ratio = uniform(0.25, 1.0), uniform(math.log(3 / 4), math.log(4 / 3))
    ratio = log_ratio.exp()
    sx, sy = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    tx, ty = (1 - sx) * uniform(-1, 1), (1 - sy) * uniform(-1, 1)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    quarter = torch.randint(0, 4, (b,), generator=generator).to(dev).float() * (math.pi / 2)
    cos, sin = quarter.cos().round(), quarter.sin().round()
    theta = torch.stack(
        [torch.stack([sx * cos * flip, -sy * sin, tx], 1), torch.stack([sx * sin * flip, sy * cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, [b, 3, crop_px, crop_px], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = _stain_jitter(x, uniform(0.9, 1.1, b, 3), uniform(-0.04, 0.04, b, 3))
    x = _colour_jitter(x, uniform(0.75, 1.25), uniform(0.75, 1.25), uniform(0.75, 1.25))
    gray = (uniform(0, 1) < 0.2).view(b, 1, 1, 1)
    x = torch.where(gray, _luma(x).expand_as(x), x)
    blur = (uniform(0, 1) < 0.5).view(b, 1, 1, 1)
    sigma = float(uniform(0.1, 1.5, 1)[0])
    x = torch.where(blur, gaussian_blur(x, [7, 7], [sigma, sigma]), x)
    return (x.clamp(0, 1) - mean) / std


def _luma(x):
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _colour_jitter(x, brightness, contrast, saturation):
    x = x * brightness.view(-1, 1, 1, 1)
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.view(-1, 1, 1, 1) + mean
    gray = _luma(x)
    return (x - gray) * saturation.view(-1, 1, 1, 1) + gray


def _stain_jitter(x, alpha, beta):
    """Scale and shift the haematoxylin, eosin and DAB concentrations (optical-density space)."""
    stains = torch.from_numpy(_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)).to(x.device)
    od = -torch.log(x.clamp(min=1e-3))  # (B, 3, H, W)
    conc = torch.einsum("bchw,cs->bshw", od, torch.linalg.inv(stains))
    conc = conc * alpha.view(-1, 3, 1, 1) + beta.view(-1, 3, 1, 1)
    od = torch.einsum("bshw,sc->bchw", conc, stains)
    return torch.exp(-od)


def nt_xent(z1, z2, temperature: float):
    """SimCLR's normalised temperature-scaled cross-entropy over 2B views."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    n = z1.shape[0]
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


# ---- the run --------------------------------------------------------------------------------
class SimCLR(torch.nn.Module):
    """A ResNet without its classifier, plus SimCLR's two-layer projection head."""

    def __init__(self, backbone) -> None:
        super().__init__()
        width = backbone.fc.in_features
        backbone.fc = torch.nn.Identity()
        self.backbone = backbone
        self.projection = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(inplace=True), torch.nn.Linear(width, 128)
        )

    def forward(self, x):
        return self.projection(self.backbone(x))


def info_nce(q, k, queue, temperature: float):
    """MoCo's InfoNCE: each query against its positive key (normalised) and the queue's negatives."""
    q = F.normalize(q.float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class MoCo(torch.nn.Module):
    """MoCo v2: a query encoder like ``SimCLR``, its momentum (EMA) copy as key encoder, a queue of keys.

    The key encoder gets no gradients; after each optimizer step it moves towards the query encoder by
    ``1 - momentum`` (0.99 by default rather than the paper's 0.999, which would barely move it in a
    200-step CPU run). MoCo shuffles BatchNorm across GPUs so that a query cannot find its key through
    shared batch statistics; on one device this is emulated: the query encoder sees the whole batch, the
    key encoder (in train mode) sees it in a random order, as two halves forwarded separately, and its
    keys are put back in order.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone, queue_size: int, seed: int) -> None:
        super().__init__()
        self.query = SimCLR(backbone)
        self.key = copy.deepcopy(self.query).requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, 128, generator=generator), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self):
        return self.query.backbone

    def forward(self, x):
        return self.query(x)

    @torch.no_grad()
    def keys(self, x, generator):
        """Return the normalised keys of a batch, with BatchNorm over two random halves of it."""
        order = torch.randperm(len(x), generator=generator).to(x.device)
        x = x[order].contiguous(memory_format=torch.channels_last)
        shuffled = torch.cat([self.key(half) for half in x.chunk(2)])
        return F.normalize(shuffled[torch.argsort(order)].float(), dim=1)

    @torch.no_grad()
    def update(self, keys, momentum: float) -> None:
        """Move the key encoder towards the query encoder, then replace the oldest keys of the queue."""
        for k, q in zip(self.key.parameters(), self.query.parameters(), strict=True):
            k.lerp_(q, 1 - momentum)
        keys = keys[-len(self.queue) :]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[index] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))


def checkpoint_path(project: Project) -> Path:
    return project.root / "pretrain" / "checkpoint.pt"


def duration_text(seconds: float, revised: bool = False) -> str:
    """The line that says how long a pretraining run has left."""
    text = f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
    what = "re-estimated (the machine's speed changed)" if revised else "expected duration"
    return f"{what}: about {text} more"


class DurationEstimate:
    """The expected remaining duration of a pretraining run, reported once, a few steps into it.

    The first steps of a run are not typical: CUDA and cuDNN initialise and pick their kernels, the reader pool
    fills its first batches. Timing the first two steps made a 4.8 min MoCo run on an H100 announce 14.2 min. So
    the first ``WARMUP_STEPS`` steps are left out: the clock restarts at the end of the last of them, and the
    per-step time is the mean of the steady steps after it. The estimate is reported at the end of the first step
    with at least ``MIN_STEADY_STEPS`` steady steps and ``MIN_STEADY_SECONDS`` of them (whichever comes later, so
    that a fast GPU step is averaged over more than timer noise), but no later than ``MAX_FRACTION`` of the run's
    steps (or ``WARMUP_STEPS + MIN_STEADY_STEPS`` steps, if that is more), and before the run's last step, so
    that it comes while it is of use. A run too short to have a steady step by then reports the mean of all its
    steps so far, warm-up included (all there is); a run with no step to do reports 0 when it ends. The seconds
    reported are what is left from the moment of the report: the per-step time times the steps not yet done.

    After that first report the estimate follows the machine: every step, the time left is estimated again from
    the last ``RECENT_STEPS`` steps, and when the run would end more than ``REVISE_SHARE`` of the time left (and
    at least ``REVISE_SECONDS``) away from the end last announced, the new estimate is reported again, with
    ``revised=True`` (another job started or stopped on a shared machine).
    """

    WARMUP_STEPS = 2
    """Steps after the start (or the resume) whose time is left out."""
    MIN_STEADY_STEPS = 3
    MIN_STEADY_SECONDS = 2.0
    MAX_FRACTION = 0.1
    """The latest report, as a fraction of the run's steps."""
    RECENT_STEPS = 10
    REVISE_SHARE = 0.25
    REVISE_SECONDS = 20.0

    def __init__(self, first: int, total: int, report: Callable[..., None] | None, started: float) -> None:
        """``first``: the step the run starts from (its resumed step); ``total``: the step it ends at;
        ``started``: the ``time.perf_counter()`` at its start."""
        self.first, self.total, self.report, self.started = first, total, report, started
        self.steady_since: float | None = None
        steps = total - first
        latest = max(self.WARMUP_STEPS + self.MIN_STEADY_STEPS, math.ceil(self.MAX_FRACTION * steps))
        self.latest = max(1, min(steps - 1, latest))
        """Steps done at which the estimate is reported whatever the window holds."""
        self.reported = report is None
        self.announced_end: float | None = None
        self.recent: list[tuple[int, float]] = []

    def step_done(self, step: int, now: float) -> None:
        """Note that ``step`` ended at ``now`` (``time.perf_counter()``); report the estimate if it is time."""
        self.recent = [*self.recent[-self.RECENT_STEPS :], (step, now)]
        if self.reported:
            self._revise(step, now)
            return
        done = step - self.first
        if done == self.WARMUP_STEPS:
            self.steady_since = now
        steady = done - self.WARMUP_STEPS
        if steady > 0 and self.steady_since is not None:
            seconds = now - self.steady_since
            per_step = seconds / steady
            ready = steady >= self.MIN_STEADY_STEPS and seconds >= self.MIN_STEADY_SECONDS
        else:
            per_step = (now - self.started) / max(1, done)
            ready = False
        if ready or done >= self.latest:
            self._report(per_step * (self.total - step))
            self.announced_end = now + per_step * (self.total - step)

    def _revise(self, step: int, now: float) -> None:
        if self.announced_end is None or self.report is None or len(self.recent) <= self.RECENT_STEPS:
            return
        (old_step, old_time), left = self.recent[0], self.total - step
        seconds = (now - old_time) / max(1, step - old_step) * left
        if left > 0 and abs(now + seconds - self.announced_end) > max(self.REVISE_SHARE * seconds, self.REVISE_SECONDS):
            self.announced_end = now + seconds
            self.report(seconds, revised=True)

    def finish(self) -> None:
        """The run ended without a report (it had no step to do): report that nothing is left."""
        if not self.reported:
            self._report(0.0)

    def _report(self, seconds: float) -> None:
        self.reported = True
        assert self.report is not None
        self.report(max(0.0, seconds))


def pretrain(
    project: Project,
    settings: PretrainSettings,
    device: str,
    out: Path,
    reporter: Reporter | None = None,
    workers: int | None = None,
) -> PretrainResult:
    """Train the project's backbone self-supervised; resumes from its checkpoint when there is one.

    ``reporter`` shows the steps as a task (the last loss as its status) and says the expected remaining duration
    a few steps into the run, and again when the machine's speed changes (``DurationEstimate``, ``duration_text``).
    """
    reporter = reporter or SilentReporter()
    manifest = project.read_manifest()
    features = settings_of(manifest).features
    if manifest.get("normalisation") is None:
        raise ProjectStateError("the project has no normalisation statistics yet", f"run `wsi-il init {project.root}`")
    weights = load_project_weights(features) if settings.start == "project" else None
    model = _build_model(
        settings, build_resnet(weights or Weights(None, "random", "random", None), settings.seed, features.arch)
    )
    dev = torch.device(device)
    model = model.to(dev).to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings.steps))
    step, losses = _resume(project, settings, model, optimizer, schedule)
    resumed_from = step
    norm = manifest["normalisation"]
    mean = torch.tensor(norm["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"], device=dev).view(1, 3, 1, 1)
    tile = settings_of(manifest).tiling.tile_size_px
    field_px = max(int(tile * settings.field_scale), settings.crop_px)
    sampler = TissueSampler(project, manifest, field_px)
    workers = workers or default_workers()
    started = time.perf_counter()
    estimate = DurationEstimate(
        resumed_from, settings.steps, lambda s, revised=False: reporter.info(duration_text(s, revised)), started
    )
    advance = reporter.task("pretraining", settings.steps, unit="steps")
    advance(resumed_from)
    try:
        batches = [range(s * settings.batch, (s + 1) * settings.batch) for s in range(step, settings.steps)]

        def make_load() -> tuple[Callable[[int], np.ndarray], Callable[[], None]]:  # in each reader
            return (lambda i: sampler.field(np.random.default_rng([settings.seed, i]))), sampler.close

        model.train()
        fields_iter = read_batches(make_load, batches, workers, (field_px, field_px, 3))
        for fields, _ in fields_iter:
            loss = _train_step(model, optimizer, schedule, fields, settings, step, dev, mean, std)
            losses.append(loss)
            step += 1
            reporter.status(f"pretraining (loss {loss:.3f})")
            advance(1)
            estimate.step_done(step, time.perf_counter())
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_checkpoint(project, settings, model, optimizer, schedule, step, losses)
        estimate.finish()
    finally:
        if "fields_iter" in locals():
            fields_iter.close()  # stop the readers before their slides are closed
        sampler.close()
    state = {f"{k}": v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    return PretrainResult(out, step, time.perf_counter() - started, losses, resumed_from)


def _build_model(settings: PretrainSettings, backbone) -> SimCLR | MoCo:
    if settings.method == "simclr":
        return SimCLR(backbone)
    if settings.method == "moco":
        return MoCo(backbone, settings.moco_queue, settings.seed)
    raise InputError(
        f"pretraining method {settings.method!r} is not one of {', '.join(METHOD_NAMES)}", "pick one of them"
    )


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _views(fields: np.ndarray, settings: PretrainSettings, step: int, dev, mean, std):
    """Return the two augmented views of a step's fields, and the step's generator for any further draws."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    batch = torch.from_numpy(fields).to(dev, non_blocking=True).permute(0, 3, 1, 2)
    views = [
        augment(batch, settings.crop_px, generator, mean, std).contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    return views, generator


def _precision(dev) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def _train_step(
    model, optimizer, schedule, fields: np.ndarray, settings: PretrainSettings, step: int, dev, mean, std
) -> float:
    """One step: SimCLR's NT-Xent over the batch, or MoCo's symmetric InfoNCE (each view's query against the
    other view's key and the queue), then MoCo's key-encoder and queue update."""
    views, generator = _views(fields, settings, step, dev, mean, std)
    moco = isinstance(model, MoCo)
    optimizer.zero_grad(set_to_none=True)
    with _precision(dev):
        z1, z2 = model(views[0]), model(views[1])
        if moco:
            k1, k2 = model.keys(views[0], generator), model.keys(views[1], generator)
    if moco:
        loss = (
            info_nce(z1, k2, model.queue, settings.temperature) + info_nce(z2, k1, model.queue, settings.temperature)
        ) / 2
    else:
        loss = nt_xent(z1, z2, settings.temperature)
    loss.backward()
    optimizer.step()
    schedule.step()
    if moco:
        model.update(torch.cat([k1, k2]), settings.moco_momentum)
    return float(loss.detach())


def _save_checkpoint(
    project: Project, settings: PretrainSettings, model, optimizer, schedule, step: int, losses: list[float]
) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "settings": asdict(settings),
            "step": step,
            "losses": losses,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        },
        buffer,
    )
    atomic_write_bytes(checkpoint_path(project), buffer.getvalue())


def _resume(project: Project, settings: PretrainSettings, model, optimizer, schedule) -> tuple[int, list[float]]:
    path = checkpoint_path(project)
    if not path.is_file():
        return 0, []
    saved = torch.load(path, map_location="cpu", weights_only=True)
    defaults = asdict(PretrainSettings(settings.steps, settings.batch, settings.crop_px))
    stored = {**defaults, "method": "simclr", **saved["settings"]}  # a checkpoint from before a setting existed
    # ran that setting's default; before --method, every run was SimCLR
    if stored != asdict(settings):
        changed = [k for k, v in asdict(settings).items() if stored.get(k) != v]
        raise InputError(
            f"{path} is a pretraining run with other settings ({', '.join(changed)})",
            "run with the same settings to resume it, or pass --restart to start over",
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    return int(saved["step"]), list(saved["losses"])
