"""The trained mIF head on disk: one ``model/`` folder that rebuilds the generator without LoRA code.

``model.safetensors`` holds every weight with LoRA merged into the ViT's q/v projections (loadable
into a ``finetune="frozen"`` build), ``lora.safetensors`` the adapters alone, ``preprocess.json`` the
target transform, ``model.json`` the build arguments and the encoder it started from, ``config.yaml``
the run's settings.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir, write_json
from common.config import save_config
from common.errors import InputError, read_json_file
from finetune.encoders import load_encoder
from finetune.lora import lora_state_dict, merge_lora

from .data import MIFPreprocessor
from .model import build_mif_model

MODEL_FORMAT = "past-mif-generator-v1"


def build_from_config(encoder: Any, n_markers: int, model_cfg: Mapping[str, Any], finetune: str | None = None):
    """The generator a ``model`` config section describes, on ``encoder``'s ViT (``finetune`` overrides the mode)."""
    return build_mif_model(
        encoder,
        n_markers,
        variant=str(model_cfg["variant"]),
        finetune=str(finetune or model_cfg["finetune"]),
        lora_rank=int(model_cfg["lora_rank"]),
        lora_alpha=float(model_cfg["lora_alpha"]),
        detail_channels=[int(c) for c in model_cfg["detail_channels"]],
        decoder_channels=[int(c) for c in model_cfg["decoder_channels"]],
    )


def save_checkpoint(
    model: torch.nn.Module,
    preprocessor: MIFPreprocessor,
    cfg: DictConfig,
    folder: str | Path,
    encoder_description: Mapping[str, Any],
) -> Path:
    """``model.safetensors`` (LoRA merged), ``lora.safetensors``, ``preprocess.json``, ``model.json``, ``config.yaml``."""
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
        write_json(
            tmp / "model.json",
            {
                "format": MODEL_FORMAT,
                "markers": preprocessor.markers,
                "n_markers": len(preprocessor.markers),
                "model": model_cfg,
                "trained_as": model_cfg["finetune"],
                "weights": "model.safetensors holds every weight with LoRA merged: rebuild with finetune='frozen' "
                "(plain Linear layers) and load_state_dict(strict=True); lora.safetensors holds the "
                "adapters alone, to apply on the encoder named below",
                "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
                "encoder_description": dict(encoder_description),
                "input_size_px": list(getattr(model, "input_size_px", None) or []),
            },
        )
    return folder


def load_mif_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, MIFPreprocessor]:
    """(model in eval mode, the encoder that normalises its inputs, the preprocessing) from a ``model/`` folder.

    The encoder named in ``model.json`` is loaded for its architecture and input normalisation; every
    weight then comes from ``model.safetensors``.
    """
    folder = Path(folder)
    info = read_json_file(folder / "model.json", "an mIF model folder written by finetune.mif.save_checkpoint")
    if info.get("format") != MODEL_FORMAT:
        raise InputError(folder / "model.json", "format", MODEL_FORMAT, info.get("format"))
    encoder = load_encoder(info["encoder"], device="cpu")
    model = build_from_config(encoder, int(info["n_markers"]), info["model"], finetune="frozen")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    preprocessor = MIFPreprocessor.load(folder / "preprocess.json")
    return model.to(device).eval(), encoder, preprocessor


__all__ = ["MODEL_FORMAT", "build_from_config", "save_checkpoint", "load_mif_checkpoint"]
