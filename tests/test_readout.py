"""The map read out of the pretrained block (wsi_il.readout): what it is fitted to, what shows it, and 'heads'."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_cli_e2e import run

from wsi_il.batch import read_batch
from wsi_il.config import TrainSettings, from_dict
from wsi_il.events import SilentReporter
from wsi_il.heads import QUERY_GROUP_SIZE, pooled_output, pretrained_retrieval
from wsi_il.measure.truth import fill_labels_from_truth
from wsi_il.model import current_predictions, embed_chunk, init_state, load_model, model_state, open_context
from wsi_il.project import Project
from wsi_il.readout import current_map, fit_readout, map_probabilities, readout_weights, shown_path


def _two_rounds(example_slide, tmp_path, *options):
    """The bundled slide after one ingested round of 8 labels; the second batch waits."""
    project = tmp_path / "cmu"
    examples = example_slide.parent
    run("init", project, "--slide", example_slide, "--tile-size", "128", "--weights", "random", "--epochs", "2",
        "--device", "cpu", *options)  # fmt: skip
    run("query", project, "--region", examples / "query.geojson", "-k", "8", "--rounds", "3", "--device", "cpu")
    fill_labels_from_truth(project / "batches" / "s1-r1", examples / "truth.geojson")
    run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")
    return Project(project)


def test_readout_weights_by_hand() -> None:
    # 3 reviewed labels (2 normal = 1, 1 tumour = 0), a 40-patch region (session 0) and a 4-patch one (session 1)
    targets = np.array([1, 1, 0] + [0] * 40 + [0] * 4)
    groups = np.array([-1, -1, -1] + [0] * 40 + [1] * 4)
    weights = readout_weights(targets, groups)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[targets == 0].sum() == pytest.approx(weights[targets == 1].sum())  # the classes weigh the same
    tumour_label, region, small = weights[2], weights[3:43], weights[43:]
    assert region.sum() == pytest.approx(QUERY_GROUP_SIZE * tumour_label)  # a large region: ten labels' worth
    assert small == pytest.approx(np.full(4, tumour_label))  # a small one: each patch a label
    assert len(set(region.round(6))) == 1


def test_map_probabilities_read_the_pooled_output_from_embedding_and_norm() -> None:
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(7, 5)).astype(np.float32) * rng.uniform(0.5, 3, size=(7, 1)).astype(np.float32)
    norms = np.linalg.norm(pooled, axis=1)
    frozen = pooled / norms[:, None]
    readout = {"weight": torch.tensor(rng.normal(size=(3, 5)), dtype=torch.float32), "bias": torch.tensor([0.5, 0, -1])}
    expected = torch.softmax(torch.from_numpy(pooled) @ readout["weight"].T + readout["bias"], dim=1).numpy()
    assert map_probabilities(frozen, norms, readout) == pytest.approx(expected, abs=1e-5)


def test_a_readout_needs_two_kinds_of_label() -> None:
    import torchvision.models as tvm

    init = {k: v.clone() for k, v in tvm.resnet18().layer4[1].state_dict().items()}
    features = np.random.default_rng(1).normal(size=(6, 512, 2, 2)).astype(np.float16)
    groups = np.full(6, -1)
    assert fit_readout(features, np.zeros(6, dtype=np.int64), groups, init, 2, "cpu") is None
    fitted = fit_readout(features, np.array([0, 0, 0, 1, 1, 1]), groups, init, 2, "cpu")
    pooled = pooled_output(pretrained_retrieval(init), init, [(0, features)], 6, "cpu")
    logits = torch.from_numpy(pooled) @ fitted["weight"].T + fitted["bias"]
    assert logits.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]  # six labels in 512 dimensions: fitted


def test_the_map_is_the_readout_of_every_label_and_region(example_slide, tmp_path) -> None:
    project = _two_rounds(example_slide, tmp_path)
    ctx = open_context(project, "cpu", SilentReporter())
    state = model_state(ctx)
    assert state["map"] == state["model"] == "s1-r1" and project.map_path().is_file()
    # the pretrained block's embedding was computed by init, not in the round the expert waits for
    assert project.frozen_norms_path().stat().st_mtime_ns < project.model_path("s1-r1").stat().st_mtime_ns
    readout = load_model(ctx, state["model"])["readout"]
    init = init_state(ctx)
    pooled = pooled_output(
        pretrained_retrieval(init), init, ctx.store.chunks(embed_chunk("cpu")), len(ctx.store), "cpu"
    )
    expected = torch.softmax(torch.from_numpy(pooled) @ readout["weight"].T + readout["bias"], dim=1).numpy()
    shown = np.asarray(current_map(ctx))
    assert shown == pytest.approx(expected, abs=5e-3)  # the frozen embedding is kept in float16
    from wsi_il.readout import project_readout
    from wsi_il.session import training_entries

    features, targets, groups, patches = training_entries(ctx)
    assert (groups == 0).sum() > 0 and (groups == -1).sum() == 8  # the region's patches take part
    assert (patches >= 0).all() and (ctx.store.take(patches) == features).all()  # each row's patch in the database
    again = project_readout(ctx, features, targets, groups, patches)
    assert torch.equal(again["weight"], readout["weight"]) and torch.equal(again["bias"], readout["bias"])
    fresh = fit_readout(features, targets, groups, init, len(ctx.classes), "cpu")  # the block run on the rows
    assert fresh["weight"].numpy() == pytest.approx(readout["weight"].numpy(), abs=0.02)
    assert not np.allclose(shown, current_predictions(ctx), atol=1e-3)  # not the classifier head's predictions

    index = ctx.table.index_of()
    _, patches = read_batch(project.root / "batches" / "s1-r2")
    for patch in patches:  # the next batch suggests what the map says
        row = shown[index[patch.patch_id]]
        assert patch.suggestion == ctx.classes[int(row.argmax())]
        assert patch.suggestion_probability == pytest.approx(float(row.max()), abs=1e-6)
    from wsi_il.export import export_table

    with open(export_table(ctx, tmp_path / "all.csv"), newline="") as handle:
        exported = {r["patch_id"]: r["predicted"] for r in csv.DictReader(handle)}
    assert [exported[pid] for pid in ctx.table.ids] == [ctx.classes[int(i)] for i in shown.argmax(1)]
    assert shown_path(project) == project.map_path()  # the review desk's overlay and suggestions
    assert "map: read out of the pretrained block" in run("status", project.root)


def test_map_from_heads_shows_the_classifier_head(example_slide, tmp_path) -> None:
    project = _two_rounds(example_slide, tmp_path, "--map-from", "heads")
    ctx = open_context(project, "cpu", SilentReporter())
    assert model_state(ctx).get("map") is None and not project.map_path().exists()
    assert load_model(ctx, "s1-r1")["readout"] is None
    predictions = current_predictions(ctx)
    assert np.array_equal(current_map(ctx), predictions)
    index = ctx.table.index_of()
    _, patches = read_batch(project.root / "batches" / "s1-r2")
    assert [p.suggestion_probability for p in patches] == pytest.approx(
        [float(predictions[index[p.patch_id]].max()) for p in patches], abs=1e-6
    )
    assert shown_path(project) == project.predictions_path()
    assert "map: the classifier head's predictions (--map-from heads)" in run("status", project.root)


def test_the_map_setting_new_and_older_projects(example_slide, tmp_path) -> None:
    assert TrainSettings().map_from == "readout"
    assert from_dict(TrainSettings, {"epochs": 3}).map_from == "heads"  # a project made before the setting
    out = run("init", tmp_path / "p", "--slide", example_slide, "--weights", "random", "--map-from", "probe", code=3)
    assert "--map-from 'probe' is not one of readout, heads" in out
