"""Single-cell gene-expression prediction from H&E crops (PAST paper, "Single-cell gene expression prediction").

A linear head of width n_genes on the image encoder's pooled backbone feature predicts each cell's
log-normalised expression (``normalize_total`` to 10,000 counts per cell, then ``log1p``, over the
whole panel of the slide's Xenium bundle).

Data: the cells of a shard manifest (crop + sample json) joined by (slide, cell_id) to the counts of
each slide's Xenium bundle (the manifest's ``slides[...].bundle``, or ``data.bundles`` in the config).

Settings (``setting``; see :mod:`finetune.splits`): ``intra`` held-out spatial blocks of each slide,
``inter`` held-out patients (meta ``patient``), ``cross`` held-out cancer types (meta ``cancer_type``).

Genes (``genes.<setting>``): an explicit list (or a file of one gene per line); when null, the
``genes.n_top`` (default 50) most highly variable genes of the training cells (scanpy, Seurat flavour),
restricted to the genes every slide measured. (We could not confirm the paper's exact per-setting
lists; put them in the config when you have them.)

Modes (``modes``): ``linear_probe``: frozen encoder, embeddings computed once, ridge regression
(closed form, regularisation by generalised cross-validation on the training cells);
``finetune``: encoder and head trained end to end (AdamW, MSE on per-gene standardised targets, the
head initialised from the ridge solution, random dihedral flips/rotations).

Baseline (``baseline: random``): the same head and modes on the same architecture with random
weights (``finetune.encoders.random_like``).

Outputs in ``out_dir`` (the folder appears complete or not at all): ``config.yaml`` (resolved),
``metrics.json``, ``per_gene.csv`` (Pearson r per gene and run), ``predictions.h5ad`` (obs = test
cells with slide, cell_id, x_um, y_um, he_x_px, he_y_px, meta and Leiden labels; X = predicted
log-expression of the main run; ``layers["measured"]`` and ``layers["pred_<run>"]`` for every run;
var = genes with their r per run), ``spatial_<gene>.png`` (measured vs predicted maps),
``linear_head.safetensors`` + ``linear_head.json`` (the main encoder's probe as an ``nn.Linear`` on
raw backbone features, with its gene names).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from data_shards.atomic import atomic_dir, write_json
from data_shards.config import save_config
from data_shards.errors import InputError
from data_shards.manifest import load_manifest

from .embed import decode_jpeg, embed_images, read_shard_cells
from .encoders import ImageEncoder, load_encoder, random_like
from .gene_eval import cluster_agreement, gene_table, leiden_backend, plot_spatial_maps, summarise_pearson
from .splits import SETTINGS, split_cells

log = logging.getLogger(__name__)

MODES = ("linear_probe", "finetune")
GENES_DEFAULTS: dict[str, Any] = {
    "out_dir": None,
    "seed": 0,
    "progress": True,
    "device": "auto",  # auto (a CUDA GPU when present) | cpu | cuda | cuda:<index>
    "data": {"manifest": None, "bundles": {}},
    "encoder": {"source": "export", "path": None, "arch": None, "kwargs": {}, "weights": None},
    "baseline": "random",  # "random" (same architecture, random weights) or "none"
    "setting": "intra",
    "split": {"test_fraction": 0.2, "test_groups": None, "intra_by": "blocks", "n_blocks": 5, "gap_um": None},
    "genes": {"intra": None, "inter": None, "cross": None, "n_top": 50},
    "modes": ["linear_probe"],
    "embed": {"batch_size": 64},
    "linear_probe": {"alphas": [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]},
    "finetune": {"epochs": 2, "batch_size": 32, "lr_backbone": 1.0e-5, "lr_head": 1.0e-3, "weight_decay": 0.01,
                 "augment": True},
    "clustering": {"n_pcs": 20, "n_neighbors": 15, "resolution": 1.0},
    "figure": {"genes": None},  # genes to map; null: the best-predicted gene of the main run
}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class CellData:
    """Cells of the shards, their crops and measured expression, row-aligned."""

    obs: pd.DataFrame  # (n_cells, ...) sample json: slide, cell_id, x_um, y_um, he_x_px, he_y_px, meta
    jpegs: list[bytes]  # (n_cells,) the 224 px H&E crops as JPEG
    expression: anndata.AnnData  # (n_cells, n_genes) log-normalised, genes shared by every slide
    manifest_path: Path


def log_normalise(adata: anndata.AnnData, target_sum: float = 1e4) -> anndata.AnnData:
    """Counts → log1p(counts / cell total × ``target_sum``) (scanpy), as float32; a new AnnData."""
    import scanpy as sc

    out = anndata.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32), obs=pd.DataFrame(index=adata.obs_names),
                          var=pd.DataFrame(index=adata.var_names))
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def resolve_bundle(slide: str, manifest: Mapping[str, Any], overrides: Mapping[str, str] | None = None) -> Path:
    """The slide's Xenium bundle: ``overrides[slide]``, else the manifest's path (absolute, relative to
    the working folder, or relative to the shard folder and its parents)."""
    manifest_file = Path(manifest["root"]) / "manifest.json"
    if overrides and slide in overrides:
        path = Path(overrides[slide])
        if not path.is_dir():
            raise InputError(path, f"data.bundles.{slide}", "an existing Xenium bundle folder", "no such folder")
        return path
    entry = (manifest.get("slides") or {}).get(slide) or {}
    recorded = entry.get("bundle")
    if not recorded:
        raise InputError(manifest_file, f"slides.{slide}.bundle", "the slide's Xenium bundle (or data.bundles in the "
                         "config)", "missing")
    recorded = Path(recorded)
    root = Path(manifest["root"]).resolve()
    candidates = [recorded] if recorded.is_absolute() else [recorded, *(base / recorded for base in [root, *root.parents][:4])]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InputError(manifest_file, f"slides.{slide}.bundle", "an existing Xenium bundle folder (set data.bundles."
                     f"{slide} if it moved)", str(recorded))


def load_cell_data(manifest_path: str | Path, bundles: Mapping[str, str] | None = None, progress: bool = True) -> CellData:
    """Shard cells joined by (slide, cell_id) to the log-normalised expression of their bundles."""
    from data_shards.xenium import read_xenium

    manifest = load_manifest(manifest_path)
    manifest_file = Path(manifest["root"]) / "manifest.json"
    matrix = (manifest.get("config") or {}).get("matrix", "auto")
    min_qv = float((manifest.get("config") or {}).get("min_qv", 20.0))
    obs, jpegs = read_shard_cells(manifest_file, progress=progress)
    per_slide: list[anndata.AnnData] = []
    rows: list[np.ndarray] = []
    for slide in pd.unique(obs["slide"]):
        bundle = resolve_bundle(slide, manifest, bundles)
        expression = log_normalise(read_xenium(bundle, matrix=matrix, min_qv=min_qv))
        slide_rows = np.flatnonzero((obs["slide"] == slide).to_numpy())
        cell_ids = obs["cell_id"].to_numpy()[slide_rows]
        missing = ~pd.Index(cell_ids).isin(expression.obs_names)
        if missing.any():
            raise InputError(bundle, "cell_id", f"every shard cell of slide '{slide}' among the bundle's cells",
                             f"{int(missing.sum())} missing, e.g. {cell_ids[missing][0]!r}")
        per_slide.append(expression[cell_ids])
        rows.append(slide_rows)
    shared = list(per_slide[0].var_names)
    for expression in per_slide[1:]:
        present = set(expression.var_names)
        shared = [g for g in shared if g in present]
    if not shared:
        raise InputError(manifest_file, "slides", "bundles sharing at least one gene", "no gene common to all slides")
    order = np.concatenate(rows)
    matrix_rows = sp.vstack([e[:, shared].X for e in per_slide]).tocsr()
    # Put expression rows back in the cell table's order.
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    expression = anndata.AnnData(X=matrix_rows[inverse], obs=pd.DataFrame(index=obs.index.astype(str)),
                                 var=pd.DataFrame(index=shared))
    log.info("%d cells from %d slides, %d genes shared by every bundle", len(obs), len(per_slide), len(shared))
    return CellData(obs=obs, jpegs=jpegs, expression=expression, manifest_path=manifest_file)


def select_genes(train_expression: anndata.AnnData, setting: str, genes_cfg: Mapping[str, Any]) -> tuple[list[str], str]:
    """The genes to predict for ``setting``: the configured list, or the top-N HVGs of the training cells."""
    import scanpy as sc

    chosen = genes_cfg.get(setting)
    available = list(train_expression.var_names)
    if chosen:
        if isinstance(chosen, str):
            path = Path(chosen)
            if not path.is_file():
                raise InputError(path, f"genes.{setting}", "a list of genes or a file with one gene per line", "no such file")
            chosen = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        chosen = [str(g) for g in chosen]
        missing = [g for g in chosen if g not in set(available)]
        if missing:
            raise InputError(None, f"genes.{setting}", "genes measured in every slide's bundle",
                             f"{len(missing)} unknown, e.g. {missing[:5]}")
        return list(dict.fromkeys(chosen)), "configured list"
    n_top = int(genes_cfg.get("n_top") or 50)
    if n_top < 1:
        raise InputError(None, "genes.n_top", "a positive number of genes", n_top)
    variable = np.asarray(train_expression.X.toarray().std(axis=0) if sp.issparse(train_expression.X)
                          else train_expression.X.std(axis=0)) > 0
    candidates = train_expression[:, variable].copy()
    if candidates.n_vars == 0:
        raise InputError(None, "genes", "genes that vary across training cells", "every gene is constant")
    if candidates.n_vars <= n_top:
        return list(candidates.var_names), f"all {candidates.n_vars} variable genes (fewer than n_top={n_top})"
    sc.pp.highly_variable_genes(candidates, n_top_genes=n_top, flavor="seurat")
    table = candidates.var.sort_values("dispersions_norm", ascending=False)
    selected = [g for g in table.index[table["highly_variable"]]][:n_top]
    return selected, f"top {n_top} highly variable genes of the training cells (scanpy, seurat flavour)"


# ---------------------------------------------------------------------------------------------
# Heads


@dataclass
class LinearHead:
    """y (n, n_genes) = x (n, n_features) @ weight.T + bias, on raw (unstandardised) features."""

    weight: np.ndarray  # (n_genes, n_features)
    bias: np.ndarray  # (n_genes,)
    alpha: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (features @ self.weight.T + self.bias).astype(np.float32)

    def as_module(self) -> nn.Linear:
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.weight.astype(np.float32)))
            linear.bias.copy_(torch.from_numpy(self.bias.astype(np.float32)))
        return linear


def fit_linear_probe(features: np.ndarray, targets: np.ndarray, alphas: Sequence[float] = (1.0, 10.0, 100.0)) -> LinearHead:
    """Ridge regression of (n, n_genes) targets on (n, n_features) standardised features.

    One regularisation strength for all genes, chosen by efficient leave-one-out (generalised)
    cross-validation on these cells; the standardisation is folded into the returned weights.
    """
    from sklearn.linear_model import RidgeCV

    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    ridge = RidgeCV(alphas=np.asarray(list(alphas), dtype=float)).fit((features - mean) / scale, targets)
    coef = np.atleast_2d(ridge.coef_) / scale  # (n_genes, n_features) on raw features
    bias = np.atleast_1d(ridge.intercept_) - coef @ mean
    return LinearHead(weight=coef, bias=bias, alpha=float(ridge.alpha_))


def _dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/rotations of a (H, W, 3) crop: histology has no preferred orientation."""
    image = np.rot90(image, k=int(rng.integers(4)))
    return np.ascontiguousarray(image[:, ::-1] if rng.integers(2) else image)


def finetune_end_to_end(encoder: ImageEncoder, head: LinearHead, jpegs: Sequence[bytes], targets: np.ndarray,
                        train_rows: np.ndarray, cfg: Mapping[str, Any], seed: int = 0, progress: bool = True,
                        desc: str = "finetune") -> tuple[ImageEncoder, nn.Linear, list[float]]:
    """Train a copy of ``encoder`` with a linear head (initialised from ``head``) on the training cells.

    Loss: mean squared error of per-gene standardised log-expression, so every gene counts the
    same (as in the mean-over-genes Pearson the task reports). Returns (encoder, head, epoch losses).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(encoder).train()
    device = model.mean.device
    linear = head.as_module().to(device).train()
    y = torch.from_numpy(targets.astype(np.float32)).to(device)  # (n_cells, n_genes)
    y_sd = y[train_rows].std(dim=0).clamp_min(1e-3)  # (n_genes,)
    optimiser = torch.optim.AdamW([
        {"params": model.backbone.parameters(), "lr": float(cfg["lr_backbone"])},
        {"params": linear.parameters(), "lr": float(cfg["lr_head"])},
    ], weight_decay=float(cfg["weight_decay"]))
    batch_size, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
    losses = []
    n_steps = epochs * int(np.ceil(len(train_rows) / batch_size))
    with tqdm(total=n_steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = rng.permutation(train_rows)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                images = [decode_jpeg(jpegs[i]) for i in rows]
                if cfg.get("augment", True):
                    images = [_dihedral(image, rng) for image in images]
                x = model.preprocess(np.stack(images))  # (B, 3, h, w)
                predicted = linear(model.features(x))  # (B, n_genes)
                loss = (((predicted - y[torch.from_numpy(rows).to(device)]) / y_sd) ** 2).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(rows)
                count += len(rows)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            losses.append(total / max(count, 1))
    return model.eval(), linear.eval(), losses


# ---------------------------------------------------------------------------------------------
# The task


def _validate(cfg: DictConfig) -> None:
    if not cfg.out_dir:
        raise InputError(None, "out_dir", "a folder for the results", cfg.out_dir)
    if not cfg.data.manifest:
        raise InputError(None, "data.manifest", "the shard manifest (or its folder)", cfg.data.manifest)
    if cfg.setting not in SETTINGS:
        raise InputError(None, "setting", f"one of {SETTINGS}", cfg.setting)
    modes = list(cfg.modes)
    if not modes or any(m not in MODES for m in modes):
        raise InputError(None, "modes", f"a non-empty list of {MODES}", modes)
    if cfg.baseline not in ("random", "none", None):
        raise InputError(None, "baseline", "'random' or 'none'", cfg.baseline)


def _crop_width_um(obs: pd.DataFrame, jpegs: Sequence[bytes]) -> float:
    """Side of one crop in µm (pixels × crop_um_per_px), the default gap between train and test."""
    if "crop_um_per_px" not in obs.columns or not len(jpegs):
        return 0.0
    width_px = decode_jpeg(jpegs[0]).shape[1]
    return float(width_px * pd.to_numeric(obs["crop_um_per_px"], errors="coerce").median())


def _run_mode(mode: str, encoder: ImageEncoder, data: CellData, targets: np.ndarray, split, cfg: DictConfig,
              features: np.ndarray, probe: LinearHead, name: str) -> tuple[np.ndarray, dict]:
    """Predicted log-expression (n_test, n_genes) of the test cells and facts about the fit."""
    if mode == "linear_probe":
        return probe.predict(features[split.test]), {"alpha": probe.alpha}
    started = time.perf_counter()
    tuned, linear, losses = finetune_end_to_end(
        encoder, probe, data.jpegs, targets, split.train, OmegaConf.to_container(cfg.finetune, resolve=True),
        seed=int(cfg.seed), progress=bool(cfg.progress), desc=f"finetune {name}")
    test_features = embed_images(tuned, (data.jpegs[i] for i in split.test), len(split.test),
                                 int(cfg.embed.batch_size), "backbone", bool(cfg.progress), desc=f"embed test {name}")
    with torch.no_grad():
        predicted = linear(torch.from_numpy(test_features).to(tuned.mean.device)).cpu().numpy()
    return predicted.astype(np.float32), {"epoch_losses": losses, "seconds": round(time.perf_counter() - started, 1)}


def paired_gene_comparison(r_ours: np.ndarray, r_base: np.ndarray) -> dict:
    """Gene by gene: how many genes the encoder predicts better than the baseline, and a Wilcoxon signed-rank p.

    The mean r of two runs differs by little when both read colour and nucleus size; the paired test
    says whether the difference is consistent across genes or noise.
    """
    from scipy.stats import wilcoxon

    both = ~np.isnan(r_ours) & ~np.isnan(r_base)
    diff = r_ours[both] - r_base[both]
    p = float(wilcoxon(diff).pvalue) if np.count_nonzero(diff) >= 2 else float("nan")
    return {"genes_won": int((diff > 0).sum()), "genes_compared": int(both.sum()), "wilcoxon_p": p}


def format_table(results: Mapping[str, dict], header: str) -> str:
    lines = [header, f"{'run':<28} {'mean r':>7} {'median r':>9} {'r>0.3':>7} {'ARI clusters':>13} {'ARI transfer':>13}"]
    for name, r in results.items():
        lines.append(f"{name:<28} {r['mean_pearson']:>7.3f} {r['median_pearson']:>9.3f} "
                     f"{r['n_genes_r_above_0.3']:>3}/{r['n_genes_defined']:<3} {r['ari_clusters']:>13.3f} "
                     f"{r['ari_label_transfer']:>13.3f}")
    return "\n".join(lines)


def run_genes(cfg) -> dict:
    """``python launch/finetune.py genes --config ...``: train, evaluate, print and write (module docstring).

    Returns the metrics dict also written to ``metrics.json`` (plus ``out_dir`` and ``table``).
    """
    cfg = OmegaConf.merge(OmegaConf.create(GENES_DEFAULTS), cfg)
    _validate(cfg)
    seed, progress = int(cfg.seed), bool(cfg.progress)
    started = time.perf_counter()
    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=seed, device=cfg.device)
    # "random" names the baseline; an encoder under test that is itself random is "random_init".
    main_encoder = "random_init" if encoder.description.get("source") == "random" else "pretrained"
    encoders = {main_encoder: encoder}
    if cfg.baseline == "random":
        encoders["random"] = random_like(encoder, seed=seed + 1)
    data = load_cell_data(cfg.data.manifest, OmegaConf.to_container(cfg.data.bundles, resolve=True), progress)
    gap_um = cfg.split.gap_um if cfg.split.gap_um is not None else _crop_width_um(data.obs, data.jpegs)
    split = split_cells(
        data.obs, cfg.setting, test_fraction=float(cfg.split.test_fraction), seed=seed,
        test_groups=list(cfg.split.test_groups) if cfg.split.test_groups else None, intra_by=cfg.split.intra_by,
        n_blocks=int(cfg.split.n_blocks), gap_um=float(gap_um), source=data.manifest_path)
    genes, gene_rule = select_genes(data.expression[split.train], cfg.setting,
                                    OmegaConf.to_container(cfg.genes, resolve=True))
    targets = np.asarray(data.expression[:, genes].X.toarray(), dtype=np.float32)  # (n_cells, n_genes)
    measured = targets[split.test]  # (n_test, n_genes)
    log.info("%s: predicting %d genes (%s)", cfg.setting, len(genes), gene_rule)

    predictions: dict[str, np.ndarray] = {}
    fits: dict[str, dict] = {}
    probes: dict[str, LinearHead] = {}
    needed = np.union1d(split.train, split.test)
    for encoder_name, model in encoders.items():
        features = np.zeros((len(data.obs), model.num_features), dtype=np.float32)  # (n_cells, n_features)
        features[needed] = embed_images(model, (data.jpegs[i] for i in needed), len(needed), int(cfg.embed.batch_size),
                                        "backbone", progress, desc=f"embed {encoder_name}")
        probe = fit_linear_probe(features[split.train], targets[split.train], list(cfg.linear_probe.alphas))
        probes[encoder_name] = probe
        for mode in cfg.modes:
            name = f"{encoder_name}/{mode}"
            predictions[name], fits[name] = _run_mode(mode, model, data, targets, split, cfg, features, probe, name)

    table = gene_table(genes, measured, {k.replace("/", "_"): v for k, v in predictions.items()})
    results: dict[str, dict] = {}
    labels: dict[str, tuple] = {}
    for name, predicted in predictions.items():
        r = table[f"pearson_{name.replace('/', '_')}"].to_numpy()
        agreement, measured_labels, predicted_labels, transferred = cluster_agreement(
            measured, predicted, n_pcs=int(cfg.clustering.n_pcs), n_neighbors=int(cfg.clustering.n_neighbors),
            resolution=float(cfg.clustering.resolution), seed=seed)
        order = np.argsort(-np.nan_to_num(r, nan=-2.0))
        results[name] = {**summarise_pearson(r), **agreement, **fits[name],
                         "top_genes": {genes[i]: round(float(r[i]), 4) for i in order[:5]}}
        labels[name] = (measured_labels, predicted_labels, transferred)

    main = next(iter(predictions))
    comparison = {}
    if cfg.baseline == "random":
        for mode in cfg.modes:
            ours, base = results[f"{main_encoder}/{mode}"], results[f"random/{mode}"]
            delta = ours["mean_pearson"] - base["mean_pearson"]
            comparison[mode] = {"delta_mean_pearson": delta, "encoder_beats_random": bool(delta > 0),
                                **paired_gene_comparison(table[f"pearson_{main_encoder}_{mode}"].to_numpy(),
                                                         table[f"pearson_random_{mode}"].to_numpy())}
    main_r = table[f"pearson_{main.replace('/', '_')}"].to_numpy()
    figure_genes = list(cfg.figure.genes) if cfg.figure.genes else [genes[int(np.nanargmax(np.nan_to_num(main_r, nan=-2)))]]
    unknown = [g for g in figure_genes if g not in genes]
    if unknown:
        raise InputError(None, "figure.genes", "genes among those predicted", unknown)

    summary = {
        "setting": cfg.setting, "split": split.info, "genes": genes, "gene_selection": gene_rule,
        "n_cells": int(len(data.obs)), "n_train": int(len(split.train)), "n_test": int(len(split.test)),
        "encoder": encoder.description, "leiden_backend": leiden_backend(),
        "results": results, "comparison_with_random": comparison, "main_run": main,
        "figures": [f"spatial_{g}.png" for g in figure_genes], "seconds": None,
    }
    out_dir = Path(cfg.out_dir)
    with atomic_dir(out_dir) as tmp:
        save_config(cfg, tmp / "config.yaml")
        table.to_csv(tmp / "per_gene.csv", index=False, float_format="%.5f")
        _write_predictions(tmp / "predictions.h5ad", data, split, genes, measured, predictions, table, labels, main, summary)
        xy = data.obs[["x_um", "y_um"]].to_numpy(float)
        for gene in figure_genes:
            g = genes.index(gene)
            slides = data.obs["slide"].to_numpy()
            plot_spatial_maps(tmp / f"spatial_{gene}.png", xy[split.test], gene, measured[:, g],
                              {k: v[:, g] for k, v in predictions.items()},
                              {k: float(table[f"pearson_{k.replace('/', '_')}"].iloc[g]) for k in predictions},
                              slides=slides[split.test], context_xy_um=xy[split.train], context_slides=slides[split.train])
        _write_head(tmp, probes[main_encoder], genes, encoder)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write_json(tmp / "metrics.json", _finite(summary))

    header = (f"gene expression · setting {cfg.setting} · {len(genes)} genes ({gene_rule}) · "
              f"{len(split.train)} train / {len(split.test)} test cells · clustering {results[main]['clustering_method']}")
    text = format_table(results, header)
    top = ", ".join(f"{g} {r:.2f}" for g, r in results[main]["top_genes"].items())
    text += f"\nbest genes ({main}): {top}"
    for mode, c in comparison.items():
        verdict = "beats" if c["encoder_beats_random"] else "does NOT beat"
        text += (f"\n{mode}: encoder {verdict} the random-weight baseline (Δ mean r = {c['delta_mean_pearson']:+.3f}; "
                 f"better on {c['genes_won']}/{c['genes_compared']} genes, paired Wilcoxon p = {c['wilcoxon_p']:.2g})")
        if not c["encoder_beats_random"]:
            log.warning("%s: the encoder does not beat the random-weight baseline", mode)
    text += f"\nwritten to {out_dir}: metrics.json, per_gene.csv, predictions.h5ad, " + ", ".join(summary["figures"])
    print(text, flush=True)
    return {**summary, "out_dir": str(out_dir), "table": text}


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined correlations become null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_predictions(path: Path, data: CellData, split, genes: list[str], measured: np.ndarray,
                       predictions: Mapping[str, np.ndarray], table: pd.DataFrame, labels: Mapping[str, tuple],
                       main: str, summary: Mapping[str, Any]) -> None:
    obs = data.obs.iloc[split.test].copy()
    obs.index = pd.Index([f"{s}:{c}" for s, c in zip(obs["slide"], obs["cell_id"])], name="obs_id")
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = pd.Categorical(obs[column].map(lambda v: "" if v is None else str(v)))
    measured_labels = labels[main][0]
    obs["leiden_measured"] = pd.Categorical(measured_labels.astype(str))
    for name, (_, predicted_labels, transferred) in labels.items():
        key = name.replace("/", "_")
        obs[f"leiden_pred_{key}"] = pd.Categorical(predicted_labels.astype(str))
        obs[f"transferred_{key}"] = pd.Categorical(transferred.astype(str))
    var = table.set_index("gene")
    adata = anndata.AnnData(X=predictions[main].astype(np.float32), obs=obs, var=var)
    adata.layers["measured"] = measured.astype(np.float32)
    for name, predicted in predictions.items():
        adata.layers[f"pred_{name.replace('/', '_')}"] = predicted.astype(np.float32)
    adata.obsm["spatial"] = obs[["x_um", "y_um"]].to_numpy(float)  # (n_test, 2) µm, where scanpy's plots look
    adata.uns["gene_prediction"] = json.loads(json.dumps(_finite({
        k: summary[k] for k in ("setting", "gene_selection", "main_run", "encoder", "split")}), default=str))
    adata.uns["gene_prediction"]["X"] = f"predicted log-normalised expression ({main})"
    adata.write_h5ad(path)


def _write_head(folder: Path, probe: LinearHead, genes: list[str], encoder: ImageEncoder) -> None:
    from safetensors.torch import save_file

    module = probe.as_module()  # on the CPU
    weights = folder / "linear_head.safetensors"
    save_file({"weight": module.weight.detach().contiguous(), "bias": module.bias.detach().contiguous()}, str(weights))
    weights.chmod(0o644)  # safetensors creates its files private; the results folder is for sharing
    write_json(folder / "linear_head.json", {
        "input": "pooled backbone feature of the encoder below (raw, not standardised)",
        "output": "log1p(counts / cell total × 10,000) per gene",
        "in_features": int(probe.weight.shape[1]), "out_features": len(genes), "ridge_alpha": probe.alpha,
        "genes": genes, "encoder": json.loads(json.dumps(encoder.description, default=str)),
    })
