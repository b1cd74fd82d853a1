"""CUDA code paths: both training schedules, one-pass embedding, the bench (skipped without a GPU).

Run on a GPU machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_il.config import TrainSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _shifted_features(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    targets = np.arange(n) % 2
    features = np.maximum(rng.normal(0.0, 1.0, (n, 512, 7, 7)), 0.0)
    features[targets == 0, :256] += 0.25
    features[targets == 1, 256:] += 0.25
    return features.astype(np.float16), targets


class _MemoryStems:
    """A stem cache in memory (``heads.StemCache``)."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}
        self.puts = 0

    def get(self, start: int, count: int) -> np.ndarray | None:
        rows = self.rows.get(start)
        return None if rows is None or len(rows) != count else rows

    def put(self, start: int, rows: np.ndarray) -> None:
        self.rows[start] = rows
        self.puts += 1


@pytest.mark.parametrize(("schedule", "frozen"), [("paper", False), ("fast", False), ("fast", True)])
def test_heads_train_and_predict_on_cuda_as_on_cpu(schedule, frozen):
    from torchvision.models import resnet18

    from wsi_il.heads import embed_and_predict, train_heads

    torch.manual_seed(0)
    init = resnet18().layer4[1].state_dict()
    features, targets = _shifted_features()
    settings = TrainSettings(epochs=20, schedule=schedule, fast_frozen_conv1=frozen)
    heads = train_heads(features, targets, init, 2, settings, "cuda")
    assert heads.frozen_stem == frozen
    embeddings, probs = embed_and_predict(heads.model(), init, 2, [(0, features)], len(features), "cuda")
    assert (probs.argmax(1) == targets).mean() > 0.9
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-3)
    _, cpu_probs = embed_and_predict(heads.model(), init, 2, [(0, features)], len(features), "cpu")
    assert np.abs(probs - cpu_probs).max() < 0.05  # bf16 on both sides: agreement to its precision
    if frozen:  # the stem cache on the GPU: filled by one pass, read by the next, the same predictions
        stems, chunks = _MemoryStems(), [(0, features[:40]), (40, features[40:])]
        for _ in range(2):
            _, cached = embed_and_predict(heads.model(), init, 2, chunks, len(features), "cuda", stems)
            assert stems.puts == 2 and np.abs(cached - probs).max() < 0.02  # the second pass only read


@pytest.mark.parametrize(("schedule", "frozen"), [("paper", False), ("fast", False), ("fast", True)])
@pytest.mark.parametrize("few", [False, True])
def test_graphed_training_steps_train_as_eager_ones(schedule, frozen, few):
    """Each training step one captured CUDA graph (the default on CUDA, here captured without a warning): the
    same losses and weights as step-by-step training, over both captured batch sizes (64 and the epoch's last
    22), "not class 0" targets and, with ``few`` class-1 rows, batches with no triplet (no retrieval step)."""
    import warnings

    from torchvision.models import resnet18

    from wsi_il.heads import train_heads

    torch.manual_seed(0)
    init = resnet18().layer4[1].state_dict()
    features, targets = _shifted_features(150)
    targets[::5] = -1
    if few:
        targets[:] = 0
        targets[:3] = 1
    settings = TrainSettings(epochs=3, schedule=schedule, fast_frozen_conv1=frozen)
    eager = train_heads(features, targets, init, 2, settings, "cuda", early_stopping=False, graphs=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = train_heads(features, targets, init, 2, settings, "cuda", early_stopping=False)
    assert not [w for w in caught if "graph" in str(w.message) or "capturable" in str(w.message)], [
        str(w.message) for w in caught
    ]  # a failed capture warns and falls back: here it must not
    for key in ("triplet", "cross_entropy"):
        np.testing.assert_allclose(graphed.losses[key], eager.losses[key], rtol=2e-3, atol=1e-4)
    for state in ("retrieval", "classifier"):
        for name, value in getattr(eager, state).items():
            other = getattr(graphed, state)[name]
            assert torch.allclose(other.float(), value.float(), rtol=1e-2, atol=2e-3), (state, name)


@pytest.mark.parametrize("schedule", ["paper", "fast"])
def test_training_waits_for_the_gpu_once_an_epoch_not_every_step(schedule):
    """A wait per step stops the host from queueing ahead: eager PyTorch's per-operation cost would set a
    round's pace (docs/speed.md, "GPU")."""
    import warnings

    from torchvision.models import resnet18

    from wsi_il.heads import train_heads

    init = resnet18().layer4[1].state_dict()
    features, targets = _shifted_features(512)  # 8 steps an epoch at the default batch of 64

    def waits(epochs: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_heads(
                    features,
                    targets,
                    init,
                    2,
                    TrainSettings(epochs=epochs, schedule=schedule),
                    "cuda",
                    early_stopping=False,
                )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert waits(4) - waits(1) <= 3 * 3  # three more epochs: at most 3 waits each, not one or more a step (24)


def test_bench_on_cuda(bench_slide, tmp_path):
    from typer.testing import CliRunner

    from wsi_il.cli import app

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
            str(tmp_path / "b"),
            "--json",
            str(tmp_path / "b.json"),
            "--device",
            "cuda",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["device"] == "cuda" and figures["round_schedule"] == "paper"
    assert figures["extract_patches_per_s"] > 0 and figures["trunk_limit_patches_per_s"] > 0
    assert figures["round_seconds_paper_settings"] > 0


def test_extraction_on_cuda_resizes_picks_and_returns_features_as_on_cpu():
    """Raw 256 px tiles resized on the GPU (float kernel, rounded), the kept rows picked out there, the features
    copied back asynchronously: the same features as the CPU path within bfloat16's precision."""
    from wsi_il.features import FeatureExtractor, build_resnet, resize_batch, resolve_weights

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (6, 256, 256, 3), dtype=np.uint8)
    tiles[:, 64:192] //= 2  # structure, not only noise
    pixels = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    on_cpu = resize_batch(pixels, 224)
    on_gpu = resize_batch(pixels.cuda(), 224).cpu()
    assert on_gpu.dtype == torch.uint8 and (on_gpu.int() - on_cpu.int()).abs().max() <= 1

    model = build_resnet(resolve_weights("random"), 0)
    cpu = FeatureExtractor(model, [0.7, 0.5, 0.7], [0.15, 0.2, 0.15], "cpu")
    gpu = FeatureExtractor(build_resnet(resolve_weights("random"), 0), [0.7, 0.5, 0.7], [0.15, 0.2, 0.15], "cuda")
    keep = np.array([True, False, True, True, False, True])
    pending = [gpu.submit(tiles, keep), gpu.submit(tiles)]  # two in flight, collected in order
    picked, whole = (p.result() for p in pending)
    assert picked.dtype == np.float16 and picked.shape == (4, 512, 7, 7) and whole.shape == (6, 512, 7, 7)
    gap = np.abs(picked.astype(np.float32) - whole[keep].astype(np.float32))  # other batch sizes: other kernels
    assert gap.mean() < 0.01 * np.abs(whole.astype(np.float32)).mean()
    expected = cpu(tiles, keep).astype(np.float32)
    assert np.abs(picked.astype(np.float32) - expected).mean() < 0.05 * np.abs(expected).mean()


def test_graphed_extraction_gives_the_eager_features(monkeypatch):
    """The trunk captured as a CUDA graph (``warm_up``): the eager path's features for full batches, picked rows
    too, several batches in flight, the normalisation set after the capture taking effect; other shapes eager."""
    from wsi_il.features import FeatureExtractor, build_resnet, resolve_weights

    def extractor():
        made = FeatureExtractor(build_resnet(resolve_weights("random"), 0), [0.0] * 3, [1.0] * 3, "cuda")
        made.warm_up(8, 256)
        made.normalise_with([0.7, 0.5, 0.7], [0.15, 0.2, 0.15])
        return made

    graphed = extractor()
    monkeypatch.setenv("WSI_IL_CUDA_GRAPHS", "0")
    eager = extractor()
    assert graphed.graph is not None and eager.graph is None
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8) for _ in range(3)]
    keep = np.array([True, False, True, True, True, False, True, True])
    pending = [graphed.submit(tiles, k) for tiles, k in zip(batches, [None, keep, None], strict=True)]
    results = [p.result() for p in pending]
    for tiles, k, got in zip(batches, [None, keep, None], results, strict=True):
        expected = eager(tiles) if k is None else eager(tiles)[k]  # the graph computes every row, as eager here
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=1e-3)
    partial = batches[0][:5]  # not the graph's shape: eager
    np.testing.assert_array_equal(graphed(partial), eager(partial))


def test_a_rehearsal_on_cuda_writes_nothing_and_the_round_after_it_runs(block_slide, tmp_path):
    """The watcher's warm-up on a GPU (graphs captured, discarded), then a round on the same process's GPU."""
    from test_watch import _files, _fill, _waiting_project

    from wsi_il.events import SilentReporter
    from wsi_il.model import open_context
    from wsi_il.project import Project
    from wsi_il.session import ingest, rehearse

    root = _waiting_project(block_slide, tmp_path, device="cuda")
    project, batch = Project(root), root / "batches" / "s1-r1"
    before = _files(root)
    assert rehearse(open_context(project, "cuda", SilentReporter()), batch) > 0
    assert _files(root) == before
    _fill(batch, block_slide.truth_path)
    result = ingest(open_context(project, "cuda", SilentReporter()), batch / "labels.csv")
    assert result.batch_dir is not None and np.isfinite(np.load(project.predictions_path())).all()
