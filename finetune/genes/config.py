"""Typed settings of ``launch/finetune.py genes`` (:func:`finetune.genes.run_genes`).

:func:`common.config.load_config` checks a YAML file and ``key=value`` overrides against
:class:`GenesConfig` (unknown keys and wrong types refused, with the closest valid key named);
``run_genes`` calls :func:`common.config.apply_schema` on what it is given, so a dict from a test
or a notebook is checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..encoders import EncoderConfig


@dataclass
class GenesDataConfig:
    """Where the cells come from."""

    manifest: Optional[str] = None  # the shard manifest (or its folder) (required)
    bundles: dict[str, str] = field(default_factory=dict)  # slide id -> Xenium bundle, when it moved since the shards


@dataclass
class SplitConfig:
    """How cells are split into training and test (``finetune.genes.splits.split_cells``)."""

    test_fraction: float = 0.2  # inter/cross: held-out groups hold at least this share of cells
    test_groups: Optional[list[str]] = None  # inter/cross: explicit patients / cancer types to hold out
    intra_by: str = "blocks"  # blocks (stripes of equal cell count along the slide's long axis) | registration_region
    n_blocks: int = 5  # intra: one block of each slide is the test set
    gap_um: Optional[float] = None  # training cells this close (µm) to a test cell are dropped; null = one crop width


@dataclass
class GeneListsConfig:
    """Per setting: a list of genes, a file (one gene per line), or null = the top ``n_top`` HVGs."""

    intra: Any = None  # genes for the intra setting (list, file, or null)
    inter: Any = None  # genes for the inter setting
    cross: Any = None  # genes for the cross setting
    n_top: int = 50  # highly variable genes of the training cells when no list is given


@dataclass
class GenesEmbedConfig:
    """Embedding the crops with the frozen encoder."""

    batch_size: int = 64  # crops per forward pass


@dataclass
class LinearProbeConfig:
    """Ridge regression on frozen features."""

    alphas: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0])  # GCV grid


@dataclass
class FinetuneConfig:
    """End to end: encoder + linear head (initialised from the probe), AdamW on standardised MSE."""

    epochs: int = 2  # passes over the training cells
    batch_size: int = 32  # crops per step
    lr_backbone: float = 1.0e-5  # learning rate of the encoder
    lr_head: float = 1.0e-3  # learning rate of the linear head
    weight_decay: float = 0.01  # AdamW weight decay
    augment: bool = True  # random flips / 90° rotations of the crops


@dataclass
class ClusteringConfig:
    """Leiden clusters of measured vs predicted expression (``finetune.genes.evaluate.cluster``)."""

    n_pcs: int = 20  # principal components
    n_neighbors: int = 15  # kNN graph
    resolution: float = 1.0  # Leiden resolution


@dataclass
class FigureConfig:
    """Spatial maps of measured vs predicted expression."""

    genes: Optional[list[str]] = None  # genes to map; null = the best-predicted gene of the main run


@dataclass
class ControlsConfig:
    """Positive and negative controls, and bootstrap intervals (``finetune.controls``)."""

    oracle: Optional[str] = "auto"  # planted truth: auto | a sample-json column | an annotation CSV | none
    shuffled_oracle: bool = True  # the oracle on labels permuted between cells: must not beat random
    random_seeds: int = 3  # random-weight encoders (baseline: random); the first also runs every mode
    n_blocks: int = 20  # spatial blocks of the test cells (k-means per slide) resampled by the bootstrap
    n_boot: int = 1000  # bootstrap resamples for the 95 % intervals


@dataclass
class GenesConfig:
    """``launch/finetune.py genes``: single-cell gene-expression prediction from H&E crops."""

    run_dir: Optional[str] = None  # base folder the other paths may interpolate (${run_dir}/...)
    out_dir: Optional[str] = None  # results folder, written complete or not at all (required)
    seed: int = 0  # split, baseline weights, fine-tuning and clustering
    progress: bool = True  # progress bars
    device: str = "auto"  # auto (a CUDA GPU when present) | cpu | cuda | cuda:<index>
    data: GenesDataConfig = field(default_factory=GenesDataConfig)  # the cells
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the image encoder under test
    baseline: Optional[str] = "random"  # random (same architecture, random weights) | none
    setting: str = (
        "intra"  # intra (held-out blocks of a slide) | inter (held-out patients) | cross (held-out cancer type)
    )
    split: SplitConfig = field(default_factory=SplitConfig)  # train/test split
    genes: GeneListsConfig = field(default_factory=GeneListsConfig)  # the genes to predict
    modes: list[str] = field(default_factory=lambda: ["linear_probe"])  # linear_probe and/or finetune
    embed: GenesEmbedConfig = field(default_factory=GenesEmbedConfig)  # frozen-encoder embedding
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)  # ridge probe
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # end-to-end training
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)  # cluster agreement
    figure: FigureConfig = field(default_factory=FigureConfig)  # spatial maps
    controls: ControlsConfig = field(default_factory=ControlsConfig)  # oracle, random seeds, intervals


__all__ = [
    "GenesConfig",
    "GenesDataConfig",
    "SplitConfig",
    "GeneListsConfig",
    "GenesEmbedConfig",
    "LinearProbeConfig",
    "FinetuneConfig",
    "ClusteringConfig",
    "ControlsConfig",
    "FigureConfig",
]
