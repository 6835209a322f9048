"""The synthetic bundle is a whole XOA output: the files experiment.xenium names, as XOA writes them.

Checked against 10x's published layout (morphology_focus/ OME-TIFF, cells.zarr.zip, gene_panel.json),
the real XOA 3 metrics_summary.csv in /work/shared/fixtures, and spatialdata-io's Xenium reader.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from data_shards.synthetic import DEFAULT_SLIDE, bundle, make_bundle
from data_shards.synthetic.morphology import CELL_SUMMARY_COLUMNS, cell_id_prefixes

PIXEL_SIZE_UM = 0.2125
FIXTURE_METRICS = Path("/work/shared/fixtures/xenium/xoa3_sample/metrics_summary.csv")


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("xoa") / "bundle"
    return out, make_bundle(out, "procedural", n_cells=400, seed=11)


@pytest.fixture(scope="module")
def bundle_without_morphology(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("xoa_scale") / "bundle"
    return out, make_bundle(out, "procedural", n_cells=300, seed=12, write_morphology=False)


def named_files(folder: Path) -> list[str]:
    experiment = json.loads((folder / "experiment.xenium").read_text())
    return list(experiment["images"].values()) + list(experiment["xenium_explorer_files"].values())


def read_cells_zarr(folder: Path) -> zarr.Group:
    return zarr.open(zarr.storage.ZipStore(folder / "cells.zarr.zip", read_only=True), mode="r")


def test_experiment_names_only_files_that_exist(small_bundle, bundle_without_morphology):
    folder, _ = small_bundle
    assert named_files(folder) == ["morphology_focus/morphology_focus_0000.ome.tif", "cells.zarr.zip"]
    scale_folder, _ = bundle_without_morphology
    assert named_files(scale_folder) == ["cells.zarr.zip"]
    for f in (folder, scale_folder):
        for name in named_files(f):
            assert (f / name).is_file(), name
    assert not (scale_folder / "morphology_focus").exists()


def test_morphology_focus_is_a_dapi_pyramid_on_the_xenium_pixel_grid(small_bundle):
    folder, _ = small_bundle
    cells = pq.read_table(folder / "cells.parquet").to_pandas()
    with tifffile.TiffFile(folder / "morphology_focus" / "morphology_focus_0000.ome.tif") as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint16 and page.is_tiled and len(page.subifds or ()) >= 1
        assert "CYX" in tif.series[0].get_axes(False) and 'SizeC="1"' in tif.ome_metadata
        ome = tif.ome_metadata
        assert 'PhysicalSizeX="0.2125"' in ome and 'PhysicalSizeY="0.2125"' in ome and 'Name="DAPI"' in ome
        dapi = tif.series[0].levels[0].asarray()
        assert tif.series[0].levels[1].shape == (dapi.shape[0] // 2, dapi.shape[1] // 2)
    # Pixel (row, col) is centred at ((col + 0.5), (row + 0.5)) · 0.2125 µm: every nucleus is bright at
    # its centroid. Read with µm as pixels (or any other scale), the centroids miss the nuclei.
    col = (cells.x_centroid / PIXEL_SIZE_UM).astype(int).to_numpy()
    row = (cells.y_centroid / PIXEL_SIZE_UM).astype(int).to_numpy()
    background = np.median(dapi)
    assert np.median(dapi[row, col]) > 20 * background
    assert np.median(dapi[(cells.y_centroid / 0.5).astype(int), (cells.x_centroid / 0.5).astype(int)]) < 2 * background
    assert (
        dapi.shape[0] * PIXEL_SIZE_UM > cells.y_centroid.max()
        and dapi.shape[1] * PIXEL_SIZE_UM > cells.x_centroid.max()
    )


def test_cells_zarr_has_ids_summary_masks_and_polygons(small_bundle):
    folder, _ = small_bundle
    cells = pq.read_table(folder / "cells.parquet").to_pandas()
    nuclei = pq.read_table(folder / "nucleus_boundaries.parquet").to_pandas()
    group = read_cells_zarr(folder)
    n = len(cells)
    ids = group["cell_id"][...]
    assert ids.dtype == np.uint32 and ids.shape == (n, 2)
    prefix, suffix = cell_id_prefixes(cells.cell_id.to_numpy())
    np.testing.assert_array_equal(ids[:, 0], prefix)
    assert (ids[:, 1] == 1).all() and (suffix == 1).all()
    # The prefix is the id's 8 letters as hex digits a=0 … p=15.
    assert "".join("abcdefghijklmnop"[(int(ids[0, 0]) >> s) & 15] for s in range(28, -1, -4)) + "-1" == cells.cell_id[0]

    summary = group["cell_summary"]
    assert list(summary.attrs["column_names"]) == list(CELL_SUMMARY_COLUMNS)
    table = pd.DataFrame(summary[...], columns=list(CELL_SUMMARY_COLUMNS))
    np.testing.assert_allclose(table[["cell_centroid_x", "cell_centroid_y"]], cells[["x_centroid", "y_centroid"]])
    np.testing.assert_allclose(table.cell_area, cells.cell_area)

    nucleus_mask, cell_mask = group["masks/0"][...], group["masks/1"][...]
    assert nucleus_mask.dtype == np.uint32 and nucleus_mask.shape == cell_mask.shape
    np.testing.assert_allclose(group["masks/homogeneous_transform"][...], np.diag([1 / 0.2125, 1 / 0.2125, 1, 1]))
    # Labels are polygon index + 1 (polygon_sets/*/cell_index maps them to rows of cell_id).
    for index in (0, 1):
        np.testing.assert_array_equal(group[f"polygon_sets/{index}/cell_index"][...], np.arange(n))
    np.testing.assert_array_equal(np.unique(nucleus_mask)[1:], np.arange(1, n + 1))
    # Each nucleus mask covers its nucleus' area, and lies inside its own cell's mask.
    area_um2 = np.bincount(nucleus_mask.ravel(), minlength=n + 1)[1:] * PIXEL_SIZE_UM**2
    assert np.median(np.abs(area_um2 / cells.nucleus_area - 1)) < 0.1
    inside = nucleus_mask > 0
    np.testing.assert_array_equal(cell_mask[inside], nucleus_mask[inside])
    assert (cell_mask > 0).sum() > 1.5 * inside.sum()
    # polygon vertices are those of the parquet boundaries.
    vertices = group["polygon_sets/0/vertices"][...].reshape(n, -1, 2)
    np.testing.assert_allclose(vertices.reshape(-1, 2), nuclei[["vertex_x", "vertex_y"]].to_numpy(), atol=1e-4)


def test_scale_bundle_has_cells_zarr_without_masks(bundle_without_morphology):
    folder, truth = bundle_without_morphology
    assert set(read_cells_zarr(folder).keys()) == {"cell_id", "cell_summary", "polygon_sets"}
    assert read_cells_zarr(folder)["cell_id"].shape == (truth["n_cells"], 2)


def test_morphology_is_skipped_above_the_pixel_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "MORPHOLOGY_AUTO_MAX_PX", 1000)
    make_bundle(tmp_path / "b", "procedural", n_cells=200, seed=1, write_transcripts=False)
    assert not (tmp_path / "b" / "morphology_focus").exists()
    assert named_files(tmp_path / "b") == ["cells.zarr.zip"]


def test_gene_panel_and_metrics_summary(small_bundle):
    folder, truth = small_bundle
    panel = json.loads((folder / "gene_panel.json").read_text())
    targets = panel["payload"]["targets"]
    genes = [t["type"]["data"] for t in targets if t["type"]["descriptor"] == "gene"]
    assert [g["name"] for g in genes] == truth["gene_panel"] and [g["id"] for g in genes] == truth["gene_ids"]
    assert {t["type"]["descriptor"] for t in targets} == {
        "gene",
        "negative_control",
        "negative_control_codeword",
        "unassigned_codeword",
    }
    transcripts = pq.read_table(folder / "transcripts.parquet", columns=["feature_name", "codeword_index"]).to_pandas()
    codeword = {t["type"]["data"]["name"]: t["codewords"][0] for t in targets}
    pairs = transcripts.drop_duplicates("feature_name")
    assert all(codeword[f] == c for f, c in zip(pairs.feature_name, pairs.codeword_index))

    with open(folder / "metrics_summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2
    if FIXTURE_METRICS.is_file():
        with open(FIXTURE_METRICS, newline="") as f:
            assert rows[0] == next(csv.reader(f))  # the real XOA 3 columns, in order
    metrics = dict(zip(*rows))
    cells = pq.read_table(folder / "cells.parquet").to_pandas()
    assert int(metrics["num_cells_detected"]) == truth["n_cells"] == len(cells)
    assert float(metrics["median_transcripts_per_cell"]) == np.median(cells.transcript_counts)
    experiment = json.loads((folder / "experiment.xenium").read_text())
    assert float(metrics["region_area"]) == pytest.approx(experiment["region_area"])


def open_with_spatialdata_io(folder: Path, **kwargs):
    spatialdata_io = pytest.importorskip("spatialdata_io", reason="spatialdata-io not installed (test extras)")
    with warnings.catch_warnings():
        # Its "... does not match ..." warnings mean the files disagree (cell ids, labels, summary).
        warnings.filterwarnings("error", message=".*does not match", category=UserWarning)
        return spatialdata_io.xenium(folder, **kwargs)


def check_spatialdata(sdata, folder: Path, truth: dict, images: bool) -> None:
    cells = pq.read_table(folder / "cells.parquet").to_pandas()
    table = sdata["table"]
    assert table.n_obs == truth["n_cells"] == len(cells)
    assert table.obs["cell_id"].tolist() == cells.cell_id.tolist()
    assert table.var_names.tolist() == truth["gene_panel"]
    assert len(sdata["cell_boundaries"]) == len(cells)
    if images:
        # the table is linked to the cell label image: labels were matched to cell ids
        assert table.obs["cell_labels"].tolist() == list(range(1, len(cells) + 1))
        image = sdata["morphology_focus"]["scale0"]["image"]
        assert image.shape[0] == 1 and list(image.coords["c"].values) == ["DAPI"]
        assert sdata["cell_labels"]["scale0"]["image"].shape == image.shape[1:]


def test_spatialdata_io_opens_the_bundle(small_bundle):
    folder, truth = small_bundle
    check_spatialdata(open_with_spatialdata_io(folder), folder, truth, images=True)


def test_spatialdata_io_opens_a_scale_bundle_without_images(bundle_without_morphology):
    folder, truth = bundle_without_morphology
    sdata = open_with_spatialdata_io(folder, cells_labels=False, nucleus_labels=False, morphology_focus=False)
    check_spatialdata(sdata, folder, truth, images=False)


@pytest.mark.slow
def test_spatialdata_io_opens_the_demo_bundle(tmp_path):
    if not DEFAULT_SLIDE.is_file():
        pytest.skip(f"demo slide not fetched yet ({DEFAULT_SLIDE}); run `make setup`")
    truth = make_bundle(tmp_path / "demo", "real", seed=0)
    check_spatialdata(open_with_spatialdata_io(tmp_path / "demo"), tmp_path / "demo", truth, images=True)
