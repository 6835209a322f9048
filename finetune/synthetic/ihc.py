"""A synthetic virtual-IHC set painted on typed H&E tiles, written in the paired layout the IHC head reads.

Synthetic pairs (:func:`paint_ihc`, :func:`write_synthetic_ihc`): real paired sets are not
redistributable, so the demo paints an IHC onto real H&E tiles whose nuclei carry the cell type
planted by the simulated Xenium run (:mod:`finetune.synthetic.stain_tiles`). The marker is nuclear and
"p63-like": basal keratinocytes are mostly strongly positive, most suprabasal keratinocytes weakly
to moderately positive, every other cell negative (:data:`NUCLEAR_MARKER`). Per nucleus an intensity class
(negative/weak/moderate/strong) is drawn and a DAB amount inside that class's band of
``finetune.metrics.DEFAULT_DAB_THRESHOLDS`` (scikit-image ``rgb2hed`` units: log10 OD / 6), so
``h_score`` on the painted IHC with the same nuclei recovers the planted classes exactly. The
counterstain is the H&E's own hematoxylin (``rgb2hed`` channel 0), lightened; the image is
composed with ``skimage.color.hed2rgb`` (Ruifrok–Johnston), the exact inverse of ``rgb2hed``.

Across tiles the H-score varies mostly with the tissue composition (epidermis with its basal
layer vs dermis), which the H&E shows. A per-tile positivity rate and intensity scale, drawn at
random, add variation the H&E does not show, as biology does (proliferation is not visible in
H&E); their ranges are arguments (set both to [1, 1] for a truth fully determined by the image).

The set is written in the split variant of the paired layout (:mod:`finetune.layouts`), read by
:func:`finetune.ihc.data.read_pairs`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from common.atomic import atomic_dir
from common.errors import InputError
from finetune.layouts import HE_DIR, IHC_DIR, NUCLEI_DIR, SPLITS, TRUTH_NAME, seeded_test_names
from finetune.metrics import DEFAULT_DAB_THRESHOLDS, h_score_from_classes

from .stain_tiles import CellTile

log = logging.getLogger(__name__)

# Nuclear marker by planted cell type: (probability that a cell is positive, mean intensity level
# of a positive cell on the class scale 1 = weak, 2 = moderate, 3 = strong). Types not listed are negative.
NUCLEAR_MARKER: dict[str, tuple[float, float]] = {
    "keratinocyte_basal": (0.95, 2.6),
    "keratinocyte_suprabasal": (0.85, 1.8),
}
# truth.csv columns of a tile's planted classes.
PLANTED_COLUMNS = ("h_score", "pct_negative", "pct_weak", "pct_moderate", "pct_strong", "n_nuclei")
LEVEL_SD = 0.45  # spread of a positive cell's intensity level around its type's mean (class units)
BAND_MARGIN = 0.15  # DAB amounts are drawn in the inner 70 % of a class band, safe from rounding noise


# ---------------------------------------------------------------------------------------------
# Painting a synthetic IHC


def _class_bands(thresholds: Sequence[float]) -> np.ndarray:
    """(4, 2) DAB bands [low, high) of negative, weak, moderate, strong (strong spans two moderate widths)."""
    t = [float(v) for v in thresholds]
    return np.array([[0.0, t[0]], [t[0], t[1]], [t[1], t[2]], [t[2], t[2] + 2.0 * (t[2] - t[1])]])


def draw_intensity_classes(
    cell_types: Sequence[str],
    rng: np.random.Generator,
    positivity_rate: float = 1.0,
    intensity_scale: float = 1.0,
    marker: Mapping[str, tuple[float, float]] = NUCLEAR_MARKER,
) -> np.ndarray:
    """Per-nucleus class (n,) int: 0 negative, 1 weak, 2 moderate, 3 strong, by cell type.

    A cell of a listed type is positive with probability ``p_type · positivity_rate``; its class is
    its level ``N(mean_type · intensity_scale, LEVEL_SD)`` rounded into 1…3.
    """
    types = np.asarray(cell_types, dtype=str)
    probability = np.array([marker.get(t, (0.0, 0.0))[0] for t in types]) * positivity_rate
    mean_level = np.array([marker.get(t, (0.0, 0.0))[1] for t in types]) * intensity_scale
    positive = rng.random(len(types)) < probability
    level = rng.normal(mean_level, LEVEL_SD)
    classes = np.clip(np.rint(level), 1, 3).astype(np.int64)
    return np.where(positive, classes, 0)


def planted_h_score(classes: np.ndarray) -> dict[str, float]:
    """H-score, class percentages and nucleus count of planted per-nucleus classes (``metrics.h_score``'s formula)."""
    scores = h_score_from_classes(classes)
    return {key: scores[key] for key in PLANTED_COLUMNS}


def paint_ihc(
    he_rgb: np.ndarray,
    nuclei: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    thresholds: Sequence[float] = DEFAULT_DAB_THRESHOLDS,
    counterstain: float = 0.5,
    max_counterstain: float = 0.12,
    background_dab: float = 0.004,
    texture: float = 0.12,
    noise_od: float = 0.002,
) -> np.ndarray:
    """An IHC image (uint8 (H, W, 3)) of the H&E tile: DAB in the nuclei by class, hematoxylin counterstain.

    ``classes`` (n_nuclei,) gives nucleus k + 1 its class; its DAB amount is drawn in the inner
    part of the class band (:func:`_class_bands`) and painted with a mean-preserving texture, so
    the nucleus's mean DAB (``rgb2hed`` channel 2) lies in the band. Outside nuclei, a faint
    non-specific DAB (``background_dab``, rgb2hed units) follows the H&E's eosin (stroma).
    The counterstain is ``counterstain`` × the H&E's hematoxylin, saturating softly at
    ``max_counterstain`` (a light counterstain; very dark H&E nuclei would otherwise hide the DAB
    under a near-black pixel whose colour the 8-bit image cannot separate). Pixel noise ``noise_od`` (rgb2hed
    units) is added to both stains.
    """
    from skimage.color import hed2rgb, rgb2hed

    he_hed = rgb2hed(he_rgb)  # (H, W, 3) hematoxylin, eosin, DAB in rgb2hed units
    n = int(nuclei.max()) if nuclei.size else 0
    if len(classes) != n:
        raise InputError(None, "classes", f"one class per nucleus ({n})", len(classes))
    eosin = ndi.gaussian_filter(he_hed[..., 1], 2.0)
    dab = background_dab * np.clip(eosin / (np.percentile(eosin, 99) + 1e-9), 0, 1)  # (H, W)
    if n:
        bands = _class_bands(thresholds)[np.asarray(classes, dtype=np.int64)]  # (n, 2)
        width = bands[:, 1] - bands[:, 0]
        amount = bands[:, 0] + width * rng.uniform(BAND_MARGIN, 1 - BAND_MARGIN, size=n)  # (n,) mean DAB
        grain = 1.0 + texture * ndi.gaussian_filter(rng.normal(size=nuclei.shape), 1.0) / 0.28  # ≈ ±texture (1 sd)
        grain = np.clip(grain, 0.5, 1.5)
        grain_mean = np.asarray(ndi.mean(grain, labels=nuclei, index=np.arange(1, n + 1)))  # (n,)
        per_pixel = np.concatenate([[0.0], amount / grain_mean])[nuclei] * grain
        inside = nuclei > 0
        dab[inside] = per_pixel[inside]
    hematoxylin = max_counterstain * np.tanh(counterstain * he_hed[..., 0] / max_counterstain)  # (H, W)
    hed = np.stack(
        [
            hematoxylin + rng.normal(0, noise_od, hematoxylin.shape),
            np.zeros_like(dab),
            dab + rng.normal(0, noise_od, dab.shape),
        ],
        axis=-1,
    )
    rgb = hed2rgb(np.clip(hed, 0, None))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def clean_nuclei(
    tile: CellTile, max_area_um2: float | None = 120.0, ink_green_minus_red: float | None = 15.0
) -> CellTile:
    """The tile without the segmented "nuclei" that are not nuclei; labels renumbered 1…n, types kept matched.

    Dropped: objects over ``max_area_um2`` µm² (merges of dark tissue: painted as one brown block
    they would make a poor target) and objects whose mean H&E green exceeds their mean red by more
    than ``ink_green_minus_red`` 8-bit levels (green/cyan marking ink at tissue edges; hematoxylin
    nuclei are purple-blue, red above green). None disables a rule.
    """
    from skimage.segmentation import relabel_sequential

    n = tile.n_nuclei
    if n == 0:
        return tile
    keep = np.ones(n, dtype=bool)
    index = np.arange(1, n + 1)
    if max_area_um2 is not None:
        area_um2 = np.bincount(tile.nuclei.ravel(), minlength=n + 1)[1:] * tile.um_per_px**2  # (n,)
        keep &= area_um2 <= max_area_um2
    if ink_green_minus_red is not None:
        rgb = tile.he_rgb.astype(np.float64)
        green_minus_red = np.asarray(ndi.mean(rgb[..., 1] - rgb[..., 0], labels=tile.nuclei, index=index))  # (n,)
        keep &= green_minus_red <= ink_green_minus_red
    if keep.all():
        return tile
    nuclei = np.where(np.concatenate([[False], keep])[tile.nuclei], tile.nuclei, 0)
    nuclei, _, _ = relabel_sequential(nuclei)  # kept labels stay in order, so cell_types[keep] still matches
    return replace(tile, nuclei=nuclei.astype(np.int32), cell_types=np.asarray(tile.cell_types)[keep])


def write_synthetic_ihc(
    root: str | Path,
    tiles: Sequence[CellTile],
    seed: int = 0,
    test_fraction: float = 0.2,
    thresholds: Sequence[float] = DEFAULT_DAB_THRESHOLDS,
    positivity_rate: Sequence[float] = (0.8, 1.0),
    intensity_scale: Sequence[float] = (0.85, 1.15),
    counterstain: float = 0.5,
    max_nucleus_um2: float | None = 120.0,
    ink_green_minus_red: float | None = 15.0,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Paint an IHC onto typed H&E tiles (:class:`finetune.synthetic.stain_tiles.CellTile`) and write the paired layout.

    Writes ``HE/<split>/``, ``IHC/<split>/`` (PNG), ``nuclei/<split>/`` (int32 TIFF) and ``truth.csv``
    (one row per tile: split, planted H-score and class percentages, the tile's positivity rate and
    intensity scale, its basal fraction and origin) atomically, and returns that table. Tiles without
    nuclei have no H-score and are left out, and so are objects over ``max_nucleus_um2`` µm² and
    marking ink (:func:`clean_nuclei`). The split is a seeded ``test_fraction`` of the tiles.
    """
    import tifffile
    from PIL import Image

    root = Path(root)
    if root.exists() and not overwrite:
        raise InputError(root, None, "a path that does not exist yet (or overwrite=true)", "exists")
    for field, pair in (("positivity_rate", positivity_rate), ("intensity_scale", intensity_scale)):
        if len(pair) != 2 or not 0 <= float(pair[0]) <= float(pair[1]):
            raise InputError(None, field, "a range [low, high] with 0 ≤ low ≤ high", list(pair))
    names = [t.name for t in tiles]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(None, "tiles", "tiles with distinct names (they become file names)", duplicates[:5])
    tiles = [clean_nuclei(t, max_nucleus_um2, ink_green_minus_red) for t in tiles]
    scored = [t for t in tiles if t.n_nuclei > 0]
    if len(scored) < 2:
        raise InputError(None, "tiles", "at least two H&E tiles with nuclei (one train, one test)", len(scored))
    if len(scored) < len(tiles):
        log.warning(
            "%d of %d tiles have no nuclei and are left out of the IHC set", len(tiles) - len(scored), len(tiles)
        )
    rng = np.random.default_rng(seed)
    test = seeded_test_names([t.name for t in scored], test_fraction, seed)
    rows = []
    with atomic_dir(root) as tmp:
        for sub in (HE_DIR, IHC_DIR, NUCLEI_DIR):
            for split in SPLITS:
                (tmp / sub / split).mkdir(parents=True)
        for tile in scored:
            rate = float(rng.uniform(*positivity_rate))
            scale = float(rng.uniform(*intensity_scale))
            classes = draw_intensity_classes(tile.cell_types, rng, rate, scale)
            ihc = paint_ihc(tile.he_rgb, tile.nuclei, classes, rng, thresholds, counterstain)
            split = "test" if tile.name in test else "train"
            Image.fromarray(tile.he_rgb).save(tmp / HE_DIR / split / f"{tile.name}.png")
            Image.fromarray(ihc).save(tmp / IHC_DIR / split / f"{tile.name}.png")
            tifffile.imwrite(tmp / NUCLEI_DIR / split / f"{tile.name}.tif", tile.nuclei.astype(np.int32))
            rows.append(
                {
                    "name": tile.name,
                    "split": split,
                    **planted_h_score(classes),
                    "positivity_rate": rate,
                    "intensity_scale": scale,
                    "basal_fraction": float(np.mean(tile.cell_types == "keratinocyte_basal")),
                    "origin_x_px": int(tile.origin_px[0]),
                    "origin_y_px": int(tile.origin_px[1]),
                }
            )
        truth = pd.DataFrame(rows)
        truth.to_csv(tmp / TRUTH_NAME, index=False, float_format="%.6g", quoting=csv.QUOTE_MINIMAL)
    log.info(
        "synthetic IHC set %s: %d tiles (%d test), planted H-score %.0f–%.0f (median %.0f)",
        root,
        len(truth),
        len(test),
        truth["h_score"].min(),
        truth["h_score"].max(),
        truth["h_score"].median(),
    )
    return truth


__all__ = [
    "NUCLEAR_MARKER",
    "LEVEL_SD",
    "BAND_MARGIN",
    "draw_intensity_classes",
    "planted_h_score",
    "paint_ihc",
    "clean_nuclei",
    "write_synthetic_ihc",
]
