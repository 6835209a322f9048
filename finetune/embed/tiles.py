"""Tile embeddings of a whole slide: a grid of ``tile_px`` tiles at ``tile_um_per_px`` µm/pixel, tissue only.

:func:`embed_slide_tiles` keeps the tiles whose tissue fraction (``data_shards.qc.tissue_mask`` on a
thumbnail) reaches ``min_tissue_fraction`` and writes one ``.h5ad`` in the format of
:mod:`finetune.embed.io` (obs: tile centre in µm and level-0 px, grid row/col, footprint, tissue fraction).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from common.errors import InputError
from data_shards.qc import tissue_mask
from data_shards.slide import Slide

from ..encoders import ImageEncoder, check_which
from .images import embed_images
from .io import encoder_info, update_index, write_embeddings

log = logging.getLogger(__name__)


def tissue_tile_grid(
    shape_px: tuple[int, int], tile_size_px: float, mask: np.ndarray, mask_downsample: float, min_tissue_fraction: float
) -> pd.DataFrame:
    """Tiles of side ``tile_size_px`` (level-0 px) covering a (height, width) slide, with their tissue fraction.

    ``mask`` is the (h, w) bool tissue mask of a thumbnail at ``mask_downsample`` level-0 px per
    thumbnail px. Only whole tiles inside the slide are listed; those whose tissue fraction is at
    least ``min_tissue_fraction`` are kept. Columns: row, col, tile_x0_px, tile_y0_px (level 0),
    tissue_fraction.
    """
    height, width = shape_px
    n_rows, n_cols = int(height // tile_size_px), int(width // tile_size_px)
    if n_rows == 0 or n_cols == 0:
        return pd.DataFrame(columns=["row", "col", "tile_x0_px", "tile_y0_px", "tissue_fraction"])
    # Summed-area table: tissue pixels in any thumbnail rectangle in O(1).
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x0 = np.round(cols * tile_size_px).astype(np.int64)
    y0 = np.round(rows * tile_size_px).astype(np.int64)

    def thumb(v: np.ndarray, limit: int, up: bool) -> np.ndarray:
        scaled = v / mask_downsample
        return np.clip(np.ceil(scaled) if up else np.floor(scaled), 0, limit).astype(np.int64)

    c0, c1 = thumb(x0, mask.shape[1], False), thumb(x0 + tile_size_px, mask.shape[1], True)
    r0, r1 = thumb(y0, mask.shape[0], False), thumb(y0 + tile_size_px, mask.shape[0], True)
    c1, r1 = np.maximum(c1, c0 + 1).clip(max=mask.shape[1]), np.maximum(r1, r0 + 1).clip(max=mask.shape[0])
    inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    fraction = inside / area
    grid = pd.DataFrame({"row": rows, "col": cols, "tile_x0_px": x0, "tile_y0_px": y0, "tissue_fraction": fraction})
    return grid[grid["tissue_fraction"] >= min_tissue_fraction].reset_index(drop=True)


def read_tile(slide, x0_px: int, y0_px: int, size_px0: float, level: int, tile_px: int) -> np.ndarray:
    """uint8 (tile_px, tile_px, 3): the level-0 square [x0, x0 + size) read at ``level`` and resized."""
    downsample = slide.downsample(level)
    x, y = int(round(x0_px / downsample)), int(round(y0_px / downsample))
    side = max(1, int(round(size_px0 / downsample)))
    region = slide.read_region(x, y, side, side, level=level)
    if side != tile_px:
        region = np.asarray(Image.fromarray(region).resize((tile_px, tile_px), Image.BILINEAR, reducing_gap=None))
    return region


def tile_settings(
    encoder: ImageEncoder,
    which: str,
    slide_path: str | Path,
    tile_um_per_px: float,
    tile_px: int,
    min_tissue_fraction: float,
) -> dict:
    """What makes a slide's tile embeddings what they are (recorded in ``uns["embedding"]``; a file
    written with the same settings is not embedded again)."""
    return {
        "kind": "tiles",
        "slide_path": str(slide_path),
        "tile_um_per_px": float(tile_um_per_px),
        "tile_px": int(tile_px),
        "min_tissue_fraction": float(min_tissue_fraction),
        **encoder_info(encoder, which),
    }


def embed_slide_tiles(
    encoder: ImageEncoder,
    slide_path: str | Path,
    out_path: str | Path,
    *,
    tile_um_per_px: float = 0.5,
    tile_px: int = 224,
    min_tissue_fraction: float = 0.5,
    batch_size: int = 64,
    which: str = "backbone",
    slide_um_per_px: float | None = None,
    slide_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
    thumbnail_max_side: int = 2048,
    progress: bool = True,
) -> Path:
    """Embed the tissue tiles of a whole slide; write one ``.h5ad`` (see the module docstring).

    Each tile covers ``tile_px × tile_um_per_px`` µm and is read from the coarsest pyramid level
    that still has at least that resolution, then resized to ``tile_px`` pixels.
    ``slide_um_per_px`` overrides the pixel size the file declares.
    """
    check_which(which, encoder)
    if not tile_um_per_px > 0 or int(tile_px) < 1:
        raise InputError(None, "tiles", "tile_um_per_px > 0 µm/pixel and tile_px ≥ 1 pixel", (tile_um_per_px, tile_px))
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise InputError(None, "min_tissue_fraction", "a fraction between 0 and 1", min_tissue_fraction)
    slide_path, out_path = Path(slide_path), Path(out_path)
    slide_id = slide_id or slide_path.name.split(".")[0]
    with Slide(slide_path, um_per_px=slide_um_per_px) as slide:
        size_px0 = tile_px * tile_um_per_px / slide.um_per_px  # tile side in level-0 px
        if size_px0 < tile_px * 0.99:
            log.warning(
                "%s: tiles at %.3f µm/px are finer than the slide's %.3f µm/px; upsampling",
                slide_path,
                tile_um_per_px,
                slide.um_per_px,
            )
        thumbnail, thumb_downsample = slide.thumbnail(thumbnail_max_side)
        mask = tissue_mask(thumbnail)  # (h, w) bool at thumb_downsample level-0 px per px
        n_grid = int(slide.shape[0] // size_px0) * int(slide.shape[1] // size_px0)
        grid = tissue_tile_grid(slide.shape, size_px0, mask, thumb_downsample, min_tissue_fraction)
        level = slide.best_level(size_px0 / tile_px)
        log.info(
            "%s: %d of %d tiles (%d px at %.3f µm/px, level %d) on tissue",
            slide_path.name,
            len(grid),
            n_grid,
            tile_px,
            tile_um_per_px,
            level,
        )
        tiles = (
            read_tile(slide, x0, y0, size_px0, level, int(tile_px))
            for x0, y0 in zip(grid["tile_x0_px"], grid["tile_y0_px"])
        )
        embeddings = embed_images(encoder, tiles, len(grid), batch_size, which, progress, desc=f"tiles {slide_id}")
        um_per_px = float(slide.um_per_px)
    centre_x_px = grid["tile_x0_px"].to_numpy(float) + size_px0 / 2
    centre_y_px = grid["tile_y0_px"].to_numpy(float) + size_px0 / 2
    obs = pd.DataFrame(
        {
            "slide": slide_id,
            "x_um": centre_x_px * um_per_px,
            "y_um": centre_y_px * um_per_px,
            "he_x_px": centre_x_px,
            "he_y_px": centre_y_px,
            "row": grid["row"].to_numpy(),
            "col": grid["col"].to_numpy(),
            "tile_x0_px": grid["tile_x0_px"].to_numpy(),
            "tile_y0_px": grid["tile_y0_px"].to_numpy(),
            "tile_size_px": np.full(len(grid), size_px0),
            "tissue_fraction": grid["tissue_fraction"].to_numpy(),
        },
        index=pd.Index([f"tile_{r}_{c}" for r, c in zip(grid["row"], grid["col"])], name="obs_id"),
    )
    for key, value in (meta or {}).items():
        obs[key] = value
    info = {
        **tile_settings(encoder, which, slide_path, tile_um_per_px, tile_px, min_tissue_fraction),
        "slide_um_per_px": um_per_px,
        "n_grid_tiles": n_grid,
    }
    write_embeddings(out_path, embeddings, obs, info)
    update_index(
        out_path.parent,
        {slide_id: {"file": out_path.name, "n": len(obs), "dim": int(embeddings.shape[1]), "kind": "tiles"}},
        encoder_info(encoder, which),
    )
    log.info("%s: %d tile embeddings → %s", slide_id, len(obs), out_path)
    return out_path


__all__ = ["tissue_tile_grid", "read_tile", "tile_settings", "embed_slide_tiles"]
