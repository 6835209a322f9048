"""Virtual IHC networks: a FiLM-conditioned U-Net generator (H&E → IHC) and a pix2pix PatchGAN.

The PAST paper's virtual-IHC head translates an H&E tile into the IHC stain of the same tissue
with a U-Net whose decoder is modulated by the PAST image embedding of the tile (FiLM, Perez et
al. 2018): for a stage with C channels a linear map of the embedding gives per-channel (γ, β) and
the stage output x becomes ``x·(1 + γ) + β``. The projection starts at zero, so an untrained
FiLM is exactly the identity and training starts from the plain U-Net; the embedding then only
adds what it knows about the tile beyond the U-Net's receptive field (tissue context, stain
intensity regime).

Shapes (B batch, H × W px a multiple of 2**(len(channels) − 1), D the embedding width):

    H&E (B, 3, H, W) in [−1, 1]
    encoder stage i (i = 0 … n−1): [max-pool 2× when i > 0] → conv3×3-norm-ReLU ×2 → (B, c_i, H/2^i, W/2^i)
    bottleneck = last encoder stage (B, c_{n−1}, H/2^{n−1}, …) → FiLM(D, c_{n−1})
    decoder stage i (i = n−2 … 0): transposed conv 2×2 s2 → concat skip i → conv block → FiLM(D, c_i)
    head: conv1×1 (c_0 → 3) → Tanh → IHC (B, 3, H, W) in [−1, 1]

The discriminator is pix2pix's 70×70 PatchGAN (Isola et al. 2017, ``NLayerDiscriminator``):
conditional, it sees the H&E and an IHC (real or generated) concatenated on channels and
scores every overlapping patch. The pix2pix objective is ``λ·L1 + GAN`` (λ = 100), with the GAN
term as binary cross-entropy on logits ("vanilla") or least squares ("lsgan").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from common.atomic import atomic_path, write_json
from common.errors import InputError, read_json_file

log = logging.getLogger(__name__)

NORMS = ("group", "instance", "batch", "none")
GAN_MODES = ("vanilla", "lsgan")
DEFAULT_CHANNELS = (64, 128, 256, 512)  # pix2pix-like widths at real scale
WEIGHTS_NAME, META_NAME = "generator.safetensors", "generator.json"


def make_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation layer by name. ``group`` (≤ 8 groups) is batch-size independent and behaves the
    same in training and evaluation, which suits the small batches of image-to-image training."""
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise InputError(None, "model.norm", f"one of {NORMS}", kind)


class FiLM(nn.Module):
    """Feature-wise linear modulation: x (B, C, H, W), embedding (B, D) → x·(1 + γ) + β, (γ, β) = W·e + b.

    The projection is initialised to zero, so a fresh FiLM returns x unchanged for any embedding.
    """

    def __init__(self, embedding_dim: int, channels: int):
        super().__init__()
        self.channels = int(channels)
        self.proj = nn.Linear(int(embedding_dim), 2 * self.channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def gamma_beta(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) → γ (B, C), β (B, C)."""
        gamma, beta = self.proj(embedding).chunk(2, dim=-1)
        return gamma, beta

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma_beta(embedding.to(x.dtype))
        return x * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]


class ConvBlock(nn.Sequential):
    """conv3×3 → norm → ReLU, twice (the U-Net stage); keeps H and W."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "group"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class FiLMUNet(nn.Module):
    """U-Net generator H&E (B, 3, H, W) → IHC (B, 3, H, W) in [−1, 1], FiLM on the bottleneck and every
    decoder stage when ``embedding_dim`` is given (no FiLM modules at all when it is None)."""

    def __init__(
        self,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        embedding_dim: int | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        norm: str = "group",
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise InputError(
                None, "model.channels", "at least two positive stage widths, e.g. [64, 128, 256, 512]", channels
            )
        if embedding_dim is not None and int(embedding_dim) < 1:
            raise InputError(None, "embedding_dim", "a positive embedding width (or None for no FiLM)", embedding_dim)
        make_norm(norm, 1)  # validates the name before any layer is built
        self.channels = channels
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)
        self.norm = norm
        self.down = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.down.append(ConvBlock(previous, width, norm))
            previous = width
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in range(len(channels) - 1)
        )
        self.up = nn.ModuleList(ConvBlock(2 * channels[i], channels[i], norm) for i in range(len(channels) - 1))
        self.head = nn.Conv2d(channels[0], out_channels, 1)
        # FiLM last: building it consumes random numbers (nn.Linear's default init, then zeroed), so
        # under one seed the U-Net weights are the same with and without FiLM (a fair baseline).
        if self.embedding_dim is not None:
            self.film_bottleneck = FiLM(self.embedding_dim, channels[-1])
            self.film_up = nn.ModuleList(FiLM(self.embedding_dim, channels[i]) for i in range(len(channels) - 1))
        else:
            self.film_bottleneck = None
            self.film_up = None

    @property
    def multiple_px(self) -> int:
        """H and W must be multiples of this (one 2× pooling per stage below the first)."""
        return 2 ** (len(self.channels) - 1)

    @property
    def has_film(self) -> bool:
        return self.embedding_dim is not None

    def check_input(self, x: torch.Tensor, embedding: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.down[0][0].in_channels:
            raise InputError(None, "he", f"a (B, {self.down[0][0].in_channels}, H, W) batch", tuple(x.shape))
        h, w = x.shape[-2:]
        if h % self.multiple_px or w % self.multiple_px:
            raise InputError(
                None,
                "he",
                f"H and W multiples of {self.multiple_px} px (2**(stages − 1) for "
                f"{len(self.channels)} stages); pad or crop the tiles",
                f"{h} × {w} px",
            )
        if self.has_film:
            if embedding is None:
                raise InputError(None, "embedding", f"a (B, {self.embedding_dim}) embedding for the FiLM layers", None)
            if embedding.shape != (x.shape[0], self.embedding_dim):
                raise InputError(
                    None, "embedding", f"shape ({x.shape[0]}, {self.embedding_dim})", tuple(embedding.shape)
                )

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, embedding)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)  # (B, c_i, H/2^i, W/2^i)
            skips.append(x)
        x = skips.pop()  # bottleneck (B, c_{n-1}, H/2^{n-1}, W/2^{n-1})
        if self.film_bottleneck is not None:
            x = self.film_bottleneck(x, embedding)
        for i in reversed(range(len(self.up))):
            x = self.upsample[i](x)  # (B, c_i, H/2^i, W/2^i)
            x = self.up[i](torch.cat([x, skips[i]], dim=1))
            if self.film_up is not None:
                x = self.film_up[i](x, embedding)
        return torch.tanh(self.head(x))  # (B, 3, H, W) in [-1, 1]


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: (H&E, IHC) concatenated (B, 6, H, W) → patch logits (B, 1, h, w).

    ``n_layers`` = 3 gives the 70×70 px receptive field of pix2pix; each extra layer doubles it
    roughly. The first layer has no normalisation (pix2pix); widths double up to 8× ``channels``.
    """

    def __init__(self, in_channels: int = 6, channels: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        if int(n_layers) < 1:
            raise InputError(None, "gan.n_layers", "at least one strided layer", n_layers)
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, int(n_layers) + 1):
            previous, width = width, channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(previous, width, 4, stride=stride, padding=1, bias=bias),
                make_norm(norm, width),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.n_layers = int(n_layers)

    def forward(self, he: torch.Tensor, ihc: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat([he, ihc], dim=1))


def patchgan_receptive_field_px(n_layers: int) -> int:
    """Receptive field (px) of one output logit of :class:`PatchDiscriminator` (70 for n_layers = 3)."""
    # Layers from the output back: conv4 s1, conv4 s1 (the last norm layer), then n_layers conv4 s2.
    field = 1
    for stride in [1, 1] + [2] * int(n_layers):
        field = (field - 1) * stride + 4
    return field


def gan_loss(logits: torch.Tensor, real: bool, mode: str = "vanilla") -> torch.Tensor:
    """GAN loss of patch logits against an all-real or all-fake target."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    raise InputError(None, "gan.mode", f"one of {GAN_MODES}", mode)


def generator_loss(
    fake: torch.Tensor,
    target: torch.Tensor,
    l1_weight: float = 100.0,
    fake_logits: torch.Tensor | None = None,
    mode: str = "vanilla",
) -> tuple[torch.Tensor, dict]:
    """pix2pix generator objective λ·L1(fake, target) [+ GAN(D(he, fake) judged real)]; returns (loss, parts)."""
    l1 = F.l1_loss(fake, target)
    loss = l1_weight * l1
    parts = {"l1": float(l1.detach())}
    if fake_logits is not None:
        adversarial = gan_loss(fake_logits, True, mode)
        loss = loss + adversarial
        parts["g_gan"] = float(adversarial.detach())
    return loss, parts


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, mode: str = "vanilla") -> torch.Tensor:
    """pix2pix discriminator objective ½·(GAN(real → real) + GAN(fake → fake)); halved as in pix2pix to slow D."""
    return 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))


def build_generator(model_cfg: dict, embedding_dim: int | None) -> FiLMUNet:
    """The generator a ``model`` config section names; ``embedding_dim`` None (or ``film: false``) = no FiLM."""
    film = bool(model_cfg.get("film", True))
    return FiLMUNet(
        channels=model_cfg.get("channels") or DEFAULT_CHANNELS,
        embedding_dim=embedding_dim if film else None,
        norm=model_cfg.get("norm", "group"),
    )


def build_discriminator(gan_cfg: dict) -> PatchDiscriminator:
    """The PatchGAN of a ``gan`` config section (``channels``, ``n_layers``, ``norm``)."""
    return PatchDiscriminator(
        in_channels=6,
        channels=int(gan_cfg.get("channels", 64)),
        n_layers=int(gan_cfg.get("n_layers", 3)),
        norm=gan_cfg.get("norm", "instance"),
    )


# ---------------------------------------------------------------------------------------------
# Saved generator


def save_generator(folder: Path, generator: FiLMUNet, meta: Mapping[str, Any]) -> None:
    """``generator.safetensors`` + ``generator.json`` (architecture, embedding scaler, encoder), each atomic."""
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        # bytes into the temporary file: save_file would recreate it with private (0600) permissions
        tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}))
    write_json(
        folder / META_NAME,
        {"channels": generator.channels, "norm": generator.norm, "embedding_dim": generator.embedding_dim, **meta},
    )


def load_generator(folder: str | Path, device: str | torch.device = "cpu") -> tuple[FiLMUNet, dict]:
    """The generator :func:`save_generator` wrote, in eval mode, and its metadata (embedding mean/std, encoder)."""
    folder = Path(folder)
    meta = read_json_file(folder / META_NAME, "a virtual-IHC generator config (generator.json)")
    generator = FiLMUNet(meta["channels"], meta.get("embedding_dim"), norm=meta.get("norm", "group"))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(weights, None, "the generator weights", "no such file")
    generator.load_state_dict(load_file(str(weights)), strict=True)
    return generator.to(device).eval(), meta


__all__ = [
    "NORMS",
    "GAN_MODES",
    "DEFAULT_CHANNELS",
    "WEIGHTS_NAME",
    "META_NAME",
    "FiLM",
    "ConvBlock",
    "FiLMUNet",
    "PatchDiscriminator",
    "patchgan_receptive_field_px",
    "gan_loss",
    "generator_loss",
    "discriminator_loss",
    "build_generator",
    "build_discriminator",
    "make_norm",
    "save_generator",
    "load_generator",
]
