"""A synthetic mIF set painted on typed H&E tiles, written in the ORION-like layout the mIF head reads.

Markers follow the cell types planted by the simulated Xenium run (:mod:`finetune.synthetic.stain_tiles`):
DAPI in every nucleus, Pan-CK in keratinocytes, CD45 in immune cells, CD31 in endothelial cells, SMA
in fibroblasts, plus an autofluorescence channel that follows the H&E's eosin and leaks into every
marker channel with a planted λ — what :mod:`finetune.mif.data`'s preprocessing estimates and removes.
The layout (``he/``, ``mif/``, ``nuclei/``, ``markers.csv``) is read by
:func:`finetune.mif.data.read_orion_layout`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import gaussian
from skimage.segmentation import expand_labels, find_boundaries

from common.atomic import atomic_dir, write_json
from common.errors import InputError

from .stain_tiles import CellTile

log = logging.getLogger(__name__)

AF_CHANNEL = "AF"
# marker → (role, cell types that express it, compartment, planted λ)
SYNTHETIC_PANEL: dict[str, tuple[str, tuple[str, ...], str, float]] = {
    "DAPI": ("nuclear", (), "nucleus", 0.2),
    "Pan-CK": ("marker", ("keratinocyte_basal", "keratinocyte_suprabasal"), "cytoplasm", 0.8),
    "CD45": ("marker", ("immune",), "membrane", 0.5),
    "CD31": ("marker", ("endothelial",), "membrane", 0.6),
    "SMA": ("marker", ("fibroblast",), "cytoplasm", 0.7),
}
CAMERA_OFFSET = 100.0  # counts added to every channel, the detector's dark level
READ_NOISE_SD = 12.0  # counts
AF_BASE, AF_GAIN = 300.0, 1800.0  # AF counts = base + gain·(eosin optical density / its 99th percentile)
SIGNAL_COUNTS = {"nucleus": 3000.0, "cytoplasm": 2200.0, "membrane": 2600.0}


def _compartment_profile(nuclei: np.ndarray, compartment: str, ring_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight (H, W) in [0, 1], owner label (H, W)): where a cell's marker sits and which cell each pixel belongs to.

    Cells are the nuclei grown by ``ring_px`` (skimage ``expand_labels``). Cytoplasm: 1 in the ring, 0.6 over
    the nucleus (cytoplasm above and below it in the section); membrane: 1 on the cell outline, 0.35 inside —
    so the mean over a nucleus, which cell-level evaluation reads, still carries the marker.
    """
    if compartment == "nucleus":
        return (nuclei > 0).astype(np.float32), nuclei
    cells = expand_labels(nuclei, distance=ring_px)
    weight = np.zeros(nuclei.shape, np.float32)
    if compartment == "cytoplasm":
        weight[cells > 0] = 1.0
        weight[nuclei > 0] = 0.6
    elif compartment == "membrane":
        weight[cells > 0] = 0.35
        weight[find_boundaries(cells, mode="inner") & (cells > 0)] = 1.0
    else:
        raise InputError(None, "compartment", "nucleus, cytoplasm or membrane", compartment)
    return weight, cells


def _eosin_field(rgb: np.ndarray, sigma_px: float = 2.0) -> np.ndarray:
    return np.clip(gaussian(rgb2hed(rgb)[..., 1], sigma=sigma_px), 0, None)


def _af_counts(eosin_rel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Autofluorescence counts (H, W): follows eosin (collagen, red cells), modulated by a broad random field (±40 %)."""
    broad = ndi.gaussian_filter(rng.normal(size=eosin_rel.shape), sigma=max(eosin_rel.shape) / 8.0, mode="wrap")
    broad = broad / (broad.std() or 1.0)
    return (AF_BASE + AF_GAIN * np.clip(eosin_rel, 0, 1.5)) * np.clip(1.0 + 0.4 * broad, 0.3, 2.0)


def flip_rates(cell_types: np.ndarray, flip_rate: float) -> dict[str, tuple[float, float, float]]:
    """marker → (p_off, p_on, prevalence): flip probabilities of type-positive and type-negative cells.

    ``prevalence`` is the share of ``cell_types`` whose type expresses the marker. A share ``flip_rate``
    of the positives loses it (p_off) and as many negatives gain it (p_on = flip_rate·prevalence /
    (1 − prevalence)): the flips are proportional to the prevalence and keep it unchanged, and a
    predictor that knows each cell's type still ranks a flipped-on cell low — its best Cell AUC is
    ``1 − (p_off + p_on) / 2``, not the 0.6-0.7 that a flat share of all cells gives a rare marker.
    """
    cell_types = np.asarray(cell_types, dtype=str)
    out = {}
    for marker, (role, types, _, _) in SYNTHETIC_PANEL.items():
        if role == "nuclear":
            continue
        prevalence = float(np.isin(cell_types, types).mean()) if len(cell_types) else 0.0
        p_on = flip_rate * prevalence / (1.0 - prevalence) if prevalence < 1.0 else 0.0
        out[marker] = (float(flip_rate), float(min(p_on, 1.0)), prevalence)
    return out


def write_synthetic_mif(
    root: str | Path,
    tiles: Sequence[CellTile],
    seed: int = 0,
    flip_rate: float = 0.05,
    ring_px: float = 4.0,
    psf_sigma_px: float = 0.8,
    overwrite: bool = False,
) -> dict:
    """Paint an mIF panel onto typed H&E tiles (:class:`finetune.synthetic.stain_tiles.CellTile`) and write the ORION-like layout.

    Channels: DAPI (every nucleus), Pan-CK (keratinocytes, cytoplasm), CD45 (immune, membrane), CD31
    (endothelial, membrane), SMA (fibroblasts, cytoplasm) and AF, a broad autofluorescence that follows the
    H&E's eosin (times a broad random field). Each marker channel is ``Poisson(signal + λ·AF) + offset + N(0, read noise)`` in uint16,
    with the λ of SYNTHETIC_PANEL; the AF channel is ``Poisson(AF) + offset + noise``. A cell expresses a
    marker when its planted type does, with flips proportional to the marker's prevalence (:func:`flip_rates`):
    a share ``flip_rate`` of the type-positive cells loses the marker and as many type-negative cells gain
    it, so a rare marker keeps a best achievable Cell AUC near 1 − flip_rate instead of drowning in flips;
    expression varies per cell (log-normal, σ 0.35). ``unassigned`` nuclei express no marker but DAPI.

    Writes ``he/``, ``mif/`` (OME-TIFF with channel names), ``nuclei/``, ``markers.csv`` and ``truth.json``
    (planted λ, offsets, types and per-nucleus positivity) atomically; returns the truth dict.
    """
    import tifffile
    from PIL import Image

    root = Path(root)
    if root.exists() and not overwrite:
        raise InputError(root, None, "a path that does not exist yet (or overwrite=true)", "exists")
    if not tiles:
        raise InputError(None, "tiles", "at least one H&E tile", 0)
    if not 0 <= flip_rate < 0.5:
        raise InputError(None, "flip_rate", "a probability in [0, 0.5)", flip_rate)
    rng = np.random.default_rng(seed)
    names = list(SYNTHETIC_PANEL) + [AF_CHANNEL]
    all_types = np.concatenate([np.asarray(t.cell_types, dtype=str) for t in tiles])
    rates = flip_rates(all_types, flip_rate)
    um_per_px = {float(t.um_per_px) for t in tiles}
    if len(um_per_px) != 1:
        raise InputError(None, "tiles", "tiles of one resolution (µm/px)", sorted(um_per_px))
    eosin = [_eosin_field(t.he_rgb) for t in tiles]
    eosin_scale = float(np.percentile(np.concatenate([e.ravel() for e in eosin]), 99)) or 1.0
    truth: dict[str, Any] = {
        "channels": names,
        "af_channel": AF_CHANNEL,
        "lambda": {m: spec[3] for m, spec in SYNTHETIC_PANEL.items()},
        "offset": {m: CAMERA_OFFSET for m in names},
        "read_noise_sd": READ_NOISE_SD,
        "expressed_by": {m: list(spec[1]) if spec[1] else "all" for m, spec in SYNTHETIC_PANEL.items()},
        "compartment": {m: spec[2] for m, spec in SYNTHETIC_PANEL.items()},
        "flip_rate": flip_rate,
        "flip_rule": "type-positive cells lose the marker with p_off, type-negative cells gain it with p_on "
        "= flip_rate·prevalence/(1 − prevalence)",
        "flip_probabilities": {
            m: {"p_off": off, "p_on": on, "prevalence": prev} for m, (off, on, prev) in rates.items()
        },
        "um_per_px": um_per_px.pop(),
        "ring_px": ring_px,
        "seed": seed,
        "tiles": {},
    }
    with atomic_dir(root) as tmp:
        for sub in ("he", "mif", "nuclei"):
            (tmp / sub).mkdir()
        for tile, eosin_tile in zip(tiles, eosin):
            n = tile.n_nuclei
            af = _af_counts(eosin_tile / eosin_scale, rng)  # (H, W) counts
            channels, positive = [], {}
            for marker, (role, types, compartment, lam) in SYNTHETIC_PANEL.items():
                expressed = np.ones(n, bool) if role == "nuclear" else np.isin(tile.cell_types, types)
                if role != "nuclear":
                    p_off, p_on, _ = rates[marker]
                    expressed = expressed ^ (rng.random(n) < np.where(expressed, p_off, p_on))
                positive[marker] = expressed.tolist()
                amplitude = SIGNAL_COUNTS[compartment] * rng.lognormal(0.0, 0.35, size=n) * expressed  # (n,)
                weight, owner = _compartment_profile(tile.nuclei, compartment, ring_px)
                per_pixel = np.concatenate([[0.0], amplitude])[owner] * weight  # (H, W)
                signal = ndi.gaussian_filter(per_pixel, psf_sigma_px) if psf_sigma_px > 0 else per_pixel
                counts = rng.poisson(np.clip(signal + lam * af, 0, None)).astype(np.float64)
                channels.append(counts + CAMERA_OFFSET + rng.normal(0, READ_NOISE_SD, counts.shape))
            channels.append(rng.poisson(af).astype(np.float64) + CAMERA_OFFSET + rng.normal(0, READ_NOISE_SD, af.shape))
            stack = np.clip(np.round(np.stack(channels)), 0, 65535).astype(np.uint16)  # (C, H, W)
            Image.fromarray(tile.he_rgb).save(tmp / "he" / f"{tile.name}.png")
            tifffile.imwrite(
                tmp / "mif" / f"{tile.name}.tif",
                stack,
                ome=True,
                photometric="minisblack",
                metadata={"axes": "CYX", "Channel": {"Name": names}},
            )
            tifffile.imwrite(tmp / "nuclei" / f"{tile.name}.tif", tile.nuclei.astype(np.int32))
            truth["tiles"][tile.name] = {
                "cell_types": [str(t) for t in tile.cell_types],
                "positive": positive,
                "origin_px": list(tile.origin_px),
            }
        with open(tmp / "markers.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["channel", "marker", "role"])
            for i, name in enumerate(names):
                writer.writerow([i, name, "autofluorescence" if name == AF_CHANNEL else SYNTHETIC_PANEL[name][0]])
        write_json(tmp / "truth.json", truth)
    n_cells = sum(t.n_nuclei for t in tiles)
    log.info("synthetic mIF set %s: %d tiles, %d nuclei, channels %s", root, len(tiles), n_cells, names)
    return truth


__all__ = [
    "SYNTHETIC_PANEL",
    "AF_CHANNEL",
    "CAMERA_OFFSET",
    "READ_NOISE_SD",
    "AF_BASE",
    "AF_GAIN",
    "SIGNAL_COUNTS",
    "flip_rates",
    "write_synthetic_mif",
]
