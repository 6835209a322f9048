"""Survival training: per-fold inputs, the MCAT variants, training, risks and K-fold cross-validation.

In each fold the hazard bins are cut at the quartiles of the training patients' uncensored times,
and the omic, cell and patch features are standardised with training statistics only; the model
trains with Adam on the discrete-time NLL loss through the shared loop of :mod:`finetune.training`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..metrics import concordance_index, ipcw_concordance_index
from ..training import epoch_means, fit
from .data import Cohort, bin_index, hazard_bins, patient_folds
from .model import MCAT, nll_survival_loss, pad_bags

MODE_NAMES = {"pathology": "pathology only", "genomic": "genomic only", "mcat": "MCAT", "past_multi": "PAST-multi"}


# ---------------------------------------------------------------------------------------------
# Data prepared for one fold


@dataclasses.dataclass
class PatientTensors:
    """Model inputs for every patient; omic and cell features standardised per fold."""

    bags: list[torch.Tensor] | None  # n × (n_patches_i, D_image)
    omics: list[torch.Tensor]  # G × (n, n_g)
    cells: torch.Tensor | None  # (n, D_cell)


def _standardise(values: np.ndarray, train: np.ndarray) -> np.ndarray:
    mean = values[train].mean(axis=0)
    std = values[train].std(axis=0)
    return ((values - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def fold_tensors(
    cohort: Cohort, bags: Sequence[np.ndarray] | None, cells: np.ndarray | None, train: np.ndarray
) -> PatientTensors:
    """Standardise omics, cells and patch features with the training patients' statistics only.

    Patch features are standardised per dimension over all training patches: raw backbone
    features can have a few very large dimensions, which would saturate the co-attention softmax.
    """
    omics = [torch.from_numpy(_standardise(x, train)) for x in cohort.omics.values()]
    cell_t = torch.from_numpy(_standardise(cells, train)) if cells is not None else None
    bag_t = None
    if bags is not None:
        train_patches = np.concatenate([bags[i] for i in train])  # (n_train_patches, D_image)
        mean, std = train_patches.mean(axis=0), train_patches.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        bag_t = [torch.from_numpy(((b - mean) / std).astype(np.float32)) for b in bags]
    return PatientTensors(bag_t, omics, cell_t)


def _batch(data: PatientTensors, index: Sequence[int], model: MCAT, device: torch.device) -> dict:
    batch: dict[str, Any] = {}
    if model.uses_image:
        patches, mask = pad_bags([data.bags[i] for i in index])  # (B, N_max, D), (B, N_max)
        batch.update(patches=patches.to(device), patch_mask=mask.to(device))
    if model.uses_omics:
        batch["omics"] = [x[index].to(device) for x in data.omics]
        if model.uses_cells:
            batch["cell"] = data.cells[index].to(device)
    return batch


# ---------------------------------------------------------------------------------------------
# Training and prediction


def build_model(
    mode: str, image_dim: int | None, group_sizes: Sequence[int], cell_dim: int | None, model_cfg: Mapping[str, Any]
) -> MCAT:
    """`mode` in MODE_NAMES; past_multi is MCAT with the mean cell embedding as an extra token."""
    arch = "mcat" if mode == "past_multi" else mode
    return MCAT(
        image_dim=image_dim or 1,
        group_sizes=group_sizes,
        cell_dim=cell_dim if mode == "past_multi" else None,
        dim=int(model_cfg["dim"]),
        n_bins=int(model_cfg["n_bins"]),
        mode=arch,
        n_heads=int(model_cfg["n_heads"]),
        n_layers=int(model_cfg["n_layers"]),
        dropout=float(model_cfg["dropout"]),
    )


def train_model(
    model: MCAT,
    data: PatientTensors,
    train: np.ndarray,
    labels: np.ndarray,
    censored: np.ndarray,
    train_cfg: Mapping[str, Any],
    seed: int,
    progress: bool = False,
) -> list[float]:
    """Adam on the NLL survival loss (the shared loop, :func:`finetune.training.fit`); the mean
    training loss of each epoch.

    Each epoch draws a fresh permutation of the training patients, cut into batches of
    ``batch_size``; the optimiser steps every ``grad_accumulation`` batches and at the epoch's end.
    """
    device = torch.device(train_cfg["device"])
    model.to(device).train()
    optimiser = torch.optim.Adam(
        model.parameters(), lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"])
    )
    rng = np.random.default_rng(seed)
    batch_size, accumulation = int(train_cfg["batch_size"]), int(train_cfg["grad_accumulation"])
    labels_t = torch.from_numpy(labels).to(device)
    censored_t = torch.from_numpy(censored.astype(np.float32)).to(device)

    def batches(epoch: int) -> list[np.ndarray]:
        order = rng.permutation(train)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def step(index: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**_batch(data, index, model, device))
        loss = nll_survival_loss(out["hazards"], labels_t[index], censored_t[index], alpha=float(train_cfg["alpha"]))
        return loss, {"n": len(index)}

    history = fit(
        step,
        batches,
        optimiser,
        epochs=int(train_cfg["epochs"]),
        accumulation=accumulation,
        device=device,
        progress=progress,
        desc="epochs",
        steps_per_epoch=math.ceil(len(train) / batch_size),
        postfix=None,
    )
    return [row["loss"] for row in epoch_means(history, ["loss"], weight="n")]


@torch.no_grad()
def predict_risk(model: MCAT, data: PatientTensors, index: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Risk −Σ_k S_k (n_index,) for the patients in `index`; higher = earlier event."""
    model.eval()
    device = next(model.parameters()).device
    risks = [
        model(**_batch(data, index[i : i + batch_size], model, device))["risk"].cpu()
        for i in range(0, len(index), batch_size)
    ]
    return torch.cat(risks).numpy().astype(float)


# ---------------------------------------------------------------------------------------------
# Cross-validation


def cross_validate(
    cohort: Cohort,
    bags: Sequence[np.ndarray] | None,
    cells: np.ndarray | None,
    mode: str,
    model_cfg: Mapping[str, Any],
    train_cfg: Mapping[str, Any],
    seed: int = 0,
    progress: bool = False,
    folds: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """K-fold CV of one mode → (per-fold metrics, out-of-fold risks with risk groups).

    Per-fold: `harrell_c`, `uno_c` (censoring estimated on the training fold), `n_test`,
    `n_events`, `final_loss`. Out-of-fold rows: `case_id`, `fold`, `risk`, `high_risk` (risk
    above the median training risk of the fold's model), `survival_months`, `censorship`.
    """
    if folds is None:
        folds = patient_folds(cohort.case_ids, cohort.events, int(train_cfg["n_folds"]), seed)
    times, censored = cohort.survival_months, cohort.censored
    image_dim = bags[0].shape[1] if bags is not None else None
    cell_dim = cells.shape[1] if cells is not None else None
    group_sizes = [x.shape[1] for x in cohort.omics.values()]
    fold_rows, oof_rows = [], []
    for fold, (train, test) in enumerate(folds):
        bins = hazard_bins(times[train], ~censored[train], int(model_cfg["n_bins"]))
        labels = bin_index(times, bins)
        data = fold_tensors(cohort, bags, cells, train)
        torch.manual_seed(seed * 1000 + fold)
        model = build_model(mode, image_dim, group_sizes, cell_dim, model_cfg)
        history = train_model(model, data, train, labels, censored, train_cfg, seed * 1000 + fold, progress)
        test_risk = predict_risk(model, data, test)
        threshold = float(np.median(predict_risk(model, data, train)))
        fold_rows.append(
            {
                "fold": fold,
                "n_train": len(train),
                "n_test": len(test),
                "n_events": int((~censored[test]).sum()),
                "harrell_c": concordance_index(times[test], ~censored[test], test_risk),
                "uno_c": ipcw_concordance_index(
                    times[train], ~censored[train], times[test], ~censored[test], test_risk
                ),
                "final_loss": history[-1] if history else float("nan"),
            }
        )
        for i, risk in zip(test, test_risk):
            oof_rows.append(
                {
                    "case_id": cohort.case_ids[i],
                    "fold": fold,
                    "risk": float(risk),
                    "high_risk": bool(risk > threshold),
                    "survival_months": float(times[i]),
                    "censorship": int(censored[i]),
                }
            )
    return pd.DataFrame(fold_rows), pd.DataFrame(oof_rows)


__all__ = [
    "MODE_NAMES",
    "PatientTensors",
    "fold_tensors",
    "build_model",
    "train_model",
    "predict_risk",
    "cross_validate",
]
