"""Tests for data_shards.xenium on the two real XOA fixtures and small synthetic bundles.

Expected values are always recomputed here from the raw files (h5py arrays, pandas groupby on
transcripts, or counts planted by the synthetic builder), never copied from the reader.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from common.errors import InputError
from data_shards.xenium import read_boundaries, read_experiment, read_xenium

# --------------------------------------------------------------------------------------------
# Fixture location
# --------------------------------------------------------------------------------------------


def _fixtures_root() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
    candidates = [default] + ([Path(os.environ["FIXTURES_DIR"])] if os.environ.get("FIXTURES_DIR") else [])
    for root in candidates:
        if (root / "xenium").is_dir():
            return root
    pytest.fail(f"Xenium fixtures not found in {[str(c) for c in candidates]}; set FIXTURES_DIR to ../shared/fixtures")


@pytest.fixture(scope="module")
def xoa1() -> Path:
    return _fixtures_root() / "xenium" / "xoa1_small"


@pytest.fixture(scope="module")
def xoa3() -> Path:
    return _fixtures_root() / "xenium" / "xoa3_sample"


def _dense_from_raw_h5(path: Path) -> tuple[np.ndarray, list[str], pd.DataFrame]:
    """(counts (n_barcodes, n_features) float, barcodes, features) by walking the CSC arrays."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        data, indices, indptr = m["data"][()], m["indices"][()], m["indptr"][()]
        n_features, n_barcodes = (int(v) for v in m["shape"][()])
        barcodes = [b.decode() for b in m["barcodes"][()]]
        features = pd.DataFrame(
            {k: [v.decode() for v in m[f"features/{k}"][()]] for k in ("id", "name", "feature_type")}
        )
    dense = np.zeros((n_barcodes, n_features))
    for column in range(n_barcodes):
        for k in range(int(indptr[column]), int(indptr[column + 1])):
            dense[column, int(indices[k])] += data[k]
    return dense, barcodes, features


# --------------------------------------------------------------------------------------------
# Real fixtures
# --------------------------------------------------------------------------------------------


def test_xoa1_h5_float64_matrix_read_as_integers(xoa1):
    adata = read_xenium(xoa1)
    dense, barcodes, features = _dense_from_raw_h5(xoa1 / "cell_feature_matrix.h5")
    cells = pd.read_parquet(xoa1 / "cells.parquet")

    assert adata.shape == (6, 4)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert np.issubdtype(adata.X.dtype, np.integer)
    row_of_cell = [barcodes.index(str(i)) for i in cells["cell_id"]]
    np.testing.assert_array_equal(adata.X.toarray(), dense[row_of_cell])

    assert list(adata.obs_names) == [str(i) for i in cells["cell_id"]]
    assert list(adata.var_names) == list(features["name"])
    assert list(adata.var["gene_ids"]) == list(features["id"])
    assert all(g.startswith("ENSG") for g in adata.var["gene_ids"])
    for column in ("x_centroid", "y_centroid", "cell_area", "nucleus_area", "transcript_counts"):
        np.testing.assert_array_equal(adata.obs[column].to_numpy(), cells[column].to_numpy())
    np.testing.assert_array_equal(adata.obsm["spatial"], cells[["x_centroid", "y_centroid"]].to_numpy())
    assert adata.obsm["spatial"].dtype == np.float64
    assert adata.uns["xenium"]["pixel_size"] == 0.2125
    assert adata.uns["xenium"]["analysis_sw_version"] == "Xenium-1.0.1"
    assert adata.uns["xenium_reader"]["matrix_source"] == "h5"


def test_xoa1_given_as_experiment_file_and_str(xoa1):
    by_file = read_xenium(str(xoa1 / "experiment.xenium"), matrix="h5")
    by_dir = read_xenium(xoa1, matrix="auto")
    assert (by_file.X != by_dir.X).nnz == 0
    assert list(by_file.obs_names) == list(by_dir.obs_names)


def test_xoa1_transcripts_mode_uses_integer_ids_and_h5_gene_ids(xoa1):
    adata = read_xenium(xoa1, matrix="transcripts")
    tx = pd.read_parquet(xoa1 / "transcripts.parquet")
    kept = tx[(tx["qv"] >= 20) & (tx["cell_id"] >= 0)]
    expected = kept.groupby([kept["cell_id"].astype(str), "feature_name"]).size()
    assert expected.sum() > 0 and adata.X.sum() == expected.sum()
    for (cell, gene), n in expected.items():
        assert adata[cell, gene].X.toarray().item() == n
    # Names match the .h5 features, so var is that panel (zero columns included) with its ids.
    _, _, features = _dense_from_raw_h5(xoa1 / "cell_feature_matrix.h5")
    assert list(adata.var_names) == list(features["name"])
    assert list(adata.var["gene_ids"]) == list(features["id"])
    assert adata.uns["xenium_reader"] == {**adata.uns["xenium_reader"], "matrix_source": "transcripts", "min_qv": 20.0}


@pytest.mark.parametrize("matrix", ["auto", "h5"])
def test_xoa3_matrix_of_other_cells_is_reported_with_both_counts(xoa3, matrix):
    n_cells = pq.ParquetFile(xoa3 / "cells.parquet").metadata.num_rows
    with h5py.File(xoa3 / "cell_feature_matrix.h5", "r") as f:
        n_barcodes = len(f["matrix/barcodes"])
    with pytest.raises(InputError) as caught:
        read_xenium(xoa3, matrix=matrix)
    message = str(caught.value)
    assert "cell_feature_matrix.h5" in message
    assert f"{n_cells} cells in cells.parquet" in message
    assert f"{n_barcodes} barcodes" in message
    assert "0 in common" in message
    assert 'matrix="transcripts"' in message


def _groupby_counts(tx: pd.DataFrame, cell_ids: pd.Series, min_qv: float) -> pd.Series:
    kept = tx[(tx["qv"] >= min_qv) & tx["is_gene"] & tx["cell_id"].isin(set(cell_ids))]
    return kept.groupby(["cell_id", "feature_name"]).size()


@pytest.mark.parametrize("min_qv", [20.0, 0.0])
def test_xoa3_transcripts_mode_equals_pandas_groupby(xoa3, min_qv):
    adata = read_xenium(xoa3, matrix="transcripts", min_qv=min_qv)
    tx = pd.read_parquet(xoa3 / "transcripts.parquet")
    cells = pd.read_parquet(xoa3 / "cells.parquet")
    expected = _groupby_counts(tx, cells["cell_id"], min_qv)

    assert list(adata.obs_names) == list(cells["cell_id"])
    assert set(adata.var_names) == set(tx.loc[tx["is_gene"], "feature_name"])
    assert not any(
        name.startswith(("NegControl", "Unassigned", "Deprecated", "Intergenic")) for name in adata.var_names
    )
    assert np.issubdtype(adata.X.dtype, np.integer) and adata.X.format == "csr"
    assert adata.X.nnz == len(expected) > 0
    rows = adata.obs_names.get_indexer(expected.index.get_level_values(0))
    columns = adata.var_names.get_indexer(expected.index.get_level_values(1))
    np.testing.assert_array_equal(np.asarray(adata.X[rows, columns]).ravel(), expected.to_numpy())
    assert adata.uns["xenium"]["major_version"] == 5
    assert adata.uns["xenium_reader"]["min_qv"] == min_qv

    # Negative controls are recounted into obs; columns XOA already wrote are kept as written.
    kept = tx[(tx["qv"] >= min_qv) & ~tx["is_gene"] & tx["cell_id"].isin(set(cells["cell_id"]))]
    for category in ("negative_control_probe", "negative_control_codeword"):
        per_cell = kept[kept["codeword_category"] == category].groupby("cell_id").size()
        expected_column = per_cell.reindex(cells["cell_id"], fill_value=0).to_numpy()
        np.testing.assert_array_equal(adata.obs[f"{category}_counts"].to_numpy(), expected_column)
    for column in ("unassigned_codeword_counts", "deprecated_codeword_counts", "genomic_control_counts"):
        np.testing.assert_array_equal(adata.obs[column].to_numpy(), cells[column].to_numpy())
    assert pd.api.types.is_string_dtype(adata.obs_names)


def test_cells_csv_gz_used_when_parquet_absent(xoa1, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(xoa1, bundle)
    (bundle / "cells.parquet").unlink()
    adata = read_xenium(bundle)
    csv = pd.read_csv(xoa1 / "cells.csv.gz")
    assert list(adata.obs_names) == [str(i) for i in csv["cell_id"]]
    np.testing.assert_array_equal(adata.obs["x_centroid"].to_numpy(), csv["x_centroid"].to_numpy())
    assert not any(c.startswith("Unnamed") for c in adata.obs.columns)
    assert adata.uns["xenium_reader"]["cells_file"] == "cells.csv.gz"


def test_boundaries_as_str_ids_in_um(xoa1):
    raw = pd.read_parquet(xoa1 / "nucleus_boundaries.parquet")
    table = read_boundaries(xoa1, kind="nucleus")
    assert list(table["cell_id"]) == [str(i) for i in raw["cell_id"]]
    np.testing.assert_array_equal(table[["vertex_x", "vertex_y"]].to_numpy(), raw[["vertex_x", "vertex_y"]].to_numpy())
    for _, polygon in table.groupby("cell_id"):
        np.testing.assert_array_equal(
            polygon.iloc[0][["vertex_x", "vertex_y"]], polygon.iloc[-1][["vertex_x", "vertex_y"]]
        )
    adata = read_xenium(xoa1, boundaries="cell")
    assert set(adata.uns["cell_boundaries"]["cell_id"]) == set(adata.obs_names)
    assert "nucleus_boundaries" not in adata.uns


def test_read_experiment(xoa3):
    assert read_experiment(xoa3 / "experiment.xenium") == json.loads((xoa3 / "experiment.xenium").read_text())


# --------------------------------------------------------------------------------------------
# Synthetic bundles: controls stay out of X
# --------------------------------------------------------------------------------------------

FEATURES = [  # (id, name, feature type, v3 codeword_category)
    ("ENSG00000000001", "GENEA", "Gene Expression", "predesigned_gene"),
    ("NegControlProbe_00001", "NegControlProbe_00001", "Negative Control Probe", "negative_control_probe"),
    ("ENSG00000000002", "GENEB", "Gene Expression", "custom_gene"),
    ("NegControlCodeword_0500", "NegControlCodeword_0500", "Negative Control Codeword", "negative_control_codeword"),
    ("ENSG00000000003", "GENEC", "Gene Expression", "predesigned_gene"),
    ("UnassignedCodeword_0007", "UnassignedCodeword_0007", "Unassigned Codeword", "unassigned_codeword"),
    ("BLANK_0001", "BLANK_0001", "Blank Codeword", "blank_codeword"),
]
IS_GENE = np.array([f[2] == "Gene Expression" for f in FEATURES])


def _write_h5(path: Path, counts: np.ndarray, barcodes: list[str], features=FEATURES) -> None:
    """10x HDF5 v3: CSC with one column per barcode; counts is (n_barcodes, n_features)."""
    csc = sp.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        m["barcodes"] = np.array(barcodes, dtype="S")
        for key, column in (("id", 0), ("name", 1), ("feature_type", 2)):
            m[f"features/{key}"] = np.array([feature[column] for feature in features], dtype="S")
        m["features/genome"] = np.array(["GRCh38"] * len(features), dtype="S")
        m["features/_all_tag_keys"] = np.array(["genome"], dtype="S")


def _make_bundle(root: Path, style: str, seed: int = 0) -> dict:
    """A 5-cell bundle; returns the planted (n_cells, n_features) counts and cell ids."""
    rng = np.random.default_rng(seed)
    n_cells = 5
    ids = [f"{c * 4}-1" for c in "abcde"] if style == "v3" else list(range(1, n_cells + 1))
    counts = rng.integers(0, 5, size=(n_cells, len(FEATURES)))
    counts[0, ~IS_GENE] = 1 + np.arange((~IS_GENE).sum())  # every control type present
    root.mkdir(parents=True)
    (root / "experiment.xenium").write_text(json.dumps({"major_version": 5, "pixel_size": 0.2125}))
    cells = pd.DataFrame(
        {
            "cell_id": ids,
            "x_centroid": rng.uniform(0, 500, n_cells),
            "y_centroid": rng.uniform(0, 500, n_cells),
            "transcript_counts": counts[:, IS_GENE].sum(1),
            "cell_area": rng.uniform(50, 150, n_cells),
            "nucleus_area": rng.uniform(10, 40, n_cells),
        }
    )
    if style == "v3":
        # XOA's own column of the same name must win over the reader's recount.
        cells["unassigned_codeword_counts"] = 1000 + np.arange(n_cells)
        cells["segmentation_method"] = "Segmented by nucleus expansion of 5.0µm"
    cells.to_parquet(root / "cells.parquet")
    order = list(reversed(range(n_cells)))  # matrix columns in another order than cells.parquet
    _write_h5(root / "cell_feature_matrix.h5", counts[order], [str(ids[i]) for i in order])

    rows = []
    for cell in range(n_cells):
        for feature in range(len(FEATURES)):
            rows += [(ids[cell], feature, 30.0)] * int(counts[cell, feature])
        rows += [(ids[cell], 0, 12.5)]  # below qv 20
    unassigned = "UNASSIGNED" if style == "v3" else -1
    stranger = "zzzz-1" if style == "v3" else 999
    rows += [(unassigned, 2, 40.0), (unassigned, 1, 40.0), (stranger, 4, 40.0)]
    order = rng.permutation(len(rows))
    cell_col = [rows[i][0] for i in order]
    feature_col = [rows[i][1] for i in order]
    columns = {
        "cell_id": pa.array(cell_col, type=pa.large_string() if style == "v3" else pa.int32()),
        "feature_name": pa.array([FEATURES[f][1].encode() for f in feature_col], type=pa.binary())
        if style == "v1"
        else pa.array([FEATURES[f][1] for f in feature_col], type=pa.large_string()),
        "qv": pa.array([rows[i][2] for i in order], type=pa.float32()),
        "x_location": pa.array(rng.uniform(0, 500, len(rows)), type=pa.float32()),
    }
    if style == "v3":
        columns["codeword_category"] = pa.array([FEATURES[f][3] for f in feature_col], type=pa.large_string())
        columns["is_gene"] = pa.array([bool(IS_GENE[f]) for f in feature_col])
    # Small row groups so the reader's batch loop runs more than once.
    pq.write_table(pa.table(columns), root / "transcripts.parquet", row_group_size=7)
    return {"counts": counts, "ids": [str(i) for i in ids]}


@pytest.mark.parametrize("style", ["v3", "v1"])
@pytest.mark.parametrize("matrix", ["h5", "transcripts"])
def test_controls_counted_in_obs_not_in_x(tmp_path, style, matrix, monkeypatch):
    import data_shards.xenium as xenium

    monkeypatch.setattr(xenium, "TRANSCRIPT_BATCH_ROWS", 8)
    planted = _make_bundle(tmp_path / "bundle", style)
    adata = read_xenium(tmp_path / "bundle", matrix=matrix)
    counts = planted["counts"]

    assert list(adata.obs_names) == planted["ids"]
    assert list(adata.var_names) == [f[1] for f in FEATURES if f[2] == "Gene Expression"]
    assert list(adata.var["gene_ids"]) == [f[0] for f in FEATURES if f[2] == "Gene Expression"]
    np.testing.assert_array_equal(adata.X.toarray(), counts[:, IS_GENE])
    for column, feature in (
        ("negative_control_probe_counts", 1),
        ("negative_control_codeword_counts", 3),
        ("blank_codeword_counts", 6),
    ):
        np.testing.assert_array_equal(adata.obs[column].to_numpy(), counts[:, feature])
    expected_unassigned = 1000 + np.arange(5) if style == "v3" else counts[:, 5]
    np.testing.assert_array_equal(adata.obs["unassigned_codeword_counts"].to_numpy(), expected_unassigned)


def test_gene_panel_json_gives_ids_and_zero_columns(tmp_path):
    bundle = tmp_path / "bundle"
    planted = _make_bundle(bundle, "v1")
    (bundle / "cell_feature_matrix.h5").unlink()
    targets = [
        {"type": {"descriptor": "gene", "data": {"id": f[0], "name": f[1]}}}
        for f in FEATURES
        if IS_GENE[FEATURES.index(f)]
    ]
    targets.append({"type": {"descriptor": "gene", "data": {"id": "ENSG00000000009", "name": "GENEZ"}}})
    targets.append({"type": {"descriptor": "negative_control_probe", "data": {"name": "NegControlProbe_00001"}}})
    (bundle / "gene_panel.json").write_text(json.dumps({"payload": {"targets": targets}}))

    adata = read_xenium(bundle)  # auto: no .h5, so transcripts
    assert adata.uns["xenium_reader"]["matrix_source"] == "transcripts"
    assert list(adata.var_names) == ["GENEA", "GENEB", "GENEC", "GENEZ"]
    assert adata.var.loc["GENEZ", "gene_ids"] == "ENSG00000000009"
    np.testing.assert_array_equal(adata.X.toarray()[:, :3], planted["counts"][:, IS_GENE])
    assert adata.X[:, 3].nnz == 0


def test_repeated_gene_symbols_made_unique(tmp_path, caplog):
    bundle = tmp_path / "bundle"
    _make_bundle(bundle, "v3")
    features = [list(f[:3]) for f in FEATURES]
    features[2][1] = "GENEA"
    counts = np.ones((5, len(FEATURES)), dtype=int)
    ids = list(pd.read_parquet(bundle / "cells.parquet")["cell_id"])
    _write_h5(bundle / "cell_feature_matrix.h5", counts, ids, features)
    adata = read_xenium(bundle)
    assert adata.var_names.is_unique
    assert list(adata.var["gene_ids"][:2]) == ["ENSG00000000001", "ENSG00000000002"]
    assert "repeated gene symbols" in caplog.text


# --------------------------------------------------------------------------------------------
# Bad input: one InputError naming the file
# --------------------------------------------------------------------------------------------


def _rewrite_h5(path: Path, **datasets) -> None:
    with h5py.File(path, "r+") as f:
        for name, value in datasets.items():
            key = f"matrix/{name}"
            del f[key]
            f[key] = value


def _edit_cells(path: Path, edit) -> None:
    frame = pd.read_parquet(path)
    edit(frame)
    frame.to_parquet(path)


def _break_x_centroid(frame):
    frame.loc[[1, 3], "x_centroid"] = np.nan


BROKEN = {
    "no experiment": (lambda b: (b / "experiment.xenium").unlink(), "experiment.xenium", {}),
    "experiment not JSON": (
        lambda b: (b / "experiment.xenium").write_text("{pixel_size: 0.2"),
        "experiment.xenium",
        {},
    ),
    "no pixel_size": (lambda b: (b / "experiment.xenium").write_text('{"run_name": "x"}'), "pixel_size", {}),
    "no cells": (lambda b: [(b / n).unlink() for n in ("cells.parquet", "cells.csv.gz")], "cells.parquet", {}),
    "cells column missing": (
        lambda b: _edit_cells(b / "cells.parquet", lambda f: f.pop("nucleus_area")),
        "nucleus_area",
        {},
    ),
    "NaN centroids": (lambda b: _edit_cells(b / "cells.parquet", _break_x_centroid), "2 NaN", {}),
    "no counts at all": (
        lambda b: [(b / n).unlink() for n in ("cell_feature_matrix.h5", "transcripts.parquet")],
        "cell_feature_matrix.h5",
        {},
    ),
    "empty matrix": (
        lambda b: _rewrite_h5(
            b / "cell_feature_matrix.h5",
            shape=np.array([4.0, 0.0]),
            barcodes=np.array([], dtype="S1"),
            indptr=np.array([0.0]),
            data=np.array([]),
            indices=np.array([]),
        ),
        "non-empty",
        {},
    ),
    "shape vs features": (
        lambda b: _rewrite_h5(b / "cell_feature_matrix.h5", shape=np.array([5.0, 6.0])),
        "matrix/features",
        {},
    ),
    "shape vs barcodes": (
        lambda b: _rewrite_h5(b / "cell_feature_matrix.h5", shape=np.array([4.0, 7.0])),
        "matrix/barcodes",
        {},
    ),
    "fractional counts": (
        lambda b: _rewrite_h5(b / "cell_feature_matrix.h5", data=np.full(15, 1.5)),
        "matrix/data",
        {},
    ),
    "indptr too short": (
        lambda b: _rewrite_h5(b / "cell_feature_matrix.h5", indptr=np.array([0.0, 3.0, 15.0])),
        "matrix/indptr",
        {},
    ),
    "no gene features": (
        lambda b: _rewrite_h5(
            b / "cell_feature_matrix.h5", **{"features/feature_type": np.array([b"Blank Codeword"] * 4)}
        ),
        "Gene Expression",
        {},
    ),
    "transcripts missing qv": (
        lambda b: pq.write_table(
            pq.read_table(b / "transcripts.parquet").drop_columns(["qv"]), b / "transcripts.parquet"
        ),
        "qv",
        {"matrix": "transcripts"},
    ),
    "no transcripts": (
        lambda b: (b / "transcripts.parquet").unlink(),
        "transcripts.parquet",
        {"matrix": "transcripts"},
    ),
    "unknown matrix": (lambda b: None, "matrix", {"matrix": "mtx"}),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_input_raises_input_error_naming_the_file(xoa1, tmp_path, case):
    break_it, expected_text, kwargs = BROKEN[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(xoa1, bundle)
    break_it(bundle)
    with pytest.raises(InputError) as caught:
        read_xenium(bundle, **kwargs)
    message = str(caught.value)
    assert expected_text in message
    if case != "unknown matrix":
        assert str(bundle) in message


def test_missing_folder_and_boundaries(tmp_path, xoa3):
    with pytest.raises(InputError, match="no_such_bundle"):
        read_xenium(tmp_path / "no_such_bundle")
    with pytest.raises(InputError, match="nucleus_boundaries.parquet"):
        read_boundaries(xoa3, kind="nucleus")
    with pytest.raises(InputError, match="kind"):
        read_boundaries(xoa3, kind="membrane")
