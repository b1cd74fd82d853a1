"""Settings of each stage, as frozen dataclasses saved in the project (docs/method.md's options).

This module owns the project's settings: ``new_manifest`` builds a project's manifest from them, ``settings_of``
reads them back typed (with the values a setting had before it existed, ``_LEGACY``, for older projects), and no
other module holds a default of its own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STRATEGIES = ("random", "topk", "fme", "cnfp", "hybrid", "entropy")


@dataclass(frozen=True)
class TilingSettings:
    """How slides are cut into patches and which patches count as tissue."""

    tile_size_px: int = 256
    """Side of the square tile: in level-0 pixels, or at ``target_mpp`` where that is set (``wsi_il.resolution``)."""
    target_mpp: float | None = None
    """The µm/px tiles are read at (from the best pyramid level, resized); None: level-0 pixels as scanned."""
    thumbnail_px: int = 2048
    """Longest side of the thumbnail used for the coarse tissue mask."""
    min_mask_fraction: float = 0.05
    """A tile is a candidate when at least this share of it lies in the thumbnail tissue mask."""
    white_level: int = 210
    """A pixel is white when all of R, G, B exceed this (docs/method.md)."""
    black_level: int = 5
    """A pixel is black when all of R, G, B are below this."""
    max_blank_fraction: float = 0.8
    """A tile is blank when more than this share of its pixels are white or black."""
    min_components: int = 10
    """A blank tile is still kept when its binarised image has at least this many components."""
    normalisation_sample: int = 1024
    """Tissue tiles drawn at random (over all slides) for the normalisation mean and std; 0 reads every tile, the
    paper's exact statistics, at the cost of reading each tile twice (the statistics must exist before the trunk
    runs). A sample keeps extraction to one read of each tile (docs/speed.md measures what it changes)."""


@dataclass(frozen=True)
class FeatureSettings:
    """The frozen trunk and the feature cache."""

    arch: str = "resnet18"
    """Backbone architecture: resnet18/34/50 (torchvision), or a timm architecture name (``wsi_il.backbones``)."""
    arch_args: dict[str, Any] | None = None
    """A timm architecture's keyword arguments for ``timm.create_model`` (None for the ResNets)."""
    weights: str = "imagenet"
    """'imagenet', 'random', the path of a local state dict or snapshot folder, or 'hf-hub:ORG/NAME' (a timm
    model in the local Hugging Face cache)."""
    weights_sha256: str | None = None
    """SHA-256 of the weights file that made the features (None for random init)."""
    input_px: int = 224
    """Tiles are resized to this side before the trunk."""
    interpolation: str = "bilinear"
    """The resize filter: 'bilinear', or what a timm model's configuration gives ('bicubic' for most)."""
    mean: list[float] | None = None
    """A timm model's own normalisation mean (of pixels in [0, 1]); None: the project's tissue statistics (the
    paper's, kept for the ResNets)."""
    std: list[float] | None = None
    """A timm model's own normalisation std, with ``mean``."""
    feature_shape: list[int] | None = None
    """Shape of one patch's cached features, recorded for timm models (``features.store_shape``)."""
    batch_size: int = 32
    """Patches per trunk batch (also the resume granularity)."""
    seed: int = 0
    """Seed of the random initialisation when weights == 'random'."""
    trainable: str = "last"
    """What the heads train: 'last' (the last block of layer4, the paper; the cache is the output of the rest
    of layer4, C x 7 x 7) or 'layer4' (the paper's ablation: all of layer4 trains, the cache stops after layer3,
    C/2 x 14 x 14). Projects made before this setting existed read as 'last'. For a timm model: 'embedding' (the
    frozen pooled embedding is cached) or 'last' (a vision transformer's tokens entering its last block are
    cached, that block trains): ``wsi_il.backbones``."""


@dataclass(frozen=True)
class TrainSettings:
    """How both heads are trained each round (docs/method.md: Adam, lr 1e-4, 50 epochs, margin 0.2)."""

    epochs: int = 50
    lr: float = 1e-4
    margin: float = 0.2
    batch_size: int = 64
    warm_start: bool = False
    """Start each round from the previous round's heads instead of the pretrained layer4[1]."""
    refine_query: bool = True
    """Move the query vector towards the patches labelled relevant (docs/method.md round step 2)."""
    seed: int = 0
    schedule: str = "auto"
    """'paper': two heads, each its own layer4[1], trained ``epochs`` epochs from the pretrained block (or warm)
    every round; 'fast': one layer4[1] shared by both heads, warm start, early stopping and at most
    ``fast_budget`` patch passes per round; 'auto': paper on CUDA, fast on CPU (see docs/speed.md)."""
    fast_budget: int = 0
    """Fast schedule: the most training patch passes (labels x epochs) per round; 0: the validated default for
    ``fast_frozen_conv1`` (``fast_budget``: 7,500 with it, 2,500 without; docs/speed.md)."""
    fast_frozen_conv1: bool = True
    """Fast schedule: the trained block's first convolution (with its BatchNorm) keeps its starting weights, so
    each training step runs and trains only the rest of the block and the heads, and the database's pass reads
    the first convolution's output from a cache (``wsi_il.stems``) instead of computing it. (With a whole layer
    of trainable blocks, ``--trainable layer4``, everything trains.)"""
    head_init: str = "refit"
    """The classifier's linear layer in a round: 'random' (it starts from torch's initialisation, or from the
    previous round's layer with a warm start, and trains with the block, as the paper); 'fit' (it starts as the
    logistic regression of the round's labels on the block's pooled output, ``heads.fit_linear``, then trains
    with the block); 'refit' (the same, and fitted again on the trained block's output at the end of the round).
    Projects made before this setting existed read as 'random'."""
    balance: str = "classes"
    """What a round trains on (``heads.training_selection``): 'classes' takes every reviewed label and at most
    ``heads.QUERY_GROUP_SIZE`` patches of each session's query, and weighs each class the same in total in both
    losses, so the model does not follow the size of the region the expert drew (docs/quality.md); 'none' trains
    on every label and query patch once, as the paper. Projects made before this setting existed read as
    'none'."""
    map_from: str = "readout"
    """Where the map (every patch's class probabilities as a person sees them: export, evaluate, the review desk's
    overlay and suggestions, a batch's suggestions) comes from: 'readout', a logistic regression of every label
    and query region on the pretrained block's embedding, fitted each round (``wsi_il.readout``; docs/quality.md),
    while the trained heads steer the search and the sampling; 'heads', the trained classifier head, as the
    paper. Projects made before this setting existed read as 'heads'."""


@dataclass(frozen=True)
class SessionSettings:
    """One query session."""

    strategy: str = "cnfp"
    k: int = 10
    rounds: int = 5


ROUND_MODES = ("auto", "exact", "pool")
POOL_ABOVE = 100_000
"""With ``round_mode`` 'auto', rounds are exact up to this many patches and pooled above (docs/cluster.md)."""


@dataclass(frozen=True)
class RoundSettings:
    """How a round chooses its batch: exactly over every patch, or from a candidate pool of bounded size."""

    round_mode: str = "auto"
    """'exact': each round re-embeds every patch with the trained block before ranking every unreviewed patch;
    'pool': each round ranks exactly only a pool of at most ``pool_size`` candidates chosen in the frozen
    embedding, writes the batch, then re-embeds every patch (the full pass) for the export and the next pool;
    'auto': exact up to ``POOL_ABOVE`` patches, pool above. Projects made before this setting existed read as
    'auto', which is exact for them unless they hold more than ``POOL_ABOVE`` patches."""
    pool_size: int = 50_000
    """The most unreviewed patches a pooled round re-embeds and ranks (its interactive cost)."""


def round_is_pooled(settings: RoundSettings, n_patches: int) -> bool:
    """Whether a round over ``n_patches`` patches runs on a candidate pool."""
    if settings.round_mode == "auto":
        return n_patches > POOL_ABOVE
    return settings.round_mode == "pool"


def to_dict(settings: Any) -> dict[str, Any]:
    """Turn a settings dataclass into a JSON-ready dict."""
    return asdict(settings)


SCHEDULES = ("auto", "paper", "fast")
BALANCES = ("classes", "none")
HEAD_INITS = ("random", "fit", "refit")
MAPS_FROM = ("readout", "heads")

FAST_BUDGET_FROZEN = 7500
"""The fast schedule's default pass budget with a frozen first convolution (a pass costs about 40% of one that
trains the whole block)."""
FAST_BUDGET_FULL = 2500
"""The fast schedule's default pass budget when the whole block trains."""


def frozen_conv1_default(weights: str) -> bool:
    """Whether a project with these feature weights keeps the first convolution frozen unless told otherwise: yes
    for pretrained weights (validated with them, docs/speed.md); no for random ones, whose frozen convolution is a
    random projection that only training makes useful."""
    return weights != "random"


def fast_budget(settings: TrainSettings) -> int:
    """The fast schedule's pass budget: the recorded one, or the default for its ``fast_frozen_conv1``."""
    return settings.fast_budget or (FAST_BUDGET_FROZEN if settings.fast_frozen_conv1 else FAST_BUDGET_FULL)


_LEGACY: dict[str, dict[str, Any]] = {
    "TrainSettings": {
        "schedule": "paper",
        "fast_frozen_conv1": False,
        "balance": "none",
        "head_init": "random",
        "map_from": "heads",
    },
    "TilingSettings": {"normalisation_sample": 0},
}
"""Values a setting had before it existed: a project written then keeps behaving as it did."""


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a settings dataclass from a dict, ignoring keys this version does not know."""
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in _LEGACY.get(cls.__name__, {}).items() if k not in data}
    return cls(**values, **{k: v for k, v in data.items() if k in known})


def resolve_schedule(settings: TrainSettings, device: str) -> str:
    """Return the schedule a round runs on ``device``: 'paper' or 'fast'."""
    if settings.schedule == "auto":
        return "paper" if str(device).startswith("cuda") else "fast"
    return settings.schedule


@dataclass(frozen=True)
class ProjectSettings:
    """A project's settings, typed: what ``settings_of`` reads from its manifest."""

    tiling: TilingSettings
    features: FeatureSettings
    train: TrainSettings
    round: RoundSettings


def settings_of(manifest: dict[str, Any]) -> ProjectSettings:
    """Read a project manifest's settings as dataclasses; a setting the manifest lacks reads as its legacy value
    (``_LEGACY``) or its default."""
    return ProjectSettings(
        tiling=from_dict(TilingSettings, manifest.get("tiling", {})),
        features=from_dict(FeatureSettings, manifest.get("features", {})),
        train=from_dict(TrainSettings, manifest.get("train", {})),
        round=from_dict(RoundSettings, manifest.get("round", {})),
    )


def new_manifest(
    classes: list[str],
    tiling: TilingSettings | None = None,
    features: FeatureSettings | None = None,
    train: TrainSettings | None = None,
    round_settings: RoundSettings | None = None,
) -> dict[str, Any]:
    """The manifest of a new project, before its slides are registered: its classes and settings, no statistics."""
    return {
        "classes": list(classes),
        "tiling": to_dict(tiling or TilingSettings()),
        "features": to_dict(features or FeatureSettings()),
        "train": to_dict(train or TrainSettings()),
        "round": to_dict(round_settings or RoundSettings()),
        "normalisation": None,
        "slides": [],
    }
