"""Survival prediction with MCAT on PAST embeddings: cross-validation, metrics, Kaplan–Meier.

`run_survival(cfg)` is the whole task (called by `launch/finetune.py survival --config ...`):

1. the cohort: a clinical CSV + signatures CSV + per-slide patch embeddings (+ optional
   per-patient mean cell embeddings), or, with `cohort.synthetic=true`, a synthetic cohort made
   by `finetune.synthetic_cohort.make_cohort` (optionally on top of real patch embeddings);
2. 5-fold cross-validation by patient (stratified on event status); in each fold the hazard
   bins are cut at the quartiles of the training patients' uncensored times and the omic
   (and cell) features are standardised with training statistics only;
3. each mode in `modes` — `pathology` (AMIL), `genomic` (SNN), `mcat`, `past_multi` (MCAT +
   the mean cell embedding token) — trained with Adam and the discrete-time NLL loss, for each
   image encoder in `data.image_embeddings` (a folder, or {encoder name: folder} to compare
   encoders as the PAST paper did: embeddings from any export or any timm model, made by
   `finetune.embed`);
4. Harrell's and Uno's C-index per fold and mean ± sd (printed), out-of-fold risks, and
   Kaplan–Meier curves of the high/low-risk groups with the log-rank p-value (PNG). A test
   patient is high-risk when their risk exceeds the median risk of that fold's training
   patients, so the threshold never sees the test fold and risks from different folds never
   need a common scale.

Outputs in `out_dir`: `config.yaml`, `fold_metrics.csv`, `summary.csv`, `metrics.json`,
`oof_risks.csv`, `paired_gains.csv` (fold-by-fold C-index gain of MCAT over each single modality and of
PAST-multi over MCAT), `kaplan_meier.png`, each written atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data_shards.atomic import atomic_path, write_json, save_png
from data_shards.config import save_config
from data_shards.errors import InputError

from .mcat import MCAT, nll_survival_loss, pad_bags
from .metrics import concordance_index, ipcw_concordance_index
from .survival_data import (Cohort, bin_index, hazard_bins, load_bags, patient_folds, read_cell_embeddings,
                            read_clinical, read_signatures)

log = logging.getLogger(__name__)

MODE_NAMES = {"pathology": "pathology only", "genomic": "genomic only", "mcat": "MCAT", "past_multi": "PAST-multi"}

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/finetune/survival",
    "seed": 0,
    "progress": True,
    "modes": ["pathology", "genomic", "mcat", "past_multi"],
    "data": {
        "clinical_csv": None,
        "signatures_csv": None,
        "image_embeddings": None,  # folder of <slide_id>.h5ad|.npz, or {encoder name: folder}
        "slides": {},  # {slide_id: whole-slide image}: embedded by every encoder in `encoders`
        "cell_embeddings": None,  # per-patient CSV/.npz, or a folder of per-slide cell embeddings
        "max_patches": 4096,  # per patient, seeded subsample
    },
    # Image encoders to compare, {name: finetune.encoders section}: {source: export, path} |
    # {source: timm, arch, kwargs, weights: local file} | {source: random, arch, kwargs}. Each embeds
    # the tissue tiles of data.slides (or of cohort.base_slide for the synthetic cohort).
    "encoders": {},
    "tiles": {"um_per_px": 0.5, "size_px": 224, "min_tissue_fraction": 0.5, "batch_size": 64, "which": "backbone"},
    "cohort": {  # synthetic demo cohort, written to cohort.out_dir and used instead of data.*
        "synthetic": False,
        "out_dir": None,  # default <out_dir>/cohort
        "n_patients": 80,
        "embedding_dim": 64,
        "cell_dim": 32,
        "image_effect": 1.0,
        "genomic_effect": 1.0,
        "cell_effect": 0.5,
        "censoring_fraction": 0.3,
        "base_slide": None,  # a real slide whose tiles, embedded by each of `encoders`, form the base bags
        "base_embeddings": None,  # or a folder/file of real patch embeddings to plant the risk direction on
        "base_cell_embeddings": None,  # a folder/file of real cell embeddings whose means form the cell tokens
        # or made here: the exported PAST cell encoder (export folder) over the cells of a shard manifest
        "base_cells": {"manifest": None, "cell_encoder": None, "which": "projected", "batch_size": 256},
        "encoder_name": "synthetic",  # the name of the image source when no encoder embeds a base slide
    },
    "model": {"dim": 256, "n_heads": 8, "n_layers": 2, "dropout": 0.25, "n_bins": 4},
    "train": {
        "n_folds": 5,
        "epochs": 20,
        "batch_size": 1,  # patients per forward pass (bags padded and masked)
        "grad_accumulation": 32,  # MCAT's gc: batches per optimiser step
        "lr": 2.0e-4,
        "weight_decay": 1.0e-5,
        "alpha": 0.0,  # up-weighting of the uncensored term of the NLL loss
        "device": "cpu",
        "threads": None,  # torch CPU threads while training (1 is fastest for the small demo models)
    },
}


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


def fold_tensors(cohort: Cohort, bags: Sequence[np.ndarray] | None, cells: np.ndarray | None,
                 train: np.ndarray) -> PatientTensors:
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


def build_model(mode: str, image_dim: int | None, group_sizes: Sequence[int], cell_dim: int | None,
                model_cfg: Mapping[str, Any]) -> MCAT:
    """`mode` in MODE_NAMES; past_multi is MCAT with the mean cell embedding as an extra token."""
    arch = "mcat" if mode == "past_multi" else mode
    return MCAT(image_dim=image_dim or 1, group_sizes=group_sizes, cell_dim=cell_dim if mode == "past_multi" else None,
                dim=int(model_cfg["dim"]), n_bins=int(model_cfg["n_bins"]), mode=arch,
                n_heads=int(model_cfg["n_heads"]), n_layers=int(model_cfg["n_layers"]),
                dropout=float(model_cfg["dropout"]))


def train_model(model: MCAT, data: PatientTensors, train: np.ndarray, labels: np.ndarray, censored: np.ndarray,
                train_cfg: Mapping[str, Any], seed: int, progress: bool = False) -> list[float]:
    """Adam on the NLL survival loss; returns the mean training loss of each epoch."""
    device = torch.device(train_cfg["device"])
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=float(train_cfg["lr"]),
                                 weight_decay=float(train_cfg["weight_decay"]))
    rng = np.random.default_rng(seed)
    batch_size, accumulation = int(train_cfg["batch_size"]), int(train_cfg["grad_accumulation"])
    labels_t = torch.from_numpy(labels).to(device)
    censored_t = torch.from_numpy(censored.astype(np.float32)).to(device)
    history = []
    for _ in tqdm(range(int(train_cfg["epochs"])), desc="epochs", leave=False, disable=not progress):
        order = rng.permutation(train)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        total = 0.0
        optimiser.zero_grad()
        for step, index in enumerate(batches, start=1):
            out = model(**_batch(data, index, model, device))
            loss = nll_survival_loss(out["hazards"], labels_t[index], censored_t[index], alpha=float(train_cfg["alpha"]))
            (loss / accumulation).backward()
            total += loss.item() * len(index)
            if step % accumulation == 0 or step == len(batches):
                optimiser.step()
                optimiser.zero_grad()
        history.append(total / len(train))
    return history


@torch.no_grad()
def predict_risk(model: MCAT, data: PatientTensors, index: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Risk −Σ_k S_k (n_index,) for the patients in `index`; higher = earlier event."""
    model.eval()
    device = next(model.parameters()).device
    risks = [model(**_batch(data, index[i:i + batch_size], model, device))["risk"].cpu()
             for i in range(0, len(index), batch_size)]
    return torch.cat(risks).numpy().astype(float)


# ---------------------------------------------------------------------------------------------
# Cross-validation


def cross_validate(cohort: Cohort, bags: Sequence[np.ndarray] | None, cells: np.ndarray | None, mode: str,
                   model_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], seed: int = 0,
                   progress: bool = False, folds: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
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
        fold_rows.append({
            "fold": fold, "n_train": len(train), "n_test": len(test), "n_events": int((~censored[test]).sum()),
            "harrell_c": concordance_index(times[test], ~censored[test], test_risk),
            "uno_c": ipcw_concordance_index(times[train], ~censored[train], times[test], ~censored[test], test_risk),
            "final_loss": history[-1] if history else float("nan"),
        })
        for i, risk in zip(test, test_risk):
            oof_rows.append({"case_id": cohort.case_ids[i], "fold": fold, "risk": float(risk),
                             "high_risk": bool(risk > threshold), "survival_months": float(times[i]),
                             "censorship": int(censored[i])})
    return pd.DataFrame(fold_rows), pd.DataFrame(oof_rows)


# ---------------------------------------------------------------------------------------------
# Kaplan–Meier


def logrank_p(oof: pd.DataFrame) -> float:
    """Log-rank p-value between the high- and low-risk groups (NaN when one group is empty)."""
    from lifelines.statistics import logrank_test

    high, low = oof[oof["high_risk"]], oof[~oof["high_risk"]]
    if len(high) == 0 or len(low) == 0:
        return float("nan")
    result = logrank_test(high["survival_months"], low["survival_months"],
                          event_observed_A=1 - high["censorship"], event_observed_B=1 - low["censorship"])
    return float(result.p_value)


def plot_kaplan_meier(oof_by_run: Mapping[str, pd.DataFrame], path: str | Path) -> Path:
    """One panel per run: Kaplan–Meier curves (lifelines) of the high/low-risk groups, log-rank p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    n = len(oof_by_run)
    cols = n if n <= 2 else 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, oof) in zip(axes.ravel(), oof_by_run.items()):
        for label, group, colour in (("low risk", ~oof["high_risk"], "tab:blue"), ("high risk", oof["high_risk"], "tab:red")):
            part = oof[group]
            if len(part):
                KaplanMeierFitter(label=f"{label} (n={len(part)})").fit(
                    part["survival_months"], 1 - part["censorship"]).plot_survival_function(
                    ax=ax, ci_show=True, color=colour, show_censors=True, censor_styles={"ms": 4})
        p = logrank_p(oof)
        ax.set_title(f"{name}\nlog-rank p = {p:.2g}" if np.isfinite(p) else f"{name}\nlog-rank p = n/a", fontsize=9)
        ax.set_xlabel("months")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return save_png(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------
# The task


def _summary_table(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    grouped = fold_metrics.groupby(["encoder", "mode"], sort=False)
    table = grouped.agg(harrell_mean=("harrell_c", "mean"), harrell_sd=("harrell_c", "std"),
                        uno_mean=("uno_c", "mean"), uno_sd=("uno_c", "std"), folds=("fold", "count")).reset_index()
    return table


# What each richer model adds over a simpler one, compared fold by fold on the same test patients: the
# spread of C over folds mostly reflects how hard each fold is, which a paired difference cancels.
PAIRED_COMPARISONS = (("mcat", "pathology"), ("mcat", "genomic"), ("past_multi", "mcat"))


def paired_gains(fold_metrics: pd.DataFrame) -> pd.DataFrame:
    """Per encoder: Harrell C of `better` minus `base` in each fold, mean ± sd, and the folds it wins."""
    rows = []
    for encoder in [e for e in fold_metrics["encoder"].unique() if e != "-"]:
        for better, base in PAIRED_COMPARISONS:
            def c_by_fold(mode: str) -> pd.Series:
                owner = "-" if mode == "genomic" else encoder
                picked = fold_metrics[(fold_metrics["encoder"] == owner) & (fold_metrics["mode"] == mode)]
                return picked.set_index("fold")["harrell_c"]

            a, b = c_by_fold(better), c_by_fold(base)
            common = a.index.intersection(b.index)
            if len(common) == 0:
                continue
            diff = (a[common] - b[common]).to_numpy()
            rows.append({"encoder": encoder, "comparison": f"{MODE_NAMES[better]} − {MODE_NAMES[base]}",
                         "mean_gain": float(diff.mean()), "sd_gain": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                         "folds_won": int((diff > 0).sum()), "folds": int(len(diff))})
    return pd.DataFrame(rows, columns=["encoder", "comparison", "mean_gain", "sd_gain", "folds_won", "folds"])


def _format_table(summary: pd.DataFrame, p_values: Mapping[tuple[str, str], float]) -> str:
    lines = [f"{'encoder':<14} {'mode':<15} {'Harrell C':>15} {'Uno C':>15} {'log-rank p':>11}"]
    for row in summary.itertuples():
        p = p_values.get((row.encoder, row.mode), float("nan"))
        lines.append(f"{row.encoder:<14} {MODE_NAMES[row.mode]:<15} "
                     f"{row.harrell_mean:>7.3f} ± {row.harrell_sd:<5.3f} {row.uno_mean:>7.3f} ± {row.uno_sd:<5.3f} "
                     f"{p:>11.2g}")
    return "\n".join(lines)


def _image_sources(data_cfg: Mapping[str, Any]) -> dict[str, str]:
    sources = data_cfg.get("image_embeddings")
    if sources is None:
        return {}
    if isinstance(sources, (str, Path)):
        return {Path(sources).parent.name or "image": str(sources)}
    return {str(k): str(v) for k, v in dict(sources).items()}


def embed_with_encoders(cfg: DictConfig, slides: Mapping[str, str], out_folder: Path) -> dict[str, str]:
    """Embed the tissue tiles of `slides` ({slide_id: path}) with every encoder of `cfg.encoders`.

    Writes `<out_folder>/<encoder name>/<slide_id>.h5ad` (finetune.embed's format) and returns
    {encoder name: folder}.
    """
    from .embed import embed_slide_tiles
    from .encoders import load_encoder

    for slide_id, path in slides.items():
        if not Path(path).is_file():
            raise InputError(path, f"slide {slide_id}", "an existing whole-slide image", "no such file")
    folders = {}
    for name, encoder_cfg in cfg.encoders.items():
        encoder = load_encoder(OmegaConf.to_container(encoder_cfg, resolve=True), seed=int(cfg.seed),
                               device=cfg.train.device)
        folder = out_folder / str(name)
        for slide_id, path in slides.items():
            embed_slide_tiles(encoder, path, folder / f"{slide_id}.h5ad", tile_um_per_px=float(cfg.tiles.um_per_px),
                              tile_px=int(cfg.tiles.size_px), min_tissue_fraction=float(cfg.tiles.min_tissue_fraction),
                              batch_size=int(cfg.tiles.batch_size), which=str(cfg.tiles.which), slide_id=str(slide_id),
                              progress=bool(cfg.progress))
        folders[str(name)] = str(folder)
    return folders


def embed_base_cells(base_cells: DictConfig, out_folder: Path, device: str, progress: bool) -> str:
    """Embed the cells of a shard manifest with an exported PAST cell encoder; the folder of per-slide files."""
    from pretrain.export import load_cell_encoder

    from .embed_cells import embed_cells
    from .encoders import resolve_device

    for key in ("manifest", "cell_encoder"):
        if not Path(base_cells[key]).exists():
            raise InputError(base_cells[key], f"cohort.base_cells.{key}", "an existing path", "no such file")
    encoder = load_cell_encoder(base_cells.cell_encoder, device=resolve_device(device))
    embed_cells(encoder, base_cells.manifest, out_folder, int(base_cells.batch_size), str(base_cells.which), progress)
    return str(out_folder)


def _prepare_synthetic(cfg: DictConfig, out_dir: Path) -> None:
    """Make the synthetic cohort, once per image encoder when a base slide is embedded by several."""
    from .synthetic_cohort import make_cohort

    c = cfg.cohort
    cohort_dir = Path(c.out_dir) if c.out_dir else out_dir / "cohort"
    if c.base_slide and cfg.encoders:
        bases = embed_with_encoders(cfg, {"base": c.base_slide}, out_dir / "base_tiles")
    else:
        bases = {str(c.encoder_name): c.base_embeddings}
    base_cells = c.base_cell_embeddings
    if c.base_cells.manifest and c.base_cells.cell_encoder:
        base_cells = embed_base_cells(c.base_cells, out_dir / "base_cells", cfg.train.device, bool(cfg.progress))
    made = {name: make_cohort(cohort_dir / name, n_patients=int(c.n_patients), embedding_dim=int(c.embedding_dim),
                              cell_dim=int(c.cell_dim), seed=int(cfg.seed), image_effect=float(c.image_effect),
                              genomic_effect=float(c.genomic_effect), cell_effect=float(c.cell_effect),
                              censoring_fraction=float(c.censoring_fraction), base_embeddings=base,
                              base_cell_embeddings=base_cells)
            for name, base in bases.items()}
    first = next(iter(made.values()))  # the clinical tables are identical across encoders (one RNG stream)
    cfg.data.clinical_csv = str(first["clinical_csv"])
    cfg.data.signatures_csv = str(first["signatures_csv"])
    cfg.data.image_embeddings = {name: str(m["embeddings_dir"]) for name, m in made.items()}
    cfg.data.cell_embeddings = str(first["cell_embeddings"])


def run_survival(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """Cross-validated survival for every mode × image encoder; see the module docstring.

    Returns {"out_dir", "summary" (DataFrame), "fold_metrics" (DataFrame), "oof_risks"
    (DataFrame), "logrank_p" {run name: p}, "kaplan_meier_png", "table" (the printed text)}.
    """
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg)))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = list(cfg.modes)
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise InputError(None, "modes", "a non-empty list of " + ", ".join(MODE_NAMES), unknown or modes)
    if cfg.cohort.synthetic:
        _prepare_synthetic(cfg, out_dir)
    for key in ("clinical_csv", "signatures_csv"):
        if not cfg.data[key]:
            raise InputError(None, f"data.{key}", "a path (or cohort.synthetic=true)", None)

    # Read and check every input before training anything.
    cohort = read_clinical(cfg.data.clinical_csv, read_signatures(cfg.data.signatures_csv))
    image_sources = _image_sources(cfg.data)
    if cfg.data.slides and not cfg.cohort.synthetic:
        if not cfg.encoders:
            raise InputError(None, "encoders", "at least one image encoder to embed data.slides with", "none")
        image_sources.update(embed_with_encoders(cfg, cfg.data.slides, out_dir / "embeddings"))
    if any(m in modes for m in ("pathology", "mcat", "past_multi")) and not image_sources:
        raise InputError(None, "data.image_embeddings", "a folder of per-slide embeddings (or {encoder: folder})", None)
    bags = {name: load_bags(cohort, folder, cfg.data.max_patches, int(cfg.seed)) for name, folder in image_sources.items()}
    cells = read_cell_embeddings(cfg.data.cell_embeddings, cohort) if cfg.data.cell_embeddings else None
    if "past_multi" in modes and cells is None:
        log.warning("no data.cell_embeddings: skipping PAST-multi")
        modes.remove("past_multi")
    save_config(cfg, out_dir / "config.yaml")
    log.info("survival: %d patients (%d events), %d omic groups, encoders %s, modes %s", len(cohort),
             int(cohort.events.sum()), len(cohort.omics), list(image_sources), modes)

    with torch_threads(cfg.train.threads):
        result = _run_all(cfg, cohort, image_sources, bags, cells, modes, out_dir)
    return result


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Temporarily set torch's intra-op threads; tiny models run fastest on one."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_all(cfg: DictConfig, cohort: Cohort, image_sources: Mapping[str, str], bags: Mapping[str, list],
             cells: np.ndarray | None, modes: list[str], out_dir: Path) -> dict:
    folds = patient_folds(cohort.case_ids, cohort.events, int(cfg.train.n_folds), int(cfg.seed))
    runs = [("-", m) if m == "genomic" else (enc, m) for m in modes for enc in (image_sources or {"-": None})]
    runs = list(dict.fromkeys(runs))  # the genomic-only model does not depend on the encoder
    all_folds, all_oof, p_values = [], [], {}
    for encoder, mode in tqdm(runs, desc="survival runs", disable=not cfg.progress):
        fold_metrics, oof = cross_validate(cohort, bags.get(encoder), cells, mode, cfg.model, cfg.train,
                                           int(cfg.seed), progress=False, folds=folds)
        fold_metrics.insert(0, "mode", mode)
        fold_metrics.insert(0, "encoder", encoder)
        oof.insert(0, "mode", mode)
        oof.insert(0, "encoder", encoder)
        p_values[(encoder, mode)] = logrank_p(oof)
        all_folds.append(fold_metrics)
        all_oof.append(oof)
        log.info("%s / %s: Harrell C %.3f ± %.3f", encoder, MODE_NAMES[mode], fold_metrics["harrell_c"].mean(),
                 fold_metrics["harrell_c"].std())
    fold_metrics = pd.concat(all_folds, ignore_index=True)
    oof_risks = pd.concat(all_oof, ignore_index=True)
    summary = _summary_table(fold_metrics)
    summary["logrank_p"] = [p_values[(e, m)] for e, m in zip(summary["encoder"], summary["mode"])]
    gains = paired_gains(fold_metrics)

    def _run_name(encoder: str, mode: str) -> str:
        return MODE_NAMES[mode] if encoder == "-" or len(image_sources) <= 1 else f"{MODE_NAMES[mode]} · {encoder}"

    km_path = plot_kaplan_meier({_run_name(e, m): oof_risks[(oof_risks["encoder"] == e) & (oof_risks["mode"] == m)]
                                 for e, m in runs}, out_dir / "kaplan_meier.png")
    for name, frame in (("fold_metrics.csv", fold_metrics), ("summary.csv", summary), ("oof_risks.csv", oof_risks),
                        ("paired_gains.csv", gains)):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    clean = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v  # noqa: E731
    write_json(out_dir / "metrics.json", {
        "n_patients": len(cohort), "n_events": int(cohort.events.sum()), "n_folds": len(folds),
        "summary": [{k: clean(v) for k, v in row.items()} for row in summary.to_dict(orient="records")],
        "folds": [{k: clean(v) for k, v in row.items()} for row in fold_metrics.to_dict(orient="records")],
        "paired_gains": [{k: clean(v) for k, v in row.items()} for row in gains.to_dict(orient="records")],
    })

    fold_table = fold_metrics.assign(mode=fold_metrics["mode"].map(MODE_NAMES))[
        ["encoder", "mode", "fold", "n_test", "n_events", "harrell_c", "uno_c"]]
    table = _format_table(summary, p_values)
    print(f"\nSurvival, {len(folds)}-fold CV by patient ({len(cohort)} patients, {int(cohort.events.sum())} events)")
    print("\nPer fold:\n" + fold_table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("\nMean ± sd over folds:\n" + table)
    if len(gains):
        print("\nPaired gain in Harrell C, fold by fold on the same test patients (mean ± sd, folds won):")
        for row in gains.itertuples():
            print(f"  {row.encoder:<12} {row.comparison:<30} {row.mean_gain:+.3f} ± {row.sd_gain:.3f}   "
                  f"{row.folds_won}/{row.folds}")
    print(f"\nKaplan–Meier: {km_path}\nOutputs: {out_dir}\n")
    return {"out_dir": out_dir, "summary": summary, "fold_metrics": fold_metrics, "oof_risks": oof_risks,
            "logrank_p": {_run_name(e, m): p for (e, m), p in p_values.items()}, "kaplan_meier_png": km_path,
            "table": table, "paired_gains": gains}


__all__ = ["DEFAULTS", "MODE_NAMES", "run_survival", "torch_threads", "embed_with_encoders", "cross_validate", "train_model", "predict_risk",
           "build_model", "fold_tensors", "logrank_p", "plot_kaplan_meier"]
