"""Cell-centred H&E crops read from a pyramidal slide, each image tile decoded once.

Coordinates
-----------
Cell centres come in H&E **level-0 pixels**, (x, y), x to the right, y down, with integer
coordinates at pixel *centres* (the scikit-image / scipy.ndimage convention): the pixel
``image[r, c]`` is centred at (x=c, y=r).

A crop is uint8 (S, S, 3), indexed ``crop[y, x]``, and the cell centre sits on the pixel
``crop[S // 2, S // 2]`` ((112, 112) for S = 224).

* Level-0 crops (``target_um_per_px`` None, or within 0.1 % of the slide's µm/pixel): the centre is
  rounded to the nearest level-0 pixel (halves round up), so the crop is centred within 0.5 px and
  its pixels are the slide's own pixels, untouched. The same holds at a pyramid level whose pixel
  size matches the target (e.g. 0.5 µm/px from level 1 of a 0.25 µm/px slide).
* Resampled crops (``target_um_per_px`` set): each crop pixel covers ``target_um_per_px`` µm.
  Crops are cut from a virtual image at the target resolution anchored at the slide origin
  (crop-grid pixel u spans level-0 [u * f, (u + 1) * f), f = target / slide µm/pixel), so the
  centre is rounded to the nearest crop-grid pixel: centred within 0.5 crop pixel. Pixels are read
  from the coarsest pyramid level that is still at least as fine as the target and resampled with
  PIL's Lanczos filter (antialiased when shrinking), once per block for all its crops.

How the slide is read (the "blocks" route)
------------------------------------------
The read level is cut into tile-aligned blocks of about ``block_px`` pixels, visited row by row,
left to right. Each cell belongs to the block holding the bottom-right pixel of its read window,
so when that block is decoded, every pixel the crop needs is either in the block or in the block
to its left, above, or above-left, all decoded earlier. Two small carries keep those pixels: the
last ``K - 1`` columns of the previous block and the last ``K - 1`` rows of the previous band of
blocks (K = read-window side). Each block is read once with ``Slide.read_region`` (which decodes
only its tiles through tifffile's zarr store), so every tile is decoded once; memory is one block
plus a (K - 1)-row strip as wide as the slide. Blocks no cell touches are never decoded.

The "naive" route reads the window of every cell separately (the benchmark baseline). Both routes
give identical pixels without resampling; with resampling they agree up to the rounding of PIL's
fixed-point filter weights (a grey level or two in a small fraction of pixels), because the same
crop-grid pixels are computed from windows with different origins.

Cells whose crop leaves the slide are padded with white (255, like bare glass) or skipped
(``out_of_bounds``), and counted. (When resampling, the filter of a crop that ends right at the
slide edge also reaches a few white pixels past it.) A tile that cannot be decoded skips the cells whose windows touch
it (counted as unreadable, logged once per block) or raises (``on_read_error``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.errors import InputError, finite_points

from .slide import Slide

log = logging.getLogger(__name__)

FILL = 255  # white, like glass, for pixels outside the slide
_LANCZOS_SUPPORT = 3.0  # PIL's Lanczos kernel half-width in source pixels (times the shrink factor)
_SAME_SCALE_RTOL = 1e-3  # a target within 0.1 % of the slide's µm/pixel is read at level 0 unresized


@dataclass
class CropStats:
    """What happened to the cells of one ``iter_crops`` run."""

    n_cells: int = 0  # cells asked for
    n_cropped: int = 0  # crops yielded (padded ones included)
    n_padded: int = 0  # yielded crops that reach outside the slide (filled with white)
    n_skipped_out_of_bounds: int = 0  # not yielded: crop leaves the slide and out_of_bounds="skip"
    n_skipped_unreadable: int = 0  # not yielded: window touches a tile that could not be decoded
    n_regions_read: int = 0  # Slide.read_region calls
    n_pixels_read: int = 0  # pixels requested from the slide (read level), a proxy for decode work

    @property
    def n_skipped(self) -> int:
        return self.n_skipped_out_of_bounds + self.n_skipped_unreadable

    def as_dict(self) -> dict:
        return {**asdict(self), "n_skipped": self.n_skipped}


@dataclass
class CropPlan:
    """Where each cell's pixels come from, at the read level.

    window_xy: (n, 2) int64 top-left (x, y) of each cell's read window, read-level pixels; the
        window is ``window_hw`` = (height, width) pixels, the same for every cell.
    crop_uv: (n, 2) int64 top-left (u, v) of each crop on the crop grid (crop-grid pixel u spans
        read-level [u * scale_x, (u + 1) * scale_x)); equal to window_xy when not resampling.
    outside: (n,) bool, the crop footprint reaches outside the slide.
    order: (m,) int64 indices of the cells to visit, in visiting order (skipped cells left out).
    block_hw: (height, width) of the tile-aligned blocks the slide is read in, read-level pixels.
    """

    level: int
    window_xy: np.ndarray
    window_hw: tuple[int, int]
    crop_uv: np.ndarray
    outside: np.ndarray
    order: np.ndarray
    block_hw: tuple[int, int]


def _check_centres(centres_px: np.ndarray, path) -> np.ndarray:
    return finite_points(centres_px, path, "cell centres (x, y) [level-0 px]")


def _nominal_downsample_xy(slide: Slide, level: int) -> tuple[float, float]:
    """Level-0 pixels per pixel of ``level`` along (x, y).

    Pyramids halve with floor or ceil, so size ratios are only near powers of two (701 / 351);
    the pixel grid itself is scaled by the whole factor, which is what coordinates need.
    """
    h0, w0 = slide.levels[0]
    hl, wl = slide.levels[level]
    factors = []
    for full, reduced in ((w0, wl), (h0, hl)):
        whole = max(1, round(full / reduced))
        # reduced == floor or ceil of full / whole: the level is an exact ``whole``-fold reduction
        factors.append(float(whole) if abs(reduced * whole - full) < whole else full / reduced)
    return factors[0], factors[1]


class CropReader:
    """Cell-centred crops from one slide.

    slide: an open ``Slide``. crop_size_px: side S of the square crop (pixels).
    target_um_per_px: µm per crop pixel; None reads level-0 pixels as they are.
    out_of_bounds: "pad" (white) or "skip" for crops that leave the slide.
    on_read_error: "skip" (count the cells, log, go on) or "raise" for undecodable tiles.
    block_px: approximate block side at the read level (rounded to whole tiles, at least a window).
    """

    def __init__(
        self,
        slide: Slide,
        crop_size_px: int = 224,
        target_um_per_px: float | None = None,
        out_of_bounds: str = "pad",
        on_read_error: str = "skip",
        block_px: int = 2048,
        progress: bool = False,
    ):
        if out_of_bounds not in ("pad", "skip"):
            raise InputError(None, "crop.out_of_bounds", '"pad" or "skip"', out_of_bounds)
        if on_read_error not in ("skip", "raise"):
            raise InputError(None, "crop.on_read_error", '"skip" or "raise"', on_read_error)
        if int(crop_size_px) < 2:
            raise InputError(None, "crop.size_px", "a crop side of at least 2 pixels", crop_size_px)
        if target_um_per_px is not None and not (np.isfinite(target_um_per_px) and target_um_per_px > 0):
            raise InputError(None, "crop.target_um_per_px", "a positive µm/pixel or null", target_um_per_px)
        self.slide = slide
        self.size = int(crop_size_px)
        self.out_of_bounds = out_of_bounds
        self.on_read_error = on_read_error
        self.block_px = int(block_px)
        self.progress = progress
        self.stats = CropStats()

        # level-0 pixels per crop pixel
        factor = 1.0 if target_um_per_px is None else float(target_um_per_px) / slide.um_per_px
        self.level = self._read_level(factor)
        self.level_downsample_xy = _nominal_downsample_xy(slide, self.level)
        # a level whose pixels already have the target size is sliced, not resized
        self.resample = any(abs(factor / d - 1.0) > _SAME_SCALE_RTOL for d in self.level_downsample_xy)
        # the crop grid: crop-grid pixel u spans level-0 [u * f, (u + 1) * f), anchored at the slide origin
        self.crop_px_level0_xy = (factor, factor) if self.resample else self.level_downsample_xy
        # read-level pixels per crop pixel, per axis (1 when not resampling)
        self.scale_xy = tuple(f / d for f, d in zip(self.crop_px_level0_xy, self.level_downsample_xy))
        if self.resample:
            margins = [int(math.ceil(_LANCZOS_SUPPORT * max(s, 1.0))) + 1 for s in self.scale_xy]
            self._margin_xy = tuple(margins)
            # fixed window side (height, width): covers a crop's footprint plus the filter's reach
            self.window_hw = tuple(
                int(math.ceil(self.size * s)) + 2 * m + 1 for s, m in zip(self.scale_xy[::-1], margins[::-1])
            )
        else:
            self._margin_xy = (0, 0)
            self.window_hw = (self.size, self.size)

    def _read_level(self, factor: float) -> int:
        """The coarsest pyramid level whose pixels are no larger than ``factor`` level-0 pixels."""
        best = 0
        for level in range(len(self.slide.levels)):
            if max(_nominal_downsample_xy(self.slide, level)) <= factor * (1 + _SAME_SCALE_RTOL):
                best = level
        return best

    @classmethod
    def from_config(cls, slide: Slide, cfg: Mapping, progress: bool = False) -> CropReader:
        """Keys (all optional): size_px, target_um_per_px, out_of_bounds, on_read_error, block_px."""
        return cls(
            slide,
            crop_size_px=int(cfg.get("size_px", 224)),
            target_um_per_px=cfg.get("target_um_per_px", None),
            out_of_bounds=str(cfg.get("out_of_bounds", "pad")),
            on_read_error=str(cfg.get("on_read_error", "skip")),
            block_px=int(cfg.get("block_px", 2048)),
            progress=progress,
        )

    # ------------------------------------------------------------------ planning
    def plan(self, centres_px: np.ndarray) -> CropPlan:
        """Read windows, out-of-bounds flags and the visiting order for (n, 2) level-0 centres."""
        centres = _check_centres(centres_px, self.slide.path)
        n = len(centres)
        hl, wl = self.slide.levels[self.level]
        kh, kw = self.window_hw
        half = self.size // 2
        # crop-grid pixel holding the cell centre (level-0 pixel-centre coordinates -> edges)
        centre_uv = np.floor((centres + 0.5) / np.array(self.crop_px_level0_xy)).astype(np.int64)
        crop_uv = centre_uv - half  # (n, 2) top-left of each crop, crop-grid pixels
        sx, sy = self.scale_xy
        # crop footprint in read-level edge coordinates
        left, top = crop_uv[:, 0] * sx, crop_uv[:, 1] * sy
        right, bottom = (crop_uv[:, 0] + self.size) * sx, (crop_uv[:, 1] + self.size) * sy
        if self.resample:
            mx, my = self._margin_xy
            window = np.stack([np.floor(left).astype(np.int64) - mx, np.floor(top).astype(np.int64) - my], axis=1)
        else:
            window = crop_uv
        outside = (left < 0) | (top < 0) | (right > wl) | (bottom > hl)

        bh, bw = self._block_hw()
        # each cell belongs to the block holding its window's bottom-right pixel
        band = (window[:, 1] + kh - 1) // bh
        column = (window[:, 0] + kw - 1) // bw
        keep = ~outside if self.out_of_bounds == "skip" else np.ones(n, dtype=bool)
        # visit blocks row by row, left to right; inside a block, cells by (y, x) of their centre
        order = np.lexsort((centres[:, 0], centres[:, 1], column, band))
        order = order[keep[order]]
        return CropPlan(self.level, window, (kh, kw), crop_uv, outside, order.astype(np.int64), (bh, bw))

    def _block_hw(self) -> tuple[int, int]:
        th, tw = self.slide.tile_hw(self.level)
        kh, kw = self.window_hw
        bh = th * max(math.ceil(self.block_px / th), math.ceil(kh / th))
        bw = tw * max(math.ceil(self.block_px / tw), math.ceil(kw / tw))
        return bh, bw

    # ------------------------------------------------------------------ pixels
    def _resize(
        self, image: np.ndarray, origin_xy: tuple[int, int], uv0: tuple[int, int], size_uv: tuple[int, int]
    ) -> np.ndarray:
        """Resample read-level pixels onto crop-grid pixels.

        image: (h, w, 3) read-level pixels whose top-left pixel is ``origin_xy``; returns crop-grid
        pixels [u0, u0 + width) x [v0, v0 + height) as uint8 (height, width, 3). The Lanczos filter
        (antialiased when shrinking) needs ``_margin_xy`` pixels of image around that footprint.
        """
        sx, sy = self.scale_xy
        (u0, v0), (width, height) = uv0, size_uv
        ox, oy = origin_xy
        box = (u0 * sx - ox, v0 * sy - oy, (u0 + width) * sx - ox, (v0 + height) * sy - oy)  # PIL edge coords
        image = Image.fromarray(np.ascontiguousarray(image))
        resized = image.resize((width, height), Image.Resampling.LANCZOS, box=box)
        return np.asarray(resized)

    def _read(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        self.stats.n_regions_read += 1
        self.stats.n_pixels_read += width * height
        return self.slide.read_region(x0, y0, width, height, level=self.level, fill=FILL)

    def _read_block(self, x0: int, y0: int, width: int, height: int, bad_rects: list) -> np.ndarray:
        """One block; on a decoding error, retry tile by tile and remember the bad tiles."""
        try:
            return self._read(x0, y0, width, height)
        except InputError:
            if self.on_read_error == "raise":
                raise
        th, tw = self.slide.tile_hw(self.level)
        out = np.full((height, width, 3), FILL, dtype=np.uint8)
        for ty in range(y0, y0 + height, th):
            for tx in range(x0, x0 + width, tw):
                try:
                    out[ty - y0 : ty - y0 + th, tx - x0 : tx - x0 + tw] = self._read(tx, ty, tw, th)
                except InputError as exc:
                    log.warning("%s", exc)
                    bad_rects.append((tx, ty, tx + tw, ty + th))
        return out

    # ------------------------------------------------------------------ iteration
    def iter_crops(self, centres_px: np.ndarray, route: str = "blocks") -> Iterator[tuple[int, np.ndarray]]:
        """Yield (cell index, uint8 (S, S, 3) crop) in spatial order; ``self.stats`` counts the run.

        route: "blocks" (each tile decoded once) or "naive" (one read per cell, for benchmarks).
        """
        if route not in ("blocks", "naive"):
            raise InputError(None, "route", '"blocks" or "naive"', route)
        plan = self.plan(centres_px)
        self.stats = CropStats(n_cells=len(plan.window_xy))
        if self.out_of_bounds == "skip":
            self.stats.n_skipped_out_of_bounds = int(plan.outside.sum())
        bar = tqdm(total=len(plan.order), desc=f"crops ({route})", unit="cell", disable=not self.progress)
        try:
            if route == "naive":
                yield from self._iter_naive(plan, bar)
            else:
                yield from self._iter_blocks(plan, bar)
        finally:
            bar.close()
        if self.stats.n_skipped:
            log.info("crops of %s: %s", self.slide.path.name, self.stats.as_dict())

    def _iter_naive(self, plan: CropPlan, bar) -> Iterator[tuple[int, np.ndarray]]:
        kh, kw = plan.window_hw
        for i in plan.order:
            x0, y0 = plan.window_xy[i]
            try:
                window = self._read(int(x0), int(y0), kw, kh)
            except InputError as exc:
                if self.on_read_error == "raise":
                    raise
                log.debug("cell %d skipped: %s", i, exc)
                self.stats.n_skipped_unreadable += 1
                bar.update(1)
                continue
            self._count_yield(plan, i)
            bar.update(1)
            if self.resample:
                window = self._resize(window, (int(x0), int(y0)), tuple(plan.crop_uv[i]), (self.size, self.size))
            yield int(i), window

    def _count_yield(self, plan: CropPlan, i: int) -> None:
        self.stats.n_cropped += 1
        self.stats.n_padded += bool(plan.outside[i])

    def _iter_blocks(self, plan: CropPlan, bar) -> Iterator[tuple[int, np.ndarray]]:
        order = plan.order
        if len(order) == 0:
            return
        kh, kw = plan.window_hw
        bh, bw = plan.block_hw
        carry_h, carry_w = kh - 1, kw - 1
        wxy = plan.window_xy[order]  # (m, 2) windows in visiting order
        cell_band = (wxy[:, 1] + kh - 1) // bh
        cell_col = (wxy[:, 0] + kw - 1) // bw

        # blocks any kept window touches: a window spans at most 2 x 2 blocks (blocks >= windows)
        band_lo = int(cell_band.min()) - 1
        col_lo, col_hi = int(cell_col.min()) - 1, int(cell_col.max())
        n_cols = col_hi - col_lo + 1
        corners = [
            ((wxy[:, 1] + dy) // bh - band_lo) * n_cols + (wxy[:, 0] + dx) // bw - col_lo
            for dy in (0, kh - 1)
            for dx in (0, kw - 1)
        ]
        keys = np.unique(np.concatenate(corners))  # sorted: band by band, left to right
        touched = np.stack([keys // n_cols + band_lo, keys % n_cols + col_lo], axis=1)
        col_min, col_max = int(touched[:, 1].min()), int(touched[:, 1].max())
        x_origin = col_min * bw - carry_w  # column 0 of the strip buffers, read-level x
        strip_w = (col_max + 1) * bw - x_origin
        top_strip = np.full((carry_h, strip_w, 3), FILL, dtype=np.uint8)  # last rows of previous band
        next_strip = np.full_like(top_strip, FILL)
        canvas = np.full((carry_h + bh, carry_w + bw, 3), FILL, dtype=np.uint8)
        bad_rects: list[tuple[int, int, int, int]] = []

        # cells grouped by their block, in visiting order (order is sorted by band, column)
        cell_key = np.stack([cell_band, cell_col], axis=1)
        starts = np.flatnonzero(np.r_[True, (np.diff(cell_key, axis=0) != 0).any(axis=1)])
        stops = np.r_[starts[1:], len(order)]
        group_of_block = {tuple(cell_key[s]): (s, e) for s, e in zip(starts, stops)}

        previous_band, previous_col = None, None
        for band, col in touched:
            band, col = int(band), int(col)
            if band != previous_band:
                if previous_band is not None:
                    top_strip, next_strip = next_strip, top_strip
                    if band != previous_band + 1:  # a gap: nothing above is ever needed
                        top_strip.fill(FILL)
                    next_strip.fill(FILL)
                previous_col = None
            y0, x0 = band * bh, col * bw
            # canvas covers read-level rows [y0 - carry_h, y0 + bh), columns [x0 - carry_w, x0 + bw)
            sx = x0 - carry_w - x_origin
            canvas[:carry_h] = top_strip[:, sx : sx + carry_w + bw]
            if previous_col != col - 1:
                canvas[carry_h:, :carry_w] = FILL
            else:
                canvas[carry_h:, :carry_w] = canvas[carry_h:, bw : bw + carry_w]  # previous block's right edge
            canvas[carry_h:, carry_w:] = self._read_block(x0, y0, bw, bh, bad_rects)
            next_strip[:, sx + carry_w : sx + carry_w + bw] = canvas[bh:, carry_w:]
            previous_band, previous_col = band, col

            span = group_of_block.get((band, col))
            if span is None:
                continue
            cells = order[span[0] : span[1]]
            windows = wxy[span[0] : span[1]]
            unreadable = self._touches(windows, plan.window_hw, bad_rects)
            if unreadable.any():
                n_bad = int(unreadable.sum())
                self.stats.n_skipped_unreadable += n_bad
                log.warning(
                    "%s: %d cells of block (band %d, column %d) skipped: their windows touch an unreadable tile",
                    self.slide.path.name,
                    n_bad,
                    band,
                    col,
                )
            cy0, cx0 = y0 - carry_h, x0 - carry_w
            if self.resample and not unreadable.all():
                # one resize for all crops of the block: the bounding box of their crop-grid footprints
                uv = plan.crop_uv[cells[~unreadable]]
                uv0 = uv.min(axis=0)
                size_uv = uv.max(axis=0) - uv0 + self.size
                # only the part of the canvas those crops' windows cover (all windows lie in the canvas)
                (ax, ay), (bx, by) = windows.min(axis=0), windows.max(axis=0) + (kw, kh)
                region = canvas[ay - cy0 : by - cy0, ax - cx0 : bx - cx0]
                source = self._resize(region, (int(ax), int(ay)), tuple(uv0), tuple(size_uv))
            for i, (wx, wy), bad in zip(cells, windows, unreadable):
                bar.update(1)
                if bad:
                    continue
                self._count_yield(plan, i)
                if self.resample:
                    u, v = plan.crop_uv[i] - uv0
                    crop = source[v : v + self.size, u : u + self.size].copy()
                else:  # a copy: the canvas is overwritten by the next block
                    crop = canvas[wy - cy0 : wy - cy0 + kh, wx - cx0 : wx - cx0 + kw].copy()
                yield int(i), crop

    @staticmethod
    def _touches(windows: np.ndarray, window_hw: tuple[int, int], rects: list) -> np.ndarray:
        """(m,) bool: which (m, 2) windows overlap any (x0, y0, x1, y1) rectangle."""
        hit = np.zeros(len(windows), dtype=bool)
        kh, kw = window_hw
        for rx0, ry0, rx1, ry1 in rects:
            hit |= (
                (windows[:, 0] < rx1) & (windows[:, 0] + kw > rx0) & (windows[:, 1] < ry1) & (windows[:, 1] + kh > ry0)
            )
        return hit
