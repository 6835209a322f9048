"""Cell-centred crops: centring, physical field of view, fast route = naive route, each tile read
once, out-of-bounds and unreadable-tile handling, JPEG helpers.

Slides are small pyramidal tiled OME-TIFFs written here with tifffile: zlib tiles where pixels
must be exact, JPEG tiles where the test is about geometry on realistic data.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from common.errors import InputError
from data_shards.crops import CropReader
from data_shards.sample import decode_jpeg, encode_jpeg
from data_shards.slide import Slide

S = 224  # crop side, pixels
HALF = S // 2
TILE = 256


def write_slide(path, image: np.ndarray, um_per_px: float, compression: str = "zlib", n_levels: int = 3):
    """Pyramidal OME-TIFF; level i keeps every 2**i-th pixel of level 0 (so its pixels are known)."""
    options = dict(tile=(TILE, TILE), compression=compression, photometric="rgb")
    if compression == "jpeg":
        options["compressionargs"] = {"level": 95}
    metadata = {"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=n_levels - 1, metadata=metadata, **options)
        for level in range(1, n_levels):
            step = 2**level
            tif.write(np.ascontiguousarray(image[::step, ::step]), subfiletype=1, **options)
    return path


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Each pixel spells its own (x, y): R = x % 256, G = y % 256, B = x // 256 + 16 * (y // 256)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], axis=-1).astype(np.uint8)


def decode_coordinates(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = crop.astype(np.int64)
    return c[..., 0] + 256 * (c[..., 2] % 16), c[..., 1] + 256 * (c[..., 2] // 16)


def squares_image(height: int, width: int, centres_px: np.ndarray, side_px: float) -> np.ndarray:
    """White slide with a dark square of ``side_px`` centred on each (x, y) (pixel centres)."""
    image = np.full((height, width, 3), 245, np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    for cx, cy in centres_px:
        inside = (np.abs(x - cx) <= side_px / 2) & (np.abs(y - cy) <= side_px / 2)
        image[inside] = (60, 30, 90)
    return image


def central_square(crop: np.ndarray) -> tuple[np.ndarray, int]:
    """Centroid (x, y) of the dark blob under the crop centre, and its width along its middle row."""
    dark = crop.astype(int).mean(axis=2) < 150
    labels, _ = ndimage.label(dark)
    label = labels[HALF, HALF]
    assert label > 0, "no marker under the crop centre"
    blob = labels == label
    cy, cx = ndimage.center_of_mass(blob)
    row = int(round(cy))
    return np.array([cx, cy]), int(blob[row].sum())


def collect(reader: CropReader, centres: np.ndarray, route: str = "blocks") -> dict[int, np.ndarray]:
    crops = {}
    for i, crop in reader.iter_crops(centres, route=route):
        assert i not in crops, f"cell {i} yielded twice"
        assert crop.shape == (S, S, 3) and crop.dtype == np.uint8
        crops[i] = crop
    return crops


@pytest.fixture(scope="module")
def coordinate_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "coords.ome.tif"
    return write_slide(path, coordinate_image(1101, 1303), um_per_px=0.25)


@pytest.fixture(scope="module")
def noise_slide(tmp_path_factory):
    image = np.random.default_rng(7).integers(0, 256, (1101, 1303, 3), dtype=np.uint8)
    return write_slide(tmp_path_factory.mktemp("slides") / "noise.ome.tif", image, um_per_px=0.25), image


@pytest.fixture(scope="module")
def marker_slide(tmp_path_factory):
    """JPEG tiles, 0.25 µm/px, 20 µm dark squares on a jittered grid 100 µm apart (sub-pixel centres)."""
    rng = np.random.default_rng(3)
    grid = np.array(list(itertools.product(range(260, 1400, 400), range(260, 1200, 400))), float)
    centres = grid + rng.uniform(-30, 30, grid.shape)
    image = squares_image(1300, 1500, centres, side_px=80)
    path = write_slide(tmp_path_factory.mktemp("slides") / "markers.ome.tif", image, 0.25, compression="jpeg")
    return path, centres


def test_level0_crop_pixels_are_the_slide_pixels_around_the_rounded_centre(coordinate_slide):
    rng = np.random.default_rng(0)
    centres = rng.uniform([HALF, HALF], [1303 - HALF, 1101 - HALF], (60, 2))
    centres[:4] = [[500.5, 400.5], [500.49, 400.51], [HALF, HALF], [1303 - HALF - 1, 1101 - HALF - 1]]
    with Slide(coordinate_slide) as slide:
        crops = collect(CropReader(slide, block_px=256), centres)
    assert sorted(crops) == list(range(len(centres)))
    rounded = np.floor(centres + 0.5).astype(int)  # nearest pixel, halves up
    assert rounded[0].tolist() == [501, 401] and rounded[1].tolist() == [500, 401]
    for i, crop in crops.items():
        x, y = decode_coordinates(crop)
        # crop[y, x] is slide pixel (rounded - 112 + x, rounded - 112 + y): centre on crop[112, 112]
        np.testing.assert_array_equal(x, rounded[i, 0] - HALF + np.arange(S)[None, :].repeat(S, 0))
        np.testing.assert_array_equal(y, rounded[i, 1] - HALF + np.arange(S)[:, None].repeat(S, 1))


def test_crops_centred_on_planted_cells_in_jpeg_slide(marker_slide):
    path, centres = marker_slide
    with Slide(path) as slide:
        for route in ("blocks", "naive"):
            crops = collect(CropReader(slide, block_px=512), centres, route=route)
            assert len(crops) == len(centres)
            for crop in crops.values():
                centroid, width = central_square(crop)
                assert np.abs(centroid - HALF).max() <= 1.0, centroid
                assert abs(width - 80) <= 2


@pytest.mark.parametrize(
    "target_um_per_px, expected_level, resampled",
    [(0.5, 1, False), (0.37, 0, True), (0.9, 1, True), (0.2, 0, True)],
)
def test_resampled_crops_have_the_physical_field_of_view(marker_slide, target_um_per_px, expected_level, resampled):
    path, centres = marker_slide
    with Slide(path) as slide:
        reader = CropReader(slide, target_um_per_px=target_um_per_px, block_px=512)
        assert (reader.level, reader.resample) == (expected_level, resampled)
        crops = collect(reader, centres)
    assert len(crops) == len(centres)
    expected_width = 20.0 / target_um_per_px  # a 20 µm square, in crop pixels
    for crop in crops.values():
        centroid, width = central_square(crop)
        assert np.abs(centroid - HALF).max() <= 1.0, centroid
        assert abs(width - expected_width) <= 2, (width, expected_width)


@pytest.mark.parametrize("target_um_per_px", [None, 0.5, 0.37, 0.9])
def test_block_route_equals_naive_route(noise_slide, target_um_per_px):
    path, _ = noise_slide
    rng = np.random.default_rng(1)
    centres = rng.uniform(-150, 1450, (150, 2))  # dense, many near or past the edges
    with Slide(path) as slide:
        reader = CropReader(slide, target_um_per_px=target_um_per_px, block_px=300)
        fast = collect(reader, centres)
        fast_stats = reader.stats
        naive = collect(reader, centres, route="naive")
    assert sorted(fast) == sorted(naive) == list(range(len(centres)))  # every cell exactly once
    assert fast_stats.n_padded == reader.stats.n_padded > 0
    assert fast_stats.n_regions_read < reader.stats.n_regions_read / 5
    for i in fast:
        if reader.resample:  # same crop-grid pixels; PIL's fixed-point weights may round apart
            difference = np.abs(fast[i].astype(int) - naive[i])
            assert difference.max() <= 2 and (difference > 0).mean() < 0.01
        else:
            np.testing.assert_array_equal(fast[i], naive[i])


def test_level1_crops_are_level1_pixels(coordinate_slide):
    """0.5 µm/px from a 0.25 µm/px slide: sliced from level 1, centred on the level-1 pixel of the cell."""
    centres = np.array([[600.3, 500.8], [401.0, 399.0]])
    with Slide(coordinate_slide) as slide:
        reader = CropReader(slide, target_um_per_px=0.5)
        crops = collect(reader, centres)
    assert reader.level == 1 and not reader.resample
    for i, crop in crops.items():
        x, y = decode_coordinates(crop)
        # level-1 pixel k is level-0 pixel 2k, and covers level-0 [2k - 0.5, 2k + 1.5)
        k = np.floor((centres[i] + 0.5) / 2).astype(int)
        assert (x[HALF, HALF], y[HALF, HALF]) == (2 * k[0], 2 * k[1])
        assert x[HALF, HALF + 1] - x[HALF, HALF] == 2 and y[HALF + 1, HALF] - y[HALF, HALF] == 2


def test_each_tile_is_decoded_once(noise_slide, monkeypatch):
    path, _ = noise_slide
    centres = np.random.default_rng(2).uniform(0, 1300, (400, 2))
    with Slide(path) as slide:
        regions = []
        original = slide.read_region

        def spy(x0, y0, width, height, level=0, fill=255):
            regions.append((x0, y0, width, height, level))
            return original(x0, y0, width, height, level=level, fill=fill)

        monkeypatch.setattr(slide, "read_region", spy)
        list(CropReader(slide, block_px=512).iter_crops(centres))
    tiles = []
    for x0, y0, width, height, level in regions:
        assert level == 0 and x0 % TILE == 0 and y0 % TILE == 0  # blocks are tile-aligned
        tiles += [
            (ty, tx)
            for ty in range(max(y0, 0) // TILE, (min(y0 + height, 1101) - 1) // TILE + 1)
            for tx in range(max(x0, 0) // TILE, (min(x0 + width, 1303) - 1) // TILE + 1)
        ]
    assert len(tiles) == len(set(tiles))  # no tile decoded twice
    assert len(set(tiles)) == 5 * 6  # and every tile of this densely covered slide once


def test_visiting_order_is_spatially_coherent(noise_slide):
    path, _ = noise_slide
    centres = np.random.default_rng(4).uniform(0, 1300, (2000, 2))
    with Slide(path) as slide:
        reader = CropReader(slide, block_px=256)
        order = reader.plan(centres).order
        visited = [i for i, _ in reader.iter_crops(centres)]
    np.testing.assert_array_equal(visited, order)
    step = np.hypot(*np.diff(centres[order], axis=0).T).mean()
    random_step = np.hypot(*np.diff(centres, axis=0).T).mean()
    assert step < random_step / 4


def test_out_of_bounds_pad_or_skip(coordinate_slide):
    height, width = 1101, 1303
    centres = np.array(
        [
            [600.0, 500.0],  # inside
            [HALF, HALF],  # touches the corner exactly: still inside
            [HALF - 1, 500.0],  # one column past the left edge
            [600.0, height - HALF + 1],  # past the bottom edge
            [width + 50.0, 300.0],  # centre outside the slide
        ]
    )
    with Slide(coordinate_slide) as slide:
        padder = CropReader(slide, out_of_bounds="pad")
        padded = collect(padder, centres)
        skipper = CropReader(slide, out_of_bounds="skip")
        kept = collect(skipper, centres)
    assert sorted(padded) == [0, 1, 2, 3, 4]
    assert (padder.stats.n_padded, padder.stats.n_skipped, padder.stats.n_cropped) == (3, 0, 5)
    assert sorted(kept) == [0, 1]
    assert (skipper.stats.n_skipped_out_of_bounds, skipper.stats.n_padded, skipper.stats.n_cropped) == (3, 0, 2)
    # the left crop: its first column lies at x = -1, outside: white; the rest are slide pixels
    np.testing.assert_array_equal(padded[2][:, 0], 255)
    x, _ = decode_coordinates(padded[2][:, 1:])
    np.testing.assert_array_equal(x[0], np.arange(S - 1))
    np.testing.assert_array_equal(padded[3][-1], 255)  # its last row is y = 1101, below the slide
    _, y = decode_coordinates(padded[3][:-1])
    np.testing.assert_array_equal(y[-1], height - 1)
    np.testing.assert_array_equal(padded[4][:, HALF - 50 :], 255)


def corrupt_one_tile(path, tile_index: int) -> None:
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[tile_index]
    with open(path, "r+b") as handle:
        handle.seek(offset + 16)
        handle.write(bytes(range(256)) * 4)


@pytest.mark.parametrize("route", ["blocks", "naive"])
def test_unreadable_tile_skips_its_cells_or_raises(tmp_path, route):
    image = np.random.default_rng(5).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    good = write_slide(tmp_path / "good.ome.tif", image, 0.25, n_levels=1)
    bad = write_slide(tmp_path / "bad.ome.tif", image, 0.25, n_levels=1)
    tiles_per_row = -(-800 // TILE)
    corrupt_one_tile(bad, 1 * tiles_per_row + 1)  # tile row 1, column 1: x, y in [256, 512)
    centres = np.array(list(itertools.product(range(120, 700, 40), range(120, 600, 40))), float)
    window_x0, window_y0 = centres[:, 0] - HALF, centres[:, 1] - HALF
    touches = (window_x0 < 512) & (window_x0 + S > 256) & (window_y0 < 512) & (window_y0 + S > 256)
    assert 0 < touches.sum() < len(centres)
    with Slide(good) as slide:
        reference = collect(CropReader(slide), centres)
    with Slide(bad) as slide:
        with pytest.raises(InputError, match="decodable image tiles"):
            collect(CropReader(slide, on_read_error="raise"), centres, route=route)
        reader = CropReader(slide, on_read_error="skip", block_px=512)
        crops = collect(reader, centres, route=route)
    assert reader.stats.n_skipped_unreadable == touches.sum()
    assert sorted(crops) == np.flatnonzero(~touches).tolist()
    for i, crop in crops.items():
        np.testing.assert_array_equal(crop, reference[i])


def test_bad_input_raises_input_error(coordinate_slide):
    with Slide(coordinate_slide) as slide:
        with pytest.raises(InputError, match=r"cell centres.*row 1"):
            list(CropReader(slide).iter_crops(np.array([[10.0, 10.0], [np.nan, 5.0]])))
        with pytest.raises(InputError, match="out_of_bounds"):
            CropReader(slide, out_of_bounds="crop")
        with pytest.raises(InputError, match="target_um_per_px"):
            CropReader(slide, target_um_per_px=-1.0)
        reader = CropReader.from_config(slide, {"size_px": 64, "target_um_per_px": 0.5, "out_of_bounds": "skip"})
        assert (reader.size, reader.level, reader.out_of_bounds) == (64, 1, "skip")


def test_jpeg_round_trip_is_standard_jpeg():
    y, x = np.mgrid[0:S, 0:S]
    crop = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    data = encode_jpeg(crop, quality=90)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    decoded = decode_jpeg(data)
    assert decoded.shape == (S, S, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - crop).mean() < 2
    by_pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # any standard decoder reads it
    assert np.abs(by_pil.astype(int) - decoded).max() <= 2
