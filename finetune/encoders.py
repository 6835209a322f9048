"""Image encoders for downstream tasks: a PAST export, any timm model from a local weight file, or random.

Every task takes an ``encoder`` config section and gets an :class:`ImageEncoder`:

- ``{source: export, path: <export folder or its image_encoder/>}``: the pretrained PAST image tower
  through ``pretrain.export.load_image_encoder`` (backbone + projection head). A folder whose
  ``config.json`` is plain timm hub format (``architecture``, ``model_args``, no ``past`` section)
  loads as a backbone only.
- ``{source: timm, arch: <timm name>, kwargs: {...}, weights: <local .safetensors/.pth>}``: any timm
  model, ``num_classes=0``, weights loaded strictly from the local file (never downloaded);
  ``weights: null`` keeps timm's random initialisation.
- ``{source: random, arch, kwargs}``: the architecture with a seeded random initialisation; the
  baseline of every task is :func:`random_like` (same architecture and preprocessing as the
  encoder under test, random weights).

Images enter as uint8 (B, H, W, 3) RGB crops; :meth:`ImageEncoder.preprocess` resizes them to the
encoder's input size when needed and normalises ``(x / 255 - mean) / std`` with the mean/std of
the export's ``config.json`` (ImageNet's unless it says otherwise).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_shards.errors import InputError, read_json_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("export", "timm", "random")


class ImageEncoder(nn.Module):
    """A timm backbone (B, 3, H, W) → (B, num_features), optionally a projection to the joint space.

    ``description`` records where the weights came from (written next to every output), and
    ``arch``/``arch_kwargs`` let :func:`random_like` rebuild the same architecture.
    """

    def __init__(self, backbone: nn.Module, projection: nn.Module | None, *, arch: str, arch_kwargs: Mapping[str, Any],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 input_size_px: tuple[int, int] | None = None, description: Mapping[str, Any] | None = None):
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.num_features = int(backbone.num_features)
        self.input_size_px = None if input_size_px is None else (int(input_size_px[0]), int(input_size_px[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.description = dict(description or {})
        self._warned_resize = False

    @property
    def has_projection(self) -> bool:
        return self.projection is not None

    def output_dim(self, which: str) -> int:
        check_which(which, self)
        if which == "backbone":
            return self.num_features
        linears = [m for m in self.projection.modules() if isinstance(m, nn.Linear)]
        return int(linears[-1].out_features)

    def preprocess(self, images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB → float32 (B, 3, h, w) normalised at the encoder's input size."""
        images = torch.as_tensor(np.ascontiguousarray(images_uint8)) if isinstance(images_uint8, np.ndarray) else images_uint8
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


def check_which(which: str, encoder: ImageEncoder | None = None) -> None:
    if which not in ("backbone", "projected"):
        raise InputError(None, "which", "'backbone' (pooled backbone features) or 'projected' (joint space)", which)
    if which == "projected" and encoder is not None and not encoder.has_projection:
        raise InputError(None, "which", f"'backbone': the {encoder.description.get('source')} encoder has no "
                         "projection head (only PAST exports do)", which)


def _input_size(pretrained_cfg: Mapping[str, Any] | None, backbone: nn.Module) -> tuple[int, int] | None:
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


def _load_export(path: Path) -> ImageEncoder:
    folder = path / "image_encoder" if (path / "image_encoder").is_dir() else path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(config_path, None, "an exported image encoder (image_encoder/config.json from launch/export.py)",
                         "no such file")
    config = read_json_file(config_path, "an exported image encoder config")
    if (config.get("past") or {}).get("format") == "past-image-encoder":
        from pretrain.export import load_image_encoder

        exported = load_image_encoder(folder)
        mean, std = _mean_std(exported.data_config)
        return ImageEncoder(
            exported.backbone, exported.head, arch=exported.arch, arch_kwargs=exported.arch_kwargs, mean=mean, std=std,
            input_size_px=_input_size(exported.data_config, exported.backbone),
            description={"source": "export", "path": str(folder), "arch": exported.arch, "kwargs": exported.arch_kwargs},
        )
    # Plain timm hub folder: architecture + model_args + model.safetensors.
    for key in ("architecture", "model_args"):
        if key not in config:
            raise InputError(config_path, key, "a timm hub config (architecture, model_args) or a PAST export", "missing")
    weights = folder / "model.safetensors"
    return _load_timm(config["architecture"], config["model_args"], weights, config.get("pretrained_cfg"),
                      description={"source": "export", "path": str(folder)})


def _load_timm(arch: str, kwargs: Mapping[str, Any] | None, weights: str | Path | None,
               pretrained_cfg: Mapping[str, Any] | None = None, description: Mapping[str, Any] | None = None) -> ImageEncoder:
    from pretrain.models.image_encoder import create_backbone, load_backbone_weights

    kwargs = dict(kwargs or {})
    backbone = create_backbone(arch, kwargs)
    if weights:
        load_backbone_weights(backbone, weights)
    pretrained_cfg = pretrained_cfg or getattr(backbone, "pretrained_cfg", None)
    mean, std = _mean_std(pretrained_cfg)
    info = {"source": "timm", "arch": arch, "kwargs": kwargs, "weights": None if weights is None else str(weights)}
    info.update(description or {})
    return ImageEncoder(backbone.eval(), None, arch=arch, arch_kwargs=kwargs, mean=mean, std=std,
                        input_size_px=_input_size(pretrained_cfg, backbone), description=info)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None): the first CUDA GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(None, "device", "'auto', 'cpu', 'cuda' or 'cuda:<index>'", device) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "device", "a device this machine has ('auto' picks one)", f"{device} (no CUDA GPU)")
    return resolved


def load_encoder(cfg: Mapping[str, Any], seed: int = 0, device: str | torch.device = "cpu") -> ImageEncoder:
    """The encoder an ``encoder`` config section names (see the module docstring), in eval mode on ``device``."""
    cfg = dict(cfg or {})
    source = cfg.get("source", "export")
    if source not in SOURCES:
        raise InputError(None, "encoder.source", f"one of {SOURCES}", source)
    if source == "export":
        if not cfg.get("path"):
            raise InputError(None, "encoder.path", "the export folder written by launch/export.py", cfg.get("path"))
        encoder = _load_export(Path(cfg["path"]))
    elif source == "timm":
        if not cfg.get("arch"):
            raise InputError(None, "encoder.arch", "a timm architecture name", cfg.get("arch"))
        encoder = _load_timm(cfg["arch"], cfg.get("kwargs"), cfg.get("weights"))
    else:
        if not cfg.get("arch"):
            raise InputError(None, "encoder.arch", "a timm architecture name for the random encoder", cfg.get("arch"))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = _load_timm(cfg["arch"], cfg.get("kwargs"), None, description={"source": "random", "seed": seed})
    log.info("image encoder: %s (%d-d features%s)", encoder.description, encoder.num_features,
             ", with projection" if encoder.has_projection else "")
    return encoder.to(resolve_device(device)).eval()


def random_like(encoder: ImageEncoder, seed: int = 0) -> ImageEncoder:
    """Same architecture, input size and normalisation as ``encoder``, seeded random weights (the baseline)."""
    from pretrain.models.image_encoder import create_backbone

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = create_backbone(encoder.arch, encoder.arch_kwargs)
    return ImageEncoder(
        backbone.eval(), None, arch=encoder.arch, arch_kwargs=encoder.arch_kwargs,
        mean=encoder.mean.flatten().tolist(), std=encoder.std.flatten().tolist(), input_size_px=encoder.input_size_px,
        description={"source": "random", "arch": encoder.arch, "kwargs": encoder.arch_kwargs, "seed": seed},
    ).to(encoder.mean.device).eval()
