"""A slide as a SpatialData store (make_shards.py spatialdata): read back with spatialdata itself.

The cells' placement on the H&E is checked against the synthetic bundle's planted positions (its
ground truth), not against the registration code that placed them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_shards.register import register_bundle
from data_shards.spatialdata_export import write_spatialdata
from data_shards.synthetic import make_bundle

sd = pytest.importorskip("spatialdata", reason="spatialdata not installed (test extras)")


def test_spatialdata_store_holds_the_he_cells_and_counts_in_register(tmp_path):
    bundle = tmp_path / "bundle"
    make_bundle(bundle, "procedural", n_cells=300, seed=5, deformation_um=0.0, n_keypoints=30)
    register_bundle(bundle, tmp_path / "reg", {})
    info = write_spatialdata(
        bundle, "he/post_xenium_he.ome.tif", tmp_path / "reg" / "registration.json", tmp_path / "s.zarr"
    )
    sdata = sd.read_zarr(tmp_path / "s.zarr")
    truth = pd.read_parquet(bundle / "ground_truth_cells.parquet").set_index("cell_id")

    table = sdata.tables["table"]
    assert table.n_obs == info["n_cells"] == len(truth) and table.n_vars == info["n_genes"]
    assert set(table.obs["region"]) == {"cell_boundaries"}
    np.testing.assert_allclose(
        table.obsm["spatial"], truth.loc[table.obs["cell_id"], ["x_um", "y_um"]].to_numpy(), atol=1e-3
    )
    image = sdata.images["he"]
    level0 = image["scale0"]["image"] if "scale0" in getattr(image, "children", {}) else image  # pyramid or not
    assert tuple(level0.shape) == (3, *info["he_shape_px"])

    # Nuclei mapped into the H&E pixel frame sit on the planted nucleus positions.
    nuclei = sd.transform(sdata.shapes["nucleus_boundaries"], to_coordinate_system="he")
    centres = np.array([[p.x, p.y] for p in nuclei.geometry.centroid])
    planted = truth.loc[nuclei.index, ["he_x_px", "he_y_px"]].to_numpy(float)
    assert np.median(np.hypot(*(centres - planted).T)) < 2.5
    # The H&E in the µm frame: its level-0 pixel (x, y) lands where the cell µm coordinates say.
    to_um = sd.transformations.get_transformation(image, to_coordinate_system="global").to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    mapped_um = planted @ to_um[:2, :2].T + to_um[:2, 2]
    assert np.median(np.hypot(*(mapped_um - truth.loc[nuclei.index, ["x_um", "y_um"]].to_numpy()).T)) < 1.5
