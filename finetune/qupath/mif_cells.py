"""QuPath detections for the mIF head's test cells: segmented nuclei with predicted marker means and calls.

``finetune.mif`` writes ``cells.csv`` (one row per test nucleus: ``tile``, ``label`` and per marker
``<m>_pred`` = mean predicted intensity in the nucleus, ``<m>_measured``, ``<m>_pos`` = the gated
label, ``<m>_prob`` = the cell classifier's probability). The nucleus outlines come from the label
masks of the data folder (``nuclei/<tile>.tif|png``, 0 = background). A cell is called positive
for a marker when its probability is at least 0.5; its class is the list of positive markers
(``"CD45+"``, ``"Pan-CK+ SMA+"``) or ``"negative"``.

Coordinates: tiles named ``…_x<x0>_y<y0>`` (the layout of tiles cut from a slide, as the demo's)
are placed at that level-0 origin, so one file covers the slide; tiles without an origin in their
name get one file each, in the tile's own pixels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from common.errors import InputError

from .geojson import cell_feature, class_colours, label_outlines

TILE_ORIGIN = re.compile(r"_x(\d+)_y(\d+)$")
MASK_SUFFIXES = (".tif", ".tiff", ".png")
CALL_THRESHOLD = 0.5


def tile_origin(tile: str) -> tuple[int, int] | None:
    """(x0, y0) level-0 px from a tile name ending in ``_x<x0>_y<y0>``, else None."""
    match = TILE_ORIGIN.search(tile)
    return (int(match.group(1)), int(match.group(2))) if match else None


def markers_of(cells: pd.DataFrame) -> list[str]:
    return [c[: -len("_prob")] for c in cells.columns if c.endswith("_prob")]


def read_mask(folder: Path, tile: str) -> np.ndarray:
    for suffix in MASK_SUFFIXES:
        path = folder / f"{tile}{suffix}"
        if path.is_file():
            return tifffile.imread(path) if suffix != ".png" else np.asarray(Image.open(path))
    raise InputError(folder / f"{tile}.tif", None, "the nucleus label mask of a tile in cells.csv", "missing")


def read_cells(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, None, "cells.csv written by finetune.mif", "no such file")
    cells = pd.read_csv(path, dtype={"tile": str})
    missing = [c for c in ("tile", "label") if c not in cells.columns]
    if missing or not markers_of(cells):
        raise InputError(
            path, "columns", "tile, label and <marker>_prob per marker (finetune.mif cells.csv)", "missing"
        )
    return cells


def cell_class(calls: np.ndarray, markers: Sequence[str]) -> str:
    positive = [m for m, call in zip(markers, calls) if call]
    return " ".join(f"{m}+" for m in positive) if positive else "negative"


def mif_features(cells: pd.DataFrame, nuclei_dir: Path) -> dict[str | None, list[dict]]:
    """Features grouped by file: key None = one slide-level file (tiles with origins), else per tile."""
    markers = markers_of(cells)
    calls = cells[[f"{m}_prob" for m in markers]].to_numpy(float) >= CALL_THRESHOLD  # (n_cells, n_markers)
    classes = [cell_class(row, markers) for row in calls]
    colours = class_colours(classes)
    by_file: dict[str | None, list[dict]] = {}
    for tile, rows in cells.groupby("tile", sort=True):
        origin = tile_origin(tile)
        outlines = label_outlines(read_mask(nuclei_dir, tile), origin or (0, 0))
        for index, row in rows.iterrows():
            label = int(row["label"])
            if label not in outlines:
                raise InputError(nuclei_dir / tile, "label", f"nucleus {label} of cells.csv in the mask", "absent")
            values = {}
            for m in markers:
                for suffix, name in (
                    ("pred", "predicted mean"),
                    ("measured", "measured mean"),
                    ("prob", "probability"),
                ):
                    if f"{m}_{suffix}" in row:
                        values[f"{m} {name}"] = row[f"{m}_{suffix}"]
            name = classes[cells.index.get_loc(index)]
            by_file.setdefault(None if origin else tile, []).append(
                cell_feature(
                    f"{tile}:{label}",
                    outlines[label],
                    classification=name,
                    colour=colours[name],
                    measurements=values,
                    object_type="detection",
                )
            )
    return by_file
