"""mIF data for the MIPHEI head: an ORION-like tile reader, the MIPHEI preprocessing, a Dataset.

Layout (one file per tile and folder, matched by the tile name)::

    <root>/he/<tile>.png|.tif|.tiff|.jpg    RGB uint8 (H, W, 3)
    <root>/mif/<tile>.tif|.tiff             multi-channel (C, H, W) uint16 or float (axes CYX; YXC is transposed)
    <root>/nuclei/<tile>.tif|.tiff|.png     integer instance labels (H, W), 0 = background (first page if several)
    <root>/markers.csv                      optional: channel,marker,role (role ∈ marker | autofluorescence | nuclear);
                                            without it the OME-XML channel names of the first mIF tile are used and
                                            roles inferred (AF*/autofluorescence → autofluorescence, DAPI/Hoechst → nuclear)
    <root>/splits.csv                       optional: tile,split (train | val | test); else a seeded random split

Preprocessing (:class:`MIFPreprocessor`, fitted on training tiles, saved as ``preprocess.json`` beside the
model and re-applied at inference), as in MIPHEI-ViT's ``preprocessings/mif_cleaning`` and ``src/dataset.py``:

1. autofluorescence subtraction per channel ``x = max(0, I − λ_c·AF + b_c)``;
2. ``p_c`` = the ``percentile`` (MIPHEI: 99) of the *foreground* (``x > 0``) training pixels of channel c;
3. MIPHEI's log transform ``u = clip(log1p(x / p_c), 0, 1)`` (saturates at x = (e − 1)·p_c);
4. targets ``y = 1.8·u − 0.9`` in [−0.9, 0.9] (MIPHEI quantises u to uint8 on disk first; we keep floats).

Stacks that are already cleaned and normalised (MIPHEI's released uint8 tiles) skip steps 1-3 with
``prenormalised_scale`` (u = I / 255).

λ_c and b_c come from the config per marker, or are estimated (documented assumption, MIPHEI picks them by hand
in a napari tool): λ_c = slope of an ordinary least-squares fit of the marker on the AF channel over *background
pixels* (outside the nuclei dilated by ``background_margin_px``; one refit after dropping residuals above 3 σ,
which removes stained cytoplasm and membranes; fitted on the stack smoothed by a Gaussian of ``fit_smooth_px``,
which keeps λ and damps the AF channel's pixel noise that would bias the slope towards 0), and b_c = −(intercept + ``bias_noise_sd``·σ_bg) so that the
background floor and most of its noise fall to 0, as MIPHEI's negative hand-picked biases do.
"""

from __future__ import annotations

import csv
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.atomic import write_json
from common.errors import InputError, read_json_file
from finetune.augment import random_dihedral

log = logging.getLogger(__name__)

ROLES = ("marker", "autofluorescence", "nuclear")
SPLITS = ("train", "val", "test")
HE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MIF_SUFFIXES = (".tif", ".tiff")
NUCLEI_SUFFIXES = (".tif", ".tiff", ".png")
TARGET_LOW, TARGET_HIGH = -0.9, 0.9  # MIPHEI's target range
TARGET_SPAN = TARGET_HIGH - TARGET_LOW  # 1.8: also the PSNR/SSIM data range in target space
# spatial axes (rows, columns) of a tile's H&E (H, W, 3), targets (M, H, W) and nuclei (H, W), for the joint augmentation
TILE_AXES = ((0, 1), (-2, -1), (0, 1))
PREPROCESS_FORMAT = "miphei-mif-preprocess-v1"


# ---------------------------------------------------------------------------------------------
# Layout reader


@dataclass(frozen=True)
class ChannelInfo:
    index: int  # position in the (C, H, W) mIF stack
    name: str
    role: str  # one of ROLES


@dataclass(frozen=True)
class MIFTilePaths:
    name: str
    he: Path
    mif: Path
    nuclei: Path


@dataclass
class MIFLayout:
    """A checked ORION-like folder: channels, tiles and their split."""

    root: Path
    channels: list[ChannelInfo]
    tiles: list[MIFTilePaths]
    split_of: dict[str, str]  # tile name → train | val | test
    shape_hw: dict[str, tuple[int, int]]  # tile name → (H, W) px

    def split(self, name: str) -> list[MIFTilePaths]:
        return [t for t in self.tiles if self.split_of[t.name] == name]

    def channel(self, name: str) -> ChannelInfo:
        for c in self.channels:
            if c.name == name:
                return c
        raise InputError(self.root / "markers.csv", "marker", f"one of {[c.name for c in self.channels]}", name)

    @property
    def af_channel(self) -> ChannelInfo | None:
        af = [c for c in self.channels if c.role == "autofluorescence"]
        return af[0] if af else None

    @property
    def target_channels(self) -> list[ChannelInfo]:
        """Channels the model predicts by default: markers and the nuclear stain (the AF channel is only subtracted)."""
        return [c for c in self.channels if c.role != "autofluorescence"]


def infer_role(name: str) -> str:
    """Role from a channel name: AF/autofluorescence channels and nuclear stains are recognised, the rest are markers."""
    lowered = name.strip().lower()
    if re.fullmatch(r"(af\d*|autofluo\w*|autofluorescence.*)", lowered):
        return "autofluorescence"
    if lowered in ("dapi", "hoechst", "hoechst33342", "nuclear"):
        return "nuclear"
    return "marker"


def ome_channel_names(path: Path) -> list[str] | None:
    """Channel names from a TIFF's OME-XML (``Pixels/Channel@Name``), or None when it has none."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(path, "OME-XML", "well-formed OME metadata", str(exc)) from exc
    names = [el.get("Name") for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Channel"]
    return names if names and all(names) else None


def read_markers_csv(path: Path) -> list[ChannelInfo]:
    """``channel,marker,role`` rows → channels sorted by index; roles checked against ROLES."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"channel", "marker", "role"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(path, ", ".join(sorted(missing)), "columns channel, marker, role", reader.fieldnames)
        channels = []
        for row_number, row in enumerate(reader, start=2):
            try:
                index = int(row["channel"])
            except ValueError as exc:
                raise InputError(
                    path, f"channel (line {row_number})", "an integer channel index", row["channel"]
                ) from exc
            role = row["role"].strip().lower()
            if role not in ROLES:
                raise InputError(path, f"role (line {row_number})", f"one of {ROLES}", row["role"])
            channels.append(ChannelInfo(index, row["marker"].strip(), role))
    indices = sorted(c.index for c in channels)
    if indices != list(range(len(channels))):
        raise InputError(path, "channel", f"indices 0..{len(channels) - 1}, each once", indices)
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise InputError(path, "marker", "unique marker names", names)
    if sum(c.role == "autofluorescence" for c in channels) > 1:
        raise InputError(
            path,
            "role",
            "at most one autofluorescence channel",
            [c.name for c in channels if c.role == "autofluorescence"],
        )
    return sorted(channels, key=lambda c: c.index)


def _find(folder: Path, name: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _mif_header(path: Path) -> tuple[tuple[int, ...], str]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), str(series.axes)
    except Exception as exc:  # tifffile raises several types for non-TIFF input
        raise InputError(path, None, "a readable multi-channel TIFF", f"{type(exc).__name__}: {exc}") from exc


def _mif_chw_shape(path: Path) -> tuple[int, int, int]:
    shape, axes = _mif_header(path)
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) != 3:
        raise InputError(path, "shape", "a (C, H, W) multi-channel image", shape)
    if axes[-1] in "CS" and axes[0] not in "CS":  # YXC stored channels-last
        return (shape[2], shape[0], shape[1])
    return shape  # type: ignore[return-value]


def _image_hw(path: Path) -> tuple[int, int]:
    if path.suffix.lower() in (".tif", ".tiff"):
        shape, _ = _mif_header(path)
        return (shape[0], shape[1]) if len(shape) == 3 and shape[-1] in (3, 4) else tuple(shape[-2:])  # type: ignore
    from PIL import Image

    with Image.open(path) as image:
        return image.size[1], image.size[0]


def read_splits(path: Path, tile_names: Sequence[str]) -> dict[str, str]:
    """``tile,split`` rows for known tiles; tiles not listed are left out (logged)."""
    known = set(tile_names)
    split_of: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"tile", "split"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(path, ", ".join(sorted(missing)), "columns tile, split", reader.fieldnames)
        for row_number, row in enumerate(reader, start=2):
            tile, split = row["tile"].strip(), row["split"].strip().lower()
            if split not in SPLITS:
                raise InputError(path, f"split (line {row_number})", f"one of {SPLITS}", row["split"])
            if tile not in known:
                raise InputError(path, f"tile (line {row_number})", "a tile with he/, mif/ and nuclei/ files", tile)
            split_of[tile] = split
    left_out = known - set(split_of)
    if left_out:
        log.info("%s: %d tiles not listed, left out", path, len(left_out))
    return split_of


def seeded_split(tile_names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Random train/val/test split with at least one tile in each (needs ≥ 3 tiles)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise InputError(None, "data.split_fractions", "three non-negative fractions (train, val, test)", fractions)
    n = len(tile_names)
    if n < 3:
        raise InputError(None, "tiles", "at least 3 tiles (one each for train, val and test)", n)
    total = float(sum(fractions))
    n_val = max(1, int(round(n * fractions[1] / total)))
    n_test = max(1, int(round(n * fractions[2] / total)))
    if n - n_val - n_test < 1:
        n_val, n_test = 1, 1
    order = np.random.default_rng(seed).permutation(sorted(tile_names))
    split_of = {str(t): "val" for t in order[:n_val]}
    split_of.update({str(t): "test" for t in order[n_val : n_val + n_test]})
    split_of.update({str(t): "train" for t in order[n_val + n_test :]})
    return split_of


def read_orion_layout(
    root: str | Path, split_fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> MIFLayout:
    """Check an ORION-like folder (see the module docstring) from file headers only; pixels are read later."""
    root = Path(root)
    for sub in ("he", "mif", "nuclei"):
        if not (root / sub).is_dir():
            raise InputError(root / sub, None, "a folder of per-tile files (ORION-like layout)", "no such folder")
    he_files = {p.stem: p for p in sorted((root / "he").iterdir()) if p.suffix.lower() in HE_SUFFIXES}
    if not he_files:
        raise InputError(root / "he", None, f"H&E tiles ({', '.join(HE_SUFFIXES)})", "no tile")
    tiles = []
    for name, he in he_files.items():
        mif = _find(root / "mif", name, MIF_SUFFIXES)
        if mif is None:
            raise InputError(root / "mif" / f"{name}.tif", "tile", f"the mIF stack of H&E tile {name}", "no such file")
        nuclei = _find(root / "nuclei", name, NUCLEI_SUFFIXES)
        if nuclei is None:
            raise InputError(
                root / "nuclei" / f"{name}.tif", "tile", f"the nuclei mask of H&E tile {name}", "no such file"
            )
        tiles.append(MIFTilePaths(name, he, mif, nuclei))

    markers_csv = root / "markers.csv"
    if markers_csv.is_file():
        channels = read_markers_csv(markers_csv)
    else:
        names = ome_channel_names(tiles[0].mif)
        if names is None:
            raise InputError(
                markers_csv, None, "markers.csv (channel,marker,role) or OME channel names in the mIF TIFFs", "neither"
            )
        channels = [ChannelInfo(i, n, infer_role(n)) for i, n in enumerate(names)]
        if sum(c.role == "autofluorescence" for c in channels) > 1:
            raise InputError(tiles[0].mif, "OME Channel Name", "at most one autofluorescence channel", names)

    shape_hw = {}
    for tile in tiles:
        c, h, w = _mif_chw_shape(tile.mif)
        if c != len(channels):
            raise InputError(tile.mif, "channels", f"{len(channels)} channels ({[ch.name for ch in channels]})", c)
        he_hw = _image_hw(tile.he)
        nuclei_hw = _image_hw(tile.nuclei)
        if he_hw != (h, w):
            raise InputError(tile.he, "shape", f"the mIF tile's size (H, W) = {(h, w)} px", he_hw)
        if nuclei_hw != (h, w):
            raise InputError(tile.nuclei, "shape", f"the mIF tile's size (H, W) = {(h, w)} px", nuclei_hw)
        shape_hw[tile.name] = (h, w)

    splits_csv = root / "splits.csv"
    if splits_csv.is_file():
        split_of = read_splits(splits_csv, [t.name for t in tiles])
        tiles = [t for t in tiles if t.name in split_of]
        for split in SPLITS:
            if not any(s == split for s in split_of.values()):
                raise InputError(splits_csv, "split", f"at least one {split} tile", "none")
    else:
        split_of = seeded_split([t.name for t in tiles], split_fractions, seed)
    counts = {s: sum(v == s for v in split_of.values()) for s in SPLITS}
    log.info(
        "mIF layout %s: %d tiles (%s), channels %s", root, len(tiles), counts, [f"{c.name}:{c.role}" for c in channels]
    )
    return MIFLayout(root, channels, tiles, split_of, shape_hw)


def read_he(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); an alpha channel is dropped."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as im:
            image = np.array(im.convert("RGB") if im.mode not in ("RGB", "RGBA") else im)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise InputError(path, "pixels", "an RGB uint8 image (H, W, 3)", f"{image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def read_mif(path: Path) -> np.ndarray:
    """float32 (C, H, W); YXC stacks are transposed."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        stack = series.asarray()
        axes = str(series.axes)
    if stack.ndim == 2:
        stack = stack[None]
    elif axes[-1] in "CS" and axes[0] not in "CS":
        stack = np.moveaxis(stack, -1, 0)
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise InputError(path, "dtype", "integer or float intensities", stack.dtype)
    return stack.astype(np.float32, copy=False)


def read_nuclei(path: Path) -> np.ndarray:
    """int32 (H, W) instance labels (the first page of a multi-page TIFF: MIPHEI stores labels, then boundaries)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        labels = tifffile.imread(path, key=0)
    else:
        from PIL import Image

        with Image.open(path) as im:
            labels = np.array(im)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(path, "pixels", "integer instance labels (H, W)", f"{labels.dtype} {labels.shape}")
    if labels.min() < 0:
        raise InputError(path, "pixels", "labels ≥ 0 (0 = background)", int(labels.min()))
    return labels.astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class MIFPreprocessor:
    """The fitted MIPHEI target transform; ``transform`` maps a raw (C, H, W) stack to targets (M, H, W)."""

    markers: list[str]  # model output channels, in order
    channel_indices: list[int]  # index of each marker in the raw stack
    af_index: int | None  # the autofluorescence channel, or None (then λ must be 0)
    lambdas: list[float]  # λ_c
    biases: list[float]  # b_c, raw intensity units
    percentile: float  # of foreground (x > 0) pixels after AF subtraction
    max_values: list[float]  # p_c, raw intensity units
    target_mean: list[float] = field(default_factory=list)  # mean training target per marker (mean baseline)
    target_std: list[float] = field(default_factory=list)  # std of training targets per marker (loss weights)
    fitted_on: dict[str, Any] = field(default_factory=dict)  # provenance: tiles, pixels, which λ/b were estimated
    # Stacks already cleaned and log-normalised (MIPHEI's released uint8 ORION/HEMIT tiles): u = I / scale,
    # no AF subtraction or percentile (λ, b, max_values are then unused).
    prenormalised_scale: float | None = None

    def clean(self, mif: np.ndarray) -> np.ndarray:
        """(C, H, W) raw → (M, H, W) AF-subtracted intensities max(0, I − λ·AF + b)."""
        stack = np.asarray(mif, dtype=np.float32)
        picked = stack[self.channel_indices]  # (M, H, W)
        lam = np.asarray(self.lambdas, np.float32)[:, None, None]
        bias = np.asarray(self.biases, np.float32)[:, None, None]
        af = stack[self.af_index][None] if self.af_index is not None else np.zeros_like(picked[:1])
        return np.maximum(picked - lam * af + bias, 0.0)

    def normalise(self, cleaned: np.ndarray) -> np.ndarray:
        """MIPHEI's log transform: clip(log1p(x / p), 0, 1), per marker."""
        p = np.asarray(self.max_values, np.float32)[:, None, None]
        return np.clip(np.log1p(cleaned / p), 0.0, 1.0).astype(np.float32)

    def transform(self, mif: np.ndarray) -> np.ndarray:
        """(C, H, W) raw → float32 (M, H, W) targets in [−0.9, 0.9]."""
        if self.prenormalised_scale:
            picked = np.asarray(mif, dtype=np.float32)[self.channel_indices]
            return to_target(np.clip(picked / float(self.prenormalised_scale), 0.0, 1.0))
        return to_target(self.normalise(self.clean(mif)))

    def inverse(self, target: np.ndarray) -> np.ndarray:
        """Targets (M, H, W) → AF-subtracted intensities p·expm1(u) (values at the 1.0 saturation come back as (e−1)·p);
        for prenormalised stacks, back to their stored scale (u·scale)."""
        if self.prenormalised_scale:
            return (to_unit(target) * float(self.prenormalised_scale)).astype(np.float32)
        p = np.asarray(self.max_values, np.float32)[:, None, None]
        return (p * np.expm1(to_unit(target))).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "format": PREPROCESS_FORMAT,
            "formula": "u = clip(log1p(max(0, I - lambda*AF + bias) / max_value), 0, 1); target = 1.8*u - 0.9",
            **asdict(self),
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> MIFPreprocessor:
        data = read_json_file(path, "a preprocess.json written by finetune.mif.data.MIFPreprocessor.save")
        if data.get("format") != PREPROCESS_FORMAT:
            raise InputError(path, "format", PREPROCESS_FORMAT, data.get("format"))
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = {"markers", "channel_indices", "af_index", "lambdas", "biases", "percentile", "max_values"} - set(
            fields
        )
        if missing:
            raise InputError(path, ", ".join(sorted(missing)), "every preprocessing parameter", "missing")
        return cls(**fields)


def to_target(unit: np.ndarray) -> np.ndarray:
    """[0, 1] → [−0.9, 0.9] (MIPHEI: x/255·1.8 − 0.9 on its uint8 tiles)."""
    return (np.asarray(unit, np.float32) * TARGET_SPAN + TARGET_LOW).astype(np.float32)


def to_unit(target: np.ndarray) -> np.ndarray:
    """[−0.9, 0.9] → [0, 1], clipping predictions outside the range."""
    return np.clip((np.asarray(target, np.float32) - TARGET_LOW) / TARGET_SPAN, 0.0, 1.0)


def _background_mask(nuclei: np.ndarray, margin_px: int) -> np.ndarray:
    from scipy import ndimage as ndi

    inside = nuclei > 0
    if margin_px > 0 and inside.any():
        inside = ndi.binary_dilation(inside, iterations=int(margin_px))
    return ~inside


def fit_af_line(marker: np.ndarray, af: np.ndarray, trim_sd: float = 3.0) -> tuple[float, float, float]:
    """OLS marker ≈ λ·AF + c over background pixels, refitted once without residuals above ``trim_sd``·σ.

    Returns (λ, c, σ) with σ the robust (1.4826·MAD) residual spread. Positive outliers are stained
    pixels that the nuclear margin missed (cytoplasm, membranes); one trimmed refit removes their pull.
    """
    marker = np.asarray(marker, np.float64)
    af = np.asarray(af, np.float64)
    keep = np.ones(marker.shape, bool)
    lam, c, sigma = 0.0, float(np.median(marker)), 0.0
    for _ in range(2):
        x, y = af[keep], marker[keep]
        if len(x) < 3 or np.ptp(x) == 0:
            lam, c = 0.0, float(np.median(y)) if len(y) else 0.0
        else:
            lam, c = (float(v) for v in np.polyfit(x, y, 1))
        residual = marker - (lam * af + c)
        sigma = 1.4826 * float(np.median(np.abs(residual[keep] - np.median(residual[keep])))) if keep.any() else 0.0
        keep = residual <= trim_sd * max(sigma, 1e-12)
    return lam, c, sigma


def _sample_tile(
    paths: MIFTilePaths, n_pixels: int, margin_px: int, smooth_px: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At up to ``n_pixels`` random pixels (all when the tile is smaller): raw values (C, n), values of the
    Gaussian-smoothed stack (C, n) and background flags (n,)."""
    from scipy import ndimage as ndi

    stack = read_mif(paths.mif)  # (C, H, W)
    smooth = ndi.gaussian_filter(stack, sigma=(0, smooth_px, smooth_px)) if smooth_px > 0 else stack
    background = _background_mask(read_nuclei(paths.nuclei), margin_px).ravel()
    flat, flat_smooth = stack.reshape(stack.shape[0], -1), smooth.reshape(stack.shape[0], -1)
    if flat.shape[1] > n_pixels:
        pick = rng.choice(flat.shape[1], size=n_pixels, replace=False)
        return flat[:, pick], flat_smooth[:, pick], background[pick]
    return flat, flat_smooth, background


def _resolve_marker_values(
    given: Mapping[str, Any] | None, markers: Sequence[str], key: str
) -> dict[str, float | None]:
    """Per-marker numbers from the config; 'auto'/None means estimate. Unknown marker names are errors."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(markers))
    if unknown:
        raise InputError(None, f"preprocess.{key}", f"marker names among {list(markers)}", unknown)
    values: dict[str, float | None] = {}
    for name in markers:
        value = given.get(name)
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            values[name] = None
        else:
            try:
                values[name] = float(value)
            except (TypeError, ValueError) as exc:
                raise InputError(None, f"preprocess.{key}.{name}", "a number or 'auto'", value) from exc
    return values


def fit_preprocessor(
    layout: MIFLayout,
    tiles: Sequence[MIFTilePaths],
    markers: Sequence[str] | None = None,
    lambdas: Mapping[str, Any] | None = None,
    biases: Mapping[str, Any] | None = None,
    percentile: float = 99.0,
    background_margin_px: int = 4,
    bias_noise_sd: float = 2.0,
    fit_max_tiles: int = 512,
    fit_pixels_per_tile: int = 4096,
    fit_smooth_px: float = 2.0,
    prenormalised_scale: float | None = None,
    seed: int = 0,
) -> MIFPreprocessor:
    """Fit λ, b (when not given), p and the target statistics on training tiles (see the module docstring).

    ``prenormalised_scale``: the stacks are already AF-subtracted and log-normalised (MIPHEI's released
    uint8 tiles: 255); targets are then ``1.8·I/scale − 0.9`` and only their statistics are fitted.

    At most ``fit_max_tiles`` tiles (seeded subset) and ``fit_pixels_per_tile`` random pixels per tile
    are read, so that fitting on a whole ORION cohort stays in memory; tiles smaller than that use every pixel.
    """
    if not tiles:
        raise InputError(layout.root, "split", "at least one training tile to fit the preprocessing on", 0)
    if not 0 < float(percentile) <= 100:
        raise InputError(None, "preprocess.percentile", "a percentile in (0, 100]", percentile)
    names = list(markers) if markers else [c.name for c in layout.target_channels]
    known = {c.name: c for c in layout.channels}
    unknown = [m for m in names if m not in known]
    if unknown:
        raise InputError(layout.root / "markers.csv", "marker", f"markers among {list(known)}", unknown)
    af_names = [m for m in names if known[m].role == "autofluorescence"]
    if af_names:
        raise InputError(
            None, "data.markers", "target markers (the autofluorescence channel is subtracted, not predicted)", af_names
        )
    given_lambda = _resolve_marker_values(lambdas, names, "lambdas")
    given_bias = _resolve_marker_values(biases, names, "biases")
    if prenormalised_scale is not None:
        if float(prenormalised_scale) <= 0:
            raise InputError(
                None, "preprocess.prenormalised_scale", "a positive scale (255 for uint8 tiles)", prenormalised_scale
            )
        if lambdas or biases:
            raise InputError(
                None,
                "preprocess.lambdas",
                "no λ / b for prenormalised stacks (already cleaned)",
                {"lambdas": dict(lambdas or {}), "biases": dict(biases or {})},
            )
        given_lambda = {m: 0.0 for m in names}
        given_bias = {m: 0.0 for m in names}
    af = layout.af_channel
    if af is None and prenormalised_scale is None:
        nonzero = [m for m, v in given_lambda.items() if v]
        if nonzero:
            raise InputError(layout.root / "markers.csv", "role", "an autofluorescence channel for λ ≠ 0", nonzero)
        log.warning("no autofluorescence channel: λ = 0 for every marker (only the bias is applied)")

    rng = np.random.default_rng(seed)
    chosen = list(tiles)
    if len(chosen) > fit_max_tiles:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), size=fit_max_tiles, replace=False))]
    samples = [
        _sample_tile(t, int(fit_pixels_per_tile), int(background_margin_px), float(fit_smooth_px), rng) for t in chosen
    ]
    raw = np.concatenate([s[0] for s in samples], axis=1)  # (C, n_pixels)
    smooth = np.concatenate([s[1] for s in samples], axis=1)  # (C, n_pixels)
    background = np.concatenate([s[2] for s in samples])  # (n_pixels,)
    if background.sum() < 100:
        log.warning("only %d background pixels outside the nuclei: fitting λ on every pixel", int(background.sum()))
        background = np.ones_like(background)

    lam_out, bias_out, estimated = [], [], {"lambda": [], "bias": []}
    zeros = np.zeros(int(background.sum()), np.float32)
    af_bg = raw[af.index, background] if af is not None else zeros
    for name in names:
        marker_bg = raw[known[name].index, background]
        lam, bias = given_lambda[name], given_bias[name]
        if lam is None:
            # The slope is fitted on the smoothed stack: smoothing is linear, so λ is unchanged, while the AF
            # channel's own pixel noise, which would bias an OLS slope towards 0 (regression dilution), shrinks.
            lam = (
                max(0.0, fit_af_line(smooth[known[name].index, background], smooth[af.index, background])[0])
                if af is not None
                else 0.0
            )
            estimated["lambda"].append(name)
        if bias is None:
            # Level and spread of the background left after subtracting λ·AF (same trimmed robust fit, AF-free).
            _, level, sigma = fit_af_line(marker_bg - lam * af_bg, zeros)
            bias = -(level + float(bias_noise_sd) * sigma)
            estimated["bias"].append(name)
        lam_out.append(float(lam))
        bias_out.append(float(bias))

    partial = MIFPreprocessor(
        names,
        [known[m].index for m in names],
        None if af is None else af.index,
        lam_out,
        bias_out,
        float(percentile),
        [1.0] * len(names),
    )
    cleaned = partial.clean(raw[:, :, None])[..., 0]  # (M, n_pixels)
    max_values = []
    for name, values in zip(names, cleaned):
        foreground = values[values > 0]
        if foreground.size == 0:
            log.warning("marker %s: no foreground pixel after AF subtraction; max_value = 1", name)
            max_values.append(1.0)
        else:
            max_values.append(float(max(np.percentile(foreground, percentile), 1e-6)))
    partial.max_values = max_values
    if prenormalised_scale is not None:
        partial.prenormalised_scale = float(prenormalised_scale)
        partial.max_values = [float(prenormalised_scale)] * len(names)  # informative only
    targets = partial.transform(raw[:, :, None])[..., 0]  # (M, n_pixels)
    partial.target_mean = [float(v) for v in targets.mean(axis=1)]
    partial.target_std = [float(max(v, 1e-6)) for v in targets.std(axis=1)]
    partial.fitted_on = {
        "n_tiles": len(chosen),
        "n_pixels": int(raw.shape[1]),
        "n_background_pixels": int(background.sum()),
        "background_margin_px": int(background_margin_px),
        "bias_noise_sd": float(bias_noise_sd),
        "fit_smooth_px": float(fit_smooth_px),
        "estimated": estimated,
        "tiles": [t.name for t in chosen],
    }
    for i, name in enumerate(names):
        log.info(
            "preprocess %-10s λ=%.3f b=%.1f p%g=%.1f target mean %.3f std %.3f",
            name,
            lam_out[i],
            bias_out[i],
            percentile,
            max_values[i],
            partial.target_mean[i],
            partial.target_std[i],
        )
    return partial


# ---------------------------------------------------------------------------------------------
# Torch dataset


class MIFTileDataset(Dataset):
    """Tiles → {"he": uint8 (H, W, 3), "target": float32 (M, H, W) in [−0.9, 0.9], "nuclei": int32 (H, W), "index"}.

    ``size_px`` (h, w): resize everything to the model's input size (H&E and targets bilinear with
    antialiasing, nuclei nearest) — the model predicts at the encoder's input size. ``augment``: the
    same random flip / 90° rotation for the three. ``hed_jitter`` / ``brightness_jitter`` (with
    ``augment``): colour augmentation of the H&E alone (:func:`jitter_he`); the targets keep their
    values, so the model learns marker intensity from tissue, not from stain strength. ``cache``:
    keep preprocessed tiles in memory (small sets; leave off for a cohort).
    """

    def __init__(
        self,
        tiles: Sequence[MIFTilePaths],
        preprocessor: MIFPreprocessor,
        size_px: tuple[int, int] | None = None,
        augment: bool = False,
        cache: bool = False,
        hed_jitter: float = 0.0,
        brightness_jitter: float = 0.0,
    ):
        self.tiles = list(tiles)
        self.preprocessor = preprocessor
        self.size_px = None if size_px is None else (int(size_px[0]), int(size_px[1]))
        self.augment = augment
        self.hed_jitter = float(hed_jitter)
        self.brightness_jitter = float(brightness_jitter)
        self.cache = cache
        self._cached: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.tiles)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(he uint8 (H, W, 3), target (M, H, W), nuclei (H, W)) without augmentation."""
        if index in self._cached:
            return self._cached[index]
        paths = self.tiles[index]
        he = torch.from_numpy(read_he(paths.he))
        target = torch.from_numpy(self.preprocessor.transform(read_mif(paths.mif)))
        nuclei = torch.from_numpy(read_nuclei(paths.nuclei))
        if target.shape[-2:] != he.shape[:2] or nuclei.shape != he.shape[:2]:
            raise InputError(
                paths.mif,
                "shape",
                f"the H&E tile's size {tuple(he.shape[:2])} px",
                f"mIF {tuple(target.shape[-2:])}, nuclei {tuple(nuclei.shape)}",
            )
        if self.size_px is not None and tuple(he.shape[:2]) != self.size_px:
            he, target, nuclei = resize_tile(he, target, nuclei, self.size_px)
        item = (he, target, nuclei)
        if self.cache:
            self._cached[index] = item
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        he, target, nuclei = self.load(index)
        if self.augment:
            he, target, nuclei = random_dihedral(he, target, nuclei, axes=TILE_AXES)
            if self.hed_jitter > 0 or self.brightness_jitter > 0:
                he = jitter_he(he, self.hed_jitter, self.brightness_jitter)
        return {"he": he, "target": target, "nuclei": nuclei, "index": index}


def jitter_he(he: torch.Tensor, hed_sigma: float, brightness: float) -> torch.Tensor:
    """Colour augmentation of one uint8 H&E tile (H, W, 3): HED jitter, then brightness.

    HED jitter (Tellez et al. 2018): the optical density ``−log((I + 1) / 256)`` is split into hematoxylin,
    eosin and DAB densities (skimage's Ruifrok-Johnston matrices ``hed_from_rgb`` / ``rgb_from_hed``, exact
    inverses, so no jitter gives the tile back), each scaled by ``1 + U(−σ, σ)`` and shifted by ``U(−σ, σ)``
    times its mean density, and recomposed. Brightness: all channels times ``1 + U(−brightness, brightness)``.
    Draws from torch's generator (each DataLoader worker its own stream).
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    rgb = he.numpy()
    if hed_sigma > 0:
        draws = (torch.rand(2, 3) * 2 - 1).numpy().astype(np.float64) * hed_sigma  # (scale, shift) × (H, E, D)
        od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)  # (H, W, 3) ≥ 0
        hed = od @ hed_from_rgb
        mean_od = hed.reshape(-1, 3).mean(axis=0)
        hed = hed * (1.0 + draws[0]) + draws[1] * mean_od
        out = 256.0 * np.exp(-(hed @ rgb_from_hed)) - 1.0
    else:
        out = rgb.astype(np.float64)
    if brightness > 0:
        out = out * (1.0 + float(torch.rand(()) * 2 - 1) * brightness)
    return torch.from_numpy(np.clip(np.round(out), 0, 255).astype(np.uint8))


def resize_tile(
    he: torch.Tensor, target: torch.Tensor, nuclei: torch.Tensor, size_px: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize an (H, W, 3) uint8 H&E, (M, H, W) targets and (H, W) labels to ``size_px``."""
    he_f = F.interpolate(
        he.permute(2, 0, 1)[None].float(), size=size_px, mode="bilinear", antialias=True, align_corners=False
    )
    he = he_f[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    target = F.interpolate(target[None], size=size_px, mode="bilinear", antialias=True, align_corners=False)[0]
    nuclei = F.interpolate(nuclei[None, None].float(), size=size_px, mode="nearest")[0, 0].to(torch.int32)
    return he, target, nuclei


__all__ = [
    "ROLES",
    "SPLITS",
    "TARGET_LOW",
    "TARGET_HIGH",
    "TARGET_SPAN",
    "ChannelInfo",
    "MIFTilePaths",
    "MIFLayout",
    "read_orion_layout",
    "read_markers_csv",
    "ome_channel_names",
    "infer_role",
    "seeded_split",
    "read_splits",
    "read_he",
    "read_mif",
    "read_nuclei",
    "MIFPreprocessor",
    "fit_preprocessor",
    "fit_af_line",
    "to_target",
    "to_unit",
    "MIFTileDataset",
    "jitter_he",
    "resize_tile",
    "TILE_AXES",
]
