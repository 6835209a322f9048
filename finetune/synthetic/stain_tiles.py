"""H&E tiles with their nuclei and each nucleus's cell type: the ground on which synthetic stains are painted.

The image-to-image heads (virtual IHC, mIF) need paired data in which the target stain follows
something visible in the H&E. Real paired sets (IHC4BC, ORION) are not redistributable with the
project, so the demo paints IHC and mIF onto real H&E: every nucleus segmented on the H&E gets
the cell type the simulated Xenium run planted there, and markers are drawn by cell type.

Two sources give the same :class:`CellTile` list:

- :func:`demo_cell_tiles`: tiles of a synthetic bundle's real H&E (``he/post_xenium_he.ome.tif``),
  nuclei from :func:`finetune.metrics.segment_nuclei`, each matched to the nearest planted cell of
  ``ground_truth_cells.parquet`` (``he_x_px``, ``he_y_px``, ``cell_type``) within ``max_match_um``;
- :func:`procedural_cell_tiles`: small drawn tiles (pink stroma, nuclei whose size and darkness
  depend on the type), for tests that must not depend on a demo run.

Unmatched nuclei get the type ``"unassigned"``.

The look of each type (nucleus ellipse in µm, hematoxylin optical density) is the one table of
the synthetic data, :data:`data_shards.synthetic.cell_types.LOOKS`, so a "fibroblast" is drawn the
same here as in the synthetic Xenium bundles. Procedural tiles are drawn at
:data:`PROCEDURAL_UM_PER_PX` (0.9 µm/px, about a 10× scan) by default, so a 32–64 px tile holds
several cells.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.color import hed2rgb

from common.errors import InputError
from data_shards.slide import Slide
from data_shards.synthetic.cell_types import LOOKS, nucleus_axes_px
from finetune.metrics import segment_nuclei

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
HE_NAME = "he/post_xenium_he.ome.tif"
TRUTH_NAME = "ground_truth_cells.parquet"

# The types procedural tiles draw by default (any type of the look table may be asked for).
PROCEDURAL_TYPES = ("keratinocyte_basal", "keratinocyte_suprabasal", "fibroblast", "immune")
PROCEDURAL_UM_PER_PX = 0.9  # default resolution of procedural tiles: nucleus sizes in px = look table µm / 0.9


@dataclass
class CellTile:
    """One H&E tile with an instance label image of its nuclei and the cell type of each nucleus."""

    name: str
    he_rgb: np.ndarray  # (H, W, 3) uint8
    nuclei: np.ndarray  # (H, W) int32, 0 = background, label k = nucleus k
    cell_types: np.ndarray  # (n_nuclei,) str; entry k - 1 is the type of label k
    origin_px: tuple[int, int]  # (x0, y0) of the tile in the source slide's level-0 px
    um_per_px: float

    @property
    def n_nuclei(self) -> int:
        return int(len(self.cell_types))


def _check_tile_request(n_tiles: int, tile_px: int) -> None:
    if int(n_tiles) < 1:
        raise InputError(None, "n_tiles", "at least 1 tile", n_tiles)
    if int(tile_px) < 16:
        raise InputError(None, "tile_px", "a tile side of at least 16 px", tile_px)


def _tile_origins(
    truth_xy_px: np.ndarray, shape_hw: tuple[int, int], tile_px: int, n_tiles: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Non-overlapping tile origins on a grid, drawn at random among the cell-rich ones."""
    rows, cols = shape_hw[0] // tile_px, shape_hw[1] // tile_px
    if rows == 0 or cols == 0:
        raise InputError(None, "tile_px", f"a tile no larger than the slide {shape_hw}", tile_px)
    counts = np.zeros((rows, cols), dtype=np.int64)
    r = np.clip((truth_xy_px[:, 1] // tile_px).astype(int), 0, rows - 1)
    c = np.clip((truth_xy_px[:, 0] // tile_px).astype(int), 0, cols - 1)
    np.add.at(counts, (r, c), 1)
    # Random tiles among those at least half as full as the median occupied one: tissue, yet a mix of regions
    # (the fullest tiles alone would all be epidermis).
    flat = counts.ravel()
    candidates = np.flatnonzero(flat >= 0.5 * np.median(flat[flat > 0]))
    occupied = rng.permutation(candidates)[:n_tiles]
    if len(occupied) < n_tiles:
        log.warning("only %d tiles of %d px hold enough planted cells (asked for %d)", len(occupied), tile_px, n_tiles)
    return [(int(i % cols) * tile_px, int(i // cols) * tile_px) for i in occupied]


def demo_cell_tiles(
    bundle_dir: str | Path, n_tiles: int, tile_px: int = 256, seed: int = 0, max_match_um: float = 6.0
) -> list[CellTile]:
    """Tiles of a synthetic bundle's H&E (random cell-rich grid cells) with typed nuclei."""
    _check_tile_request(n_tiles, tile_px)
    bundle_dir = Path(bundle_dir)
    truth_path = bundle_dir / TRUTH_NAME
    if not truth_path.is_file():
        raise InputError(
            truth_path, None, "the ground truth of a synthetic bundle (make_bundle writes it)", "no such file"
        )
    truth = pd.read_parquet(truth_path)
    missing = {"he_x_px", "he_y_px", "cell_type"} - set(truth.columns)
    if missing:
        raise InputError(
            truth_path, ", ".join(sorted(missing)), "columns he_x_px, he_y_px, cell_type", sorted(truth.columns)
        )
    truth_xy_px = truth[["he_x_px", "he_y_px"]].to_numpy(np.float64)
    truth_types = truth["cell_type"].astype(str).to_numpy()
    tree = cKDTree(truth_xy_px)
    rng = np.random.default_rng(seed)
    tiles: list[CellTile] = []
    with Slide(bundle_dir / HE_NAME) as slide:
        max_match_px = max_match_um / slide.um_per_px
        min_area_px = int(round(8.0 / slide.um_per_px**2))  # nuclei under 8 µm² are debris
        for x0, y0 in _tile_origins(truth_xy_px, slide.shape, tile_px, n_tiles, rng):
            rgb = slide.read_region(x0, y0, tile_px, tile_px)
            nuclei = segment_nuclei(rgb, min_area_px=min_area_px)
            n = int(nuclei.max())
            types = np.full(n, UNASSIGNED, dtype=object)
            if n:
                centroids_rc = np.asarray(ndi.center_of_mass(np.ones_like(nuclei), nuclei, np.arange(1, n + 1)))
                centroids_xy_px = centroids_rc[:, ::-1] + (x0, y0)
                distance_px, nearest = tree.query(centroids_xy_px, distance_upper_bound=max_match_px)
                matched = np.isfinite(distance_px)
                types[matched] = truth_types[nearest[matched]]
            tiles.append(
                CellTile(f"tile_x{x0:05d}_y{y0:05d}", rgb, nuclei, types.astype(str), (x0, y0), float(slide.um_per_px))
            )
    n_nuclei = sum(t.n_nuclei for t in tiles)
    n_typed = sum(int((t.cell_types != UNASSIGNED).sum()) for t in tiles)
    log.info(
        "%d H&E tiles of %d px: %d nuclei, %d matched to a planted cell type", len(tiles), tile_px, n_nuclei, n_typed
    )
    return tiles


def _draw_he(hematoxylin_od: np.ndarray, eosin_od: np.ndarray) -> np.ndarray:
    """Compose an RGB H&E from hematoxylin and eosin optical densities (Ruifrok–Johnston stain vectors)."""
    hed = np.stack([hematoxylin_od, eosin_od, np.zeros_like(eosin_od)], axis=-1)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def procedural_cell_tiles(
    n_tiles: int,
    tile_px: int = 64,
    seed: int = 0,
    nuclei_per_tile: int = 10,
    cell_types: Sequence[str] | None = None,
    um_per_px: float = PROCEDURAL_UM_PER_PX,
) -> list[CellTile]:
    """Drawn H&E tiles: eosin-pink stroma with non-overlapping elliptic nuclei whose look depends on the type.

    Nuclei are the look table's ellipses (:data:`data_shards.synthetic.cell_types.LOOKS`) at ``um_per_px``
    µm per pixel, with its hematoxylin optical density (± 10 %).
    """
    _check_tile_request(n_tiles, tile_px)
    cell_types = list(cell_types or PROCEDURAL_TYPES)
    unknown = sorted(set(cell_types) - set(LOOKS))
    if unknown:
        raise InputError(None, "cell_types", f"types among {sorted(LOOKS)}", unknown)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile_px, 0:tile_px].astype(np.float64)
    tiles = []
    for index in range(n_tiles):
        nuclei = np.zeros((tile_px, tile_px), dtype=np.int32)
        hematoxylin = np.zeros((tile_px, tile_px))
        eosin = 0.08 + 0.03 * rng.random((tile_px, tile_px))
        types: list[str] = []
        for _ in range(nuclei_per_tile * 5):  # rejection sampling until nuclei_per_tile fit
            if len(types) == nuclei_per_tile:
                break
            kind = cell_types[int(rng.integers(len(cell_types)))]
            major_px, minor_px = nucleus_axes_px(kind, um_per_px)
            od = LOOKS[kind].hematoxylin_od
            cx, cy = rng.uniform(major_px + 1, tile_px - major_px - 1, size=2)
            angle = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            inside = (u / major_px) ** 2 + (v / minor_px) ** 2 <= 1.0
            if (nuclei[inside] > 0).any() or inside.sum() < 6:
                continue
            types.append(kind)
            nuclei[inside] = len(types)
            hematoxylin[inside] = od * rng.uniform(0.9, 1.1)
        rgb = _draw_he(hematoxylin, eosin)
        tiles.append(
            CellTile(
                f"tile_{index:04d}", rgb, nuclei, np.asarray(types, dtype=str), (index * tile_px, 0), float(um_per_px)
            )
        )
    return tiles


__all__ = [
    "UNASSIGNED",
    "HE_NAME",
    "TRUTH_NAME",
    "PROCEDURAL_TYPES",
    "PROCEDURAL_UM_PER_PX",
    "CellTile",
    "demo_cell_tiles",
    "procedural_cell_tiles",
]
