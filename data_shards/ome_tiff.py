"""Write a pyramidal, tiled, JPEG-compressed RGB OME-TIFF, one tile at a time.

The layout is what whole-slide viewers and Xenium Explorer expect of a post-Xenium H&E:
level 0 in the first IFD with OME ``PhysicalSizeX/Y`` in µm, each coarser level (downsampled by
2) in a SubIFD marked ``subfiletype=1``. Pixels arrive as an iterator of tiles per level, so a
slide larger than memory is never held whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from common.atomic import atomic_path

log = logging.getLogger(__name__)

TILE_PX = 512
MIN_LEVEL_SIDE_PX = 1024


def pyramid_shapes(height_px: int, width_px: int, min_side_px: int = MIN_LEVEL_SIDE_PX) -> list[tuple[int, int]]:
    """(height, width) of every level: level 0, then halved until the longer side is < ``min_side_px``."""
    shapes = [(int(height_px), int(width_px))]
    while max(shapes[-1]) >= min_side_px:
        h, w = shapes[-1]
        shapes.append((max(1, h // 2), max(1, w // 2)))
    return shapes


def tile_grid(height_px: int, width_px: int, tile_px: int = TILE_PX) -> list[tuple[int, int]]:
    """Top-left (y0, x0) of each tile in the row-major order TIFF stores them."""
    return [(y, x) for y in range(0, height_px, tile_px) for x in range(0, width_px, tile_px)]


def tiles_from_array(image: np.ndarray, tile_px: int = TILE_PX) -> Iterator[np.ndarray]:
    """Cut an in-memory (H, W, 3) uint8 image into full-size (tile, tile, 3) tiles, edges padded white."""
    h, w = image.shape[:2]
    for y0, x0 in tile_grid(h, w, tile_px):
        block = image[y0 : y0 + tile_px, x0 : x0 + tile_px]
        if block.shape[:2] != (tile_px, tile_px):
            padded = np.full((tile_px, tile_px, 3), 255, dtype=np.uint8)
            padded[: block.shape[0], : block.shape[1]] = block
            block = padded
        yield block


def write_pyramidal_ome_tiff(
    path: str | Path,
    shape_hw: tuple[int, int],
    um_per_px: float,
    tiles_for_level: Callable[[int, tuple[int, int]], Iterator[np.ndarray]],
    quality: int = 90,
    tile_px: int = TILE_PX,
    description: str = "post-Xenium H&E",
    progress: bool = True,
) -> Path:
    """Write the slide atomically.

    ``tiles_for_level(level, (height, width))`` yields uint8 (tile_px, tile_px, 3) RGB tiles of
    that level in row-major order; level ``k`` is downsampled by ``2**k`` from level 0, whose
    pixels are ``um_per_px`` µm wide.
    """
    path = Path(path)
    shapes = pyramid_shapes(*shape_hw)
    n_tiles = sum(len(tile_grid(h, w, tile_px)) for h, w in shapes)
    log.info("writing %s: %d levels %s, %d tiles, %.4f µm/px", path.name, len(shapes), shapes, n_tiles, um_per_px)
    common = dict(
        dtype=np.uint8,
        tile=(tile_px, tile_px),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        resolutionunit="CENTIMETER",
    )
    with (
        atomic_path(path) as tmp,
        tqdm(total=n_tiles, desc="H&E tiles", unit="tile", leave=False, disable=not progress) as bar,
    ):

        def counted(level: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
            for tile in tiles_for_level(level, shape):
                bar.update(1)
                yield tile

        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for level, (h, w) in enumerate(shapes):
                level_um_per_px = um_per_px * (shape_hw[1] / w)
                px_per_cm = 1e4 / level_um_per_px
                if level == 0:
                    extra = dict(
                        subifds=len(shapes) - 1,
                        metadata={
                            "axes": "YXS",
                            "Name": description,
                            "PhysicalSizeX": float(um_per_px),
                            "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": float(um_per_px),
                            "PhysicalSizeYUnit": "µm",
                        },
                    )
                else:
                    extra = dict(subfiletype=1, metadata=None)
                tif.write(
                    counted(level, (h, w)),
                    shape=(h, w, 3),
                    resolution=(px_per_cm, px_per_cm),
                    **common,
                    **extra,
                )
    return path
