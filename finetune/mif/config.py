"""Typed settings of ``launch/finetune.py mif`` (:func:`finetune.mif.run_mif`).

:func:`common.config.load_config` checks a YAML file and ``key=value`` overrides against
:class:`MIFConfig` (unknown keys and wrong types refused, with the closest valid key named);
``run_mif`` applies the same schema to whatever it is given (a dict from a test or a notebook).
Value checks a type cannot express are in :func:`finetune.mif.run.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from finetune.encoders import EncoderConfig


@dataclass
class SyntheticMIFConfig:
    """The synthetic demo set (:func:`finetune.synthetic.mif.write_synthetic_mif`), painted on the bundle's H&E."""

    bundle: Optional[str] = None  # the demo bundle whose H&E (and planted cell types) the markers follow; null = none
    n_tiles: int = 32  # random cell-rich tiles of the bundle's H&E
    tile_px: int = 224  # tile side (px of the H&E's level 0)
    seed: int = 0  # seeds the tiles and the painting
    flip_rate: float = 0.05  # share of a marker's type-positive cells that lose it; as many negatives gain it
    overwrite: bool = False  # repaint the set even when data.root holds one


@dataclass
class MIFDataConfig:
    """The ORION-like data folder (he/, mif/, nuclei/, markers.csv, optional splits.csv)."""

    root: Optional[str] = None  # the folder (written there when data.synthetic is set); required
    markers: Optional[list[str]] = None  # channels to predict; null = every marker and nuclear channel (not the AF one)
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train/val/test without splits.csv
    um_per_px: Optional[float] = None  # tile resolution (µm/px); null = the synthetic set's truth.json (ORION: 0.5)
    synthetic: Optional[SyntheticMIFConfig] = None  # write the demo set when missing; null for real data


@dataclass
class PreprocessConfig:
    """MIPHEI's target transform, fitted on the training tiles (:func:`finetune.mif.data.fit_preprocessor`)."""

    percentile: float = 99.0  # of foreground (x > 0) training pixels after AF subtraction (MIPHEI: 99)
    lambdas: dict[str, Any] = field(
        default_factory=dict
    )  # marker -> λ (or 'auto'); missing = estimated (OLS on background)
    biases: dict[str, Any] = field(
        default_factory=dict
    )  # marker -> b (raw units); missing = -(background + bias_noise_sd·σ)
    background_margin_px: int = 4  # nuclei dilated by this much are not background
    bias_noise_sd: float = 2.0  # background noise (σ) folded into an estimated bias
    fit_max_tiles: int = 512  # training tiles read to fit (seeded subset)
    fit_pixels_per_tile: int = 4096  # random pixels read per tile
    fit_smooth_px: float = 2.0  # λ is fitted on stacks smoothed by this Gaussian (damps AF pixel noise)
    prenormalised_scale: Optional[float] = (
        None  # e.g. 255 for MIPHEI's released (already cleaned, uint8) tiles: u = I / 255
    )


@dataclass
class MIFModelConfig:
    """The generator (:func:`finetune.mif.model.build_mif_model`)."""

    variant: str = "vitmatte"  # vitmatte (MIPHEI-ViT) | unetr
    finetune: str = "lora"  # lora | frozen | full
    lora_rank: int = 8  # rank of the LoRA adapters on the ViT's q/v projections
    lora_alpha: float = 1.0  # LoRA scaling α
    detail_channels: list[int] = field(default_factory=lambda: [48, 96, 192])  # detail stream widths (H/2, H/4, H/8)
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])  # decoder block widths


@dataclass
class MIFTrainConfig:
    """Optimisation (MIPHEI: weighted MSE, Adam, warmup / constant / linear decay, clipping)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:<index>
    batch_size: int = 16  # tiles per step
    epochs: int = 20  # passes over the training tiles; ignored when steps is set
    steps: Optional[int] = None  # total optimiser steps; null = epochs × batches per epoch
    lr: float = 2.0e-4  # Adam learning rate (MIPHEI: 2e-4)
    scale_lr_by_sqrt_batch: bool = False  # MIPHEI's code trains at lr·√batch_size (2e-4·√16 = 8e-4)
    weight_decay: float = 1.0e-5  # Adam weight decay
    warmup_steps: int = 400  # linear warmup (cut to half of training on short runs)
    grad_clip: float = 1.0  # gradient-norm clipping
    augment: bool = True  # random flips / 90° rotations of H&E, targets and nuclei together
    color_augment: bool = True  # with augment: HED jitter and brightness jitter of the H&E alone
    hed_jitter: float = 0.05  # σ of the HED jitter: per-stain density scale 1 ± σ, shift ± σ·mean density
    brightness_jitter: float = 0.1  # H&E intensity times 1 ± this
    val_every: int = 50  # score the validation Cell AUC every this many steps and keep the best (0: last step)
    num_workers: int = 4  # DataLoader worker processes
    cache_tiles: bool = False  # keep preprocessed tiles in memory (small sets)
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    threads: Optional[int] = None  # torch CPU threads; null = torch's default
    log_every: int = 50  # log the mean loss every this many steps


@dataclass
class MIFEvalConfig:
    """Evaluation on the test tiles (cell classifier fitted on the validation tiles)."""

    batch_size: int = 16  # tiles per prediction batch
    min_nucleus_area_px: int = 20  # nuclei smaller than this are not scored (MIPHEI: 20 px at 0.5 µm/px)
    gate_min_cells: int = 10  # cells with signal a marker's GMM gate needs
    dilate_um: float = 0.0  # per-cell means over the nucleus grown by this many µm (0: the nucleus; e.g. 2)
    n_figure_tiles: int = 3  # test tiles in examples.png
    write_predictions: bool = True  # predictions/<tile>.tif per test tile


@dataclass
class MIFControlsConfig:
    """Controls of the encoder comparison (:mod:`finetune.mif.controls`), with ``baseline: random``."""

    random_seeds: int = 3  # random-weight encoders, each training the whole head (time grows with each)
    oracle: bool = True  # the planted cell types as the prediction (synthetic sets: truth.json); the ceiling
    shuffled_oracle: bool = True  # the oracle permuted between cells: must not beat random
    n_boot: int = 1000  # tile-bootstrap resamples for the 95 % intervals


@dataclass
class MIFConfig:
    """``launch/finetune.py mif``: H&E → multiplex immunofluorescence with the MIPHEI-ViT head on a PAST encoder."""

    out_dir: str = "runs/finetune/mif"  # outputs (metrics, tables, figures, predictions, model/)
    seed: int = 0  # seeds the split, preprocessing fit, initialisation and data order
    progress: bool = True  # progress bars
    data: MIFDataConfig = field(default_factory=MIFDataConfig)  # the ORION-like tiles
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # the target transform
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the ViT image encoder the head starts from
    model: MIFModelConfig = field(default_factory=MIFModelConfig)  # the generator
    baseline: str = "mean"  # mean (training mean per marker) | random (same head, random ViTs; controls) | none
    controls: MIFControlsConfig = field(default_factory=MIFControlsConfig)  # oracle, random seeds, bootstrap
    train: MIFTrainConfig = field(default_factory=MIFTrainConfig)  # optimisation
    eval: MIFEvalConfig = field(default_factory=MIFEvalConfig)  # evaluation
    run_dir: Optional[str] = None  # base folder the other paths may interpolate (${run_dir}/...)


__all__ = [
    "MIFConfig",
    "MIFDataConfig",
    "SyntheticMIFConfig",
    "PreprocessConfig",
    "MIFModelConfig",
    "MIFTrainConfig",
    "MIFEvalConfig",
    "MIFControlsConfig",
]
