"""Direct decoding of a slide's JPEG tiles (``wsi_il.tifftiles``): the same pixels as OpenSlide, or OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_il.measure.mosaic import write_pyramidal_tiff
from wsi_il.slide import TileReader
from wsi_il.tifftiles import DIRECT_ENV


def _image(height: int = 700, width: int = 900) -> np.ndarray:
    """Smooth colour gradients with noise: what JPEG tiles of tissue look like to a decoder."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx * 0.25) % 256, (yy * 0.3) % 256, ((xx + yy) * 0.2) % 256], axis=-1)
    return np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)


def _readers(path, monkeypatch) -> tuple[TileReader, TileReader]:
    """(direct, OpenSlide only) readers of one slide."""
    direct = TileReader(path)
    monkeypatch.setenv(DIRECT_ENV, "0")
    plain = TileReader(path)
    plain.read(0, 0, 16, 16)  # opened (and so decided) while the variable is set
    monkeypatch.delenv(DIRECT_ENV)
    return direct, plain


REGIONS = [
    (0, 0, 128, 128),
    (128, 256, 128, 128),
    (0, 0, 256, 256),
    (37, 51, 200, 150),
    (640, 512, 256, 188),
    (800, 600, 128, 128),
    (-20, 10, 64, 64),
    (5, 5, 1, 1),
]
"""Aligned to the 128 px tiles, spanning several, at the page's edge, past it, outside it, one pixel."""


def test_direct_tiles_read_exactly_what_openslide_reads(tmp_path, monkeypatch):
    path = tmp_path / "jpeg.tiff"
    write_pyramidal_tiff(path, _image(), tile_px=128, jpeg_quality=85)
    direct, plain = _readers(path, monkeypatch)
    for region in REGIONS:
        mine, theirs = direct.read(*region), plain.read(*region)
        assert mine.shape == theirs.shape == (region[3], region[2], 3), region
        assert np.array_equal(mine, theirs), region
    assert direct._local.tiles is not None and plain._local.tiles is None  # each read as it was meant to
    direct.close()
    plain.close()


def test_aperio_tiles_read_exactly_what_openslide_reads(example_slide, monkeypatch):
    """The example SVS: 240 px tiles stored as RGB (not YCbCr) JPEG, read in 256 px patches across four tiles."""
    direct, plain = _readers(example_slide, monkeypatch)
    rng = np.random.default_rng(0)
    corners = zip(rng.integers(0, 1900, 20), rng.integers(0, 2600, 20), strict=True)
    regions = [(int(x), int(y), 256, 256) for x, y in corners]
    for region in [*regions, (1920, 2640, 256, 256), (2100, 2900, 256, 256)]:
        assert np.array_equal(direct.read(*region), plain.read(*region)), region
    assert direct._local.tiles is not None


def test_slides_that_are_not_jpeg_tiles_are_read_by_openslide(tmp_path):
    path = tmp_path / "deflate.tiff"
    write_pyramidal_tiff(path, _image(300, 300), tile_px=128, jpeg_quality=None)
    reader = TileReader(path)
    assert reader.read(10, 10, 100, 100).shape == (100, 100, 3)
    assert reader._local.tiles is None


def test_a_tile_that_does_not_decode_as_openslide_does_means_openslide(tmp_path, monkeypatch):
    """The check at opening: one tile must decode to OpenSlide's pixels, bit for bit, or OpenSlide reads."""
    import imagecodecs

    path = tmp_path / "jpeg.tiff"
    write_pyramidal_tiff(path, _image(300, 300), tile_px=128, jpeg_quality=85)
    decode = imagecodecs.jpeg8_decode
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", lambda *a, **k: decode(*a, **k) // 2)  # not the same pixels
    reader = TileReader(path)
    reader.read(0, 0, 64, 64)
    assert reader._local.tiles is None


def test_a_damaged_tile_is_left_to_openslide(tmp_path, monkeypatch):
    from wsi_il.tifftiles import JpegTiles

    path = tmp_path / "jpeg.tiff"
    write_pyramidal_tiff(path, _image(300, 300), tile_px=128, jpeg_quality=85)
    direct, plain = _readers(path, monkeypatch)
    direct.read(0, 0, 8, 8)

    def broken(self, index):
        raise RuntimeError("corrupt JPEG data")

    monkeypatch.setattr(JpegTiles, "_tile", broken)
    assert np.array_equal(direct.read(0, 0, 128, 128), plain.read(0, 0, 128, 128))


def test_a_decoded_tile_cannot_be_changed_in_place(tmp_path):
    """A tile is shared with the reader's cache: it comes back read-only; a region assembled from tiles is new."""
    path = tmp_path / "jpeg.tiff"
    write_pyramidal_tiff(path, _image(300, 300), tile_px=128, jpeg_quality=85)
    reader = TileReader(path)
    with pytest.raises(ValueError):
        reader.read(0, 0, 128, 128)[0, 0] = 0
    assembled = reader.read(10, 10, 128, 128)
    before = assembled.copy()
    assembled[:] = 0  # the caller's own copy: the cached tiles are untouched
    assert np.array_equal(reader.read(10, 10, 128, 128), before)


@pytest.mark.parametrize("max_px", [1000, 300, 100])
def test_thumbnails_from_the_level_tiles_are_openslides(tmp_path, max_px):
    """``read_thumbnail`` decodes the level OpenSlide would pick and shrinks it as ``get_thumbnail`` does: the same
    pixels, at level 0 (no pyramid level small enough) and below, with partial tiles at the edges."""
    import openslide

    from wsi_il.slide import read_thumbnail
    from wsi_il.tifftiles import read_level

    path = tmp_path / "jpeg.tiff"
    write_pyramidal_tiff(path, _image(1100, 1500), tile_px=128, jpeg_quality=85)
    slide = openslide.OpenSlide(str(path))
    expected = np.asarray(slide.get_thumbnail((max_px, max_px)).convert("RGB"))
    level = slide.get_best_level_for_downsample(max(dim / max_px for dim in slide.dimensions))
    assert read_level(path, slide, level) is not None, "the level should be decoded directly"
    thumb, scale = read_thumbnail(path, max_px)
    assert np.array_equal(thumb, expected) and scale == 1500 / expected.shape[1]
    assert {slide.get_best_level_for_downsample(1500 / px) for px in (1000, 300, 100)} == {0, 2, 3}


def test_the_example_slides_thumbnail_is_openslides(example_slide, monkeypatch):
    import openslide

    from wsi_il.slide import read_thumbnail
    from wsi_il.tifftiles import read_level

    slide = openslide.OpenSlide(str(example_slide))
    assert read_level(example_slide, slide, 0) is not None
    direct, _ = read_thumbnail(example_slide, 512)
    monkeypatch.setenv(DIRECT_ENV, "0")
    assert read_level(example_slide, slide, 0) is None
    plain, _ = read_thumbnail(example_slide, 512)
    assert np.array_equal(direct, plain)
    assert np.array_equal(plain, np.asarray(slide.get_thumbnail((512, 512)).convert("RGB")))
