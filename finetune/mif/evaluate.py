"""Evaluation of predicted mIF: pixel metrics per marker and MIPHEI's cell-level classification.

Pixel level (:class:`PixelAccumulator`, :func:`pixel_metrics`): predictions clipped to [−0.9, 0.9] and compared
with the targets in that space, ``data_range = 1.8`` (MIPHEI: torchmetrics PSNR/SSIM with ``data_range=(-0.9,
0.9)``). PSNR per marker is computed from the MSE pooled over every test pixel (as torchmetrics accumulates it);
SSIM is the mean over test tiles of ``finetune.metrics.ssim``.

Cell level (MIPHEI ``src/metrics.py::CellMetrics`` and ``preprocessings/single_cell_analysis``):

1. each nucleus of the instance mask gets the mean predicted and the mean measured intensity of every
   marker, in the [0, 1] unit space (``(y + 0.9) / 1.8``), nuclei under ``min_area_px`` dropped; with
   ``dilate_px`` > 0 the mean is over the nucleus grown by that many px (skimage ``expand_labels``: it
   never grows into a neighbour), which takes in the membrane and cytoplasm of the cell;
2. labels: per marker, a 2-component Gaussian mixture (sklearn) on the measured means of the cells with
   signal (> 0); positive = above the point where the higher-mean component becomes the more probable one
   (the two Gaussians' crossing, as MIPHEI's gating notebook); cells without signal are negative. A gate
   that cannot be drawn (too few cells with signal, a single class) gives NaN metrics and a warning;
3. a logistic regression (standardised features, ``class_weight="balanced"``) per marker, with the predicted
   means of *all* cell markers as features, is fitted on validation cells and applied to test cells;
4. per marker: **Cell AUC** (``cell_auc``) = the ROC AUC of the marker's own mean predicted intensity per
   nucleus against the gated labels, as MIPHEI defines it (its plain "auc": no fitted step between the
   prediction and the score); ``auc_classifier`` = the ROC AUC of the classifier's probabilities; F1 and
   balanced accuracy of the classifier's 0.5 decisions.

:func:`roc_auc` is the rank (Mann-Whitney) form of the ROC AUC, ties counted half, cheap enough for the
bootstrap of :mod:`finetune.mif.controls`.

The nuclear stain (DAPI/Hoechst: every cell positive) is excluded from the cell level, as in MIPHEI.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common.atomic import atomic_path
from common.errors import InputError
from finetune.metrics import ssim
from finetune.report import Column, finite, save_figure
from finetune.report import format_table as format_text_table
from finetune.training import autocast

from .data import TARGET_HIGH, TARGET_LOW, TARGET_SPAN, MIFPreprocessor, MIFTileDataset, to_unit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pixel level


class PixelAccumulator:
    """Streaming per-marker PSNR / SSIM over test tiles, so a cohort's predictions never sit in memory together.

    PSNR pools the squared error of every pixel (the PSNR of all tiles side by side, as torchmetrics
    accumulates it); SSIM (``finetune.metrics.ssim``) is averaged over tiles.
    """

    def __init__(self, markers: Sequence[str]):
        self.markers = list(markers)
        self.sse = np.zeros(len(self.markers))
        self.n_pixels = 0
        self.ssim_sum = np.zeros(len(self.markers))
        self.n_tiles = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """One tile: prediction and target (M, H, W) in target space; predictions clipped to [−0.9, 0.9]."""
        pred = np.clip(np.asarray(pred, np.float64), TARGET_LOW, TARGET_HIGH)
        target = np.asarray(target, np.float64)
        if pred.shape != target.shape or pred.shape[0] != len(self.markers):
            raise InputError(None, "pred", f"(M={len(self.markers)}, H, W) like the target {target.shape}", pred.shape)
        self.sse += ((pred - target) ** 2).reshape(len(self.markers), -1).sum(axis=1)
        self.n_pixels += int(np.prod(pred.shape[1:]))
        self.ssim_sum += [ssim(p, t, TARGET_SPAN) for p, t in zip(pred, target)]
        self.n_tiles += 1

    def table(self) -> pd.DataFrame:
        if not self.n_tiles:
            raise InputError(None, "test tiles", "at least one tile to score", 0)
        mse = self.sse / self.n_pixels
        psnr_db = [math.inf if e == 0 else 10.0 * math.log10(TARGET_SPAN**2 / e) for e in mse]
        return pd.DataFrame({"marker": self.markers, "psnr": psnr_db, "ssim": self.ssim_sum / self.n_tiles})


def pixel_metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], markers: Sequence[str]) -> pd.DataFrame:
    """Per marker PSNR (pooled MSE) and SSIM (mean over tiles) of (M, H, W) predictions vs targets, range 1.8."""
    if len(preds) != len(targets) or not preds:
        raise InputError(None, "preds", f"one prediction per target tile ({len(targets)})", len(preds))
    acc = PixelAccumulator(markers)
    for pred, target in zip(preds, targets):
        acc.update(pred, target)
    return acc.table()


# ---------------------------------------------------------------------------------------------
# Cell level


def cell_regions(nuclei: np.ndarray, dilate_px: float = 0.0) -> np.ndarray:
    """The label image whose region k is scored for nucleus k: the nuclei themselves, or grown by ``dilate_px``
    (skimage ``expand_labels``: each background pixel within that distance joins its nearest nucleus)."""
    if dilate_px < 0:
        raise InputError(None, "eval.dilate_um", "a distance >= 0", dilate_px)
    if dilate_px == 0:
        return nuclei
    from skimage.segmentation import expand_labels

    return expand_labels(nuclei, distance=float(dilate_px))


def nucleus_means(
    image: np.ndarray, nuclei: np.ndarray, min_area_px: int = 0, dilate_px: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of every channel of ``image`` (C, H, W) inside each nucleus of ``nuclei`` (H, W), or inside the
    nucleus grown by ``dilate_px`` (:func:`cell_regions`).

    Returns (labels (n,), means (n, C)) for the labels whose *nucleus* has at least ``min_area_px`` pixels.
    """
    from scipy import ndimage as ndi

    image = np.asarray(image, np.float64)
    if image.ndim == 2:
        image = image[None]
    if image.shape[-2:] != nuclei.shape:
        raise InputError(None, "nuclei", f"a label image the size of the prediction {image.shape[-2:]}", nuclei.shape)
    area = np.bincount(nuclei.ravel())
    labels = np.flatnonzero(area >= max(int(min_area_px), 1))
    labels = labels[labels > 0]
    if labels.size == 0:
        return labels, np.zeros((0, image.shape[0]))
    regions = cell_regions(nuclei, dilate_px)
    means = np.stack([np.asarray(ndi.mean(channel, labels=regions, index=labels)) for channel in image], axis=1)
    return labels, means  # (n,), (n, C)


@dataclass
class Gate:
    """A marker's gate: positive ⇔ value > threshold; ``positive`` None when no gate could be drawn."""

    threshold: float
    positive: np.ndarray | None
    means: tuple[float, float]  # the two components' means (low, high)
    reason: str = ""


def gmm_gate(values: np.ndarray, seed: int = 0, min_cells: int = 10) -> Gate:
    """2-component Gaussian-mixture gating of per-cell intensities (see the module docstring)."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(values, np.float64).ravel()
    signal = values[values > 0]
    if signal.size < min_cells or np.ptp(signal) <= 1e-9:
        return Gate(math.nan, None, (math.nan, math.nan), f"{signal.size} cells with signal (need {min_cells})")
    gmm = GaussianMixture(n_components=2, random_state=seed).fit(signal[:, None])
    order = np.argsort(gmm.means_.ravel())
    low, high = (float(gmm.means_.ravel()[i]) for i in order)
    # Where the high component becomes the more probable one, searched between the two means: a
    # single threshold, so gating stays monotone in intensity even when the wider component's tails
    # win again far out.
    grid = np.linspace(low, high, 2049)
    posterior_high = gmm.predict_proba(grid[:, None])[:, order[1]]
    above = np.flatnonzero(posterior_high >= 0.5)
    threshold = float(grid[above[0]]) if above.size else high
    positive = values > threshold
    if positive.all() or not positive.any():
        return Gate(threshold, None, (low, high), "one class only")
    return Gate(threshold, positive, (low, high))


def gate_markers(
    measured: np.ndarray, markers: Sequence[str], seed: int = 0, min_cells: int = 10
) -> tuple[np.ndarray, dict[str, Gate]]:
    """Labels (n, M) float (1 positive, 0 negative, NaN when the marker could not be gated) and the gates."""
    labels = np.full(measured.shape, np.nan)
    gates = {}
    for m, name in enumerate(markers):
        gate = gmm_gate(measured[:, m], seed=seed, min_cells=min_cells)
        gates[name] = gate
        if gate.positive is None:
            log.warning("marker %s: no gate (%s); its cell metrics are NaN", name, gate.reason)
        else:
            labels[:, m] = gate.positive
    return labels, gates


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (1 positive, 0 negative; NaN labels dropped), from ranks
    (Mann-Whitney U / (n_pos·n_neg), ties counted half); NaN when one class is missing."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, np.float64).ravel()
    keep = np.isfinite(labels)
    scores, positive = scores[keep], labels[keep] > 0.5
    n_pos = int(positive.sum())
    n_neg = int(len(positive) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def cell_auc_table(scores: np.ndarray, labels: np.ndarray, markers: Sequence[str]) -> pd.DataFrame:
    """Per marker Cell AUC of per-cell scores (n, M) against gated labels (n, M): a row per marker."""
    return pd.DataFrame(
        {"marker": list(markers), "cell_auc": [roc_auc(scores[:, m], labels[:, m]) for m in range(len(markers))]}
    )


def cell_classifier_metrics(
    val_pred: np.ndarray,
    val_labels: np.ndarray,
    test_pred: np.ndarray,
    test_labels: np.ndarray,
    markers: Sequence[str],
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per marker Cell AUC of the predicted means, and a logistic regression on validation cells → its AUC,
    F1, balanced accuracy on test cells.

    ``*_pred``: predicted per-cell means (n, M), all used as the classifier's features; ``*_labels``: gated
    labels (n, M), NaN columns for ungated markers. Returns the table and the test probabilities (n_test, M).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows, probs = [], np.full(test_labels.shape, np.nan)
    for m, name in enumerate(markers):
        row = {
            "marker": name,
            "cell_auc": math.nan,
            "auc_classifier": math.nan,
            "f1": math.nan,
            "balanced_accuracy": math.nan,
            "n_test_cells": int(len(test_labels)),
            "n_test_positive": (math.nan if np.isnan(test_labels[:, m]).all() else int(np.nansum(test_labels[:, m])))
            if len(test_labels)
            else 0,
        }
        y_val, y_test = val_labels[:, m], test_labels[:, m]
        problem = None
        if np.isnan(y_val).any() or np.isnan(y_test).any():
            problem = "not gated"
        elif len(np.unique(y_val)) < 2:
            problem = "one class among validation cells"
        elif len(np.unique(y_test)) < 2:
            problem = "one class among test cells"
        if problem == "one class among validation cells":
            row["cell_auc"] = roc_auc(test_pred[:, m], y_test)
        if problem and problem != "not gated":  # an ungated marker was reported by gate_markers
            log.warning("marker %s: %s; classifier AUC / F1 / balanced accuracy are NaN", name, problem)
        if problem:
            rows.append(row)
            continue
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", random_state=seed, max_iter=1000)
        )
        clf.fit(val_pred, y_val.astype(int))
        p = clf.predict_proba(test_pred)[:, 1]
        decision = (p >= 0.5).astype(int)
        probs[:, m] = p
        row.update(
            cell_auc=roc_auc(test_pred[:, m], y_test),
            auc_classifier=float(roc_auc_score(y_test, p)),
            f1=float(f1_score(y_test, decision, zero_division=0)),
            balanced_accuracy=float(balanced_accuracy_score(y_test, decision)),
        )
        rows.append(row)
    return pd.DataFrame(rows), probs


def cell_level_evaluation(
    val_cells: Mapping[str, np.ndarray],
    test_cells: Mapping[str, np.ndarray],
    markers: Sequence[str],
    seed: int = 0,
    min_cells: int = 10,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Gate]]:
    """Gate measured intensities (validation and test cells pooled), train on validation, score test cells.

    ``*_cells``: {"pred": (n, M), "measured": (n, M)} per-nucleus means in [0, 1] for the cell markers.
    Returns (per-marker metrics, test-cell table with labels and probabilities, gates).
    """
    measured = np.concatenate([val_cells["measured"], test_cells["measured"]])
    labels, gates = gate_markers(measured, markers, seed=seed, min_cells=min_cells)
    n_val = len(val_cells["measured"])
    table, probs = cell_classifier_metrics(
        val_cells["pred"], labels[:n_val], test_cells["pred"], labels[n_val:], markers, seed=seed
    )
    table["gate_threshold"] = [gates[m].threshold for m in markers]
    cells = {}
    for m, name in enumerate(markers):
        cells[f"{name}_pred"] = test_cells["pred"][:, m]
        cells[f"{name}_measured"] = test_cells["measured"][:, m]
        cells[f"{name}_pos"] = labels[n_val:, m]
        cells[f"{name}_prob"] = probs[:, m]
    return table, pd.DataFrame(cells), gates


# ---------------------------------------------------------------------------------------------
# Reporting


def _positive_of_cells(row: Mapping[str, Any]) -> Any:
    value = row.get("n_test_positive")
    if "n_test_cells" not in row:
        return value
    return "n/a" if value is None or value != value else f"{int(value)}/{int(row['n_test_cells'])}"


TABLE_COLUMNS = {
    "marker": Column("marker", 10, "marker"),
    "psnr": Column("PSNR dB", 10, "psnr", ".2f"),
    "ssim": Column("SSIM", 10, "ssim", ".3f"),
    "cell_auc": Column("Cell AUC", 10, "cell_auc", ".3f"),
    "auc_classifier": Column("clf AUC", 10, "auc_classifier", ".3f"),
    "f1": Column("F1", 10, "f1", ".3f"),
    "balanced_accuracy": Column("bal.acc", 10, "balanced_accuracy", ".3f"),
    "n_test_positive": Column("pos/cells", 10, _positive_of_cells),
}


def format_table(table: pd.DataFrame, title: str = "") -> str:
    """The per-marker table as aligned text (NaN printed as 'n/a')."""
    columns = [column for key, column in TABLE_COLUMNS.items() if key in table.columns]
    return format_text_table(table.to_dict(orient="records"), columns, header=title or None, sep="  ", missing="n/a")


def plot_examples(
    he_tiles: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    markers: Sequence[str],
    path: str | Path,
    names: Sequence[str] | None = None,
    nuclei: Sequence[np.ndarray] | None = None,
    dpi: int = 110,
) -> Path:
    """For each tile two rows: the H&E, then predicted marker maps; the H&E with the nuclei outlined (the
    cells that are scored), then the measured maps. Maps in [0, 1] units, one colour scale for all."""
    import matplotlib
    from skimage.segmentation import mark_boundaries

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_tiles, n_markers = len(he_tiles), len(markers)
    fig, axes = plt.subplots(2 * n_tiles, n_markers + 1, figsize=(1.9 * (n_markers + 1), 3.8 * n_tiles), squeeze=False)
    for t in range(n_tiles):
        top, bottom = axes[2 * t], axes[2 * t + 1]
        top[0].imshow(he_tiles[t])
        top[0].set_title(f"H&E {names[t] if names else t}", fontsize=7)
        if nuclei is not None:
            bottom[0].imshow(mark_boundaries(he_tiles[t], nuclei[t], color=(0.1, 0.9, 0.2)))
            bottom[0].set_title("nuclei (scored cells)", fontsize=7)
        else:
            bottom[0].imshow(he_tiles[t])
            bottom[0].set_title("H&E", fontsize=7)
        pred_u, target_u = to_unit(preds[t]), to_unit(targets[t])
        for m, name in enumerate(markers):
            top[m + 1].imshow(pred_u[m], cmap="magma", vmin=0, vmax=1)
            top[m + 1].set_title(f"{name} predicted", fontsize=7)
            bottom[m + 1].imshow(target_u[m], cmap="magma", vmin=0, vmax=1)
            bottom[m + 1].set_title(f"{name} measured", fontsize=7)
        for ax in (*top, *bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, path, dpi=dpi)


def plot_training_curve(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float], path: str | Path) -> Path:
    """Training loss (log scale) and learning rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(steps, losses, color="tab:blue", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted MSE", color="tab:blue")
    twin = ax.twinx()
    twin.plot(steps, lrs, color="tab:orange", lw=1)
    twin.set_ylabel("learning rate", color="tab:orange")
    return save_figure(fig, path, dpi=110)


def write_prediction_tiff(path: str | Path, pred: np.ndarray, markers: Sequence[str]) -> Path:
    """A prediction (M, H, W) in [−0.9, 0.9] as an OME-TIFF uint8 stack (0..255 = [0, 1] units, MIPHEI's storage)."""
    import tifffile

    stack = np.round(to_unit(pred) * 255).astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tifffile warns about the temporary name's suffix
            tifffile.imwrite(
                tmp,
                stack,
                ome=True,
                photometric="minisblack",
                metadata={"axes": "CYX", "Channel": {"Name": list(markers)}},
            )
    return path


# ---------------------------------------------------------------------------------------------
# Prediction and a split's evaluation


Predictor = Callable[[torch.Tensor], np.ndarray]  # uint8 H&E (b, H, W, 3) → predictions (b, M, H, W) in (−1, 1)


def model_predictor(model: torch.nn.Module, encoder: Any, device: torch.device, precision: str = "fp32") -> Predictor:
    """Predictions at the tiles' own size: the encoder resizes to its input size, the output is resized back."""
    model.to(device).eval()

    @torch.no_grad()
    def predict(he: torch.Tensor) -> np.ndarray:
        images = encoder.preprocess(he).to(device)  # (b, 3, h, w)
        with autocast(device, precision):
            out = model(images).float()  # (b, M, h, w)
        if tuple(out.shape[-2:]) != tuple(he.shape[1:3]):
            out = F.interpolate(out, size=tuple(he.shape[1:3]), mode="bilinear", align_corners=False)
        return out.cpu().numpy()

    return predict


def mean_predictor(preprocessor: MIFPreprocessor) -> Predictor:
    """The mean baseline: every pixel of every marker at its training mean target."""
    mean = np.asarray(preprocessor.target_mean, np.float32)[None, :, None, None]

    def predict(he: torch.Tensor) -> np.ndarray:
        return np.broadcast_to(mean, (he.shape[0], mean.shape[1], he.shape[1], he.shape[2])).copy()

    return predict


def predict_tiles(predictor: Predictor, dataset: MIFTileDataset, batch_size: int) -> Any:
    """Yield (index, (he, target, nuclei), prediction (M, H, W)) over ``dataset``; each tile is read once and
    consecutive tiles of the same size are predicted together."""
    batch: list[tuple[int, tuple]] = []

    def flush(items):
        he = torch.stack([item[0] for _, item in items])  # (b, H, W, 3) uint8
        for (i, item), pred in zip(items, predictor(he)):
            yield i, item, pred

    for i in range(len(dataset)):
        item = dataset.load(i)
        if batch and (len(batch) == batch_size or item[0].shape != batch[0][1][0].shape):
            yield from flush(batch)
            batch = []
        batch.append((i, item))
    if batch:
        yield from flush(batch)


def score_split(
    predictor: Predictor,
    dataset: MIFTileDataset,
    markers: Sequence[str],
    cell_index: Sequence[int],
    min_area_px: int,
    batch_size: int,
    pixels: bool = True,
    keep: int = 0,
    write_dir: Path | None = None,
    dilate_px: float = 0.0,
) -> dict[str, Any]:
    """One pass over a split, tile by tile: pixel metrics, per-nucleus means in [0, 1] of the cell markers
    (predicted and measured; over the nucleus grown by ``dilate_px``), the first ``keep`` predictions
    (figures), prediction TIFFs into ``write_dir``."""
    acc = PixelAccumulator(markers) if pixels else None
    pred_rows, measured_rows, tiles, labels, kept = [], [], [], [], []
    for i, (_, target, nuclei), pred in predict_tiles(predictor, dataset, batch_size):
        target_np, nuclei_np = target.numpy(), nuclei.numpy()
        if acc is not None:
            acc.update(pred, target_np)
        if cell_index:
            both = to_unit(np.concatenate([pred[list(cell_index)], target_np[list(cell_index)]]))
            ids, means = nucleus_means(both, nuclei_np, min_area_px, dilate_px)
            p, t = means[:, : len(cell_index)], means[:, len(cell_index) :]
            pred_rows.append(p)
            measured_rows.append(t)
            tiles.extend([dataset.tiles[i].name] * len(ids))
            labels.extend(ids.tolist())
        if len(kept) < keep:
            kept.append(pred)
        if write_dir is not None:
            write_prediction_tiff(write_dir / f"{dataset.tiles[i].name}.tif", pred, markers)
    stack = lambda rows: np.concatenate(rows) if rows else np.zeros((0, len(cell_index)))  # noqa: E731
    return {
        "pixels": acc,
        "cells": {
            "pred": stack(pred_rows),
            "measured": stack(measured_rows),
            "tile": np.asarray(tiles),
            "label": np.asarray(labels, dtype=np.int64),
        },
        "kept": kept,
    }


def evaluate_run(
    predictor: Predictor,
    val_ds: MIFTileDataset,
    test_ds: MIFTileDataset,
    markers: Sequence[str],
    cell_markers: Sequence[str],
    eval_cfg: Mapping[str, Any],
    seed: int = 0,
    keep: int = 0,
    write_dir: Path | None = None,
    dilate_px: float = 0.0,
) -> tuple[pd.DataFrame, pd.DataFrame, list[np.ndarray]]:
    """Per-marker pixel and cell metrics on the test split (cell classifier fitted on the validation split),
    the test-cell table and the first ``keep`` test predictions. Cell metrics are NaN for the nuclear stain.
    Per-cell means over the nuclei grown by ``dilate_px`` (0: the nuclei)."""
    index = [list(markers).index(m) for m in cell_markers]
    min_area, batch = int(eval_cfg["min_nucleus_area_px"]), int(eval_cfg["batch_size"])
    test = score_split(
        predictor, test_ds, markers, index, min_area, batch, keep=keep, write_dir=write_dir, dilate_px=dilate_px
    )
    table = test["pixels"].table()
    cells = pd.DataFrame()
    if cell_markers:
        val = score_split(predictor, val_ds, markers, index, min_area, batch, pixels=False, dilate_px=dilate_px)
        cell_table, cells, _ = cell_level_evaluation(
            val["cells"], test["cells"], cell_markers, seed=seed, min_cells=int(eval_cfg["gate_min_cells"])
        )
        cells.insert(0, "label", test["cells"]["label"])
        cells.insert(0, "tile", test["cells"]["tile"])
        table = table.merge(cell_table, on="marker", how="left")
    return table, cells, test["kept"]


class ValidationScorer:
    """The checkpoint criterion: mean Cell AUC over the cell markers on the validation tiles.

    The validation cells are gated once, on their own measured means (the test cells are never seen);
    each call predicts the validation tiles and scores the per-cell predicted means against those labels.
    """

    def __init__(
        self,
        val_ds: MIFTileDataset,
        markers: Sequence[str],
        cell_markers: Sequence[str],
        eval_cfg: Mapping[str, Any],
        seed: int = 0,
        dilate_px: float = 0.0,
    ):
        self.dataset = val_ds
        self.markers = list(markers)
        self.index = [self.markers.index(m) for m in cell_markers]
        self.min_area = int(eval_cfg["min_nucleus_area_px"])
        self.batch = int(eval_cfg["batch_size"])
        self.dilate_px = float(dilate_px)
        measured = []
        for i in range(len(val_ds)):
            _, target, nuclei = val_ds.load(i)
            unit = to_unit(target.numpy()[self.index])
            measured.append(nucleus_means(unit, nuclei.numpy(), self.min_area, self.dilate_px)[1])
        stacked = np.concatenate(measured) if measured else np.zeros((0, len(self.index)))
        self.labels, _ = gate_markers(stacked, list(cell_markers), seed=seed, min_cells=int(eval_cfg["gate_min_cells"]))

    def __call__(self, predictor: Predictor) -> float:
        cells = score_split(
            predictor,
            self.dataset,
            self.markers,
            self.index,
            self.min_area,
            self.batch,
            False,
            dilate_px=self.dilate_px,
        )["cells"]
        values = [roc_auc(cells["pred"][:, m], self.labels[:, m]) for m in range(len(self.index))]
        finite = [v for v in values if v == v]
        return float(np.mean(finite)) if finite else math.nan


def records(table: pd.DataFrame) -> list[dict]:
    """The rows of a per-marker table as JSON-ready dicts (undefined values as None)."""
    return [{k: finite(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def summary(table: pd.DataFrame) -> dict[str, float | None]:
    """Mean over markers of each headline metric (ignoring undefined values; None when none is defined)."""
    out = {}
    for key in ("psnr", "ssim", "cell_auc", "auc_classifier", "f1", "balanced_accuracy"):
        if key in table:
            values = table[key].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            out[key] = float(values.mean()) if values.size else None
    return out


__all__ = [
    "PixelAccumulator",
    "pixel_metrics",
    "cell_regions",
    "nucleus_means",
    "roc_auc",
    "cell_auc_table",
    "Gate",
    "gmm_gate",
    "gate_markers",
    "cell_classifier_metrics",
    "cell_level_evaluation",
    "format_table",
    "plot_examples",
    "plot_training_curve",
    "write_prediction_tiff",
    "Predictor",
    "model_predictor",
    "mean_predictor",
    "predict_tiles",
    "score_split",
    "evaluate_run",
    "ValidationScorer",
    "records",
    "summary",
]
