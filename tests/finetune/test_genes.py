"""The gene-expression head: splits, the shard ↔ bundle join, a planted signal, the full run's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from common.errors import InputError
from data_shards.xenium import read_xenium
from finetune.embed import embed_images
from finetune.encoders import load_encoder
from finetune.genes import cluster_agreement, fit_linear_probe, load_cell_data, run_genes, select_genes, split_cells
from finetune.metrics import pearson_per_gene
from finetune.synthetic import write_synthetic_cells, write_tiny_export

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


# ---------------------------------------------------------------------------------------------
# Splits


def _cells(n_per_slide=200, slides=(("s1", "P1", "BRCA"), ("s2", "P2", "BRCA"), ("s3", "P3", "LUAD")), seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for slide, patient, cancer in slides:
        frames.append(
            pd.DataFrame(
                {
                    "slide": slide,
                    "cell_id": [f"c{i}" for i in range(n_per_slide)],
                    "x_um": rng.uniform(0, 2000, n_per_slide),
                    "y_um": rng.uniform(0, 800, n_per_slide),
                    "registration_region": rng.integers(0, 3, n_per_slide),
                    "patient": patient,
                    "cancer_type": cancer,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_intra_blocks_are_spatially_disjoint_with_a_gap_in_every_slide():
    obs = _cells()
    split = split_cells(obs, "intra", n_blocks=5, gap_um=60.0, seed=3)
    assert len(np.intersect1d(split.train, split.test)) == 0
    for slide in obs["slide"].unique():
        rows = np.flatnonzero(obs["slide"] == slide)
        test, train = np.intersect1d(rows, split.test), np.intersect1d(rows, split.train)
        assert len(test) > 0 and len(train) > 0
        # Stripes run across the longer side (x: 2000 µm): the test stripe's x interval holds no training cell.
        lo, hi = obs.loc[test, "x_um"].min(), obs.loc[test, "x_um"].max()
        assert not ((obs.loc[train, "x_um"] >= lo) & (obs.loc[train, "x_um"] <= hi)).any()
        xy = obs[["x_um", "y_um"]].to_numpy()
        nearest = np.min(np.linalg.norm(xy[train][:, None] - xy[test][None], axis=2), axis=1)
        assert nearest.min() >= 60.0
        assert 0.1 < len(test) / len(rows) < 0.3  # one of 5 equal-count blocks


def test_intra_by_registration_region_holds_out_one_region_per_slide():
    obs = _cells()
    split = split_cells(obs, "intra", intra_by="registration_region", seed=1)
    for slide in obs["slide"].unique():
        test = obs.iloc[split.test]
        test_regions = test.loc[test["slide"] == slide, "registration_region"].unique()
        assert len(test_regions) == 1
        train = obs.iloc[split.train]
        assert test_regions[0] not in set(train.loc[train["slide"] == slide, "registration_region"])
    one_region = _cells().assign(registration_region=0)
    with pytest.raises(InputError, match="registration_region"):
        split_cells(one_region, "intra", intra_by="registration_region")


@pytest.mark.parametrize("setting,key", [("inter", "patient"), ("cross", "cancer_type")])
def test_group_settings_hold_out_whole_groups(setting, key):
    obs = _cells()
    split = split_cells(obs, setting, test_fraction=0.2, seed=0)
    train_groups, test_groups = set(obs.iloc[split.train][key]), set(obs.iloc[split.test][key])
    assert train_groups and test_groups and not (train_groups & test_groups)
    assert len(split.train) + len(split.test) == len(obs)
    assert split.info["test_groups"] == sorted(test_groups)


def test_explicit_test_groups_and_clear_errors_when_metadata_cannot_support_a_setting():
    obs = _cells()
    split = split_cells(obs, "cross", test_groups=["LUAD"])
    assert set(obs.iloc[split.test]["cancer_type"]) == {"LUAD"}
    with pytest.raises(InputError, match="test_groups"):
        split_cells(obs, "cross", test_groups=["COAD"])
    with pytest.raises(InputError, match="test_groups"):
        split_cells(obs, "cross", test_groups=["LUAD", "BRCA"])  # nothing left to train on
    one_patient = _cells(slides=(("s1", "P1", "BRCA"), ("s2", "P1", "BRCA")))
    with pytest.raises(InputError, match="at least 2 distinct values of 'patient'"):
        split_cells(one_patient, "inter", source="manifest.json")
    with pytest.raises(InputError, match="cancer_type"):
        split_cells(_cells().drop(columns="cancer_type"), "cross")
    with pytest.raises(InputError, match="patient"):
        split_cells(_cells().assign(patient=None), "inter")
    with pytest.raises(InputError, match="setting"):
        split_cells(obs, "leave_one_out")


# ---------------------------------------------------------------------------------------------
# Data, planted signal


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("genes")
    manifest = write_synthetic_cells(
        root / "data",
        [
            {"id": "s1", "n_cells": 300, "meta": {"patient": "P1", "cancer_type": "SKCM"}},
            {"id": "s2", "n_cells": 200, "meta": {"patient": "P2", "cancer_type": "BRCA"}},
        ],
        seed=0,
    )
    export = write_tiny_export(root / "export", kwargs=TINY_VIT)
    return {"root": root, "manifest": manifest, "export": export}


def test_cells_are_joined_to_their_bundle_expression(synthetic):
    data = load_cell_data(synthetic["manifest"], progress=False)
    assert len(data.obs) == data.expression.n_obs == len(data.jpegs) == 500
    assert list(data.expression.var_names) == [f"G{i}" for i in range(6)]
    manifest = json.loads(Path(synthetic["manifest"]).read_text())
    raw = {slide: read_xenium(entry["bundle"]) for slide, entry in manifest["slides"].items()}
    for row in (0, 123, 499):
        slide, cell = data.obs["slide"].iloc[row], data.obs["cell_id"].iloc[row]
        counts = raw[slide][cell].X.toarray().ravel()
        expected = np.log1p(counts / counts.sum() * 1e4)
        np.testing.assert_allclose(data.expression.X[row].toarray().ravel(), expected, rtol=1e-5)
    # The json's planted t drives G0: the join put the right expression on the right crop.
    assert np.corrcoef(data.obs["t"], data.expression[:, "G0"].X.toarray().ravel())[0, 1] > 0.9


def test_gene_selection_hvg_and_configured_lists(synthetic):
    from finetune.genes import log_normalise

    rng = np.random.default_rng(0)
    rates = np.exp(rng.uniform(np.log(2), np.log(50), 200))[None, :].repeat(400, 0)  # (cells, genes)
    rates[:, :5] *= rng.gamma(0.5, 2.0, size=(400, 5))  # five over-dispersed genes
    counts = rng.poisson(rates)
    counts[:, 199] = 0  # never expressed: never selected
    raw = anndata.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=[f"g{i}" for i in range(200)]))
    genes, rule = select_genes(log_normalise(raw), "intra", {"intra": None, "n_top": 10})
    assert len(genes) == 10 and {f"g{i}" for i in range(5)} <= set(genes) and "highly variable" in rule
    genes, rule = select_genes(log_normalise(raw), "intra", {"intra": None, "n_top": 500})
    assert len(genes) == 199 and "g199" not in genes

    data = load_cell_data(synthetic["manifest"], progress=False)
    genes, _ = select_genes(data.expression, "cross", {"cross": ["G3", "G1"], "n_top": 50})
    assert genes == ["G3", "G1"]
    with pytest.raises(InputError, match="genes.inter"):
        select_genes(data.expression, "inter", {"inter": ["G1", "KRT5"]})


def test_linear_probe_recovers_a_planted_signal_and_not_shuffled_labels(synthetic):
    data = load_cell_data(synthetic["manifest"], progress=False)
    encoder = load_encoder({"source": "export", "path": str(synthetic["export"])})
    features = embed_images(encoder, data.jpegs, len(data.jpegs), batch_size=128, progress=False)  # (500, 32)
    y = data.expression[:, ["G0"]].X.toarray()  # (500, 1)
    split = split_cells(data.obs, "intra", seed=0)
    probe = fit_linear_probe(features[split.train], y[split.train], [0.01, 0.1, 1, 10, 100, 1000, 1e4, 1e5])
    assert pearson_per_gene(probe.predict(features[split.test]), y[split.test])[0] > 0.8

    # Control: fits to shuffled labels point in a random direction of feature space, so their
    # correlation with the truth has a random sign (0 on average) and they explain none of its variance.
    correlations, r2 = [], []
    for k in range(12):
        shuffled = y[split.train][np.random.default_rng(k).permutation(len(split.train))]
        control = fit_linear_probe(features[split.train], shuffled, [0.01, 0.1, 1, 10, 100, 1000, 1e4, 1e5])
        predicted = control.predict(features[split.test])
        correlations.append(pearson_per_gene(predicted, y[split.test])[0])
        r2.append(1 - ((predicted - y[split.test]) ** 2).sum() / ((y[split.test] - y[split.test].mean()) ** 2).sum())
    assert abs(np.mean(correlations)) < 0.25
    assert max(r2) < 0.1


def test_cluster_agreement_is_one_for_identical_profiles_and_low_for_scrambled_ones():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(4, 12))
    labels = rng.integers(0, 4, 240)
    measured = centres[labels] + rng.normal(0, 0.5, size=(240, 12))
    same, *_ = cluster_agreement(measured, measured.copy())
    assert same["ari_clusters"] == pytest.approx(1.0)
    assert same["ari_label_transfer"] > 0.95  # kNN voting may relabel a few cells at cluster borders
    scrambled, *_ = cluster_agreement(measured, measured[rng.permutation(240)])
    assert scrambled["ari_clusters"] < 0.2 and scrambled["ari_label_transfer"] < 0.2


# ---------------------------------------------------------------------------------------------
# The run


def _config(synthetic, out_dir, **overrides):
    cfg = {
        "out_dir": str(out_dir),
        "data": {"manifest": str(synthetic["manifest"])},
        "encoder": {"source": "export", "path": str(synthetic["export"])},
        "progress": False,
        "genes": {"n_top": 4},
        "modes": ["linear_probe"],
    }
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(overrides))


def test_run_genes_writes_metrics_tables_figure_and_predictions(synthetic, capsys):
    out_dir = synthetic["root"] / "run_inter"
    result = run_genes(
        _config(
            synthetic,
            out_dir,
            setting="inter",
            modes=["linear_probe", "finetune"],
            genes={"inter": ["G0", "G1", "G2"]},
            finetune={"epochs": 1, "batch_size": 64},
        )
    )
    printed = capsys.readouterr().out
    for run in ("pretrained/linear_probe", "pretrained/finetune", "random/linear_probe", "random/finetune"):
        assert run in printed and run in result["results"]
    assert {p.name for p in out_dir.iterdir()} >= {
        "config.yaml",
        "metrics.json",
        "per_gene.csv",
        "predictions.h5ad",
        "linear_head.safetensors",
        "linear_head.json",
        "spatial_G0.png",
    }
    assert not list(out_dir.parent.glob(f".{out_dir.name}*"))  # no temporary folder left behind
    metrics = json.loads((out_dir / "metrics.json").read_text())
    held_out = metrics["split"]["test_groups"]
    assert len(held_out) == 1 and metrics["genes"] == ["G0", "G1", "G2"]

    predictions = anndata.read_h5ad(out_dir / "predictions.h5ad")
    genes = metrics["genes"]
    assert predictions.shape == (metrics["n_test"], len(genes))
    assert list(predictions.var_names) == genes
    assert set(predictions.obs["patient"]) == set(held_out)  # only the held-out patient's cells
    assert {"x_um", "y_um", "he_x_px", "he_y_px", "cell_id", "slide", "leiden_measured"} <= set(predictions.obs.columns)
    np.testing.assert_array_equal(predictions.obsm["spatial"], predictions.obs[["x_um", "y_um"]].to_numpy())
    np.testing.assert_array_equal(predictions.X, predictions.layers["pred_pretrained_linear_probe"])
    data = load_cell_data(synthetic["manifest"], progress=False)
    index = pd.MultiIndex.from_frame(data.obs[["slide", "cell_id"]])
    rows = index.get_indexer(pd.MultiIndex.from_frame(predictions.obs[["slide", "cell_id"]].astype(str)))
    np.testing.assert_allclose(predictions.layers["measured"], data.expression[rows, genes].X.toarray(), rtol=1e-6)

    table = pd.read_csv(out_dir / "per_gene.csv").set_index("gene")
    recomputed = pearson_per_gene(predictions.X, predictions.layers["measured"])
    np.testing.assert_allclose(table.loc[genes, "pearson_pretrained_linear_probe"], recomputed, atol=1e-4)
    assert table.loc["G0", "pearson_pretrained_linear_probe"] > 0.8
    assert result["results"]["pretrained/linear_probe"]["mean_pearson"] == pytest.approx(
        np.nanmean(recomputed), abs=1e-4
    )
    assert (out_dir / "spatial_G0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["results"]["pretrained/finetune"]["epoch_losses"]) == 1


def test_controls_pass_with_the_planted_truth_and_withhold_the_comparison_with_a_junk_oracle(synthetic, capsys):
    cfg = _config(
        synthetic, synthetic["root"] / "controls", genes={"intra": ["G0", "G1", "G2"]}, controls={"n_boot": 300}
    )
    result = run_genes(cfg)  # oracle: auto -> the sample json's planted `t`
    printed = capsys.readouterr().out
    controls = result["controls"]
    assert controls["random_linear_probe"]["seeds"] == 3
    assert {"oracle/linear_probe", "oracle_shuffled/linear_probe", "random3/linear_probe"} <= set(result["results"])
    assert controls["gate"]["passes"] and "controls pass" in printed
    assert result["results"]["oracle/linear_probe"]["top_genes"]["G0"] > 0.9  # G0 follows t
    assert controls["gate"]["shuffled_vs_random"]["delta"] < 0  # permuted truth carries nothing
    low, high = result["results"]["pretrained/linear_probe"]["mean_pearson_ci"]
    assert low <= result["results"]["pretrained/linear_probe"]["mean_pearson"] <= high
    assert "random encoders" in printed and "linear_probe:" in printed

    # An "oracle" that is noise: the harness cannot separate it from random, so no comparison is printed.
    data = load_cell_data(synthetic["manifest"], progress=False)
    junk = synthetic["root"] / "junk.csv"
    labels = np.random.default_rng(0).integers(0, 3, len(data.obs))
    data.obs[["slide", "cell_id"]].assign(label=labels).to_csv(junk, index=False)
    cfg = OmegaConf.merge(cfg, {"out_dir": str(synthetic["root"] / "junk"), "controls": {"oracle": str(junk)}})
    result = run_genes(cfg)
    printed = capsys.readouterr().out
    assert not result["controls"]["gate"]["passes"] and "controls FAIL" in printed
    assert "linear_probe: " not in printed.split("controls FAIL")[1]


def test_run_genes_refuses_settings_the_metadata_cannot_support_before_writing(synthetic, tmp_path):
    manifest = write_synthetic_cells(tmp_path / "one", [{"id": "a", "n_cells": 40, "meta": {"patient": "P1"}}])
    cfg = _config(synthetic, tmp_path / "out", setting="cross", data={"manifest": str(manifest)})
    with pytest.raises(InputError, match="cancer_type"):
        run_genes(cfg)
    with pytest.raises(InputError, match="patient"):
        run_genes(OmegaConf.merge(cfg, {"setting": "inter"}))
    with pytest.raises(InputError, match="modes"):
        run_genes(OmegaConf.merge(cfg, {"setting": "intra", "modes": ["lora"]}))
    assert not (tmp_path / "out").exists()


def test_paired_gene_comparison_counts_wins_and_matches_scipy():
    from scipy.stats import wilcoxon

    from finetune.genes import paired_gene_comparison

    ours = np.array([0.5, 0.4, np.nan, 0.3, 0.2, 0.6, 0.1])
    base = np.array([0.4, 0.45, 0.2, 0.1, 0.1, 0.3, np.nan])
    result = paired_gene_comparison(ours, base)
    kept = [0, 1, 3, 4, 5]  # genes with a correlation in both runs
    assert result["genes_compared"] == 5 and result["genes_won"] == 4
    assert result["wilcoxon_p"] == pytest.approx(wilcoxon(ours[kept] - base[kept]).pvalue)
