"""The two trainable heads on cached trunk features (docs/method.md "Two trainable heads").

- retrieval head: layer4[1] + global average pooling -> 512-d, L2-normalised; batch-hard triplet loss.
- classifier head: layer4[1] + GAP + linear -> C logits; cross-entropy.

(For ResNet-18; other backbones use their own last block of layer4, and its width.)

Two schedules (``TrainSettings.schedule``): 'paper' trains the two heads separately, each from its own copy
of layer4[1], as docs/method.md; 'fast' trains one layer4[1] shared by both heads (the sum of both losses), from
the previous round's weights, with early stopping and a bounded number of patch passes, and embeds and
predicts every patch in one pass. With ``fast_frozen_conv1`` the block's stem (first convolution, BatchNorm,
ReLU: ``block_stem``) keeps its weights: training runs only the rest (``block_tail``), and the pass reads the
stem's output from a cache (``StemCache``) once it has been computed. Forward passes run in bfloat16 where the
hardware does so natively (``wsi_il.precision``). On CUDA each training step is one captured graph
(``_StepGraphs``).

Targets are class indices; a binary "no" in a project of more than two classes is stored as
``-(c + 1)`` ("not class c"): it is a negative for class c in the triplet loss and is trained with
-log(1 - p_c) in the classifier.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from wsi_il.config import TrainSettings, fast_budget, resolve_schedule
from wsi_il.features import upload
from wsi_il.precision import GRAPHS_ENV, autocast, cuda_graphs_wanted, mixed_precision_dtype

FAST_PATIENCE = 3
"""Fast schedule: stop after this many epochs without a new lowest loss (only in rounds whose epochs the pass
budget cuts; a round within the budget runs all ``epochs``, as the paper)."""
FAST_FITTED_LOSS = 0.02
"""Fast schedule: stop once the epoch's loss (cross-entropy + triplet) is below this (every label fitted)."""


def _torch():
    import torch

    return torch


def make_block(init_state: dict[str, Any]):
    """Return a fresh trainable part shaped like ``init_state``, loaded with it.

    One residual block (Basic or Bottleneck; keys ``conv1.weight`` ...), or a whole ``layer4`` (keys ``0.conv1.weight``,
    ``1.conv1.weight`` ...: a Sequential of blocks, the first strided with a downsample when the state holds one).
    """
    from wsi_il.backbones import TAIL_SPEC, make_tail

    if TAIL_SPEC in init_state:  # a timm model's trainable part (wsi_il.backbones)
        return make_tail(init_state)
    torch = _torch()
    stages = _stage_indices(init_state)
    if not stages:
        block = _block_like(init_state, "", stride=1)
    else:
        block = torch.nn.Sequential(
            *[
                _block_like(init_state, f"{i}.", stride=2 if f"{i}.downsample.0.weight" in init_state else 1)
                for i in stages
            ]
        )
    if not any(parameter.is_meta for parameter in block.parameters()):  # (a head built on "meta" loads later)
        block.load_state_dict(init_state)
    return block


def _stage_indices(init_state: dict[str, Any]) -> list[int]:
    """The block indices of a whole-layer state (keys ``0.conv1.weight`` ...); empty for a single block."""
    heads = {key.split(".", 1)[0] for key in init_state}
    if not heads or not all(h.isdigit() for h in heads):
        return []
    indices = sorted(int(h) for h in heads)
    if indices != list(range(len(indices))):
        raise ValueError(f"the trainable layer's blocks are numbered {indices}, not 0 .. {len(indices) - 1}")
    return indices


def _block_like(state: dict[str, Any], prefix: str, stride: int):
    """A fresh torchvision BasicBlock or Bottleneck shaped like the weights under ``prefix`` (not loaded)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch = _torch()
    conv1 = state[f"{prefix}conv1.weight"]
    inplanes = int(conv1.shape[1])
    if f"{prefix}conv3.weight" in state:
        cls = Bottleneck
        out = int(state[f"{prefix}conv3.weight"].shape[0])
        planes, width = out // Bottleneck.expansion, int(conv1.shape[0])
        groups = width // int(state[f"{prefix}conv2.weight"].shape[1])
        extra = {"groups": groups, "base_width": 64 * width // (planes * groups)}
    else:
        cls = BasicBlock
        planes = out = int(conv1.shape[0])
        extra = {}
    downsample = None
    if f"{prefix}downsample.0.weight" in state:
        downsample = torch.nn.Sequential(
            torch.nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False), torch.nn.BatchNorm2d(out)
        )
    return cls(inplanes, planes, stride=stride, downsample=downsample, **extra)


def single_block(init_state: dict[str, Any]) -> bool:
    """Whether the trainable part is one residual block (not a whole layer of them, nor a timm model's part)."""
    return "conv1.weight" in init_state and not _stage_indices(init_state)


def block_width(init_state: dict[str, Any]) -> int:
    """Output channels of the trainable part (its last block's; the embedding size)."""
    from wsi_il.backbones import TAIL_SPEC, tail_width

    if TAIL_SPEC in init_state:
        return tail_width(init_state)
    stages = _stage_indices(init_state)
    prefix = f"{stages[-1]}." if stages else ""
    key = f"{prefix}conv3.weight" if f"{prefix}conv3.weight" in init_state else f"{prefix}conv2.weight"
    return int(init_state[key].shape[0])


class RetrievalHead(_torch().nn.Module):
    """layer4[1] + global average pooling, L2-normalised."""

    def __init__(self, init_state: dict[str, Any], normalise: bool = True) -> None:
        super().__init__()
        self.block = make_block(init_state)
        self.normalise = normalise
        """False: the pooled output as it is (``pooled_output``)."""

    def forward(self, x, stem=None):
        """The embeddings of features ``x``; ``stem``: the block's stem output for them, when known."""
        pooled = _pooled(self.block, x, stem)
        return _torch().nn.functional.normalize(pooled, dim=1) if self.normalise else pooled


class ClassifierHead(_torch().nn.Module):
    """layer4[1] + global average pooling + a linear layer."""

    def __init__(self, init_state: dict[str, Any], n_classes: int) -> None:
        super().__init__()
        self.block = make_block(init_state)
        self.fc = _torch().nn.Linear(block_width(init_state), n_classes)

    def pooled(self, x, stem=None):
        """The block's globally average-pooled output, float32 (the retrieval embedding before normalisation);
        ``stem``: the block's stem output for ``x``, when known (``block_tail``)."""
        return _pooled(self.block, x, stem)

    def logits(self, pooled):
        """The linear layer on pooled features, in float32 even under autocast (it costs nothing)."""
        with _torch().autocast(pooled.device.type, enabled=False):
            return self.fc(pooled)

    def forward(self, x, stem=None):
        return self.logits(self.pooled(x, stem))


def _pooled(block, x, stem):
    """A block's output for ``x`` (from its stem's output when given), average-pooled in float32 (under autocast
    too)."""
    out = block(x) if stem is None else block_tail(block, stem, x)
    return out.float() if out.ndim == 2 else out.float().mean(dim=(2, 3))  # a timm model's part pools itself


def _freeze_batchnorm(module) -> None:
    """Keep BatchNorm statistics fixed: review batches are far too small to estimate them."""
    for child in module.modules():
        if isinstance(child, _torch().nn.BatchNorm2d):
            child.eval()


def triplet_masks(targets):
    """Return (same, different) boolean matrices for batch-hard mining over mixed targets."""
    torch = _torch()
    t = targets.view(-1, 1)
    u = targets.view(1, -1)
    known_t, known_u = t >= 0, u >= 0
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    same = known_t & known_u & (t == u) & ~eye
    differ = known_t & known_u & (t != u)
    not_of = (~known_t & known_u & (-t - 1 == u)) | (known_t & ~known_u & (-u - 1 == t))
    return same, differ | not_of


def batch_hard_triplet_loss(embeddings, targets, margin: float, weights=None):
    """Batch-hard triplet loss: per anchor, its farthest positive against its closest negative (0 when no anchor
    has both); ``weights``: each anchor's weight in the mean (``training_selection``), else equal.

    Masked sums rather than boolean indexing or ``any()`` tests, which would make the host wait for the GPU at
    every training step; ``has_triplet`` answers on the host whether there is anything to learn from.
    """
    torch = _torch()
    dist = torch.cdist(embeddings, embeddings)
    same, different = triplet_masks(targets)
    valid = same.any(1) & different.any(1)
    hardest_pos = torch.where(same, dist, torch.zeros_like(dist)).max(1).values
    hardest_neg = torch.where(different, dist, torch.full_like(dist, float("inf"))).min(1).values
    per_anchor = torch.where(valid, torch.relu(hardest_pos - hardest_neg + margin), torch.zeros_like(dist[0]))
    if weights is None:
        return per_anchor.sum() / valid.sum().clamp(min=1)
    weight = torch.where(valid, weights, torch.zeros_like(weights))
    return (per_anchor * weight).sum() / weight.sum().clamp(min=1e-6)


def has_triplet(targets: np.ndarray) -> bool:
    """Whether a batch's targets give any anchor a positive and a negative (as ``triplet_masks`` says; from numpy
    on the host: microseconds, where the masks on CPU tensors took a quarter of a millisecond a step).

    An anchor is of a class c; it has a positive when another row is of c, and a negative when a row is of
    another class or says "not c".
    """
    known = targets[targets >= 0]
    classes, counts = np.unique(known, return_counts=True)
    return any(
        count < len(known) or bool(np.any(targets == -c - 1))
        for c, count in zip(classes, counts, strict=True)
        if count >= 2
    )


def classifier_loss(logits, targets, weights=None):
    """Cross-entropy for class targets, -log(1 - p_c) for "not class c" targets (mean over the batch; ``weights``:
    each row's weight, ``training_selection``, whose mean over the training set is 1).

    Both terms are computed for every row and the right one kept, so no step waits for the GPU to say which
    rows are which.
    """
    torch = _torch()
    known = targets >= 0
    log_p = torch.log_softmax(logits, dim=1)
    named = log_p.gather(1, torch.where(known, targets, -targets - 1).view(-1, 1)).squeeze(1)  # log p of the class
    not_named = torch.log1p(-named.exp().clamp(max=1 - 1e-6))
    per_row = torch.where(known, -named, -not_named)
    return (per_row if weights is None else per_row * weights).sum() / len(targets)


QUERY_GROUP_SIZE = 10
"""Balanced training: each round trains on at most this many of a session's query patches (a random subset, drawn
anew when the labels change), however large the region the expert drew."""


def training_selection(
    targets: np.ndarray, groups: np.ndarray, balance: str, seed: int = 0, query_cap: int = QUERY_GROUP_SIZE
) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows of a training set a round trains on, and their loss weights (mean 1; None: every row once).

    ``groups`` holds -1 for a reviewed label and the session number for a query patch. 'none' (the paper): every
    row, once. 'classes': every reviewed label, and at most ``QUERY_GROUP_SIZE`` query patches of each session,
    drawn at random (seeded by ``seed`` and the training set's size, so a rerun draws the same ones), weighted
    so that each class weighs the same in total (``training_weights``). A region of hundreds of patches then
    neither outweighs the reviewed labels nor spends the fast schedule's pass budget on itself.
    """
    targets, groups = np.asarray(targets), np.asarray(groups)
    if balance == "none":
        return np.arange(len(targets)), None
    if balance != "classes":
        raise ValueError(f"unknown balance {balance!r}")
    rng = np.random.default_rng([seed, len(targets)])
    keep = [np.flatnonzero(groups < 0)]
    for group in np.unique(groups[groups >= 0]):
        rows = np.flatnonzero(groups == group)
        keep.append(np.sort(rng.choice(rows, size=min(len(rows), query_cap), replace=False)))
    rows = np.concatenate(keep)
    return rows, training_weights(targets[rows])


def training_weights(targets: np.ndarray) -> np.ndarray:
    """Per-row loss weights (mean 1) under which each target value (class, or "not class c") weighs the same in
    total: the balance of the classes in training does not follow the mix of the labels."""
    targets = np.asarray(targets)
    weights = np.ones(len(targets), dtype=np.float64)
    values = np.unique(targets)
    for value in values:
        rows = targets == value
        weights[rows] = len(targets) / len(values) / rows.sum()
    return weights.astype(np.float32)


@dataclass
class TrainedHeads:
    """Both heads after a round of training, as CPU state dicts."""

    retrieval: dict[str, Any]
    classifier: dict[str, Any]
    n_classes: int
    losses: dict[str, list[float]]
    shared: bool = False
    """True when both heads share one block (the fast schedule): one pass gives embedding and prediction."""
    schedule: str = "paper"
    frozen_stem: bool = False
    """True when the block's stem (``block_stem``) kept its starting weights: its output can be cached."""

    def model(self) -> dict[str, Any]:
        """The model-file fields of these heads."""
        return {
            "retrieval": self.retrieval,
            "classifier": self.classifier,
            "shared": self.shared,
            "schedule": self.schedule,
            "frozen_stem": self.frozen_stem,
            "losses": self.losses,
            "epochs_run": len(self.losses["triplet"]),
        }


def planned_epochs(settings: TrainSettings, n_labels: int, schedule: str) -> int:
    """The most epochs a round runs: ``epochs``; the fast schedule also caps labels x epochs at its pass budget."""
    if schedule != "fast":
        return settings.epochs
    return max(1, min(settings.epochs, fast_budget(settings) // max(1, n_labels)))


def train_heads(
    features: np.ndarray,
    targets: np.ndarray,
    init_state: dict[str, Any],
    n_classes: int,
    settings: TrainSettings,
    device: str,
    start: TrainedHeads | None = None,
    on_epoch: Callable[[int], None] | None = None,
    schedule: str | None = None,
    early_stopping: bool = True,
    graphs: bool | None = None,
    weights: np.ndarray | None = None,
    fit_set: FitSet | None = None,
) -> TrainedHeads:
    """Train the retrieval and classifier heads on labelled features (float16 (n, C, 7, 7)).

    ``fit_set``: (features, targets, weights) the linear layer is fitted to when ``settings.head_init`` fits it
    (``fit_linear``); None: the training rows.

    ``weights``: each row's weight in both losses (``training_selection``); None weighs every row once.

    ``schedule`` overrides the settings' (resolved for ``device`` when 'auto'). ``on_epoch(1)`` is called
    after every epoch (a progress advance). ``early_stopping=False`` makes the fast schedule run all its
    planned epochs (the paper's never stops early). ``graphs``: run each training step as a captured CUDA graph
    (``_StepGraphs``); None: on CUDA unless ``$WSI_IL_CUDA_GRAPHS`` is 0, falling back to eager steps (with a
    warning) where capture fails; True: graphs, or the capture's error.
    """
    schedule = schedule or resolve_schedule(settings, device)
    if schedule == "fast":
        return _train_shared(
            features,
            targets,
            init_state,
            n_classes,
            settings,
            device,
            start,
            on_epoch,
            early_stopping,
            graphs,
            weights,
            fit_set,
        )
    torch = _torch()
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    dev = torch.device(device)
    x_all, y_all = _on_device(features, targets, dev)
    w_all = _weights_on(weights, dev)
    retrieval = RetrievalHead(init_state)
    classifier = ClassifierHead(init_state, n_classes)
    if start is not None:
        retrieval.load_state_dict(start.retrieval)
        classifier.load_state_dict(start.classifier)
    retrieval.to(dev).train()
    classifier.to(dev).train()
    _freeze_batchnorm(retrieval)
    _freeze_batchnorm(classifier)
    opt_r = _adam(retrieval.parameters(), settings.lr, _want_graphs(graphs, dev))
    if settings.head_init in ("fit", "refit"):
        fit_linear(classifier, *_fit_inputs(fit_set, x_all, None, y_all, w_all), n_classes)
    opt_c = _adam(classifier.parameters(), settings.lr, _want_graphs(graphs, dev))

    def retrieval_step(rows, y):
        with autocast(dev, cache=False):
            embedded = retrieval(rows[0])
        return (_step(opt_r, batch_hard_triplet_loss(embedded.float(), y, settings.margin, rows[1])),)

    def classifier_step(rows, y):
        with autocast(dev, cache=False):
            logits = classifier(rows[0])
        return (_step(opt_c, classifier_loss(logits.float(), y, rows[1])),)

    updates = [
        _Update(retrieval_step, (0,), retrieval, opt_r, needs_triplet=True),  # no triplet: no step
        _Update(classifier_step, (1,), classifier, opt_c),
    ]
    losses = _train_epochs(
        updates, (x_all, w_all), y_all, targets, settings.batch_size, settings.epochs, generator, on_epoch, graphs
    )
    if settings.head_init == "refit":
        fit_linear(classifier, *_fit_inputs(fit_set, x_all, None, y_all, w_all), n_classes)
    return TrainedHeads(_cpu_state(retrieval), _cpu_state(classifier), n_classes, losses)


def _train_shared(
    features: np.ndarray,
    targets: np.ndarray,
    init_state: dict[str, Any],
    n_classes: int,
    settings: TrainSettings,
    device: str,
    start: TrainedHeads | None,
    on_epoch: Callable[[int], None] | None,
    early_stopping: bool = True,
    graphs: bool | None = None,
    weights: np.ndarray | None = None,
    fit_set: FitSet | None = None,
) -> TrainedHeads:
    """The fast schedule: one block for both heads, warm-started, early-stopped, bounded passes."""
    torch = _torch()
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    dev = torch.device(device)
    x_all, y_all = _on_device(features, targets, dev)
    w_all = _weights_on(weights, dev)
    head = ClassifierHead(init_state, n_classes)
    if start is not None:  # the previous classifier holds the shared block (or, after a paper round, its own)
        head.load_state_dict(start.classifier)
    head.to(dev).train()
    _freeze_batchnorm(head)
    stem_all = None
    if settings.fast_frozen_conv1 and single_block(init_state):
        for parameter in (*head.block.conv1.parameters(), *head.block.bn1.parameters()):
            parameter.requires_grad_(False)
        with torch.no_grad(), autocast(dev):
            stem_all = block_stem(head.block, x_all)  # the frozen part's output, once a round
    if settings.head_init in ("fit", "refit"):
        fit_linear(head, *_fit_inputs(fit_set, x_all, stem_all, y_all, w_all), n_classes)
    optimizer = _adam([p for p in head.parameters() if p.requires_grad], settings.lr, _want_graphs(graphs, dev))

    def shared_step(rows, y):
        x, stem, weight = rows
        with autocast(dev, cache=False):
            pooled = head.pooled(x, stem)
        logits = head.logits(pooled)
        triplet = batch_hard_triplet_loss(torch.nn.functional.normalize(pooled, dim=1), y, settings.margin, weight)
        cross_entropy = classifier_loss(logits, y, weight)
        _step(optimizer, triplet + cross_entropy)
        return triplet.detach(), cross_entropy.detach()

    epochs = planned_epochs(settings, len(y_all), "fast")
    # Early stopping only where the pass budget binds: a round within it is cheap and runs the paper's epochs.
    stopping = _EarlyStop() if early_stopping and epochs < settings.epochs else None
    losses = _train_epochs(
        [_Update(shared_step, (0, 1), head, optimizer)],
        (x_all, stem_all, w_all),
        y_all,
        targets,
        settings.batch_size,
        epochs,
        generator,
        on_epoch,
        graphs,
        stopping,
    )
    if settings.head_init == "refit":
        fit_linear(head, *_fit_inputs(fit_set, x_all, stem_all, y_all, w_all), n_classes)
    classifier = _cpu_state(head)
    retrieval = {k: v for k, v in classifier.items() if k.startswith("block.")}
    return TrainedHeads(
        retrieval, classifier, n_classes, losses, shared=True, schedule="fast", frozen_stem=stem_all is not None
    )


class _EarlyStop:
    """The fast schedule's stopping rule: every label fitted, or ``FAST_PATIENCE`` epochs without a new low."""

    def __init__(self) -> None:
        self.best, self.stale = math.inf, 0

    def __call__(self, losses: dict[str, list[float]]) -> bool:
        total = losses["triplet"][-1] + losses["cross_entropy"][-1]
        if total < FAST_FITTED_LOSS:
            return True
        self.stale = 0 if total < self.best else self.stale + 1
        self.best = min(self.best, total)
        return self.stale >= FAST_PATIENCE


FitSet = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""Features, targets and loss weights (None: equal) that ``fit_linear`` fits the classifier's linear layer to."""


def _fit_inputs(fit_set: FitSet | None, x_all, stem_all, y_all, w_all):
    """What ``fit_linear`` fits to: the training rows (with their stem output), or ``fit_set`` on their device."""
    if fit_set is None:
        return x_all, stem_all, y_all, w_all
    features, targets, weights = fit_set
    x, y = _on_device(features, targets, x_all.device)
    return x, None, y, _weights_on(weights, x_all.device)


FIT_L2 = 1.0
"""L2 penalty (per weight and bias, on standardised inputs' scale) of ``fit_linear``'s logistic regression. Chosen
on exact truth (docs/quality.md): 1e-3 let the fit follow label noise as labels grew (balanced accuracy fell from
40 to 150 labels); 1 kept it rising, with random and with pretrained features."""


def fit_linear(head, x_all, stem_all, y_all, w_all, n_classes: int) -> None:
    """Set the classifier's linear layer to the weighted logistic regression of the labels on the block's current
    pooled output (``fit_logistic``; linear probing before fine-tuning), so that the round's fine-tuning starts
    from a classifier that already separates the labels instead of from a random or stale one. With a single kind
    of target (one label, or labels of one class) there is nothing to separate: the layer is left as it is."""
    torch = _torch()
    if len(torch.unique(y_all)) < 2:
        return
    with torch.no_grad(), autocast(x_all.device):
        pooled = head.pooled(x_all, stem_all).float()
    weight, bias = fit_logistic(pooled, y_all, w_all, n_classes)
    with torch.no_grad():
        head.fc.weight.copy_(weight)
        head.fc.bias.copy_(bias)


def fit_logistic(features, y_all, w_all, n_classes: int):
    """The weighted logistic regression of targets on float32 features (L-BFGS, penalty ``FIT_L2`` on
    standardised features): (weight (C, D), bias (C,)) on the features' own scale, so that the logits are
    ``features @ weight.T + bias``. "Not class c" rows count as in ``classifier_loss``; ``w_all``: each row's loss
    weight, or None."""
    torch = _torch()
    mean, scale = features.mean(0), features.std(0, correction=0) + 1e-6
    z = (features - mean) / scale
    weight = torch.zeros(n_classes, z.shape[1], device=z.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=z.device, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = classifier_loss(z @ weight.T + bias, y_all, w_all) + FIT_L2 * ((weight**2).sum() + (bias**2).sum())
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():  # fold the standardisation in: W (p - mean) / scale + b
        return weight / scale, bias - (weight / scale) @ mean


def _adam(parameters, lr: float, capturable: bool):
    """Adam; ``capturable``: its state on the device, so that its step can be part of a captured graph."""
    return _torch().optim.Adam(parameters, lr=lr, capturable=capturable)


@dataclass(frozen=True)
class _Update:
    """One optimiser update of a training step: ``step(rows, y)`` runs forward, loss, backward and the step of
    ``optimizer`` on ``module`` for a batch (``rows``: one tensor, or None, per training input) and returns its
    detached losses, which the epoch sums into ``slots`` (0: triplet, 1: cross-entropy)."""

    step: Callable[[tuple[Any, ...], Any], tuple[Any, ...]]
    slots: tuple[int, ...]
    module: Any
    optimizer: Any
    needs_triplet: bool = False
    """Skipped (no step, a loss of 0) for a batch where no anchor has both a positive and a negative."""


def _apply(updates: list[_Update], rows: tuple[Any, ...], y, sums, size: int) -> None:
    for update in updates:
        for slot, loss in zip(update.slots, update.step(rows, y), strict=True):
            sums[slot] += loss * size


def _train_epochs(
    updates: list[_Update],
    inputs: tuple[Any, ...],
    y_all,
    targets: np.ndarray,
    batch_size: int,
    epochs: int,
    generator,
    on_epoch: Callable[[int], None] | None,
    graphs: bool | None,
    stop: Callable[[dict[str, list[float]]], bool] | None = None,
) -> dict[str, list[float]]:
    """Run up to ``epochs`` epochs of shuffled batches (until ``stop(losses)``); return the per-epoch mean losses.

    The order is drawn on the host (the same numbers on every device) and moved to the device once an epoch;
    losses are summed on the device and read once an epoch: a wait for the GPU per step would stop the host
    from queueing ahead.
    """
    torch = _torch()
    dev, n = y_all.device, len(y_all)
    sums = torch.zeros(2, device=dev)
    runner = _step_graphs(updates, inputs, y_all, sums, batch_size, graphs)
    losses: dict[str, list[float]] = {"triplet": [], "cross_entropy": []}
    for _ in range(epochs):
        sums.zero_()
        order = torch.randperm(n, generator=generator)
        for batch, index in zip(order.split(batch_size), order.to(dev).split(batch_size), strict=True):
            chosen = [
                k for k, update in enumerate(updates) if not update.needs_triplet or has_triplet(targets[batch.numpy()])
            ]
            if runner is not None:
                runner.run(chosen, index)
            else:
                rows = tuple(None if tensor is None else tensor[index] for tensor in inputs)
                _apply([updates[k] for k in chosen], rows, y_all[index], sums, len(batch))
        _append_epoch(losses, sums, n)
        if on_epoch:
            on_epoch(1)
        if stop is not None and stop(losses):
            break
    return losses


def _want_graphs(graphs: bool | None, dev) -> bool:
    """Whether training steps are to be captured: ``graphs`` when said, else ``cuda_graphs_wanted``."""
    return graphs if graphs is not None else cuda_graphs_wanted(dev)


def _step_graphs(
    updates: list[_Update], inputs: tuple[Any, ...], y_all, sums, batch_size: int, graphs: bool | None
) -> _StepGraphs | None:
    """The captured steps where ``graphs`` asks for them (see ``train_heads``), else None (eager steps)."""
    import warnings

    if not _want_graphs(graphs, y_all.device):
        return None
    n = len(y_all)
    sizes = sorted({min(batch_size, n)} | ({n % batch_size} if n > batch_size and n % batch_size else set()))
    saved = _Snapshot(updates, sums)
    try:
        return _StepGraphs(updates, inputs, y_all, sums, sizes, saved)
    except RuntimeError as exc:
        saved.restore()
        if graphs:
            raise
        warnings.warn(
            f"training steps could not be captured as CUDA graphs ({str(exc).splitlines()[0][:160]}); "
            f"they run one by one, slower (set {GRAPHS_ENV}=0 to skip the attempt)",
            stacklevel=3,
        )
        return None


class _Snapshot:
    """The weights, optimiser state and loss sums before the warm-up steps of a capture, to put back after it."""

    def __init__(self, updates: list[_Update], sums) -> None:
        self.updates, self.sums = updates, sums
        self.weights = [(p, p.detach().clone()) for u in updates for p in u.module.parameters()]

    def restore(self) -> None:
        torch = _torch()
        with torch.no_grad():
            for parameter, value in self.weights:
                parameter.copy_(value)
            for update in self.updates:  # a fresh optimiser: the state it creates at its first step, zeroed
                update.optimizer.zero_grad(set_to_none=True)
                for state in update.optimizer.state.values():
                    for value in state.values():
                        if torch.is_tensor(value):
                            value.zero_()
            self.sums.zero_()


class _StepGraphs:
    """Each update of a training step captured as one CUDA graph per batch size (an epoch has at most two: the
    batch size and its last, smaller batch), the batch's rows gathered inside it from a fixed index tensor.

    A replay launches the whole step (gather, forward, loss, backward, Adam) at once: eager PyTorch spent about
    3.4 ms of host time on each head's step on an H100 for a fraction of a millisecond of GPU work (docs/speed.md,
    "GPU"). Capture needs warm-up steps, which change the weights and the optimiser's state: both are put back
    (``_Snapshot``), so training starts where eager training would.
    """

    WARMUP = 2
    """Eager steps before capture (kernel selection, the optimiser's state)."""

    def __init__(
        self, updates: list[_Update], inputs: tuple[Any, ...], y_all, sums, sizes: list[int], saved: _Snapshot
    ) -> None:
        import warnings

        torch = _torch()
        self.updates, self.inputs, self.y_all, self.sums = updates, inputs, y_all, sums
        self.index = {size: torch.arange(size, device=y_all.device) for size in sizes}
        self.side = torch.cuda.Stream(y_all.device)
        stream = torch.cuda.Stream(y_all.device)
        stream.wait_stream(torch.cuda.current_stream(y_all.device))
        with torch.cuda.stream(stream), warnings.catch_warnings():
            # (Adam warns when a step built for capture runs uncaptured: these are the steps capture needs)
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            for _ in range(self.WARMUP):
                for size in sizes:
                    for update in updates:
                        self._body(update, size)
        torch.cuda.current_stream(y_all.device).wait_stream(stream)
        saved.restore()
        stream.wait_stream(torch.cuda.current_stream(y_all.device))
        torch.cuda.synchronize(y_all.device)
        # capture_begin/end rather than the torch.cuda.graph context, which collects Python's garbage at every
        # capture (tens of milliseconds each in a process that has imported torch)
        self.graphs: dict[tuple[int, int], Any] = {}
        with torch.cuda.stream(stream):
            for size in sizes:
                for k, update in enumerate(updates):
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        self._body(update, size)
                    finally:
                        graph.capture_end()
                    self.graphs[k, size] = graph

    def _body(self, update: _Update, size: int) -> None:
        index = self.index[size]
        rows = tuple(None if tensor is None else tensor[index] for tensor in self.inputs)
        _apply([update], rows, self.y_all[index], self.sums, size)

    def run(self, chosen: list[int], index) -> None:
        """One training step on the rows ``index`` (a device tensor): the chosen updates' graphs, replayed, the
        first on a second stream (the paper's two heads are independent: their small kernels overlap)."""
        torch = _torch()
        self.index[len(index)].copy_(index)
        graphs = [self.graphs[k, len(index)] for k in chosen]
        if len(graphs) > 1:
            main = torch.cuda.current_stream(index.device)
            self.side.wait_stream(main)  # the index is in place
            with torch.cuda.stream(self.side):
                graphs[0].replay()
            for graph in graphs[1:]:
                graph.replay()
            main.wait_stream(self.side)  # the next step's index waits for both
        else:
            for graph in graphs:
                graph.replay()


def _weights_on(weights: np.ndarray | None, dev):
    """Per-row loss weights (float32) on the training device, or None (every row once)."""
    if weights is None:
        return None
    return _torch().from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(dev)


def _on_device(features: np.ndarray, targets: np.ndarray, dev):
    """The labelled features (float32) and targets, moved to the training device once (not per batch)."""
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(features)).to(dev).float()
    return x, torch.from_numpy(targets.astype(np.int64)).to(dev)


def block_stem(block, x):
    """The output of a residual block's first convolution, BatchNorm and ReLU (torchvision BasicBlock or
    Bottleneck): what ``block_tail`` continues from."""
    return block.relu(block.bn1(block.conv1(x)))


def block_tail(block, stem, x):
    """The rest of a residual block after ``block_stem``: ``block_tail(b, block_stem(b, x), x) == b(x)``."""
    out = block.bn2(block.conv2(stem))
    if hasattr(block, "conv3"):  # Bottleneck
        out = block.bn3(block.conv3(block.relu(out)))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


def _append_epoch(losses: dict[str, list[float]], sums, n: int) -> None:
    """Record an epoch's mean losses from their device-side sums (the epoch's one wait for the GPU)."""
    triplet, cross_entropy = (sums / n).tolist()
    losses["triplet"].append(triplet)
    losses["cross_entropy"].append(cross_entropy)


def _step(optimizer, loss):
    """Take one optimiser step on ``loss`` and return its detached value (still on the device)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _cpu_state(module) -> dict[str, Any]:
    """The module's state as CPU tensors of its own: one copy each (``.cpu().clone()`` copied a GPU's tensors
    twice), and from a GPU all the copies started at once (into pinned memory) and waited for once, not one
    synchronous copy a tensor."""
    values = module.state_dict()
    state = {k: v.detach().to("cpu", copy=True, non_blocking=True) for k, v in values.items()}
    for device in {v.device for v in values.values() if v.is_cuda}:
        _torch().cuda.current_stream(device).synchronize()
    return state


class StemCache(Protocol):
    """Where the one-pass embedding keeps a frozen stem's output (``block_stem``, float16) of every patch."""

    def get(self, start: int, count: int) -> np.ndarray | None:
        """The stem outputs of patches ``start`` .. ``start + count - 1``, or None when they are not cached."""

    def put(self, start: int, rows: np.ndarray) -> None:
        """Cache the stem outputs of patches from ``start`` on."""


def _loaded(make: Callable[[], Any], state: dict[str, Any]):
    """The head ``make()`` builds, holding ``state``, built without random initialisation: every value comes from
    ``state`` (random initialisation of a block's two 512-channel convolutions took about 8 ms each; a round
    builds heads several times)."""
    torch = _torch()
    with torch.device("meta"):
        head = make()
    head = head.to_empty(device="cpu")
    head.load_state_dict(state)
    return head


def pretrained_retrieval(init_state: dict[str, Any]) -> dict[str, Any]:
    """Return the retrieval head's state before any training (the pretrained layer4[1])."""
    return _cpu_state(RetrievalHead(copy.deepcopy(init_state)))


def embed(
    retrieval_state: dict[str, Any],
    init_state: dict[str, Any],
    chunks: Iterable[tuple[int, np.ndarray]],
    n: int,
    device: str,
    stems: StemCache | None = None,
) -> np.ndarray:
    """Embed features (chunks of (start, float16 block)) with a retrieval head: float32 (n, width).

    ``stems``: the cache of this block's stem outputs (a block whose stem is frozen), as in ``embed_and_predict``.
    """
    head = _loaded(lambda: RetrievalHead(init_state), retrieval_state)
    return _run(head, chunks, n, block_width(init_state), device, stems)


def pooled_output(
    retrieval_state: dict[str, Any],
    init_state: dict[str, Any],
    chunks: Iterable[tuple[int, np.ndarray]],
    n: int,
    device: str,
) -> np.ndarray:
    """The pooled output of a retrieval head's block, not normalised: float32 (n, width) (``embed`` before the
    L2 normalisation)."""
    head = _loaded(lambda: RetrievalHead(init_state, normalise=False), retrieval_state)
    return _run(head, chunks, n, block_width(init_state), device)


def predict(
    classifier_state: dict[str, Any],
    init_state: dict[str, Any],
    n_classes: int,
    chunks: Iterable[tuple[int, np.ndarray]],
    n: int,
    device: str,
) -> np.ndarray:
    """Return class probabilities float32 (n, C) of features under a classifier head."""
    torch = _torch()
    head = _loaded(lambda: ClassifierHead(init_state, n_classes), classifier_state)
    logits = _run(head, chunks, n, n_classes, device)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def embed_and_predict(
    model: dict[str, Any],
    init_state: dict[str, Any],
    n_classes: int,
    chunks: Iterable[tuple[int, np.ndarray]],
    n: int,
    device: str,
    stems: StemCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (embeddings (n, width), probabilities (n, C)) of features under a model's two heads.

    One pass over the features; one block evaluation per patch when the heads share their block. With
    ``stems`` (a model whose shared block's stem stayed frozen, ``model["frozen_stem"]``), cached stem outputs
    replace the block's first convolution (half the pass), and those not cached yet are computed and put there.
    """
    torch = _torch()
    dev = torch.device(device)
    classifier = _loaded(lambda: ClassifierHead(init_state, n_classes), model["classifier"]).to(dev).eval()
    retrieval = None
    if not model.get("shared"):
        retrieval = _loaded(lambda: RetrievalHead(init_state), model["retrieval"]).to(dev).eval()
    if stems is not None and not (model.get("shared") and model.get("frozen_stem")):
        raise ValueError("a stem cache needs a model whose shared block's stem is frozen")
    embeddings = np.zeros((n, block_width(init_state)), dtype=np.float32)
    probabilities = np.zeros((n, n_classes), dtype=np.float32)
    with torch.inference_mode():
        for start, block in chunks:
            x = _as_input(block, dev)
            with autocast(dev):
                pooled = classifier.pooled(x, None if stems is None else _stem_of(classifier.block, x, start, stems))
                embedded = retrieval(x) if retrieval is not None else None
            logits = classifier.logits(pooled)
            if embedded is None:
                embedded = torch.nn.functional.normalize(pooled, dim=1)
            end = start + len(block)
            embeddings[start:end] = embedded.float().cpu().numpy()
            probabilities[start:end] = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return embeddings, probabilities


def _stem_of(block, x, start: int, stems: StemCache):
    """The stem outputs of a chunk's patches: from the cache, else computed and cached (float16, as the features;
    a bfloat16 stem output is exact in float16 at magnitudes from 6e-5 to 65504)."""
    cached = stems.get(start, len(x))
    if cached is not None:
        return _as_input(cached, x.device)
    stem = block_stem(block, x)
    stems.put(start, stem.to(_torch().float16).cpu().numpy())
    return stem


def _as_input(block: np.ndarray, dev):
    """Cached float16 features as the block's input: moved as float16, converted by torch (all cores) straight
    to the compute precision, channels-last (a numpy float32 copy took a fifth of the pass).

    To a GPU through pinned memory, filled from the memory-mapped cache by every core (``features.upload``): one
    thread's copy and a copy from pageable memory took 27 ms a block of 2,048 on an H100 machine, a third of a
    round.
    """
    torch = _torch()
    if dev.type == "cuda":
        x = upload(block, dev)
    else:
        x = torch.from_numpy(np.array(block, dtype=np.float16)).to(dev)
    x = x.to(mixed_precision_dtype(dev) or torch.float32)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.contiguous()


def _run(
    head, chunks: Iterable[tuple[int, np.ndarray]], n: int, width: int, device: str, stems: StemCache | None = None
) -> np.ndarray:
    torch = _torch()
    dev = torch.device(device)
    head = head.to(dev).eval()
    out = np.zeros((n, width), dtype=np.float32)
    with torch.inference_mode():
        for start, block in chunks:
            x = _as_input(block, dev)
            with autocast(dev):
                result = head(x, None if stems is None else _stem_of(head.block, x, start, stems))
            out[start : start + len(block)] = result.float().cpu().numpy()
    return out
