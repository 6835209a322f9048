"""Whole-slide tile stitching: weights, tile plan, seam-free blending, memmap path, OME-TIFF output."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from common.errors import InputError
from data_shards.ome_tiff import tiles_from_array, write_pyramidal_ome_tiff
from data_shards.slide import Slide
from finetune.stitch import (
    array_tile_reader,
    blend_window,
    downsample2x_area,
    plan_tiles,
    predict_slide_to_ome_tiff,
    stitch_predict,
    write_multichannel_ome_tiff,
)


def identity(tiles: np.ndarray) -> np.ndarray:
    return tiles.astype(np.float32)


def stitch(image, predict, tile_px=16, overlap_px=4, batch_size=3, out_channels=3, **kwargs):
    return stitch_predict(
        array_tile_reader(image),
        predict,
        image.shape[:2],
        out_channels,
        tile_px,
        overlap_px,
        batch_size,
        progress=False,
        **kwargs,
    )


def smooth_image(shape_hw, seed=0, low=60, high=220):
    """A tissue-like smooth random RGB image (JPEG keeps it within a grey level or two)."""
    noise = np.random.default_rng(seed).random((*shape_hw, 3))
    smooth = ndimage.gaussian_filter(noise, sigma=(6, 6, 0))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (low + (high - low) * smooth).astype(np.uint8)


def write_slide(path, image, um_per_px=0.5):
    write_pyramidal_ome_tiff(
        path, image.shape[:2], um_per_px, lambda level, shape: _edge_tiles(_area_level(image, level)), quality=98
    )
    return path


def _edge_tiles(image, tile_px=512):
    """Tiles padded by edge replication (white padding would make JPEG ring into the last pixels)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, -h % tile_px), (0, -w % tile_px), (0, 0)), mode="edge")
    return tiles_from_array(padded, tile_px)


def _area_level(image, level):
    for _ in range(level):
        image = downsample2x_area(image)
    return image


# ---------------------------------------------------------------------------------------------
# Window and plan


def test_blend_window_is_positive_smooth_and_a_partition_of_unity():
    tile, overlap = 32, 8
    w = blend_window(tile, overlap)
    assert w.shape == (tile, tile) and w.dtype == np.float32
    assert w.min() > 0  # the slide's own edge pixels still get weight
    np.testing.assert_array_equal(w[overlap:-overlap, overlap:-overlap], 1.0)
    np.testing.assert_allclose(w, w.T)  # same ramp on both axes
    np.testing.assert_allclose(w, w[::-1, ::-1])  # and on both ends
    # Two tiles offset by the stride: their 1-D ramps add to exactly 1 across the overlap band.
    ramp = w[tile // 2]
    stride = tile - overlap
    np.testing.assert_allclose(ramp[stride:] + ramp[:overlap], 1.0, atol=1e-6)
    np.testing.assert_array_equal(blend_window(10, 0), np.ones((10, 10), np.float32))


@pytest.mark.parametrize("shape", [(40, 30), (16, 16), (17, 100), (5, 7), (64, 9)])
def test_plan_tiles_covers_every_pixel_and_ends_at_the_edge(shape):
    tile, overlap = 16, 4
    origins = plan_tiles(shape, tile, overlap)
    cover = np.zeros(shape, dtype=int)
    for y0, x0 in origins:
        assert y0 >= 0 and x0 >= 0
        cover[y0 : y0 + tile, x0 : x0 + tile] += 1
    assert cover.min() >= 1
    ys, xs = sorted({y for y, _ in origins}), sorted({x for _, x in origins})
    assert len(origins) == len(ys) * len(xs)  # a full grid
    for starts, length in ((ys, shape[0]), (xs, shape[1])):
        if length <= tile:
            assert starts == [0]
        else:
            assert starts[-1] + tile == length  # last tile flush with the edge, never past it
            assert all(b - a == tile - overlap for a, b in zip(starts[:-2], starts[1:-1]))
            assert 0 < starts[-1] - starts[-2] <= tile - overlap


# ---------------------------------------------------------------------------------------------
# Stitching


def test_constant_image_gives_the_constant_and_an_offset_predictor_adds_it():
    image = np.full((45, 38, 3), (200, 17, 90), dtype=np.uint8)
    out = stitch(image, identity)
    np.testing.assert_allclose(out, np.broadcast_to(image, out.shape), atol=1e-4)
    shifted = stitch(image, lambda t: t.astype(np.float32) + 7.5)
    np.testing.assert_allclose(shifted, image.astype(np.float32) + 7.5, atol=1e-4)


def test_identity_reproduces_a_random_image_including_one_smaller_than_a_tile():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (53, 61, 3), dtype=np.uint8)
    np.testing.assert_allclose(stitch(image, identity), image, atol=1e-3)
    tiny = rng.integers(0, 256, (9, 5, 3), dtype=np.uint8)  # padded to one 16 px tile, cropped back
    out = stitch(tiny, identity)
    assert out.shape == (9, 5, 3)
    np.testing.assert_allclose(out, tiny, atol=1e-3)


def test_multichannel_output_is_computed_per_pixel():
    image = np.random.default_rng(2).integers(0, 256, (40, 33, 3), dtype=np.uint8)

    def two_markers(tiles):
        t = tiles.astype(np.float32)
        return np.stack([t.mean(-1), 255 - t[..., 0]], axis=-1)

    out = stitch(image, two_markers, out_channels=2)
    np.testing.assert_allclose(out, two_markers(image[None])[0], atol=1e-3)


def _offset_predictor(seed):
    """Adds one random offset (±20 grey levels) per tile: a model that disagrees with its neighbours."""
    rng = np.random.default_rng(seed)
    offsets = []

    def predict(tiles):
        drawn = rng.uniform(-20, 20, size=len(tiles)).astype(np.float32)
        offsets.extend(drawn.tolist())
        return tiles.astype(np.float32) + drawn[:, None, None, None]

    return predict, offsets


def _max_step(image):
    return max(np.abs(np.diff(image, axis=0)).max(), np.abs(np.diff(image, axis=1)).max())


def test_blending_removes_the_seams_that_plain_tiling_shows():
    tile, overlap = 32, 8
    image = np.full((104, 104, 3), 128, dtype=np.uint8)  # 32 + 3 · 24: four tiles per side, exact stride
    predict, offsets = _offset_predictor(3)
    blended = stitch(image, predict, tile_px=tile, overlap_px=overlap, batch_size=5)
    naive_predict, _ = _offset_predictor(3)
    naive = stitch(image, naive_predict, tile_px=tile, overlap_px=0)  # abutting tiles, no blending
    spread = max(offsets) - min(offsets)
    assert _max_step(naive) > 0.3 * spread  # plain tiling jumps by the offset difference at a border
    # Blended, a pixel step changes each weight by at most sin(π / (2·overlap)) of the offsets' spread.
    assert _max_step(blended) <= spread * np.sin(np.pi / (2 * overlap)) + 1e-3
    assert _max_step(blended) < 0.25 * _max_step(naive)
    # Where only one tile reaches (its middle), that tile's own prediction comes out unchanged.
    for (y0, x0), offset in zip(plan_tiles(image.shape[:2], tile, overlap), offsets):
        np.testing.assert_allclose(blended[y0 + tile // 2, x0 + tile // 2], 128 + offset, atol=1e-3)


def test_memmap_accumulators_match_ram_and_are_removed(tmp_path):
    image = np.random.default_rng(4).integers(0, 256, (50, 41, 3), dtype=np.uint8)
    predict = lambda t: np.sqrt(t.astype(np.float32)) * 3  # noqa: E731 — any non-trivial map
    in_ram = stitch(image, predict)
    on_disk = stitch(image, predict, accumulator_dir=tmp_path, memmap_above_values=0)
    assert isinstance(on_disk, np.memmap)
    np.testing.assert_array_equal(np.asarray(on_disk), in_ram)
    assert list(tmp_path.iterdir()) == []  # the temporary buffer folder is gone


def test_tissue_mask_skips_background_tiles_and_fills_the_constant():
    image = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)  # 4 image px per mask px
    mask[:, :6] = True  # tissue in columns 0–23 only
    seen = []

    def predict(tiles):
        seen.append(len(tiles))
        return tiles.astype(np.float32)

    out = stitch(image, predict, mask=(mask, 4.0), background=(255, 250, 245))
    origins = plan_tiles((64, 64), 16, 4)  # columns start at 0, 12, 24, 36, 48
    expected_predicted = sum(1 for _, x0 in origins if x0 < 24)
    assert sum(seen) == expected_predicted < len(origins)
    np.testing.assert_allclose(out[:, :12], image[:, :12], atol=1e-3)  # only predicted tiles reach here
    np.testing.assert_allclose(out[:, 40:], np.broadcast_to([255, 250, 245], (64, 24, 3)), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Whole slides


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    image = smooth_image((1100, 900))  # longer side ≥ 1024 px: two pyramid levels
    path = write_slide(folder / "he.ome.tif", image, um_per_px=0.25)
    with Slide(path) as slide:
        decoded = slide.read_region(0, 0, 900, 1100)
    return path, decoded


def test_slide_identity_round_trip(he_slide, tmp_path):
    path, decoded = he_slide
    out = tmp_path / "ihc.ome.tif"
    summary = predict_slide_to_ome_tiff(
        path, out, identity, tile_px=256, overlap_px=32, batch_size=4, tissue_only=False, progress=False, quality=95
    )
    assert summary["tiles_predicted"] == len(plan_tiles((1100, 900), 256, 32)) and summary["tiles_skipped"] == 0
    assert summary["shape_hw"] == [1100, 900] and summary["out_path"] == str(out)
    with Slide(out) as result:
        assert result.shape == (1100, 900) and result.um_per_px == pytest.approx(0.25)
        assert len(result.levels) == 2 and result.levels[1] == (550, 450)
        level0 = result.read_region(0, 0, 900, 1100).astype(float)
        level1 = result.read_region(0, 0, 450, 550, level=1).astype(float)
    assert np.abs(level0 - decoded).mean() < 1.5  # only the output's own JPEG error
    assert np.abs(level1 - downsample2x_area(decoded)).mean() < 1.5
    assert not list(tmp_path.glob(".*partial"))


def test_slide_at_a_coarser_level_keeps_that_levels_scale(he_slide, tmp_path):
    path, _ = he_slide
    out = tmp_path / "level1.ome.tif"
    summary = predict_slide_to_ome_tiff(
        path, out, identity, tile_px=128, overlap_px=16, level=1, tissue_only=False, progress=False
    )
    with Slide(out) as result:
        assert result.shape == (550, 450) and result.um_per_px == pytest.approx(0.5)
    assert summary["um_per_px"] == pytest.approx(0.5)


def test_constant_slide_gives_a_constant_output_without_seams(tmp_path):
    colour = (205, 120, 160)
    path = write_slide(tmp_path / "flat.ome.tif", np.full((1100, 900, 3), colour, dtype=np.uint8))
    out = tmp_path / "flat_ihc.ome.tif"
    summary = predict_slide_to_ome_tiff(
        path, out, lambda t: t.astype(np.float32) - 40, tile_px=256, overlap_px=32, progress=False
    )  # tissue_only: a flat slide is all "tissue"
    assert summary["tiles_skipped"] == 0
    with Slide(out) as result:
        level0 = result.read_region(0, 0, 900, 1100).astype(int)
        level1 = result.read_region(0, 0, 450, 550, level=1).astype(int)
    expected = np.array(colour) - 40
    for level in (level0, level1):
        assert np.abs(level - expected).max() <= 1  # JPEG of a flat field: at most one grey level
        assert _max_step(level) <= 1


def test_tissue_only_skips_glass(tmp_path):
    image = np.full((600, 500, 3), 255, dtype=np.uint8)  # white glass …
    image[:, :200] = smooth_image((600, 200), seed=6, low=90, high=200)  # … with tissue on the left
    path = write_slide(tmp_path / "half.ome.tif", image)
    calls = []

    def predict(tiles):
        calls.append(len(tiles))
        return tiles.astype(np.float32)

    summary = predict_slide_to_ome_tiff(
        path, tmp_path / "half_ihc.ome.tif", predict, tile_px=128, overlap_px=16, progress=False
    )
    assert summary["tiles_skipped"] > 0 and summary["tiles_predicted"] == sum(calls) > 0
    with Slide(tmp_path / "half_ihc.ome.tif") as result, Slide(path) as source:
        out = result.read_region(0, 0, 500, 600).astype(float)
        src = source.read_region(0, 0, 500, 600).astype(float)
    assert np.abs(out - src).mean() < 1.5  # tissue predicted, glass filled with white


def test_multichannel_ome_tiff_pyramid_with_names(he_slide, tmp_path):
    path, decoded = he_slide
    names = ["DAPI", "CD3"]

    def markers(tiles):
        t = tiles.astype(np.float32)
        return np.stack([t.mean(-1), 255 - t[..., 1]], axis=-1)

    out = tmp_path / "mif.ome.tif"
    summary = predict_slide_to_ome_tiff(
        path,
        out,
        markers,
        tile_px=256,
        overlap_px=32,
        tissue_only=False,
        channel_names=names,
        progress=False,
        description="virtual mIF",
    )
    assert summary["channels"] == names
    expected = markers(decoded[None])[0]  # (H, W, C)
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.axes == "CYX" and series.shape == (2, 1100, 900) and series.dtype == np.float32
        assert [lvl.shape for lvl in series.levels] == [(2, 1100, 900), (2, 550, 450)]
        np.testing.assert_allclose(series.asarray(), expected.transpose(2, 0, 1), atol=1e-3)
        np.testing.assert_allclose(
            series.levels[1].asarray(), downsample2x_area(expected).transpose(2, 0, 1), atol=1e-3
        )
        xml = tif.ome_metadata
    for name in names:
        assert f'Name="{name}"' in xml
    assert 'PhysicalSizeX="0.25"' in xml

    u16 = tmp_path / "mif16.ome.tif"
    write_multichannel_ome_tiff(u16, expected * 100, 0.25, names, dtype="uint16")
    back = tifffile.imread(u16)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, np.clip(np.rint(expected * 100), 0, 65535).transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_input_error(he_slide, tmp_path):
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    for tile, overlap in ((16, 16), (16, 20), (0, 0), (16, -1), (16.5, 2)):
        with pytest.raises(InputError):
            plan_tiles((20, 20), tile, overlap)
    with pytest.raises(InputError):
        blend_window(8, 8)
    for shape in ((0, 5), (5,), (-3, 4), "ab"):
        with pytest.raises(InputError):
            plan_tiles(shape, 8, 2)
    with pytest.raises(InputError, match="predict_batch output"):
        stitch(image, lambda t: t[:, :8].astype(np.float32))  # wrong tile size
    with pytest.raises(InputError, match="predict_batch output"):
        stitch(image, lambda t: np.full(t.shape, np.nan, np.float32))
    with pytest.raises(InputError, match="predict_batch output"):
        stitch(image, identity, out_channels=2)
    with pytest.raises(InputError, match="mask"):
        stitch(image, identity, mask=(np.ones((50, 50), bool), 4.0))  # not this image's mask
    with pytest.raises(InputError, match="background"):
        stitch(image, identity, mask=(np.ones((5, 5), bool), 4.0), background=(1, 2))
    with pytest.raises(InputError, match="batch_size"):
        stitch(image, identity, batch_size=0)
    with pytest.raises(InputError, match="image"):
        array_tile_reader(np.zeros((20, 20), np.uint8))
    with pytest.raises(InputError, match="channel_names"):
        write_multichannel_ome_tiff(tmp_path / "x.ome.tif", np.zeros((8, 8, 2), np.float32), 0.5, ["a"])
    with pytest.raises(InputError, match="dtype"):
        write_multichannel_ome_tiff(tmp_path / "x.ome.tif", np.zeros((8, 8, 1), np.float32), 0.5, ["a"], dtype="int8")
    path, _ = he_slide
    with pytest.raises(InputError, match="channel_names"):
        predict_slide_to_ome_tiff(path, tmp_path / "y.ome.tif", identity, channel_names=["a", "a"], progress=False)
    with pytest.raises(InputError, match="level"):
        predict_slide_to_ome_tiff(path, tmp_path / "y.ome.tif", identity, level=5, progress=False)
    with pytest.raises(InputError):
        predict_slide_to_ome_tiff(tmp_path / "missing.ome.tif", tmp_path / "y.ome.tif", identity, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written on bad input
