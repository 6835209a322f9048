"""mIF evaluation controls: Cell AUC (MIPHEI's), nuclear dilation, prevalence-proportional flips, the oracle /
shuffled / random controls, colour augmentation and checkpoint selection on validation Cell AUC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from finetune.mif.controls import compare_runs, mean_cell_auc, oracle_scores, shuffled_rows
from finetune.mif.data import jitter_he
from finetune.mif.evaluate import cell_classifier_metrics, cell_regions, nucleus_means, roc_auc
from finetune.mif.train import checkpoint_steps, train_model
from finetune.synthetic.mif import flip_rates, write_synthetic_mif
from finetune.synthetic.stain_tiles import procedural_cell_tiles

torch.set_num_threads(1)


def test_cell_auc_is_sklearns_roc_auc_of_the_per_nucleus_means():
    """An independent check: the headline Cell AUC = sklearn's roc_auc_score on the mean predicted intensity
    per nucleus (not on the classifier's probabilities), ties included."""
    rng = np.random.default_rng(0)
    nuclei = np.zeros((60, 60), np.int32)
    for k in range(1, 37):
        r, c = divmod(k - 1, 6)
        nuclei[10 * r + 2 : 10 * r + 7, 10 * c + 2 : 10 * c + 7] = k
    labels_of = (rng.random(37) < 0.3).astype(float)  # index = nucleus label
    offset = rng.normal(0, 0.5, (2, 37))  # per-nucleus variation, so the means overlap between classes
    image = rng.random((2, 60, 60)) + offset[:, nuclei] + np.array([0.6, 3.0])[:, None, None] * labels_of[nuclei]
    image[0][nuclei == 5] = image[0][nuclei == 6].mean()  # a tie between two nuclei
    ids, means = nucleus_means(image, nuclei)
    y = labels_of[ids]
    two = np.stack([y, y], axis=1)
    table, _ = cell_classifier_metrics(means, two, means, two, ["weak", "strong"])
    expected = roc_auc_score(y, means[:, 0])
    assert table.loc[0, "cell_auc"] == pytest.approx(expected, abs=1e-12)
    assert 0.6 < expected < 0.97  # neither trivial nor perfect, so a wrong formula would show
    # the classifier (fed both markers) scores differently: its AUC is kept apart, under its own name
    assert table.loc[0, "auc_classifier"] > expected + 0.02
    # The rank AUC used in the bootstrap agrees with sklearn on resamples with repeated rows and on ties.
    rows = rng.integers(0, len(y), 3 * len(y))
    assert roc_auc(means[rows, 0], y[rows]) == pytest.approx(roc_auc_score(y[rows], means[rows, 0]), abs=1e-12)
    resampled = np.mean([roc_auc_score(y[rows], means[rows, m]) for m in range(2)])
    assert mean_cell_auc(means, two, rows) == pytest.approx(resampled, abs=1e-12)  # the bootstrap's weighted form
    binary = (means[:, 0] > np.median(means[:, 0])).astype(float)
    assert roc_auc(binary, y) == pytest.approx(roc_auc_score(y, binary), abs=1e-12)
    assert np.isnan(roc_auc(means[:, 0], np.zeros(len(y))))


def test_dilation_grows_each_nucleus_by_the_expected_px_and_never_into_a_neighbour():
    nuclei = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[0:40, 0:60]
    nuclei[(yy - 20) ** 2 + (xx - 15) ** 2 <= 16] = 1  # disc of radius 4 px
    nuclei[(yy - 20) ** 2 + (xx - 29) ** 2 <= 9] = 2  # radius 3 px, 7 px centre to edge gap of 7 - 3 - 4 = 3 px
    for d in (1.0, 2.0, 4.0):
        grown = cell_regions(nuclei, d)
        distance = ndi.distance_transform_edt(nuclei == 0)
        assert set(np.unique(grown)) == {0, 1, 2}
        # every pixel within d px of a nucleus (and only those) belongs to a cell
        np.testing.assert_array_equal(grown > 0, distance <= d)
        # an isolated side grows by d: the cell's extent left of nucleus 1 moves from x = 11 to 11 - d
        assert np.flatnonzero(grown[20] == 1).min() == 11 - int(d)
        # the two cells never overlap or swap: each pixel goes to its nearest nucleus
        assert (grown[nuclei > 0] == nuclei[nuclei > 0]).all()
    assert (cell_regions(nuclei, 0) == nuclei).all()
    # 2 µm at 0.5 µm/px = 4 px: a ring marker 1-4 px outside the nucleus is seen only with the dilation.
    ring = (ndi.distance_transform_edt(nuclei == 0) > 0) & (ndi.distance_transform_edt(nuclei == 0) <= 4)
    image = ring.astype(float)[None]
    _, inside = nucleus_means(image, nuclei)
    _, dilated = nucleus_means(image, nuclei, dilate_px=2.0 / 0.5)
    assert np.allclose(inside, 0) and (dilated > 0.3).all()


def test_flips_follow_prevalence_and_leave_the_ceiling_near_one(tmp_path):
    types = np.array(["immune"] * 50 + ["fibroblast"] * 450 + ["keratinocyte_basal"] * 500)
    rates = flip_rates(types, 0.05)
    off, on, prevalence = rates["CD45"]
    assert prevalence == pytest.approx(0.05) and off == 0.05
    assert on * (1 - prevalence) == pytest.approx(off * prevalence)  # as many cells gain the marker as lose it
    assert rates["CD31"] == (0.05, 0.0, 0.0)  # no endothelial cells: nothing to flip on
    # On painted tiles the realised positives keep the prevalence, and the planted type ranks them with an
    # AUC near 1 − flip_rate, where a flat 5 % of all cells would cap a 5 % marker near 0.74.
    tiles = procedural_cell_tiles(40, tile_px=48, seed=3, nuclei_per_tile=8)
    truth = write_synthetic_mif(tmp_path / "set", tiles, seed=0, flip_rate=0.1)
    kinds = np.concatenate([t.cell_types for t in tiles])
    positive = np.concatenate([truth["tiles"][t.name]["positive"]["CD45"] for t in tiles]).astype(float)
    planted = (kinds == "immune").astype(float)
    assert abs(positive.mean() - planted.mean()) < 0.04
    assert roc_auc(planted, positive) > 0.85
    assert truth["um_per_px"] == pytest.approx(tiles[0].um_per_px)


def _cells(n_tiles=12, per_tile=60, seed=0):
    """Test cells with planted types, gated labels that follow them (with 5 % flips), and their tiles."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["immune", "fibroblast", "keratinocyte_basal"], size=(n_tiles, per_tile), p=[0.2, 0.4, 0.4])
    truth = {
        "tiles": {f"t{i}": {"cell_types": kinds[i].tolist()} for i in range(n_tiles)},
        "expressed_by": {"CD45": ["immune"], "SMA": ["fibroblast"]},
    }
    cells = pd.DataFrame(
        {
            "tile": np.repeat([f"t{i}" for i in range(n_tiles)], per_tile),
            "label": np.tile(np.arange(1, per_tile + 1), n_tiles),
        }
    )
    oracle = oracle_scores(cells, truth, ["CD45", "SMA"])
    labels = np.abs(oracle - (rng.random(oracle.shape) < 0.05))
    return cells, truth, oracle, labels, rng


def test_oracle_beats_random_encoders_and_the_shuffled_oracle_does_not():
    cells, truth, oracle, labels, rng = _cells()
    assert oracle[:, 0].sum() == (np.concatenate([v["cell_types"] for v in truth["tiles"].values()]) == "immune").sum()
    scores = {
        "PAST encoder": labels + rng.normal(0, 0.6, labels.shape),  # informative
        "random 1": labels + rng.normal(0, 2.5, labels.shape),  # weakly informative
        "random 2": labels + rng.normal(0, 2.5, labels.shape),
        "oracle": oracle,
        "shuffled": shuffled_rows(oracle, seed=0),
    }
    out = compare_runs(
        scores,
        labels,
        cells["tile"].to_numpy(),
        "PAST encoder",
        ["random 1", "random 2"],
        oracle="oracle",
        shuffled="shuffled",
        n_boot=400,
    )
    assert out["gate"]["passes"]
    assert out["runs"]["oracle"]["mean_cell_auc"] > 0.9
    assert out["runs"]["oracle"]["ci_low"] > out["random"]["mean"]
    shuffled = out["gate"]["shuffled_vs_random"]
    assert not (shuffled["ci_low"] > 0)  # the shuffled oracle does not beat random
    assert abs(out["runs"]["shuffled"]["mean_cell_auc"] - 0.5) < 0.08
    assert out["verdict"].startswith("PAST encoder (mean Cell AUC) beats 2 random encoders")
    assert out["versus_random"]["ci_low"] > 0
    assert mean_cell_auc(scores["oracle"], labels) == pytest.approx(out["runs"]["oracle"]["mean_cell_auc"])


def test_the_gate_withholds_the_comparison_when_labels_do_not_follow_the_truth():
    cells, truth, oracle, labels, rng = _cells(seed=1)
    unrelated = shuffled_rows(labels, seed=5)  # gated labels that ignore the planted types: nothing to find
    scores = {
        "PAST encoder": unrelated + rng.normal(0, 0.6, labels.shape),
        "random 1": rng.random(labels.shape),
        "oracle": oracle,
        "shuffled": shuffled_rows(oracle, seed=0),
    }
    out = compare_runs(
        scores,
        unrelated,
        cells["tile"].to_numpy(),
        "PAST encoder",
        ["random 1"],
        oracle="oracle",
        shuffled="shuffled",
        n_boot=300,
    )
    assert not out["gate"]["passes"]
    assert out["verdict"] is None and "withheld" in out["text"]
    # An encoder no better than the random ones: "no detectable gain", not a win.
    same = {"PAST encoder": scores["random 1"] + 1e-9 * rng.random(labels.shape), "random 1": scores["random 1"]}
    out = compare_runs(same, labels, cells["tile"].to_numpy(), "PAST encoder", ["random 1"], n_boot=300)
    assert "no detectable gain" in out["verdict"]


def test_colour_jitter_changes_the_he_only_and_is_the_identity_at_zero():
    rng = np.random.default_rng(0)
    he = torch.from_numpy(rng.integers(0, 256, (24, 24, 3)).astype(np.uint8))
    assert torch.equal(jitter_he(he, 1e-12, 0.0), he)
    torch.manual_seed(0)
    out = jitter_he(he, 0.05, 0.1)
    assert out.dtype == torch.uint8 and out.shape == he.shape
    assert 0.5 < (out.int() - he.int()).abs().float().mean() < 30


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.conv(x)


class _Identity:
    def preprocess(self, he):
        return he.permute(0, 3, 1, 2).float() / 255.0


def test_training_keeps_the_checkpoint_with_the_best_validation_score():
    assert checkpoint_steps(10, 4) == [4, 8, 10] and checkpoint_steps(10, 0) == [10]
    data = [
        {"he": torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8), "target": torch.rand(1, 8, 8) - 0.5}
        for _ in range(4)
    ]
    model = _Tiny()
    planned = iter([0.6, 0.9, 0.7])  # the second checkpoint (step 8) is best
    seen = {}

    def validate(m):
        seen[len(seen)] = {k: v.clone() for k, v in m.state_dict().items()}
        return next(planned)

    cfg = {
        "steps": 12,
        "batch_size": 2,
        "lr": 0.05,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "num_workers": 0,
        "log_every": 100,
    }
    history, selection = train_model(
        model, _Identity(), data, [1.0], cfg, torch.device("cpu"), progress=False, validate=validate, val_every=4
    )
    assert selection.step == 8 and selection.score == 0.9 and selection.scores == {4: 0.6, 8: 0.9, 12: 0.7}
    assert len(history) == 12 and history["step"].tolist() == list(range(1, 13))
    assert history["val_cell_auc"].notna().sum() == 3
    assert not torch.equal(seen[1]["conv.weight"], seen[2]["conv.weight"])  # training went on after step 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k]), k  # ... and the state of step 8 was restored
    # the learning-rate schedule runs across the segments as one (MIPHEI: constant to half, then decay to 0)
    assert history["lr"].iloc[5] == pytest.approx(0.05) and history["lr"].iloc[-1] < 0.01
