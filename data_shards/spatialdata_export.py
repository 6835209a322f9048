"""A slide as one SpatialData zarr store: the H&E with its pyramid, the Xenium cells and their counts.

``launch/make_shards.py spatialdata --config <data config>`` writes ``<registration_dir>/<slide>/
<slide>.spatialdata.zarr`` per slide (or ``spatialdata_dir`` when set), openable with
``spatialdata.read_zarr`` and viewable in napari-spatialdata:

- ``images["he"]``: the H&E, uint8 (c, y, x), with a pyramid (factor 2 per level down to ~1,000 px),
  read lazily tile by tile from the slide;
- ``shapes["cell_boundaries"]`` and ``shapes["nucleus_boundaries"]``: the Xenium polygons in µm;
- ``tables["table"]``: the counts (cells × genes) annotating ``cell_boundaries`` (``region`` /
  ``cell_id``), ``obsm["spatial"]`` = the centroids in µm.

Coordinate systems: ``global`` is Xenium µm (the cells as they are; the H&E through the inverse of
the registration's global similarity, px → µm); ``he`` is H&E level-0 pixels (the H&E as it is; the
cells through µm → px). SpatialData transforms are affine, so the per-region registration is
represented by its global fit here: the residual of that fit is reported (``global_fit_rms_px``) so a
user knows how far a deformed section's cells may sit from their nuclei in this view. Requires the
``spatialdata`` extra (``pip install -e '.[spatialdata]'``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np

from common.atomic import atomic_dir
from common.errors import InputError

from .register import Registration, apply_transform
from .slide import Slide
from .xenium import boundary_polygons, read_xenium

MIN_PYRAMID_SIDE_PX = 1024


class _SlideLevel0:
    """Level 0 of a slide as an (H, W, 3) uint8 array dask can slice lazily."""

    def __init__(self, slide: Slide):
        self.slide = slide
        self.shape = (*slide.shape, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        rows, cols = key[0], key[1]
        y0, x0 = rows.start or 0, cols.start or 0
        block = self.slide.read_region(x0, y0, cols.stop - x0, rows.stop - y0)  # (h, w, 3)
        return block[(slice(None), slice(None), *key[2:])] if len(key) > 2 else block


def _pyramid_factors(shape_hw: tuple[int, int]) -> list[int]:
    factors, side = [], max(shape_hw)
    while side // 2 >= MIN_PYRAMID_SIDE_PX:
        factors.append(2)
        side //= 2
    return factors


def _polygons(bundle: Path, kind: str, cell_ids: set[str]):
    import geopandas as gpd
    from shapely.geometry import Polygon

    polygons = boundary_polygons(bundle, kind, cell_ids)
    frame = gpd.GeoDataFrame({"geometry": [Polygon(xy) for xy in polygons.values()]}, index=list(polygons))
    frame.index.name = "cell_id"
    return frame


def write_spatialdata(
    bundle_dir: str | Path,
    he_slide: str | Path,
    registration_json: str | Path,
    out_path: str | Path,
    *,
    he_um_per_px: float | None = None,
    chunk_px: int = 1024,
) -> dict:
    """Write one slide's SpatialData store (see the module docstring); returns what it holds."""
    try:
        import spatialdata as sd
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Affine, Identity
    except ImportError as exc:
        raise InputError(
            None, "spatialdata", "the spatialdata extra: pip install -e '.[spatialdata]'", "not installed"
        ) from exc

    bundle, out_path = Path(bundle_dir), Path(out_path)
    registration = Registration.from_json(registration_json)
    um_to_px = np.asarray(registration.global_transform, dtype=np.float64)  # (3, 3) Xenium µm -> H&E level-0 px
    px_to_um = np.linalg.inv(um_to_px)
    adata = read_xenium(bundle)
    cell_ids = set(adata.obs_names.astype(str))
    centroids_um = adata.obs[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    per_region_vs_global = registration.map(centroids_um) - apply_transform(um_to_px, centroids_um)  # (n_cells, 2) px
    fit_rms_px = float(np.sqrt((per_region_vs_global**2).sum(1).mean()))

    with Slide(bundle / he_slide, um_per_px=he_um_per_px) as slide:
        he_shape = slide.shape
        level0 = da.from_array(_SlideLevel0(slide), chunks=(chunk_px, chunk_px, 3), asarray=True).transpose(2, 0, 1)
        to_global = Affine(px_to_um, input_axes=("x", "y"), output_axes=("x", "y"))
        image = Image2DModel.parse(
            level0,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=_pyramid_factors(slide.shape),
            chunks=(3, chunk_px, chunk_px),
            transformations={"he": Identity(), "global": to_global},
        )
        to_he = Affine(um_to_px, input_axes=("x", "y"), output_axes=("x", "y"))
        shapes = {
            f"{kind}_boundaries": ShapesModel.parse(
                _polygons(bundle, kind, cell_ids), transformations={"global": Identity(), "he": to_he}
            )
            for kind in ("cell", "nucleus")
        }
        table = adata.copy()
        table.obs["region"] = "cell_boundaries"
        table.obs["cell_id"] = table.obs_names.astype(str)
        table.obsm["spatial"] = centroids_um
        table = TableModel.parse(table, region="cell_boundaries", region_key="region", instance_key="cell_id")
        sdata = sd.SpatialData(images={"he": image}, shapes=shapes, tables={"table": table})
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="zarr v3 autosharding")  # zarr's notice of a future default
            shutil.rmtree(tmp)  # spatialdata creates the store itself
            sdata.write(tmp)
    return {
        "path": str(out_path),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "he_shape_px": list(he_shape),
        "pyramid_levels": 1 + len(_pyramid_factors(he_shape)),
        "global_fit_rms_px": fit_rms_px,
    }
