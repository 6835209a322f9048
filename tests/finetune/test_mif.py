"""mIF head data, preprocessing, cell-level evaluation and the end-to-end run, on tiny synthetic tiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from common.errors import InputError
from finetune.augment import random_dihedral
from finetune.metrics import psnr, ssim
from finetune.mif.data import TILE_AXES, MIFPreprocessor, fit_preprocessor, read_mif, read_orion_layout
from finetune.mif.evaluate import cell_classifier_metrics, gmm_gate, nucleus_means, pixel_metrics
from finetune.synthetic.mif import write_synthetic_mif
from finetune.synthetic.stain_tiles import procedural_cell_tiles

torch.set_num_threads(1)


def _write_layout(
    root: Path,
    stacks: dict[str, np.ndarray],
    nuclei: dict[str, np.ndarray],
    channels: list[tuple[str, str]],
    splits: dict[str, str] | None = None,
) -> Path:
    """A hand-made ORION-like folder: he/*.png, mif/*.tif (C, H, W), nuclei/*.tif, markers.csv, splits.csv."""
    for sub in ("he", "mif", "nuclei"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, stack in stacks.items():
        h, w = stack.shape[-2:]
        Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(root / "he" / f"{name}.png")
        tifffile.imwrite(root / "mif" / f"{name}.tif", stack, photometric="minisblack")
        tifffile.imwrite(root / "nuclei" / f"{name}.tif", nuclei[name].astype(np.int32))
    with open(root / "markers.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["channel", "marker", "role"])
        for i, (name, role) in enumerate(channels):
            writer.writerow([i, name, role])
    if splits:
        with open(root / "splits.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["tile", "split"])
            writer.writerows(splits.items())
    return root


def _random_layout(root: Path, n_tiles: int = 4, size: int = 16, seed: int = 0) -> tuple[Path, dict]:
    rng = np.random.default_rng(seed)
    stacks, nuclei = {}, {}
    for i in range(n_tiles):
        af = rng.uniform(100, 600, (size, size))
        m1 = rng.uniform(0, 900, (size, size)) + 0.5 * af
        m2 = rng.exponential(300, (size, size)) + 0.2 * af
        stacks[f"t{i}"] = np.stack([m1, m2, af]).astype(np.uint16)
        labels = np.zeros((size, size), np.int32)
        labels[2:6, 2:6], labels[9:14, 8:12] = 1, 2
        nuclei[f"t{i}"] = labels
    splits = {"t0": "train", "t1": "train", "t2": "val", "t3": "test"}
    _write_layout(root, stacks, nuclei, [("M1", "marker"), ("M2", "marker"), ("AF", "autofluorescence")], splits)
    return root, stacks


def test_preprocess_equals_hand_computation_and_round_trips(tmp_path):
    root, stacks = _random_layout(tmp_path / "set")
    layout = read_orion_layout(root)
    lambdas, biases, q = {"M1": 0.5, "M2": 0.25}, {"M1": -150.0, "M2": -40.0}, 90.0
    pre = fit_preprocessor(
        layout, layout.split("train"), lambdas=lambdas, biases=biases, percentile=q, fit_pixels_per_tile=10_000
    )
    for m, name in enumerate(["M1", "M2"]):
        # Independent computation: AF subtraction, foreground percentile over both training tiles, log, scale.
        cleaned = [
            np.maximum(stacks[t][m].astype(np.float64) - lambdas[name] * stacks[t][2] + biases[name], 0)
            for t in ("t0", "t1")
        ]
        pooled = np.concatenate([c.ravel() for c in cleaned])
        p = np.percentile(pooled[pooled > 0], q)
        assert pre.max_values[m] == pytest.approx(p, rel=1e-5)
        expected = 1.8 * np.clip(np.log1p(cleaned[0] / p), 0, 1) - 0.9
        assert np.allclose(pre.transform(stacks["t0"])[m], expected, atol=1e-5)
    bright = stacks["t3"].copy()
    bright[:2, 0, 0] = 60000  # far above (e - 1)·p: saturates
    y = pre.transform(bright)
    assert y.min() >= -0.9 - 1e-6 and y.max() <= 0.9 + 1e-6
    assert np.allclose(y[:, 0, 0], 0.9) and np.isclose(y.min(), -0.9)  # bright pixels saturate, background floors
    pre.save(tmp_path / "preprocess.json")
    again = MIFPreprocessor.load(tmp_path / "preprocess.json")
    assert np.array_equal(again.transform(stacks["t2"]), pre.transform(stacks["t2"]))
    assert again.inverse(pre.transform(stacks["t2"]))[0] == pytest.approx(
        np.minimum(pre.clean(stacks["t2"])[0], (np.e - 1) * pre.max_values[0]), rel=1e-4, abs=1e-2
    )


def test_prenormalised_tiles_map_linearly(tmp_path):
    root, stacks = _random_layout(tmp_path / "set")
    layout = read_orion_layout(root)
    pre = fit_preprocessor(layout, layout.split("train"), markers=["M2", "M1"], prenormalised_scale=1000.0)
    expected = 1.8 * np.clip(stacks["t2"][[1, 0]] / 1000.0, 0, 1) - 0.9
    assert np.allclose(pre.transform(stacks["t2"]), expected, atol=1e-6)
    with pytest.raises(InputError):
        fit_preprocessor(layout, layout.split("train"), lambdas={"M1": 0.5}, prenormalised_scale=255)


def test_reader_errors_name_file_and_field(tmp_path):
    root, _ = _random_layout(tmp_path / "a")
    (root / "mif" / "t1.tif").unlink()
    with pytest.raises(InputError) as err:
        read_orion_layout(root)
    assert "t1.tif" in str(err.value) and "[tile]" in str(err.value)

    root, stacks = _random_layout(tmp_path / "b")
    tifffile.imwrite(root / "nuclei" / "t2.tif", np.zeros((8, 8), np.int32))
    with pytest.raises(InputError) as err:
        read_orion_layout(root)
    assert "t2.tif" in str(err.value) and "[shape]" in str(err.value)

    root, _ = _random_layout(tmp_path / "c")
    layout = read_orion_layout(root)
    with pytest.raises(InputError) as err:
        fit_preprocessor(layout, layout.split("train"), markers=["M1", "CD99"])
    assert "markers.csv" in str(err.value) and "CD99" in str(err.value)
    with pytest.raises(InputError) as err:
        fit_preprocessor(layout, layout.split("train"), lambdas={"CD99": 1.0})
    assert "preprocess.lambdas" in str(err.value)

    with open(root / "markers.csv", "a") as handle:
        handle.write("3,X,membrane\n")
    with pytest.raises(InputError) as err:
        read_orion_layout(root)
    assert "markers.csv" in str(err.value) and "role" in str(err.value)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mif") / "set"
    tiles = procedural_cell_tiles(12, tile_px=32, seed=1, nuclei_per_tile=6)
    truth = write_synthetic_mif(root, tiles, seed=0, flip_rate=0.0)
    return root, tiles, truth


def test_synthetic_markers_follow_types_and_lambda_is_recovered(synthetic_set):
    from skimage.segmentation import expand_labels

    root, tiles, truth = synthetic_set
    layout = read_orion_layout(root)
    assert [c.name for c in layout.channels] == truth["channels"]
    ring_means = {"Pan-CK": {True: [], False: []}, "CD45": {True: [], False: []}}
    for tile in tiles:
        stack = read_mif(root / "mif" / f"{tile.name}.tif")
        cells = expand_labels(tile.nuclei, distance=3)
        ring = np.where(tile.nuclei > 0, 0, cells)  # cytoplasm/membrane ring around each nucleus
        for k, kind in enumerate(tile.cell_types, start=1):
            for marker, types in (("Pan-CK", ("keratinocyte_basal", "keratinocyte_suprabasal")), ("CD45", ("immune",))):
                c = truth["channels"].index(marker)
                ring_means[marker][kind in types].append(stack[c][ring == k].mean())
    for groups in ring_means.values():
        assert groups[True] and groups[False]
        assert np.mean(groups[True]) > np.mean(groups[False]) + 500  # counts; the planted signal is ~2000
        assert min(groups[True]) > np.median(groups[False])
    pre = fit_preprocessor(layout, layout.split("train") + layout.split("val"))
    for name, lam in zip(pre.markers, pre.lambdas):
        assert lam == pytest.approx(truth["lambda"][name], abs=0.06), name


def test_gmm_gate_recovers_planted_positives():
    rng = np.random.default_rng(0)
    truth = np.r_[np.zeros(400, bool), np.ones(120, bool)]
    values = np.where(truth, rng.normal(0.55, 0.08, truth.size), rng.normal(0.12, 0.04, truth.size))
    values[:50] = 0.0  # cells without any signal are negatives without entering the mixture
    gate = gmm_gate(values, seed=0)
    assert gate.positive is not None and (gate.positive == truth).mean() > 0.98
    assert gate.means[0] < gate.threshold < gate.means[1]
    assert gmm_gate(np.full(200, 0.3) + rng.normal(0, 1e-12, 200)).positive is None  # nothing to split
    assert gmm_gate(np.r_[np.zeros(100), [0.2, 0.4]]).positive is None  # too few cells with signal


def test_cell_metrics_perfect_and_random_predictors():
    rng = np.random.default_rng(0)
    n = 1500
    labels = (rng.random((2 * n, 2)) < [0.3, 0.5]).astype(float)
    perfect = labels + rng.normal(0, 0.05, labels.shape)
    table, probs = cell_classifier_metrics(perfect[:n], labels[:n], perfect[n:], labels[n:], ["A", "B"])
    assert np.allclose(table["cell_auc"], 1.0) and np.allclose(table["f1"], 1.0)
    assert np.allclose(table["balanced_accuracy"], 1.0)
    noise = rng.random(labels.shape)
    table, _ = cell_classifier_metrics(noise[:n], labels[:n], noise[n:], labels[n:], ["A", "B"])
    assert np.all(np.abs(table["cell_auc"] - 0.5) < 0.06)
    assert np.all(np.abs(table["balanced_accuracy"] - 0.5) < 0.06)
    one_class = labels.copy()
    one_class[:n, 1] = 0
    table, _ = cell_classifier_metrics(perfect[:n], one_class[:n], perfect[n:], one_class[n:], ["A", "B"])
    # the classifier needs both classes among validation cells; the Cell AUC of the intensities does not
    assert np.isfinite(table.loc[0, "auc_classifier"]) and np.isnan(table.loc[1, "auc_classifier"])
    assert np.allclose(table["cell_auc"], 1.0)


def test_nucleus_means_match_a_loop():
    rng = np.random.default_rng(0)
    image = rng.random((3, 20, 24))
    nuclei = rng.integers(0, 7, (20, 24)).astype(np.int32)
    nuclei[nuclei == 4] = 0  # a missing label
    nuclei[0, 0] = 9  # a one-pixel nucleus, dropped by min_area_px
    labels, means = nucleus_means(image, nuclei, min_area_px=2)
    expected_labels = [k for k in range(1, 10) if (nuclei == k).sum() >= 2]
    assert labels.tolist() == expected_labels
    for row, k in enumerate(expected_labels):
        for c in range(3):
            assert means[row, c] == pytest.approx(image[c][nuclei == k].mean())


def test_pixel_metrics_pool_psnr_and_average_ssim():
    rng = np.random.default_rng(1)
    targets = [rng.uniform(-0.9, 0.9, (2, 16, 16)) for _ in range(3)]
    preds = [t + rng.normal(0, 0.1 * (k + 1), t.shape) for k, t in enumerate(targets)]
    table = pixel_metrics(preds, targets, ["A", "B"])
    for m in range(2):
        clipped = [np.clip(p[m], -0.9, 0.9) for p in preds]
        mosaic_pred, mosaic_true = np.hstack(clipped), np.hstack([t[m] for t in targets])
        assert table.loc[m, "psnr"] == pytest.approx(psnr(mosaic_pred, mosaic_true, 1.8), rel=1e-9)
        assert table.loc[m, "ssim"] == pytest.approx(np.mean([ssim(p, t[m], 1.8) for p, t in zip(clipped, targets)]))


def test_augmentation_moves_he_target_and_nuclei_together():
    torch.manual_seed(0)
    he = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8)
    target = he.permute(2, 0, 1).float()  # (3, H, W): a copy of the H&E as targets
    nuclei = torch.arange(144, dtype=torch.int32).reshape(12, 12)
    seen = set()
    for _ in range(40):
        h, t, n = random_dihedral(he, target, nuclei, axes=TILE_AXES)
        assert torch.equal(h.permute(2, 0, 1).float(), t)
        seen.add(tuple(n.flatten()[:3].tolist()))
        assert sorted(n.flatten().tolist()) == list(range(144))
    assert len(seen) == 8  # every flip/rotation occurs


def test_run_mif_end_to_end(tmp_path, synthetic_set):
    from finetune.mif import load_mif_checkpoint, run_mif
    from finetune.synthetic import write_tiny_export

    root, _, _ = synthetic_set
    export = write_tiny_export(tmp_path / "export")
    out = tmp_path / "out"
    result = run_mif(
        {
            "out_dir": str(out),
            "progress": False,
            "data": {"root": str(root)},
            "encoder": {"source": "export", "path": str(export)},
            "model": {"detail_channels": [4, 8, 8], "decoder_channels": [8, 8, 8, 8]},
            "train": {
                "steps": 40,
                "batch_size": 4,
                "lr": 3e-3,
                "warmup_steps": 4,
                "num_workers": 0,
                "cache_tiles": True,
                "device": "cpu",
                "log_every": 20,
                "val_every": 20,
            },
            "eval": {"min_nucleus_area_px": 5, "n_figure_tiles": 2, "dilate_um": 1.8},
            "baseline": "random",
            "controls": {"random_seeds": 1, "n_boot": 100},
        }
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["marker"] for r in metrics["per_marker"]["model"]] == ["DAPI", "Pan-CK", "CD45", "CD31", "SMA"]
    assert metrics["train"]["steps"] == 40
    # 1.8 µm at the procedural tiles' 0.9 µm/px (truth.json) = 2 px
    assert metrics["cell_region"]["dilate_px"] == pytest.approx(2.0)
    # the kept checkpoint is the best of those scored on validation cells
    for run in ("model", "random encoder"):
        chosen = metrics["checkpoint"][run]
        assert set(chosen["checkpoints"]) == {"20", "40"}
        assert chosen["val_cell_auc"] == max(chosen["checkpoints"].values())
    # the controls: oracle (planted types) with its per-marker ceiling, the shuffled oracle, the random encoder
    controls = metrics["controls"]
    assert set(controls["runs"]) == {"PAST encoder", "random encoder", "oracle (planted type)", "oracle shuffled"}
    oracle = controls["runs"]["oracle (planted type)"]["mean_cell_auc"]
    assert oracle > controls["runs"]["oracle shuffled"]["mean_cell_auc"] and oracle > 0.7
    assert "passes" in controls["gate"] and controls["n_blocks"] == metrics["tiles"]["test"]
    assert controls["versus_random"]["shown"] == controls["gate"]["passes"]
    ceiling = {r["marker"]: r["cell_auc"] for r in metrics["per_marker"]["oracle (planted type)"]}
    assert set(ceiling) == {"Pan-CK", "CD45", "CD31", "SMA"}
    cells = pd.read_csv(out / "cells.csv")
    for column in ("tile", "label", "CD45_pred", "CD45_measured", "CD45_pos", "CD45_prob"):
        assert column in cells.columns, column
    # the headline Cell AUC is the AUC of the predicted means written to cells.csv
    from sklearn.metrics import roc_auc_score

    known = cells["SMA_pos"].notna()
    row = next(r for r in metrics["per_marker"]["model"] if r["marker"] == "SMA")
    assert row["cell_auc"] == pytest.approx(roc_auc_score(cells["SMA_pos"][known], cells["SMA_pred"][known]), abs=1e-4)
    assert result["loss_last"] < 0.7 * result["loss_first"]
    for name in (
        "examples.png",
        "training_curve.png",
        "per_marker.csv",
        "model/model.safetensors",
        "model/preprocess.json",
        "model/lora.safetensors",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    # The checkpoint (LoRA merged) reloads into a plain model that reproduces the saved test predictions.
    model, encoder, pre = load_mif_checkpoint(out / "model")
    tile = sorted((out / "predictions").glob("*.tif"))[0]
    he = np.array(Image.open(root / "he" / f"{tile.stem}.png"))[None]  # (1, H, W, 3) uint8
    with torch.no_grad():
        pred = model(encoder.preprocess(he))[0].numpy()
    saved = tifffile.imread(tile).astype(np.float32) / 255 * 1.8 - 0.9
    assert np.abs(np.clip(pred, -0.9, 0.9) - saved).max() <= 1.8 / 255 + 1e-4
    assert pre.markers == metrics["markers"]


def test_settings_are_checked_against_the_schema_before_anything_runs(tmp_path):
    """run_* checks what it is given like launch/finetune.py does (its subprocess test: test_launch_finetune.py)."""
    from common.config import apply_schema
    from finetune.mif import MIFConfig, run_mif

    with pytest.raises(InputError, match="did you mean `train.grad_clip`"):
        run_mif({"out_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path)}, "train": {"grad_clp": 1.0}})
    with pytest.raises(InputError, match="train.steps"):
        run_mif({"out_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path)}, "train": {"steps": "many"}})
    assert not (tmp_path / "out").exists()
    cfg = apply_schema(MIFConfig, {"data": {"synthetic": {"bundle": "b"}}})
    assert cfg.data.synthetic.n_tiles == 32 and cfg.train.warmup_steps == 400 and cfg.preprocess.lambdas == {}
