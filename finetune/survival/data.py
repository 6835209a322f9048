"""Survival cohort for MCAT: clinical table, genomic signature groups, patch bags, folds, bins.

Inputs (MCAT/TCGA conventions):

* clinical CSV: `case_id`, `slide_id` (several slides of one patient either ';'-separated in
  one row or one row per slide, as in MCAT's TCGA tables), `survival_months`, `censorship`
  (1 = censored, i.e. alive at last follow-up; 0 = death observed), and the omic columns. A
  patient's rows must agree on everything but the slide.
* signatures CSV: which genes form each group, either long (`group,gene` rows) or wide (MCAT's
  `signatures.csv`: one column per group, genes down the column). An omic column belongs to a
  gene when it is named `<gene>` or `<gene>_<suffix>` (MCAT's `TP53_rnaseq`, `TP53_cnv`, ...).
* per-slide embedding files in a folder, `<slide_id>.h5ad` (AnnData, patches in rows; the
  embedding in `obsm["X_emb"]` or X) or `<slide_id>.npz` (array `embeddings` (n_patches, D)
  and optionally `coords`), as written by `finetune.embed`. A patient's bag is the concatenation
  of all their slides' patches, subsampled (seeded) to at most `max_patches`.
* optionally the per-patient mean cell-encoder embedding (PAST-multi): a CSV (`case_id` +
  numeric columns), an `.npz` (`case_ids`, `embeddings`), or a folder of per-slide cell
  embedding files (same formats as above) averaged over all cells of the patient.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from common.errors import InputError

from ..embed.io import EMBEDDING_SUFFIXES, find_embedding_file, load_embedding_file

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship")


# ---------------------------------------------------------------------------------------------
# Discrete-time bins


def hazard_bins(times, events, n_bins: int = 4) -> np.ndarray:
    """Bin edges (n_bins + 1,) at the quantiles of the UNCENSORED times, outer edges 0 and +inf.

    As in MCAT (quartiles of uncensored survival for n_bins=4), except that the outer edges are
    0 and +inf instead of the cohort's min − eps and max + eps, so any later time (a test patient
    beyond the training follow-up) still falls in a bin. `events` is True / 1 where the event was
    observed. Bin k holds times t with edges[k] <= t < edges[k+1].
    """
    times = np.asarray(times, dtype=float)
    events = np.asarray(events).astype(bool)
    observed = times[events]
    if observed.size < n_bins:
        raise InputError(
            None, "censorship", f"at least {n_bins} observed events to cut {n_bins} hazard bins", f"{observed.size}"
        )
    inner = np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])  # (n_bins - 1,)
    edges = np.concatenate([[0.0], inner, [np.inf]])
    if np.any(np.diff(edges) <= 0):
        raise InputError(
            None,
            "survival_months",
            f"{n_bins} distinct quantiles of the uncensored times (too many tied times; use fewer bins)",
            edges.tolist(),
        )
    return edges


def bin_index(times, bins: np.ndarray) -> np.ndarray:
    """The hazard bin (int64, 0 … len(bins) − 2) of each time: bins[k] <= t < bins[k+1]."""
    times = np.asarray(times, dtype=float)
    index = np.searchsorted(np.asarray(bins), times, side="right") - 1
    return np.clip(index, 0, len(bins) - 2).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Tables


def read_signatures(path: str | Path) -> dict[str, list[str]]:
    """Signature groups {group: [gene, ...]} in file order, from a long or wide CSV."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "a signatures CSV (group,gene rows or one column per group)", "no such file")
    table = pd.read_csv(path, dtype=str)
    groups: dict[str, list[str]] = {}
    if {"group", "gene"} <= set(table.columns):
        for group, gene in zip(table["group"], table["gene"]):
            if isinstance(group, str) and isinstance(gene, str):
                groups.setdefault(group.strip(), []).append(gene.strip())
    else:
        for column in table.columns:
            genes = [g.strip() for g in table[column].dropna() if g.strip()]
            if genes:
                groups[column.strip()] = genes
    if not groups:
        raise InputError(path, "group", "at least one signature group with genes", "none")
    return {group: list(dict.fromkeys(genes)) for group, genes in groups.items()}


@dataclasses.dataclass
class Cohort:
    """One entry per patient (n patients), in the clinical CSV's order of first appearance."""

    case_ids: list[str]
    slide_ids: list[list[str]]
    survival_months: np.ndarray  # (n,) float, months
    censored: np.ndarray  # (n,) bool, True = censored (alive at last follow-up)
    omics: dict[str, np.ndarray]  # group → (n, n_features_in_group) float32
    omic_columns: dict[str, list[str]]  # group → the clinical columns in that group
    source: Path | None = None

    @property
    def events(self) -> np.ndarray:
        """(n,) bool, True where death was observed."""
        return ~self.censored

    def __len__(self) -> int:
        return len(self.case_ids)


def _group_columns(columns: Sequence[str], genes: Sequence[str]) -> list[str]:
    wanted = set(genes)
    return [c for c in columns if c not in REQUIRED_COLUMNS and (c in wanted or c.split("_")[0] in wanted)]


def read_clinical(path: str | Path, signatures: dict[str, list[str]]) -> Cohort:
    """Clinical CSV → Cohort, with omic columns grouped by `signatures` (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "a clinical CSV with " + ", ".join(REQUIRED_COLUMNS), "no such file")
    table = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, ",".join(missing), "columns " + ", ".join(REQUIRED_COLUMNS), list(table.columns)[:8])
    for column in ("case_id", "slide_id"):
        if table[column].isna().any():
            raise InputError(path, column, "a value in every row", f"{int(table[column].isna().sum())} empty")
    for column in ("survival_months", "censorship"):
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any() or (values < 0).any():
            raise InputError(path, column, "non-negative numbers in every row", f"{table[column].head(3).tolist()}")
        table[column] = values
    if not table["censorship"].isin([0, 1]).all():
        raise InputError(
            path, "censorship", "0 (event observed) or 1 (censored)", sorted(table["censorship"].unique())[:5]
        )

    omic_columns = {group: _group_columns(list(table.columns), genes) for group, genes in signatures.items()}
    empty = [g for g, cols in omic_columns.items() if not cols]
    if empty:
        raise InputError(
            path,
            "omic columns",
            "at least one column (<gene> or <gene>_<suffix>) for every signature group",
            f"none for {empty}",
        )
    all_omics = sorted({c for cols in omic_columns.values() for c in cols})
    numeric = table[all_omics].apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any():
        bad = numeric.columns[numeric.isna().any()].tolist()
        raise InputError(path, ",".join(bad[:5]), "numeric omic values in every row", "empty or non-numeric cells")
    table[all_omics] = numeric

    per_patient = ["survival_months", "censorship", *all_omics]
    disagree = table.groupby("case_id", sort=False)[per_patient].nunique(dropna=False).max(axis=1) > 1
    if disagree.any():
        raise InputError(
            path,
            "case_id",
            "the same survival and omic values on all rows of a patient",
            f"differing rows for {disagree[disagree].index.tolist()[:5]}",
        )
    first = table.groupby("case_id", sort=False).first()
    slides = table.groupby("case_id", sort=False)["slide_id"].apply(
        lambda s: list(dict.fromkeys(x.strip() for v in s for x in v.split(";") if x.strip()))
    )
    case_ids = [str(c) for c in first.index]
    return Cohort(
        case_ids=case_ids,
        slide_ids=[slides[c] for c in first.index],
        survival_months=first["survival_months"].to_numpy(float),
        censored=first["censorship"].to_numpy().astype(bool),
        omics={g: first[cols].to_numpy(np.float32) for g, cols in omic_columns.items()},
        omic_columns=omic_columns,
        source=path,
    )


# ---------------------------------------------------------------------------------------------
# Patch bags and cell embeddings (files read by finetune.embed.io)


def load_bags(
    cohort: Cohort, embeddings_dir: str | Path, max_patches: int | None = 4096, seed: int = 0
) -> list[np.ndarray]:
    """One bag (n_patches_i, D) float32 per patient: all their slides' patches, seeded subsample."""
    rng = np.random.default_rng(seed)
    bags, dims = [], set()
    for slides in cohort.slide_ids:
        bag = np.concatenate([load_embedding_file(find_embedding_file(embeddings_dir, s)) for s in slides])
        if max_patches and len(bag) > max_patches:
            bag = bag[np.sort(rng.choice(len(bag), max_patches, replace=False))]
        bags.append(bag)
        dims.add(bag.shape[1])
    if len(dims) != 1:
        raise InputError(embeddings_dir, "embedding dimension", "the same D for every slide", sorted(dims))
    return bags


def read_cell_embeddings(path: str | Path, cohort: Cohort) -> np.ndarray:
    """Per-patient mean cell-encoder embedding (n, D_cell) float32, aligned to `cohort.case_ids`."""
    path = Path(path)
    if path.is_dir():
        means = []
        for slides in cohort.slide_ids:
            cells = np.concatenate([load_embedding_file(find_embedding_file(path, s)) for s in slides])
            means.append(cells.mean(axis=0))
        return np.stack(means).astype(np.float32)
    if not path.is_file():
        raise InputError(path, None, "a cell-embedding CSV/.npz or a folder of per-slide files", "no such file")
    if path.suffix == ".csv":
        table = pd.read_csv(path, dtype={"case_id": str})
        if "case_id" not in table.columns:
            raise InputError(
                path, "case_id", "a case_id column and one column per embedding dimension", list(table.columns)[:5]
            )
        ids = table["case_id"].tolist()
        vectors = table.drop(columns="case_id").to_numpy(np.float32)
        field = "columns"
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "case_ids" not in data or "embeddings" not in data:
                raise InputError(
                    path, "case_ids,embeddings", "arrays case_ids (n,) and embeddings (n, D)", list(data.keys())
                )
            ids, vectors = [str(c) for c in data["case_ids"]], data["embeddings"].astype(np.float32)
        field = "embeddings"
    else:
        raise InputError(path, None, "a .csv or .npz of per-patient cell embeddings", path.suffix)
    if not np.isfinite(vectors).all():
        raise InputError(path, field, "finite values", "NaN/inf")
    index = {c: i for i, c in enumerate(ids)}
    missing = [c for c in cohort.case_ids if c not in index]
    if missing:
        raise InputError(path, "case_id", "a row for every patient of the clinical CSV", f"missing {missing[:5]}")
    return vectors[[index[c] for c in cohort.case_ids]]


# ---------------------------------------------------------------------------------------------
# Cross-validation


def patient_folds(
    case_ids: Sequence[str], events, n_folds: int = 5, seed: int = 0, groups: Sequence[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds over patients, stratified by event status: [(train_idx, test_idx), ...].

    Indices refer to positions in `case_ids` (one per patient). Every patient is in exactly one
    test fold and never in the training set of the same fold (checked). With ``groups`` (e.g. the
    tissue source site, as TCGA studies split), a group's patients are all in one test fold.
    """
    case_ids = list(case_ids)
    if len(set(case_ids)) != len(case_ids):
        raise InputError(None, "case_id", "one entry per patient", "duplicates")
    events = np.asarray(events).astype(int)
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(case_ids)), events, np.asarray(groups))
    else:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
            np.zeros(len(case_ids)), events
        )
    folds = [(np.sort(tr), np.sort(te)) for tr, te in splits]
    seen = np.concatenate([te for _, te in folds])
    assert len(seen) == len(case_ids) and len(np.unique(seen)) == len(case_ids), "a patient in two test folds"
    for train, test in folds:
        assert not set(train) & set(test), "a patient in both train and test"
    return folds


__all__ = [
    "Cohort",
    "hazard_bins",
    "bin_index",
    "read_signatures",
    "read_clinical",
    "EMBEDDING_SUFFIXES",
    "load_embedding_file",
    "find_embedding_file",
    "load_bags",
    "read_cell_embeddings",
    "patient_folds",
]
