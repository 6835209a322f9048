"""H&E → multiplex immunofluorescence with the MIPHEI-ViT head (Balezo et al. 2025) on a PAST image encoder.

`run_mif(cfg)` is the whole task (``python launch/finetune.py mif --config configs/finetune/mif_demo.yaml``):

1. data: an ORION-like folder (:mod:`finetune.mif_data`); with ``data.synthetic.bundle`` set and the folder
   missing, a synthetic set is painted first on the demo bundle's real H&E (markers follow the planted cell
   types, :func:`finetune.mif_data.write_synthetic_mif`);
2. preprocessing fitted on the training tiles (AF subtraction, foreground percentile, MIPHEI's log
   transform, targets in [−0.9, 0.9]) and saved as ``preprocess.json`` beside the model;
3. the model (:func:`finetune.mif_model.build_mif_model`: ViT encoder + ViTMatte detail stream or UNETR
   pyramid + U-Net decoder, LoRA / frozen / full fine-tuning), per-marker weighted MSE (1/std of the training
   targets), Adam lr 2e-4 + weight decay 1e-5, MIPHEI's schedule (linear warmup over ``warmup_steps``,
   constant to half of training, linear decay to 0), gradient clipping at norm 1, random flips/90° rotations;
4. evaluation on test tiles (:mod:`finetune.mif_eval`): PSNR and SSIM per marker, Cell AUC / F1 / balanced
   accuracy per marker from per-nucleus means, GMM-gated labels and a logistic regression fitted on the
   validation cells; a baseline in the same table: ``mean`` (the training mean of every marker, everywhere)
   or ``random`` (the same head trained on a randomly initialised encoder of the same architecture).

Outputs in ``out_dir``: ``config.yaml``, ``model/`` (``model.safetensors``: the whole generator with LoRA merged
into the ViT's q/v weights, loadable into a ``finetune="frozen"`` build; ``lora.safetensors``: the adapters alone;
``preprocess.json``; ``model.json``: build arguments and the encoder it started from; ``config.yaml``), ``metrics.json``,
``per_marker.csv``, ``cells.csv`` (test cells), ``train_log.csv``, ``examples.png`` (H&E | predicted | measured),
``training_curve.png``, ``predictions/<tile>.tif`` (uint8 OME-TIFF per test tile), each written atomically.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data_shards.atomic import atomic_dir, atomic_path, write_json
from data_shards.config import save_config
from data_shards.errors import InputError, read_json_file

from .mif_data import (MIFLayout, MIFPreprocessor, MIFTileDataset, fit_preprocessor, read_orion_layout,
                       write_synthetic_mif)
from .mif_eval import (PixelAccumulator, cell_level_evaluation, format_table, nucleus_means, plot_examples,
                       plot_training_curve, write_prediction_tiff)

log = logging.getLogger(__name__)

MODEL_FORMAT = "past-mif-generator-v1"
BASELINES = ("mean", "random", "none")

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/finetune/mif",
    "seed": 0,
    "progress": True,
    "data": {
        "root": None,
        "markers": None,  # channels to predict; null = every marker and nuclear channel (not the AF one)
        "split_fractions": [0.7, 0.15, 0.15],  # train/val/test when <root>/splits.csv is absent
        "synthetic": None,  # {bundle, n_tiles, tile_px, seed, flip_rate, overwrite}: write the demo set when missing
    },
    "preprocess": {
        "percentile": 99.0,  # of foreground (x > 0) training pixels after AF subtraction (MIPHEI: 99)
        "lambdas": {},  # marker -> λ; missing = estimated (OLS on background pixels)
        "biases": {},  # marker -> b (raw intensity units); missing = -(background level + bias_noise_sd·σ)
        "background_margin_px": 4,  # nuclei dilated by this much are not background
        "bias_noise_sd": 2.0,
        "fit_max_tiles": 512,
        "fit_pixels_per_tile": 4096,
        "fit_smooth_px": 2.0,
        "prenormalised_scale": None,  # e.g. 255 for MIPHEI's released (already cleaned, uint8) tiles: u = I / 255
    },
    "encoder": {"source": "export", "path": None},
    "model": {
        "variant": "vitmatte",  # vitmatte (MIPHEI-ViT) | unetr
        "finetune": "lora",  # lora | frozen | full
        "lora_rank": 8,
        "lora_alpha": 1.0,
        "detail_channels": [48, 96, 192],
        "decoder_channels": [256, 128, 64, 32],
    },
    "baseline": "mean",  # mean | random | none
    "train": {
        "device": "auto",
        "batch_size": 16,
        "epochs": 20,
        "steps": None,  # total optimiser steps; null = epochs × batches per epoch
        "lr": 2.0e-4,
        "scale_lr_by_sqrt_batch": False,  # MIPHEI's code trains at lr·√batch_size (2e-4·√16 = 8e-4)
        "weight_decay": 1.0e-5,
        "warmup_steps": 400,
        "grad_clip": 1.0,
        "augment": True,
        "num_workers": 4,
        "cache_tiles": False,  # keep preprocessed tiles in memory (small sets)
        "precision": "fp32",  # fp32 | bf16 (autocast on CUDA)
        "threads": None,  # torch CPU threads
        "log_every": 50,
    },
    "eval": {
        "batch_size": 16,
        "min_nucleus_area_px": 20,  # MIPHEI's min_area at 0.5 µm/px
        "gate_min_cells": 10,
        "n_figure_tiles": 3,
        "write_predictions": True,
    },
}


# ---------------------------------------------------------------------------------------------
# Config and data


def _merge_defaults(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), user)
    if merged.baseline not in BASELINES:
        raise InputError(None, "baseline", f"one of {BASELINES}", merged.baseline)
    if not merged.data.root:
        raise InputError(None, "data.root", "the ORION-like data folder (written there when data.synthetic is set)",
                         merged.data.root)
    if int(merged.train.batch_size) < 1 or int(merged.eval.batch_size) < 1:
        raise InputError(None, "train.batch_size", "at least 1", merged.train.batch_size)
    if merged.train.precision not in ("fp32", "bf16"):
        raise InputError(None, "train.precision", "fp32 or bf16", merged.train.precision)
    return merged


def prepare_data(cfg: DictConfig) -> MIFLayout:
    """Write the synthetic set when configured and missing, then read and check the layout."""
    root = Path(cfg.data.root)
    syn = cfg.data.synthetic
    if syn and syn.get("bundle"):
        overwrite = bool(syn.get("overwrite", False))
        if overwrite or not (root / "he").is_dir():
            if root.exists() and not overwrite and any(root.iterdir()):
                raise InputError(root, None, "an empty or missing folder for the synthetic set (or "
                                 "data.synthetic.overwrite=true)", "a non-empty folder without he/")
            from .stain_tiles import demo_cell_tiles

            tiles = demo_cell_tiles(syn.bundle, int(syn.get("n_tiles", 32)), tile_px=int(syn.get("tile_px", 224)),
                                    seed=int(syn.get("seed", 0)))
            write_synthetic_mif(root, tiles, seed=int(syn.get("seed", 0)), flip_rate=float(syn.get("flip_rate", 0.05)),
                                overwrite=True)
        else:
            log.info("synthetic mIF set already at %s (data.synthetic.overwrite=true rewrites it)", root)
    return read_orion_layout(root, split_fractions=list(cfg.data.split_fractions), seed=int(cfg.seed))


def fit_from_config(layout: MIFLayout, cfg: DictConfig) -> MIFPreprocessor:
    p = cfg.preprocess
    markers = list(cfg.data.markers) if cfg.data.markers else None
    return fit_preprocessor(layout, layout.split("train"), markers=markers,
                            lambdas=OmegaConf.to_container(p.lambdas) if p.lambdas else None,
                            biases=OmegaConf.to_container(p.biases) if p.biases else None,
                            percentile=float(p.percentile), background_margin_px=int(p.background_margin_px),
                            bias_noise_sd=float(p.bias_noise_sd), fit_max_tiles=int(p.fit_max_tiles),
                            fit_pixels_per_tile=int(p.fit_pixels_per_tile), fit_smooth_px=float(p.fit_smooth_px),
                            prenormalised_scale=None if p.prenormalised_scale is None else float(p.prenormalised_scale),
                            seed=int(cfg.seed))


# ---------------------------------------------------------------------------------------------
# Model, training, prediction


def build_from_config(encoder: Any, n_markers: int, model_cfg: Mapping[str, Any], finetune: str | None = None):
    from .mif_model import build_mif_model

    return build_mif_model(encoder, n_markers, variant=str(model_cfg["variant"]),
                           finetune=str(finetune or model_cfg["finetune"]), lora_rank=int(model_cfg["lora_rank"]),
                           lora_alpha=float(model_cfg["lora_alpha"]),
                           detail_channels=[int(c) for c in model_cfg["detail_channels"]],
                           decoder_channels=[int(c) for c in model_cfg["decoder_channels"]])


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def total_steps(n_train: int, train_cfg: Mapping[str, Any]) -> int:
    if train_cfg.get("steps"):
        return int(train_cfg["steps"])
    return int(train_cfg["epochs"]) * max(1, math.ceil(n_train / int(train_cfg["batch_size"])))


def train_model(model: torch.nn.Module, encoder: Any, dataset: MIFTileDataset, marker_std: Sequence[float],
                train_cfg: Mapping[str, Any], device: torch.device, seed: int = 0, progress: bool = True,
                desc: str = "mIF training") -> pd.DataFrame:
    """MIPHEI's optimisation (weighted MSE, Adam, warmup/constant/linear decay, clip 1); a per-step log.

    ``encoder`` only normalises (and resizes) the uint8 H&E batches; ``model`` holds its own copy of the ViT.
    """
    from .mif_model import make_optimizer, miphei_lr_lambda, weighted_mse

    n_steps = total_steps(len(dataset), train_cfg)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(train_cfg["batch_size"]), shuffle=True,
                                         generator=generator, num_workers=int(train_cfg["num_workers"]),
                                         drop_last=len(dataset) > int(train_cfg["batch_size"]),
                                         persistent_workers=int(train_cfg["num_workers"]) > 0)
    lr = float(train_cfg["lr"]) * (math.sqrt(int(train_cfg["batch_size"])) if train_cfg.get("scale_lr_by_sqrt_batch")
                                   else 1.0)
    optimiser = make_optimizer(model, lr=lr, weight_decay=float(train_cfg["weight_decay"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, miphei_lr_lambda(n_steps, int(train_cfg["warmup_steps"])))
    params = [p for p in model.parameters() if p.requires_grad]
    std = torch.as_tensor(list(marker_std), dtype=torch.float32)
    model.to(device).train()
    rows, step = [], 0
    log_every = max(1, int(train_cfg.get("log_every", 50)))
    bar = tqdm(total=n_steps, desc=desc, disable=not progress)
    while step < n_steps:
        for batch in loader:
            if step >= n_steps:
                break
            images = encoder.preprocess(batch["he"]).to(device)  # (B, 3, h, w) normalised at the encoder's size
            target = batch["target"].to(device)  # (B, M, h, w) in [-0.9, 0.9]
            with _autocast(device, str(train_cfg.get("precision", "fp32"))):
                pred = model(images)  # (B, M, h, w)
            loss = weighted_mse(pred.float(), target, std)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step + 1} (lower train.lr, or check the "
                                         "targets in preprocess.json)")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(train_cfg["grad_clip"]))
            lr = optimiser.param_groups[0]["lr"]
            optimiser.step()
            schedule.step()
            step += 1
            rows.append({"step": step, "loss": float(loss.item()), "lr": lr, "grad_norm": float(grad_norm)})
            bar.update(1)
            if step % log_every == 0 or step == n_steps:
                window = [r["loss"] for r in rows[-log_every:]]
                log.info("%s step %d/%d: loss %.4f (mean of last %d), lr %.2e", desc, step, n_steps,
                         float(np.mean(window)), len(window), lr)
    bar.close()
    return pd.DataFrame(rows)


Predictor = Callable[[torch.Tensor], np.ndarray]  # uint8 H&E (b, H, W, 3) → predictions (b, M, H, W) in (−1, 1)


def model_predictor(model: torch.nn.Module, encoder: Any, device: torch.device, precision: str = "fp32") -> Predictor:
    """Predictions at the tiles' own size: the encoder resizes to its input size, the output is resized back."""
    model.to(device).eval()

    @torch.no_grad()
    def predict(he: torch.Tensor) -> np.ndarray:
        images = encoder.preprocess(he).to(device)  # (b, 3, h, w)
        with _autocast(device, precision):
            out = model(images).float()  # (b, M, h, w)
        if tuple(out.shape[-2:]) != tuple(he.shape[1:3]):
            out = F.interpolate(out, size=tuple(he.shape[1:3]), mode="bilinear", align_corners=False)
        return out.cpu().numpy()

    return predict


def mean_predictor(preprocessor: MIFPreprocessor) -> Predictor:
    """The mean baseline: every pixel of every marker at its training mean target."""
    mean = np.asarray(preprocessor.target_mean, np.float32)[None, :, None, None]

    def predict(he: torch.Tensor) -> np.ndarray:
        return np.broadcast_to(mean, (he.shape[0], mean.shape[1], he.shape[1], he.shape[2])).copy()

    return predict


def predict_tiles(predictor: Predictor, dataset: MIFTileDataset, batch_size: int) -> Any:
    """Yield (index, (he, target, nuclei), prediction (M, H, W)) over ``dataset``; each tile is read once and
    consecutive tiles of the same size are predicted together."""
    batch: list[tuple[int, tuple]] = []

    def flush(items):
        he = torch.stack([item[0] for _, item in items])  # (b, H, W, 3) uint8
        for (i, item), pred in zip(items, predictor(he)):
            yield i, item, pred

    for i in range(len(dataset)):
        item = dataset.load(i)
        if batch and (len(batch) == batch_size or item[0].shape != batch[0][1][0].shape):
            yield from flush(batch)
            batch = []
        batch.append((i, item))
    if batch:
        yield from flush(batch)


def score_split(predictor: Predictor, dataset: MIFTileDataset, markers: Sequence[str], cell_index: Sequence[int],
                min_area_px: int, batch_size: int, pixels: bool = True, keep: int = 0,
                write_dir: Path | None = None) -> dict[str, Any]:
    """One pass over a split, tile by tile: pixel metrics, per-nucleus means in [0, 1] of the cell markers
    (predicted and measured), the first ``keep`` predictions (figures), prediction TIFFs into ``write_dir``."""
    from .mif_data import to_unit

    acc = PixelAccumulator(markers) if pixels else None
    pred_rows, measured_rows, tiles, labels, kept = [], [], [], [], []
    for i, (_, target, nuclei), pred in predict_tiles(predictor, dataset, batch_size):
        target_np, nuclei_np = target.numpy(), nuclei.numpy()
        if acc is not None:
            acc.update(pred, target_np)
        if cell_index:
            ids, p = nucleus_means(to_unit(pred[list(cell_index)]), nuclei_np, min_area_px)
            _, t = nucleus_means(to_unit(target_np[list(cell_index)]), nuclei_np, min_area_px)
            pred_rows.append(p)
            measured_rows.append(t)
            tiles.extend([dataset.tiles[i].name] * len(ids))
            labels.extend(ids.tolist())
        if len(kept) < keep:
            kept.append(pred)
        if write_dir is not None:
            write_prediction_tiff(write_dir / f"{dataset.tiles[i].name}.tif", pred, markers)
    stack = lambda rows: np.concatenate(rows) if rows else np.zeros((0, len(cell_index)))  # noqa: E731
    return {"pixels": acc, "cells": {"pred": stack(pred_rows), "measured": stack(measured_rows),
                                     "tile": np.asarray(tiles), "label": np.asarray(labels, dtype=np.int64)},
            "kept": kept}


def evaluate_run(predictor: Predictor, val_ds: MIFTileDataset, test_ds: MIFTileDataset, markers: Sequence[str],
                 cell_markers: Sequence[str], eval_cfg: Mapping[str, Any], seed: int = 0, keep: int = 0,
                 write_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[np.ndarray]]:
    """Per-marker pixel and cell metrics on the test split (cell classifier fitted on the validation split),
    the test-cell table and the first ``keep`` test predictions. Cell metrics are NaN for the nuclear stain."""
    index = [list(markers).index(m) for m in cell_markers]
    min_area, batch = int(eval_cfg["min_nucleus_area_px"]), int(eval_cfg["batch_size"])
    test = score_split(predictor, test_ds, markers, index, min_area, batch, keep=keep, write_dir=write_dir)
    table = test["pixels"].table()
    cells = pd.DataFrame()
    if cell_markers:
        val = score_split(predictor, val_ds, markers, index, min_area, batch, pixels=False)
        cell_table, cells, _ = cell_level_evaluation(val["cells"], test["cells"], cell_markers, seed=seed,
                                                     min_cells=int(eval_cfg["gate_min_cells"]))
        cells.insert(0, "label", test["cells"]["label"])
        cells.insert(0, "tile", test["cells"]["tile"])
        table = table.merge(cell_table, on="marker", how="left")
    return table, cells, test["kept"]


# ---------------------------------------------------------------------------------------------
# Checkpoint


def save_checkpoint(model: torch.nn.Module, preprocessor: MIFPreprocessor, cfg: DictConfig, folder: str | Path,
                    encoder_description: Mapping[str, Any]) -> Path:
    """``model.safetensors`` (LoRA merged), ``lora.safetensors``, ``preprocess.json``, ``model.json``, ``config.yaml``."""
    from safetensors.torch import save_file

    from .lora import lora_state_dict, merge_lora

    folder = Path(folder)
    plain = lambda sd: {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}  # noqa: E731
    adapters = plain(lora_state_dict(model))
    merged = merge_lora(copy.deepcopy(model).cpu())
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    with atomic_dir(folder) as tmp:
        save_file(plain(merged.state_dict()), str(tmp / "model.safetensors"))
        if adapters:
            save_file(adapters, str(tmp / "lora.safetensors"))
        preprocessor.save(tmp / "preprocess.json")
        save_config(cfg, tmp / "config.yaml")
        write_json(tmp / "model.json", {
            "format": MODEL_FORMAT, "markers": preprocessor.markers, "n_markers": len(preprocessor.markers),
            "model": model_cfg, "trained_as": model_cfg["finetune"],
            "weights": "model.safetensors holds every weight with LoRA merged: rebuild with finetune='frozen' "
                       "(plain Linear layers) and load_state_dict(strict=True); lora.safetensors holds the "
                       "adapters alone, to apply on the encoder named below",
            "encoder": OmegaConf.to_container(cfg.encoder, resolve=True), "encoder_description": dict(encoder_description),
            "input_size_px": list(getattr(model, "input_size_px", None) or []),
        })
    return folder


def load_mif_checkpoint(folder: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[torch.nn.Module, Any, MIFPreprocessor]:
    """(model in eval mode, the encoder that normalises its inputs, the preprocessing) from a ``model/`` folder.

    The encoder named in ``model.json`` is loaded for its architecture and input normalisation; every
    weight then comes from ``model.safetensors``.
    """
    from safetensors.torch import load_file

    from .encoders import load_encoder

    folder = Path(folder)
    info = read_json_file(folder / "model.json", "an mIF model folder written by finetune.mif.save_checkpoint")
    if info.get("format") != MODEL_FORMAT:
        raise InputError(folder / "model.json", "format", MODEL_FORMAT, info.get("format"))
    encoder = load_encoder(info["encoder"], device="cpu")
    model = build_from_config(encoder, int(info["n_markers"]), info["model"], finetune="frozen")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    preprocessor = MIFPreprocessor.load(folder / "preprocess.json")
    return model.to(device).eval(), encoder, preprocessor


# ---------------------------------------------------------------------------------------------
# The task


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _records(table: pd.DataFrame) -> list[dict]:
    return [{k: _finite(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def _summary(table: pd.DataFrame) -> dict[str, float | None]:
    out = {}
    for key in ("psnr", "ssim", "cell_auc", "f1", "balanced_accuracy"):
        if key in table:
            values = table[key].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            out[key] = float(values.mean()) if values.size else None
    return out


def _run_one(name: str, encoder: Any, cfg: DictConfig, preprocessor: MIFPreprocessor, train_ds: MIFTileDataset,
             device: torch.device) -> tuple[torch.nn.Module, pd.DataFrame]:
    torch.manual_seed(int(cfg.seed))
    model = build_from_config(encoder, len(preprocessor.markers), cfg.model)
    history = train_model(model, encoder, train_ds, preprocessor.target_std, cfg.train, device, seed=int(cfg.seed),
                          progress=bool(cfg.progress), desc=f"mIF {name}")
    return model, history


def run_mif(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """Train and evaluate the mIF head; see the module docstring. Returns the headline figures and paths."""
    from .encoders import load_encoder, random_like, resolve_device
    from .survival import torch_threads

    started = time.time()
    cfg = _merge_defaults(cfg)
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
    train_ds = MIFTileDataset(layout.split("train"), preprocessor, size_px=encoder.input_size_px,
                              augment=bool(cfg.train.augment), cache=cache)
    val_ds = MIFTileDataset(layout.split("val"), preprocessor, cache=cache)
    test_ds = MIFTileDataset(layout.split("test"), preprocessor, cache=cache)
    log.info("mIF: %d markers %s (cell level: %s), tiles train %d / val %d / test %d, device %s", len(markers), markers,
             cell_markers, len(train_ds), len(val_ds), len(test_ds), device)

    eval_args = dict(val_ds=val_ds, test_ds=test_ds, markers=markers, cell_markers=cell_markers, eval_cfg=cfg.eval,
                     seed=int(cfg.seed))
    precision = str(cfg.train.precision)
    n_fig = min(int(cfg.eval.n_figure_tiles), len(test_ds))
    tables: dict[str, pd.DataFrame] = {}
    with torch_threads(cfg.train.threads):
        t0 = time.time()
        model, history = _run_one("PAST encoder", encoder, cfg, preprocessor, train_ds, device)
        train_seconds = time.time() - t0
        model_dir = save_checkpoint(model, preprocessor, cfg, out_dir / "model", encoder.description)
        with contextlib.ExitStack() as stack:
            write_dir = stack.enter_context(atomic_dir(out_dir / "predictions")) if cfg.eval.write_predictions else None
            tables["model"], cells, kept = evaluate_run(model_predictor(model, encoder, device, precision),
                                                        keep=n_fig, write_dir=write_dir, **eval_args)
        baseline_history = None
        if cfg.baseline == "random":
            random_encoder = random_like(encoder, seed=int(cfg.seed) + 1)
            baseline_model, baseline_history = _run_one("random encoder", random_encoder, cfg, preprocessor, train_ds,
                                                        device)
            tables["random encoder"], _, _ = evaluate_run(
                model_predictor(baseline_model, random_encoder, device, precision), **eval_args)
            del baseline_model
        elif cfg.baseline == "mean":
            tables["mean baseline"], _, _ = evaluate_run(mean_predictor(preprocessor), **eval_args)

    result = _write_outputs(cfg, out_dir, layout, preprocessor, cell_markers, tables, cells, history,
                            baseline_history, kept, test_ds, model, train_seconds, started)
    result["model_dir"] = model_dir
    return result


def _loss_ends(history: pd.DataFrame) -> tuple[float, float]:
    """Mean training loss over the first and the last tenth of the steps (at least one step each)."""
    k = max(1, len(history) // 10)
    return float(history["loss"].iloc[:k].mean()), float(history["loss"].iloc[-k:].mean())


def _write_outputs(cfg: DictConfig, out_dir: Path, layout: MIFLayout, preprocessor: MIFPreprocessor,
                   cell_markers: Sequence[str], tables: Mapping[str, pd.DataFrame], cells: pd.DataFrame | None, history: pd.DataFrame,
                   baseline_history: pd.DataFrame | None, kept: Sequence[np.ndarray], test_ds: MIFTileDataset,
                   model: torch.nn.Module, train_seconds: float, started: float) -> dict:
    markers = preprocessor.markers
    per_marker = pd.concat([t.assign(run=name) for name, t in tables.items()], ignore_index=True)
    per_marker = per_marker[["run", *[c for c in per_marker.columns if c != "run"]]]
    with atomic_path(out_dir / "per_marker.csv") as tmp:
        per_marker.to_csv(tmp, index=False, float_format="%.6g")
    if cells is not None and len(cells):
        with atomic_path(out_dir / "cells.csv") as tmp:
            cells.to_csv(tmp, index=False, float_format="%.6g")
    log_frame = history.assign(run="model")
    if baseline_history is not None:
        log_frame = pd.concat([log_frame, baseline_history.assign(run="random encoder")], ignore_index=True)
    with atomic_path(out_dir / "train_log.csv") as tmp:
        log_frame.to_csv(tmp, index=False, float_format="%.6g")

    n_fig = len(kept)
    figure = plot_examples([test_ds.load(i)[0].numpy() for i in range(n_fig)], kept,
                           [test_ds.load(i)[1].numpy() for i in range(n_fig)], markers, out_dir / "examples.png",
                           names=[t.name for t in test_ds.tiles[:n_fig]],
                           nuclei=[test_ds.load(i)[2].numpy() for i in range(n_fig)])
    curve = plot_training_curve(history["step"], history["loss"], history["lr"], out_dir / "training_curve.png")

    loss_first, loss_last = _loss_ends(history)
    elapsed = time.time() - started
    n_cells = int(len(cells)) if cells is not None else 0
    metrics = {
        "markers": markers, "cell_markers": list(cell_markers),
        "tiles": {s: len(layout.split(s)) for s in ("train", "val", "test")}, "n_test_cells": n_cells,
        "data_range": "PSNR/SSIM on targets in [-0.9, 0.9], data_range 1.8, predictions clipped",
        "summary": {name: _summary(t) for name, t in tables.items()},
        "per_marker": {name: _records(t) for name, t in tables.items()},
        "train": {"steps": int(len(history)), "loss_first": loss_first, "loss_last": loss_last,
                  "seconds": round(train_seconds, 1), "warmup_steps": int(cfg.train.warmup_steps),
                  "batch_size": int(cfg.train.batch_size)},
        "model": {**OmegaConf.to_container(cfg.model, resolve=True), "parameters": model.trainable_summary()},
        "preprocess": preprocessor.to_dict(), "seconds": round(elapsed, 1),
    }
    write_json(out_dir / "metrics.json", metrics)

    print(f"\nmIF prediction (MIPHEI head, {cfg.model.variant}, {cfg.model.finetune}) on {len(test_ds)} test tiles, "
          f"{n_cells} test cells; cell classifier trained on {len(layout.split('val'))} validation tiles")
    for name, table in tables.items():
        print("\n" + format_table(table, title=f"[{name}]"))
    print(f"\ntraining: {len(history)} steps in {train_seconds:.0f} s, loss {loss_first:.4f} → {loss_last:.4f}; "
          f"total {elapsed:.0f} s")
    print(f"figures: {figure}, {curve}\nmodel: {out_dir / 'model'}\noutputs: {out_dir}\n")
    return {"out_dir": out_dir, "tables": dict(tables), "summary": metrics["summary"], "metrics": metrics,
            "examples_png": figure, "training_curve_png": curve, "loss_first": loss_first, "loss_last": loss_last}


__all__ = ["DEFAULTS", "run_mif", "prepare_data", "fit_from_config", "build_from_config", "train_model",
           "model_predictor", "mean_predictor", "predict_tiles", "score_split", "evaluate_run", "save_checkpoint",
           "load_mif_checkpoint", "total_steps"]
