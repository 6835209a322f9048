"""Survival with MCAT on PAST embeddings (PAST paper, "Survival prediction"; Chen et al. 2021).

- :mod:`.data`: the cohort (clinical + signatures CSVs), patch bags, cell embeddings, folds, hazard bins;
- :mod:`.model`: MCAT (genomic-guided co-attention), its single-modality variants and the NLL loss;
- :mod:`.train`: per-fold inputs, training (the shared loop), risks, K-fold cross-validation;
- :mod:`.evaluate`: Kaplan–Meier curves, log-rank tests, fold summaries, paired gains;
- :mod:`.config` / :mod:`.run`: ``launch/finetune.py survival`` (:class:`SurvivalConfig`, :func:`run_survival`).
"""

from ..training import torch_threads
from .config import SurvivalConfig
from .data import (
    Cohort,
    bin_index,
    hazard_bins,
    load_bags,
    load_embedding_file,
    patient_folds,
    read_cell_embeddings,
    read_clinical,
    read_signatures,
)
from .evaluate import PAIRED_COMPARISONS, logrank_p, paired_gains, plot_kaplan_meier, summary_table
from .model import MCAT, nll_survival_loss, pad_bags
from .run import embed_base_cells, embed_with_encoders, run_survival
from .train import MODE_NAMES, build_model, cross_validate, fold_tensors, predict_risk, train_model

__all__ = [
    "MCAT",
    "MODE_NAMES",
    "PAIRED_COMPARISONS",
    "Cohort",
    "SurvivalConfig",
    "bin_index",
    "build_model",
    "cross_validate",
    "embed_base_cells",
    "embed_with_encoders",
    "fold_tensors",
    "hazard_bins",
    "load_bags",
    "load_embedding_file",
    "logrank_p",
    "nll_survival_loss",
    "pad_bags",
    "paired_gains",
    "patient_folds",
    "plot_kaplan_meier",
    "predict_risk",
    "read_cell_embeddings",
    "read_clinical",
    "read_signatures",
    "run_survival",
    "summary_table",
    "torch_threads",
    "train_model",
]
