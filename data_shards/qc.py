"""Per-cell quality filters before sharding; every filter reports how many cells it removed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage import color, filters, morphology

log = logging.getLogger(__name__)


@dataclass
class QCResult:
    keep: np.ndarray  # (n_cells,) bool
    removed: dict[str, int] = field(default_factory=dict)  # filter name -> cells it removed first
    n_input: int = 0

    def summary(self) -> dict:
        return {"n_input": self.n_input, "n_kept": int(self.keep.sum()), "removed": dict(self.removed)}


def tissue_mask(thumbnail_rgb: np.ndarray, min_object_px: int = 64) -> np.ndarray:
    """Foreground (tissue) mask of an H&E thumbnail: stained pixels are saturated, glass is not.

    Otsu on HSV saturation, then closing and small-object removal; (h, w) bool.
    """
    saturation = color.rgb2hsv(thumbnail_rgb)[..., 1]
    if float(saturation.max() - saturation.min()) < 1e-3:
        return np.ones(saturation.shape, dtype=bool)
    mask = saturation > filters.threshold_otsu(saturation)
    mask = morphology.closing(mask, morphology.disk(3))
    mask = ndimage.binary_fill_holes(mask)
    return morphology.remove_small_objects(mask, max_size=min_object_px)


def apply_filters(
    n_cells: int,
    checks: dict[str, np.ndarray],
) -> QCResult:
    """Combine named boolean pass-arrays in order; each filter counts the cells it removes first."""
    keep = np.ones(n_cells, dtype=bool)
    removed = {}
    for name, passed in checks.items():
        passed = np.asarray(passed, dtype=bool)
        if passed.shape != (n_cells,):
            raise ValueError(f"QC check {name!r} has shape {passed.shape}, expected ({n_cells},)")
        removed[name] = int((keep & ~passed).sum())
        keep &= passed
    result = QCResult(keep=keep, removed=removed, n_input=n_cells)
    log.info("QC kept %d of %d cells (%s)", keep.sum(), n_cells, ", ".join(f"{k}: -{v}" for k, v in removed.items()))
    return result


def on_tissue(he_xy_px: np.ndarray, mask: np.ndarray, downsample: float) -> np.ndarray:
    """True where a cell centre (H&E level-0 px) falls on the tissue mask (thumbnail at ``downsample``)."""
    cols = np.floor(he_xy_px[:, 0] / downsample).astype(np.int64)
    rows = np.floor(he_xy_px[:, 1] / downsample).astype(np.int64)
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    result = np.zeros(len(he_xy_px), dtype=bool)
    result[inside] = mask[rows[inside], cols[inside]]
    return result
