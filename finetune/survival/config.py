"""Typed settings of ``launch/finetune.py survival`` (:func:`finetune.survival.run_survival`).

:func:`common.config.load_config` checks a YAML file and ``key=value`` overrides against
:class:`SurvivalConfig` (unknown keys and wrong types refused, with the closest valid key named);
``run_survival`` calls :func:`common.config.apply_schema` on what it is given, so a dict from a
test or a notebook is checked the same way. The defaults are MCAT's (Chen et al. 2021); the demo
config shrinks the model and the batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..encoders import EncoderConfig


@dataclass
class SurvivalDataConfig:
    """A real cohort (ignored while ``cohort.synthetic`` is true)."""

    clinical_csv: Optional[str] = (
        None  # case_id, slide_id (';'-separated), survival_months, censorship (1 = censored), omics
    )
    signatures_csv: Optional[str] = None  # group,gene rows (or MCAT's wide signatures.csv)
    image_embeddings: Any = None  # folder of <slide_id>.h5ad|.npz (finetune.embed), or {encoder name: folder}
    slides: dict[str, str] = field(default_factory=dict)  # {slide_id: whole-slide image}: embedded by every encoder
    cell_embeddings: Optional[str] = None  # per-patient CSV/.npz, or a folder of per-slide cell embeddings (PAST-multi)
    max_patches: Optional[int] = 4096  # per patient, seeded subsample; null = every patch


@dataclass
class SurvivalTilesConfig:
    """How the encoders embed whole slides (``finetune.embed.embed_slide_tiles``)."""

    um_per_px: float = 0.5  # tile resolution (µm/pixel)
    size_px: int = 224  # tile side in pixels
    min_tissue_fraction: float = 0.5  # share of the tile on the tissue mask
    batch_size: int = 64  # tiles per forward pass
    which: str = "backbone"  # backbone (pooled features) | projected (joint space, unit norm)


@dataclass
class BaseCellsConfig:
    """The exported PAST cell encoder over the cells of a shard manifest: the pool of the synthetic cell tokens."""

    manifest: Optional[str] = None  # shard manifest whose cells are embedded
    cell_encoder: Optional[str] = None  # export folder of the PAST cell encoder
    which: str = "projected"  # projected (joint space, unit norm) | cell (transformer feature)
    batch_size: int = 256  # cells per forward pass


@dataclass
class CohortConfig:
    """Synthetic demo cohort (``finetune.synthetic.make_cohort``), written to ``out_dir`` and used instead of data.*."""

    synthetic: bool = False  # make and use the synthetic cohort
    out_dir: Optional[str] = None  # null = <out_dir>/cohort
    n_patients: int = 80  # patients in the cohort
    embedding_dim: int = 64  # patch embedding size when no real base embeddings are given
    cell_dim: int = 32  # cell embedding size when no real base cell embeddings are given
    image_effect: float = 1.0  # log-hazard per sd of the image latent factor
    genomic_effect: float = 1.0  # log-hazard per sd of the genomic latent factor
    cell_effect: float = 0.5  # log-hazard per sd of the cell latent factor
    censoring_fraction: float = 0.3  # share of censored patients
    base_slide: Optional[str] = None  # a real slide whose tiles, embedded by each of `encoders`, form the base bags
    base_embeddings: Optional[str] = None  # or a folder/file of real patch embeddings to plant the risk direction on
    base_cell_embeddings: Optional[str] = None  # a folder/file of real cell embeddings whose means form the cell tokens
    base_cells: BaseCellsConfig = field(default_factory=BaseCellsConfig)  # or cell embeddings made here
    encoder_name: str = "synthetic"  # the name of the image source when no encoder embeds a base slide
    # A bundle with ground_truth_cells.parquet: each base tile's planted cell-state share makes ONE cohort for
    # every encoder (risk in which tissue a bag holds); null = a direction planted in each encoder's own space
    states_from: Optional[str] = None
    risk_cell_types: list[str] = field(default_factory=lambda: ["immune"])  # planted types whose share is the state
    tilt: float = 1.5  # how strongly a patient's image latent tilts which tiles their bag draws


@dataclass
class MCATConfig:
    """The MCAT model (``finetune.survival.model.MCAT``)."""

    dim: int = 256  # token width
    n_heads: int = 8  # attention heads
    n_layers: int = 2  # transformer layers per modality
    dropout: float = 0.25  # dropout
    n_bins: int = 4  # discrete-time hazard bins (quartiles of the training patients' uncensored times)


@dataclass
class SurvivalTrainConfig:
    """Cross-validation and training."""

    n_folds: int = 5  # K-fold cross-validation by patient, stratified on event status
    epochs: int = 20  # passes over the training patients
    batch_size: int = 1  # patients per forward pass (bags padded and masked)
    grad_accumulation: int = 32  # MCAT's gc: batches per optimiser step
    lr: float = 2.0e-4  # Adam learning rate
    weight_decay: float = 1.0e-5  # Adam weight decay
    alpha: float = 0.0  # up-weighting of the uncensored term of the NLL loss
    device: str = "cpu"  # cpu | cuda | cuda:<index> (also the encoders' device)
    threads: Optional[int] = None  # torch CPU threads while training (1 is fastest for the small demo models)


@dataclass
class SurvivalConfig:
    """``launch/finetune.py survival``: cross-validated MCAT survival for every mode × image encoder."""

    run_dir: Optional[str] = None  # base folder the other paths may interpolate (${run_dir}/...)
    out_dir: str = "runs/finetune/survival"  # tables, metrics.json, kaplan_meier.png, config.yaml
    seed: int = 0  # folds, subsampling, the synthetic cohort and model initialisation
    progress: bool = True  # progress bars
    modes: list[str] = field(default_factory=lambda: ["pathology", "genomic", "mcat", "past_multi"])  # see MODE_NAMES
    data: SurvivalDataConfig = field(default_factory=SurvivalDataConfig)  # a real cohort
    # Image encoders to compare, {name: encoder section}; each embeds the tissue tiles of data.slides
    # (or of cohort.base_slide for the synthetic cohort).
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    tiles: SurvivalTilesConfig = field(default_factory=SurvivalTilesConfig)  # tiling of the slides
    cohort: CohortConfig = field(default_factory=CohortConfig)  # the synthetic demo cohort
    model: MCATConfig = field(default_factory=MCATConfig)  # MCAT
    train: SurvivalTrainConfig = field(default_factory=SurvivalTrainConfig)  # cross-validation and training
    baseline: Optional[str] = "random"  # random: a random-weight copy of the first encoder joins the comparison
    baseline_modes: Optional[list[str]] = None  # modes the random encoder trains; null = all (ridge-Cox always)
    ridge_cox: bool = True  # reference rows: ridge-Cox on each encoder's mean patch embedding (+ the oracle)
    n_boot: int = 1000  # bootstrap resamples of patients for the 95 % intervals of the pooled C-index


__all__ = [
    "SurvivalConfig",
    "SurvivalDataConfig",
    "SurvivalTilesConfig",
    "CohortConfig",
    "BaseCellsConfig",
    "MCATConfig",
    "SurvivalTrainConfig",
]
