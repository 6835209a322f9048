"""The Xenium morphology side of a synthetic bundle: DAPI focus image and segmentation masks.

XOA ≥ 2 writes, next to the tables, ``morphology_focus/morphology_focus_0000.ome.tif`` (the DAPI
autofocus projection: uint16, one channel, tiled pyramidal OME-TIFF with the coarser levels in
SubIFDs, ``pixel_size`` 0.2125 µm/px) and ``cells.zarr.zip`` (cell ids, a per-cell summary, the
nucleus and cell label masks at the morphology image's pixels, and the polygon sets). Readers such
as ``spatialdata_io.xenium()`` open ``cells.zarr.zip`` unconditionally, so a bundle without it
cannot be opened at all.

Geometry: the morphology image shares Xenium's origin, µm = (pixel index + 0.5) · pixel_size at
pixel centres, as ``spatialdata_io`` places the image (identity) and the µm shapes (scale
1 / pixel_size) in one frame. Here the DAPI image is rendered from the synthetic nuclei (their
ellipses in Xenium µm, brightness from the nucleus hematoxylin the H&E shows, a grainy chromatin
texture), and the masks are the same ellipses rasterised: each pixel belongs to the cell whose
ellipse it lies deepest in, and a cell's nucleus pixels always carry that cell's label.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
import zarr

from .geometry import XENIUM_UM_PER_MORPHOLOGY_PX

log = logging.getLogger(__name__)

ZSTD = {"id": "zstd", "level": 1}  # numcodecs config, as zarr v2 metadata names it
FOCUS_DIR = "morphology_focus"
FOCUS_FILE = "morphology_focus_0000.ome.tif"
CELLS_ZARR = "cells.zarr.zip"
TILE_PX = 1024
MIN_LEVEL_SIDE_PX = 1024
MARGIN_UM = 50.0
BACKGROUND = 200  # uint16 DAPI counts off the nuclei
NUCLEUS_COUNTS = (6000.0, 30000.0)  # DAPI counts of the faintest / brightest nucleus
# Columns of cells.zarr.zip's cell_summary in XOA ≥ 2 (µm, µm², z in µm).
CELL_SUMMARY_COLUMNS = (
    "cell_centroid_x",
    "cell_centroid_y",
    "cell_area",
    "nucleus_centroid_x",
    "nucleus_centroid_y",
    "nucleus_area",
    "z_level",
    "nucleus_count",
)


def image_shape_px(
    xy_um: np.ndarray, radius_um: np.ndarray, pixel_size_um: float = XENIUM_UM_PER_MORPHOLOGY_PX
) -> tuple[int, int]:
    """(height, width) of a morphology image from Xenium's origin to past the last cell (plus a margin)."""
    if len(xy_um) == 0:
        return (1, 1)
    far_um = np.max(xy_um + np.asarray(radius_um)[:, None], axis=0) + MARGIN_UM
    width, height = np.ceil(far_um / pixel_size_um).astype(int)
    return int(height), int(width)


def rasterize_cells(
    shape_hw: tuple[int, int],
    xy_um: np.ndarray,
    cell_axes_um: tuple[np.ndarray, np.ndarray],
    nucleus_axes_um: tuple[np.ndarray, np.ndarray],
    angle_rad: np.ndarray,
    brightness: np.ndarray,
    rng: np.random.Generator,
    pixel_size_um: float = XENIUM_UM_PER_MORPHOLOGY_PX,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nucleus_labels, cell_labels, dapi): uint32 masks (label = cell index + 1, 0 = none) and uint16 DAPI.

    ``brightness`` (n,) in [0, 1] scales each nucleus between :data:`NUCLEUS_COUNTS`. Where ellipses
    overlap, the pixel goes to the cell in which it is deepest (smallest normalised radius), so the
    masks partition the tissue as a segmentation does.
    """
    h, w = shape_hw
    # np.zeros pages are only touched where cells are; page faults, not arithmetic, dominate at 50 M px.
    nucleus_labels = np.zeros((h, w), np.uint32)
    cell_labels = np.zeros((h, w), np.uint32)
    dapi = np.full((h, w), BACKGROUND, np.uint16)
    lo_counts, hi_counts = NUCLEUS_COUNTS
    peak = lo_counts + (hi_counts - lo_counts) * np.clip(brightness, 0.0, 1.0)
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    xy_px = np.asarray(xy_um, np.float64) / pixel_size_um - 0.5  # centres in pixel-index units
    axes_px = [np.asarray(v, np.float64) / pixel_size_um for v in (*cell_axes_um, *nucleus_axes_um)]
    if len(xy_px) == 0:
        return nucleus_labels, cell_labels, dapi
    # Squared normalised radius of each pixel's current owner, quantised to 1/254 (255 = no owner), kept
    # only over the box that holds every cell.
    reach_all = np.maximum(axes_px[0], axes_px[1]) + 2.0
    oy, ox = (max(int(np.min(xy_px[:, k] - reach_all)), 0) for k in (1, 0))
    ey, ex = (min(int(np.max(xy_px[:, k] + reach_all)) + 2, size) for k, size in ((1, h), (0, w)))
    cell_depth = np.full((max(ey - oy, 0), max(ex - ox, 0)), 255, np.uint8)
    nucleus_depth = np.full_like(cell_depth, 255)

    def window(i: int, a_px: float, b_px: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """Pixel box around cell i's ellipse and the squared normalised radius of each of its pixels."""
        reach = max(a_px, b_px) + 1.0
        x0, x1 = max(int(xy_px[i, 0] - reach), 0), min(int(xy_px[i, 0] + reach) + 2, w)
        y0, y1 = max(int(xy_px[i, 1] - reach), 0), min(int(xy_px[i, 1] + reach) + 2, h)
        dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(xy_px[i, 0]))[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(xy_px[i, 1]))[:, None]
        c, s = cos[i], sin[i]
        u = dx * np.float32(c / a_px) + dy * np.float32(s / a_px)  # along the major axis, in semi-axes
        v = dy * np.float32(c / b_px) - dx * np.float32(s / b_px)
        u *= u
        v *= v
        u += v
        return (slice(y0, y1), slice(x0, x1)), u

    def claim(labels: np.ndarray, depth: np.ndarray, i: int, box: tuple, rho2: np.ndarray) -> None:
        """Give cell i the pixels of its ellipse (rho2 ≤ 1, to 1/254) no other cell holds more deeply."""
        local = (slice(box[0].start - oy, box[0].stop - oy), slice(box[1].start - ox, box[1].stop - ox))
        level = np.minimum(rho2 * np.float32(254.0), np.float32(255.0)).astype(np.uint8)
        win = level < depth[local]
        np.copyto(labels[box], np.uint32(i + 1), where=win)
        np.copyto(depth[local], level, where=win)

    for i in range(len(xy_px)):
        claim(cell_labels, cell_depth, i, *window(i, axes_px[0][i], axes_px[1][i]))
        box, rho2 = window(i, axes_px[2][i], axes_px[3][i])
        claim(nucleus_labels, nucleus_depth, i, box, rho2)
        # DAPI: flat-topped nucleus with a soft edge ~10 % of the radius wide and grainy chromatin.
        edge = np.clip((np.float32(1.1) - rho2) * np.float32(5.0 * peak[i]), 0.0, np.float32(peak[i]))
        grain = rng.standard_normal(rho2.shape, dtype=np.float32)
        grain *= np.float32(0.18)
        grain += np.float32(1.0)
        grain *= edge
        np.maximum(dapi[box], np.clip(grain, 0.0, 65535.0).astype(np.uint16), out=dapi[box])
    region = (slice(oy, ey), slice(ox, ex))
    nuclei = nucleus_labels[region]
    cell_labels[region] = np.where(nuclei > 0, nuclei, cell_labels[region])  # a nucleus lies in its own cell
    return nucleus_labels, cell_labels, dapi


def _halve(image: np.ndarray) -> np.ndarray:
    """2×2 box average of a uint16 image (integer sums: a float mean of 50 M px costs seconds)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    total = image[0 : 2 * h : 2, 0 : 2 * w : 2].astype(np.uint32)
    total += image[1 : 2 * h : 2, 0 : 2 * w : 2]
    total += image[0 : 2 * h : 2, 1 : 2 * w : 2]
    total += image[1 : 2 * h : 2, 1 : 2 * w : 2]
    return ((total + 2) >> 2).astype(image.dtype)


def write_morphology_focus(folder: Path, dapi: np.ndarray, pixel_size_um: float = XENIUM_UM_PER_MORPHOLOGY_PX) -> Path:
    """``folder/morphology_focus/morphology_focus_0000.ome.tif`` as XOA ≥ 2 writes a DAPI-only focus image.

    One uint16 channel named DAPI (OME ``Channel:0:0``), tiled, deflate-compressed (readable by
    tifffile without extra codecs), level 0 in the first IFD with OME ``PhysicalSizeX/Y`` in µm and
    each 2× coarser level in a SubIFD, so readers that take the first page get full resolution.
    """
    levels = [dapi]
    while max(levels[-1].shape) >= MIN_LEVEL_SIDE_PX:
        levels.append(_halve(levels[-1]))
    path = folder / FOCUS_DIR / FOCUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    common = dict(
        tile=(TILE_PX, TILE_PX), compression="zlib", compressionargs={"level": 1}, resolutionunit="CENTIMETER"
    )
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level, image in enumerate(levels):
            px_per_cm = 1e4 / (pixel_size_um * dapi.shape[1] / image.shape[1])
            if level == 0:
                extra = dict(
                    subifds=len(levels) - 1,
                    metadata={
                        "axes": "CYX",
                        "Name": "morphology_focus",
                        "Channel": {"Name": ["DAPI"]},
                        "PhysicalSizeX": float(pixel_size_um),
                        "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": float(pixel_size_um),
                        "PhysicalSizeYUnit": "µm",
                    },
                )
                image = image[None]
            else:
                extra = dict(subfiletype=1, metadata=None)
            tif.write(image, photometric="minisblack", resolution=(px_per_cm, px_per_cm), **common, **extra)
    return path


def cell_id_prefixes(cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prefix uint32, dataset suffix uint32) of XOA ≥ 1.3 ids ``aaaaaaaa-1`` (8 letters a–p = hex digits)."""
    ids = np.asarray(cell_ids).astype(str)
    head = np.char.partition(ids, "-")
    letters = np.asarray(head[:, 0]).astype("S8").view(np.uint8).reshape(-1, 8).astype(np.uint32) - ord("a")
    if letters.size and letters.max() > 15:
        raise ValueError("cell ids are not XOA ≥ 1.3 ids (8 letters a–p, '-', dataset suffix)")
    prefix = (letters << (np.arange(7, -1, -1, dtype=np.uint32) * 4)).sum(axis=1).astype(np.uint32)
    return prefix, head[:, 2].astype(np.uint32)


def write_cells_zarr(
    path: Path,
    cell_ids: np.ndarray,
    summary: dict[str, np.ndarray],
    nucleus_polygons: np.ndarray,
    cell_polygons: np.ndarray,
    segmentation_method: str,
    masks: tuple[np.ndarray, np.ndarray] | None,
    pixel_size_um: float = XENIUM_UM_PER_MORPHOLOGY_PX,
) -> Path:
    """``cells.zarr.zip`` in XOA ≥ 2's layout (zarr v2 in a zip, what Xenium Explorer and spatialdata-io read).

    Root: ``cell_id`` (n, 2) uint32 (prefix, dataset suffix) and ``cell_summary`` (n, 8) float64 with
    ``column_names``; ``masks/0`` (nuclei) and ``masks/1`` (cells) uint32 label images at the
    morphology image's pixels (label p + 1 = polygon p) with ``masks/homogeneous_transform`` (µm →
    mask px); ``polygon_sets/0`` (nuclei) and ``/1`` (cells) with ``cell_index``, ``method``,
    ``num_vertices`` and ``vertices`` (n, 2 · V) float32 x, y interleaved, closed as in the parquet
    boundaries. ``masks=None`` leaves the masks out (scale bundles: no morphology image).
    """
    n = len(cell_ids)
    prefix, suffix = cell_id_prefixes(cell_ids)
    store = zarr.storage.ZipStore(path, mode="w")
    try:
        # Attributes go in at creation: setting them later appends a second .zattrs to the zip.
        root = zarr.open_group(
            store=store,
            mode="w",
            zarr_format=2,
            attributes={
                "major_version": 6,
                "minor_version": 0,
                "name": "CellSegmentationDataset",
                "number_cells": int(n),
                "polygon_set_names": ["nucleus", "cell"],
                "polygon_set_display_names": ["Nucleus boundaries", "Cell boundaries"],
                "polygon_set_descriptions": ["Synthetic nuclei (ellipses)", segmentation_method],
                "segmentation_methods": [segmentation_method],
                "spatial_units": "microns",
            },
        )
        rows = max(min(n, 100_000), 1)
        root.create_array("cell_id", data=np.stack([prefix, suffix], axis=1).astype(np.uint32), chunks=(rows, 2))
        table = np.stack([np.asarray(summary[c], np.float64) for c in CELL_SUMMARY_COLUMNS], axis=1).reshape(n, -1)
        descriptions = ["Cell centroid in X", "Cell centroid in Y", "Cell area", "Nucleus centroid in X"]
        descriptions += ["Nucleus centroid in Y", "Nucleus area", "z_level", "Number of nuclei"]
        root.create_array(
            "cell_summary",
            data=table,
            chunks=(rows, len(CELL_SUMMARY_COLUMNS)),
            attributes={"column_names": list(CELL_SUMMARY_COLUMNS), "column_descriptions": descriptions},
        )
        if masks is not None:
            group = root.create_group("masks")
            for index, mask in enumerate(masks):
                # zstd level 1: 6× smaller than zarr's default Blosc-LZ4 on label images, and faster.
                group.create_array(
                    str(index), data=np.ascontiguousarray(mask, np.uint32), chunks=(2048, 2048), compressors=ZSTD
                )
            to_px = np.diag([1.0 / pixel_size_um, 1.0 / pixel_size_um, 1.0, 1.0]).astype(np.float32)
            group.create_array("homogeneous_transform", data=to_px, chunks=(4, 4))
        sets = root.create_group("polygon_sets")
        for index, polygons in enumerate((nucleus_polygons, cell_polygons)):
            g = sets.create_group(str(index))
            g.create_array("cell_index", data=np.arange(n, dtype=np.uint32), chunks=(rows,))
            g.create_array("method", data=np.zeros(n, np.uint32), chunks=(rows,))
            g.create_array("num_vertices", data=np.full(n, polygons.shape[1], np.int32), chunks=(rows,))
            flat = np.asarray(polygons, np.float32).reshape(n, -1)
            g.create_array("vertices", data=flat, chunks=(rows, max(flat.shape[1], 1)))
    finally:
        store.close()
    return path
