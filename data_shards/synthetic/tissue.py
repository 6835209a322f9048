"""Cells of a synthetic bundle, in H&E level-0 pixels: found on a real H&E, or laid out procedurally.

Both paths return a :class:`CellTable`: per-cell nucleus geometry, cell type and the image
covariates (nucleus stain, nucleus area, eosin context) that expression is tied to.

Real H&E: nuclei are segmented on the hematoxylin channel of a colour deconvolution
(``skimage.color.rgb2hed``), split by a distance-transform watershed, and typed from what the
image shows: epidermis (a smoothed hematoxylin-rich region) holds keratinocytes, basal within
``basal_depth_um`` of the dermis; in the dermis small, dark, round nuclei are immune cells,
nuclei lining a lumen (small hole in the tissue) are endothelial, the rest fibroblasts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .cell_types import CELL_TYPES, LOOKS

log = logging.getLogger(__name__)


@dataclass
class CellTable:
    """One row per cell. Positions and axes in H&E level-0 px; angles in radians from +x toward +y."""

    he_xy_px: np.ndarray  # (n, 2) true nucleus centroid on the H&E
    nucleus_major_px: np.ndarray  # (n,) semi-axis
    nucleus_minor_px: np.ndarray  # (n,) semi-axis
    nucleus_angle_rad: np.ndarray  # (n,)
    cell_type_index: np.ndarray  # (n,) index into CELL_TYPES
    hematoxylin: np.ndarray  # (n,) mean hematoxylin optical density in the nucleus
    context_eosin: np.ndarray  # (n,) mean eosin optical density around the cell

    def __len__(self) -> int:
        return len(self.he_xy_px)

    def subset(self, keep: np.ndarray) -> CellTable:
        return CellTable(**{name: value[keep] for name, value in self.__dict__.items()})


# ---------------------------------------------------------------- real H&E

REGION_UM_PER_PX = 2.0  # tissue-scale fields (epidermis, lumen, eosin context) are computed this coarse


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop connected components smaller than ``min_px`` pixels."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) → (H // factor, W // factor) mean over factor × factor blocks."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: stained (saturated, not white) pixels; holes are kept (they mark lumens)."""
    from skimage import filters

    saturation = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    threshold = filters.threshold_otsu(saturation[::4, ::4])
    return (saturation > threshold) & (rgb.astype(np.int16).sum(axis=2) < 3 * 235)


def _ellipses(labels: np.ndarray, n: int, hema: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label area, centroid, second-moment ellipse and mean hematoxylin (vectorised moments)."""
    flat = labels.ravel()
    on = flat > 0
    lab = flat[on]
    rows, cols = np.divmod(np.flatnonzero(on), labels.shape[1])
    count = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)

    def mean(values):
        return np.bincount(lab, weights=values, minlength=n + 1)[1:] / np.maximum(count, 1)

    cx, cy = mean(cols.astype(np.float64)), mean(rows.astype(np.float64))
    dx, dy = cols - cx[lab - 1], rows - cy[lab - 1]
    sxx, syy, sxy = mean(dx * dx) + 1 / 12, mean(dy * dy) + 1 / 12, mean(dx * dy)
    half_trace, root = (sxx + syy) / 2, np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    l1, l2 = half_trace + root, np.maximum(half_trace - root, 1e-6)
    return {
        "area_px": count,
        "cx": cx,
        "cy": cy,
        "major_px": 2 * np.sqrt(l1),
        "minor_px": 2 * np.sqrt(l2),  # semi-axes of the equal-moment ellipse
        "angle_rad": 0.5 * np.arctan2(2 * sxy, sxx - syy),  # from +x toward +y
        "eccentricity": np.sqrt(1 - l2 / l1),
        "hematoxylin": mean(hema.ravel()[on].astype(np.float64)),
    }


def detect_nuclei(
    rgb: np.ndarray,
    um_per_px: float,
    basal_depth_um: float = 12.0,
    lumen_distance_um: float = 6.0,
) -> CellTable:
    """Segment and type the nuclei of an (H, W, 3) uint8 H&E at ``um_per_px`` µm/px."""
    from skimage import color, feature, filters, segmentation

    log.info("colour deconvolution of a %dx%d H&E", rgb.shape[1], rgb.shape[0])
    hed = color.rgb2hed(rgb).astype(np.float32)
    hema, eosin = hed[..., 0], hed[..., 1]
    tissue = tissue_mask(rgb)
    tissue = _remove_small(ndi.binary_closing(tissue, iterations=max(1, round(2.0 / um_per_px))), 2000.0 / um_per_px**2)
    filled = ndi.binary_fill_holes(tissue)
    hema_s = ndi.gaussian_filter(hema, 1.0)
    threshold = filters.threshold_otsu(hema_s[tissue][::3])
    nuclei = ndi.binary_opening((hema_s > threshold) & filled, structure=np.ones((3, 3), bool))
    nuclei = _remove_small(ndi.binary_fill_holes(nuclei), 6.0 / um_per_px**2)

    # Touching nuclei are split at distance-transform peaks at least ~3 µm apart.
    distance = ndi.distance_transform_edt(nuclei)
    blobs, _ = ndi.label(nuclei)
    peaks = feature.peak_local_max(distance, min_distance=max(1, int(round(3.0 / um_per_px))), labels=blobs)
    markers = np.zeros_like(blobs)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-distance, markers, mask=nuclei)
    props = _ellipses(labels, len(peaks), hema)

    area_um2 = props["area_px"] * um_per_px**2
    keep = (area_um2 >= 8.0) & (area_um2 <= 250.0)
    log.info("nuclei: %d segments, %d kept (8-250 µm²)", len(area_um2), int(keep.sum()))
    props = {k: v[keep] for k, v in props.items()}
    area_um2 = area_um2[keep]
    xy = np.stack([props["cx"], props["cy"]], axis=1)

    # Tissue-scale context on a coarse grid (REGION_UM_PER_PX), sampled at each nucleus.
    factor = max(1, int(round(REGION_UM_PER_PX / um_per_px)))
    region_um = um_per_px * factor
    tissue_c = _block_mean(tissue.astype(np.float32), factor)
    filled_c = _block_mean(filled.astype(np.float32), factor) > 0.5
    hema_c = _block_mean(np.where(tissue, hema, 0.0), factor)
    eosin_c = _block_mean(np.where(tissue, eosin, 0.0), factor)
    weight = np.maximum(ndi.gaussian_filter(tissue_c, 10.0 / region_um), 1e-3)
    hema_ctx = ndi.gaussian_filter(hema_c, 10.0 / region_um) / weight
    eosin_ctx = ndi.gaussian_filter(eosin_c, 8.0 / region_um) / weight
    tissue_cb = tissue_c > 0.5
    epidermis = (hema_ctx > filters.threshold_otsu(hema_ctx[tissue_cb])) & tissue_cb
    epidermis = _remove_small(epidermis, 5000.0 / region_um**2)
    lumen = _remove_small(filled_c & ~tissue_cb, 15.0 / region_um**2)
    lumen_labels, _ = ndi.label(lumen)
    too_big = np.bincount(lumen_labels.ravel()) * region_um**2 > 3000.0
    too_big[0] = False
    lumen &= ~too_big[lumen_labels]

    rows = np.clip((xy[:, 1] / factor).astype(int), 0, epidermis.shape[0] - 1)
    cols = np.clip((xy[:, 0] / factor).astype(int), 0, epidermis.shape[1] - 1)
    depth_um = ndi.distance_transform_edt(epidermis)[rows, cols] * region_um
    lumen_dist_um = ndi.distance_transform_edt(~lumen)[rows, cols] * region_um
    context_eosin = eosin_ctx[rows, cols]

    in_epidermis = depth_um > 0
    small = area_um2 < np.percentile(area_um2, 40)
    dark = props["hematoxylin"] > np.percentile(props["hematoxylin"], 60)
    types = np.full(len(xy), CELL_TYPES.index("fibroblast"))
    types[in_epidermis & (depth_um <= basal_depth_um)] = CELL_TYPES.index("keratinocyte_basal")
    types[in_epidermis & (depth_um > basal_depth_um)] = CELL_TYPES.index("keratinocyte_suprabasal")
    stroma = ~in_epidermis
    types[stroma & (lumen_dist_um <= lumen_distance_um)] = CELL_TYPES.index("endothelial")
    types[stroma & small & dark & (props["eccentricity"] < 0.85)] = CELL_TYPES.index("immune")
    return CellTable(
        xy,
        props["major_px"],
        np.minimum(props["minor_px"], props["major_px"]),
        props["angle_rad"],
        types,
        props["hematoxylin"],
        context_eosin.astype(np.float64),
    )


# ---------------------------------------------------------------- procedural tissue


@dataclass
class ProceduralLayout:
    """Low-resolution fields that describe the tissue, sampled at ``field_um_per_px``."""

    shape_hw_px: tuple[int, int]  # level-0 H&E size
    he_um_per_px: float
    field_um_per_px: float
    tissue: np.ndarray  # (h, w) float in [0, 1]
    epithelium: np.ndarray  # (h, w) float in [0, 1]
    immune: np.ndarray  # (h, w) float in [0, 1]
    eosin: np.ndarray  # (h, w) float eosin optical density of the stroma background


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def procedural_layout(
    rng: np.random.Generator,
    n_cells: int,
    he_um_per_px: float,
    um2_per_cell: float = 110.0,
    field_um_per_px: float = 8.0,
) -> ProceduralLayout:
    """Size the slide so ``n_cells`` fit at about ``um2_per_cell`` µm² of tissue each, and draw its fields."""
    tissue_fraction = 0.72
    side_um = float(np.sqrt(n_cells * um2_per_cell / tissue_fraction))
    shape_px = (int(np.ceil(side_um * 0.9 / he_um_per_px)), int(np.ceil(side_um / 0.9 / he_um_per_px)))
    fshape = (
        max(8, int(np.ceil(shape_px[0] * he_um_per_px / field_um_per_px))),
        max(8, int(np.ceil(shape_px[1] * he_um_per_px / field_um_per_px))),
    )
    yy, xx = np.mgrid[0 : fshape[0], 0 : fshape[1]]
    # A rounded slab of tissue with wavy edges, white glass around it.
    ry = (yy + 0.5) / fshape[0] * 2 - 1
    rx = (xx + 0.5) / fshape[1] * 2 - 1
    edge = np.maximum(np.abs(rx), np.abs(ry)) ** 4 + 0.3 * (rx**2 + ry**2)
    wobble = 0.12 * _smooth_noise(rng, fshape, sigma_px=max(fshape) / 12)
    tissue = 1.0 / (1.0 + np.exp(-(1.05 - edge + wobble) * 25.0))
    gland_scale = 120.0 / field_um_per_px  # epithelial islands ~ a few hundred µm across
    epi = _smooth_noise(rng, fshape, sigma_px=gland_scale)
    epithelium = 1.0 / (1.0 + np.exp(-(epi - 0.6) * 6.0)) * tissue
    imm = _smooth_noise(rng, fshape, sigma_px=40.0 / field_um_per_px)
    immune = 1.0 / (1.0 + np.exp(-(imm - 1.6) * 5.0)) * tissue * (1 - epithelium)
    eosin = 0.20 + 0.05 * _smooth_noise(rng, fshape, sigma_px=30.0 / field_um_per_px)
    return ProceduralLayout(shape_px, he_um_per_px, field_um_per_px, tissue, epithelium, immune, eosin)


def sample_field(field: np.ndarray, xy_px: np.ndarray, layout: ProceduralLayout) -> np.ndarray:
    """Bilinear value of a layout field at (n, 2) level-0 px positions."""
    scale = layout.he_um_per_px / layout.field_um_per_px
    coords = np.stack([xy_px[:, 1] * scale - 0.5, xy_px[:, 0] * scale - 0.5])
    return ndi.map_coordinates(field, coords, order=1, mode="nearest")


def procedural_cells(rng: np.random.Generator, layout: ProceduralLayout, n_cells: int) -> CellTable:
    """Exactly ``n_cells`` cells, denser in epithelium, typed by the layout fields."""
    h, w = layout.shape_hw_px
    um = layout.he_um_per_px
    # Jittered grid (no two nuclei on top of each other), then a weighted draw of n_cells sites.
    spacing_px = np.sqrt(h * w / (n_cells * 1.9))
    gy, gx = np.mgrid[spacing_px / 2 : h : spacing_px, spacing_px / 2 : w : spacing_px]
    sites = np.stack([gx.ravel(), gy.ravel()], axis=1)
    sites += rng.uniform(-0.3, 0.3, size=sites.shape) * spacing_px
    tissue = sample_field(layout.tissue, sites, layout)
    epi = sample_field(layout.epithelium, sites, layout)
    weight = tissue**3 * (1.0 + 1.5 * epi)
    if np.count_nonzero(weight > 1e-6) < n_cells:
        raise ValueError(f"layout too small for {n_cells} cells")
    keys = np.log(rng.random(len(sites))) / np.maximum(weight, 1e-12)  # Efraimidis–Spirakis weighted draw
    chosen = np.sort(np.argpartition(-keys, n_cells - 1)[:n_cells])
    xy = sites[chosen]
    epi = epi[chosen]
    immune = sample_field(layout.immune, xy, layout)
    eosin = sample_field(layout.eosin, xy, layout)

    u = rng.random(n_cells)
    types = np.full(n_cells, CELL_TYPES.index("fibroblast"))
    is_epi = u < epi
    # Basal keratinocytes line the epithelium's edge, where the field is not yet saturated.
    types[is_epi & (epi < 0.8)] = CELL_TYPES.index("keratinocyte_basal")
    types[is_epi & (epi >= 0.8)] = CELL_TYPES.index("keratinocyte_suprabasal")
    stroma = ~is_epi
    v = rng.random(n_cells)
    types[stroma & (v < 0.08 + 0.9 * immune)] = CELL_TYPES.index("immune")
    types[stroma & (v > 0.92)] = CELL_TYPES.index("endothelial")

    # Nucleus look per cell (the cell_types table): (semi-major µm, semi-minor µm, hematoxylin OD).
    shape = np.array(
        [(LOOKS[t].nucleus_semi_major_um, LOOKS[t].nucleus_semi_minor_um, LOOKS[t].hematoxylin_od) for t in CELL_TYPES]
    )[types]  # (n, 3)
    jitter = rng.lognormal(0.0, 0.12, size=(n_cells, 2))
    major = shape[:, 0] * jitter[:, 0] / um
    minor = np.minimum(shape[:, 1] * jitter[:, 1] / um, major)
    hema = shape[:, 2] * rng.lognormal(0.0, 0.15, size=n_cells)
    angle = rng.uniform(0, np.pi, size=n_cells)
    return CellTable(xy, major, minor, angle, types, hema, eosin)


# Ruifrok & Johnston stain optical-density vectors (RGB), as used by skimage.color.rgb2hed.
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.99, 0.11])


class ProceduralRenderer:
    """Renders RGB tiles of the procedural slide at any pyramid level, cells bucketed per tile."""

    def __init__(self, layout: ProceduralLayout, cells: CellTable, seed: int, tile_px: int = 512):
        self.layout = layout
        self.cells = cells
        self.seed = seed
        self.tile_px = tile_px
        self._buckets: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        stains = np.stack([_H_OD, _E_OD])
        self._stain = (stains / np.linalg.norm(stains, axis=1, keepdims=True)).astype(np.float32)

    def _bucket(self, downsample: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Cells sorted by the tile holding their centre at this level, and each tile's start offset."""
        if downsample not in self._buckets:
            size = self.tile_px * downsample
            n_cols = int(np.ceil(self.layout.shape_hw_px[1] / size)) + 1
            n_rows = int(np.ceil(self.layout.shape_hw_px[0] / size)) + 1
            tx = np.clip((self.cells.he_xy_px[:, 0] // size).astype(np.int64), 0, n_cols - 1)
            ty = np.clip((self.cells.he_xy_px[:, 1] // size).astype(np.int64), 0, n_rows - 1)
            key = ty * n_cols + tx
            order = np.argsort(key, kind="stable")
            starts = np.searchsorted(key[order], np.arange(n_rows * n_cols + 1))
            self._buckets[downsample] = (order, starts, n_cols)
        return self._buckets[downsample]

    def _cells_near(self, downsample: int, row: int, col: int) -> np.ndarray:
        order, starts, n_cols = self._bucket(downsample)
        n_rows = (len(starts) - 1) // n_cols
        found = []
        for r in range(max(row - 1, 0), min(row + 2, n_rows)):
            a, b = starts[r * n_cols + max(col - 1, 0)], starts[r * n_cols + min(col + 2, n_cols)]
            found.append(order[a:b])
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _fields(self, ys_px: np.ndarray, xs_px: np.ndarray) -> list[np.ndarray]:
        """Layout fields bilinearly resampled at the pixel grid ys × xs (level-0 px), as float32.

        Bilinear interpolation is separable, so it is two small matrix products on the patch of
        the coarse field under the tile instead of a per-pixel gather.
        """
        layout = self.layout
        f = layout.he_um_per_px / layout.field_um_per_px

        def weights(coords: np.ndarray, size: int) -> tuple[slice, np.ndarray]:
            c = np.clip(coords * f - 0.5, 0, size - 1)
            lo = np.floor(c).astype(np.int64)
            first = int(lo.min())
            last = min(int(lo.max()) + 1, size - 1)
            w = np.zeros((len(c), last - first + 1), dtype=np.float32)
            frac = (c - lo).astype(np.float32)
            w[np.arange(len(c)), lo - first] = 1 - frac
            hi = np.minimum(lo + 1, size - 1)
            np.add.at(w, (np.arange(len(c)), hi - first), frac)
            return slice(first, last + 1), w

        rows, wy = weights(ys_px, layout.tissue.shape[0])
        cols, wx = weights(xs_px, layout.tissue.shape[1])
        return [
            wy @ field[rows, cols].astype(np.float32) @ wx.T
            for field in (layout.tissue, layout.epithelium, layout.eosin)
        ]

    def tile(self, level: int, y0: int, x0: int) -> np.ndarray:
        """uint8 (tile_px, tile_px, 3) RGB of the tile whose top-left is (x0, y0) in level px."""
        t = self.tile_px
        ds = 2**level
        # Level-0 px centres of this tile's pixels.
        ys = (y0 + np.arange(t) + 0.5) * ds
        xs = (x0 + np.arange(t) + 0.5) * ds
        tissue, epi, eosin_bg = self._fields(ys, xs)
        rng = np.random.default_rng([self.seed, level, y0, x0])
        # Fibrous texture: stretched noise in the stroma, paler cytoplasm in epithelium.
        grain = ndi.gaussian_filter(rng.standard_normal((t, t), dtype=np.float32), sigma=(0.8, 3.0 / ds**0.5))
        eosin = tissue * (eosin_bg * (1 - 0.35 * epi) + 0.10 * grain * (1 - epi))
        hema = tissue * (0.06 + 0.12 * epi)

        cells = self.cells
        idx = self._cells_near(ds, y0 // t, x0 // t)
        cx = cells.he_xy_px[idx, 0] / ds - x0  # tile px
        cy = cells.he_xy_px[idx, 1] / ds - y0
        a = cells.nucleus_major_px[idx] / ds
        reach = a + 1.0
        near = (cx > -reach) & (cx < t + reach) & (cy > -reach) & (cy < t + reach)
        if near.any():
            idx, cx, cy, a = idx[near], cx[near], cy[near], a[near]
            b = cells.nucleus_minor_px[idx] / ds
            radius = int(np.ceil(max(float(a.max()), 1.0))) + 1
            offsets = np.arange(-radius, radius + 1, dtype=np.float32)
            px = np.floor(cx).astype(np.float32)[:, None, None] + offsets[None, None, :]  # (n, 1, P)
            py = np.floor(cy).astype(np.float32)[:, None, None] + offsets[None, :, None]  # (n, P, 1)
            dx = px + 0.5 - cx.astype(np.float32)[:, None, None]
            dy = py + 0.5 - cy.astype(np.float32)[:, None, None]
            cos = np.cos(cells.nucleus_angle_rad[idx]).astype(np.float32)[:, None, None]
            sin = np.sin(cells.nucleus_angle_rad[idx]).astype(np.float32)[:, None, None]
            ia = (1.0 / np.maximum(a, 0.5)).astype(np.float32)[:, None, None]
            ib = (1.0 / np.maximum(b, 0.5)).astype(np.float32)[:, None, None]
            inside = ((dx * cos + dy * sin) * ia) ** 2 + ((dy * cos - dx * sin) * ib) ** 2 <= 1.0
            inside &= (px >= 0) & (px < t) & (py >= 0) & (py < t)
            n_i, r_i, c_i = np.nonzero(inside)
            rows = py[n_i, r_i, 0].astype(np.int64)
            cols = px[n_i, 0, c_i].astype(np.int64)
            # A nucleus smaller than a pixel (coarse levels) only tints it, in proportion to its area.
            cover = np.minimum(1.0, np.pi * a * b).astype(np.float32)[n_i]
            hema[rows, cols] += (cells.hematoxylin[idx][n_i].astype(np.float32) - hema[rows, cols]) * cover
            eosin[rows, cols] *= 1.0 - 0.7 * cover
        hema *= 1.0 + 0.08 * rng.standard_normal((t, t), dtype=np.float32)
        od = hema[..., None] * self._stain[0] + eosin[..., None] * self._stain[1]
        rgb = 248.0 * np.exp(np.float32(-np.log(10)) * od)  # Beer–Lambert on slightly off-white glass
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def tiles(self, level: int, shape_hw: tuple[int, int]):
        """All tiles of a level in row-major order (what the TIFF writer consumes)."""
        from threadpoolctl import threadpool_limits

        # The per-tile matrix products are tiny: BLAS threads only add contention.
        with threadpool_limits(limits=1, user_api="blas"):
            for y0 in range(0, shape_hw[0], self.tile_px):
                for x0 in range(0, shape_hw[1], self.tile_px):
                    yield self.tile(level, y0, x0)
