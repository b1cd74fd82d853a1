"""docs/method.md's ablation: all of layer4 trainable, the feature cache after layer3 (``--trainable layer4``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from test_trust_support import cli, error_line

from wsi_il import heads
from wsi_il.config import TrainSettings
from wsi_il.features import Weights, build_resnet, feature_shape, head_block_of, trunk_of
from wsi_il.model import load_tensors
from wsi_il.project import Project

RANDOM = Weights(None, "random", "random", None)


def _randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights, so a wrong wiring shows up."""
    generator = torch.Generator().manual_seed(seed)
    for child in module.modules():
        if isinstance(child, torch.nn.BatchNorm2d):
            n = child.num_features
            child.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            child.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            child.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            child.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def test_split_after_layer3_for_resnet18():
    model = build_resnet(RANDOM, seed=0, arch="resnet18")
    assert feature_shape("resnet18", "layer4") == (256, 14, 14)
    assert feature_shape("resnet50", "layer4") == (1024, 14, 14)
    assert feature_shape("resnet18") == feature_shape("resnet18", "last") == (512, 7, 7)
    trunk, head = trunk_of(model, "layer4"), head_block_of(model, "layer4")
    assert head is model.layer4 and isinstance(head, torch.nn.Sequential)
    assert not any(p.requires_grad for p in trunk.parameters())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cached = trunk(x)
        full = model.layer4(
            model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
        )
        assert tuple(cached.shape[1:]) == (256, 14, 14)
        assert torch.allclose(head(cached), full, atol=1e-5)
        # the paper's split is unchanged: trunk up to layer4[0], the head is layer4[1]
        last = trunk_of(model)(x)
        assert tuple(last.shape[1:]) == (512, 7, 7)
        assert head_block_of(model) is model.layer4[1]
        assert torch.allclose(head_block_of(model)(last), full, atol=1e-5)


@pytest.mark.parametrize(("arch", "channels", "width"), [("resnet18", 256, 512), ("resnet50", 1024, 2048)])
def test_make_block_rebuilds_a_whole_layer4(arch, channels, width):
    torch.manual_seed(0)
    reference = getattr(tvm, arch)(weights=None).layer4
    _randomise_batchnorm(reference)
    reference.eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    assert heads.block_width(state) == width
    rebuilt = heads.make_block(state).eval()
    assert isinstance(rebuilt, torch.nn.Sequential) and len(rebuilt) == len(reference)
    assert rebuilt[0].stride == 2 and rebuilt[0].downsample is not None and rebuilt[1].downsample is None
    x = torch.randn(2, channels, 14, 14, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = rebuilt(x)
        assert tuple(out.shape) == (2, width, 7, 7)
        assert torch.allclose(out, reference(x), atol=1e-5)
    # a single last block still round-trips as before
    last = {k: v.clone() for k, v in reference[-1].state_dict().items()}
    assert heads.block_width(last) == width
    y = torch.randn(2, width, 7, 7, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(heads.make_block(last).eval()(y), reference[-1](y), atol=1e-5)


@pytest.mark.parametrize("schedule", ["paper", "fast"])
def test_heads_train_and_predict_on_layer3_features(schedule):
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in tvm.resnet18(weights=None).layer4.state_dict().items()}
    rng = np.random.default_rng(0)
    n = 12
    targets = np.arange(n) % 2
    features = (rng.random((n, 256, 14, 14)) + targets[:, None, None, None] * 0.5).astype(np.float16)
    trained = heads.train_heads(features, targets, init, 2, TrainSettings(epochs=3, schedule=schedule), "cpu")
    assert trained.schedule == schedule and 1 <= len(trained.losses["triplet"]) <= 3
    assert all(np.isfinite(trained.losses["cross_entropy"]))
    chunks = [(0, features[:5]), (5, features[5:])]
    probabilities = heads.predict(trained.classifier, init, 2, chunks, n, "cpu")
    assert probabilities.shape == (n, 2) and np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    embeddings = heads.embed(trained.retrieval, init, chunks, n, "cpu")
    assert embeddings.shape == (n, 512) and np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)


def test_cli_init_status_and_query_with_layer4(example_slide, tmp_path):
    project = tmp_path / "l4"
    cli(
        "init",
        project,
        "--slide",
        example_slide,
        "--weights",
        "random",
        "--device",
        "cpu",
        "--trainable",
        "layer4",
        "--tile-size",
        "256",
        "--epochs",
        "2",
    )
    manifest = json.loads((project / "project.json").read_text())
    assert manifest["features"]["trainable"] == "layer4"
    info = json.loads(cli("status", project, "--json").output)
    assert info["trainable"] == "layer4"
    assert "trainable: layer4" in cli("status", project).output
    proj = Project(project)
    slide_id = manifest["slides"][0]["id"]
    features = np.load(proj.features_path(slide_id), mmap_mode="r")
    assert features.shape == (manifest["slides"][0]["n_patches"], 256, 14, 14) and len(features) > 0
    init = load_tensors(proj.init_model_path())
    assert "0.downsample.0.weight" in init and "1.conv2.weight" in init
    # a session runs on the 14 x 14 cache with the whole-layer4 heads
    examples = example_slide.parent
    cli("query", project, "--region", examples / "query.geojson", "-k", "4", "--rounds", "1", "--device", "cpu")

    refused = cli("init", project, "--slide", example_slide, "--trainable", "last", "--device", "cpu", code=None)
    assert refused.exit_code != 0
    line = error_line(refused)
    assert "--trainable layer4" in line and "--trainable last" in line, line
    assert json.loads((project / "project.json").read_text())["features"]["trainable"] == "layer4"
    # the recorded value (and no value) resumes
    assert "resuming" in cli("init", project, "--trainable", "layer4", "--device", "cpu").output


def test_projects_without_the_setting_read_as_last():
    from wsi_il.cli import _same_setting
    from wsi_il.config import FeatureSettings, from_dict, settings_of

    assert from_dict(FeatureSettings, {"arch": "resnet18", "weights": "random"}).trainable == "last"
    stored = settings_of({"features": {"arch": "resnet18", "weights": "random"}}).features.trainable  # as init reads it
    assert _same_setting("trainable", "last", stored, {})
    assert not _same_setting("trainable", "layer4", stored, {})


def test_unknown_trainable_is_refused(example_slide, tmp_path):
    refused = cli(
        "init",
        tmp_path / "bad",
        "--slide",
        example_slide,
        "--weights",
        "random",
        "--trainable",
        "layer3",
        "--device",
        "cpu",
        code=None,
    )
    assert refused.exit_code != 0
    line = error_line(refused)
    assert "layer3" in line and not (tmp_path / "bad").exists()
