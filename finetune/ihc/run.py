"""Virtual immunohistochemistry from H&E (PAST paper, "Single-cell virtual immunohistochemistry").

    python launch/finetune.py ihc --config configs/finetune/ihc_demo.yaml [key=value ...]

A U-Net translates each H&E tile into its IHC; FiLM layers on the bottleneck and every decoder
stage are driven by the PAST image embedding of the tile (:mod:`finetune.ihc.model`). Steps:

1. data: paired tiles in an IHC4BC/BCI-like layout (:mod:`finetune.ihc.data`); with
   ``data.synthetic`` set and the root missing (or ``overwrite``), a synthetic set is painted on
   the demo bundle's real H&E first (:mod:`finetune.synthetic.ihc`);
2. embeddings: the frozen encoder (``encoder`` section, :func:`finetune.encoders.load_encoder`)
   embeds every full tile once (``embedding: projection`` = the joint-space projection when the
   encoder has one, else ``backbone`` features), standardised per dimension on the training tiles;
3. training (:mod:`finetune.ihc.train`): Adam (β 0.5, 0.999), λ·L1 (+ PatchGAN when ``gan.enabled``), random flips and 90°
   rotations applied to H&E and IHC alike, linear learning-rate decay over the last
   ``train.decay_fraction`` of the steps. The baseline is trained the same way in the same run:
   FiLM fed the embedding of a random encoder of the same architecture (``baseline: random``),
   the same U-Net without FiLM (``no_film``) or none;
4. evaluation on the test split (:mod:`finetune.ihc.evaluate`): PSNR and SSIM per tile (RGB in [0, 1], data range 1), H-scores
   of predicted and real IHC on the same nuclei (the set's nuclei masks, else
   ``segment_nuclei`` on the H&E), their Pearson / Spearman correlation across tiles and mean
   absolute error; two references cost nothing: the H&E itself as the IHC ("identity") and the
   mean training IHC colour;
5. outputs in ``out_dir``: ``metrics.json``, ``per_tile.csv``, ``examples.png`` (H&E | predictions |
   real IHC), ``hscore_scatter.png``, ``generator.safetensors`` + ``generator.json``, ``config.yaml``;
6. optional whole-slide step (``wsi.slide``): overlapping tiles blended without seams into
   ``virtual_ihc.ome.tif`` (:mod:`finetune.ihc.wsi`) and a preview PNG.

Settings: :class:`finetune.ihc.config.IHCConfig`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_dir
from common.config import apply_schema, save_config
from common.errors import InputError
from finetune.encoders import ImageEncoder, load_encoder, random_like, resolve_device
from finetune.metrics import DEFAULT_DAB_THRESHOLDS
from finetune.report import number, write_metrics
from finetune.synthetic.ihc import write_synthetic_ihc
from finetune.synthetic.stain_tiles import demo_cell_tiles

from .config import IHCConfig
from .data import (
    EMBEDDINGS,
    EmbeddingScaler,
    PairDataset,
    embed_tiles,
    load_pair,
    read_pairs,
    read_rgb,
    read_truth,
    resolve_which,
    train_crop_px,
)
from .evaluate import (
    correlation,
    evaluate,
    example_indices,
    format_table,
    mean_l1,
    plot_examples,
    plot_hscore_scatter,
    predict_ihc,
    summarise,
)
from .model import GAN_MODES, NORMS, FiLMUNet, build_generator, save_generator
from .train import fit_generator
from .wsi import run_wsi

log = logging.getLogger(__name__)

BASELINES = ("random", "no_film", "none")


# ---------------------------------------------------------------------------------------------
# Config


def _validate(cfg: DictConfig) -> None:
    if not cfg.out_dir:
        raise InputError(None, "out_dir", "an output folder", cfg.out_dir)
    if not cfg.data.root:
        raise InputError(None, "data.root", "the paired H&E/IHC folder (HE/, IHC/)", cfg.data.root)
    out_dir, root = Path(cfg.out_dir).resolve(), Path(cfg.data.root).resolve()
    if root == out_dir or out_dir in root.parents:
        # out_dir is replaced as a whole when the run ends: data inside it would be deleted
        raise InputError(None, "data.root", f"a folder outside out_dir ({cfg.out_dir})", cfg.data.root)
    if cfg.baseline not in BASELINES:
        raise InputError(None, "baseline", f"one of {BASELINES}", cfg.baseline)
    if cfg.embedding not in EMBEDDINGS:
        raise InputError(None, "embedding", f"one of {EMBEDDINGS}", cfg.embedding)
    if cfg.model.norm not in NORMS:
        raise InputError(None, "model.norm", f"one of {NORMS}", cfg.model.norm)
    if cfg.gan.mode not in GAN_MODES:
        raise InputError(None, "gan.mode", f"one of {GAN_MODES}", cfg.gan.mode)
    for key in ("epochs", "batch_size"):
        if int(cfg.train[key]) < 1:
            raise InputError(None, f"train.{key}", "a positive integer", cfg.train[key])
    if not 0 <= float(cfg.train.decay_fraction) <= 1:
        raise InputError(None, "train.decay_fraction", "a fraction in [0, 1]", cfg.train.decay_fraction)
    thresholds = dab_thresholds(cfg)
    if len(thresholds) != 3 or not 0 <= thresholds[0] < thresholds[1] < thresholds[2]:
        raise InputError(None, "eval.thresholds", "three increasing DAB values (weak, moderate, strong)", thresholds)


def dab_thresholds(cfg: DictConfig) -> list[float]:
    """(weak, moderate, strong) DAB thresholds: ``eval.thresholds`` or ``DEFAULT_DAB_THRESHOLDS``."""
    given = cfg.eval.thresholds
    return [float(t) for t in (DEFAULT_DAB_THRESHOLDS if given is None else given)]


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(cfg: DictConfig) -> Path:
    """The paired-tile root; paints the synthetic set first when ``data.synthetic`` asks for it."""
    root = Path(cfg.data.root)
    synthetic = cfg.data.synthetic
    if synthetic is None or (root.exists() and not bool(synthetic.overwrite)):
        if synthetic is not None:
            log.info("using the existing synthetic IHC set %s (data.synthetic.overwrite=true repaints it)", root)
        return root
    if not synthetic.bundle:
        raise InputError(None, "data.synthetic.bundle", "the demo bundle whose H&E the IHC is painted on", None)
    seed = int(cfg.seed if synthetic.seed is None else synthetic.seed)
    tiles = demo_cell_tiles(synthetic.bundle, int(synthetic.n_tiles), int(synthetic.tile_px), seed=seed)
    write_synthetic_ihc(
        root,
        tiles,
        seed=seed,
        test_fraction=float(synthetic.test_fraction),
        thresholds=dab_thresholds(cfg),
        positivity_rate=list(synthetic.positivity_rate),
        intensity_scale=list(synthetic.intensity_scale),
        max_nucleus_um2=synthetic.max_nucleus_um2,
        ink_green_minus_red=synthetic.ink_green_minus_red,
        overwrite=bool(synthetic.overwrite),
    )
    return root


# ---------------------------------------------------------------------------------------------
# Entry point


def run_ihc(cfg) -> dict:
    """``python launch/finetune.py ihc --config ...``: train, evaluate, print and write (module docstring).

    Returns the metrics dict also written to ``metrics.json`` (plus ``out_dir`` and ``table``).
    """
    cfg = apply_schema(IHCConfig, cfg)
    _validate(cfg)
    started = time.perf_counter()
    seed, progress = int(cfg.seed), bool(cfg.progress)
    device = resolve_device(cfg.device)
    thresholds = dab_thresholds(cfg)
    timings: dict[str, float] = {}

    root = prepare_data(cfg)
    split_seed = seed if cfg.data.split.seed is None else int(cfg.data.split.seed)
    train_pairs = read_pairs(root, "train", float(cfg.data.split.test_fraction), split_seed)
    test_pairs = read_pairs(root, "test", float(cfg.data.split.test_fraction), split_seed)
    truth = read_truth(root)
    timings["data_s"] = time.perf_counter() - started

    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=seed, device=device)
    which = resolve_which(encoder, cfg.embedding)
    # name -> (encoder whose embedding drives FiLM, or None for a U-Net without FiLM; which output)
    variants: dict[str, tuple[ImageEncoder | None, str]] = {}
    if bool(cfg.model.film):
        main_name = ("random_init" if encoder.description.get("source") == "random" else "pretrained") + "_film"
        variants[main_name] = (encoder, which)
        if cfg.baseline == "random":
            # random_like has no projection head: its pooled backbone features drive FiLM
            variants["random_film"] = (random_like(encoder, seed=seed + 1), "backbone")
        elif cfg.baseline == "no_film":
            variants["no_film"] = (None, "backbone")
    else:
        main_name = "no_film"
        variants[main_name] = (None, "backbone")
        if cfg.baseline != "none":
            log.info("model.film is false: the main model is the plain U-Net, no %s baseline to compare", cfg.baseline)

    t0 = time.perf_counter()
    embeddings: dict[str, tuple[np.ndarray, np.ndarray, EmbeddingScaler] | None] = {}
    for name, (enc, w) in variants.items():
        if enc is None:
            embeddings[name] = None
            continue
        train_emb = embed_tiles(enc, train_pairs, w, int(cfg.embed_batch_size), progress, f"embed {name} train")
        test_emb = embed_tiles(enc, test_pairs, w, int(cfg.embed_batch_size), progress, f"embed {name} test")
        scaler = EmbeddingScaler.fit(train_emb)
        embeddings[name] = (scaler(train_emb), scaler(test_emb), scaler)
    timings["embed_s"] = time.perf_counter() - t0

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    gan_cfg = OmegaConf.to_container(cfg.gan, resolve=True)
    multiple = 2 ** (len(model_cfg["channels"]) - 1)
    crop = train_crop_px(train_pairs, train_cfg.get("crop_px"), multiple)
    generators: dict[str, FiLMUNet] = {}
    histories: dict[str, list[dict]] = {}
    fit_check: dict[str, float] = {}
    fit_pairs = train_pairs[: int(train_cfg.get("train_fit_tiles") or 0)]
    t0 = time.perf_counter()
    for name, emb in embeddings.items():
        torch.manual_seed(seed)  # the same U-Net initialisation for every variant
        generator = build_generator({**model_cfg, "film": emb is not None}, None if emb is None else emb[0].shape[1])
        generator.to(device)
        train_emb = emb[0] if emb is not None else np.zeros((len(train_pairs), 1), np.float32)
        if name == main_name and fit_pairs:
            fit_check["l1_untrained"] = mean_l1(generator, fit_pairs, None if emb is None else emb[0], device)
        dataset = PairDataset(train_pairs, train_emb, crop, bool(train_cfg["augment"]), bool(cfg.data.cache))
        generators[name], _, histories[name] = fit_generator(
            generator, dataset, train_cfg, gan_cfg, device, seed, progress, desc=f"train {name}"
        )
        if name == main_name and fit_pairs:
            fit_check["l1_trained"] = mean_l1(generators[name], fit_pairs, None if emb is None else emb[0], device)
            fit_check["n_tiles"] = len(fit_pairs)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # a subset is plenty for one mean colour and spares rereading a large training set
    mean_colour = np.mean([read_rgb(p.ihc_path).reshape(-1, 3).mean(axis=0) for p in train_pairs[:256]], axis=0)
    mean_colour = np.rint(mean_colour).astype(np.uint8)  # (3,) the training IHC's mean RGB
    models = {name: (g, None if embeddings[name] is None else embeddings[name][1]) for name, g in generators.items()}
    table = evaluate(
        models,
        test_pairs,
        mean_colour,
        device,
        thresholds,
        int(cfg.eval.min_nucleus_area_px),
        int(cfg.eval.batch_size),
        progress,
    )
    if truth is not None:
        table["h_score_planted"] = table["name"].map(truth["h_score"])
    rows = [*generators, "identity", "mean_colour"]
    results = {name: summarise(table, name) for name in rows}
    timings["evaluate_s"] = time.perf_counter() - t0

    comparison = {}
    baseline_name = next((n for n in generators if n != main_name), None)
    if baseline_name is not None:
        ours, base = results[main_name], results[baseline_name]
        comparison = {
            "baseline": baseline_name,
            "delta_psnr_db": ours["psnr_db"] - base["psnr_db"],
            "delta_ssim": ours["ssim"] - base["ssim"],
            "delta_h_score_pearson": ours["h_score_pearson"] - base["h_score_pearson"],
        }
    real_vs_planted = None
    if truth is not None:
        real_vs_planted = correlation(
            table["h_score_real"].to_numpy(float), table["h_score_planted"].to_numpy(float), "pearson"
        )

    out_dir = Path(cfg.out_dir)
    summary: dict[str, Any] = {
        "data_root": str(root),
        "n_train": len(train_pairs),
        "n_test": len(test_pairs),
        "train_crop_px": crop,
        "device": str(device),
        "encoder": encoder.description,
        "embedding": which,
        "main": main_name,
        "baseline": baseline_name,
        "thresholds": thresholds,
        "results": results,
        "comparison": comparison,
        "train_fit": fit_check,
        "real_vs_planted_h_score_pearson": real_vs_planted,
        "history": histories,
        "figures": ["examples.png", "hscore_scatter.png"],
        "wsi": None,
        "timings_s": timings,
        "seconds": None,
    }
    with atomic_dir(out_dir) as tmp:
        save_config(cfg, tmp / "config.yaml")
        table.to_csv(tmp / "per_tile.csv", index=False, float_format="%.5f")
        main_emb = embeddings[main_name]
        save_generator(
            tmp,
            generators[main_name],
            {
                "film": main_emb is not None,
                "embedding": which,
                "encoder": encoder.description,
                "train_crop_px": crop,
                "embedding_mean": None if main_emb is None else main_emb[2].mean.tolist(),
                "embedding_std": None if main_emb is None else main_emb[2].std.tolist(),
            },
        )
        examples = example_indices(table["h_score_real"].to_numpy(float), int(cfg.eval.n_examples))
        example_pairs = [test_pairs[i] for i in examples]
        loaded = [load_pair(p) for p in example_pairs]
        he_tiles = [he for he, _, _ in loaded]
        example_preds = {
            name: predict_ihc(g, he_tiles, None if e is None else e[examples], device)
            for name, (g, e) in models.items()
        }
        example_scores = {name: table[f"h_score_{name}"].to_numpy(float)[examples] for name in generators}
        example_scores["real"] = table["h_score_real"].to_numpy(float)[examples]
        plot_examples(
            tmp / "examples.png",
            [p.name for p in example_pairs],
            he_tiles,
            example_preds,
            [ihc for _, ihc, _ in loaded],
            example_scores,
        )
        plot_hscore_scatter(
            tmp / "hscore_scatter.png",
            table["h_score_real"].to_numpy(float),
            {name: table[f"h_score_{name}"].to_numpy(float) for name in generators},
            results,
        )
        if cfg.wsi.slide:
            t0 = time.perf_counter()
            main_encoder = variants[main_name][0]
            summary["wsi"] = run_wsi(
                cfg,
                tmp,
                generators[main_name],
                main_encoder,
                which,
                None if main_emb is None else main_emb[2],
                crop,
                device,
                progress,
            )
            summary["wsi"]["out_path"] = str(out_dir / "virtual_ihc.ome.tif")
            summary["figures"].append("virtual_ihc_preview.png")
            timings["wsi_s"] = time.perf_counter() - t0
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write_metrics(tmp / "metrics.json", summary)

    header = (
        f"virtual IHC · {len(train_pairs)} train / {len(test_pairs)} test tiles · {crop} px crops · "
        f"embedding {which} · DAB thresholds {'/'.join(f'{t:.3f}' for t in thresholds)} · "
        f"{int(cfg.train.epochs)} epochs on {device}"
    )
    text = format_table(results, header)
    if fit_check:
        text += (
            f"\ntraining tiles ({fit_check['n_tiles']}): L1 {fit_check['l1_untrained']:.4f} untrained → "
            f"{fit_check['l1_trained']:.4f} trained"
        )
    if comparison:
        text += (
            f"\n{main_name} vs {baseline_name}: Δ PSNR {number(comparison['delta_psnr_db'], '+.2f')} dB, "
            f"Δ SSIM {number(comparison['delta_ssim'], '+.3f')}, "
            f"Δ H-score r {number(comparison['delta_h_score_pearson'], '+.3f')}"
        )
    if real_vs_planted is not None:
        text += f"\nreal IHC vs planted H-score: r = {real_vs_planted:.3f} (a check of the scoring)"
    if summary["wsi"]:
        w = summary["wsi"]
        text += (
            f"\nwhole slide: {w['shape_hw'][1]} × {w['shape_hw'][0]} px, {w['tiles_predicted']} tiles "
            f"({w['tiles_skipped']} background skipped) in {w['seconds']:.1f} s → virtual_ihc.ome.tif"
        )
    text += (
        f"\nwritten to {out_dir}: metrics.json, per_tile.csv, generator.safetensors, "
        + ", ".join(summary["figures"])
        + f" ({summary['seconds']:.0f} s)"
    )
    print(text, flush=True)
    return {**summary, "out_dir": str(out_dir), "table": text}


__all__ = ["BASELINES", "run_ihc", "prepare_data", "dab_thresholds"]
