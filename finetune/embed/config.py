"""Typed settings of ``launch/finetune.py embed`` (:func:`finetune.embed.run_embed`); the encoder section every head
shares is :class:`finetune.encoders.EncoderConfig`.

:func:`common.config.load_config` checks a YAML file and ``key=value`` overrides against
:class:`EmbedConfig` (unknown keys and wrong types refused, with the closest valid key named);
``run_embed`` calls :func:`common.config.apply_schema` on what it is given, so a dict from a test or
a notebook is checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..encoders import EncoderConfig


@dataclass
class WholeSlideConfig:
    """One whole slide cut into tissue tiles."""

    path: Optional[str] = None  # the whole-slide image (OME-TIFF, SVS, ...)
    id: Optional[str] = None  # slide id in the outputs; null = the file name up to its first dot
    um_per_px: Optional[float] = None  # override the pixel size the file declares (µm per level-0 pixel)
    meta: dict[str, Any] = field(default_factory=dict)  # copied into every tile's obs row (patient, cancer_type, ...)


@dataclass
class TilesConfig:
    """How whole slides are cut into tiles."""

    um_per_px: float = 0.5  # tile resolution (µm/pixel); the slide is read at the nearest finer level
    size_px: int = 224  # tile side in pixels
    min_tissue_fraction: float = 0.5  # share of the tile on the tissue mask (Otsu on saturation of a thumbnail)
    thumbnail_max_side: int = 2048  # longest side of the thumbnail the tissue mask is computed on (pixels)


@dataclass
class CellEncoderConfig:
    """The exported PAST cell encoder over the cells of ``shards``: ``<out_dir>/cells/<slide>.h5ad``."""

    encoder: Optional[str] = None  # the export folder; null = no cell embeddings (e.g. for PAST-multi survival)
    which: str = "projected"  # projected (joint space, unit norm) | cell (transformer feature)
    batch_size: int = 256  # cells per forward pass


@dataclass
class EmbedConfig:
    """``launch/finetune.py embed``: embed shard crops and/or whole-slide tissue tiles (``finetune/embed``)."""

    run_dir: Optional[str] = None  # base folder the other paths may interpolate (${run_dir}/...)
    out_dir: Optional[str] = None  # one <slide>.h5ad per slide + embeddings.json + embed_config.yaml (required)
    seed: int = 0  # seed of a randomly initialised encoder (source=random)
    device: str = "auto"  # auto (a CUDA GPU when present) | cpu | cuda | cuda:<index>
    progress: bool = True  # progress bars
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the image encoder
    which: str = "backbone"  # backbone (pooled features, what heads train on) | projected (joint space, unit norm)
    batch_size: int = 64  # images per forward pass
    shards: Optional[str] = None  # a shard manifest (or its folder): embed every cell crop
    slides: list[WholeSlideConfig] = field(default_factory=list)  # whole slides, cut into tissue tiles
    tiles: TilesConfig = field(default_factory=TilesConfig)  # tiling of the whole slides
    cells: CellEncoderConfig = field(default_factory=CellEncoderConfig)  # cell-encoder embeddings of the shards
    skip_finished: bool = True  # whole slides whose .h5ad was written with the same settings are not embedded again
    part: Optional[str] = None  # "i/n": embed every n-th whole slide from the i-th (0-based), e.g. one process per GPU


__all__ = ["WholeSlideConfig", "TilesConfig", "CellEncoderConfig", "EmbedConfig"]
