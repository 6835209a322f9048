"""Evaluation of predicted mIF: pixel metrics per marker and MIPHEI's cell-level classification.

Pixel level (:class:`PixelAccumulator`, :func:`pixel_metrics`): predictions clipped to [−0.9, 0.9] and compared
with the targets in that space, ``data_range = 1.8`` (MIPHEI: torchmetrics PSNR/SSIM with ``data_range=(-0.9,
0.9)``). PSNR per marker is computed from the MSE pooled over every test pixel (as torchmetrics accumulates it);
SSIM is the mean over test tiles of ``finetune.metrics.ssim``.

Cell level (MIPHEI ``src/metrics.py::CellMetrics`` and ``preprocessings/single_cell_analysis``):

1. each nucleus of the instance mask gets the mean predicted and the mean measured intensity of every
   marker, in the [0, 1] unit space (``(y + 0.9) / 1.8``), nuclei under ``min_area_px`` dropped;
2. labels: per marker, a 2-component Gaussian mixture (sklearn) on the measured means of the cells with
   signal (> 0); positive = above the point where the higher-mean component becomes the more probable one
   (the two Gaussians' crossing, as MIPHEI's gating notebook); cells without signal are negative. A gate
   that cannot be drawn (too few cells with signal, a single class) gives NaN metrics and a warning;
3. a logistic regression (standardised features, ``class_weight="balanced"``) per marker, with the predicted
   means of *all* cell markers as features, is fitted on validation cells and applied to test cells;
4. per marker: Cell AUC (ROC AUC of the classifier's probabilities), F1 and balanced accuracy of its 0.5
   decisions; ``auc_intensity`` is the AUC of the marker's own predicted mean (MIPHEI's plain "auc").

The nuclear stain (DAPI/Hoechst: every cell positive) is excluded from the cell level, as in MIPHEI.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from data_shards.atomic import atomic_path, save_png
from data_shards.errors import InputError

from .metrics import ssim
from .mif_data import TARGET_HIGH, TARGET_LOW, TARGET_SPAN, to_unit

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


def nucleus_means(image: np.ndarray, nuclei: np.ndarray, min_area_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean of every channel of ``image`` (C, H, W) inside each nucleus of ``nuclei`` (H, W).

    Returns (labels (n,), means (n, C)) for the labels present with at least ``min_area_px`` pixels.
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
    means = np.stack([np.asarray(ndi.mean(channel, labels=nuclei, index=labels)) for channel in image], axis=1)
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


def gate_markers(measured: np.ndarray, markers: Sequence[str], seed: int = 0, min_cells: int = 10
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


def cell_classifier_metrics(val_pred: np.ndarray, val_labels: np.ndarray, test_pred: np.ndarray,
                            test_labels: np.ndarray, markers: Sequence[str], seed: int = 0
                            ) -> tuple[pd.DataFrame, np.ndarray]:
    """Per marker logistic regression on validation cells → Cell AUC, F1, balanced accuracy on test cells.

    ``*_pred``: predicted per-cell means (n, M), all used as features; ``*_labels``: gated labels (n, M),
    NaN columns for ungated markers. Returns the table and the test probabilities (n_test, M).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows, probs = [], np.full(test_labels.shape, np.nan)
    for m, name in enumerate(markers):
        row = {"marker": name, "cell_auc": math.nan, "f1": math.nan, "balanced_accuracy": math.nan,
               "auc_intensity": math.nan, "n_test_cells": int(len(test_labels)),
               "n_test_positive": (math.nan if np.isnan(test_labels[:, m]).all() else int(np.nansum(test_labels[:, m])))
               if len(test_labels) else 0}
        y_val, y_test = val_labels[:, m], test_labels[:, m]
        problem = None
        if np.isnan(y_val).any() or np.isnan(y_test).any():
            problem = "not gated"
        elif len(np.unique(y_val)) < 2:
            problem = "one class among validation cells"
        elif len(np.unique(y_test)) < 2:
            problem = "one class among test cells"
        if problem and problem != "not gated":  # an ungated marker was reported by gate_markers
            log.warning("marker %s: %s; Cell AUC / F1 / balanced accuracy are NaN", name, problem)
        if problem:
            rows.append(row)
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", random_state=seed,
                                                                 max_iter=1000))
        clf.fit(val_pred, y_val.astype(int))
        p = clf.predict_proba(test_pred)[:, 1]
        decision = (p >= 0.5).astype(int)
        probs[:, m] = p
        row.update(cell_auc=float(roc_auc_score(y_test, p)), f1=float(f1_score(y_test, decision, zero_division=0)),
                   balanced_accuracy=float(balanced_accuracy_score(y_test, decision)),
                   auc_intensity=float(roc_auc_score(y_test, test_pred[:, m])))
        rows.append(row)
    return pd.DataFrame(rows), probs


def cell_level_evaluation(val_cells: Mapping[str, np.ndarray], test_cells: Mapping[str, np.ndarray],
                          markers: Sequence[str], seed: int = 0, min_cells: int = 10
                          ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Gate]]:
    """Gate measured intensities (validation and test cells pooled), train on validation, score test cells.

    ``*_cells``: {"pred": (n, M), "measured": (n, M)} per-nucleus means in [0, 1] for the cell markers.
    Returns (per-marker metrics, test-cell table with labels and probabilities, gates).
    """
    measured = np.concatenate([val_cells["measured"], test_cells["measured"]])
    labels, gates = gate_markers(measured, markers, seed=seed, min_cells=min_cells)
    n_val = len(val_cells["measured"])
    table, probs = cell_classifier_metrics(val_cells["pred"], labels[:n_val], test_cells["pred"], labels[n_val:],
                                           markers, seed=seed)
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


def format_table(table: pd.DataFrame, title: str = "") -> str:
    """The per-marker table as aligned text (NaN printed as 'n/a')."""
    columns = [("marker", "marker", "{}"), ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
               ("cell_auc", "Cell AUC", "{:.3f}"), ("f1", "F1", "{:.3f}"),
               ("balanced_accuracy", "bal.acc", "{:.3f}"), ("n_test_positive", "pos/cells", "{}")]
    present = [c for c in columns if c[0] in table.columns]
    lines = [title] if title else []
    lines.append("  ".join(f"{label:>10}" for _, label, _ in present))
    for row in table.to_dict(orient="records"):
        cells = []
        for key, _, fmt in present:
            value = row.get(key)
            if key == "n_test_positive" and "n_test_cells" in row:
                text = "n/a" if value is None or value != value else f"{int(value)}/{int(row['n_test_cells'])}"
            elif isinstance(value, float) and not math.isfinite(value):
                text = "n/a"
            else:
                text = fmt.format(value)
            cells.append(f"{text:>10}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_examples(he_tiles: Sequence[np.ndarray], preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                  markers: Sequence[str], path: str | Path, names: Sequence[str] | None = None,
                  nuclei: Sequence[np.ndarray] | None = None, dpi: int = 110) -> Path:
    """For each tile two rows: the H&E, then predicted marker maps; the H&E with the nuclei outlined (the
    cells that are scored), then the measured maps. Maps in [0, 1] units, one colour scale for all."""
    from skimage.segmentation import mark_boundaries

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_tiles, n_markers = len(he_tiles), len(markers)
    fig, axes = plt.subplots(2 * n_tiles, n_markers + 1, figsize=(1.9 * (n_markers + 1), 3.8 * n_tiles),
                             squeeze=False)
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
    return save_png(fig, path, dpi=dpi)


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
    return save_png(fig, path, dpi=110)


def write_prediction_tiff(path: str | Path, pred: np.ndarray, markers: Sequence[str]) -> Path:
    """A prediction (M, H, W) in [−0.9, 0.9] as an OME-TIFF uint8 stack (0..255 = [0, 1] units, MIPHEI's storage)."""
    import tifffile

    stack = np.round(to_unit(pred) * 255).astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tifffile warns about the temporary name's suffix
            tifffile.imwrite(tmp, stack, ome=True, photometric="minisblack",
                             metadata={"axes": "CYX", "Channel": {"Name": list(markers)}})
    return path


__all__ = ["PixelAccumulator", "pixel_metrics", "nucleus_means", "Gate", "gmm_gate", "gate_markers", "cell_classifier_metrics",
           "cell_level_evaluation", "format_table", "plot_examples", "plot_training_curve", "write_prediction_tiff"]
