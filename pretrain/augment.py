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

Colour jitter: brightness (multiply), contrast (blend with the image's mean grey), saturation
(blend with the pixel's grey) and a per-channel gain standing in for stain-intensity variation
between H&E slides. Together they are one affine map per image (:meth:`ColourDraw.affine`), which
:mod:`pretrain.collate` folds with the normalisation so the pixels are touched only a few times.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

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
    # Off by default: it mixes channels, which costs ~0.15 ms more per 224 px crop (measured).
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
