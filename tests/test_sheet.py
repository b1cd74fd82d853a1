"""The contact sheet: each patch inside its context, its full id, the model's suggestion shown honestly; written
through the round's own batch writing on the bundled real slide."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFont

from wsi_il.batch import UNCERTAIN_BELOW, BatchPatch, read_batch, suggestion_certainty
from wsi_il.sheet import sheet_layout, suggestion_text, wrap_text

LONG_ID = "TCGA-A2-A0T2-01Z-00-DX1.70C8C0AB-5C8E-4A8B-9D1C-31F3A9E1A2B4_x{x}_y{y}"


@pytest.mark.parametrize("text", [
    "CMU-1-Small-Region_x1408_y1536", LONG_ID.format(x=104448, y=55296), "a", "",
    "no_separators_at_all_but_a_very_long_run_of_characters" * 3, "with spaces and_under-scores.and.dots",
])  # fmt: skip
@pytest.mark.parametrize("width_px", [40, 120, 372])
def test_wrap_text_keeps_every_character_and_fits(text: str, width_px: int) -> None:
    font = ImageFont.load_default(size=14)
    lines = wrap_text(text, font, width_px)
    assert "".join(lines) == text
    assert all(font.getlength(line.rstrip()) <= width_px for line in lines)


def test_wrap_text_breaks_after_separators_where_it_can() -> None:
    font = ImageFont.load_default(size=14)
    text = "CMU-1-Small-Region_x1408_y1536"
    assert wrap_text(text, font, 1000) == [text]
    assert wrap_text(text, font, int(font.getlength("CMU-1-Small-Region_x1408_")) + 1) == [
        "CMU-1-Small-Region_x1408_",
        "y1536",
    ]
    assert wrap_text(text, font, int(font.getlength("CMU-1-Small-Region_x14"))) == [
        "CMU-1-Small-Region_",
        "x1408_y1536",
    ]
    assert wrap_text(text, font, int(font.getlength("Region_x1408_"))) == ["CMU-1-Small-", "Region_x1408_", "y1536"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(min_codepoint=32, max_codepoint=0x24F), max_size=90), width_px=st.integers(20, 400))
def test_wrap_text_never_cuts_anything(text: str, width_px: int) -> None:
    font = ImageFont.load_default(size=12)
    lines = wrap_text(text, font, width_px)
    assert "".join(lines) == text
    assert all(font.getlength(line.rstrip()) <= width_px or len(line.rstrip()) <= 1 for line in lines)


def test_uncertain_suggestions_are_written_as_such() -> None:
    def patch(probability: float | None, suggestion: str | None = "Tumor") -> BatchPatch:
        return BatchPatch("p", "s", 0, 0, 8, 8, suggestion, probability)

    assert suggestion_text(patch(0.51)) == "model uncertain: Tumor? 0.51"
    assert suggestion_text(patch(0.93)) == "model: Tumor 0.93"
    assert suggestion_text(patch(UNCERTAIN_BELOW)) == "model: Tumor 0.75"
    assert suggestion_text(patch(0.9987)) == "model: Tumor >0.99"  # never a rounded certainty
    assert suggestion_text(patch(None, None)) == ""
    assert [suggestion_certainty(patch(p)) for p in (0.51, 0.7499, 0.75, 0.99)] == [
        "uncertain",
        "uncertain",
        "confident",
        "confident",
    ]
    assert suggestion_certainty(patch(None, None)) == ""


def _slide_context(example_slide: Path, tmp_path: Path, ids_like: str):
    """A session context of the bundled slide's patches at a few places (no features: a batch needs none)."""
    from wsi_il.database import PatchTable
    from wsi_il.model import Context
    from wsi_il.project import Project, SlideRecord
    from wsi_il.slide import read_info

    info = read_info(example_slide)
    corners = [(0, 0), (896, 896), (1536, 1152), (2048, 2816), (1024, 256), (128, 2816), (1792, 1280)]
    boxes = np.array([(x, y, 128, 128) for x, y in corners], dtype=np.int64)
    record = SlideRecord(
        id="CMU-1-Small-Region",
        kind="slide",
        path=str(example_slide),
        width=info.width,
        height=info.height,
        mpp=info.mpp,
        offset=info.offset,
        n_patches=len(boxes),
        tiled=True,
        extracted=True,
    )
    ids = [ids_like.format(x=x, y=y) for x, y in corners]
    table = PatchTable(slide_index=np.zeros(len(boxes), dtype=np.int64), boxes=boxes, ids=ids, slides=[record])
    manifest = {"uid": "0b7f6a52-3c1e-4c59-9a3e-2f0d7c1a9e11", "classes": ["Tumor", "Normal"]}
    return Context(Project(tmp_path / "project"), manifest, table, store=None, device="cpu", reporter=None)


def test_contact_sheet_shows_each_patch_in_its_context_with_its_full_id(example_slide: Path, tmp_path: Path) -> None:
    from wsi_il.context import OUTLINE_RGB, context_image
    from wsi_il.session import _write_batch_files
    from wsi_il.sheet import _MUTED_INK
    from wsi_il.slide import TileReader, read_info

    ctx = _slide_context(example_slide, tmp_path, LONG_ID)
    probabilities = [0.51, 0.97, 0.62, 0.88, 0.74, 0.75, 0.55]
    predictions = np.array([[p, 1 - p] if i % 2 else [1 - p, p] for i, p in enumerate(probabilities)], np.float32)
    chosen = np.arange(len(probabilities))
    session = {"id": "s1", "round": 2, "rounds": 3, "label": "Tumor"}
    _write_batch_files(ctx, session, "s1-r2", chosen, chosen, predictions, "cnfp")
    folder = ctx.project.batch_dir("s1-r2")
    info, patches = read_batch(folder)
    slide = read_info(example_slide)
    reader = TileReader(example_slide)
    try:
        images = [reader.read(p.x, p.y, p.width, p.height) for p in patches]
        contexts = [
            context_image(reader, (p.x, p.y, p.width, p.height), (slide.width, slide.height), size_px=384)
            for p in patches
        ]
    finally:
        reader.close()
    for n, (patch, pixels) in enumerate(zip(patches, images, strict=True), start=1):
        with Image.open(folder / f"{n:02d}_{patch.patch_id}.png") as saved:  # the patch at full resolution
            assert np.array_equal(np.asarray(saved), pixels)
    layout = sheet_layout(info, patches, [Image.fromarray(i) for i in images], contexts)
    assert layout.side == 384 and layout.columns == 4  # 3 x 3 patches of 128 px, as read
    with Image.open(folder / "contact_sheet.png") as saved:
        sheet = np.asarray(saved.convert("RGB"))
    assert sheet.shape[:2] == layout.size[::-1]
    for i, (patch, context) in enumerate(zip(patches, contexts, strict=True)):
        left, top = layout.picture_corner(i)
        shown = sheet[top : top + 384, left : left + 384]
        assert np.array_equal(shown, np.asarray(context))  # the patch's own neighbourhood, outlined
        caption = layout.captions[i]
        assert "".join(line.text for line in caption.ids) == patch.patch_id  # the full id, never cut
        assert len(caption.ids) == 2 and all(
            line.font.getlength(line.text.rstrip()) <= 384 - 12 for line in caption.ids
        )
        assert caption.number.text == f"{i + 1:02d}"
        assert "".join(line.text for line in caption.suggestion).replace(" ", "") == suggestion_text(patch).replace(
            " ", ""
        )
        # where the suggestion is written (right of the number), an uncertain one has no dark ink, a confident one has
        band = sheet[top + 384 + 4 : top + 384 + 4 + caption.head_px, left + 40 : left + 384]
        darkest = band.max(axis=2).min()
        if patch.suggestion_probability < UNCERTAIN_BELOW:
            assert darkest >= min(_MUTED_INK) - 10 and caption.suggestion[0].fill == _MUTED_INK
        else:
            assert darkest < 60
    outline = np.all(sheet == OUTLINE_RGB, axis=2)
    left, top = layout.picture_corner(1)  # the patch at (896, 896): its outline in the middle of its context
    assert outline[top + 128, left + 128 : left + 256].all() and not outline[top + 64, left : left + 384].any()
    with (folder / "labels.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["suggestion_certainty"] for r in rows] == [
        "uncertain",
        "confident",
        "uncertain",
        "confident",
        "uncertain",
        "confident",
        "uncertain",
    ]
    readme = " ".join((folder / "README.txt").read_text(encoding="utf-8").split())
    assert "suggestion_certainty" in readme and "model uncertain" in readme and "outlined in cyan" in readme
