"""Reference rows and controls for the survival comparison.

- **ridge-Cox**: a penalised Cox model (lifelines, L2) on each patient's mean patch embedding,
  reduced by PCA fitted on the training fold: the simplest reader of an encoder's features, with the
  same folds as MCAT. If MCAT cannot beat it, the attention machinery adds nothing on this cohort.
- **oracle**: the same ridge-Cox on the planted truth the image part of the risk follows (the mean
  planted state of the tiles in a patient's bag): what a perfect image reader could reach.
- **intervals**: a bootstrap over patients of the out-of-fold risks (Harrell's C recomputed on each
  resample, the same resamples for every run: paired), via :mod:`finetune.controls`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from sklearn.decomposition import PCA

from ..controls import block_bootstrap
from ..metrics import concordance_index, ipcw_concordance_index
from .data import Cohort

log = logging.getLogger(__name__)


def _fit_cox(features: np.ndarray, times: np.ndarray, events: np.ndarray, penalizer: float) -> CoxPHFitter:
    frame = pd.DataFrame(features, columns=[f"f{k}" for k in range(features.shape[1])])
    frame["T"], frame["E"] = times, events.astype(int)
    return CoxPHFitter(penalizer=penalizer, l1_ratio=0.0).fit(frame, duration_col="T", event_col="E")


def ridge_cox_cv(
    features: np.ndarray,
    cohort: Cohort,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    max_components: int = 16,
    penalizer: float = 1.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-fold metrics, out-of-fold risks) of a ridge-Cox model on (n_patients, d) ``features``.

    Features are standardised and PCA-reduced to at most ``max_components`` on each training fold.
    Columns as :func:`finetune.survival.train.cross_validate` writes them.
    """
    times, censored = cohort.survival_months, cohort.censored
    events = ~censored
    fold_rows, oof_rows = [], []
    for fold, (train, test) in enumerate(folds):
        mean, scale = features[train].mean(0), features[train].std(0)
        scale = np.where(scale > 0, scale, 1.0)
        x_train, x_test = (features[train] - mean) / scale, (features[test] - mean) / scale
        k = min(max_components, x_train.shape[1], len(train) - 1)
        if x_train.shape[1] > k:
            pca = PCA(k, random_state=fold).fit(x_train)
            x_train, x_test = pca.transform(x_train), pca.transform(x_test)
        model = _fit_cox(x_train, times[train], events[train], penalizer)
        columns = [f"f{j}" for j in range(x_train.shape[1])]
        test_risk = model.predict_partial_hazard(pd.DataFrame(x_test, columns=columns)).to_numpy()
        train_risk = model.predict_partial_hazard(pd.DataFrame(x_train, columns=columns)).to_numpy()
        fold_rows.append(
            {
                "fold": fold,
                "n_test": len(test),
                "n_events": int(events[test].sum()),
                "harrell_c": concordance_index(times[test], events[test], test_risk),
                "uno_c": ipcw_concordance_index(times[train], events[train], times[test], events[test], test_risk),
            }
        )
        threshold = np.median(train_risk)
        for j, i in enumerate(test):
            oof_rows.append(
                {
                    "case_id": cohort.case_ids[i],
                    "fold": fold,
                    "risk": float(test_risk[j]),
                    "high_risk": bool(test_risk[j] > threshold),
                    "survival_months": float(times[i]),
                    "censorship": int(censored[i]),
                }
            )
    return pd.DataFrame(fold_rows), pd.DataFrame(oof_rows)


def mean_bags(bags: Sequence[np.ndarray]) -> np.ndarray:
    """(n_patients, D) mean patch embedding per patient."""
    return np.stack([bag.mean(axis=0) for bag in bags]).astype(np.float64)


def c_index_replicates(oof: pd.DataFrame, case_ids: Sequence[str], n_boot: int, seed: int) -> tuple[float, np.ndarray]:
    """Harrell's C of out-of-fold risks over all patients, and its bootstrap replicates (patients resampled).

    Risks of different folds come from different models; C over the pooled out-of-fold risks is
    the usual summary (and the one the bootstrap can resample). Rows are put in ``case_ids`` order
    so two runs' replicates use the same patients in each resample.
    """
    table = oof.set_index("case_id").loc[list(case_ids)]
    times = table["survival_months"].to_numpy(float)
    events = table["censorship"].to_numpy(int) == 0
    risk = table["risk"].to_numpy(float)

    def harrell(rows: np.ndarray) -> float:
        if events[rows].sum() < 2:
            return float("nan")
        return concordance_index(times[rows], events[rows], risk[rows])

    return harrell(np.arange(len(table))), block_bootstrap(harrell, np.arange(len(table)), n_boot, seed)


__all__ = ["c_index_replicates", "mean_bags", "ridge_cox_cv"]
