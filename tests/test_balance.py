"""Class-balanced training (TrainSettings.balance): weights by hand, weighted losses, older projects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from wsi_il import heads
from wsi_il.config import TrainSettings, from_dict, to_dict


def test_training_weights_by_hand() -> None:
    # 4 reviewed labels (3 normal = 1, 1 tumour = 0), then a 40-patch query region of tumour (session 0)
    targets = np.array([1, 1, 1, 0] + [0] * 40)
    groups = np.array([-1, -1, -1, -1] + [0] * 40)
    assert heads.training_weights(targets, groups, "none") is None
    w = heads.training_weights(targets, groups, "classes")
    assert w.mean() == pytest.approx(1.0)
    assert w[targets == 0].sum() == pytest.approx(w[targets == 1].sum())  # the classes weigh the same
    cap = heads.QUERY_GROUP_WEIGHT
    assert w[4:].sum() / w[3] == pytest.approx(cap)  # the region weighs as `cap` reviewed tumour labels
    assert np.allclose(w[4:], w[4])
    small = heads.training_weights(np.array([1, 0, 0]), np.array([-1, -1, 0]), "classes")
    assert small[1] == pytest.approx(small[2])  # a one-patch query counts as one label
    multi = heads.training_weights(np.array([0, 1, 2, -1, 2]), np.full(5, -1), "classes")
    assert multi.sum() == pytest.approx(5) and multi[2] == pytest.approx(multi[4])  # "not class 0" is a group too
    with pytest.raises(ValueError, match="balance"):
        heads.training_weights(targets, groups, "equal")


def test_weighted_losses_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 0, -2])  # the last: "not class 1"
    per_row = torch.stack([-torch.log_softmax(logits[0], 0)[0], -torch.log_softmax(logits[1], 0)[0],
                           -torch.log1p(-torch.softmax(logits[2], 0)[1])])
    weights = torch.tensor([0.5, 2.0, 0.5])
    assert heads.classifier_loss(logits, targets, weights).item() == pytest.approx((per_row * weights).sum() / 3)
    assert heads.classifier_loss(logits, targets, torch.ones(3)).item() == pytest.approx(
        heads.classifier_loss(logits, targets).item())
    embeddings = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    plain = heads.batch_hard_triplet_loss(embeddings, y, 0.5)
    assert heads.batch_hard_triplet_loss(embeddings, y, 0.5, torch.ones(6)).item() == pytest.approx(plain.item())
    only_first = torch.tensor([1.0, 0, 0, 0, 0, 0])
    dist = torch.cdist(embeddings, embeddings)[0]
    expected = torch.relu(dist[1:3].max() - dist[3:].min() + 0.5)
    assert heads.batch_hard_triplet_loss(embeddings, y, 0.5, only_first).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("schedule", ["paper", "fast"])
def test_heads_train_with_weights(schedule: str) -> None:
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in tvm.resnet18(weights=None).layer4.state_dict().items()}
    rng = np.random.default_rng(0)
    targets = np.array([0] * 9 + [1] * 3)
    features = (rng.random((12, 256, 14, 14)) + targets[:, None, None, None] * 0.5).astype(np.float16)
    weights = heads.training_weights(targets, np.array([-1] * 3 + [0] * 6 + [-1] * 3), "classes")
    trained = heads.train_heads(features, targets, init, 2, TrainSettings(epochs=2, schedule=schedule), "cpu",
                                weights=weights)
    assert len(trained.losses["cross_entropy"]) == 2 and all(np.isfinite(trained.losses["cross_entropy"]))


def test_projects_written_before_the_balance_setting_count_every_label_once() -> None:
    old = to_dict(TrainSettings())
    del old["balance"]
    assert from_dict(TrainSettings, old).balance == "none"
    assert from_dict(TrainSettings, to_dict(TrainSettings())).balance == "classes" == TrainSettings().balance
