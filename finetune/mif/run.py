"""H&E → multiplex immunofluorescence with the MIPHEI-ViT head (Balezo et al. 2025) on a PAST image encoder.

`run_mif(cfg)` is the whole task (``python launch/finetune.py mif --config configs/finetune/mif_demo.yaml``):

1. data: an ORION-like folder (:mod:`finetune.mif.data`); with ``data.synthetic.bundle`` set and the folder
   missing, a synthetic set is painted first on the demo bundle's real H&E (markers follow the planted cell
   types, :func:`finetune.synthetic.mif.write_synthetic_mif`);
2. preprocessing fitted on the training tiles (AF subtraction, foreground percentile, MIPHEI's log
   transform, targets in [−0.9, 0.9]) and saved as ``preprocess.json`` beside the model;
3. the model (:func:`finetune.mif.model.build_mif_model`: ViT encoder + ViTMatte detail stream or UNETR
   pyramid + U-Net decoder, LoRA / frozen / full fine-tuning), per-marker weighted MSE (1/std of the training
   targets), Adam lr 2e-4 + weight decay 1e-5, MIPHEI's schedule (linear warmup over ``warmup_steps``,
   constant to half of training, linear decay to 0), gradient clipping at norm 1, random flips/90° rotations
   and HED / brightness jitter of the H&E (:mod:`finetune.mif.train`, on the shared loop
   :func:`finetune.training.fit`); the checkpoint kept is the one with the best validation Cell AUC
   (scored every ``train.val_every`` steps);
4. evaluation on test tiles (:mod:`finetune.mif.evaluate`): PSNR and SSIM per marker; per marker the Cell
   AUC as MIPHEI defines it (ROC AUC of the mean predicted intensity per nucleus — or per nucleus grown by
   ``eval.dilate_um`` — against GMM-gated labels), and a logistic regression fitted on the validation
   cells (``auc_classifier``, F1, balanced accuracy); a baseline: ``mean`` (the training mean of every
   marker, everywhere) or ``random``: the same head trained on ``controls.random_seeds`` randomly
   initialised encoders of the same architecture, with the controls of :mod:`finetune.mif.controls`
   (oracle = the planted cell types when the set has them, the shuffled oracle, a tile-bootstrap 95 %
   interval of the pretrained-minus-random mean Cell AUC, and the gate that withholds the verdict when
   the oracle cannot be told from random).

Outputs in ``out_dir``: ``config.yaml``, ``model/`` (``model.safetensors``: the whole generator with LoRA merged
into the ViT's q/v weights, loadable into a ``finetune="frozen"`` build; ``lora.safetensors``: the adapters alone;
``preprocess.json``; ``model.json``: build arguments and the encoder it started from; ``config.yaml``), ``metrics.json``,
``per_marker.csv``, ``cells.csv`` (test cells), ``train_log.csv``, ``examples.png`` (H&E | predicted | measured),
``training_curve.png``, ``predictions/<tile>.tif`` (uint8 OME-TIFF per test tile), each written atomically
(the model folder: :mod:`finetune.mif.checkpoint`).

Settings: :class:`finetune.mif.config.MIFConfig`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_dir, atomic_path
from common.config import apply_schema, save_config
from common.errors import InputError
from finetune.encoders import load_encoder, random_like, resolve_device
from finetune.report import write_metrics
from finetune.synthetic.mif import write_synthetic_mif
from finetune.synthetic.stain_tiles import demo_cell_tiles
from finetune.training import PRECISIONS, torch_threads

from .checkpoint import build_from_config, load_mif_checkpoint, save_checkpoint
from .config import MIFConfig
from .controls import compare_runs, oracle_scores, read_planted, shuffled_rows
from .data import MIFLayout, MIFPreprocessor, MIFTileDataset, fit_preprocessor, read_orion_layout
from .evaluate import (
    ValidationScorer,
    cell_auc_table,
    evaluate_run,
    format_table,
    mean_predictor,
    model_predictor,
    plot_examples,
    plot_training_curve,
    records,
    summary,
)
from .train import Selection, train_model

log = logging.getLogger(__name__)

BASELINES = ("mean", "random", "none")


# ---------------------------------------------------------------------------------------------
# Config and data


def validate(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    """``cfg`` checked against :class:`MIFConfig` (unknown keys, types) and the values a type cannot check."""
    merged = apply_schema(MIFConfig, cfg)
    if merged.baseline not in BASELINES:
        raise InputError(None, "baseline", f"one of {BASELINES}", merged.baseline)
    if not merged.data.root:
        raise InputError(
            None, "data.root", "the ORION-like data folder (written there when data.synthetic is set)", merged.data.root
        )
    if int(merged.train.batch_size) < 1 or int(merged.eval.batch_size) < 1:
        raise InputError(None, "train.batch_size", "at least 1", merged.train.batch_size)
    if merged.train.precision not in PRECISIONS:
        raise InputError(None, "train.precision", " or ".join(PRECISIONS), merged.train.precision)
    if float(merged.eval.dilate_um) < 0:
        raise InputError(None, "eval.dilate_um", "a distance in µm >= 0", merged.eval.dilate_um)
    if merged.data.um_per_px is not None and float(merged.data.um_per_px) <= 0:
        raise InputError(None, "data.um_per_px", "a resolution in µm/px > 0", merged.data.um_per_px)
    if int(merged.controls.random_seeds) < 1 or int(merged.controls.n_boot) < 1:
        raise InputError(None, "controls.random_seeds", "at least 1 (and controls.n_boot at least 1)", merged.controls)
    return merged


def dilation_px(cfg: DictConfig, planted: Mapping | None) -> float:
    """``eval.dilate_um`` in px of the tiles: over ``data.um_per_px``, else the synthetic set's µm/px."""
    dilate_um = float(cfg.eval.dilate_um)
    if dilate_um == 0:
        return 0.0
    um_per_px = cfg.data.um_per_px
    if um_per_px is None and planted is not None:
        um_per_px = planted.get("um_per_px")
    if um_per_px is None:
        raise InputError(
            None, "data.um_per_px", "the tiles' resolution in µm/px when eval.dilate_um is set (ORION: 0.5)", None
        )
    return dilate_um / float(um_per_px)


def _stale_synthetic(root: Path) -> str:
    """Why a synthetic set at ``root`` must be repainted ('' when it is current or absent): sets painted
    before flips followed prevalence (no ``flip_rule`` in truth.json) would cap the Cell AUC of rare markers."""
    planted = read_planted(root) if (root / "he").is_dir() else None
    if planted is not None and ("flip_rule" not in planted or "um_per_px" not in planted):
        return "flat flip rate, no µm/px"
    return ""


def prepare_data(cfg: DictConfig) -> MIFLayout:
    """Write the synthetic set when configured and missing, then read and check the layout."""
    root = Path(cfg.data.root)
    syn = cfg.data.synthetic
    if syn and syn.bundle:
        overwrite = bool(syn.overwrite)
        stale = _stale_synthetic(root)
        if stale:
            log.warning("synthetic mIF set at %s was painted by an older version (%s); repainting it", root, stale)
            overwrite = True
        if overwrite or not (root / "he").is_dir():
            if root.exists() and not overwrite and any(root.iterdir()):
                raise InputError(
                    root,
                    None,
                    "an empty or missing folder for the synthetic set (or data.synthetic.overwrite=true)",
                    "a non-empty folder without he/",
                )
            tiles = demo_cell_tiles(syn.bundle, int(syn.n_tiles), tile_px=int(syn.tile_px), seed=int(syn.seed))
            write_synthetic_mif(root, tiles, seed=int(syn.seed), flip_rate=float(syn.flip_rate), overwrite=True)
        else:
            log.info("synthetic mIF set already at %s (data.synthetic.overwrite=true rewrites it)", root)
    return read_orion_layout(root, split_fractions=list(cfg.data.split_fractions), seed=int(cfg.seed))


def fit_from_config(layout: MIFLayout, cfg: DictConfig) -> MIFPreprocessor:
    """The preprocessing of the ``preprocess`` section, fitted on the training tiles."""
    p = cfg.preprocess
    markers = list(cfg.data.markers) if cfg.data.markers else None
    return fit_preprocessor(
        layout,
        layout.split("train"),
        markers=markers,
        lambdas=OmegaConf.to_container(p.lambdas) if p.lambdas else None,
        biases=OmegaConf.to_container(p.biases) if p.biases else None,
        percentile=float(p.percentile),
        background_margin_px=int(p.background_margin_px),
        bias_noise_sd=float(p.bias_noise_sd),
        fit_max_tiles=int(p.fit_max_tiles),
        fit_pixels_per_tile=int(p.fit_pixels_per_tile),
        fit_smooth_px=float(p.fit_smooth_px),
        prenormalised_scale=None if p.prenormalised_scale is None else float(p.prenormalised_scale),
        seed=int(cfg.seed),
    )


# ---------------------------------------------------------------------------------------------
# The task


def _run_one(
    name: str,
    encoder: Any,
    cfg: DictConfig,
    preprocessor: MIFPreprocessor,
    train_ds: MIFTileDataset,
    device: torch.device,
    scorer: ValidationScorer | None,
) -> tuple[torch.nn.Module, pd.DataFrame, Selection]:
    torch.manual_seed(int(cfg.seed))
    model = build_from_config(encoder, len(preprocessor.markers), cfg.model)
    precision = str(cfg.train.precision)
    validate = None
    if scorer is not None:
        validate = lambda m: scorer(model_predictor(m, encoder, device, precision))  # noqa: E731
    history, selection = train_model(
        model,
        encoder,
        train_ds,
        preprocessor.target_std,
        cfg.train,
        device,
        seed=int(cfg.seed),
        progress=bool(cfg.progress),
        desc=f"mIF {name}",
        validate=validate,
        val_every=int(cfg.train.val_every),
    )
    return model, history, selection


def _per_cell(cells: pd.DataFrame, markers: Sequence[str], suffix: str) -> np.ndarray:
    return cells[[f"{m}_{suffix}" for m in markers]].to_numpy(np.float64)  # (n_cells, n_markers)


def run_mif(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """Train and evaluate the mIF head; see the module docstring. Returns the headline figures and paths."""
    started = time.time()
    cfg = validate(cfg)
    out_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.train.device)
    layout = prepare_data(cfg)
    preprocessor = fit_from_config(layout, cfg)
    markers = preprocessor.markers
    roles = {c.name: c.role for c in layout.channels}
    cell_markers = [m for m in markers if roles[m] == "marker"]
    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=int(cfg.seed), device="cpu")
    if encoder.input_size_px is None:
        raise InputError(None, "encoder", "an encoder with a fixed input size (a ViT)", encoder.description)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    cache = bool(cfg.train.cache_tiles)
    colour = bool(cfg.train.color_augment)
    train_ds = MIFTileDataset(
        layout.split("train"),
        preprocessor,
        size_px=encoder.input_size_px,
        augment=bool(cfg.train.augment),
        cache=cache,
        hed_jitter=float(cfg.train.hed_jitter) if colour else 0.0,
        brightness_jitter=float(cfg.train.brightness_jitter) if colour else 0.0,
    )
    val_ds = MIFTileDataset(layout.split("val"), preprocessor, cache=cache)
    test_ds = MIFTileDataset(layout.split("test"), preprocessor, cache=cache)
    log.info(
        "mIF: %d markers %s (cell level: %s), tiles train %d / val %d / test %d, device %s",
        len(markers),
        markers,
        cell_markers,
        len(train_ds),
        len(val_ds),
        len(test_ds),
        device,
    )

    planted = read_planted(layout.root)
    dilate_px = dilation_px(cfg, planted)
    eval_args = dict(
        val_ds=val_ds,
        test_ds=test_ds,
        markers=markers,
        cell_markers=cell_markers,
        eval_cfg=cfg.eval,
        seed=int(cfg.seed),
        dilate_px=dilate_px,
    )
    scorer = None
    if cell_markers and int(cfg.train.val_every) > 0:
        scorer = ValidationScorer(val_ds, markers, cell_markers, cfg.eval, seed=int(cfg.seed), dilate_px=dilate_px)
    precision = str(cfg.train.precision)
    n_fig = min(int(cfg.eval.n_figure_tiles), len(test_ds))
    tables: dict[str, pd.DataFrame] = {}
    histories: dict[str, pd.DataFrame] = {}
    selections: dict[str, Selection] = {}
    random_cells: dict[str, pd.DataFrame] = {}
    with torch_threads(cfg.train.threads):
        t0 = time.time()
        model, histories["model"], selections["model"] = _run_one(
            "PAST encoder", encoder, cfg, preprocessor, train_ds, device, scorer
        )
        train_seconds = time.time() - t0
        model_dir = save_checkpoint(model, preprocessor, cfg, out_dir / "model", encoder.description)
        with contextlib.ExitStack() as stack:
            write_dir = stack.enter_context(atomic_dir(out_dir / "predictions")) if cfg.eval.write_predictions else None
            tables["model"], cells, kept = evaluate_run(
                model_predictor(model, encoder, device, precision), keep=n_fig, write_dir=write_dir, **eval_args
            )
        if cfg.baseline == "random":
            n_random = int(cfg.controls.random_seeds)
            for k in range(1, n_random + 1):
                name = "random encoder" if n_random == 1 else f"random encoder {k}"
                random_encoder = random_like(encoder, seed=int(cfg.seed) + k)
                baseline_model, histories[name], selections[name] = _run_one(
                    name, random_encoder, cfg, preprocessor, train_ds, device, scorer
                )
                tables[name], random_cells[name], _ = evaluate_run(
                    model_predictor(baseline_model, random_encoder, device, precision), **eval_args
                )
                del baseline_model
        elif cfg.baseline == "mean":
            tables["mean baseline"], _, _ = evaluate_run(mean_predictor(preprocessor), **eval_args)

    controls = _controls(cfg, cells, random_cells, cell_markers, planted, tables)
    result = _write_outputs(
        cfg,
        out_dir,
        layout,
        preprocessor,
        cell_markers,
        tables,
        cells,
        histories,
        selections,
        controls,
        kept,
        test_ds,
        model,
        train_seconds,
        started,
        dilate_px,
    )
    result["model_dir"] = model_dir
    return result


def _controls(
    cfg: DictConfig,
    cells: pd.DataFrame,
    random_cells: Mapping[str, pd.DataFrame],
    cell_markers: Sequence[str],
    planted: Mapping | None,
    tables: dict[str, pd.DataFrame],
) -> dict | None:
    """The oracle rows (added to ``tables``: their per-marker Cell AUC is the data's ceiling) and
    :func:`finetune.mif.controls.compare_runs` of the PAST encoder against the random encoders."""
    if not cell_markers or not len(cells):
        return None
    labels = _per_cell(cells, cell_markers, "pos")
    scores = {"PAST encoder": _per_cell(cells, cell_markers, "pred")}
    for name, other in random_cells.items():
        if not other[["tile", "label"]].equals(cells[["tile", "label"]]):
            raise RuntimeError(f"{name}: test cells differ from the PAST encoder's run")  # same tiles, same nuclei
        scores[name] = _per_cell(other, cell_markers, "pred")
    oracle = shuffled = None
    if planted is not None and cfg.controls.oracle:
        oracle = "oracle (planted type)"
        scores[oracle] = oracle_scores(cells, planted, cell_markers)
        tables[oracle] = cell_auc_table(scores[oracle], labels, cell_markers).assign(
            n_test_cells=len(labels), n_test_positive=np.nansum(labels, axis=0).astype(int)
        )
        if cfg.controls.shuffled_oracle:
            shuffled = "oracle shuffled"
            scores[shuffled] = shuffled_rows(scores[oracle], seed=int(cfg.seed))
            tables[shuffled] = cell_auc_table(scores[shuffled], labels, cell_markers)
    return compare_runs(
        scores,
        labels,
        cells["tile"].to_numpy(),
        main="PAST encoder",
        randoms=list(random_cells),
        oracle=oracle,
        shuffled=shuffled,
        n_boot=int(cfg.controls.n_boot),
        seed=int(cfg.seed),
    )


def _loss_ends(history: pd.DataFrame) -> tuple[float, float]:
    """Mean training loss over the first and the last tenth of the steps (at least one step each)."""
    k = max(1, len(history) // 10)
    return float(history["loss"].iloc[:k].mean()), float(history["loss"].iloc[-k:].mean())


def _write_outputs(
    cfg: DictConfig,
    out_dir: Path,
    layout: MIFLayout,
    preprocessor: MIFPreprocessor,
    cell_markers: Sequence[str],
    tables: Mapping[str, pd.DataFrame],
    cells: pd.DataFrame | None,
    histories: Mapping[str, pd.DataFrame],
    selections: Mapping[str, Selection],
    controls: dict | None,
    kept: Sequence[np.ndarray],
    test_ds: MIFTileDataset,
    model: torch.nn.Module,
    train_seconds: float,
    started: float,
    dilate_px: float,
) -> dict:
    markers = preprocessor.markers
    per_marker = pd.concat([t.assign(run=name) for name, t in tables.items()], ignore_index=True)
    per_marker = per_marker[["run", *[c for c in per_marker.columns if c != "run"]]]
    with atomic_path(out_dir / "per_marker.csv") as tmp:
        per_marker.to_csv(tmp, index=False, float_format="%.6g")
    if cells is not None and len(cells):
        with atomic_path(out_dir / "cells.csv") as tmp:
            cells.to_csv(tmp, index=False, float_format="%.6g")
    history = histories["model"]
    log_frame = pd.concat([h.assign(run=name) for name, h in histories.items()], ignore_index=True)
    with atomic_path(out_dir / "train_log.csv") as tmp:
        log_frame.to_csv(tmp, index=False, float_format="%.6g")

    n_fig = len(kept)
    figure = plot_examples(
        [test_ds.load(i)[0].numpy() for i in range(n_fig)],
        kept,
        [test_ds.load(i)[1].numpy() for i in range(n_fig)],
        markers,
        out_dir / "examples.png",
        names=[t.name for t in test_ds.tiles[:n_fig]],
        nuclei=[test_ds.load(i)[2].numpy() for i in range(n_fig)],
    )
    curve = plot_training_curve(history["step"], history["loss"], history["lr"], out_dir / "training_curve.png")

    loss_first, loss_last = _loss_ends(history)
    elapsed = time.time() - started
    n_cells = int(len(cells)) if cells is not None else 0
    metrics = {
        "markers": markers,
        "cell_markers": list(cell_markers),
        "tiles": {s: len(layout.split(s)) for s in ("train", "val", "test")},
        "n_test_cells": n_cells,
        "data_range": "PSNR/SSIM on targets in [-0.9, 0.9], data_range 1.8, predictions clipped",
        "cell_auc": "ROC AUC of the mean predicted intensity per cell against the GMM-gated labels (MIPHEI); "
        "auc_classifier: of the logistic regression fitted on validation cells",
        "cell_region": {"dilate_um": float(cfg.eval.dilate_um), "dilate_px": round(float(dilate_px), 3)},
        "checkpoint": {name: sel.as_dict() for name, sel in selections.items()},
        "controls": None if controls is None else {k: v for k, v in controls.items() if k != "text"},
        "summary": {name: summary(t) for name, t in tables.items()},
        "per_marker": {name: records(t) for name, t in tables.items()},
        "train": {
            "steps": int(len(history)),
            "loss_first": loss_first,
            "loss_last": loss_last,
            "seconds": round(train_seconds, 1),
            "warmup_steps": int(cfg.train.warmup_steps),
            "batch_size": int(cfg.train.batch_size),
        },
        "model": {**OmegaConf.to_container(cfg.model, resolve=True), "parameters": model.trainable_summary()},
        "preprocess": preprocessor.to_dict(),
        "seconds": round(elapsed, 1),
    }
    write_metrics(out_dir / "metrics.json", metrics)

    region = f"nuclei grown by {float(cfg.eval.dilate_um):g} µm" if dilate_px else "nuclei"
    print(
        f"\nmIF prediction (MIPHEI head, {cfg.model.variant}, {cfg.model.finetune}) on {len(test_ds)} test tiles, "
        f"{n_cells} test cells; Cell AUC = AUC of the mean predicted intensity per cell ({region}) against the "
        f"gated labels; clf AUC / F1 / bal.acc from a classifier trained on {len(layout.split('val'))} validation tiles"
    )
    for name, table in tables.items():
        title = f"[{name}]"
        if name.startswith("oracle (planted"):
            title += " the planted cell type as the prediction: what knowing each cell's type gives (ceiling)"
        elif name in selections and selections[name].score is not None:
            title += f" checkpoint of step {selections[name].step} (validation Cell AUC {selections[name].score:.3f})"
        print("\n" + format_table(table, title=title))
    if controls is not None:
        print("\n" + controls["text"])
    print(
        f"\ntraining: {len(history)} steps in {train_seconds:.0f} s, loss {loss_first:.4f} → {loss_last:.4f}; "
        f"total {elapsed:.0f} s"
    )
    print(f"figures: {figure}, {curve}\nmodel: {out_dir / 'model'}\noutputs: {out_dir}\n")
    return {
        "out_dir": out_dir,
        "tables": dict(tables),
        "summary": metrics["summary"],
        "metrics": metrics,
        "examples_png": figure,
        "training_curve_png": curve,
        "loss_first": loss_first,
        "loss_last": loss_last,
    }


__all__ = ["BASELINES", "run_mif", "validate", "prepare_data", "fit_from_config", "load_mif_checkpoint"]
