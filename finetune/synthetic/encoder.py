"""A tiny exported image encoder with seeded random weights, for tests and for trying a head before pretraining."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pretrain.export import CONFIG_NAME, IMAGE_DIR, PROJECTION_NAME, WEIGHTS_NAME, image_encoder_config
from pretrain.models.image_encoder import ImageTower


def write_tiny_export(
    out_dir: str | Path,
    arch: str = "vit_tiny_patch16_224",
    kwargs: Mapping[str, Any] | None = None,
    proj_dim: int = 16,
    seed: int = 0,
) -> Path:
    """An ``image_encoder/`` folder in the exact format ``pretrain.export`` writes, with seeded random weights.

    For tests and for trying a head before any pretraining; loads with
    ``pretrain.export.load_image_encoder`` and ``finetune.encoders.load_encoder``.
    """
    kwargs = dict(kwargs or {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    torch.manual_seed(seed)
    model = ImageTower(arch, kwargs, proj_dim=proj_dim, head="linear")
    folder = Path(out_dir) / IMAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for module, name in ((model.backbone, WEIGHTS_NAME), (model.head, PROJECTION_NAME)):
        save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(folder / name))
    config = image_encoder_config(model, {"image": {"head": "linear"}, "proj_dim": proj_dim}, {})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


__all__ = ["write_tiny_export"]
