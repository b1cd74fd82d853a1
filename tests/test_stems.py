"""The frozen stem's cache: complete or absent, never half; stale when its key changes."""

from __future__ import annotations

import numpy as np

from wsi_il.project import Project
from wsi_il.stems import ProjectStems


def _fill(stems: ProjectStems, rows: np.ndarray, chunk: int = 3) -> None:
    for start in range(0, len(rows), chunk):
        assert stems.get(start, chunk) is None
        stems.put(start, rows[start : start + chunk])


def test_a_cache_is_read_only_when_complete_and_for_its_own_key(tmp_path):
    project = Project(tmp_path / "p")
    rows = np.random.default_rng(0).random((7, 4, 2, 2)).astype(np.float16)
    stems = ProjectStems(project, "key-a", 7, (4, 2, 2))
    assert not stems.complete
    _fill(stems, rows)
    assert not ProjectStems(project, "key-a", 7, (4, 2, 2)).complete  # a pass not finished (killed) counts for nothing
    stems.finish()
    assert stems.complete and np.array_equal(stems.get(3, 3), rows[3:6])
    again = ProjectStems(project, "key-a", 7, (4, 2, 2))
    assert again.complete and np.array_equal(again.get(0, 7), rows)
    assert not ProjectStems(project, "key-b", 7, (4, 2, 2)).complete  # other weights or feature files
    assert not ProjectStems(project, "key-a", 8, (4, 2, 2)).complete  # a slide added since
    rebuilt = ProjectStems(project, "key-b", 7, (4, 2, 2))
    _fill(rebuilt, rows[::-1].copy())
    assert not ProjectStems(project, "key-a", 7, (4, 2, 2)).complete  # the old cache went stale at the first write
    rebuilt.finish()
    assert np.array_equal(ProjectStems(project, "key-b", 7, (4, 2, 2)).get(0, 7), rows[::-1])
    assert sorted(p.name for p in project.stems_path().parent.iterdir()) == ["stems.json", "stems.npy"]
    project.stems_meta_path().write_text("{not json")  # a damaged key: rebuilt, not an error
    assert not ProjectStems(project, "key-b", 7, (4, 2, 2)).complete


def test_the_key_follows_the_stem_weights_and_the_feature_files(tmp_path):
    import torch

    from wsi_il.stems import stem_key

    class Slide:
        id, tiled, n_patches = "s", True, 5

    class FakeProject(Project):
        def slides(self, manifest):
            return [Slide()]

    project = FakeProject(tmp_path / "p")
    project.features_path("s").parent.mkdir(parents=True)
    np.save(project.features_path("s"), np.zeros((5, 4, 2, 2), np.float16))
    state = {
        "block.conv1.weight": torch.ones(4, 4, 3, 3),
        "block.bn1.bias": torch.zeros(4),
        "block.conv2.weight": torch.ones(4, 4, 3, 3),
        "fc.weight": torch.ones(2, 4),
    }
    key = stem_key(state, project, {})
    assert (
        stem_key({**state, "block.conv2.weight": torch.zeros(4, 4, 3, 3), "fc.weight": torch.zeros(2, 4)}, project, {})
        == key
    )  # the trained rest does not matter
    assert stem_key({**state, "block.bn1.bias": torch.ones(4)}, project, {}) != key
    np.save(project.features_path("s"), np.ones((5, 4, 2, 2), np.float16))  # reextract writes a new file
    assert stem_key(state, project, {}) != key
