"""timm backbones offline: weights from a file, a snapshot folder or a fake local hub cache; the model's own
preprocessing; both vision-transformer splits, exact and through the whole loop on the real CMU slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from wsi_il import backbones  # noqa: E402
from wsi_il.cli import app  # noqa: E402
from wsi_il.errors import InputError, WeightsError  # noqa: E402
from wsi_il.heads import block_width, make_block  # noqa: E402
from wsi_il.measure.truth import fill_labels_from_truth  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SLIDE = EXAMPLES / "CMU-1-Small-Region.svs"
VIT = "vit_small_patch16_224"
VIT_ARGS = {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 64}
"""A ViT-S/16 made small: two blocks of width 48 at 64 px (16 patch tokens and the class token)."""
HUB_CFG = {
    "input_size": [3, 64, 64],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}
runner = CliRunner()


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def small_vit(seed: int = 1):
    torch.manual_seed(seed)
    return timm.create_model(VIT, num_classes=0, **VIT_ARGS).eval()


def fake_hub(cache: Path, repo: str, model, config: dict) -> Path:
    """Write a model into a hub cache laid out as huggingface_hub's (refs/main -> snapshots/REV/)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(snapshot.name)
    (snapshot / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {"architecture": VIT, "num_classes": 0, "model_args": VIT_ARGS, "pretrained_cfg": HUB_CFG}
    fake_hub(cache, "lab/tiny-vit", small_vit(), config)
    return cache


def test_file_snapshot_and_hub_cache_load_the_same_weights(tmp_path, hub):
    model = small_vit()
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    choices = [
        backbones.choose_timm(str(tmp_path / "vit.safetensors"), VIT, VIT_ARGS),
        backbones.choose_timm(str(tmp_path / "vit.pt"), VIT, VIT_ARGS),
        backbones.choose_timm("hf-hub:lab/tiny-vit", None, {}),
    ]
    snapshot = choices[2].weights_file.parent
    choices.append(backbones.choose_timm(str(snapshot), None, {}))
    assert choices[2].recorded == "hf-hub:lab/tiny-vit" and choices[3].recorded == str(snapshot.resolve())
    tiles = torch.rand(2, 3, 64, 64)
    expected = model(tiles)
    for choice in choices:
        built = backbones.build_timm(choice.arch, choice.args, backbones.weights_of(choice), seed=7)
        assert torch.equal(built(tiles), expected), choice.recorded


def test_preprocessing_comes_from_the_model_config(hub, tmp_path):
    from_hub = backbones.choose_timm("hf-hub:lab/tiny-vit", None, {})
    prep = backbones.preprocessing_of(
        backbones.build_timm(from_hub.arch, from_hub.args, backbones.weights_of(from_hub), 0)
    )
    assert prep == backbones.Preprocessing(64, HUB_CFG["mean"], HUB_CFG["std"], "bilinear")
    # without a config: timm's own for the architecture (ViT-S/16 augreg: 0.5 mean and std, bicubic)
    plain = backbones.build_timm(VIT, VIT_ARGS, backbones.weights_of(backbones.choose_timm("random", VIT, VIT_ARGS)), 0)
    assert backbones.preprocessing_of(plain) == backbones.Preprocessing(64, [0.5] * 3, [0.5] * 3, "bicubic")


def test_an_older_single_object_hub_config_gives_the_preprocessing_too(hub):
    fake_hub(hub, "lab/legacy-vit", small_vit(), {"architecture": VIT, "model_args": VIT_ARGS, **HUB_CFG})
    choice = backbones.choose_timm("hf-hub:lab/legacy-vit", None, {})
    model = backbones.build_timm(choice.arch, choice.args, backbones.weights_of(choice), 0)
    assert backbones.preprocessing_of(model) == backbones.Preprocessing(64, HUB_CFG["mean"], HUB_CFG["std"], "bilinear")


def test_a_known_pathology_model_tiles_at_the_resolution_it_was_trained_at(hub, tmp_path):
    name = "bioptimus/H0-mini"  # a tiny stand-in under the name of a model trained at 0.5 µm/px
    fake_hub(hub, name, small_vit(), {"architecture": VIT, "model_args": VIT_ARGS, "pretrained_cfg": HUB_CFG})
    assert backbones.KNOWN_MPP[name] == 0.5
    out = run("init", tmp_path / "p", "--slide", SLIDE, "--weights", f"hf-hub:{name}", "--device", "cpu")
    assert "64 px at 0.5 µm/px (32 µm)" in out  # the model's input side, at its resolution
    status = json.loads(run("status", tmp_path / "p", "--json"))
    assert status["settings"]["tiling"]["target_mpp"] == 0.5 and status["slides"][0]["tile_um"] == 32


def test_a_hub_id_missing_from_the_cache_is_refused_with_where_to_put_it(hub):
    with pytest.raises(WeightsError) as err:
        backbones.choose_timm("hf-hub:MahmoodLab/UNI", None, {})
    text = str(err.value)
    assert "not in the local hub cache" in text and str(hub) in text and "models--MahmoodLab--UNI" in text
    assert "nothing is downloaded" in text


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    save_file(small_vit().state_dict(), str(tmp_path / "vit.safetensors"))
    choice = backbones.choose_timm(str(tmp_path / "vit.safetensors"), VIT, {**VIT_ARGS, "depth": 3})
    with pytest.raises(WeightsError, match="1 missing keys|missing keys") as err:
        backbones.build_timm(choice.arch, choice.args, backbones.weights_of(choice), 0)
    assert "blocks.2." in str(err.value)
    with pytest.raises(WeightsError, match="without its configuration"):
        backbones.choose_timm(str(tmp_path / "vit.safetensors"), None, {})
    with pytest.raises(WeightsError, match="neither resnet18/34/50 nor a timm architecture"):
        backbones.choose_timm("random", "vit_no_such_model", {})


REGISTERS = {**VIT_ARGS, "reg_tokens": 4, "no_embed_class": True, "global_pool": "avg", "init_values": 1e-5}
"""Register tokens, layer scale, and pooling by the mean of the patch tokens (the prefix tokens left out)."""


@pytest.mark.parametrize("trainable,args", [("embedding", VIT_ARGS), ("last", VIT_ARGS), ("last", REGISTERS)])
def test_trunk_and_trainable_part_compose_to_the_model(trainable, args):
    model = backbones.build_timm(VIT, args, backbones.weights_of(backbones.choose_timm("random", VIT, args)), seed=3)
    tiles = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        whole = model(tiles)
        cached = backbones.trunk_of(model, trainable)(tiles)
        tail = backbones.init_tail(model, trainable)
        rebuilt = make_block({k: v.clone() for k, v in tail.state_dict().items()})  # as the heads rebuild it
        assert torch.allclose(tail(cached), whole, atol=1e-5) and torch.allclose(rebuilt(cached), whole, atol=1e-5)
    shape = backbones.trunk_output_shape(backbones.trunk_of(model, trainable), 64)
    tokens = (64 // 16) ** 2 + model.num_prefix_tokens
    assert shape == ((48,) if trainable == "embedding" else (tokens, 48))
    assert backbones.bytes_per_patch(shape) == (48 * 2 if trainable == "embedding" else tokens * 48 * 2)
    assert block_width(tail.state_dict()) == 48


def test_a_convnext_is_used_through_its_embedding_only(tmp_path):
    torch.manual_seed(0)
    convnext = timm.create_model("convnext_atto", num_classes=0).eval()
    save_file(convnext.state_dict(), str(tmp_path / "convnext.safetensors"))
    choice = backbones.choose_timm(str(tmp_path / "convnext.safetensors"), "convnext_atto", {})
    model = backbones.build_timm(choice.arch, choice.args, backbones.weights_of(choice), 0)
    prep = backbones.preprocessing_of(model)
    assert prep.input_px == 224 and prep.mean == pytest.approx([0.485, 0.456, 0.406])
    tiles = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbones.trunk_of(model, "embedding")(tiles), convnext(tiles))
    with pytest.raises(InputError, match="needs a timm VisionTransformer"):
        backbones.trunk_of(model, "last")


def test_a_store_that_would_not_fit_the_disk_is_refused_with_the_figure(tmp_path):
    backbones.check_store_fits(tmp_path, 1000, (17, 48), "last")
    with pytest.raises(InputError) as err:
        backbones.check_store_fits(tmp_path, 10**12, (197, 1024), "last")
    text = str(err.value)
    assert "403.5 kB" in text and "1,000,000,000,000 patches" in text and "--trainable embedding" in text


def _loop(project: Path, tmp_path: Path, *init_args: object) -> dict:
    out = run(
        "init",
        project,
        "--slide",
        SLIDE,
        "--classes",
        "Tumor,Normal",
        "--mpp",
        "0.5",
        "--tile-size",
        "224",
        "--epochs",
        "3",
        "--device",
        "cpu",
        *init_args,
    )
    assert "224 px at 0.5 µm/px (112 µm)" in out
    run(
        "query",
        project,
        "--region",
        EXAMPLES / "query.geojson",
        "--label",
        "Tumor",
        "-k",
        "6",
        "--rounds",
        "2",
        "--device",
        "cpu",
    )
    fill_labels_from_truth(project / "batches" / "s1-r1", EXAMPLES / "truth.geojson", (0.0, 0.0))
    assert "recorded" in run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")
    run("export", project, "--out", tmp_path / f"{project.name}.geojson")
    exported = json.loads((tmp_path / f"{project.name}.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in exported["features"]} <= {"Tumor", "Normal"}
    return json.loads(run("status", project, "--json"))


def test_both_vit_splits_run_the_whole_loop_offline(tmp_path, hub):
    save_file(small_vit().state_dict(), str(tmp_path / "vit.safetensors"))
    by_file = _loop(
        tmp_path / "last",
        tmp_path,
        "--weights",
        tmp_path / "vit.safetensors",
        "--arch",
        VIT,
        "--arch-args",
        json.dumps(VIT_ARGS),
        "--trainable",
        "last",
    )
    by_hub = _loop(tmp_path / "embedding", tmp_path, "--weights", "hf-hub:lab/tiny-vit")
    assert by_file["backbone"]["trainable"] == "last" and by_hub["backbone"]["trainable"] == "embedding"
    assert by_file["backbone"]["bytes_per_patch"] == 17 * 48 * 2 and by_hub["backbone"]["bytes_per_patch"] == 96
    assert by_hub["backbone"]["mean"] == HUB_CFG["mean"] and by_hub["backbone"]["interpolation"] == "bilinear"
    assert by_hub["weights"]["source"] == "hf-hub:lab/tiny-vit"
    for status in (by_file, by_hub):
        assert status["n_labels"] == 6 and status["model"]
        assert status["slides"][0]["tile_um"] == pytest.approx(112.0)
    features = np.load(tmp_path / "last" / "slides" / by_file["slides"][0]["id"] / "features.npy", mmap_mode="r")
    assert features.shape[1:] == (17, 48)
    # the same hub id resumes; a hub id that is not cached is refused before anything is written
    run("init", tmp_path / "embedding", "--weights", "hf-hub:lab/tiny-vit")
    out = run("init", tmp_path / "absent", "--slide", SLIDE, "--weights", "hf-hub:MahmoodLab/UNI", code=3)
    assert "not in the local hub cache" in out and not (tmp_path / "absent").exists()


def test_bench_measures_each_backbone_under_each_split(tmp_path, hub):
    out = run(
        "bench",
        "--slide",
        SLIDE,
        "--backbone",
        f"{VIT}:{json.dumps(VIT_ARGS)}",
        "--backbones-only",
        "--device",
        "cpu",
        "--out",
        tmp_path / "work",
        "--json",
        tmp_path / "bench.json",
    )
    assert "bench.backbones.json" in out
    results = json.loads((tmp_path / "bench.backbones.json").read_text())
    assert [(r["arch"], r["trainable"]) for r in results] == [(VIT, "embedding"), (VIT, "last")]
    assert [r["bytes_per_patch"] for r in results] == [96, 17 * 48 * 2]
    for r in results:
        assert r["patches"] > 0 and r["extract_patches_per_s"] > 0 and r["trunk_limit_patches_per_s"] > 0
        assert r["extract_cpu_seconds"] > 0


def test_layer_classes_are_named_in_json_and_a_pooling_is_required(tmp_path):
    # UNI2-h / Virchow2 style: SwiGLU MLP, SiLU, register tokens, no class-token position, no pooling
    args = {
        **VIT_ARGS,
        "mlp_layer": "SwiGLUPacked",
        "act_layer": "silu",
        "mlp_ratio": 5.3375,
        "reg_tokens": 4,
        "no_embed_class": True,
        "global_pool": "",
    }
    choice = backbones.choose_timm("random", VIT, args)
    weights = backbones.weights_of(choice)
    with pytest.raises(InputError, match="pools nothing"):
        backbones.timm_feature_settings(choice, weights, "embedding", 32, 0)
    pooled = backbones.choose_timm("random", VIT, {**args, "global_pool": "token"})
    settings = backbones.timm_feature_settings(pooled, backbones.weights_of(pooled), "last", 32, 0)
    assert settings.feature_shape == [16 + 1 + 4, 48]  # patch, class and register tokens enter the last block
    model = backbones.build_timm(pooled.arch, pooled.args, backbones.weights_of(pooled), 0)
    assert type(model.blocks[0].mlp).__name__ == "GluMlp"
    with pytest.raises(WeightsError, match="names no timm layer"):
        backbones.create(VIT, {**VIT_ARGS, "mlp_layer": "NoSuchMlp"})
