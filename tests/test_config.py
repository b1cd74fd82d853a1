"""The project's settings have one owner: a manifest is built from the dataclasses and read back typed, an older
project's missing settings reading as the values they had before they existed."""

from __future__ import annotations

import json

from wsi_il.config import FeatureSettings, TilingSettings, TrainSettings, new_manifest, settings_of


def test_a_new_manifest_reads_back_as_the_settings_it_was_built_from():
    tiling = TilingSettings(tile_size_px=224, target_mpp=0.5, normalisation_sample=64)
    features = FeatureSettings(arch="resnet34", weights="random", seed=3, trainable="layer4")
    train = TrainSettings(epochs=7, lr=3e-4, schedule="fast", balance="none", head_init="fit")
    manifest = json.loads(json.dumps(new_manifest(["Tumor", "Normal"], tiling, features, train)))  # as saved
    read = settings_of(manifest)
    assert (read.tiling, read.features, read.train) == (tiling, features, train)
    assert manifest["classes"] == ["Tumor", "Normal"] and manifest["slides"] == []
    assert manifest["normalisation"] is None


def test_a_manifest_written_before_a_setting_existed_reads_as_that_setting_behaved_then():
    manifest = {
        "tiling": {"tile_size_px": 256},
        "features": {"arch": "resnet18", "weights": "imagenet"},
        "train": {"epochs": 50, "lr": 1e-4, "margin": 0.2, "future_setting": 1},
    }
    read = settings_of(manifest)
    assert read.train.schedule == "paper" and read.train.balance == "none" and read.train.head_init == "random"
    assert read.train.fast_frozen_conv1 is False and read.tiling.normalisation_sample == 0
    assert read.features.trainable == "last" and read.features.seed == 0


def test_a_new_project_takes_todays_defaults_not_the_legacy_ones():
    read = settings_of(new_manifest(["a", "b"]))
    assert read.train == TrainSettings() and read.tiling == TilingSettings() and read.features == FeatureSettings()
