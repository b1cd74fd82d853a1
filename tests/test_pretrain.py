"""Self-supervised pretraining, re-extraction with new weights, and other ResNet backbones."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_trust_support import cli, error_line
from typer.testing import CliRunner

from wsi_il import pretrain as pretrain_module
from wsi_il.cli import app
from wsi_il.events import SilentReporter
from wsi_il.pretrain import DurationEstimate, PretrainSettings, checkpoint_path, pretrain
from wsi_il.project import Project

runner = CliRunner()


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def small_project(block_slide, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre") / "p"
    run(
        "init",
        root,
        "--slide",
        block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    return root


def _copy(project: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(project, target)
    return target


SMALL = PretrainSettings(steps=12, batch=16, crop_px=64, checkpoint_every=4, lr=1e-3, method="simclr")
"""SimCLR: its loss falls from the start (MoCo's rises while real keys replace its random queue)."""


def test_pretraining_lowers_the_loss_and_changes_the_features(small_project, block_slide, tmp_path):
    project = _copy(small_project, tmp_path)
    result = pretrain(Project(project), SMALL, "cpu", tmp_path / "w.pt")
    assert result.steps == 12 and len(result.losses) == 12
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("fc.") or k.startswith("projection") for k in state)
    # the weights load back, as a new project and into this one
    before = np.load(project / "slides" / "block" / "features.npy")
    run("reextract", project, "--weights", tmp_path / "w.pt", "--device", "cpu")
    after = np.load(project / "slides" / "block" / "features.npy")
    assert after.shape == before.shape and not np.array_equal(after, before)
    status = json.loads(run("status", project, "--json"))
    assert status["weights"]["kind"] == "file" and status["weights"]["sha256"]
    run(
        "init",
        tmp_path / "new",
        "--slide",
        block_slide.path,
        "--weights",
        tmp_path / "w.pt",
        "--tile-size",
        "256",
        "--device",
        "cpu",
    )
    fresh = np.load(tmp_path / "new" / "slides" / "block" / "features.npy")
    assert np.array_equal(fresh, after)  # same weights, same tiles, same normalisation -> same features


def test_moco_trains_the_query_encoder_and_fills_its_queue(small_project, tmp_path):
    project = _copy(small_project, tmp_path)
    settings = PretrainSettings(steps=6, batch=8, crop_px=64, checkpoint_every=3, method="moco", moco_queue=40)
    before = np.load(project / "slides" / "block" / "features.npy")
    result = pretrain(Project(project), settings, "cpu", tmp_path / "w.pt")
    assert result.steps == 6 and np.isfinite(result.losses).all()
    saved = torch.load(checkpoint_path(Project(project)), weights_only=True)
    assert saved["settings"]["method"] == "moco"  # not SimCLR under another name
    model = saved["model"]
    assert model["queue"].shape == (40, 128) and int(model["queue_ptr"]) == (6 * 2 * 8) % 40
    assert torch.allclose(model["queue"].norm(dim=1), torch.ones(40))
    # the key encoder followed the query encoder without being it
    query, key = model["query.backbone.conv1.weight"], model["key.backbone.conv1.weight"]
    assert not torch.equal(query, key)
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(state["conv1.weight"], query) and not any(k.startswith(("fc.", "projection")) for k in state)
    run("reextract", project, "--weights", tmp_path / "w.pt", "--device", "cpu")
    after = np.load(project / "slides" / "block" / "features.npy")
    assert after.shape == before.shape and not np.array_equal(after, before)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_an_interrupted_run_resumes_to_the_same_weights(small_project, tmp_path, method):
    settings = PretrainSettings(steps=6, batch=8, crop_px=64, checkpoint_every=2, method=method)
    if method == "moco":
        settings = replace(settings, moco_queue=32)
    whole = _copy(small_project, tmp_path / "a")
    pretrain(Project(whole), settings, "cpu", tmp_path / "whole.pt")
    broken = _copy(small_project, tmp_path / "b")

    class StopAt3(SilentReporter):  # a kill at the end of step 3
        def task(self, description: str, total: int, unit: str = "patches"):
            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                if done[0] == 3:
                    raise KeyboardInterrupt

            return advance

    with pytest.raises(KeyboardInterrupt):
        pretrain(Project(broken), settings, "cpu", tmp_path / "resumed.pt", StopAt3())
    if method == "simclr":  # a checkpoint from before --method resumes as the SimCLR run it was
        path = checkpoint_path(Project(broken))
        saved = torch.load(path, weights_only=True)
        for name in ("method", "moco_momentum", "moco_queue"):
            del saved["settings"][name]
        torch.save(saved, path)
    result = pretrain(Project(broken), settings, "cpu", tmp_path / "resumed.pt")
    assert result.resumed_from == 2  # the last checkpoint before the interruption
    a = torch.load(tmp_path / "whole.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    for other in (replace(settings, batch=16), replace(settings, method="moco" if method == "simclr" else "simclr")):
        with pytest.raises(Exception, match="other settings"):
            pretrain(Project(broken), other, "cpu", tmp_path / "x.pt")


def test_the_duration_estimate_leaves_out_slow_first_steps(small_project, tmp_path, monkeypatch):
    """The first step takes 10 s more than the others (as CUDA's warm-up does on a GPU): the estimate follows
    the steady steps after it. Timing the first two steps announced about 3 times the H100 run's real duration.
    The pretraining clock is a fake one that only the steps move, so that a busy test machine cannot move it."""
    project = _copy(small_project, tmp_path)
    settings = PretrainSettings(steps=12, batch=4, crop_px=32, checkpoint_every=100, method="simclr")
    real_step = pretrain_module._train_step
    clock = [0.0]

    def slow_first_step(*args, **kwargs):
        clock[0] += 10.5 if clock[0] == 0 else 0.5
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "_train_step", slow_first_step)
    monkeypatch.setattr(pretrain_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    done: list[int] = []
    estimates: list[tuple[int, float]] = []
    real_estimate = pretrain_module.DurationEstimate

    def recorded(first, total, report, started):  # the seconds the estimate reports, with the step it came at
        return real_estimate(
            first, total, lambda s, revised=False: (estimates.append((done[-1], s)), report(s)), started
        )

    class Steps(SilentReporter):
        def task(self, description: str, total: int, unit: str = "patches"):
            return lambda n: done.append((done[-1] if done else 0) + n)

    monkeypatch.setattr(pretrain_module, "DurationEstimate", recorded)
    reporter = Steps()
    result = pretrain(Project(project), settings, "cpu", tmp_path / "w.pt", reporter)
    assert result.steps == 12 and result.seconds == pytest.approx(10.5 + 11 * 0.5)
    # the latest report of a 12-step run is after 2 warm-up + 3 steady steps: 7 steps of 0.5 s left
    # (the first two steps' mean said 10 steps of 5.5 s: 55 s)
    assert estimates == [(5, pytest.approx(7 * 0.5))]
    assert reporter.messages == ["expected duration: about 4 s more"] and done[-1] == 12


def test_the_duration_estimate_waits_for_a_window_and_reports_once():
    reports: list[float] = []

    def run_clock(first: int, total: int, step_seconds: list[float]) -> list[tuple[int, float]]:
        """Feed the estimate steps of the given durations; return (step, seconds) of each report."""
        reports.clear()
        seen = []
        estimate = DurationEstimate(first, total, reports.append, 0.0)
        now = 0.0
        for step, duration in zip(range(first + 1, total + 1), step_seconds, strict=True):
            now += duration
            estimate.step_done(step, now)
            seen += [(step, r) for r in reports[len(seen) :]]
        estimate.finish()
        return seen + [(total, r) for r in reports[len(seen) :]]

    # 500 steps of 0.5 s after a 10 s first step: reported after 2 s of steady steps (step 6), 494 steps left
    assert run_clock(0, 500, [10.0] + [0.5] * 499) == [(6, pytest.approx(0.5 * 494))]
    # fast steps: at least 3 steady steps and 2 s of them (18 = 2 + 16), but no later than 10% of the run (50)
    assert run_clock(0, 500, [10.0] + [0.125] * 499) == [(18, pytest.approx(0.125 * 482))]
    assert run_clock(0, 500, [10.0] + [0.015625] * 499) == [(50, pytest.approx(0.015625 * 450))]
    # a resumed run counts its warm-up from where it resumed
    assert run_clock(400, 500, [10.0] + [1.0] * 99) == [(405, pytest.approx(1.0 * 95))]
    # short runs: reported before the last step, from what there is; no step to do: nothing left
    assert run_clock(0, 5, [10.0] + [0.25] * 4) == [(4, pytest.approx(0.25 * 1))]
    assert run_clock(0, 3, [1.0, 2.0, 3.0]) == [(2, pytest.approx(1.5 * 1))]
    assert run_clock(0, 2, [1.0, 2.0]) == [(1, pytest.approx(1.0 * 1))]
    assert run_clock(0, 1, [1.0]) == [(1, 0.0)]
    assert run_clock(7, 7, []) == [(7, 0.0)]
    DurationEstimate(0, 1, None, 0.0).step_done(1, 1.0)  # no callback: nothing to do


def test_an_unknown_method_is_refused_in_one_line(small_project):
    line = error_line(cli("pretrain", small_project, "--method", "byol", "--device", "cpu", code=3))
    assert "--method 'byol'" in line and "simclr or moco" in line


def test_reextract_keeps_labels_and_retrains(block_slide, tmp_path):
    from wsi_il.measure.truth import fill_labels_from_truth

    project = tmp_path / "p"
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "256",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    x0, y0, _, _ = block_slide.tumour.bounds
    region = tmp_path / "q.geojson"
    region.write_text(
        json.dumps(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x0 + 512, y0], [x0 + 512, y0 + 512], [x0, y0 + 512], [x0, y0]]],
                },
                "properties": {},
            }
        )
    )
    run("query", project, "--region", region, "-k", "4", "--rounds", "2", "--device", "cpu")
    fill_labels_from_truth(project / "batches" / "s1-r1", block_slide.truth_path)
    run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")
    ledger = (project / "labels.jsonl").read_bytes()
    torch.manual_seed(5)
    from torchvision.models import resnet18

    weights = tmp_path / "other.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18().state_dict().items()}}, weights)
    run("reextract", project, "--weights", weights, "--device", "cpu")
    assert (project / "labels.jsonl").read_bytes() == ledger
    assert (project / "models" / "reextract-1.pt").is_file()
    state = json.loads((project / "state" / "state.json").read_text())
    assert state["model"] == "reextract-1"
    # the open session goes on with the new features
    fill_labels_from_truth(project / "batches" / "s1-r2", block_slide.truth_path)
    run("ingest", project, project / "batches" / "s1-r2" / "labels.csv", "--device", "cpu")
    run("export", project, "--out", tmp_path / "mask.geojson")
    run("reextract", project, "--weights", weights, code=3)  # already these weights


@pytest.mark.parametrize(("arch", "channels"), [("resnet34", 512), ("resnet50", 2048)])
def test_other_backbones_run_the_loop(block_slide, tmp_path, arch, channels):
    from wsi_il.measure.truth import fill_labels_from_truth

    project = tmp_path / arch
    run(
        "init",
        project,
        "--slide",
        block_slide.path,
        "--tile-size",
        "512",
        "--arch",
        arch,
        "--weights",
        "random",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    features = np.load(project / "slides" / "block" / "features.npy", mmap_mode="r")
    assert features.shape[1:] == (channels, 7, 7)
    x0, y0, _, _ = block_slide.tumour.bounds
    run("query", project, "--patch", f"block_x{int(x0)}_y{int(y0)}", "-k", "3", "--rounds", "1", "--device", "cpu")
    fill_labels_from_truth(project / "batches" / "s1-r1", block_slide.truth_path)
    run("ingest", project, project / "batches" / "s1-r1" / "labels.csv", "--device", "cpu")


def test_weights_files_name_their_architecture(block_slide, tmp_path):
    from torchvision.models import resnet34

    weights = tmp_path / "r34.pt"
    torch.save({f"backbone.{k}": v for k, v in resnet34().state_dict().items()}, weights)  # a timm/lab-style dict
    run(
        "init",
        tmp_path / "p",
        "--slide",
        block_slide.path,
        "--tile-size",
        "512",
        "--weights",
        weights,
        "--device",
        "cpu",
    )
    manifest = json.loads((tmp_path / "p" / "project.json").read_text())
    assert manifest["features"]["arch"] == "resnet34" and manifest["features"]["weights_sha256"]
    out = run("init", tmp_path / "q", "--slide", block_slide.path, "--weights", weights, "--arch", "resnet18", code=3)
    assert "looks like a resnet34" in out and not (tmp_path / "q").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_pretrain_and_extract_on_cuda(small_project, tmp_path, method):
    project = _copy(small_project, tmp_path)
    settings = PretrainSettings(steps=4, batch=32, crop_px=128, method=method, moco_queue=256)
    result = pretrain(Project(project), settings, "cuda", tmp_path / "w.pt")
    assert np.isfinite(result.losses).all()
    run("reextract", project, "--weights", tmp_path / "w.pt", "--device", "cuda")
    cuda = np.load(project / "slides" / "block" / "features.npy")
    run(
        "init",
        tmp_path / "cpu",
        "--slide",
        json.loads((project / "project.json").read_text())["slides"][0]["path"],
        "--tile-size",
        "256",
        "--weights",
        tmp_path / "w.pt",
        "--device",
        "cpu",
    )
    cpu = np.load(tmp_path / "cpu" / "slides" / "block" / "features.npy")
    assert np.abs(cuda.astype(np.float32) - cpu.astype(np.float32)).mean() < 0.05 * np.abs(cpu).mean()
