"""Sanity checks that refuse a registration which fits its keypoints but is probably wrong.

A least-squares fit always returns *a* map, and a small keypoint RMS only says the keypoints agree
with each other. Three mistakes pass that test and still send every crop off its cell:

- keypoints in the wrong unit (Explorer writes ``fixedX, fixedY`` in morphology pixels, another
  tool may write µm): the similarity absorbs the factor 0.2125 into its scale, so the fitted H&E
  µm/px is off by that factor. :func:`check_um_per_px` compares it with the slide's metadata and
  names the likely cause from the ratio.
- swapped or mirrored columns: the fit's scale collapses or the RMS explodes; the same check
  catches it (the RMS bound as well).
- keypoints or an alignment matrix from another slide: scale and RMS look right, but the cells
  land beside the tissue. :func:`check_on_tissue` maps every cell centroid and counts those on
  the tissue mask of the slide's thumbnail (:func:`data_shards.qc.tissue_mask`).

Every check raises one :class:`RegistrationError` naming the file to blame and what is likely wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..qc import on_tissue, tissue_mask
from .fit import RegistrationError, fit_transform, linear_scale
from .registration import Registration

UNIT_KEY = "register.keypoints_fixed_unit"


def similarity_um_per_px(fixed_um: np.ndarray, moving_px: np.ndarray, source: str | Path | None = None) -> float:
    """H&E µm per level-0 px implied by one global similarity fit of the keypoints (whatever the fit mode)."""
    return 1.0 / linear_scale(fit_transform(fixed_um, moving_px, scale=True, source=source))


def _near(ratio: float, target: float, tolerance: float) -> bool:
    return abs(ratio / target - 1.0) <= tolerance


def _likely_cause(
    kind: str, ratio: float, slide_um_per_px: float, pixel_size_um: float, fixed_unit: str, tolerance: float
) -> str:
    """What a fitted/metadata µm/px ratio suggests, for a keypoints file or an alignment matrix.

    Each known mistake predicts a ratio; the closest one within ``tolerance`` is named. Keypoints:
    fixed side in µm read as morphology px (ratio = pixel_size) or the reverse (1 / pixel_size),
    fixed and alignment columns swapped (pixel_size² / slide µm/px² when read as morphology px),
    H&E points from another pyramid level (a power of 2). Matrix: H&E px -> µm instead of
    morphology px (pixel_size), another pyramid level.
    """
    candidates: list[tuple[float, str]] = []
    level = (
        "were the H&E points taken on another pyramid level of the slide, or is the slide's µm/px wrong "
        "(override with register.he_um_per_px)?"
    )
    for power in (2.0, 4.0, 8.0, 16.0):
        for predicted in (power, 1.0 / power):
            candidates.append((predicted, f"the ratio is close to {predicted:g}: {level}"))
    if kind == "keypoints":
        in_px = fixed_unit == "morphology_px"
        if in_px:
            candidates.append(
                (pixel_size_um, f"are fixedX/fixedY in µm rather than morphology pixels? set {UNIT_KEY}=um")
            )
        else:
            candidates.append(
                (
                    1.0 / pixel_size_um,
                    f"are fixedX/fixedY in Xenium morphology pixels (as Xenium Explorer writes them)? "
                    f"set {UNIT_KEY}=morphology_px",
                )
            )
        swap_um_per_px = pixel_size_um**2 / slide_um_per_px if in_px else 1.0 / slide_um_per_px
        candidates.append(
            (
                swap_um_per_px / slide_um_per_px,
                "are the fixed (Xenium) and alignment (H&E) columns swapped?",
            )
        )
        fallback = (
            "keypoints from another slide, swapped or mirrored columns (fixed vs alignment, X vs Y), "
            "or a wrong µm/px in the slide's metadata (override with register.he_um_per_px)?"
        )
    else:
        candidates.append(
            (
                pixel_size_um,
                "does the matrix map H&E pixels to µm rather than to morphology pixels (Explorer's export)?",
            )
        )
        fallback = "a matrix exported for another slide or image, or a wrong µm/px in the slide's metadata?"
    distance, cause = min((abs(np.log(ratio / predicted)), cause) for predicted, cause in candidates)
    return cause if distance <= np.log1p(tolerance) else fallback


def check_um_per_px(
    fits: dict[str, tuple[float, str | Path]],
    slide_um_per_px: float,
    max_error: float | None,
    *,
    slide_path: str | Path | None = None,
    pixel_size_um: float,
    fixed_unit: str = "morphology_px",
) -> None:
    """Refuse when a fitted H&E µm/px differs from the slide's metadata by more than ``max_error`` (a fraction).

    ``fits``: ``{"keypoints": (µm/px, path), "alignment": (µm/px, path)}``, one or both. With both,
    the error names the one that disagrees with the metadata and quotes the other; when both
    disagree it names the slide (its metadata is then the likelier culprit).
    """
    if max_error is None or not fits:
        return
    deviations = {kind: um_per_px / slide_um_per_px for kind, (um_per_px, _) in fits.items()}
    bad = [kind for kind, ratio in deviations.items() if not _near(ratio, 1.0, max_error)]
    if not bad:
        return
    expected = f"a fitted H&E µm/px within ±{max_error:.0%} of the slide's metadata ({slide_um_per_px:.4g})"
    summary = ", ".join(f"{kind} {fits[kind][0]:.4g} µm/px" for kind in fits)
    if len(bad) == len(fits) and len(fits) > 1:
        raise RegistrationError(
            slide_path,
            "µm/px",
            expected,
            f"{summary}, slide {slide_um_per_px:.4g}: keypoints and alignment matrix both disagree with the "
            "slide's metadata; is the slide's µm/px right (override with register.he_um_per_px)?",
        )
    kind = bad[0]
    um_per_px, path = fits[kind]
    cause = _likely_cause(kind, deviations[kind], slide_um_per_px, pixel_size_um, fixed_unit, max_error)
    others = [k for k in fits if k != kind]
    agree = f" (the {others[0]} gives {fits[others[0]][0]:.4g} µm/px, which agrees)" if others else ""
    raise RegistrationError(
        path,
        "µm/px",
        expected,
        f"fitted {um_per_px:.4g} µm/px from the {kind} vs {slide_um_per_px:.4g} in the slide's metadata{agree}: "
        f"{cause}",
    )


# Above this tissue share of the slide, random points land on tissue almost as often as cells: the
# enrichment test says nothing and is skipped.
MAX_TISSUE_SHARE_FOR_EXCESS = 0.95


# data_shards.slide.Slide.thumbnail paints blocks it cannot decode this exact grey: unknown, neither tissue
# nor glass, so they are left out of both shares below.
UNREAD_GREY = 128


def on_tissue_fraction(
    registration: Registration, slide: Any, cells_um: np.ndarray, thumbnail_px: int
) -> tuple[float, float]:
    """(share of the mapped cell centres on the tissue mask, tissue share of the slide thumbnail).

    Both leave out what cannot be judged: cells mapped onto undecodable blocks of the slide, and
    those blocks' area. Cells mapped outside the slide count as off tissue.
    """
    thumb, downsample = slide.thumbnail(int(thumbnail_px))  # (h, w, 3) uint8; level-0 px per thumbnail px
    mask = tissue_mask(thumb)
    unread = (thumb == UNREAD_GREY).all(axis=2)
    readable = max(int((~unread).sum()), 1)
    tissue_share = float((mask & ~unread).sum() / readable)
    if len(cells_um) == 0:
        return 1.0, tissue_share
    mapped_px = registration.map(cells_um)  # (n, 2) H&E level-0 px
    on = on_tissue(mapped_px, mask, downsample)
    judged = ~on_tissue(mapped_px, unread, downsample)
    return float(on[judged].mean()) if judged.any() else 1.0, tissue_share


def check_on_tissue(
    fraction: float,
    tissue_share: float,
    min_fraction: float | None,
    min_excess: float | None,
    n_cells: int,
    source: str | Path | None,
) -> None:
    """Refuse a map that puts the cells beside the tissue (keypoints or a matrix for another slide).

    Two bounds: the share of mapped cells on tissue (``min_fraction``), and how much more often they
    land there than points spread over the whole slide would, ``excess = (fraction - tissue_share) /
    (1 - tissue_share)`` (1 = all on tissue, 0 = chance; ``min_excess``). The second catches another
    slide's map on a slide mostly covered by tissue, where even misplaced cells often land on tissue.
    """
    cause = (
        "keypoints or alignment from another slide (or for another H&E image)? If the tissue mask misses pale "
        "tissue, set register.min_on_tissue_fraction / register.min_on_tissue_excess to null"
    )
    if min_fraction is not None and fraction < min_fraction:
        raise RegistrationError(
            source,
            "cells on tissue",
            f"at least {min_fraction:.0%} of the {n_cells} cells mapped onto the H&E tissue",
            f"{fraction:.1%}: {cause}",
        )
    if min_excess is None or tissue_share > MAX_TISSUE_SHARE_FOR_EXCESS:
        return
    excess = (fraction - tissue_share) / (1.0 - tissue_share)
    if excess < min_excess:
        raise RegistrationError(
            source,
            "cells on tissue",
            f"mapped cells on tissue well above chance (excess >= {min_excess:g})",
            f"{fraction:.1%} of the {n_cells} cells on tissue where tissue covers {tissue_share:.1%} of the slide "
            f"(excess {excess:.2f}; chance 0, perfect 1): {cause}",
        )
