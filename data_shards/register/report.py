"""How a registration looks to a person: the console table of its errors and the overlay picture.

The numbers themselves (keypoint residuals, leave-one-out errors, bounds) are computed by
:meth:`Registration.report` (:func:`data_shards.register.registration.quality_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_path

from .registration import Registration


def format_table(report: dict) -> str:
    """A fixed-width table of the per-region and overall errors (µm) for the console."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = f"{'region':>8} {'points':>6} {'µm/px':>8} {'rms µm':>8} {'max µm':>8} {'loo rms':>8} {'loo max':>8}"
    lines = [header, "-" * len(header)]
    for row in report["regions"]:
        lines.append(
            f"{row['label']:>8} {row['n_keypoints']:>6} {row['um_per_px']:>8.4f} {number(row['rms_um']):>8} "
            f"{number(row['max_um']):>8} {number(row['loo_rms_um']):>8} {number(row['loo_max_um']):>8}"
        )
    overall = report["overall"]
    lines.append("-" * len(header))
    lines.append(
        f"{'all':>8} {overall['n_keypoints']:>6} {report['he_um_per_px_fitted']:>8.4f} "
        f"{number(overall['rms_um']):>8} {number(overall['max_um']):>8} "
        f"{number(overall['loo_rms_um']):>8} {number(overall['loo_max_um']):>8}"
    )
    # The sanity checks' numbers (register_bundle adds them): H&E µm/px by source, cells on tissue.
    sources = [("slide", "he_um_per_px_slide"), ("keypoints", "he_um_per_px_keypoints")]
    sources.append(("alignment", "he_um_per_px_alignment"))
    fits = [f"{name} {report[key]:.4f}" for name, key in sources if report.get(key) is not None]
    if fits:
        lines.append("H&E µm/px: " + ", ".join(fits))
    if report.get("on_tissue_fraction") is not None:
        lines.append(
            f"cells on tissue: {100 * report['on_tissue_fraction']:.1f} % "
            f"(tissue covers {100 * report.get('tissue_share_of_slide', float('nan')):.1f} % of the slide)"
        )
    return "\n".join(lines)


def write_overlay(
    path: str | Path,
    registration: Registration,
    slide: Any,
    cells_um: np.ndarray,
    report: dict | None = None,
    max_side: int = 2048,
    max_cells: int = 200_000,
    magnify: float | None = None,
    seed: int = 0,
) -> Path:
    """PNG: H&E thumbnail, mapped cell centroids coloured by region, keypoints and residual vectors.

    Moving keypoints are crosses, mapped fixed keypoints circles; residual vectors (moving minus
    mapped) are magnified so that the largest is ~3 % of the thumbnail side unless ``magnify``.
    ``slide`` is a data_shards.slide.Slide (anything with ``thumbnail(max_side)``).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = report or registration.report()
    thumb, downsample = slide.thumbnail(max_side)  # (h, w, 3) uint8; level-0 px per thumbnail px
    height, width = thumb.shape[:2]
    cells_um = np.asarray(cells_um, dtype=np.float64).reshape(-1, 2)
    if len(cells_um) > max_cells:  # drawing every cell of a whole slide adds nothing visible
        cells_um = cells_um[np.random.default_rng(seed).choice(len(cells_um), max_cells, replace=False)]

    figure = Figure(figsize=(10, 10 * height / max(width, 1) + 0.6), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 0.94))
    axes.imshow(thumb, interpolation="nearest")
    colours = matplotlib.colormaps["tab10"]
    if len(cells_um):
        cells_px = registration.map(cells_um) / downsample  # (n, 2) thumbnail px
        region = registration.region_of(cells_um)
        dot_size = float(np.clip(2e4 / len(cells_px), 0.5, 6.0))  # points²: visible when few, no blot when many
        axes.scatter(
            cells_px[:, 0],
            cells_px[:, 1],
            s=dot_size,
            c=colours(region % 10),
            linewidths=0,
            alpha=0.8,
            rasterized=True,
            label="mapped cell centroid",
        )
    fixed = np.concatenate([r.fixed_um for r in registration.regions])
    moving = np.concatenate([r.moving_px for r in registration.regions])
    if len(fixed):
        mapped = registration.map(fixed) / downsample
        target = moving / downsample
        residual = target - mapped
        longest = float(np.linalg.norm(residual, axis=1).max())
        gain = magnify if magnify is not None else (0.03 * max(width, height) / longest if longest > 0 else 1.0)
        axes.scatter(target[:, 0], target[:, 1], marker="x", s=30, c="black", linewidths=1.2, label="H&E keypoint")
        axes.scatter(
            mapped[:, 0],
            mapped[:, 1],
            marker="o",
            s=30,
            facecolors="none",
            edgecolors="blue",
            linewidths=1.2,
            label="mapped Xenium keypoint",
        )
        axes.quiver(
            mapped[:, 0],
            mapped[:, 1],
            residual[:, 0] * gain,
            residual[:, 1] * gain,
            angles="xy",
            scale_units="xy",
            scale=1,
            color="red",
            width=0.002,
            label=f"residual ×{gain:.0f}",
        )
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    rms = report["overall"]["rms_um"]
    title = f"registration: {registration.n_regions} region(s), {'blend' if registration.blend else 'nearest'}"
    title += f", keypoint RMS {rms:.2f} µm" if rms is not None else ", no keypoints"
    figure.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
