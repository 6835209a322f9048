"""Paired H&E / IHC tiles: an IHC4BC/BCI-like folder reader and a synthetic IHC painter for the demo.

Layout (the BCI / IHC4BC convention: two folders of same-named images, one per stain)::

    <root>/HE/<split>/<name>.png        split ∈ {train, test}; .png .jpg .jpeg .tif .tiff
    <root>/IHC/<split>/<name>.png       the IHC of the same tissue, same size, RGB
    <root>/nuclei/<split>/<name>.tif    optional: int nuclei label image of the H&E (0 = background)
    <root>/truth.csv                    optional: planted per-tile H-scores of a synthetic set

The flat variant ``<root>/HE/<name>.png`` + ``<root>/IHC/<name>.png`` (+ ``<root>/nuclei/<name>.tif``)
is split into train/test by a seeded fraction (:func:`seeded_test_names`).

Synthetic pairs (:func:`paint_ihc`, :func:`write_synthetic_ihc`): real paired sets are not
redistributable, so the demo paints an IHC onto real H&E tiles whose nuclei carry the cell type
planted by the simulated Xenium run (:mod:`finetune.stain_tiles`). The marker is nuclear and
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
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from data_shards.atomic import atomic_dir
from data_shards.errors import InputError
from finetune.metrics import DEFAULT_DAB_THRESHOLDS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "test")
HE_DIR, IHC_DIR, NUCLEI_DIR, TRUTH_NAME = "HE", "IHC", "nuclei", "truth.csv"

# Nuclear marker by planted cell type: (probability that a cell is positive, mean intensity level
# of a positive cell on the class scale 1 = weak, 2 = moderate, 3 = strong). Types not listed are negative.
NUCLEAR_MARKER: dict[str, tuple[float, float]] = {
    "keratinocyte_basal": (0.95, 2.6),
    "keratinocyte_suprabasal": (0.85, 1.8),
}
LEVEL_SD = 0.45  # spread of a positive cell's intensity level around its type's mean (class units)
BAND_MARGIN = 0.15  # DAB amounts are drawn in the inner 70 % of a class band, safe from rounding noise


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


def seeded_test_names(names: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """The names a flat layout holds out for testing: a seeded random ``test_fraction`` (≥ 1 when ≥ 2 names)."""
    if not 0 < float(test_fraction) < 1:
        raise InputError(None, "data.split.test_fraction", "a fraction in (0, 1)", test_fraction)
    names = sorted(names)
    n_test = int(round(test_fraction * len(names)))
    if len(names) >= 2:
        n_test = min(max(n_test, 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in order[:n_test]}


def layout_kind(root: str | Path) -> str:
    """``split`` when ``HE/train`` or ``HE/test`` exists, ``flat`` when ``HE`` holds the images directly."""
    root = Path(root)
    he = root / HE_DIR
    if not he.is_dir() or not (root / IHC_DIR).is_dir():
        raise InputError(root, None, f"a paired layout with {HE_DIR}/ and {IHC_DIR}/ folders", "missing")
    return "split" if any((he / s).is_dir() for s in SPLITS) else "flat"


def read_pairs(root: str | Path, split: str, test_fraction: float = 0.2, seed: int = 0,
               check_sizes: bool = True) -> list[IHCPair]:
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
        raise InputError(ihc_dir, "file names", f"the same image names as {he_dir}",
                         f"{len(only_he)} only in {HE_DIR} {only_he[:5]}, "
                         f"{len(only_ihc)} only in {IHC_DIR} {only_ihc[:5]}")
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
                raise InputError(ihc[name], "size", f"{size_hw[0]} × {size_hw[1]} px like {he[name].name} (H × W)",
                                 f"{ihc_hw[0]} × {ihc_hw[1]} px")
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
# Painting a synthetic IHC


def _class_bands(thresholds: Sequence[float]) -> np.ndarray:
    """(4, 2) DAB bands [low, high) of negative, weak, moderate, strong (strong spans two moderate widths)."""
    t = [float(v) for v in thresholds]
    return np.array([[0.0, t[0]], [t[0], t[1]], [t[1], t[2]], [t[2], t[2] + 2.0 * (t[2] - t[1])]])


def draw_intensity_classes(cell_types: Sequence[str], rng: np.random.Generator, positivity_rate: float = 1.0,
                           intensity_scale: float = 1.0,
                           marker: Mapping[str, tuple[float, float]] = NUCLEAR_MARKER) -> np.ndarray:
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
    """H-score and class percentages of planted per-nucleus classes (the same formula as ``h_score``)."""
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=4)[:4]
    pct = 100.0 * counts / max(int(counts.sum()), 1)
    return {"h_score": float(pct[1] + 2 * pct[2] + 3 * pct[3]), "pct_negative": float(pct[0]),
            "pct_weak": float(pct[1]), "pct_moderate": float(pct[2]), "pct_strong": float(pct[3]),
            "n_nuclei": int(counts.sum())}


def paint_ihc(he_rgb: np.ndarray, nuclei: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
              thresholds: Sequence[float] = DEFAULT_DAB_THRESHOLDS, counterstain: float = 0.5,
              max_counterstain: float = 0.12, background_dab: float = 0.004, texture: float = 0.12,
              noise_od: float = 0.002) -> np.ndarray:
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
    hed = np.stack([hematoxylin + rng.normal(0, noise_od, hematoxylin.shape), np.zeros_like(dab),
                    dab + rng.normal(0, noise_od, dab.shape)], axis=-1)
    rgb = hed2rgb(np.clip(hed, 0, None))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def clean_nuclei(tile: Any, max_area_um2: float | None = 120.0, ink_green_minus_red: float | None = 15.0) -> Any:
    """The tile without the segmented "nuclei" that are not nuclei; labels renumbered 1…n, types kept matched.

    Dropped: objects over ``max_area_um2`` µm² (merges of dark tissue: painted as one brown block
    they would make a poor target) and objects whose mean H&E green exceeds their mean red by more
    than ``ink_green_minus_red`` 8-bit levels (green/cyan marking ink at tissue edges; hematoxylin
    nuclei are purple-blue, red above green). None disables a rule.
    """
    from dataclasses import replace

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


def write_synthetic_ihc(root: str | Path, tiles: Sequence[Any], seed: int = 0, test_fraction: float = 0.2,
                        thresholds: Sequence[float] = DEFAULT_DAB_THRESHOLDS,
                        positivity_rate: Sequence[float] = (0.8, 1.0), intensity_scale: Sequence[float] = (0.85, 1.15),
                        counterstain: float = 0.5, max_nucleus_um2: float | None = 120.0,
                        ink_green_minus_red: float | None = 15.0, overwrite: bool = False) -> pd.DataFrame:
    """Paint an IHC onto typed H&E tiles (:class:`finetune.stain_tiles.CellTile`) and write the paired layout.

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
        log.warning("%d of %d tiles have no nuclei and are left out of the IHC set", len(tiles) - len(scored),
                    len(tiles))
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
            rows.append({"name": tile.name, "split": split, **planted_h_score(classes),
                         "positivity_rate": rate, "intensity_scale": scale,
                         "basal_fraction": float(np.mean(tile.cell_types == "keratinocyte_basal")),
                         "origin_x_px": int(tile.origin_px[0]), "origin_y_px": int(tile.origin_px[1])})
        truth = pd.DataFrame(rows)
        truth.to_csv(tmp / TRUTH_NAME, index=False, float_format="%.6g", quoting=csv.QUOTE_MINIMAL)
    log.info("synthetic IHC set %s: %d tiles (%d test), planted H-score %.0f–%.0f (median %.0f)", root, len(truth),
             len(test), truth["h_score"].min(), truth["h_score"].max(), truth["h_score"].median())
    return truth


__all__ = ["IMAGE_SUFFIXES", "SPLITS", "NUCLEAR_MARKER", "IHCPair", "read_pairs", "layout_kind", "seeded_test_names",
           "read_rgb", "read_nuclei", "load_pair", "read_truth", "draw_intensity_classes", "planted_h_score",
           "paint_ihc", "clean_nuclei", "write_synthetic_ihc"]
