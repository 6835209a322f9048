"""MCAT survival: hazard bins, NLL loss, patient folds, model masks, signal on a synthetic cohort, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sksurv.metrics import concordance_index_censored

from common.config import apply_schema
from common.errors import InputError
from finetune.controls import difference, gate
from finetune.survival import (
    MCAT,
    SurvivalConfig,
    bin_index,
    cross_validate,
    hazard_bins,
    load_bags,
    load_embedding_file,
    nll_survival_loss,
    pad_bags,
    patient_folds,
    read_cell_embeddings,
    read_clinical,
    read_signatures,
    run_survival,
    torch_threads,
)
from finetune.survival.reference import c_index_replicates, mean_bags, ridge_cox_cv
from finetune.synthetic import make_cohort
from finetune.synthetic.cohort import cells_in_tiles, make_shared_cohort, tile_states

SMALL_MODEL = {"dim": 32, "n_heads": 2, "n_layers": 1, "dropout": 0.25, "n_bins": 4}
FAST_TRAIN = {
    "n_folds": 5,
    "epochs": 20,
    "batch_size": 8,
    "grad_accumulation": 1,
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "alpha": 0.0,
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # the models are tiny: threads only add overhead
        yield


@pytest.fixture(scope="module")
def strong_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    made = make_cohort(
        out,
        n_patients=60,
        embedding_dim=16,
        cell_dim=8,
        seed=3,
        image_effect=1.5,
        genomic_effect=1.5,
        cell_effect=0.0,
        patches_per_slide=(20, 40),
    )
    cohort = read_clinical(made["clinical_csv"], read_signatures(made["signatures_csv"]))
    bags = load_bags(cohort, made["embeddings_dir"], max_patches=64)
    return made, cohort, bags


# ---------------------------------------------------------------------------------------------
# Bins


def test_hazard_bins_cut_at_uncensored_quartiles_with_open_outer_edges():
    observed = np.arange(1.0, 9.0)  # 1 … 8 months, events
    censored_times = np.array([0.5, 50.0, 100.0])  # must not move the cut points
    times = np.concatenate([observed, censored_times])
    events = np.concatenate([np.ones(8, bool), np.zeros(3, bool)])
    edges = hazard_bins(times, events, n_bins=4)
    # linear-interpolated quartiles of 1..8: 1 + 7·q
    np.testing.assert_allclose(edges[1:4], [1 + 7 * 0.25, 1 + 7 * 0.5, 1 + 7 * 0.75])
    assert edges[0] == 0.0 and edges[-1] == math.inf
    # each bin holds a quarter of the observed events
    assert np.bincount(bin_index(observed, edges), minlength=4).tolist() == [2, 2, 2, 2]


def test_bin_index_left_closed_and_beyond_training_follow_up():
    edges = np.array([0.0, 2.75, 4.5, 6.25, np.inf])
    times = [0.0, 2.74, 2.75, 4.5, 6.3, 1e6]
    assert bin_index(times, edges).tolist() == [0, 0, 1, 2, 3, 3]


def test_hazard_bins_need_enough_events():
    with pytest.raises(InputError, match="observed events"):
        hazard_bins([1.0, 2.0, 3.0, 4.0, 5.0], [1, 1, 0, 0, 0], n_bins=4)


# ---------------------------------------------------------------------------------------------
# Loss


def test_nll_loss_by_hand_censored_and_uncensored():
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    s0, s1 = (1 - 0.1), (1 - 0.1) * (1 - 0.2)  # S_0, S_1
    # death observed in bin 2: alive through bins 0-1, then the hazard of bin 2
    died = nll_survival_loss(h, torch.tensor([2]), torch.tensor([0]))
    assert died.item() == pytest.approx(-(math.log(s1) + math.log(0.3)), rel=1e-6)
    # censored in bin 1: known alive through the end of bin 1
    alive = nll_survival_loss(h, torch.tensor([1]), torch.tensor([1]))
    assert alive.item() == pytest.approx(-math.log(s1), rel=1e-6)
    # bin 0: S_{-1} = 1
    assert nll_survival_loss(h, torch.tensor([0]), torch.tensor([0])).item() == pytest.approx(-math.log(0.1), rel=1e-6)
    assert nll_survival_loss(h, torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(-math.log(s0), rel=1e-6)
    # batch mean and α up-weighting of the uncensored term
    both = torch.cat([h, h])
    batch = nll_survival_loss(both, torch.tensor([2, 1]), torch.tensor([0, 1]), alpha=0.4)
    uncensored = -(math.log(s1) + math.log(0.3))
    expected = ((1 - 0.4) * uncensored + 0.4 * uncensored + (1 - 0.4) * (-math.log(s1))) / 2
    assert batch.item() == pytest.approx(expected, rel=1e-6)


def test_nll_loss_clamps_zero_probabilities():
    h = torch.tensor([[0.0, 1.0, 0.5, 0.5]])
    loss = nll_survival_loss(h, torch.tensor([0]), torch.tensor([0]), eps=1e-7)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(1e-7), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Folds and data


def test_patient_folds_disjoint_and_complete(tmp_path):
    # one row per slide, as MCAT's TCGA tables: patients repeat across rows
    rows = []
    rng = np.random.default_rng(0)
    for p in range(23):
        for s in range(1 + p % 3):
            rows.append(
                {
                    "case_id": f"C{p}",
                    "slide_id": f"C{p}-{s}",
                    "survival_months": 10.0 + p,
                    "censorship": p % 2,
                    "TP53_rnaseq": float(p),
                    "MYC": float(-p),
                }
            )
    pd.DataFrame(rows).to_csv(tmp_path / "clinical.csv", index=False)
    pd.DataFrame({"group": ["TS", "Onc"], "gene": ["TP53", "MYC"]}).to_csv(tmp_path / "sig.csv", index=False)
    cohort = read_clinical(tmp_path / "clinical.csv", read_signatures(tmp_path / "sig.csv"))
    assert len(cohort) == 23 and cohort.slide_ids[2] == ["C2-0", "C2-1", "C2-2"]
    assert cohort.omic_columns == {"TS": ["TP53_rnaseq"], "Onc": ["MYC"]}
    folds = patient_folds(cohort.case_ids, cohort.events, n_folds=5, seed=1)
    tests = [set(np.asarray(cohort.case_ids)[te]) for _, te in folds]
    assert sum(len(t) for t in tests) == 23 and set().union(*tests) == set(cohort.case_ids)
    for train, test in folds:
        assert not set(np.asarray(cohort.case_ids)[train]) & set(np.asarray(cohort.case_ids)[test])
        assert len(train) + len(test) == 23
    del rng


def test_clinical_errors_name_file_and_field(tmp_path):
    pd.DataFrame({"case_id": ["a"], "slide_id": ["s"], "survival_months": [3.0]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    with pytest.raises(InputError, match=r"c\.csv.*censorship"):
        read_clinical(tmp_path / "c.csv", {"g": ["TP53"]})
    rows = pd.DataFrame(
        {
            "case_id": ["a", "a"],
            "slide_id": ["s1", "s2"],
            "survival_months": [3.0, 4.0],
            "censorship": [0, 0],
            "TP53": [1.0, 1.0],
        }
    )
    rows.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(InputError, match="same survival"):
        read_clinical(tmp_path / "d.csv", {"g": ["TP53"]})


def test_bags_from_h5ad_and_npz(tmp_path):
    import anndata

    anndata.AnnData(X=np.ones((5, 3), np.float32)).write_h5ad(tmp_path / "s1.h5ad")  # finetune.embed's layout
    np.savez(tmp_path / "s2.npz", embeddings=np.zeros((4, 3), np.float32), coords=np.zeros((4, 2)))
    assert load_embedding_file(tmp_path / "s1.h5ad").shape == (5, 3)
    pd.DataFrame(
        {
            "case_id": ["a", "b"],
            "slide_id": ["s1;s2", "s2"],
            "survival_months": [1.0, 2.0],
            "censorship": [0, 1],
            "TP53": [0.0, 1.0],
        }
    ).to_csv(tmp_path / "c.csv", index=False)
    cohort = read_clinical(tmp_path / "c.csv", {"g": ["TP53"]})
    bags = load_bags(cohort, tmp_path, max_patches=6, seed=0)
    assert [b.shape for b in bags] == [(6, 3), (4, 3)]
    pd.DataFrame({"case_id": ["b", "a"], "e0": [2.0, 1.0]}).to_csv(tmp_path / "cells.csv", index=False)
    np.testing.assert_array_equal(read_cell_embeddings(tmp_path / "cells.csv", cohort)[:, 0], [1.0, 2.0])
    (tmp_path / "s2.npz").unlink()
    with pytest.raises(InputError, match="slide s2"):
        load_bags(cohort, tmp_path)


# ---------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("mode,cell_dim", [("mcat", None), ("mcat", 6), ("pathology", None), ("genomic", 6)])
def test_mcat_shapes_and_padding_masks(mode, cell_dim):
    torch.manual_seed(0)
    groups = [3, 5, 2]
    model = MCAT(image_dim=10, group_sizes=groups, cell_dim=cell_dim, dim=16, n_heads=2, n_layers=1, mode=mode).eval()
    bags = [torch.randn(7, 10), torch.randn(3, 10), torch.randn(12, 10)]
    patches, mask = pad_bags(bags)
    assert patches.shape == (3, 12, 10) and mask.sum(1).tolist() == [5, 9, 0]
    omics = [torch.randn(3, n) for n in groups]
    cell = torch.randn(3, cell_dim) if cell_dim else None
    out = model(patches, mask, omics, cell)
    assert out["hazards"].shape == out["survival"].shape == (3, 4) and out["risk"].shape == (3,)
    assert torch.all((out["hazards"] > 0) & (out["hazards"] < 1))
    assert torch.all(out["survival"][:, 1:] <= out["survival"][:, :-1])  # survival never rises
    if mode == "mcat":
        assert out["coattention"].shape == (3, len(groups) + (1 if cell_dim else 0), 12)
        assert torch.all(out["coattention"][1, :, 3:] == 0)  # no attention on padding
    # a patient alone gives the same risk as inside a padded batch
    alone = model(bags[1][None], None, [x[1:2] for x in omics], cell[1:2] if cell_dim else None)
    torch.testing.assert_close(alone["risk"], out["risk"][1:2], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Learning


def _pooled_c(oof: pd.DataFrame) -> float:
    return concordance_index_censored(
        oof["censorship"].to_numpy() == 0, oof["survival_months"].to_numpy(), oof["risk"].to_numpy()
    )[0]


@pytest.mark.slow  # ~45 s: 2 × 5-fold cross-validation
def test_mcat_learns_planted_signal_and_not_shuffled_survival(strong_cohort):
    _, cohort, bags = strong_cohort
    model_cfg, train_cfg = OmegaConf.create(SMALL_MODEL), OmegaConf.create(FAST_TRAIN)
    folds_metrics, oof = cross_validate(cohort, bags, None, "mcat", model_cfg, train_cfg, seed=0)
    # per-fold Harrell C in the table is scikit-survival's on that fold's out-of-fold risks
    for fold, rows in oof.groupby("fold"):
        assert folds_metrics.loc[fold, "harrell_c"] == pytest.approx(_pooled_c(rows))
    assert _pooled_c(oof) > 0.65, folds_metrics

    rng = np.random.default_rng(0)
    order = rng.permutation(len(cohort))
    shuffled = type(cohort)(
        **{**cohort.__dict__, "survival_months": cohort.survival_months[order], "censored": cohort.censored[order]}
    )
    _, oof_null = cross_validate(shuffled, bags, None, "mcat", model_cfg, train_cfg, seed=0)
    assert abs(_pooled_c(oof_null) - 0.5) < 0.12
    assert _pooled_c(oof) - _pooled_c(oof_null) > 0.1


def test_run_survival_writes_tables_and_kaplan_meier(tmp_path, capsys):
    cfg = apply_schema(
        SurvivalConfig,
        {
            "out_dir": str(tmp_path / "run"),
            "progress": False,
            "modes": ["genomic", "past_multi"],
            "cohort": {"synthetic": True, "n_patients": 40, "embedding_dim": 8, "cell_dim": 4},
            "model": SMALL_MODEL,
            "train": {**FAST_TRAIN, "epochs": 2},
            "ridge_cox": False,
        },
    )
    result = run_survival(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "fold_metrics.csv", "summary.csv", "metrics.json", "oof_risks.csv"):
        assert (out / name).is_file(), name
    with Image.open(result["kaplan_meier_png"]) as png:
        assert png.format == "PNG" and png.width > 100
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["mode"]) == {"genomic", "past_multi"} and len(summary) == 2
    oof = pd.read_csv(out / "oof_risks.csv")
    assert oof.groupby("mode")["case_id"].nunique().tolist() == [40, 40]  # every patient once per mode
    printed = capsys.readouterr().out
    assert "PAST-multi" in printed and "Harrell C" in printed and "Uno C" in printed
    assert 0.0 <= result["logrank_p"]["PAST-multi"] <= 1.0


def test_paired_gains_compare_the_same_folds_by_hand():
    from finetune.survival import paired_gains

    c = {
        ("E", "pathology"): [0.60, 0.70, 0.65],
        ("-", "genomic"): [0.55, 0.58, 0.70],
        ("E", "mcat"): [0.66, 0.69, 0.72],
        ("E", "past_multi"): [0.70, 0.71, 0.71],
    }
    folds = pd.DataFrame(
        [
            {"encoder": e, "mode": m, "fold": f, "harrell_c": v}
            for (e, m), values in c.items()
            for f, v in enumerate(values)
        ]
    )
    gains = paired_gains(folds).set_index("comparison")
    expected = {
        "MCAT − pathology only": ("mcat", "E", "pathology", "E"),
        "MCAT − genomic only": ("mcat", "E", "genomic", "-"),
        "PAST-multi − MCAT": ("past_multi", "E", "mcat", "E"),
    }
    assert set(gains.index) == set(expected)
    for name, (better, e1, base, e2) in expected.items():
        diff = np.array(c[(e1, better)]) - np.array(c[(e2, base)])
        assert gains.loc[name, "mean_gain"] == pytest.approx(diff.mean())
        assert gains.loc[name, "sd_gain"] == pytest.approx(diff.std(ddof=1))
        assert gains.loc[name, "folds_won"] == int((diff > 0).sum())
    assert (gains["encoder"] == "E").all() and (gains["folds"] == 3).all()


# ---------------------------------------------------------------------------------------------
# One cohort for every encoder; reference rows and controls


def test_tiles_and_their_planted_states_by_hand():
    tiles = pd.DataFrame({"tile_x0_px": [0, 100], "tile_y0_px": [0, 0], "tile_size_px": [100, 100]})
    cells = np.array([[10, 10], [50, 99], [150, 20], [250, 20]])  # two in tile 0, one in tile 1, one outside
    np.testing.assert_array_equal(cells_in_tiles(tiles, cells), [0, 0, 1, -1])
    states = tile_states(tiles, cells, np.array(["immune", "fibroblast", "immune", "immune"]), ["immune"])
    np.testing.assert_allclose(states, [0.5, 1.0])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    rng = np.random.default_rng(0)
    state = rng.uniform(0, 1, 200)  # 200 tiles
    reads_tissue = np.column_stack([state + rng.normal(0, 0.05, 200), rng.normal(0, 1, (200, 7))])
    blind = rng.normal(0, 1, (200, 8))  # an encoder that sees nothing of the state
    made = make_shared_cohort(
        tmp_path_factory.mktemp("shared") / "cohort",
        {"reads": reads_tissue, "blind": blind},
        state,
        tile_sites=np.arange(200) % 5,
        n_patients=150,
        seed=1,
        image_effect=1.5,
        genomic_effect=0.0,
        cell_effect=0.0,
        tilt=2.0,
    )
    cohort = read_clinical(made["clinical_csv"], read_signatures(made["signatures_csv"]))
    return made, cohort, {"reads": reads_tissue, "blind": blind}


def test_shared_cohort_gives_every_encoder_the_same_tiles_and_plants_risk_in_the_tissue(shared):
    made, cohort, tables = shared
    truth = json.loads((made["out_dir"] / "ground_truth.json").read_text())
    for case in cohort.case_ids[:5]:
        drawn = truth["patients"][case]["tiles"]
        for name, table in tables.items():
            bag = load_embedding_file(made["embeddings_dirs"][name] / f"{case}-S0.npz")
            np.testing.assert_allclose(bag, table[drawn], rtol=1e-6)
    z = np.array([truth["patients"][c]["z_image"] for c in cohort.case_ids])
    assert np.corrcoef(z, made["bag_state"])[0, 1] > 0.8  # the bag's composition follows the latent


def test_ridge_cox_and_the_controls_separate_a_tissue_reader_from_a_blind_encoder(shared):
    made, cohort, tables = shared
    sites = pd.read_csv(made["clinical_csv"]).set_index("case_id").loc[cohort.case_ids, "site"].to_numpy()
    folds = patient_folds(cohort.case_ids, cohort.events, 5, 0, groups=sites)
    for _, test in folds:  # each test fold is whole sites: tissue no training patient drew from
        assert not set(sites[test]) & set(np.delete(sites, test))
    runs = {"oracle": made["bag_state"][:, None]}
    for name in tables:
        runs[name] = mean_bags(load_bags(cohort, made["embeddings_dirs"][name]))
    pooled = {}
    for name, features in runs.items():
        fold_metrics, oof = ridge_cox_cv(features, cohort, folds)
        assert len(fold_metrics) == 5 and oof["case_id"].nunique() == len(cohort)
        pooled[name] = c_index_replicates(oof, cohort.case_ids, 300, 0)
    assert pooled["oracle"][0] > 0.65 and pooled["reads"][0] > 0.6
    assert gate(pooled["oracle"], pooled["blind"]).passes  # the harness tells truth from blindness
    assert not gate(pooled["blind"], pooled["blind"]).passes  # and finds nothing in a blind run
    versus = difference(pooled["reads"][0] - pooled["blind"][0], pooled["reads"][1], pooled["blind"][1])
    assert versus.excludes_zero and versus.estimate > 0
    # Control that must fail: without sites, folds share tiles and a blind encoder learns which tiles
    # mean risk, scoring far above chance.
    mixed = patient_folds(cohort.case_ids, cohort.events, 5, 0)
    _, oof = ridge_cox_cv(runs["blind"], cohort, mixed)
    assert c_index_replicates(oof, cohort.case_ids, 10, 0)[0] > pooled["blind"][0] + 0.1
