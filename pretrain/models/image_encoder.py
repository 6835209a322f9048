"""The PAST model's image tower at training time: any timm model by name, local weights, a projection head.

(Inference on exported or any timm encoders, with normalisation and batching, is
:class:`pretrain.export.ImageEncoder`.)

The backbone is built with ``timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)``
so its forward returns the globally pooled feature (B, num_features). For timm's ViTs the default
``global_pool`` is ``'token'``: the CLS token after the final norm, which is what the PAST paper uses
(pass ``global_pool='avg'`` in kwargs for mean pooling over patch tokens instead).

Weights never come from the network: ``weights`` names a local ``.safetensors``, ``.pth``, ``.pt``
or ``.bin`` file holding the bare backbone's ``state_dict`` (a checkpoint wrapping it under
``state_dict`` or ``model`` is unwrapped). A classifier head in the file (``head.*`` for ViTs, as in
timm's hub files) is dropped because the backbone has ``num_classes=0``; any other missing or
unexpected key, or any shape mismatch, raises one ``InputError`` naming the file.

Projection head (``head``):
- ``"linear"``: Linear(num_features → proj_dim), as in CLIP;
- ``"mlp"``: Linear(num_features → num_features) → GELU → Linear(num_features → proj_dim).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from common.errors import InputError

log = logging.getLogger(__name__)

# Input normalisation of every image tower: RGB / 255, then (x - mean) / std per channel (ImageNet's).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_RESERVED_KWARGS = ("pretrained", "num_classes", "pretrained_cfg_overlay", "checkpoint_path")


def create_backbone(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=0, **arch_kwargs)`` with clear errors."""
    kwargs = dict(arch_kwargs or {})
    reserved = sorted(k for k in kwargs if k in _RESERVED_KWARGS)
    if reserved:
        raise InputError(
            None, "model.image.kwargs", "architecture kwargs only (weights come from model.image.weights)", reserved
        )
    if not timm.is_model(arch):
        raise InputError(None, "model.image.arch", "a timm model name (see timm.list_models())", arch)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:  # an unknown kwarg for this architecture
        raise InputError(None, "model.image.kwargs", f"kwargs accepted by timm '{arch}'", f"{kwargs}: {exc}") from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (safetensors or torch pickle, loaded with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "an existing weights file", "no such file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(path, None, f"a weights file ending in one of {WEIGHT_SUFFIXES}", path.suffix or "no suffix")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many types
        raise InputError(path, None, "a readable state_dict", f"{type(exc).__name__}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, None, "a mapping of parameter names to tensors", type(state).__name__)
    return dict(state)


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    names = getattr(backbone, "pretrained_cfg", {}).get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, or one InputError naming ``source`` that lists the
    missing and unexpected keys and the shape mismatches (a few of each), so a wrong file is told apart
    from a wrong architecture at a glance."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        found = "; ".join(
            f"{label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", wrong_shape),
            )
            if keys
        )
        raise InputError(source, "state_dict", f"the parameters of {what}", found)
    module.load_state_dict(state, strict=True)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Strict load of a local state_dict into ``backbone``; one InputError on any mismatch."""
    path = Path(path)
    state = read_state_dict(path)
    expected = backbone.state_dict()
    if getattr(backbone, "num_classes", None) == 0:
        dropped = [k for k in state if k not in expected and k.startswith(_classifier_prefixes(backbone))]
        if dropped:
            log.info("%s: dropping classifier weights %s (backbone has num_classes=0)", path, dropped)
            state = {k: v for k, v in state.items() if k not in dropped}
    arch = getattr(backbone, "default_cfg", {}).get("architecture", type(backbone).__name__)
    load_state_strict(backbone, state, path, f"timm '{arch}' with the configured kwargs")
    log.info("loaded image backbone weights from %s (%d tensors)", path, len(state))


def make_projection_head(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    raise InputError(None, "model.image.head", "'linear' or 'mlp'", kind)


class ImageTower(nn.Module):
    """timm backbone (pooled features, B × num_features) + projection head (B × proj_dim), trained in PASTModel."""

    def __init__(
        self,
        arch: str,
        arch_kwargs: Mapping[str, Any] | None = None,
        weights: str | Path | None = None,
        proj_dim: int = 256,
        head: str = "linear",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.backbone = create_backbone(arch, self.arch_kwargs)
        if weights:
            load_backbone_weights(self.backbone, weights)
        self.num_features = int(self.backbone.num_features)
        self.head = make_projection_head(self.num_features, proj_dim, head)
        self.set_grad_checkpointing(grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable and not hasattr(self.backbone, "set_grad_checkpointing"):
            raise InputError(
                None, "model.grad_checkpointing", f"a timm model supporting it ('{self.arch}' does not)", enable
            )
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised → pooled backbone features (B, num_features)."""
        # DeepSpeed bf16 keeps parameters in bf16 but the loader yields float32 images.
        dtype = next(self.backbone.parameters()).dtype
        return self.backbone(images.to(dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) → projected, not yet normalised, embeddings (B, proj_dim)."""
        return self.head(self.features(images))
