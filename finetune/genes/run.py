"""Single-cell gene-expression prediction from H&E crops (PAST paper, "Single-cell gene expression prediction").

``run_genes(cfg)`` is the whole task (``launch/finetune.py genes --config ...``; settings:
:class:`finetune.genes.config.GenesConfig`); data in :mod:`.data`, heads in :mod:`.model`, metrics and
maps in :mod:`.evaluate`, splits in :mod:`.splits`.

A linear head of width n_genes on the image encoder's pooled backbone feature predicts each cell's
log-normalised expression (``normalize_total`` to 10,000 counts per cell, then ``log1p``, over the
whole panel of the slide's Xenium bundle).

Data: the cells of a shard manifest (crop + sample json) joined by (slide, cell_id) to the counts of
each slide's Xenium bundle (the manifest's ``slides[...].bundle``, or ``data.bundles`` in the config).

Settings (``setting``; see :mod:`finetune.genes.splits`): ``intra`` held-out spatial blocks of each slide,
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

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from common.atomic import atomic_dir, write_json
from common.config import apply_schema, save_config
from common.errors import InputError
from data_shards.sample import decode_jpeg

from ..controls import block_bootstrap, difference, gate, interval, mean_and_sd, spatial_blocks, verdict
from ..embed import embed_images
from ..encoders import ImageEncoder, load_encoder, random_like
from ..metrics import pearson_per_gene
from ..report import Column, finite, format_table, write_metrics
from .config import GenesConfig
from .data import CellData, load_cell_data, select_genes
from .evaluate import (
    cluster_agreement,
    gene_table,
    leiden_backend,
    paired_gene_comparison,
    plot_spatial_maps,
    summarise_pearson,
)
from .model import LinearHead, finetune_end_to_end, fit_linear_probe
from .oracle import load_oracle
from .splits import SETTINGS, split_cells

log = logging.getLogger(__name__)

MODES = ("linear_probe", "finetune")


def _validate(cfg: DictConfig) -> None:
    """What the schema cannot say: required values and the allowed words."""
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


def _run_mode(
    mode: str,
    encoder: ImageEncoder,
    data: CellData,
    targets: np.ndarray,
    split,
    cfg: DictConfig,
    features: np.ndarray,
    probe: LinearHead,
    name: str,
) -> tuple[np.ndarray, dict]:
    """Predicted log-expression (n_test, n_genes) of the test cells and facts about the fit."""
    if mode == "linear_probe":
        return probe.predict(features[split.test]), {"alpha": probe.alpha}
    started = time.perf_counter()
    tuned, linear, losses = finetune_end_to_end(
        encoder,
        probe,
        data.jpegs,
        targets,
        split.train,
        OmegaConf.to_container(cfg.finetune, resolve=True),
        seed=int(cfg.seed),
        progress=bool(cfg.progress),
        desc=f"finetune {name}",
    )
    test_features = embed_images(
        tuned,
        (data.jpegs[i] for i in split.test),
        len(split.test),
        int(cfg.embed.batch_size),
        "backbone",
        bool(cfg.progress),
        desc=f"embed test {name}",
    )
    with torch.no_grad():
        predicted = linear(torch.from_numpy(test_features).to(tuned.mean.device)).cpu().numpy()
    return predicted.astype(np.float32), {"epoch_losses": losses, "seconds": round(time.perf_counter() - started, 1)}


def _controls(cfg, data: CellData, split, measured: np.ndarray, predictions, results, main_encoder: str) -> dict:
    """Bootstrap intervals of every run's mean r (paired: the same block resamples), the controls gate,
    and the encoder-vs-random-seeds verdicts; adds ``mean_pearson_ci`` to ``results`` in place."""
    xy = data.obs[["x_um", "y_um"]].to_numpy(float)[split.test]
    slides = data.obs["slide"].astype(str).to_numpy()[split.test]
    blocks = spatial_blocks(xy, slides, int(cfg.controls.n_blocks), seed=int(cfg.seed))
    replicates = {}
    for name, predicted in predictions.items():
        replicates[name] = block_bootstrap(
            lambda rows, p=predicted: float(np.nanmean(pearson_per_gene(p[rows], measured[rows]))),
            blocks,
            int(cfg.controls.n_boot),
            seed=int(cfg.seed),
        )
        results[name]["mean_pearson_ci"] = list(interval(replicates[name]))
    summary: dict = {"n_blocks": int(len(np.unique(blocks))), "n_boot": int(cfg.controls.n_boot)}
    lines, verdicts, versus = [], {}, {}
    randoms = [n for n in predictions if n.split("/")[0].startswith("random") and n.endswith("/linear_probe")]
    if randoms:
        values = {n: results[n]["mean_pearson"] for n in randoms}
        mean, sd = mean_and_sd(values)
        random_reps = np.mean([replicates[n] for n in randoms], axis=0)
        summary["random_linear_probe"] = {"seeds": len(randoms), "mean": mean, "sd": sd, "runs": values}
        lines.append(f"random encoders ({len(randoms)} seeds, linear probe): mean r {mean:.3f} ± {sd:.3f}")
        if "oracle/linear_probe" in predictions:
            shuffled = "oracle_shuffled/linear_probe"
            verdict_gate = gate(
                (results["oracle/linear_probe"]["mean_pearson"], replicates["oracle/linear_probe"]),
                (mean, random_reps),
                (results[shuffled]["mean_pearson"], replicates[shuffled]) if shuffled in predictions else None,
            )
            summary["gate"] = verdict_gate.as_dict()
            lines.append(verdict_gate.describe())
        ours = f"{main_encoder}/linear_probe"
        if ours in predictions:
            diff = difference(results[ours]["mean_pearson"] - mean, replicates[ours], random_reps)
            versus["linear_probe"] = {"versus_random_seeds": diff.as_dict()}
            verdicts["linear_probe"] = verdict(
                f"{main_encoder} encoder (mean r)", diff, f"{len(randoms)} random encoders"
            )
        for mode in cfg.modes:
            ours, base = f"{main_encoder}/{mode}", f"random/{mode}"
            if mode != "linear_probe" and ours in predictions and base in predictions:
                delta = results[ours]["mean_pearson"] - results[base]["mean_pearson"]
                diff = difference(delta, replicates[ours], replicates[base])
                versus[mode] = {"versus_random_seed_1": diff.as_dict()}
                verdicts[mode] = verdict(f"{main_encoder} encoder (mean r)", diff, "the random encoder")
    return {"summary": summary, "text": "\n".join(lines), "verdicts": verdicts, "versus_random": versus}


RESULT_COLUMNS = (
    Column("run", 28, "run", align="<"),
    Column("mean r", 7, "mean_pearson", ".3f"),
    Column("95% CI", 15, lambda r: "[{:.3f}, {:.3f}]".format(*r["mean_pearson_ci"]) if "mean_pearson_ci" in r else "–"),
    Column("median r", 9, "median_pearson", ".3f"),
    Column("r>0.3", 7, lambda r: f"{r['n_genes_r_above_0.3']:>3}/{r['n_genes_defined']:<3}"),
    Column("ARI clusters", 13, "ari_clusters", ".3f"),
    Column("ARI transfer", 13, "ari_label_transfer", ".3f"),
)


def format_results(results: Mapping[str, dict], header: str) -> str:
    """The printed table: ``header``, then one line per run (mean/median r, genes above 0.3, ARIs)."""
    rows = [{"run": name, **r} for name, r in results.items()]
    return format_table(rows, RESULT_COLUMNS, header=header, sep=" ", missing=None)


def run_genes(cfg) -> dict:
    """``python launch/finetune.py genes --config ...``: train, evaluate, print and write (module docstring).

    Returns the metrics dict also written to ``metrics.json`` (plus ``out_dir`` and ``table``).
    """
    cfg = apply_schema(GenesConfig, cfg)
    _validate(cfg)
    seed, progress = int(cfg.seed), bool(cfg.progress)
    started = time.perf_counter()
    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=seed, device=cfg.device)
    # "random" names the baseline; an encoder under test that is itself random is "random_init".
    main_encoder = "random_init" if encoder.description.get("source") == "random" else "pretrained"
    encoders = {main_encoder: encoder}
    if cfg.baseline == "random":
        for k in range(1, max(1, int(cfg.controls.random_seeds)) + 1):
            encoders["random" if k == 1 else f"random{k}"] = random_like(encoder, seed=seed + k)
    data = load_cell_data(cfg.data.manifest, OmegaConf.to_container(cfg.data.bundles, resolve=True), progress)
    gap_um = cfg.split.gap_um if cfg.split.gap_um is not None else _crop_width_um(data.obs, data.jpegs)
    split = split_cells(
        data.obs,
        cfg.setting,
        test_fraction=float(cfg.split.test_fraction),
        seed=seed,
        test_groups=list(cfg.split.test_groups) if cfg.split.test_groups else None,
        intra_by=cfg.split.intra_by,
        n_blocks=int(cfg.split.n_blocks),
        gap_um=float(gap_um),
        source=data.manifest_path,
    )
    genes, gene_rule = select_genes(
        data.expression[split.train], cfg.setting, OmegaConf.to_container(cfg.genes, resolve=True)
    )
    targets = np.asarray(data.expression[:, genes].X.toarray(), dtype=np.float32)  # (n_cells, n_genes)
    measured = targets[split.test]  # (n_test, n_genes)
    log.info("%s: predicting %d genes (%s)", cfg.setting, len(genes), gene_rule)

    predictions: dict[str, np.ndarray] = {}
    fits: dict[str, dict] = {}
    probes: dict[str, LinearHead] = {}
    needed = np.union1d(split.train, split.test)
    for encoder_name, model in encoders.items():
        features = np.zeros((len(data.obs), model.num_features), dtype=np.float32)  # (n_cells, n_features)
        features[needed] = embed_images(
            model,
            (data.jpegs[i] for i in needed),
            len(needed),
            int(cfg.embed.batch_size),
            "backbone",
            progress,
            desc=f"embed {encoder_name}",
        )
        probe = fit_linear_probe(features[split.train], targets[split.train], list(cfg.linear_probe.alphas))
        probes[encoder_name] = probe
        # Extra random seeds are a negative control of the frozen features; only the first trains end to end.
        modes = cfg.modes if encoder_name in (main_encoder, "random") else ["linear_probe"]
        for mode in modes:
            name = f"{encoder_name}/{mode}"
            predictions[name], fits[name] = _run_mode(mode, model, data, targets, split, cfg, features, probe, name)
    oracle = load_oracle(data, cfg.controls.oracle, OmegaConf.to_container(cfg.data.bundles, resolve=True))
    if oracle is not None:
        truths = {"oracle": oracle.features()}
        if cfg.controls.shuffled_oracle:
            truths["oracle_shuffled"] = oracle.features(oracle.shuffled(seed))
        for name, features in truths.items():
            probe = fit_linear_probe(features[split.train], targets[split.train], list(cfg.linear_probe.alphas))
            predictions[f"{name}/linear_probe"] = probe.predict(features[split.test])
            fits[f"{name}/linear_probe"] = {"alpha": probe.alpha, "truth": oracle.source}

    table = gene_table(genes, measured, {k.replace("/", "_"): v for k, v in predictions.items()})
    results: dict[str, dict] = {}
    labels: dict[str, tuple] = {}
    for name, predicted in predictions.items():
        r = table[f"pearson_{name.replace('/', '_')}"].to_numpy()
        agreement, measured_labels, predicted_labels, transferred = cluster_agreement(
            measured,
            predicted,
            n_pcs=int(cfg.clustering.n_pcs),
            n_neighbors=int(cfg.clustering.n_neighbors),
            resolution=float(cfg.clustering.resolution),
            seed=seed,
        )
        order = np.argsort(-np.nan_to_num(r, nan=-2.0))
        results[name] = {
            **summarise_pearson(r),
            **agreement,
            **fits[name],
            "top_genes": {genes[i]: round(float(r[i]), 4) for i in order[:5]},
        }
        labels[name] = (measured_labels, predicted_labels, transferred)

    main = next(iter(predictions))
    controls = _controls(cfg, data, split, measured, predictions, results, main_encoder)
    comparison = {}
    if cfg.baseline == "random":
        for mode in cfg.modes:
            ours, base = results[f"{main_encoder}/{mode}"], results[f"random/{mode}"]
            delta = ours["mean_pearson"] - base["mean_pearson"]
            comparison[mode] = {
                "delta_mean_pearson": delta,
                "encoder_beats_random": bool(delta > 0),
                **paired_gene_comparison(
                    table[f"pearson_{main_encoder}_{mode}"].to_numpy(), table[f"pearson_random_{mode}"].to_numpy()
                ),
                **controls["versus_random"].get(mode, {}),
            }
    main_r = table[f"pearson_{main.replace('/', '_')}"].to_numpy()
    figure_genes = (
        list(cfg.figure.genes) if cfg.figure.genes else [genes[int(np.nanargmax(np.nan_to_num(main_r, nan=-2)))]]
    )
    unknown = [g for g in figure_genes if g not in genes]
    if unknown:
        raise InputError(None, "figure.genes", "genes among those predicted", unknown)

    summary = {
        "setting": cfg.setting,
        "split": split.info,
        "genes": genes,
        "gene_selection": gene_rule,
        "n_cells": int(len(data.obs)),
        "n_train": int(len(split.train)),
        "n_test": int(len(split.test)),
        "encoder": encoder.description,
        "leiden_backend": leiden_backend(),
        "results": results,
        "comparison_with_random": comparison,
        "controls": controls["summary"],
        "main_run": main,
        "figures": [f"spatial_{g}.png" for g in figure_genes],
        "seconds": None,
    }
    out_dir = Path(cfg.out_dir)
    with atomic_dir(out_dir) as tmp:
        save_config(cfg, tmp / "config.yaml")
        table.to_csv(tmp / "per_gene.csv", index=False, float_format="%.5f")
        _write_predictions(
            tmp / "predictions.h5ad", data, split, genes, measured, predictions, table, labels, main, summary
        )
        xy = data.obs[["x_um", "y_um"]].to_numpy(float)
        for gene in figure_genes:
            g = genes.index(gene)
            slides = data.obs["slide"].to_numpy()
            plot_spatial_maps(
                tmp / f"spatial_{gene}.png",
                xy[split.test],
                gene,
                measured[:, g],
                {k: v[:, g] for k, v in predictions.items()},
                {k: float(table[f"pearson_{k.replace('/', '_')}"].iloc[g]) for k in predictions},
                slides=slides[split.test],
                context_xy_um=xy[split.train],
                context_slides=slides[split.train],
            )
        _write_head(tmp, probes[main_encoder], genes, encoder)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write_metrics(tmp / "metrics.json", summary)

    header = (
        f"gene expression · setting {cfg.setting} · {len(genes)} genes ({gene_rule}) · "
        f"{len(split.train)} train / {len(split.test)} test cells · clustering {results[main]['clustering_method']}"
    )
    text = format_results(results, header)
    top = ", ".join(f"{g} {r:.2f}" for g, r in results[main]["top_genes"].items())
    text += f"\nbest genes ({main}): {top}"
    text += "\n" + controls["text"]
    for mode, c in comparison.items():
        if not controls["summary"].get("gate", {}).get("passes", True):
            continue  # the controls failed: a comparison would mean nothing
        line = controls["verdicts"].get(mode)
        text += (
            f"\n{mode}: {line or ''}"
            f"{'; ' if line else ''}better on {c['genes_won']}/{c['genes_compared']} genes, "
            f"paired Wilcoxon p = {c['wilcoxon_p']:.2g}"
        )
        if not c["encoder_beats_random"]:
            log.warning("%s: the encoder does not beat the random-weight baseline", mode)
    text += f"\nwritten to {out_dir}: metrics.json, per_gene.csv, predictions.h5ad, " + ", ".join(summary["figures"])
    print(text, flush=True)
    return {**summary, "out_dir": str(out_dir), "table": text}


def _write_predictions(
    path: Path,
    data: CellData,
    split,
    genes: list[str],
    measured: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    table: pd.DataFrame,
    labels: Mapping[str, tuple],
    main: str,
    summary: Mapping[str, Any],
) -> None:
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
    adata.uns["gene_prediction"] = json.loads(
        json.dumps(
            finite({k: summary[k] for k in ("setting", "gene_selection", "main_run", "encoder", "split")}), default=str
        )
    )
    adata.uns["gene_prediction"]["X"] = f"predicted log-normalised expression ({main})"
    adata.write_h5ad(path)


def _write_head(folder: Path, probe: LinearHead, genes: list[str], encoder: ImageEncoder) -> None:
    module = probe.as_module()  # on the CPU
    weights = folder / "linear_head.safetensors"
    save_file({"weight": module.weight.detach().contiguous(), "bias": module.bias.detach().contiguous()}, str(weights))
    weights.chmod(0o644)  # safetensors creates its files private; the results folder is for sharing
    write_json(
        folder / "linear_head.json",
        {
            "input": "pooled backbone feature of the encoder below (raw, not standardised)",
            "output": "log1p(counts / cell total × 10,000) per gene",
            "in_features": int(probe.weight.shape[1]),
            "out_features": len(genes),
            "ridge_alpha": probe.alpha,
            "genes": genes,
            "encoder": json.loads(json.dumps(encoder.description, default=str)),
        },
    )


__all__ = ["MODES", "run_genes", "format_results"]
