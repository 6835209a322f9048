"""MIPHEI-style H&E → multiplex immunofluorescence (mIF) generator: a ViT encoder + U-Net decoder.

MIPHEI-ViT (Balezo et al. 2025; code Sanofi-Public/MIPHEI-ViT, ``src/generators/mipheivit.py``)
predicts one fluorescence channel per marker from an H&E tile with a ViTMatte-like network
(Yao et al. 2024): a plain ViT gives a coarse, semantic token map; a light convolutional "detail
stream" on the image gives the fine, high-resolution features; a U-Net style decoder fuses them
back up to full resolution; one small head per marker ends in Tanh, because targets are scaled
to (−1, 1). The encoder is fine-tuned with LoRA on the attention's query and value projections
(rank 8, α 1) and the whole thing trained with a per-marker weighted MSE, Adam (lr 2e-4,
weight decay 1e-5) and a warmup / constant / linear-decay schedule.

Shapes (B batch, H × W px the encoder's input size, p the ViT's patch size, D its width):

    image (B, 3, H, W) normalised ──► ViT ──► tokens (B, N_prefix + H/p·W/p, D)
                                          └─► token map (B, D, H/p, W/p)        [bottleneck]
    detail stream (vitmatte): conv3×3 s2 → (B, 48, H/2) → (B, 96, H/4) → (B, 192, H/8)
    pyramid (unetr): token maps of 3 intermediate blocks, transposed convs → H/8, H/4, H/2
    decoder block i: resize ×2 (to the skip's size) → concat skip → conv3×3-BN-ReLU
        skips: H/8, H/4, H/2 features, then the raw image at H; channels 256, 128, 64, 32
    heads: one conv3×3 (32 → 1) + Tanh per marker, concatenated → (B, n_markers, H, W)

Patch sizes other than 16: each decoder block resizes its input bilinearly to the spatial size
of its skip rather than by a fixed ×2. With patch 16 that *is* a ×2 upsampling (H/16 → H/8); with
patch 8 the token map already has the coarsest detail resolution (H/8) and the first block fuses
without resizing; with patch 32 it is upsampled ×4; a patch of 14 (DINOv2) lands on the skip grid
too. (MIPHEI instead resamples the token map to H/16 with bicubic interpolation first, which for
patch 8 throws half the token resolution away.)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import InputError
from finetune.lora import apply_lora, lora_parameters

log = logging.getLogger(__name__)

VARIANTS = ("vitmatte", "unetr")
FINETUNE_MODES = ("lora", "frozen", "full")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """conv k×k (no bias: BN follows) → BatchNorm → ReLU; ``stride`` 2 halves H and W."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DetailStream(nn.Module):
    """ViTMatte's detail capture: stride-2 conv-BN-ReLU stages on the image → [(B, c_i, H/2^(i+1), W/2^(i+1))]."""

    def __init__(self, channels: Sequence[int], in_ch: int = 3):
        super().__init__()
        chans = [in_ch, *channels]
        self.stages = nn.ModuleList(ConvBNReLU(chans[i], chans[i + 1], stride=2) for i in range(len(channels)))

    def forward(self, image: torch.Tensor, tokens: Any = None) -> list[torch.Tensor]:
        feats, x = [], image
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats  # finest first: H/2, H/4, H/8


class UpPath(nn.Module):
    """UNETR skip path: token map (B, D, H/p) → ``n_up`` × (transposed conv ×2 → conv-BN-ReLU) → (B, c, ≈H/s).

    With ``n_up = 0`` (the token map is already at or below the target resolution) a single
    conv-BN-ReLU projects D → c; the decoder then resizes to the exact skip size.
    """

    def __init__(self, in_ch: int, out_ch: int, n_up: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(ch, out_ch, kernel_size=2, stride=2), ConvBNReLU(out_ch, out_ch)]
            ch = out_ch
        if not layers:
            layers.append(ConvBNReLU(in_ch, out_ch))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNETRPyramid(nn.Module):
    """UNETR's skips: token maps of intermediate ViT blocks, upsampled to H/2^(i+1) by transposed convs.

    ``skip_maps[i]`` (B, D, H/p, W/p) comes from a shallower block the finer its target: the
    finest skip (H/2) from the shallowest tapped block, as in UNETR (Hatamizadeh et al. 2022).
    """

    def __init__(self, embed_dim: int, channels: Sequence[int], patch_px: int):
        super().__init__()
        self.paths = nn.ModuleList()
        for i, ch in enumerate(channels):
            stride = 2 ** (i + 1)  # target resolution H/stride
            n_up = max(0, int(round(math.log2(patch_px / stride))))
            self.paths.append(UpPath(embed_dim, ch, n_up))

    def forward(self, image: torch.Tensor, skip_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feats = []
        for i, (path, tokens) in enumerate(zip(self.paths, skip_maps)):
            target = _stride_size(image.shape[-2:], 2 ** (i + 1))
            x = path(tokens)
            feats.append(_resize(x, target))
        return feats  # finest first


class FusionBlock(nn.Module):
    """Decoder step: resize to the skip's H×W (×2 for a regular pyramid), concat skip, conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv = ConvBNReLU(in_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _resize(x, skip.shape[-2:])
        return self.conv(torch.cat([skip, x], dim=1))


class MarkerHead(nn.Module):
    """One marker's output: conv3×3 (C → 1) then Tanh, so predictions lie in (−1, 1) like the targets."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _stride_size(hw: Sequence[int], stride: int) -> tuple[int, int]:
    """Spatial size after ``log2(stride)`` conv3×3 / stride-2 / padding-1 stages (ceil division each time)."""
    h, w = int(hw[0]), int(hw[1])
    s = 1
    while s < stride:
        h, w, s = (h + 1) // 2, (w + 1) // 2, s * 2
    return h, w


# ---------------------------------------------------------------------------------------------
# ViT access
# ---------------------------------------------------------------------------------------------


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def check_vit(backbone: nn.Module) -> None:
    """Raise InputError unless ``backbone`` looks like a timm plain ViT (patch tokens out of forward_features)."""
    patch_embed = getattr(backbone, "patch_embed", None)
    missing = [
        name
        for name, ok in (
            (
                "patch_embed.patch_size",
                patch_embed is not None and getattr(patch_embed, "patch_size", None) is not None,
            ),
            ("blocks", isinstance(getattr(backbone, "blocks", None), (nn.Sequential, nn.ModuleList))),
            ("num_prefix_tokens", hasattr(backbone, "num_prefix_tokens")),
            ("forward_features", callable(getattr(backbone, "forward_features", None))),
        )
        if not ok
    ]
    if missing:
        raise InputError(
            None,
            "encoder.backbone",
            "a timm ViT (patch_embed, blocks, num_prefix_tokens, forward_features returning tokens)",
            f"{type(backbone).__name__} without {', '.join(missing)}",
        )


def token_map(backbone: nn.Module, tokens: torch.Tensor, image_hw: Sequence[int]) -> torch.Tensor:
    """ViT tokens (B, N_prefix + gh·gw, D) → patch token map (B, D, gh, gw), prefix (cls/register) tokens dropped."""
    if tokens.ndim != 3:
        raise InputError(
            None, "encoder.backbone", "forward_features returning tokens shaped (B, N, D)", tuple(tokens.shape)
        )
    patch_embed = backbone.patch_embed
    hw = (int(image_hw[0]), int(image_hw[1]))
    if hasattr(patch_embed, "dynamic_feat_size"):
        gh, gw = patch_embed.dynamic_feat_size(hw)
    else:
        ph, pw = _pair(patch_embed.patch_size)
        gh, gw = hw[0] // ph, hw[1] // pw
    patches = tokens[:, int(backbone.num_prefix_tokens) :]  # (B, gh·gw, D)
    if patches.shape[1] != gh * gw:
        raise InputError(
            None,
            "encoder.backbone",
            f"{gh}×{gw} = {gh * gw} patch tokens after {backbone.num_prefix_tokens} prefix tokens",
            patches.shape[1],
        )
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)  # (B, D, gh, gw)


def tap_indices(depth: int, n_levels: int) -> list[int]:
    """Blocks whose outputs feed the UNETR pyramid: evenly spaced, the last one the final block.

    Depth 12, 4 levels → [2, 5, 8, 11] (UNETR's z3, z6, z9, z12); depth 24 → [5, 11, 17, 23];
    a ViT shallower than ``n_levels`` taps some blocks twice.
    """
    return [int(math.ceil(depth * (k + 1) / n_levels)) - 1 for k in range(n_levels)]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class MIFUNet(nn.Module):
    """ViT encoder + detail stream (or UNETR pyramid) + U-Net decoder + one Tanh head per marker.

    forward: normalised images (B, 3, H, W) → marker predictions (B, n_markers, H, W) in (−1, 1).
    ``finetune`` says what trains: ``lora`` (LoRA A/B on q and v + decoder), ``frozen`` (decoder
    only; the ViT runs in eval mode without autograd) or ``full`` (everything).
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_markers: int,
        *,
        variant: str,
        finetune: str,
        detail_channels: Sequence[int],
        decoder_channels: Sequence[int],
        input_size_px: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.n_markers = int(n_markers)
        self.variant = variant
        self.finetune = finetune
        self.patch_px = _pair(backbone.patch_embed.patch_size)
        self.embed_dim = int(getattr(backbone, "embed_dim", None) or backbone.num_features)
        fixed = getattr(backbone.patch_embed, "img_size", None)
        self.input_size_px = input_size_px or (None if fixed is None else _pair(fixed))
        self.dynamic_size = bool(
            getattr(backbone, "dynamic_img_size", False) or getattr(backbone.patch_embed, "dynamic_img_size", False)
        )
        detail_channels = [int(c) for c in detail_channels]
        decoder_channels = [int(c) for c in decoder_channels]
        if variant == "vitmatte":
            self.skips: nn.Module = DetailStream(detail_channels)
            self.tap_blocks: list[int] = []
        else:
            self.skips = UNETRPyramid(self.embed_dim, detail_channels, max(self.patch_px))
            taps = tap_indices(len(backbone.blocks), len(detail_channels) + 1)
            # Skip i (finest first) takes the i-th shallowest tap; the last tap is the bottleneck,
            # which is forward_features' output (the final block after the final norm).
            self.tap_blocks = taps[:-1]
        # Skips coarsest first for the decoder: H/8, H/4, H/2 features, then the raw image (3 ch) at H.
        skip_chs = [*reversed(detail_channels), 3]
        in_chs = [self.embed_dim, *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(FusionBlock(i, s, o) for i, s, o in zip(in_chs, skip_chs, decoder_channels))
        self.heads = nn.ModuleList(MarkerHead(decoder_channels[-1]) for _ in range(self.n_markers))
        if finetune == "frozen":
            self.backbone.eval()

    def train(self, mode: bool = True) -> MIFUNet:
        super().train(mode)
        if self.finetune == "frozen":
            self.backbone.eval()  # frozen: no dropout / drop-path noise in features that never adapt
        return self

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(None, "images", "normalised RGB batches shaped (B, 3, H, W)", tuple(images.shape))
        hw = tuple(int(s) for s in images.shape[-2:])
        if not self.dynamic_size and self.input_size_px is not None and hw != tuple(self.input_size_px):
            raise InputError(None, "images", f"H×W = the encoder's input size {tuple(self.input_size_px)} px", hw)
        if hw[0] % self.patch_px[0] or hw[1] % self.patch_px[1]:
            raise InputError(None, "images", f"H and W multiples of the patch size {self.patch_px} px", hw)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck token map (B, D, H/p, W/p) and the intermediate token maps the UNETR pyramid taps."""
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for idx in sorted(set(self.tap_blocks)):

            def hook(_module, _inputs, output, idx=idx):
                captured[idx] = output

            handles.append(self.backbone.blocks[idx].register_forward_hook(hook))
        try:
            dtype = next(self.backbone.parameters()).dtype
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune != "frozen"):
                tokens = self.backbone.forward_features(images.to(dtype))  # (B, N, D)
        finally:
            for handle in handles:
                handle.remove()
        hw = images.shape[-2:]
        bottleneck = token_map(self.backbone, tokens, hw).float()
        taps = [token_map(self.backbone, captured[idx], hw).float() for idx in self.tap_blocks]
        return bottleneck, taps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_input(images)
        x, taps = self.encode(images)  # (B, D, H/p, W/p)
        skips = self.skips(images, taps)  # finest first: H/2, H/4, H/8
        for block, skip in zip(self.decoder, [*reversed(skips), images]):
            x = block(x, skip)  # (B, c_i, H_skip, W_skip)
        return torch.cat([head(x) for head in self.heads], dim=1)  # (B, n_markers, H, W)

    def trainable_summary(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameter counts by part (encoder, lora, skips, decoder, heads, all)."""
        lora_ids = {id(p) for p in lora_parameters(self.backbone)}
        parts = {
            "encoder": [p for p in self.backbone.parameters() if id(p) not in lora_ids],
            "lora": lora_parameters(self.backbone),
            "detail_stream" if self.variant == "vitmatte" else "pyramid": list(self.skips.parameters()),
            "decoder": list(self.decoder.parameters()),
            "heads": list(self.heads.parameters()),
            "all": list(self.parameters()),
        }
        return {
            name: {
                "trainable": int(sum(p.numel() for p in ps if p.requires_grad)),
                "total": int(sum(p.numel() for p in ps)),
            }
            for name, ps in parts.items()
        }


def build_mif_model(
    encoder: Any,
    n_markers: int,
    *,
    variant: str = "vitmatte",
    finetune: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 1.0,
    detail_channels: Sequence[int] = (48, 96, 192),
    decoder_channels: Sequence[int] = (256, 128, 64, 32),
) -> MIFUNet:
    """The mIF generator on a copy of ``encoder.backbone`` (the caller's encoder is left untouched).

    ``encoder``: a :class:`finetune.encoders.ImageEncoder` (or a bare timm ViT). ``variant``:
    ``vitmatte`` (MIPHEI-ViT) or ``unetr``. ``finetune``: ``lora`` | ``frozen`` | ``full``.
    ``detail_channels``: channels of the H/2, H/4, H/8 skips (detail stream or UNETR pyramid);
    ``decoder_channels``: one more entry, the decoder blocks' widths from coarse to full resolution.
    """
    if variant not in VARIANTS:
        raise InputError(None, "model.variant", f"one of {VARIANTS}", variant)
    if finetune not in FINETUNE_MODES:
        raise InputError(None, "model.finetune", f"one of {FINETUNE_MODES}", finetune)
    if int(n_markers) < 1:
        raise InputError(None, "n_markers", "at least one marker", n_markers)
    if not detail_channels or any(int(c) < 1 for c in detail_channels):
        raise InputError(None, "model.detail_channels", "positive channel counts", list(detail_channels))
    if len(decoder_channels) != len(detail_channels) + 1 or any(int(c) < 1 for c in decoder_channels):
        raise InputError(
            None,
            "model.decoder_channels",
            f"{len(detail_channels) + 1} positive channel counts (one per detail skip plus the full-resolution block)",
            list(decoder_channels),
        )
    source = getattr(encoder, "backbone", encoder)
    if not isinstance(source, nn.Module):
        raise InputError(None, "encoder", "an ImageEncoder or a timm ViT", type(encoder).__name__)
    check_vit(source)
    backbone = copy.deepcopy(source)
    input_size = getattr(encoder, "input_size_px", None)
    if finetune == "lora":
        names = apply_lora(backbone, rank=lora_rank, alpha=lora_alpha, targets=("q", "v"))
        log.info("LoRA (rank %d, alpha %g) on q/v of %d attention layers", lora_rank, lora_alpha, len(names))
    else:
        for p in backbone.parameters():
            p.requires_grad_(finetune == "full")
    model = MIFUNet(
        backbone,
        n_markers,
        variant=variant,
        finetune=finetune,
        detail_channels=detail_channels,
        decoder_channels=decoder_channels,
        input_size_px=input_size,
    )
    device = next(source.parameters()).device
    model.to(device)
    summary = model.trainable_summary()
    log.info(
        "mIF model (%s, %s): %d / %d parameters trainable",
        variant,
        finetune,
        summary["all"]["trainable"],
        summary["all"]["total"],
    )
    return model


# ---------------------------------------------------------------------------------------------
# Loss, schedule, optimiser
# ---------------------------------------------------------------------------------------------


def marker_weights(marker_std: Any) -> torch.Tensor:
    """w_c = (1 / std_c) · C / Σ_k (1 / std_k): inverse-std weights summing to C (mean weight 1).

    MIPHEI's code (``src/train.py``, ``src/loss.py::WeightedMSELoss``) uses the same inverse
    std per marker, but scales so the *smallest* weight is 1 and multiplies the loss by a
    Pix2Pix-style ``lambda_factor``. Both differ from this by one constant positive factor, so
    the markers' relative weights, and the direction of every gradient, are the same. Summing to
    C keeps the loss on the scale of a plain MSE (equal stds give exactly the plain MSE) whatever
    the units of std.
    """
    std = torch.as_tensor(np.asarray(marker_std, dtype=np.float64) if not torch.is_tensor(marker_std) else marker_std)
    std = std.detach().to(torch.float64).flatten()
    if std.numel() == 0 or not bool(torch.isfinite(std).all()) or bool((std <= 0).any()):
        raise InputError(None, "marker_std", "finite, positive per-marker standard deviations", std.tolist())
    inv = 1.0 / std
    return inv * (std.numel() / inv.sum())


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, marker_std: Any, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MIPHEI's loss: mean over markers of w_c · MSE_c (see :func:`marker_weights` for w_c).

    ``pred``, ``target``: (B, C, H, W); ``marker_std``: (C,) std of each marker over the training
    targets (in the targets' units or any fixed multiple: only ratios matter). ``mask``: optional
    pixel weights (B, H, W), (B, 1, H, W) or (B, C, H, W), bool or float; MSE_c is then
    Σ mask·(pred−target)² / Σ mask over that marker's pixels (0 for a marker with no pixel).
    """
    if pred.ndim != 4 or pred.shape != target.shape:
        raise InputError(
            None, "target", f"a tensor shaped like pred (B, C, H, W) = {tuple(pred.shape)}", tuple(target.shape)
        )
    n_markers = pred.shape[1]
    weights = marker_weights(marker_std)
    if weights.numel() != n_markers:
        raise InputError(None, "marker_std", f"{n_markers} values (one per marker)", weights.numel())
    weights = weights.to(device=pred.device, dtype=pred.dtype)
    sq = (pred - target) ** 2  # (B, C, H, W)
    if mask is None:
        per_marker = sq.mean(dim=(0, 2, 3))  # (C,)
    else:
        m = mask.to(device=pred.device, dtype=pred.dtype)
        if m.ndim == 3:
            m = m.unsqueeze(1)  # (B, 1, H, W)
        if (
            m.ndim != 4
            or m.shape[0] != pred.shape[0]
            or m.shape[2:] != pred.shape[2:]
            or m.shape[1] not in (1, n_markers)
        ):
            raise InputError(
                None,
                "mask",
                f"(B, H, W), (B, 1, H, W) or (B, C, H, W) matching pred {tuple(pred.shape)}",
                tuple(mask.shape),
            )
        m = m.expand_as(sq)
        num = (sq * m).sum(dim=(0, 2, 3))
        den = m.sum(dim=(0, 2, 3))
        per_marker = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
    return (weights * per_marker).mean()


def make_optimizer(model: nn.Module, lr: float = 2e-4, weight_decay: float = 1e-5) -> torch.optim.Adam:
    """Adam over the parameters that train (``requires_grad``), MIPHEI's lr 2e-4 and weight decay 1e-5.

    (MIPHEI multiplies the base lr by √batch_size; pass the scaled value as ``lr`` to do the same.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError(None, "model", "at least one trainable parameter", "all parameters frozen")
    return torch.optim.Adam(params, lr=float(lr), weight_decay=float(weight_decay))


__all__ = [
    "MIFUNet",
    "build_mif_model",
    "check_vit",
    "token_map",
    "tap_indices",
    "marker_weights",
    "weighted_mse",
    "make_optimizer",
]
