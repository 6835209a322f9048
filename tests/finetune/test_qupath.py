"""QuPath GeoJSON / Xenium Explorer exports (finetune.qupath).

The Xenium cell polygons are checked against the synthetic bundle's *planted* H&E positions (its
ground truth, not the registration code under test), and a registration that disagrees with the
shards' recorded positions must be refused.
"""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
from shapely.geometry import Point, shape

from common.errors import InputError
from data_shards.manifest import FORMAT_VERSION
from data_shards.register import Registration, register_bundle
from data_shards.synthetic import make_bundle
from finetune.qupath import label_outlines, run_qupath
from finetune.qupath.geojson import cell_feature
from finetune.qupath.mif_cells import mif_features
from finetune.qupath.xenium_cells import SlideSources, check_positions, slide_features

MAIN = "pretrained_linear_probe"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("qupath")
    bundle = root / "bundle"
    make_bundle(bundle, "procedural", n_cells=300, seed=3, deformation_um=0.0, n_keypoints=30)
    register_bundle(bundle, root / "registration", {})
    truth = pd.read_parquet(bundle / "ground_truth_cells.parquet").set_index("cell_id")
    return root, bundle, root / "registration" / "registration.json", truth


def _predictions(registration_json, truth: pd.DataFrame, n: int = 40) -> anndata.AnnData:
    """A predictions.h5ad as finetune.genes writes it, for the first ``n`` cells (shard positions mapped)."""
    cells = truth.iloc[:n]
    mapped = Registration.from_json(registration_json).map(cells[["x_um", "y_um"]].to_numpy())
    obs = pd.DataFrame(
        {
            "slide": "s1",
            "cell_id": cells.index.astype(str),
            "x_um": cells["x_um"].to_numpy(),
            "y_um": cells["y_um"].to_numpy(),
            "he_x_px": mapped[:, 0],
            "he_y_px": mapped[:, 1],
            f"transferred_{MAIN}": pd.Categorical(cells["cell_type"].astype(str)),
        },
        index=[f"s1:{c}" for c in cells.index],
    )
    rng = np.random.default_rng(0)
    genes = ["G0", "G1", "G2"]
    var = pd.DataFrame({f"pearson_{MAIN}": [0.1, 0.5, 0.3]}, index=genes)
    adata = anndata.AnnData(X=rng.random((n, 3)).astype(np.float32), obs=obs, var=var)
    adata.layers["measured"] = rng.random((n, 3)).astype(np.float32)
    adata.uns["gene_prediction"] = {"main_run": "pretrained/linear_probe"}
    return adata


def test_cell_polygons_lie_on_the_planted_cells(registered):
    _, bundle, registration_json, truth = registered
    adata = _predictions(registration_json, truth)
    classes = adata.obs[f"transferred_{MAIN}"].astype(str)
    features, info = slide_features(
        adata,
        SlideSources("s1", bundle, registration_json),
        main=MAIN,
        genes=["G1", "G2"],
        classes=classes,
        colours={c: [1, 2, 3] for c in classes.unique()},
        boundaries="both",
    )
    assert info["n_cells"] == 40 and info["n_without_boundary"] == 0
    errors = []
    for feature in features:
        cell = shape(feature["geometry"])
        nucleus = shape(feature["nucleusGeometry"])
        assert cell.is_valid and nucleus.is_valid and nucleus.area < cell.area
        # QuPath px = pixel-centre px + 0.5; the planted position is in pixel-centre px.
        planted = truth.loc[feature["properties"]["name"], ["he_x_px", "he_y_px"]].to_numpy(float) + 0.5
        assert nucleus.contains(Point(*planted))
        errors.append(np.hypot(*(np.array(cell.centroid.coords[0]) - planted)))
        assert feature["properties"]["objectType"] == "cell"
        assert set(feature["properties"]["measurements"]) >= {"pred G1", "measured G2", "x_um", "y_um"}
    assert np.median(errors) < 2.0  # registration error on the procedural bundle is ~1 µm ≈ 2 px


def test_a_registration_other_than_the_shards_one_is_refused(registered, tmp_path):
    _, _, registration_json, truth = registered
    adata = _predictions(registration_json, truth)
    data = json.loads(registration_json.read_text())
    shifted = Registration.from_dict(data)
    for region in shifted.regions:
        region.transform[0, 2] += 10.0  # 10 px to the right
    with pytest.raises(InputError, match="changed since the shards"):
        check_positions(shifted, adata.obs, tmp_path / "registration.json")
    assert check_positions(Registration.from_json(registration_json), adata.obs, registration_json) < 1e-6


def test_run_writes_geojson_and_explorer_groups(registered, tmp_path):
    root, bundle, registration_json, truth = registered
    predictions = tmp_path / "predictions.h5ad"
    _predictions(registration_json, truth).write_h5ad(predictions)
    manifest = {
        "format_version": FORMAT_VERSION,
        "vocabulary": {"path": "vocab.tsv", "sha256": "0", "size": 1},
        "shards": [],
        "slides": {"s1": {"bundle": str(bundle)}},
        "config": {"slides": [{"id": "s1", "bundle": str(bundle), "registration": str(registration_json)}]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = {"out_dir": str(tmp_path / "out"), "cells": {"predictions": str(predictions), "manifest": str(tmp_path)}}
    result = run_qupath(cfg)
    collection = json.loads((tmp_path / "out" / "s1_cells.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 40
    groups = pd.read_csv(tmp_path / "out" / "s1_cell_groups.csv")
    assert list(groups.columns) == ["cell_id", "group"]
    assert groups["group"].tolist() == truth.iloc[:40]["cell_type"].astype(str).tolist()
    assert result["cells"]["s1"]["genes"][0] == "G1"  # best-predicted gene first
    with pytest.raises(InputError, match="classification"):
        run_qupath({**cfg, "cells": {**cfg["cells"], "classification": "no_such_column"}})


def test_label_outlines_enclose_exactly_their_pixels():
    labels = np.zeros((20, 30), np.int32)
    labels[2:7, 3:11] = 1  # 5 x 8 px rectangle
    labels[12, 20] = 2  # a single pixel
    outlines = label_outlines(labels, origin_xy_px=(100, 200))
    rect = shape(cell_feature("a", outlines[1], object_type="detection")["geometry"])
    single = shape(cell_feature("b", outlines[2], object_type="detection")["geometry"])
    # QuPath: pixel (c, r) covers [c, c + 1) x [r, r + 1), shifted by the tile origin.
    assert rect.bounds == pytest.approx((103, 202, 111, 207), abs=0.51)
    assert rect.area == pytest.approx(40, rel=0.15)
    assert single.contains(Point(120.5, 212.5)) and not rect.contains(Point(120.5, 212.5))


def test_mif_cells_are_called_and_placed_at_their_tile_origin(tmp_path):
    labels = np.zeros((16, 16), np.uint16)
    labels[2:6, 2:6] = 1
    labels[9:14, 9:14] = 2
    tifffile.imwrite(tmp_path / "tile_x00100_y00050.tif", labels)
    cells = pd.DataFrame(
        {"tile": ["tile_x00100_y00050"] * 2, "label": [1, 2], "CD45_pred": [0.9, 0.1], "CD45_prob": [0.8, 0.2]}
    )
    by_file = mif_features(cells, tmp_path)
    assert list(by_file) == [None]  # the origin is in the name: one slide-level file
    first, second = by_file[None]
    assert first["properties"]["classification"]["name"] == "CD45+"
    assert second["properties"]["classification"]["name"] == "negative"
    assert shape(first["geometry"]).contains(Point(100 + 3.5, 50 + 3.5))
    with pytest.raises(InputError, match="label"):
        mif_features(cells.assign(label=[1, 7]), tmp_path)
