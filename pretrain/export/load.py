"""Exported encoders at inference: the one image-encoder wrapper, the cell encoder, and their loaders.

:class:`ImageEncoder` is the single wrapper every downstream head uses for images (through
``finetune.encoders``), whatever the weights: a PAST export (:func:`load_image_encoder`, with the
projection head to the joint space) or any timm model from a local weights file or random
(:func:`load_timm_encoder`, backbone only). It owns the input normalisation, the choice of output
(``which``: the pooled backbone feature or the projected joint-space embedding), the device and
batching.

:class:`PretrainedCellEncoder` is the exported cell tower with its tokenizer (:func:`load_cell_encoder`).

File names and format tags of an export folder (written by :mod:`pretrain.export.write`)::

    image_encoder/{model.safetensors, projection.safetensors, config.json}
    cell_encoder/{model.safetensors, config.json, vocab.tsv, tech_mean.npy}
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from common.errors import InputError, read_json_file
from data_shards.tokenize import load_tech_mean, rank_tokens
from data_shards.vocabulary import Vocabulary

from ..models import build_model
from ..models.image_encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_backbone,
    load_backbone_weights,
    load_state_strict,
    make_projection_head,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
IMAGE_DIR, CELL_DIR = "image_encoder", "cell_encoder"
WEIGHTS_NAME = "model.safetensors"  # timm's preferred file name in a local-dir / hub folder
PROJECTION_NAME = "projection.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "vocab.tsv"
VOCAB_JSON_NAME = "vocab.json"  # the same token ids as {token: id}, special tokens included
TECH_MEAN_NAME = "tech_mean.npy"
IMAGE_FORMAT, CELL_FORMAT = "past-image-encoder", "past-cell-encoder"  # the "format" tags of the two config.json
WHICH = ("backbone", "projected")  # ImageEncoder outputs: pooled backbone features, joint-space embedding


# ---------------------------------------------------------------------------------------------
# The image encoder


class ImageEncoder(nn.Module):
    """A timm backbone for inference, with its input normalisation and (PAST exports) projection head.

    uint8 (B, H, W, 3) RGB ──:meth:`preprocess`──▶ float32 (B, 3, h, w): resized to the encoder's
    input size when it differs, then ``(x / 255 − mean) / std``
      ──:meth:`features` / ``forward(x, which="backbone")``──▶ (B, num_features) pooled backbone feature
      ──:meth:`embed` / ``forward(x, which="projected")``──▶ (B, proj_dim) L2-normalised joint-space
        embedding, identical to ``PASTModel.encode_image`` (PAST exports only).
    :meth:`encode` runs all three in batches on the encoder's device.

    ``data_config``: timm's pretrained_cfg of the weights (input size, interpolation, mean/std);
    ``config``: the export's whole ``config.json`` ({} for plain timm); ``description``: where the
    weights came from (written next to every output); ``arch``/``arch_kwargs`` rebuild the
    architecture (``finetune.encoders.random_like``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        projection: nn.Module | None = None,
        *,
        arch: str,
        arch_kwargs: Mapping[str, Any],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size_px: tuple[int, int] | None = None,
        data_config: Mapping[str, Any] | None = None,
        description: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.num_features = int(backbone.num_features)
        self.input_size_px = None if input_size_px is None else (int(input_size_px[0]), int(input_size_px[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.data_config = dict(data_config or {})
        self.description = dict(description or {})
        self.config = copy.deepcopy(dict(config or {}))
        self._warned_resize = False

    @property
    def has_projection(self) -> bool:
        return self.projection is not None

    @property
    def proj_dim(self) -> int | None:
        """Joint-space dimension (None without a projection head)."""
        return self.output_dim("projected") if self.has_projection else None

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def output_dim(self, which: str) -> int:
        check_which(which, self)
        if which == "backbone":
            return self.num_features
        linears = [m for m in self.projection.modules() if isinstance(m, nn.Linear)]
        return int(linears[-1].out_features)

    def preprocess(self, images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB → float32 (B, 3, h, w) normalised at the encoder's input size."""
        images = (
            torch.as_tensor(np.ascontiguousarray(images_uint8))
            if isinstance(images_uint8, np.ndarray)
            else images_uint8
        )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(None, "images", "uint8 RGB batches shaped (B, H, W, 3)", tuple(images.shape))
        x = images.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if self.input_size_px is not None and tuple(x.shape[-2:]) != self.input_size_px:
            if not self._warned_resize:
                log.info("resizing %s px images to the encoder's input %s px", tuple(x.shape[-2:]), self.input_size_px)
                self._warned_resize = True
            x = F.interpolate(x, size=self.input_size_px, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, h, w) normalised → pooled backbone features (B, num_features)."""
        dtype = next(self.backbone.parameters()).dtype
        return self.backbone(images.to(dtype))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, h, w) normalised → L2-normalised joint-space embeddings (B, proj_dim)."""
        if self.projection is None:
            raise InputError(None, "which", "'backbone' (this encoder has no projection head)", "'projected'")
        return F.normalize(self.projection(self.features(images)), dim=-1)

    def forward(self, images: torch.Tensor, which: str = "backbone") -> torch.Tensor:
        return self.embed(images) if which == "projected" else self.features(images)

    @torch.no_grad()
    def encode(
        self, images: np.ndarray | Sequence[np.ndarray], which: str = "backbone", batch_size: int = 64
    ) -> np.ndarray:
        """float32 (N, dim) outputs of uint8 RGB images ((N, H, W, 3), or N arrays (H, W, 3)), in order,
        ``batch_size`` images at a time on the encoder's device."""
        check_which(which, self)
        if batch_size < 1:
            raise InputError(None, "batch_size", "a positive number of images per batch", batch_size)
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = np.stack(images[start : start + batch_size])  # (b, H, W, 3)
            chunks.append(self(self.preprocess(batch), which=which).float().cpu().numpy())  # (b, dim)
        if not chunks:
            return np.zeros((0, self.output_dim(which)), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


def check_which(which: str, encoder: ImageEncoder | None = None) -> None:
    if which not in WHICH:
        raise InputError(None, "which", "'backbone' (pooled backbone features) or 'projected' (joint space)", which)
    if which == "projected" and encoder is not None and not encoder.has_projection:
        raise InputError(
            None,
            "which",
            f"'backbone': the {encoder.description.get('source')} encoder has no "
            "projection head (only PAST exports do)",
            which,
        )


def input_size_px(pretrained_cfg: Mapping[str, Any] | None, backbone: nn.Module) -> tuple[int, int] | None:
    """(h, w) px the backbone takes: a ViT's fixed patch-embedding size wins over the config's
    ``input_size`` (timm keeps the default config's size when ``img_size`` is overridden)."""
    fixed = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if fixed is not None:
        return int(fixed[0]), int(fixed[1])
    size = (pretrained_cfg or {}).get("input_size")
    return (int(size[-2]), int(size[-1])) if size else None


def _mean_std(pretrained_cfg: Mapping[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = pretrained_cfg or {}
    return tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)


def _wrap(
    backbone: nn.Module,
    projection: nn.Module | None,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    pretrained_cfg: Mapping[str, Any] | None,
    description: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
) -> ImageEncoder:
    """The wrapper with the normalisation and input size its weights' pretrained_cfg names."""
    mean, std = _mean_std(pretrained_cfg)
    return ImageEncoder(
        backbone,
        projection,
        arch=arch,
        arch_kwargs=arch_kwargs,
        mean=mean,
        std=std,
        input_size_px=input_size_px(pretrained_cfg, backbone),
        data_config=pretrained_cfg,
        description=description,
        config=config,
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(path, None, "an exported safetensors file", "no such file")
    return load_file(str(path), device="cpu")


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu") -> ImageEncoder:
    """An exported ``image_encoder/`` folder (or the export folder holding it) → eval-mode encoder
    with its projection head (``encoder(x)``: backbone features; ``encoder.embed(x)``: joint space)."""
    path = Path(path)
    if (path / IMAGE_DIR).is_dir():
        path = path / IMAGE_DIR
    config = read_json_file(path / CONFIG_NAME, "the config.json of an exported image encoder")
    past = config.get("past") or {}
    if past.get("format") != IMAGE_FORMAT:
        raise InputError(
            path / CONFIG_NAME, "past.format", f"'{IMAGE_FORMAT}' (written by pretrain.export)", past.get("format")
        )
    arch, kwargs = config["architecture"], dict(config["model_args"])
    backbone = create_backbone(arch, kwargs)
    load_state_strict(backbone, _load_safetensors(path / WEIGHTS_NAME), path / WEIGHTS_NAME, f"timm '{arch}'")
    projection = past["projection"]
    head = make_projection_head(int(projection["in_features"]), int(projection["out_features"]), projection["head"])
    load_state_strict(
        head, _load_safetensors(path / projection["file"]), path / projection["file"], "the projection head"
    )
    description = {"source": "export", "path": str(path), "arch": arch, "kwargs": kwargs}
    return _wrap(backbone, head, arch, kwargs, config["pretrained_cfg"], description, config).to(device).eval()


def load_timm_encoder(
    arch: str,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    pretrained_cfg: Mapping[str, Any] | None = None,
    description: Mapping[str, Any] | None = None,
) -> ImageEncoder:
    """Any timm model as a backbone-only encoder (``num_classes=0``), in eval mode on the CPU: weights
    loaded strictly from a local file (never downloaded), or timm's random initialisation without one.
    ``pretrained_cfg`` (default: timm's for ``arch``) gives the normalisation and input size."""
    kwargs = dict(kwargs or {})
    backbone = create_backbone(arch, kwargs)
    if weights:
        load_backbone_weights(backbone, weights)
    pretrained_cfg = pretrained_cfg or getattr(backbone, "pretrained_cfg", None)
    info = {"source": "timm", "arch": arch, "kwargs": kwargs, "weights": None if weights is None else str(weights)}
    info.update(description or {})
    return _wrap(backbone.eval(), None, arch, kwargs, pretrained_cfg, info)


# ---------------------------------------------------------------------------------------------
# The cell encoder


class PretrainedCellEncoder(nn.Module):
    """Exported cell tower (transformer + graph branch + fusion) with its tokenizer.

    ``forward(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)`` → L2-normalised (B, proj_dim),
    identical to ``PASTModel.encode_cell`` (shapes: tokens (B, L), nbr_tokens (N, L),
    nbr_offsets_um (N, 2) µm neighbour minus centre, nbr_batch (N,) centre row of each neighbour).
    ``tokenize(adata)`` turns cells into rank tokens exactly as the training shards were made.
    """

    def __init__(
        self,
        tower: nn.Module,
        vocabulary: Vocabulary,
        tech_mean: np.ndarray | None,
        tokenizer: Mapping[str, Any],
        config: Mapping[str, Any],
    ):
        super().__init__()
        self.tower = tower  # a PASTModel without its image encoder
        self.vocabulary = vocabulary
        self.tech_mean = tech_mean
        self.tokenizer = dict(tokenizer)
        self.config = copy.deepcopy(dict(config))
        self.proj_dim = int(tower.proj_dim)

    def features(self, tokens, nbr_tokens=None, nbr_offsets_um=None, nbr_batch=None) -> dict[str, torch.Tensor]:
        """cell_feat (B, D), graph_feat (B, D) when the graph branch is on, cell_out (B, proj_dim)."""
        return self.tower.cell_features(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)

    def forward(self, tokens, nbr_tokens=None, nbr_offsets_um=None, nbr_batch=None) -> torch.Tensor:
        return self.tower.encode_cell(tokens, nbr_tokens, nbr_offsets_um, nbr_batch)

    def tokenize(self, adata) -> np.ndarray:
        """AnnData of raw counts → int32 rank tokens (n_cells, context_length)."""
        t = self.tokenizer
        return rank_tokens(
            adata, self.vocabulary, self.tech_mean, t["context_length"], t["assay"], t["modality"], t["organism"]
        )


def build_cell_tower(model_config: Mapping[str, Any]) -> nn.Module:
    """A PASTModel without its image encoder, parameters allocated but not initialised (load next)."""
    mc = copy.deepcopy(dict(model_config))
    mc["image"] = {**mc["image"], "weights": None}
    with torch.device("meta"):  # never allocate (or initialise) an image tower we would drop
        tower = build_model(mc)
    tower.image_encoder = None
    return tower.to_empty(device="cpu")


def load_cell_encoder(path: str | Path, device: str | torch.device = "cpu") -> PretrainedCellEncoder:
    """An exported ``cell_encoder/`` folder (or the export folder holding it) → eval-mode encoder."""
    path = Path(path)
    if (path / CELL_DIR).is_dir():
        path = path / CELL_DIR
    config = read_json_file(path / CONFIG_NAME, "the config.json of an exported cell encoder")
    if config.get("format") != CELL_FORMAT:
        raise InputError(
            path / CONFIG_NAME, "format", f"'{CELL_FORMAT}' (written by pretrain.export)", config.get("format")
        )
    tokenizer = config["tokenizer"]
    vocab = Vocabulary.from_file(path / tokenizer["vocabulary"])
    if vocab.sha256() != tokenizer["vocabulary_sha256"]:
        raise InputError(path / tokenizer["vocabulary"], "sha256", tokenizer["vocabulary_sha256"], vocab.sha256())
    tech_mean = load_tech_mean(path / tokenizer["tech_mean"], vocab) if tokenizer.get("tech_mean") else None
    tower = build_cell_tower(config["model"])
    state = _load_safetensors(path / WEIGHTS_NAME)
    load_state_strict(tower, state, path / WEIGHTS_NAME, "the PAST cell tower of config.json")
    # to_empty left any non-persistent buffer uninitialised; there must be none.
    stray = sorted(name for name, _ in tower.named_buffers() if name not in state)
    if stray:
        raise RuntimeError(f"cell tower has buffers outside its state_dict, not restorable from {path}: {stray}")
    return PretrainedCellEncoder(tower, vocab, tech_mean, tokenizer, config).to(device).eval()
