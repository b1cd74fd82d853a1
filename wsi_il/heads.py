"""The two trainable heads on cached trunk features (METHOD.md "Two trainable heads").

- retrieval head: layer4[1] + global average pooling -> 512-d, L2-normalised; batch-hard triplet loss.
- classifier head: layer4[1] + GAP + linear -> C logits; cross-entropy.

(For ResNet-18; other backbones use their own last block of layer4, and its width.)

Targets are class indices; a binary "no" in a project of more than two classes is stored as
``-(c + 1)`` ("not class c"): it is a negative for class c in the triplet loss and is trained with
-log(1 - p_c) in the classifier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_il.config import TrainSettings


def _torch():  # type: ignore[no-untyped-def]
    import torch

    return torch


def make_block(init_state: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Return a fresh residual block shaped like ``init_state`` (Basic or Bottleneck) loaded with it."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if "conv3.weight" in init_state:
        width = int(init_state["conv3.weight"].shape[0])
        block = Bottleneck(width, width // Bottleneck.expansion)
    else:
        width = int(init_state["conv1.weight"].shape[0])
        block = BasicBlock(width, width)
    block.load_state_dict(init_state)
    return block


def block_width(init_state: dict[str, Any]) -> int:
    """Output channels of the block (the embedding size)."""
    key = "conv3.weight" if "conv3.weight" in init_state else "conv2.weight"
    return int(init_state[key].shape[0])


class RetrievalHead(_torch().nn.Module):  # type: ignore[misc]
    """layer4[1] + global average pooling, L2-normalised."""

    def __init__(self, init_state: dict[str, Any]) -> None:
        super().__init__()
        self.block = make_block(init_state)

    def forward(self, x):  # type: ignore[no-untyped-def]
        pooled = self.block(x).mean(dim=(2, 3))
        return _torch().nn.functional.normalize(pooled, dim=1)


class ClassifierHead(_torch().nn.Module):  # type: ignore[misc]
    """layer4[1] + global average pooling + a linear layer."""

    def __init__(self, init_state: dict[str, Any], n_classes: int) -> None:
        super().__init__()
        self.block = make_block(init_state)
        self.fc = _torch().nn.Linear(block_width(init_state), n_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc(self.block(x).mean(dim=(2, 3)))


def _freeze_batchnorm(module) -> None:  # type: ignore[no-untyped-def]
    """Keep BatchNorm statistics fixed: review batches are far too small to estimate them."""
    for child in module.modules():
        if isinstance(child, _torch().nn.BatchNorm2d):
            child.eval()


def triplet_masks(targets):  # type: ignore[no-untyped-def]
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


def batch_hard_triplet_loss(embeddings, targets, margin: float):  # type: ignore[no-untyped-def]
    """Batch-hard triplet loss: per anchor, its farthest positive against its closest negative."""
    torch = _torch()
    dist = torch.cdist(embeddings, embeddings)
    same, different = triplet_masks(targets)
    valid = same.any(1) & different.any(1)
    if not valid.any():
        return embeddings.new_zeros(())  # no valid triplet: nothing to learn from
    hardest_pos = torch.where(same, dist, torch.zeros_like(dist)).max(1).values
    hardest_neg = torch.where(different, dist, torch.full_like(dist, float("inf"))).min(1).values
    return torch.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def classifier_loss(logits, targets):  # type: ignore[no-untyped-def]
    """Cross-entropy for class targets, -log(1 - p_c) for "not class c" targets."""
    torch = _torch()
    known = targets >= 0
    loss = logits.new_zeros(())
    if known.any():
        loss = loss + torch.nn.functional.cross_entropy(logits[known], targets[known], reduction="sum")
    if (~known).any():
        log_p = torch.log_softmax(logits[~known], dim=1)
        p_c = log_p.gather(1, (-targets[~known] - 1).view(-1, 1)).exp().clamp(max=1 - 1e-6)
        loss = loss - torch.log1p(-p_c).sum()
    return loss / len(targets)


@dataclass
class TrainedHeads:
    """Both heads after a round of training, as CPU state dicts."""

    retrieval: dict[str, Any]
    classifier: dict[str, Any]
    n_classes: int
    losses: dict[str, list[float]]


def train_heads(features: np.ndarray, targets: np.ndarray, init_state: dict[str, Any], n_classes: int,
                settings: TrainSettings, device: str, start: TrainedHeads | None = None,
                on_epoch: Callable[[int], None] | None = None) -> TrainedHeads:
    """Train the retrieval and classifier heads on labelled features (float16 (n, C, 7, 7)).

    ``on_epoch(1)`` is called after every epoch (a progress advance).
    """
    torch = _torch()
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    dev = torch.device(device)
    x_all = torch.from_numpy(np.ascontiguousarray(features)).float()
    y_all = torch.from_numpy(targets.astype(np.int64))
    retrieval = RetrievalHead(init_state)
    classifier = ClassifierHead(init_state, n_classes)
    if start is not None:
        retrieval.load_state_dict(start.retrieval)
        classifier.load_state_dict(start.classifier)
    retrieval.to(dev).train()
    classifier.to(dev).train()
    _freeze_batchnorm(retrieval)
    _freeze_batchnorm(classifier)
    opt_r = torch.optim.Adam(retrieval.parameters(), lr=settings.lr)
    opt_c = torch.optim.Adam(classifier.parameters(), lr=settings.lr)
    losses: dict[str, list[float]] = {"triplet": [], "cross_entropy": []}
    for _ in range(settings.epochs):
        order = torch.randperm(len(y_all), generator=generator)
        sums = [0.0, 0.0]
        for batch in order.split(settings.batch_size):
            x, y = x_all[batch].to(dev), y_all[batch].to(dev)
            sums[0] += _step(opt_r, batch_hard_triplet_loss(retrieval(x), y, settings.margin)) * len(batch)
            sums[1] += _step(opt_c, classifier_loss(classifier(x), y)) * len(batch)
        losses["triplet"].append(sums[0] / len(y_all))
        losses["cross_entropy"].append(sums[1] / len(y_all))
        if on_epoch:
            on_epoch(1)
    return TrainedHeads(_cpu_state(retrieval), _cpu_state(classifier), n_classes, losses)


def _step(optimizer, loss) -> float:  # type: ignore[no-untyped-def]
    """Take one optimiser step on ``loss`` (skipped when no triplet was valid) and return its value."""
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _cpu_state(module) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def pretrained_retrieval(init_state: dict[str, Any]) -> dict[str, Any]:
    """Return the retrieval head's state before any training (the pretrained layer4[1])."""
    return _cpu_state(RetrievalHead(copy.deepcopy(init_state)))


def embed(retrieval_state: dict[str, Any], init_state: dict[str, Any], chunks: Iterable[tuple[int, np.ndarray]],
          n: int, device: str) -> np.ndarray:
    """Embed features (chunks of (start, float16 block)) with a retrieval head: float32 (n, width)."""
    head = RetrievalHead(init_state)
    head.load_state_dict(retrieval_state)
    return _run(head, chunks, n, block_width(init_state), device)


def predict(classifier_state: dict[str, Any], init_state: dict[str, Any], n_classes: int,
            chunks: Iterable[tuple[int, np.ndarray]], n: int, device: str) -> np.ndarray:
    """Return class probabilities float32 (n, C) of features under a classifier head."""
    torch = _torch()
    head = ClassifierHead(init_state, n_classes)
    head.load_state_dict(classifier_state)
    logits = _run(head, chunks, n, n_classes, device)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def _run(head, chunks: Iterable[tuple[int, np.ndarray]], n: int, width: int, device: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    torch = _torch()
    dev = torch.device(device)
    head = head.to(dev).eval()
    out = np.zeros((n, width), dtype=np.float32)
    with torch.inference_mode():
        for start, block in chunks:
            x = torch.from_numpy(np.array(block, dtype=np.float32)).to(dev)
            out[start:start + len(block)] = head(x).float().cpu().numpy()
    return out
