"""Typed settings of ``launch/finetune.py ihc`` (:func:`finetune.ihc.run_ihc`).

:func:`common.config.load_config` checks a YAML file and ``key=value`` overrides against
:class:`IHCConfig` (unknown keys and wrong types refused, with the closest valid key named);
``run_ihc`` applies the same schema to whatever it is given (a dict from a test or a notebook).
Value checks that a type cannot express (one of a few names, a fraction) are in
:func:`finetune.ihc.run.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from finetune.encoders import EncoderConfig


@dataclass
class SplitConfig:
    """Train/test split of a flat layout (``HE/<name>.png``); a split layout's folders are used as they are."""

    test_fraction: float = 0.2  # seeded held-out fraction of the tiles
    seed: Optional[int] = None  # null = the run's seed


@dataclass
class SyntheticIHCConfig:
    """The synthetic demo set (:func:`finetune.synthetic.ihc.write_synthetic_ihc`), painted on the bundle's H&E."""

    bundle: Optional[str] = None  # the demo bundle whose H&E (and planted cell types) the IHC is painted on
    n_tiles: int = 200  # random cell-rich tiles of the bundle's H&E (tiles without nuclei are dropped)
    tile_px: int = 256  # tile side (px of the H&E's level 0)
    seed: Optional[int] = None  # null = the run's seed
    test_fraction: float = 0.2  # seeded share of the tiles held out for testing
    positivity_rate: list[float] = field(default_factory=lambda: [0.8, 1.0])  # per-tile factor on P(positive) range
    intensity_scale: list[float] = field(default_factory=lambda: [0.85, 1.15])  # per-tile factor on intensity range
    max_nucleus_um2: Optional[float] = 120.0  # larger "nuclei" (merged dark tissue) are dropped; null keeps all
    ink_green_minus_red: Optional[float] = 15.0  # "nuclei" with mean G − R above this (8-bit) are ink; null keeps all
    overwrite: bool = False  # repaint the set even when data.root exists


@dataclass
class IHCDataConfig:
    """The paired H&E / IHC tiles (layout in :mod:`finetune.layouts`)."""

    root: Optional[str] = None  # the paired folder (HE/, IHC/, optional nuclei/ and truth.csv); required
    split: SplitConfig = field(default_factory=SplitConfig)  # flat layouts only
    cache: bool = False  # keep decoded training tiles in RAM (small sets)
    synthetic: Optional[SyntheticIHCConfig] = None  # paint a synthetic set at root when missing; null for real data


@dataclass
class IHCModelConfig:
    """The FiLM U-Net generator (:class:`finetune.ihc.model.FiLMUNet`)."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # widths per stage (pix2pix-like)
    norm: str = "group"  # group | instance | batch | none
    film: bool = True  # FiLM from the tile embedding on the bottleneck and every decoder stage


@dataclass
class GANConfig:
    """pix2pix's conditional PatchGAN (off: L1 only, no discriminator is built)."""

    enabled: bool = False  # train with the adversarial term
    mode: str = "vanilla"  # vanilla (BCE with logits) | lsgan
    channels: int = 64  # width of the first discriminator layer
    n_layers: int = 3  # strided layers; 3 = the 70×70 px PatchGAN
    norm: str = "instance"  # normalisation of the discriminator
    lr: Optional[float] = None  # discriminator learning rate; null = train.lr


@dataclass
class IHCTrainConfig:
    """Optimisation (Adam, λ·L1 [+ GAN], constant then linearly decaying learning rate)."""

    epochs: int = 50  # passes over the training tiles
    batch_size: int = 8  # crops per step
    lr: float = 2.0e-4  # Adam learning rate (pix2pix: 2e-4)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam β (pix2pix: 0.5, 0.999)
    l1_weight: float = 100.0  # λ of λ·L1 + GAN
    decay_fraction: float = 0.5  # linear lr decay to 0 over this last fraction of the steps
    augment: bool = True  # random crop, flips and 90° rotations, the same for H&E and IHC
    crop_px: Optional[int] = None  # square training crop; null = the smallest tile side
    num_workers: int = 0  # DataLoader worker processes
    train_fit_tiles: int = 32  # training tiles on which L1 before / after training is reported (0 = none)


@dataclass
class IHCEvalConfig:
    """Evaluation on the test tiles."""

    thresholds: Optional[list[float]] = None  # DAB weak/moderate/strong (rgb2hed units); null = QuPath's 0.2/0.4/0.6 OD
    batch_size: int = 8  # tiles per prediction batch
    min_nucleus_area_px: int = 30  # nuclei segmented on the H&E when the set has no masks
    n_examples: int = 4  # tiles in examples.png, spread over the real H-score range


@dataclass
class WSIConfig:
    """Optional virtual IHC of a whole slide: overlapping tiles blended into a pyramidal OME-TIFF."""

    slide: Optional[str] = None  # the H&E slide; null skips the step
    tile_px: Optional[int] = None  # null = the training crop size (the embedding then sees the same field of view)
    overlap_px: int = 64  # overlap of neighbouring tiles, blended without seams
    level: int = 0  # pyramid level of the slide to read
    batch_size: int = 8  # tiles per prediction batch
    tissue_only: bool = True  # skip background tiles


@dataclass
class IHCConfig:
    """``launch/finetune.py ihc``: virtual IHC from H&E with a FiLM U-Net driven by the PAST embedding."""

    run_dir: str = "runs/demo"  # base folder the other paths may interpolate (${run_dir}/...)
    out_dir: Optional[str] = None  # outputs (metrics.json, per_tile.csv, figures, generator); required
    seed: int = 0  # seeds the split, initialisation, data order and the random baseline encoder
    progress: bool = True  # progress bars
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    data: IHCDataConfig = field(default_factory=IHCDataConfig)  # the paired tiles
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen image encoder
    embedding: str = "projection"  # projection (joint space, when the encoder has one) | backbone
    embed_batch_size: int = 64  # tiles per embedding batch
    baseline: str = "random"  # random (FiLM from a random encoder) | no_film (same U-Net without FiLM) | none
    model: IHCModelConfig = field(default_factory=IHCModelConfig)  # the generator
    gan: GANConfig = field(default_factory=GANConfig)  # the PatchGAN
    train: IHCTrainConfig = field(default_factory=IHCTrainConfig)  # optimisation
    eval: IHCEvalConfig = field(default_factory=IHCEvalConfig)  # evaluation
    wsi: WSIConfig = field(default_factory=WSIConfig)  # optional whole-slide prediction


__all__ = [
    "IHCConfig",
    "IHCDataConfig",
    "SplitConfig",
    "SyntheticIHCConfig",
    "IHCModelConfig",
    "GANConfig",
    "IHCTrainConfig",
    "IHCEvalConfig",
    "WSIConfig",
]
