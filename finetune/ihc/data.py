"""Paired H&E / IHC tiles as the virtual-IHC head reads them, and as it trains on them.

- the layout reader (:func:`read_pairs`; the layout is described in :mod:`finetune.layouts`):
  ``HE/<split>/<name>.png`` + ``IHC/<split>/<name>.png`` (+ optional ``nuclei/`` label images and
  a synthetic set's ``truth.csv``), or the flat variant split by a seeded fraction;
- the generator's value range (uint8 RGB ↔ float in [−1, 1], :func:`to_model_range`, :func:`to_uint8`);
- the conditioning: PAST embeddings of whole tiles (:func:`embed_tiles`), standardised per
  dimension on the training tiles (:class:`EmbeddingScaler`);
- the training samples (:class:`PairDataset`): random square crops of H&E and IHC under the same
  random flip / 90° rotation (:func:`finetune.augment.random_dihedral`).

The synthetic demo set is painted by :mod:`finetune.synthetic.ihc`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from common.errors import InputError
from finetune.augment import random_dihedral
from finetune.embed import embed_images
from finetune.encoders import ImageEncoder
from finetune.layouts import HE_DIR, IHC_DIR, IMAGE_SUFFIXES, NUCLEI_DIR, SPLITS, TRUTH_NAME, seeded_test_names

log = logging.getLogger(__name__)

EMBEDDINGS = ("projection", "backbone")


# ---------------------------------------------------------------------------------------------
# Reading the paired layout


@dataclass(frozen=True)
class IHCPair:
    """One paired tile: file paths and the (H, W) px size both images share."""

    name: str
    he_path: Path
    ihc_path: Path
    nuclei_path: Path | None
    size_hw: tuple[int, int]


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in found:
                raise InputError(path, "file name", f"one image per name in {folder}", f"also {found[path.stem].name}")
            found[path.stem] = path
    return found


def _rgb_header(path: Path) -> tuple[int, int]:
    """(H, W) px of an RGB image from its header only (no pixel decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
    except Exception as exc:  # PIL raises several types for unreadable files
        raise InputError(path, None, "a readable image", f"{type(exc).__name__}: {exc}") from exc
    if mode != "RGB":
        raise InputError(path, "mode", "an 8-bit RGB image", mode)
    return height, width


def layout_kind(root: str | Path) -> str:
    """``split`` when ``HE/train`` or ``HE/test`` exists, ``flat`` when ``HE`` holds the images directly."""
    root = Path(root)
    he = root / HE_DIR
    if not he.is_dir() or not (root / IHC_DIR).is_dir():
        raise InputError(root, None, f"a paired layout with {HE_DIR}/ and {IHC_DIR}/ folders", "missing")
    return "split" if any((he / s).is_dir() for s in SPLITS) else "flat"


def read_pairs(
    root: str | Path, split: str, test_fraction: float = 0.2, seed: int = 0, check_sizes: bool = True
) -> list[IHCPair]:
    """The paired tiles of ``split`` (train/test), validated: same names in HE and IHC, same sizes, RGB.

    Unmatched names are reported (up to 5 of each side) in one InputError; so is the first image
    whose size differs from its partner's or that is not RGB. Nuclei label images are optional,
    per tile. ``test_fraction``/``seed`` split a flat layout (ignored for the split layout).
    """
    if split not in SPLITS:
        raise InputError(None, "split", f"one of {SPLITS}", split)
    root = Path(root)
    kind = layout_kind(root)
    sub = Path(split) if kind == "split" else Path()
    he_dir, ihc_dir, nuclei_dir = root / HE_DIR / sub, root / IHC_DIR / sub, root / NUCLEI_DIR / sub
    for folder in (he_dir, ihc_dir):
        if not folder.is_dir():
            raise InputError(folder, None, f"a folder of {split} images", "missing")
    he, ihc = _images_by_stem(he_dir), _images_by_stem(ihc_dir)
    only_he, only_ihc = sorted(set(he) - set(ihc)), sorted(set(ihc) - set(he))
    if only_he or only_ihc:
        raise InputError(
            ihc_dir,
            "file names",
            f"the same image names as {he_dir}",
            f"{len(only_he)} only in {HE_DIR} {only_he[:5]}, {len(only_ihc)} only in {IHC_DIR} {only_ihc[:5]}",
        )
    names = sorted(he)
    if kind == "flat":
        test = seeded_test_names(names, test_fraction, seed)
        names = [n for n in names if (n in test) == (split == "test")]
    if not names:
        raise InputError(he_dir, None, f"at least one {split} image", "none")
    nuclei = _images_by_stem(nuclei_dir) if nuclei_dir.is_dir() else {}
    pairs = []
    for name in names:
        size_hw = _rgb_header(he[name]) if check_sizes else (0, 0)
        if check_sizes:
            ihc_hw = _rgb_header(ihc[name])
            if ihc_hw != size_hw:
                raise InputError(
                    ihc[name],
                    "size",
                    f"{size_hw[0]} × {size_hw[1]} px like {he[name].name} (H × W)",
                    f"{ihc_hw[0]} × {ihc_hw[1]} px",
                )
        pairs.append(IHCPair(name, he[name], ihc[name], nuclei.get(name), size_hw))
    n_nuclei = sum(p.nuclei_path is not None for p in pairs)
    log.info("%s: %d %s pairs (%s layout), %d with nuclei masks", root, len(pairs), split, kind, n_nuclei)
    return pairs


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB image."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "RGB":
            raise InputError(path, "mode", "an 8-bit RGB image", image.mode)
        return np.asarray(image, dtype=np.uint8).copy()


def read_nuclei(path: str | Path, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """int32 (H, W) nuclei label image (0 = background); checked against the tile's size when given."""
    import tifffile

    labels = np.asarray(tifffile.imread(path))
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise InputError(path, None, "a 2-D non-negative integer label image", f"{labels.dtype} {labels.shape}")
    if size_hw is not None and tuple(labels.shape) != tuple(size_hw):
        raise InputError(path, "size", f"{size_hw[0]} × {size_hw[1]} px like the H&E (H × W)", labels.shape)
    return labels.astype(np.int32, copy=False)


def load_pair(pair: IHCPair) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(H&E uint8 (H, W, 3), IHC uint8 (H, W, 3), nuclei int32 (H, W) or None)."""
    he, ihc = read_rgb(pair.he_path), read_rgb(pair.ihc_path)
    if he.shape != ihc.shape:
        raise InputError(pair.ihc_path, "size", f"{he.shape[:2]} px like {pair.he_path.name}", ihc.shape[:2])
    nuclei = read_nuclei(pair.nuclei_path, he.shape[:2]) if pair.nuclei_path is not None else None
    return he, ihc, nuclei


def read_truth(root: str | Path) -> pd.DataFrame | None:
    """The planted per-tile table ``truth.csv`` of a synthetic set, indexed by name; None when absent."""
    path = Path(root) / TRUTH_NAME
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    if "name" not in table.columns or "h_score" not in table.columns:
        raise InputError(path, "columns", "name and h_score", list(table.columns))
    return table.set_index("name")


# ---------------------------------------------------------------------------------------------
# The generator's value range


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float32 (..., 3, H, W) in [−1, 1] (the generator's input and target range)."""
    x = torch.as_tensor(np.ascontiguousarray(images_uint8)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [−1, 1] → uint8 (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Conditioning: tile embeddings


def resolve_which(encoder: ImageEncoder, embedding: str) -> str:
    """``projection`` uses the joint-space projection when the encoder has one, else backbone features."""
    if embedding == "projection" and encoder.has_projection:
        return "projected"
    return "backbone"


class EmbeddingScaler:
    """Per-dimension standardisation fitted on the training tiles' embeddings (mean 0, sd 1).

    Projection outputs are L2-normalised (entries ~ 1/√D); standardising puts every encoder's
    embedding on the same scale for the FiLM projections, whatever its width or normalisation.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, embeddings: np.ndarray) -> EmbeddingScaler:
        std = embeddings.std(axis=0)
        return cls(embeddings.mean(axis=0), np.where(std > 1e-6, std, 1.0))

    def __call__(self, embeddings: np.ndarray | torch.Tensor):
        if isinstance(embeddings, torch.Tensor):
            mean = torch.as_tensor(self.mean, device=embeddings.device)
            std = torch.as_tensor(self.std, device=embeddings.device)
            return (embeddings.float() - mean) / std
        return ((np.asarray(embeddings, np.float32) - self.mean) / self.std).astype(np.float32)


def embed_tiles(
    encoder: ImageEncoder, pairs: Sequence[IHCPair], which: str, batch_size: int, progress: bool, desc: str
) -> np.ndarray:
    """float32 (n_tiles, D) embeddings of the full H&E tiles (resized to the encoder's input by its preprocess)."""
    return embed_images(
        encoder, (read_rgb(p.he_path) for p in pairs), len(pairs), batch_size, which, progress, desc=desc
    )


# ---------------------------------------------------------------------------------------------
# Training samples


def train_crop_px(pairs: Sequence[IHCPair], crop_px: int | None, multiple_px: int) -> int:
    """Square training crop (px): ``crop_px`` or the smallest tile side, floored to a multiple of ``multiple_px``."""
    smallest = min(min(p.size_hw) for p in pairs)
    size = int(crop_px) if crop_px else smallest
    if size > smallest:
        raise InputError(None, "train.crop_px", f"at most the smallest training tile side ({smallest} px)", size)
    size -= size % multiple_px
    if size < multiple_px:
        raise InputError(None, "train.crop_px", f"at least {multiple_px} px (the generator's size multiple)", crop_px)
    return size


class PairDataset(Dataset):
    """Training samples: random square crops of (H&E, IHC) with the same random dihedral transform, plus the
    tile's standardised embedding. Yields he (3, s, s) and ihc (3, s, s) in [−1, 1], embedding (D,)."""

    def __init__(
        self, pairs: Sequence[IHCPair], embeddings: np.ndarray, crop_px: int, augment: bool = True, cache: bool = False
    ):
        self.pairs = list(pairs)
        self.embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        self.crop_px = int(crop_px)
        self.augment = bool(augment)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _images(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        he, ihc, _ = load_pair(self.pairs[index])
        if self.cache is not None:
            self.cache[index] = (he, ihc)
        return he, ihc

    def __getitem__(self, index: int):
        he, ihc = self._images(index)
        h, w = he.shape[:2]
        s = self.crop_px
        # torch's RNG: DataLoader workers get distinct, seeded streams.
        y0 = int(torch.randint(0, h - s + 1, ())) if self.augment else (h - s) // 2
        x0 = int(torch.randint(0, w - s + 1, ())) if self.augment else (w - s) // 2
        pair = to_model_range(np.stack([he[y0 : y0 + s, x0 : x0 + s], ihc[y0 : y0 + s, x0 : x0 + s]]))  # (2, 3, s, s)
        if self.augment:
            (pair,) = random_dihedral(pair, axes=(-2, -1))
        return pair[0].contiguous(), pair[1].contiguous(), self.embeddings[index]


__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "HE_DIR",
    "IHC_DIR",
    "NUCLEI_DIR",
    "TRUTH_NAME",
    "EMBEDDINGS",
    "IHCPair",
    "read_pairs",
    "layout_kind",
    "seeded_test_names",
    "read_rgb",
    "read_nuclei",
    "load_pair",
    "read_truth",
    "to_model_range",
    "to_uint8",
    "resolve_which",
    "EmbeddingScaler",
    "embed_tiles",
    "train_crop_px",
    "PairDataset",
]
