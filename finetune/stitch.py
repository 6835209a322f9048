"""Whole-slide image-to-image inference: overlapping tiles, blended without seams, to a pyramidal OME-TIFF.

An image-to-image head (virtual IHC: H&E → IHC RGB; mIF: H&E → C marker channels) sees one tile
at a time. Predicting non-overlapping tiles and pasting them side by side leaves visible seams:
a network's output drifts near tile borders (less context, padding), so neighbouring tiles
disagree along their shared edge. Here tiles overlap by ``overlap_px`` and every pixel is the
weighted mean of the tiles covering it, with weights (:func:`blend_window`) that ramp smoothly
from almost 0 at a tile's border to 1 inside. The output therefore changes gradually from one
tile's prediction to the next, and a model that agrees with itself gives exactly its own output.

Pieces, each usable alone:

- :func:`blend_window` — the (tile, tile) weight image;
- :func:`plan_tiles` — tile origins covering an image, stride ``tile - overlap``, the last row /
  column shifted to end at the image edge;
- :func:`stitch_predict` — read, predict in batches, accumulate weight·prediction and weight in
  float32 buffers (RAM, or ``np.memmap`` files in a private temporary folder for slides larger
  than memory), divide; background tiles (outside a tissue mask) are not predicted;
- :func:`pyramid_tiles` — per-level uint8 tiles for ``data_shards.ome_tiff.write_pyramidal_ome_tiff``
  (coarser levels by 2× area averaging);
- :func:`write_multichannel_ome_tiff` — a (C, Y, X) float32/uint16 OME-TIFF pyramid with channel names;
- :func:`predict_slide_to_ome_tiff` — the whole thing for an H&E slide file.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from common.atomic import atomic_path
from common.errors import InputError
from data_shards.ome_tiff import TILE_PX, pyramid_shapes, tile_grid, write_pyramidal_ome_tiff
from data_shards.qc import tissue_mask
from data_shards.slide import Slide

log = logging.getLogger(__name__)

# Above this many values (H·W·C) the float32 accumulators live in np.memmap files on disk rather
# than in RAM: 2**28 values = 1 GiB of float32 (a 3-channel slide of about 9,500 × 9,500 px).
MEMMAP_ABOVE_VALUES = 2**28
_STRIP_ROWS = 1024  # rows processed at a time when normalising / downsampling big buffers

ReadTile = Callable[[int, int, int], np.ndarray]  # (y0, x0, tile_px) -> uint8 (tile, tile, 3)
PredictBatch = Callable[[np.ndarray], np.ndarray]  # uint8 (B, tile, tile, 3) -> float32 (B, tile, tile, C)


# ---------------------------------------------------------------------------------------------
# Weights and tile plan


def _check_tiling(tile_px: int, overlap_px: int) -> tuple[int, int]:
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)) or tile_px < 1:
        raise InputError(None, "tile_px", "a positive integer number of pixels", tile_px)
    if isinstance(overlap_px, bool) or not isinstance(overlap_px, (int, np.integer)) or not 0 <= overlap_px < tile_px:
        raise InputError(None, "overlap_px", f"an integer number of pixels in [0, tile_px={tile_px})", overlap_px)
    return int(tile_px), int(overlap_px)


def _ramp_1d(tile_px: int, overlap_px: int) -> np.ndarray:
    """(tile_px,) weights: sin² rise over the first ``overlap_px`` pixels, 1 in the middle, mirrored fall."""
    weights = np.ones(tile_px, dtype=np.float64)
    if overlap_px == 0:
        return weights
    # Pixel centres (i + 0.5) make the ramp strictly positive at the border pixel, and the rise
    # of one tile plus the fall of its neighbour, offset by exactly overlap_px, sum to 1
    # (sin² + cos²): with the planned stride the weights already form a partition of unity.
    rise = np.sin(0.5 * np.pi * (np.arange(overlap_px) + 0.5) / overlap_px) ** 2
    weights[:overlap_px] = rise
    # min(): when overlap_px > tile_px / 2 the rise and the fall meet in the middle.
    weights[tile_px - overlap_px :] = np.minimum(weights[tile_px - overlap_px :], rise[::-1])
    return weights


def blend_window(tile_px: int, overlap_px: int) -> np.ndarray:
    """float32 (tile_px, tile_px) blending weights, separable: ``w(y, x) = r(y) · r(x)``.

    ``r`` is a raised-cosine (sin²) ramp over the ``overlap_px`` pixels at each end and 1 inside.
    Why this shape: it is smooth (no kink, so no visible line where a ramp starts), it makes two
    tiles overlapping by exactly ``overlap_px`` sum to 1, and it is strictly positive (the border
    pixel gets sin²(π / 4·overlap) > 0) so pixels on the slide's own edge, covered by one tile
    only, still get that tile's prediction after the weights are divided out. ``overlap_px = 0``
    gives all ones (plain tiling).
    """
    tile_px, overlap_px = _check_tiling(tile_px, overlap_px)
    ramp = _ramp_1d(tile_px, overlap_px)
    return np.outer(ramp, ramp).astype(np.float32)


def _axis_starts(length_px: int, tile_px: int, stride_px: int) -> list[int]:
    if length_px <= tile_px:
        return [0]  # one tile, padded beyond the image and cropped back
    starts = list(range(0, length_px - tile_px + 1, stride_px))
    if starts[-1] + tile_px < length_px:
        starts.append(length_px - tile_px)  # last tile shifted to end exactly at the edge
    return starts


def plan_tiles(shape_hw: tuple[int, int], tile_px: int, overlap_px: int) -> list[tuple[int, int]]:
    """Top-left (y0, x0) of the tiles covering a (height, width) image, row-major.

    Stride ``tile_px - overlap_px``; the last row and column are shifted to end at the image edge
    (so they overlap their neighbour by more than ``overlap_px``) instead of running past it. A
    side shorter than a tile gets a single tile at 0, which the reader pads and the stitcher crops.
    """
    tile_px, overlap_px = _check_tiling(tile_px, overlap_px)
    height, width = _check_shape(shape_hw)
    stride = tile_px - overlap_px
    return [(y, x) for y in _axis_starts(height, tile_px, stride) for x in _axis_starts(width, tile_px, stride)]


def _check_shape(shape_hw) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in shape_hw)
        ok = height >= 1 and width >= 1 and all(float(v) == int(v) for v in shape_hw)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(None, "shape_hw", "(height, width) as two positive integers (pixels)", shape_hw)
    return height, width


def array_tile_reader(image: np.ndarray, fill: int = 255) -> ReadTile:
    """A ``read_tile`` over an in-memory (H, W, 3) uint8 image; parts outside are ``fill`` (white glass)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(None, "image", "a uint8 (H, W, 3) RGB array", f"{image.dtype} {image.shape}")

    def read_tile(y0: int, x0: int, tile_px: int) -> np.ndarray:
        tile = np.full((tile_px, tile_px, 3), fill, dtype=np.uint8)
        block = image[y0 : y0 + tile_px, x0 : x0 + tile_px]
        tile[: block.shape[0], : block.shape[1]] = block
        return tile

    return read_tile


def tile_tissue_fraction(
    origins: Sequence[tuple[int, int]], tile_px: int, mask: np.ndarray, mask_downsample: float
) -> np.ndarray:
    """Tissue fraction (0–1) of each tile's footprint in a (h, w) bool ``mask``.

    ``mask_downsample`` is image pixels per mask pixel. A summed-area table answers each tile in O(1).
    """
    mask = np.asarray(mask, dtype=bool)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    yx = np.asarray(origins, dtype=np.float64).reshape(-1, 2)

    def to_mask(v: np.ndarray, limit: int, up: bool) -> np.ndarray:
        scaled = v / mask_downsample
        return np.clip(np.ceil(scaled) if up else np.floor(scaled), 0, limit).astype(np.int64)

    r0, c0 = to_mask(yx[:, 0], mask.shape[0], False), to_mask(yx[:, 1], mask.shape[1], False)
    r1 = np.maximum(to_mask(yx[:, 0] + tile_px, mask.shape[0], True), r0 + 1).clip(max=mask.shape[0])
    c1 = np.maximum(to_mask(yx[:, 1] + tile_px, mask.shape[1], True), c0 + 1).clip(max=mask.shape[1])
    r0, c0 = np.minimum(r0, r1 - 1), np.minimum(c0, c1 - 1)  # tiles at the far edge keep ≥ 1 mask pixel
    inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return inside / np.maximum((r1 - r0) * (c1 - c0), 1)


# ---------------------------------------------------------------------------------------------
# Buffers: RAM or disk


class _Scratch:
    """Allocates arrays in RAM, or as ``np.memmap`` files in a private temporary folder when large.

    The folder is created under ``parent_dir`` (the system temp folder when None) on first need
    and removed by :meth:`close`.
    """

    def __init__(self, parent_dir: str | Path | None, memmap_above_values: int):
        self.parent_dir = None if parent_dir is None else Path(parent_dir)
        self.memmap_above_values = int(memmap_above_values)
        self.folder: Path | None = None
        self._count = 0

    def zeros(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        if math.prod(shape) <= self.memmap_above_values:
            return np.zeros(shape, dtype=dtype)
        if self.folder is None:
            if self.parent_dir is not None:
                self.parent_dir.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="stitch-", dir=self.parent_dir))
            log.info("accumulating on disk in %s", self.folder)
        self._count += 1
        # mode w+ creates a zero-filled sparse file: no write pass needed.
        return np.memmap(self.folder / f"buffer{self._count}.f", dtype=dtype, mode="w+", shape=shape)

    def close(self) -> None:
        # On POSIX an open memmap outlives its unlinked file, so a returned result stays valid.
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Stitching


def _check_mask(mask, shape_hw: tuple[int, int]) -> tuple[np.ndarray, float] | None:
    if mask is None:
        return None
    try:
        array, downsample = mask
        array, downsample = np.asarray(array), float(downsample)
    except (TypeError, ValueError):
        raise InputError(
            None, "mask", "a (bool (h, w) array, image px per mask px) pair", type(mask).__name__
        ) from None
    if array.ndim != 2 or array.size == 0 or not downsample > 0:
        raise InputError(
            None,
            "mask",
            "a non-empty 2-D bool array and a positive downsample",
            f"shape {array.shape}, downsample {downsample}",
        )
    expected = (shape_hw[0] / downsample, shape_hw[1] / downsample)
    # A thumbnail's side is rounded, so allow a couple of mask pixels either way.
    if any(abs(got - want) > 2 + 0.02 * want for got, want in zip(array.shape, expected)):
        raise InputError(
            None,
            "mask",
            f"a mask of about {expected[0]:.0f} × {expected[1]:.0f} px (image {shape_hw} / downsample {downsample:g})",
            array.shape,
        )
    return array.astype(bool), downsample


def _background_vector(background, out_channels: int) -> np.ndarray:
    value = np.asarray(background, dtype=np.float32).reshape(-1)
    if value.size == 1:
        value = np.repeat(value, out_channels)
    if value.size != out_channels or not np.isfinite(value).all():
        raise InputError(None, "background", f"one finite value or {out_channels} (one per output channel)", background)
    return value


def _read_batch(read_tile: ReadTile, origins: Sequence[tuple[int, int]], tile_px: int) -> np.ndarray:
    tiles = np.full((len(origins), tile_px, tile_px, 3), 255, dtype=np.uint8)  # (B, tile, tile, 3)
    for i, (y0, x0) in enumerate(origins):
        tile = np.asarray(read_tile(y0, x0, tile_px))
        if tile.ndim != 3 or tile.shape[2] != 3 or tile.shape[0] > tile_px or tile.shape[1] > tile_px:
            raise InputError(None, "read_tile output", f"a uint8 ({tile_px}, {tile_px}, 3) RGB tile", tile.shape)
        tiles[i, : tile.shape[0], : tile.shape[1]] = tile  # short tiles (image edge) padded white
    return tiles


def _check_prediction(pred, n: int, tile_px: int, out_channels: int) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.shape != (n, tile_px, tile_px, out_channels):
        raise InputError(
            None, "predict_batch output", f"an array of shape ({n}, {tile_px}, {tile_px}, {out_channels})", pred.shape
        )
    pred = pred.astype(np.float32, copy=False)
    if not np.isfinite(pred).all():
        raise InputError(None, "predict_batch output", "finite values", "NaN or inf")
    return pred


def _accumulate(acc: np.ndarray, wsum: np.ndarray, y0: int, x0: int, window: np.ndarray, values: np.ndarray) -> None:
    """acc += window · values and wsum += window over the part of the tile inside the image."""
    h, w = min(window.shape[0], acc.shape[0] - y0), min(window.shape[1], acc.shape[1] - x0)
    win = window[:h, :w]
    acc[y0 : y0 + h, x0 : x0 + w] += win[..., None] * values[:h, :w]
    wsum[y0 : y0 + h, x0 : x0 + w] += win


def _normalise(acc: np.ndarray, wsum: np.ndarray) -> None:
    """acc /= wsum in place, in row strips so disk-backed buffers are never loaded whole."""
    for r in range(0, acc.shape[0], _STRIP_ROWS):
        np.divide(acc[r : r + _STRIP_ROWS], wsum[r : r + _STRIP_ROWS, :, None], out=acc[r : r + _STRIP_ROWS])


def _stitch(
    read_tile: ReadTile,
    predict_batch: PredictBatch,
    shape_hw: tuple[int, int],
    out_channels: int,
    tile_px: int,
    overlap_px: int,
    batch_size: int,
    mask,
    background,
    progress: bool,
    scratch: _Scratch,
) -> tuple[np.ndarray, dict]:
    tile_px, overlap_px = _check_tiling(tile_px, overlap_px)
    height, width = _check_shape(shape_hw)
    if isinstance(out_channels, bool) or not isinstance(out_channels, (int, np.integer)) or out_channels < 1:
        raise InputError(None, "out_channels", "a positive integer", out_channels)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(None, "batch_size", "a positive integer", batch_size)
    mask = _check_mask(mask, (height, width))
    background = _background_vector(background, int(out_channels))

    origins = plan_tiles((height, width), tile_px, overlap_px)
    if mask is None:
        predicted, skipped = origins, []
    else:
        on_tissue = tile_tissue_fraction(origins, tile_px, *mask) > 0
        predicted = [o for o, keep in zip(origins, on_tissue) if keep]
        skipped = [o for o, keep in zip(origins, on_tissue) if not keep]
    window = blend_window(tile_px, overlap_px)  # (tile, tile)
    acc = scratch.zeros((height, width, int(out_channels)), np.float32)  # Σ w · prediction, (H, W, C)
    wsum = scratch.zeros((height, width), np.float32)  # Σ w, (H, W)

    # Background tiles contribute the constant with the same window, so tissue blends into it smoothly.
    background_tile = np.broadcast_to(background, (tile_px, tile_px, int(out_channels)))
    for y0, x0 in skipped:
        _accumulate(acc, wsum, y0, x0, window, background_tile)

    start = time.perf_counter()
    batches = [predicted[i : i + batch_size] for i in range(0, len(predicted), batch_size)]
    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        tqdm(total=len(predicted), desc="predict tiles", unit="tile", disable=not progress, leave=False) as bar,
    ):
        # Read the next batch in a thread while the model runs on this one (decoding overlaps compute).
        pending = reader.submit(_read_batch, read_tile, batches[0], tile_px) if batches else None
        for i, batch in enumerate(batches):
            tiles = pending.result()  # (B, tile, tile, 3) uint8
            if i + 1 < len(batches):
                pending = reader.submit(_read_batch, read_tile, batches[i + 1], tile_px)
            pred = _check_prediction(predict_batch(tiles), len(batch), tile_px, int(out_channels))  # (B, tile, tile, C)
            for (y0, x0), values in zip(batch, pred):
                _accumulate(acc, wsum, y0, x0, window, values)
            bar.update(len(batch))
    _normalise(acc, wsum)
    seconds = time.perf_counter() - start
    stats = {
        "tiles_predicted": len(predicted),
        "tiles_skipped": len(skipped),
        "predict_seconds": seconds,
        "tiles_per_s": len(predicted) / seconds if seconds > 0 else float("nan"),
    }
    log.info(
        "stitched %d × %d px × %d ch: %d tiles predicted, %d background tiles skipped, %.1f tiles/s",
        height,
        width,
        out_channels,
        len(predicted),
        len(skipped),
        stats["tiles_per_s"],
    )
    return acc, stats


def stitch_predict(
    read_tile: ReadTile,
    predict_batch: PredictBatch,
    shape_hw: tuple[int, int],
    out_channels: int,
    tile_px: int,
    overlap_px: int,
    batch_size: int,
    mask=None,
    progress: bool = True,
    accumulator_dir: str | Path | None = None,
    *,
    background=0.0,
    memmap_above_values: int = MEMMAP_ABOVE_VALUES,
) -> np.ndarray:
    """Predict an image tile by tile and blend the tiles into one float32 (H, W, C) array.

    ``read_tile(y0, x0, tile_px)`` returns uint8 (tile, tile, 3) (a smaller array at the image
    edge is padded white); ``predict_batch`` maps uint8 (B, tile, tile, 3) to float (B, tile, tile, C).
    Each pixel is Σ w·prediction / Σ w over the tiles covering it (:func:`blend_window`).
    ``mask = (bool (h, w) array, image px per mask px)`` skips tiles with no tissue; those count as
    a constant ``background`` prediction (one value, or one per channel), blended like the others.
    When H·W·C exceeds ``memmap_above_values`` the accumulators are ``np.memmap`` files in a
    temporary folder under ``accumulator_dir`` (system temp when None), removed before returning;
    the returned array is then that memmap (still readable on POSIX after the unlink).
    """
    with _Scratch(accumulator_dir, memmap_above_values) as scratch:
        result, _ = _stitch(
            read_tile,
            predict_batch,
            shape_hw,
            out_channels,
            tile_px,
            overlap_px,
            batch_size,
            mask,
            background,
            progress,
            scratch,
        )
    return result


# ---------------------------------------------------------------------------------------------
# Pyramids


def clip_to_uint8(values: np.ndarray) -> np.ndarray:
    """Predictions on the 0–255 grey scale to uint8 (rounded, clipped). The default ``to_uint8``."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def downsample2x_area(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, ...) → (H // 2, W // 2, ...) by averaging 2 × 2 blocks (an odd last row/column is dropped).

    Integer images are rounded to the nearest integer; written in row strips into ``out`` if given.
    """
    h, w = image.shape[0] // 2, image.shape[1] // 2
    if out is None:
        out = np.empty((h, w, *image.shape[2:]), dtype=image.dtype)
    for r in range(0, h, _STRIP_ROWS):
        rows = slice(2 * r, 2 * min(r + _STRIP_ROWS, h))
        block = np.asarray(image[rows, : 2 * w], dtype=np.float64 if image.dtype.kind == "f" else np.int64)
        total = block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]
        if image.dtype.kind == "f":
            out[r : r + _STRIP_ROWS] = total / 4
        else:
            out[r : r + _STRIP_ROWS] = (total + 2) // 4  # round half up, exact in integers
    return out


def edge_padded_tiles(
    image: np.ndarray, tile_px: int = TILE_PX, convert: Callable[[np.ndarray], np.ndarray] | None = None
) -> Iterator[np.ndarray]:
    """Full-size tiles of an (H, W, ...) image in the row-major order TIFF stores them.

    Edge tiles are padded by repeating the last row/column rather than with white: the padding is
    never shown, but a JPEG block half image, half white rings back into the image's last pixels.
    ``convert`` (e.g. float → uint8) is applied to each block before padding.
    """
    h, w = image.shape[:2]
    for y0, x0 in tile_grid(h, w, tile_px):
        block = np.asarray(image[y0 : y0 + tile_px, x0 : x0 + tile_px])
        if convert is not None:
            block = convert(block)
        short = (tile_px - block.shape[0], tile_px - block.shape[1])
        if short != (0, 0):
            block = np.pad(block, ((0, short[0]), (0, short[1])) + ((0, 0),) * (block.ndim - 2), mode="edge")
        yield block


def pyramid_tiles(
    level0: np.ndarray,
    to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
    tile_px: int = TILE_PX,
    scratch: _Scratch | None = None,
) -> Callable[[int, tuple[int, int]], Iterator[np.ndarray]]:
    """``tiles_for_level`` for :func:`data_shards.ome_tiff.write_pyramidal_ome_tiff` from a stitched array.

    Level 0 tiles are converted with ``to_uint8`` (default :func:`clip_to_uint8`) tile by tile, so
    no second full-size copy is made; level 1 is the 2× area average of the converted level 0
    (averaged in display space, as a viewer would), each further level 2× of the one before.
    Levels are built when asked for, in ``scratch`` buffers (RAM or disk) when given.
    """
    convert = to_uint8 or clip_to_uint8
    levels: dict[int, np.ndarray] = {}

    def converted(block: np.ndarray) -> np.ndarray:
        out = np.asarray(convert(np.asarray(block)))
        if out.dtype != np.uint8 or out.shape != block.shape[:2] + (3,):
            raise InputError(
                None, "to_uint8 output", f"uint8 of shape {block.shape[:2] + (3,)}", f"{out.dtype} {out.shape}"
            )
        return out

    def level_array(level: int) -> np.ndarray:
        if level not in levels:
            if level == 1:
                h, w = level0.shape[0] // 2, level0.shape[1] // 2
                out = scratch.zeros((h, w, 3), np.uint8) if scratch is not None else np.empty((h, w, 3), np.uint8)
                for r in range(0, h, _STRIP_ROWS):
                    strip = converted(level0[2 * r : 2 * min(r + _STRIP_ROWS, h)])
                    downsample2x_area(strip, out=out[r : r + _STRIP_ROWS])
            else:
                previous = level_array(level - 1)
                shape = (previous.shape[0] // 2, previous.shape[1] // 2, 3)
                out = downsample2x_area(previous, scratch.zeros(shape, np.uint8) if scratch is not None else None)
            levels[level] = out
        return levels[level]

    def tiles_for_level(level: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
        if level == 0:
            yield from edge_padded_tiles(level0, tile_px, converted)
            return
        array = level_array(level)
        if array.shape[:2] != tuple(shape):
            raise RuntimeError(f"pyramid level {level} is {array.shape[:2]}, the writer expects {shape}")
        yield from edge_padded_tiles(array, tile_px)

    return tiles_for_level


def write_multichannel_ome_tiff(
    path: str | Path,
    array_hwc: np.ndarray,
    um_per_px: float,
    channel_names: Sequence[str],
    *,
    dtype: str | None = None,
    tile_px: int = TILE_PX,
    compression: str = "zlib",
    description: str = "virtual multiplex IF",
    scratch_dir: str | Path | None = None,
    memmap_above_values: int = MEMMAP_ABOVE_VALUES,
) -> Path:
    """Write a (C, Y, X) pyramidal OME-TIFF of float32/uint16/uint8 channels with names, atomically.

    ``array_hwc`` (H, W, C) may be a memmap; ``dtype`` (default: the array's) is float32, uint16
    or uint8 — integers are rounded and clipped to their range. Levels follow
    ``data_shards.ome_tiff.pyramid_shapes`` (2× area averages, each level in a SubIFD of its
    channel's page), ``PhysicalSizeX/Y`` is ``um_per_px`` µm. Compression is lossless (zlib) so
    marker intensities are kept. Coarser levels larger than ``memmap_above_values`` values are
    built in memmap files under ``scratch_dir`` (system temp when None), removed afterwards.
    """
    path = Path(path)
    array_hwc = np.asarray(array_hwc)  # a memmap stays disk-backed
    if array_hwc.ndim != 3 or array_hwc.shape[0] < 1 or array_hwc.shape[1] < 1:
        raise InputError(path, "array", "an (H, W, C) array", array_hwc.shape)
    names = [str(n) for n in channel_names]
    if len(names) != array_hwc.shape[2] or len(set(names)) != len(names):
        raise InputError(path, "channel_names", f"{array_hwc.shape[2]} distinct names (one per channel)", channel_names)
    out_dtype = np.dtype(dtype or array_hwc.dtype)
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.uint8)):
        raise InputError(path, "dtype", "float32, uint16 or uint8", out_dtype)
    if not (isinstance(um_per_px, (int, float, np.floating)) and np.isfinite(um_per_px) and um_per_px > 0):
        raise InputError(path, "um_per_px", "a positive pixel size in µm", um_per_px)

    def cast(block: np.ndarray) -> np.ndarray:
        if out_dtype.kind == "f":
            return block.astype(out_dtype, copy=False)
        info = np.iinfo(out_dtype)
        return np.clip(np.rint(block), info.min, info.max).astype(out_dtype)

    height, width, n_channels = array_hwc.shape
    shapes = pyramid_shapes(height, width)

    def planes(level_array: np.ndarray, shape: tuple[int, int]) -> Iterator[np.ndarray]:
        """Tiles in the order tifffile stores them: channel by channel, row-major within a channel."""
        for c in range(n_channels):
            yield from edge_padded_tiles(level_array[..., c], tile_px, cast)

    common = dict(
        dtype=out_dtype,
        tile=(tile_px, tile_px),
        photometric="minisblack",
        compression=compression,
        resolutionunit="CENTIMETER",
    )
    log.info("writing %s: %d channels, %d levels %s, %.4f µm/px", path.name, n_channels, len(shapes), shapes, um_per_px)
    with (
        _Scratch(scratch_dir, memmap_above_values) as scratch,
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif,
    ):
        level_array = array_hwc
        for level, shape in enumerate(shapes):
            if level > 0:
                # pyramid_shapes halves with floor, exactly what 2 × 2 block averaging gives.
                level_array = downsample2x_area(level_array, scratch.zeros((*shape, n_channels), level_array.dtype))
            px_per_cm = 1e4 / (um_per_px * width / shape[1])
            extra = (
                dict(
                    subifds=len(shapes) - 1,
                    metadata={
                        "axes": "CYX",
                        "Name": description,
                        "Channel": {"Name": names},
                        "PhysicalSizeX": float(um_per_px),
                        "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": float(um_per_px),
                        "PhysicalSizeYUnit": "µm",
                    },
                )
                if level == 0
                else dict(subfiletype=1, metadata=None)
            )
            tif.write(
                planes(level_array, shape),
                shape=(n_channels, *shape),
                resolution=(px_per_cm, px_per_cm),
                **common,
                **extra,
            )
    return path


# ---------------------------------------------------------------------------------------------
# Whole slide


def _slide_tissue_mask(slide, level: int, thumbnail_max_side: int) -> tuple[np.ndarray, float]:
    """Tissue mask of the slide's thumbnail and its downsample relative to ``level`` pixels."""
    thumbnail, thumb_downsample = slide.thumbnail(thumbnail_max_side)  # downsample from level 0
    return tissue_mask(thumbnail), thumb_downsample / slide.downsample(level)


def predict_slide_to_ome_tiff(
    slide_path: str | Path,
    out_path: str | Path,
    predict_batch: PredictBatch,
    *,
    tile_px: int = 512,
    overlap_px: int = 64,
    batch_size: int = 8,
    level: int = 0,
    to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
    tissue_only: bool = True,
    progress: bool = True,
    description: str = "virtual IHC",
    channel_names: Sequence[str] | None = None,
    background=None,
    slide_um_per_px: float | None = None,
    quality: int = 95,
    multichannel_dtype: str = "float32",
    accumulator_dir: str | Path | None = None,
    memmap_above_values: int = MEMMAP_ABOVE_VALUES,
    thumbnail_max_side: int = 2048,
) -> dict:
    """Run an image-to-image model over a whole H&E slide and write the stitched prediction.

    RGB output (``channel_names`` None; ``predict_batch`` returns 3 channels): a pyramidal, tiled,
    JPEG (``quality``) RGB OME-TIFF like the input, through ``write_pyramidal_ome_tiff``;
    ``to_uint8`` maps predictions to uint8 (default: they are on the 0–255 scale, rounded and
    clipped). Multi-channel output (``channel_names`` given, one per predicted channel): a
    (C, Y, X) ``multichannel_dtype`` OME-TIFF pyramid (:func:`write_multichannel_ome_tiff`).
    The slide is read at pyramid ``level``; the output has that level's shape and µm/px.
    ``tissue_only`` skips tiles with no tissue in the thumbnail's mask (``data_shards.qc.tissue_mask``);
    they get ``background`` in prediction units (default: 255, white glass, for RGB; 0, no signal,
    for multi-channel).
    Returns a summary: tiles predicted / skipped, seconds, tiles/s, output path, shape, µm/px, levels.
    """
    start = time.perf_counter()
    slide_path, out_path = Path(slide_path), Path(out_path)
    tile_px, overlap_px = _check_tiling(tile_px, overlap_px)
    out_channels = 3 if channel_names is None else len(channel_names)
    if channel_names is not None:  # checked here too, so a bad name fails before hours of inference
        if out_channels < 1 or len({str(n) for n in channel_names}) != out_channels:
            raise InputError(None, "channel_names", "one or more distinct channel names", channel_names)
        if np.dtype(multichannel_dtype) not in (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.uint8)):
            raise InputError(None, "multichannel_dtype", "float32, uint16 or uint8", multichannel_dtype)
    if background is None:
        background = 255.0 if channel_names is None else 0.0
    with Slide(slide_path, um_per_px=slide_um_per_px) as slide:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(slide.levels):
            raise InputError(slide_path, "level", f"a pyramid level in [0, {len(slide.levels)})", level)
        shape_hw = slide.levels[level]
        um_per_px = float(slide.um_per_px) * slide.downsample(level)
        mask = _slide_tissue_mask(slide, level, thumbnail_max_side) if tissue_only else None

        def read_tile(y0: int, x0: int, size: int) -> np.ndarray:
            return slide.read_region(x0, y0, size, size, level=level)

        with _Scratch(accumulator_dir, memmap_above_values) as scratch:
            result, stats = _stitch(
                read_tile,
                predict_batch,
                shape_hw,
                out_channels,
                tile_px,
                overlap_px,
                batch_size,
                mask,
                background,
                progress,
                scratch,
            )  # (H, W, C) float32
            if channel_names is None:
                tiles_for_level = pyramid_tiles(result, to_uint8, TILE_PX, scratch)
                write_pyramidal_ome_tiff(
                    out_path,
                    shape_hw,
                    um_per_px,
                    tiles_for_level,
                    quality=quality,
                    tile_px=TILE_PX,
                    description=description,
                    progress=progress,
                )
            else:
                write_multichannel_ome_tiff(
                    out_path,
                    result,
                    um_per_px,
                    channel_names,
                    dtype=multichannel_dtype,
                    description=description,
                    scratch_dir=accumulator_dir,
                    memmap_above_values=memmap_above_values,
                )
    summary = {
        "out_path": str(out_path),
        "slide_path": str(slide_path),
        "shape_hw": [int(v) for v in shape_hw],
        "channels": list(channel_names) if channel_names is not None else ["R", "G", "B"],
        "um_per_px": um_per_px,
        "level": int(level),
        "levels": len(pyramid_shapes(*shape_hw)),
        "tile_px": tile_px,
        "overlap_px": overlap_px,
        **stats,
        "seconds": time.perf_counter() - start,
    }
    log.info("%s → %s: %d tiles in %.1f s", slide_path.name, out_path, stats["tiles_predicted"], summary["seconds"])
    return summary
