"""Light augmentations for H&E crops: dihedral (flips, 90° rotations) and mild colour jitter.

Frame convention
----------------
A crop is indexed ``image[y, x]`` (height first): x grows to the right, y grows DOWN, as on screen.
Neighbour offsets ``(dx, dy)`` (µm, neighbour minus centre) are in that same frame. A dihedral
transform moves every pixel around the crop centre, so it must move every neighbour offset the
same way; :func:`dihedral_matrix` gives the 2 × 2 matrix M with ``offset_new = M @ offset``.

* horizontal flip (mirror left-right): x -> -x, so (dx, dy) -> (-dx, dy);
* one 90° rotation, ``np.rot90(image, 1, axes=(0, 1))``, counter-clockwise as displayed
  (y down): pixel (x, y) about the centre goes to (y, -x), so (dx, dy) -> (dy, -dx).

Transforms act about the crop's geometric centre ((S - 1) / 2 px): the cell, centred on pixel
S // 2 by :mod:`data_shards.crops`, may move by one pixel (0.5 px on average), far below a cell.

A sample draws a flip f ∈ {0, 1} and k ∈ {0, 1, 2, 3} quarter turns and applies the flip first,
then the rotation: the 8 elements of the square's symmetry group, each with probability 1/8
(a vertical flip is a horizontal flip followed by a half turn).

Where: the loader workers draw the transform and the jitter factors of each cell (seeded, so the
stream is reproducible) and apply the transform to the neighbour offsets; :class:`DeviceImages`
applies both to the uint8 crops on the device, on the whole batch.

Colour jitter: brightness (multiply), contrast (blend with the image's mean grey), saturation
(blend with the pixel's grey) and a per-channel gain standing in for stain-intensity variation
between H&E slides. Together they are one affine map per image (:meth:`ColourDraw.affine`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from common.errors import InputError

_FLIP = np.array([[-1.0, 0.0], [0.0, 1.0]])  # x -> -x
_QUARTER_TURN = np.array([[0.0, 1.0], [-1.0, 0.0]])  # (dx, dy) -> (dy, -dx), = np.rot90 k=1 on image[y, x]
# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale uses.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """What to randomise. Jitter amplitudes are the half-widths of uniform factors around 1."""

    flip: bool = True  # random horizontal flip (with rot90: all 8 dihedral transforms)
    rot90: bool = True  # random multiple of 90°
    brightness: float = 0.1  # factor in [1 - b, 1 + b]
    contrast: float = 0.1
    # Off by default: it mixes channels (on the device: two more passes over the batch).
    saturation: float = 0.0
    channel_gain: float = 0.05  # independent factor per RGB channel (stain intensity)

    @property
    def any_colour(self) -> bool:
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.channel_gain))


def parse_augment(augment: bool | dict | AugmentConfig | None) -> AugmentConfig | None:
    """``True`` -> the defaults; ``False``/``None`` -> no augmentation; a dict overrides defaults."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return AugmentConfig()
    if isinstance(augment, AugmentConfig):
        return augment
    known = {f.name for f in fields(AugmentConfig)}
    options = dict(augment)
    if not options.pop("enabled", True):
        return None
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(None, "augment", f"keys among {sorted(known)} (or 'enabled')", unknown)
    config = AugmentConfig(**options)
    for name in ("brightness", "contrast", "saturation", "channel_gain"):
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise InputError(None, f"augment.{name}", "an amplitude in [0, 1)", value)
    return config


def describe(config: AugmentConfig | None) -> dict:
    return {"enabled": False} if config is None else {"enabled": True, **asdict(config)}


def draw_dihedral(rng: np.random.Generator, config: AugmentConfig | None) -> tuple[int, int]:
    """(flip ∈ {0, 1}, quarter turns k ∈ {0..3}) for one sample."""
    if config is None:
        return 0, 0
    flip = int(rng.integers(2)) if config.flip else 0
    turns = int(rng.integers(4)) if config.rot90 else 0
    return flip, turns


def dihedral_matrix(flip: int, turns: int) -> np.ndarray:
    """(2, 2) M with offset_new = M @ offset for "flip first, then ``turns`` quarter turns"."""
    return np.linalg.matrix_power(_QUARTER_TURN, turns % 4) @ (_FLIP if flip else np.eye(2))


def dihedral_image(image_hwc: np.ndarray, flip: int, turns: int) -> np.ndarray:
    """Apply the transform to an (H, W, C) crop; returns a view (no copy) when possible."""
    if flip:
        image_hwc = image_hwc[:, ::-1]
    if turns % 4:
        image_hwc = np.rot90(image_hwc, turns % 4, axes=(0, 1))
    return image_hwc


def dihedral_offsets(offsets_um: np.ndarray, flip: int, turns: int) -> np.ndarray:
    """Apply the transform to (m, 2) offsets (dx, dy) in µm; exact (entries are 0 and ±1)."""
    if not flip and turns % 4 == 0:
        return offsets_um
    matrix = dihedral_matrix(flip, turns).astype(offsets_um.dtype)
    return offsets_um @ matrix.T


@dataclass(frozen=True)
class ColourDraw:
    """One image's colour jitter factors (1.0 = unchanged)."""

    gain: np.ndarray  # (3,) per-channel gain G
    brightness: float  # β
    saturation: float  # s
    contrast: float  # k

    def affine(self, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The jitter as y = A @ rgb + c on pixels in [0, 1]; returns A (3, 3), c (3,), float64.

        Steps, in this order: gain G, brightness β, saturation s (blend with the pixel's grey w·rgb),
        contrast k (blend with the image's mean grey). The grey weights w sum to 1, so the
        saturation step keeps each pixel's grey and the mean grey after it is β w·(G m), with m the
        image's mean RGB (``mean_rgb``, in [0, 1]). Hence A = k β (s I + (1 - s) 1 wᵀ) G and
        c = (1 - k) β w·(G m) 1. Clamping to [0, 1] happens once, after the whole map
        (torchvision clamps after each step; with mild factors they differ only at saturated pixels).
        """
        w = np.asarray(GREY_WEIGHTS)
        blend_to_grey = self.saturation * np.eye(3) + (1.0 - self.saturation) * np.outer(np.ones(3), w)
        matrix = self.contrast * self.brightness * blend_to_grey @ np.diag(self.gain)
        mean_grey = self.brightness * float(w @ (self.gain * np.asarray(mean_rgb, dtype=np.float64)))
        return matrix, np.full(3, (1.0 - self.contrast) * mean_grey)


def draw_colour(rng: np.random.Generator, config: AugmentConfig) -> ColourDraw:
    """Uniform factors in [1 - a, 1 + a] for each amplitude a of ``config`` (one rng call)."""
    amplitudes = np.array([config.channel_gain] * 3 + [config.brightness, config.saturation, config.contrast])
    factors = 1.0 + amplitudes * rng.uniform(-1.0, 1.0, size=6)
    return ColourDraw(factors[:3], float(factors[3]), float(factors[4]), float(factors[5]))


class DeviceImages:
    """The loader's uint8 crops -> normalised model input, on the device, for the whole batch.

    On a CUDA (or other) device: a few torch kernels per batch. On the CPU (CPU runs, tests): numpy,
    crop by crop (measured several times faster than torch's CPU kernels on these strided layouts);
    both compute the same map.

    ``images`` uint8 (B, H, W, 3) (already on the device), ``dihedral`` int64 (B, 2) (flip, turns;
    on the host: it only picks index sets), ``colour`` float32 (B, 6) or None (see
    :mod:`pretrain.collate`). Returns (B, 3, H, W) in ``dtype``: x / 255, the cell's flip then
    quarter turns (as :func:`dihedral_image`), the colour jitter of :meth:`ColourDraw.affine` with
    the image's mean grey (estimated on every 4th pixel of every 4th row), one clamp to [0, 1], then
    (x - mean) / std. The
    arithmetic is float32; only the result is cast (bf16 for a bf16 run).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError(None, "image_mean/image_std", "3 values each, std > 0", (mean, std))
        self._constants: dict = {}

    def _mean_std(self, device) -> tuple:
        if device not in self._constants:
            self._constants[device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                torch.tensor(GREY_WEIGHTS, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            )
        return self._constants[device]

    def __call__(self, images, dihedral, colour=None, dtype=None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(None, "batch['image']", "uint8 (B, H, W, 3) crops", (images.dtype, tuple(images.shape)))
        if images.device.type == "cpu":  # a CPU run: numpy, one crop at a time while it is in cache
            return _cast(self._numpy(images, dihedral, colour), dtype)
        return _cast(self._torch(images, dihedral, colour), dtype)

    def _affine(self, colour: np.ndarray, channel_means: np.ndarray) -> tuple[np.ndarray, ...]:
        """Jitter + normalisation folded into z_c = D_c x_c + u_c grey + b_c for x in 0..255, then a clamp
        to the normalised [0, 1]; grey = w·(βG x) / 255. (B, 6) factors, (B, 3) mean pixel -> (B, 3) each.
        See ColourDraw.affine for the map."""
        mean, std, w = np.asarray(self.mean), np.asarray(self.std), np.asarray(GREY_WEIGHTS)
        gain, brightness, saturation, contrast = colour[:, :3], colour[:, 3:4], colour[:, 4:5], colour[:, 5:6]
        scaled_gain = gain * brightness / 255.0  # x -> βG x / 255
        mean_grey = (channel_means * scaled_gain * w).sum(axis=1, keepdims=True)  # (B, 1)
        diagonal = contrast * saturation * scaled_gain / std
        to_grey = contrast * (1.0 - saturation) / std  # times grey
        bias = ((1.0 - contrast) * mean_grey - mean) / std
        return diagonal, to_grey, bias, scaled_gain * w

    def _numpy(self, images, dihedral, colour):
        pixels = images.numpy()  # (B, H, W, 3) uint8
        batch, height, width, _ = pixels.shape
        out = np.empty((batch, 3, height, width), dtype=np.float32)
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        pairs = dihedral.tolist()
        if colour is None:
            diagonal = np.broadcast_to(1.0 / (255.0 * std), (batch, 3))
            bias = np.broadcast_to(-mean / std, (batch, 3))
        else:
            means = pixels[:, ::4, ::4].reshape(batch, -1, 3).mean(axis=1)  # (B, 3) mean pixel, every 4th
            diagonal, to_grey, bias, grey_weights = self._affine(colour.numpy().astype(np.float64), means)
        low = (-mean / std).astype(np.float32).reshape(3, 1, 1)
        high = ((1.0 - mean) / std).astype(np.float32).reshape(3, 1, 1)
        for i, (flip, turns) in enumerate(pairs):
            view = dihedral_image(pixels[i], flip, turns).transpose(2, 0, 1)  # (3, H, W) strided uint8 view
            slot = out[i]
            np.multiply(view, diagonal[i].astype(np.float32).reshape(3, 1, 1), out=slot, casting="unsafe")
            if colour is not None and to_grey[i, 0] != 0.0:  # saturation jitter: the pixel's grey
                grey = np.tensordot(grey_weights[i].astype(np.float32), view, axes=1)  # (H, W)
                slot += (to_grey[i].astype(np.float32).reshape(3, 1, 1)) * grey
            slot += bias[i].astype(np.float32).reshape(3, 1, 1)
            if colour is not None:
                np.clip(slot, low, high, out=slot)
        return torch.from_numpy(out)

    def _torch(self, images, dihedral, colour):
        # Mean pixel of each crop on every 4th pixel of every 4th row, before any flip (as _numpy).
        means = images[:, ::4, ::4].float().mean(dim=(1, 2)).double() if colour is not None else None  # (B, 3)
        # Flips/rotations on the uint8 crops (a quarter of the bytes), only for the cells that have one.
        pairs = [tuple(p) for p in dihedral.tolist()]  # host tensor: no device sync
        moved = [p for p in set(pairs) if p[0] or p[1] % 4]
        if moved:
            images = images.clone()
        for flip, turns in moved:
            index = torch.tensor([i for i, p in enumerate(pairs) if p == (flip, turns)], device=images.device)
            part = images.index_select(0, index)  # (b, H, W, 3)
            if flip:
                part = part.flip(2)  # x -> -x
            if turns % 4:
                part = torch.rot90(part, turns % 4, dims=(1, 2))  # = np.rot90(image[y, x], k, axes=(0, 1))
            images.index_copy_(0, index, part.contiguous())
        mean, std, _ = self._mean_std(images.device)
        x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) pixel values 0..255
        if colour is None:  # z = x / (255 std) - mean / std
            return torch.addcmul(-mean / std, x, 1.0 / (255.0 * std))
        colour = colour.to(device=x.device, dtype=torch.float64)
        diagonal, to_grey, bias, grey_weights = (
            torch.as_tensor(v, device=x.device).float().view(-1, 3, 1, 1) for v in self._affine_torch(colour, means)
        )
        z = torch.addcmul(bias, x, diagonal)
        if bool((colour[:, 4] != 1.0).any()):  # host sync only when saturation jitter is on
            grey = (x * grey_weights).sum(dim=1, keepdim=True)  # (B, 1, H, W)
            z.addcmul_(grey, to_grey)
        low, high = -mean / std, (1.0 - mean) / std
        return torch.maximum(torch.minimum(z, high), low)

    def _affine_torch(self, colour, means):
        """:meth:`_affine` in torch, on the device (no host sync)."""
        mean = torch.tensor(self.mean, dtype=torch.float64, device=colour.device)
        std = torch.tensor(self.std, dtype=torch.float64, device=colour.device)
        w = torch.tensor(GREY_WEIGHTS, dtype=torch.float64, device=colour.device)
        gain, brightness, saturation, contrast = colour[:, :3], colour[:, 3:4], colour[:, 4:5], colour[:, 5:6]
        scaled_gain = gain * brightness / 255.0
        mean_grey = (means * scaled_gain * w).sum(dim=1, keepdim=True)
        diagonal = contrast * saturation * scaled_gain / std
        to_grey = contrast * (1.0 - saturation) / std
        bias = ((1.0 - contrast) * mean_grey - mean) / std
        return diagonal, to_grey, bias, (scaled_gain * w)


def _cast(x, dtype):
    return x if dtype is None else x.to(dtype)
