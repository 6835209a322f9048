"""Image encoders for downstream tasks: a PAST export, any timm model from a local weight file, or random.

Every task takes an ``encoder`` config section and gets an :class:`ImageEncoder`, the one inference
wrapper of ``pretrain.export`` (normalisation, ``which`` = backbone or projected features, device,
batching; re-exported here):

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from common.errors import InputError, read_json_file
from pretrain.export.load import (
    CONFIG_NAME,
    IMAGE_DIR,
    IMAGE_FORMAT,
    WEIGHTS_NAME,
    ImageEncoder,
    check_which,
    load_image_encoder,
    load_timm_encoder,
)
from pretrain.models import IMAGENET_MEAN, IMAGENET_STD, create_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCES",
    "EncoderConfig",
    "ImageEncoder",
    "check_which",
    "load_encoder",
    "random_like",
    "resolve_device",
]

log = logging.getLogger(__name__)

SOURCES = ("export", "timm", "random")


@dataclass
class EncoderConfig:
    """An image encoder for :func:`finetune.encoders.load_encoder`."""

    source: str = (
        "export"  # export (a `launch/export.py` folder) | timm (arch, kwargs, weights) | random (arch, kwargs)
    )
    path: Optional[str] = None  # source=export: the export folder (or its image_encoder/)
    arch: Optional[str] = None  # source=timm|random: the timm architecture name
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm model kwargs (img_size, patch_size, ...); timm's keys
    weights: Optional[str] = None  # source=timm: a local weights file (no downloads at run time)


def _load_export(path: Path) -> ImageEncoder:
    folder = path / IMAGE_DIR if (path / IMAGE_DIR).is_dir() else path
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(
            config_path,
            None,
            "an exported image encoder (image_encoder/config.json from launch/export.py)",
            "no such file",
        )
    config = read_json_file(config_path, "an exported image encoder config")
    if (config.get("past") or {}).get("format") == IMAGE_FORMAT:
        return load_image_encoder(folder)
    # Plain timm hub folder: architecture + model_args + model.safetensors.
    for key in ("architecture", "model_args"):
        if key not in config:
            raise InputError(
                config_path, key, "a timm hub config (architecture, model_args) or a PAST export", "missing"
            )
    return load_timm_encoder(
        config["architecture"],
        config["model_args"],
        folder / WEIGHTS_NAME,
        config.get("pretrained_cfg"),
        description={"source": "export", "path": str(folder)},
    )


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
        encoder = load_timm_encoder(cfg["arch"], cfg.get("kwargs"), cfg.get("weights"))
    else:
        if not cfg.get("arch"):
            raise InputError(None, "encoder.arch", "a timm architecture name for the random encoder", cfg.get("arch"))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = load_timm_encoder(
                cfg["arch"], cfg.get("kwargs"), None, description={"source": "random", "seed": seed}
            )
    log.info(
        "image encoder: %s (%d-d features%s)",
        encoder.description,
        encoder.num_features,
        ", with projection" if encoder.has_projection else "",
    )
    return encoder.to(resolve_device(device)).eval()


def random_like(encoder: ImageEncoder, seed: int = 0) -> ImageEncoder:
    """Same architecture, input size and normalisation as ``encoder``, seeded random weights (the baseline)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = create_backbone(encoder.arch, encoder.arch_kwargs)
    return (
        ImageEncoder(
            backbone.eval(),
            None,
            arch=encoder.arch,
            arch_kwargs=encoder.arch_kwargs,
            mean=encoder.mean.flatten().tolist(),
            std=encoder.std.flatten().tolist(),
            input_size_px=encoder.input_size_px,
            data_config=encoder.data_config,
            description={"source": "random", "arch": encoder.arch, "kwargs": encoder.arch_kwargs, "seed": seed},
        )
        .to(encoder.mean.device)
        .eval()
    )
