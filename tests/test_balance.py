"""Class-balanced training (TrainSettings.balance): weights by hand, weighted losses, older projects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from wsi_il import heads
from wsi_il.config import TrainSettings, from_dict, to_dict


def test_training_selection_by_hand() -> None:
    # 4 reviewed labels (3 normal = 1, 1 tumour = 0), then a 40-patch query region of tumour (session 0) and a
    # one-patch query (session 1)
    targets = np.array([1, 1, 1, 0] + [0] * 40 + [0])
    groups = np.array([-1, -1, -1, -1] + [0] * 40 + [1])
    rows, weights = heads.training_selection(targets, groups, "none")
    assert rows.tolist() == list(range(45)) and weights is None  # the paper: every row once
    rows, weights = heads.training_selection(targets, groups, "classes", seed=3)
    cap = heads.QUERY_GROUP_SIZE
    assert rows[:4].tolist() == [0, 1, 2, 3] and 44 in rows  # every reviewed label, the small query whole
    region = rows[(rows >= 4) & (rows < 44)]
    assert len(region) == cap and len(set(region)) == cap  # at most `cap` patches of the region
    assert len(rows) == 4 + cap + 1 and weights is not None and weights.mean() == pytest.approx(1.0)
    chosen = targets[rows]
    assert weights[chosen == 0].sum() == pytest.approx(weights[chosen == 1].sum())  # the classes weigh the same
    again, _ = heads.training_selection(targets, groups, "classes", seed=3)
    assert again.tolist() == rows.tolist()  # a rerun trains on the same rows
    more, _ = heads.training_selection(np.append(targets, 1), np.append(groups, -1), "classes", seed=3)
    assert set(more[(more >= 4) & (more < 44)]) != set(region)  # new labels, a new draw of the region
    with pytest.raises(ValueError, match="balance"):
        heads.training_selection(targets, groups, "equal")


def test_training_weights_balance_every_target_value() -> None:
    weights = heads.training_weights(np.array([0, 1, 2, -1, 2]))
    assert weights.sum() == pytest.approx(5) and weights[2] == pytest.approx(weights[4])  # "not class 0" too
    assert weights[0] == pytest.approx(2 * weights[2])


def test_weighted_losses_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 0, -2])  # the last: "not class 1"
    per_row = torch.stack(
        [
            -torch.log_softmax(logits[0], 0)[0],
            -torch.log_softmax(logits[1], 0)[0],
            -torch.log1p(-torch.softmax(logits[2], 0)[1]),
        ]
    )
    weights = torch.tensor([0.5, 2.0, 0.5])
    assert heads.classifier_loss(logits, targets, weights).item() == pytest.approx((per_row * weights).sum() / 3)
    assert heads.classifier_loss(logits, targets, torch.ones(3)).item() == pytest.approx(
        heads.classifier_loss(logits, targets).item()
    )
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
    rows, weights = heads.training_selection(targets, np.array([-1] * 3 + [0] * 6 + [-1] * 3), "classes")
    trained = heads.train_heads(
        features[rows], targets[rows], init, 2, TrainSettings(epochs=2, schedule=schedule), "cpu", weights=weights
    )
    assert len(trained.losses["cross_entropy"]) == 2 and all(np.isfinite(trained.losses["cross_entropy"]))


def test_projects_written_before_the_balance_setting_count_every_label_once() -> None:
    old = to_dict(TrainSettings())
    del old["balance"]
    assert from_dict(TrainSettings, old).balance == "none"
    assert from_dict(TrainSettings, to_dict(TrainSettings())).balance == "classes" == TrainSettings().balance


def test_init_records_balance_and_refuses_an_unknown_one(example_slide, tmp_path):
    import json

    from test_cli_e2e import run

    project = tmp_path / "p"
    out = run(
        "init",
        project,
        "--slide",
        example_slide,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--balance",
        "bogus",
        "--device",
        "cpu",
        code=3,
    )
    assert "--balance 'bogus' is not one of classes, none" in out
    run(
        "init",
        project,
        "--slide",
        example_slide,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--balance",
        "none",
        "--device",
        "cpu",
    )
    assert json.loads((project / "project.json").read_text())["train"]["balance"] == "none"
    out = run("init", project, "--balance", "classes", code=4)  # another setting needs a new project
    assert "--balance none" in out


def _block_and_rows(n_per_class: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    init = {k: v.clone() for k, v in tvm.resnet18(weights=None).layer4.state_dict().items()}
    rng = np.random.default_rng(seed)
    targets = np.array([0] * n_per_class + [1] * n_per_class)
    features = (rng.random((2 * n_per_class, 256, 14, 14)) + targets[:, None, None, None] * 0.3).astype(np.float16)
    return init, features, targets


def test_fit_linear_separates_the_labels_on_the_blocks_output() -> None:
    init, features, targets = _block_and_rows()
    head = heads.ClassifierHead(init, 2).eval()
    x = torch.from_numpy(features).float()
    y = torch.from_numpy(targets)
    with torch.no_grad():
        before = head(x).argmax(1)
    heads.fit_linear(head, x, None, y, None, 2)
    with torch.no_grad():
        after = head(x).argmax(1)
    assert (after == y).all() and not (before == y).all()  # torch's random layer did not; the fitted one does
    not_one = torch.tensor([-2] * 8 + [1] * 8)  # "not class 1" for the first rows: they end on class 0
    heads.fit_linear(head, x, None, not_one, None, 2)
    with torch.no_grad():
        assert (head(x).argmax(1)[:8] == 0).all() and (head(x).argmax(1)[8:] == 1).all()


@pytest.mark.parametrize("schedule", ["paper", "fast"])
def test_a_refitted_round_ends_with_the_labels_fitted(schedule: str) -> None:
    init, features, targets = _block_and_rows(seed=1)
    settings = TrainSettings(epochs=3, schedule=schedule, head_init="refit", fast_frozen_conv1=False)
    trained = heads.train_heads(features, targets, init, 2, settings, "cpu")
    _, probs = heads.embed_and_predict(trained.model(), init, 2, [(0, features)], len(features), "cpu")
    assert (probs.argmax(1) == targets).all()


def test_projects_written_before_the_head_init_setting_start_from_a_random_layer() -> None:
    old = to_dict(TrainSettings())
    del old["head_init"]
    assert from_dict(TrainSettings, old).head_init == "random"


def test_fit_linear_leaves_the_layer_alone_with_one_kind_of_label() -> None:
    init, features, _ = _block_and_rows()
    head = heads.ClassifierHead(init, 2).eval()
    before = {k: v.clone() for k, v in head.fc.state_dict().items()}
    x = torch.from_numpy(features[:1]).float()
    heads.fit_linear(head, x, None, torch.tensor([0]), None, 2)  # a single label: nothing to separate
    assert all(torch.equal(before[k], v) for k, v in head.fc.state_dict().items())
    settings = TrainSettings(epochs=2, schedule="fast", head_init="refit", fast_frozen_conv1=False)
    trained = heads.train_heads(features[:3], np.array([1, 1, 1]), init, 2, settings, "cpu")  # one class
    assert all(np.isfinite(trained.losses["cross_entropy"]))
