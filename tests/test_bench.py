"""``wsi-il bench`` end to end on a small built slide, and the mirrored tiling that makes its large slides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openslide")


def test_mirrored_tiling_repeats_the_small_slide_and_its_truth(dense_pcam, tmp_path):
    import openslide

    from wsi_il.measure.mosaic import make_island_slide, write_mirrored_tiling
    from wsi_il.qupath import read_region

    tumour, normal = dense_pcam
    small = make_island_slide(tmp_path / "small.tiff", tumour, normal, size_px=(1024, 1024), seed=3, piece_px=96)
    big = write_mirrored_tiling(tmp_path / "big.tiff", small, copies=2)
    with openslide.OpenSlide(str(small.path)) as a, openslide.OpenSlide(str(big.path)) as b:
        assert b.dimensions == (2048, 2048) and b.level_count == a.level_count
        original = np.asarray(a.read_region((0, 0), 0, (1024, 1024)).convert("RGB"), dtype=np.int16)
        right = np.asarray(b.read_region((1024, 0), 0, (1024, 1024)).convert("RGB"), dtype=np.int16)
        below = np.asarray(b.read_region((0, 1024), 0, (1024, 1024)).convert("RGB"), dtype=np.int16)
        # JPEG re-encoding moves pixels a little; a mirror image matches, an unmirrored one does not
        assert np.abs(right - original[:, ::-1]).mean() < 6 < np.abs(right - original).mean()
        assert np.abs(below - original[::-1]).mean() < 6 < np.abs(below - original).mean()
    truth, _ = read_region(big.truth_path)
    assert truth.is_valid and truth.area == pytest.approx(4 * small.tumour.area, rel=1e-6)


@pytest.mark.parametrize("paper", ["--no-paper", pytest.param("--paper", marks=pytest.mark.slow)])
def test_bench_measures_every_stage_and_writes_json(bench_slide, tmp_path, monkeypatch, paper):
    from typer.testing import CliRunner

    from wsi_il.cli import app

    monkeypatch.setenv("COLUMNS", "160")
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--slide",
            str(bench_slide.path),
            "--truth",
            str(bench_slide.truth_path),
            "--labels",
            "40",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "bench.json"),
            "--device",
            "cpu",
            paper,
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in (
        "extract_patches_per_s",
        "trunk_limit_patches_per_s",
        "extract_ratio_to_limit",
        "round_seconds",
        "round_seconds_paper_settings",
        "export_seconds",
        "peak_rss_mb",
        "bytes_per_patch",
        "device",
    ):
        assert key in figures, key
    assert figures["device"] == "cpu" and figures["patches"] >= 100
    assert figures["extract_ratio_to_limit"] == pytest.approx(
        figures["extract_patches_per_s"] / figures["trunk_limit_patches_per_s"]
    )
    assert 0 < figures["extract_ratio_to_limit"] < 2 and figures["naive_patches_per_s"] > 0
    assert figures["read_limit_patches_per_s"] > 0 and figures["round_seconds_next"] > 0
    assert figures["round_schedule"] == "fast" and figures["round_labels"] == 40
    assert 0 < figures["round_train_seconds"] < figures["round_seconds"]
    for phases, seconds in (
        (figures["round_phases"], figures["round_seconds"]),
        (figures["round_phases_next"], figures["round_seconds_next"]),
    ):
        assert set(phases) == {"train", "pass", "batch", "rest"} and min(phases["pass"], phases["batch"]) > 0
        assert sum(phases.values()) == pytest.approx(seconds, abs=0.01) and phases["rest"] >= 0
    assert set(figures["extract_timeline"]) >= {"tissue statistics"}
    starts = [times[0] for times in figures["extract_timeline"].values()]
    assert all(0 <= s <= f <= e for s, f, e in figures["extract_timeline"].values()) and starts == sorted(starts)
    assert (
        figures["round_frozen_conv1"]
        and 0 < figures["round_train_seconds_full_block"] < figures["round_seconds_full_block"]
    )
    assert figures["stem_cache_bytes_per_patch"] == pytest.approx(figures["bytes_per_patch"], rel=0.01)
    if paper == "--paper":
        assert figures["round_seconds_paper_settings"] > 0 and figures["round_ratio_paper_to_default"] > 0
    else:
        assert figures["round_seconds_paper_settings"] is None
    assert 0 < figures["export_seconds"] and 0 < figures["export_synthetic_seconds"]
    # fp16 512 x 7 x 7 per patch plus one .npy header per slide
    assert 512 * 49 * 2 <= figures["bytes_per_patch"] < 512 * 49 * 2 + 200
    assert 100 < figures["peak_rss_mb"] < 8000
    assert "extraction, end to end" in result.output and "round at 40 labels" in result.output
    mask = out / "export" / "mask.geojson"
    assert json.loads(mask.read_text())["type"] == "FeatureCollection"
    assert Path(figures["slide"]) == bench_slide.path


@pytest.mark.extra_data
def test_bench_builds_its_slide_from_the_bach_sample(shared_data, tmp_path):
    from typer.testing import CliRunner

    from wsi_il.cli import app

    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--patches",
            "120",
            "--labels",
            "40",
            "--out",
            str(tmp_path / "b"),
            "--data",
            str(shared_data),
            "--json",
            str(tmp_path / "bench.json"),
            "--device",
            "cpu",
            "--no-paper",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert Path(figures["slide"]).is_file() and Path(figures["slide"]).parent == tmp_path / "b"
    assert figures["patches"] >= 100 and figures["round_seconds"] > 0


def test_bench_refuses_a_round_larger_than_the_slide_in_one_line(bench_slide, tmp_path):
    from typer.testing import CliRunner

    from wsi_il.cli import app

    result = CliRunner().invoke(
        app,
        ["bench", "--slide", str(bench_slide.path), "--labels", "250", "--out", str(tmp_path / "b"), "--device", "cpu"],
    )
    assert result.exit_code == 3, result.output
    assert "too few for a round at 250 labels" in result.output and "--labels" in result.output
    assert "Traceback" not in result.output


def test_gpu_sampler_says_why_it_has_no_utilisation(monkeypatch):
    """Without NVML the sampler takes no sample and keeps the reason (bench turns it into a note)."""
    import torch

    from wsi_il.measure.bench import _GpuSampler

    def no_nvml(device=None):
        raise ModuleNotFoundError("No module named 'pynvml'")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    sampler = _GpuSampler("cuda")
    with sampler:
        sampler._thread.join(timeout=2)  # the first failed sample ends the thread
    assert sampler.mean() is None and sampler.error == "ModuleNotFoundError: No module named 'pynvml'"
    assert _GpuSampler("cpu").error is None and not _GpuSampler("cpu").enabled
