"""QuPath's GeoJSON exchange format: one ``FeatureCollection`` of cell objects, written atomically.

QuPath (v0.4 and later) imports a ``.geojson`` file by drag-and-drop onto the open slide, or with
``File > Import objects from file``; coordinates are level-0 pixels of that slide, x to the right,
y down, with the pixel ``image[r, c]`` covering [c, c + 1) x [r, r + 1). The project's own pixel
coordinates put integers at pixel *centres* (:mod:`data_shards.crops`), so every vertex is shifted by
+0.5 px on the way out (:func:`to_qupath_px`). Each feature here is a cell object::

    {"type": "Feature", "id": <uuid>,
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x0, y0]]]},   # closed ring, px
     "nucleusGeometry": {...},                  # optional, same form (QuPath cells carry both)
     "properties": {"objectType": "cell" | "detection",
                    "name": <cell id>,
                    "classification": {"name": <class>, "color": [r, g, b]},
                    "measurements": {<name>: <number>, ...}}}

Xenium Ranger's ``import-segmentation`` reads the same form (``objectType`` ``cell``, the nucleus in
``nucleusGeometry``), so the files also go back into 10x tools. Measurements must be numbers:
QuPath shows them in its measurement tables and can colour by them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from skimage.measure import find_contours

from common.atomic import atomic_path

OBJECT_TYPES = ("cell", "detection")
UNCLASSIFIED = ""


def class_colours(names: Iterable[str]) -> dict[str, list[int]]:
    """A distinct RGB (0–255) per class name, stable for the same sorted set of names."""
    unique = sorted({str(n) for n in names})
    palette = colormaps["tab20"]
    return {name: [int(round(255 * c)) for c in palette(i % 20)[:3]] for i, name in enumerate(unique)}


def to_qupath_px(points_px: np.ndarray) -> np.ndarray:
    """(n, 2) x, y px with integers at pixel centres (this project) -> QuPath's (integers at pixel corners)."""
    return np.asarray(points_px, dtype=np.float64).reshape(-1, 2) + 0.5


def closed_ring(points_px: np.ndarray) -> list[list[float]]:
    """(n, 2) x, y pixels (pixel-centre convention) -> a closed QuPath GeoJSON ring, rounded to 0.01 px."""
    ring = to_qupath_px(points_px)
    if len(ring) and not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return np.round(ring, 2).tolist()


def polygon(points_px: np.ndarray) -> dict:
    return {"type": "Polygon", "coordinates": [closed_ring(points_px)]}


def cell_feature(
    name: str,
    outline_px: np.ndarray,
    *,
    nucleus_px: np.ndarray | None = None,
    classification: str = UNCLASSIFIED,
    colour: Sequence[int] | None = None,
    measurements: Mapping[str, float] | None = None,
    object_type: str = "cell",
) -> dict:
    """One QuPath cell / detection object; ``outline_px`` and ``nucleus_px`` are (n, 2) level-0 px."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    properties: dict = {"objectType": object_type, "name": str(name)}
    if classification != UNCLASSIFIED:
        properties["classification"] = {"name": str(classification), "color": list(colour or [128, 128, 128])}
    properties["measurements"] = {k: float(v) for k, v in (measurements or {}).items() if np.isfinite(v)}
    feature = {
        "type": "Feature",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cell:{name}")),  # stable across reruns
        "geometry": polygon(outline_px),
        "properties": properties,
    }
    if nucleus_px is not None:
        feature["nucleusGeometry"] = polygon(nucleus_px)
    return feature


def write_feature_collection(path: str | Path, features: Sequence[dict]) -> Path:
    """``{"type": "FeatureCollection", "features": [...]}`` written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}, separators=(",", ":")))
    return path


def label_outlines(labels: np.ndarray, origin_xy_px: tuple[float, float] = (0.0, 0.0)) -> dict[int, np.ndarray]:
    """Outline (n, 2) x, y px of every label > 0 of a label mask (H, W), shifted by the tile's origin.

    The longest iso-contour at 0.5 of each label's padded binary mask: the pixel-edge outline, so a
    label of one pixel still gets a ring around that pixel's centre.
    """
    labels = np.asarray(labels)
    outlines: dict[int, np.ndarray] = {}
    for label in np.unique(labels):
        if label <= 0:
            continue
        rows, cols = np.nonzero(labels == label)
        r0, c0 = rows.min(), cols.min()
        window = np.pad(labels[r0 : rows.max() + 1, c0 : cols.max() + 1] == label, 1).astype(np.float32)
        contours = find_contours(window, 0.5)
        ring_rc = max(contours, key=len) + np.array([r0 - 1, c0 - 1])  # (n, 2) row, col of the pixel grid
        outlines[int(label)] = ring_rc[:, ::-1] + np.asarray(origin_xy_px, dtype=np.float64)
    return outlines


def write_cell_groups_csv(path: str | Path, cell_ids: Sequence[str], groups: Sequence[str]) -> Path:
    """Xenium Explorer's cell-group import (``Cell > Add cell categorisation``): ``cell_id,group`` rows."""
    path = Path(path)
    lines = ["cell_id,group"] + [f"{c},{_csv_field(g)}" for c, g in zip(cell_ids, groups)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _csv_field(value: str) -> str:
    text = str(value)
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(ch in text for ch in ',"\n') else text
