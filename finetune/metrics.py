"""Downstream metrics: survival concordance, image fidelity, IHC H-score, per-gene correlation.

Each metric wraps a well-kept library where one exists (scikit-survival for concordance,
scikit-image for PSNR/SSIM and colour deconvolution, scipy for labelled statistics) and adds
the input checks the rest of the project relies on: a bad input raises one
`common.errors.InputError` naming the field and what was expected.

Units: survival times are in whatever unit the caller uses (days, months), the same for train
and test; image arrays are in pixels, H×W or H×W×C; DAB and hematoxylin amounts are in
scikit-image's `rgb2hed` units (see `DEFAULT_DAB_THRESHOLDS`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.segmentation import relabel_sequential, watershed
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

from common.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DAB_THRESHOLDS",
    "concordance_index",
    "ipcw_concordance_index",
    "psnr",
    "ssim",
    "segment_nuclei",
    "h_score",
    "h_score_from_classes",
    "pearson_per_gene",
    "mean_pearson",
]

# ---------------------------------------------------------------------------------------------
# Survival concordance
# ---------------------------------------------------------------------------------------------


def _as_1d_finite(values, field: str, dtype=float) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(None, field, "a 1-D array (one value per subject)", f"shape {array.shape}")
    if array.size == 0:
        raise InputError(None, field, "at least one subject", "an empty array")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise InputError(None, field, "numeric values", f"dtype {array.dtype}")
    array = array.astype(dtype)
    if dtype is float and not np.all(np.isfinite(array)):
        raise InputError(None, field, "finite values", f"{int((~np.isfinite(array)).sum())} NaN/inf")
    return array


def _as_event(values, field: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(None, field, "a 1-D array of event indicators", f"shape {array.shape}")
    if array.dtype != bool:
        numeric = _as_1d_finite(array, field)
        if not np.all((numeric == 0) | (numeric == 1)):
            raise InputError(
                None, field, "booleans or 0/1 (1 = event observed, 0 = censored)", f"values {np.unique(numeric)[:5]}"
            )
        array = numeric.astype(bool)
    return array


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        names = ", ".join(lengths)
        raise InputError(None, names, "arrays of the same length (one entry per subject)", lengths)


def _count_comparable_pairs(time: np.ndarray, event: np.ndarray) -> int:
    """Pairs (i, j) with an observed event at time_i and subject j still at risk after it.

    Follows scikit-survival's definition: j is comparable to the event i when time_j > time_i,
    or when j was censored at exactly time_i (it was known to be event-free at that time).
    """
    sorted_time = np.sort(time)
    sorted_censored = np.sort(time[~event])
    event_time = time[event]
    later = len(time) - np.searchsorted(sorted_time, event_time, side="right")
    censored_same = np.searchsorted(sorted_censored, event_time, side="right") - np.searchsorted(
        sorted_censored, event_time, side="left"
    )
    return int(np.sum(later + censored_same))


def _check_survival(time, event, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    time = _as_1d_finite(time, f"{prefix}time")
    event = _as_event(event, f"{prefix}event")
    _check_same_length(**{f"{prefix}time": time, f"{prefix}event": event})
    if np.any(time < 0):
        raise InputError(None, f"{prefix}time", "non-negative survival times", f"minimum {time.min()}")
    return time, event


def concordance_index(time, event, risk) -> float:
    """Harrell's concordance index: the fraction of comparable pairs ordered correctly by risk.

    `time` (n,) is the time of event or censoring, `event` (n,) is True (or 1) where the event
    was observed, `risk` (n,) is the predicted risk: a higher risk should mean an earlier
    event. Ties in risk count one half. 0.5 is chance, 1.0 a perfect ranking. Computed by
    `sksurv.metrics.concordance_index_censored`.
    """
    time, event = _check_survival(time, event)
    risk = _as_1d_finite(risk, "risk")
    _check_same_length(time=time, event=event, risk=risk)
    if _count_comparable_pairs(time, event) == 0:
        raise InputError(
            None,
            "event",
            "at least one comparable pair (an observed event before another subject's time)",
            f"{int(event.sum())} events among {len(time)} subjects",
        )
    cindex, *_ = concordance_index_censored(event, time, risk)
    return float(cindex)


def ipcw_concordance_index(train_time, train_event, test_time, test_event, risk, tau=None) -> float:
    """Uno's concordance index, weighting pairs by the inverse probability of censoring.

    The censoring distribution is the Kaplan–Meier estimate on the training set
    (`train_time`, `train_event`); the pairs are formed on the test set (`test_time`,
    `test_event`, `risk`, one entry per test subject; higher risk = earlier event).
    Computed by `sksurv.metrics.concordance_index_ipcw`.

    Truncation `tau` (same unit as the times): only test events before `tau` are used as the
    earlier member of a pair; subjects beyond `tau` still count as the longer survivors. The
    censoring survival function is only known within the training follow-up (and it may drop to
    zero at the last training time), so `tau` is capped at the largest training time:
    `tau=None` means `tau = max(train_time)`, and a larger `tau` is lowered to it with a
    warning. Test events at or beyond the end of training follow-up therefore never need a
    censoring weight the training set cannot provide.
    """
    train_time, train_event = _check_survival(train_time, train_event, prefix="train_")
    test_time, test_event = _check_survival(test_time, test_event, prefix="test_")
    risk = _as_1d_finite(risk, "risk")
    _check_same_length(test_time=test_time, test_event=test_event, risk=risk)

    follow_up_end = float(train_time.max())
    if tau is None:
        tau = follow_up_end
    else:
        tau = float(tau)
        if not np.isfinite(tau) or tau <= 0:
            raise InputError(None, "tau", "a positive finite truncation time or None", tau)
        if tau > follow_up_end:
            log.warning(
                "ipcw_concordance_index: tau=%g is beyond the training follow-up; using "
                "the largest training time %g instead",
                tau,
                follow_up_end,
            )
            tau = follow_up_end

    if _count_comparable_pairs(test_time, test_event & (test_time < tau)) == 0:
        raise InputError(
            None,
            "test_event",
            f"at least one comparable pair with the earlier event before tau={tau:g}",
            f"{int((test_event & (test_time < tau)).sum())} such events",
        )
    survival_train = Surv.from_arrays(event=train_event, time=train_time)
    survival_test = Surv.from_arrays(event=test_event, time=test_time)
    cindex, *_ = concordance_index_ipcw(survival_train, survival_test, risk, tau=tau)
    return float(cindex)


# ---------------------------------------------------------------------------------------------
# Image fidelity (virtual IHC, mIF)
# ---------------------------------------------------------------------------------------------


def _check_image_pair(pred, target, data_range) -> tuple[np.ndarray, np.ndarray, float]:
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.ndim not in (2, 3):
        raise InputError(None, "pred", "an H×W or H×W×C image", f"shape {pred.shape}")
    if pred.shape != target.shape:
        raise InputError(None, "target", f"the same shape as pred {pred.shape}", f"shape {target.shape}")
    for name, image in (("pred", pred), ("target", target)):
        if not np.all(np.isfinite(image)):
            raise InputError(None, name, "finite pixel values", "NaN/inf")
    if data_range is None or not np.isfinite(data_range) or data_range <= 0:
        raise InputError(
            None, "data_range", "a positive number (e.g. 1.0 for [0, 1] floats, 255 for 8-bit)", data_range
        )
    return pred, target, float(data_range)


def psnr(pred, target, data_range) -> float:
    """Peak signal-to-noise ratio in dB: 10·log10(data_range² / MSE); inf when identical.

    `pred` and `target` are H×W or H×W×C arrays of the same shape; `data_range` is the span of
    possible values (1.0 for [0, 1] floats, 255 for 8-bit). Wraps
    `skimage.metrics.peak_signal_noise_ratio`.
    """
    pred, target, data_range = _check_image_pair(pred, target, data_range)
    if np.array_equal(pred, target):
        return float("inf")
    return float(peak_signal_noise_ratio(target, pred, data_range=data_range))


def ssim(pred, target, data_range) -> float:
    """Mean structural similarity (7×7 window), channels last for H×W×C; wraps skimage's.

    Both sides must be at least 7 pixels. `data_range` as in `psnr`.
    """
    pred, target, data_range = _check_image_pair(pred, target, data_range)
    if min(pred.shape[:2]) < 7:
        raise InputError(None, "pred", "images at least 7×7 pixels (the SSIM window)", f"shape {pred.shape}")
    channel_axis = -1 if pred.ndim == 3 else None
    return float(structural_similarity(target, pred, data_range=data_range, channel_axis=channel_axis))


# ---------------------------------------------------------------------------------------------
# IHC H-score
# ---------------------------------------------------------------------------------------------

# DAB thresholds (weak, moderate, strong) on the per-nucleus mean of `rgb2hed(...)[..., 2]`.
# scikit-image scales optical density by 1/ln(1e6), so its units are the usual log10 OD divided
# by 6. These are QuPath's positive-cell-detection defaults (0.2, 0.4, 0.6 OD) in those units.
# Staining intensity is lab- and scanner-specific: calibrate and pass your own thresholds.
DEFAULT_DAB_THRESHOLDS: tuple[float, float, float] = (0.2 / 6, 0.4 / 6, 0.6 / 6)


def _check_rgb(ihc_rgb) -> np.ndarray:
    image = np.asarray(ihc_rgb)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(None, "ihc_rgb", "an H×W×3 RGB image", f"shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating) and (image.min() < 0 or image.max() > 1):
        raise InputError(
            None, "ihc_rgb", "float values in [0, 1] or an integer image", f"range [{image.min():g}, {image.max():g}]"
        )
    return image


def segment_nuclei(
    ihc_rgb,
    min_area_px: int = 30,
    smoothing_sigma_px: float = 1.0,
    split_touching: bool = True,
    min_distance_px: int = 5,
) -> np.ndarray:
    """Label nuclei (H×W int32, 0 = background) from the hematoxylin channel of an RGB image.

    A classical baseline: hematoxylin amount from `rgb2hed` (channel 0), Gaussian smoothing
    (`smoothing_sigma_px`), Otsu threshold, a 3×3 opening to cut thin bridges, holes filled,
    touching nuclei split by a watershed on the distance transform (seeds at least
    `min_distance_px` apart) and objects under `min_area_px` pixels dropped. Nuclei whose
    DAB stain masks the hematoxylin can be missed; for real work pass a label image from a
    dedicated segmenter (StarDist, Cellpose) to `h_score` instead.
    """
    image = _check_rgb(ihc_rgb)
    hematoxylin = gaussian(rgb2hed(image)[..., 0], sigma=smoothing_sigma_px)
    if np.ptp(hematoxylin) == 0:
        return np.zeros(hematoxylin.shape, dtype=np.int32)
    foreground = hematoxylin > threshold_otsu(hematoxylin)
    foreground = ndi.binary_opening(foreground, structure=np.ones((3, 3), bool))
    foreground = ndi.binary_fill_holes(foreground)
    components, _ = ndi.label(foreground)
    if split_touching:
        distance_px = ndi.distance_transform_edt(foreground)
        peaks = peak_local_max(distance_px, min_distance=min_distance_px, labels=components, exclude_border=False)
        markers = np.zeros(components.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-distance_px, markers, mask=foreground)
    else:
        labels = components
    area_px = np.bincount(labels.ravel())
    too_small = area_px < min_area_px
    too_small[0] = False
    labels[too_small[labels]] = 0
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.int32)


def h_score(ihc_rgb, nuclei=None, thresholds: Sequence[float] = DEFAULT_DAB_THRESHOLDS) -> dict:
    """H-score (0–300) of an IHC image from the mean DAB amount in each nucleus.

    `ihc_rgb` is H×W×3 (uint8, or float in [0, 1]). `nuclei` is an H×W instance label image
    (0 = background, each positive integer one nucleus); when None it is made by
    `segment_nuclei`. DAB per pixel is `skimage.color.rgb2hed(ihc_rgb)[..., 2]`; a nucleus is
    negative below `thresholds[0]`, weak from `thresholds[0]`, moderate from `thresholds[1]`,
    strong from `thresholds[2]` (see `DEFAULT_DAB_THRESHOLDS` for units and defaults).
    H-score = %weak + 2·%moderate + 3·%strong, percentages over all nuclei.

    Returns a dict: `h_score`, `pct_negative`, `pct_weak`, `pct_moderate`, `pct_strong`,
    `n_nuclei`, `n_negative`, `n_weak`, `n_moderate`, `n_strong`, `thresholds`.
    Raises InputError when there is no nucleus to score.
    """
    image = _check_rgb(ihc_rgb)
    thresholds = tuple(float(t) for t in thresholds)
    if (
        len(thresholds) != 3
        or not all(np.isfinite(thresholds))
        or thresholds[0] < 0
        or not thresholds[0] < thresholds[1] < thresholds[2]
    ):
        raise InputError(
            None, "thresholds", "three increasing non-negative DAB values (weak, moderate, strong)", thresholds
        )
    if nuclei is None:
        nuclei = segment_nuclei(image)
        source = "segmented nuclei"
    else:
        nuclei = np.asarray(nuclei)
        source = "nuclei"
        if nuclei.shape != image.shape[:2]:
            raise InputError(
                None, "nuclei", f"an H×W label image matching ihc_rgb {image.shape[:2]}", f"shape {nuclei.shape}"
            )
        if not np.issubdtype(nuclei.dtype, np.integer) or nuclei.min() < 0:
            raise InputError(
                None,
                "nuclei",
                "non-negative integer labels (0 = background)",
                f"dtype {nuclei.dtype}, minimum {nuclei.min()}",
            )
    label_ids = np.unique(nuclei)
    label_ids = label_ids[label_ids > 0]
    if label_ids.size == 0:
        raise InputError(None, source, "at least one nucleus to score", "none")

    dab = rgb2hed(image)[..., 2]
    mean_dab = np.asarray(ndi.mean(dab, labels=nuclei, index=label_ids))  # (n_nuclei,)
    # 0 negative, 1 weak, 2 moderate, 3 strong; a value equal to a threshold takes the upper class
    return {**h_score_from_classes(np.digitize(mean_dab, thresholds)), "thresholds": thresholds}


def h_score_from_classes(intensity_class: np.ndarray) -> dict:
    """H-score = %weak + 2·%moderate + 3·%strong (0–300) of per-nucleus classes 0 negative … 3 strong,
    with the percentages and counts of each class (what :func:`h_score` returns, without thresholds)."""
    counts = np.bincount(np.asarray(intensity_class, dtype=np.int64), minlength=4)[:4]
    n_nuclei = int(counts.sum())
    pct = 100.0 * counts / max(n_nuclei, 1)
    return {
        "h_score": float(pct[1] + 2 * pct[2] + 3 * pct[3]),
        "pct_negative": float(pct[0]),
        "pct_weak": float(pct[1]),
        "pct_moderate": float(pct[2]),
        "pct_strong": float(pct[3]),
        "n_nuclei": n_nuclei,
        "n_negative": int(counts[0]),
        "n_weak": int(counts[1]),
        "n_moderate": int(counts[2]),
        "n_strong": int(counts[3]),
    }


# ---------------------------------------------------------------------------------------------
# Gene expression prediction
# ---------------------------------------------------------------------------------------------


def _as_dense_matrix(values, field: str) -> np.ndarray:
    if scipy.sparse.issparse(values):
        values = values.toarray()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise InputError(None, field, "an (n_cells, n_genes) matrix", f"shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(None, field, "finite values", "NaN/inf")
    return array


def pearson_per_gene(pred, true) -> np.ndarray:
    """Pearson correlation between predicted and measured expression, one per gene (n_genes,).

    `pred` and `true` are (n_cells, n_genes), dense or scipy sparse; each gene's correlation
    is over cells. A gene whose prediction or measurement is constant across cells has no
    defined correlation and gets NaN (use `mean_pearson` to average the rest).
    """
    pred = _as_dense_matrix(pred, "pred")
    true = _as_dense_matrix(true, "true")
    if pred.shape != true.shape:
        raise InputError(None, "true", f"the same (n_cells, n_genes) shape as pred {pred.shape}", f"shape {true.shape}")
    if pred.shape[0] < 2:
        raise InputError(None, "pred", "at least 2 cells to correlate over", f"{pred.shape[0]}")
    pred_centred = pred - pred.mean(axis=0)
    true_centred = true - true.mean(axis=0)
    # exact constancy via ptp: a centred constant column can keep rounding noise that would
    # otherwise yield a spurious correlation
    defined = (np.ptp(pred, axis=0) > 0) & (np.ptp(true, axis=0) > 0)
    correlation = np.full(pred.shape[1], np.nan)
    numerator = np.sum(pred_centred[:, defined] * true_centred[:, defined], axis=0)
    denominator = np.sqrt(np.sum(pred_centred[:, defined] ** 2, axis=0) * np.sum(true_centred[:, defined] ** 2, axis=0))
    correlation[defined] = np.clip(numerator / denominator, -1.0, 1.0)
    return correlation


def mean_pearson(pred, true) -> float:
    """Mean of `pearson_per_gene` over the genes where it is defined; NaN (logged) if none is."""
    correlation = pearson_per_gene(pred, true)
    defined = ~np.isnan(correlation)
    if not defined.any():
        log.warning("mean_pearson: every gene is constant in pred or true; returning NaN")
        return float("nan")
    return float(correlation[defined].mean())
