"""How good is a registration: keypoint residuals and leave-one-out errors in µm, bounds, overlay.

Residuals are measured where the registration actually sends each keypoint (``Registration.map``,
so blending is included), in H&E px, and converted to µm with the µm/px of the keypoint's region
transform (the same as mapping back for a similarity). Leave-one-out refits a keypoint's own
region without it and predicts it with that region's transform alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .register import Registration, RegistrationError, apply_transform, fit_um_to_px, linear_scale


def _rms(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if len(values) else None


def _max(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.max()) if len(values) else None


def leave_one_out_um(registration: Registration, region_index: int) -> np.ndarray:
    """(k,) µm error predicting each keypoint of a region from a fit on the others; NaN if unfittable."""
    region = registration.regions[region_index]
    k = len(region.fixed_um)
    errors = np.full(k, np.nan)
    if not region.fitted or k < 4:  # an imported matrix was not fitted; 3 points leave 2
        return errors
    for i in range(k):
        keep = np.arange(k) != i
        try:
            transform = fit_um_to_px(region.fixed_um[keep], region.moving_px[keep], registration.scale,
                                     registration.rigid_um_per_px)
        except RegistrationError:  # the remaining points are collinear
            continue
        predicted_px = apply_transform(transform, region.fixed_um[i : i + 1])[0]
        errors[i] = np.linalg.norm(predicted_px - region.moving_px[i]) / linear_scale(transform)
    return errors


def quality_report(registration: Registration, slide_um_per_px: float | None = None) -> dict:
    """JSON-ready dict: per-keypoint residual and LOO error (µm), RMS/max per region and overall."""
    keypoints, region_rows = [], []
    all_residuals, all_loo = [], []
    for index, region in enumerate(registration.regions):
        um_per_px = 1.0 / linear_scale(region.transform)
        if len(region.fixed_um):
            residual_px = np.linalg.norm(registration.map(region.fixed_um) - region.moving_px, axis=1)
        else:
            residual_px = np.zeros(0)
        residual_um = residual_px * um_per_px
        loo_um = leave_one_out_um(registration, index)
        all_residuals.append(residual_um)
        all_loo.append(loo_um)
        region_rows.append({
            "label": region.label,
            "fitted": region.fitted,
            "n_keypoints": int(len(region.fixed_um)),
            "centroid_um": region.centroid_um.tolist(),
            "um_per_px": um_per_px,
            "rms_um": _rms(residual_um),
            "max_um": _max(residual_um),
            "loo_rms_um": _rms(loo_um),
            "loo_max_um": _max(loo_um),
        })
        for j in range(len(region.fixed_um)):
            keypoints.append({
                "region": region.label,
                "fixed_x_um": float(region.fixed_um[j, 0]), "fixed_y_um": float(region.fixed_um[j, 1]),
                "moving_x_px": float(region.moving_px[j, 0]), "moving_y_px": float(region.moving_px[j, 1]),
                "residual_um": float(residual_um[j]),
                "loo_error_um": float(loo_um[j]) if np.isfinite(loo_um[j]) else None,
            })
    residuals, loo = np.concatenate(all_residuals), np.concatenate(all_loo)
    fitted_um_per_px = registration.he_um_per_px
    return {
        "source": registration.source,
        "n_regions": registration.n_regions,
        "scale": registration.scale,
        "blend": registration.blend,
        "blend_sigma_um": registration.blend_sigma_um if registration.blend else None,
        "he_um_per_px_fitted": fitted_um_per_px,
        "he_um_per_px_slide": slide_um_per_px,
        "overall": {
            "n_keypoints": int(len(residuals)),
            "rms_um": _rms(residuals),
            "max_um": _max(residuals),
            "loo_rms_um": _rms(loo),
            "loo_max_um": _max(loo),
        },
        "regions": region_rows,
        "keypoints": keypoints,
    }


def check_report(report: dict, max_rms_um: float | None, max_loo_um: float | None, source: Any = None) -> None:
    """Raise RegistrationError naming the file and the region whose error passes a bound (µm)."""
    for row in report["regions"]:
        where = f"region {row['label']}"
        if max_rms_um is not None and row["rms_um"] is not None and row["rms_um"] > max_rms_um:
            raise RegistrationError(source, where, f"keypoint RMS residual <= {max_rms_um:g} µm",
                                    f"{row['rms_um']:.3f} µm (max {row['max_um']:.3f} µm over {row['n_keypoints']} keypoints)")
        if max_loo_um is not None and row["loo_rms_um"] is not None and row["loo_rms_um"] > max_loo_um:
            raise RegistrationError(source, where, f"leave-one-out RMS error <= {max_loo_um:g} µm",
                                    f"{row['loo_rms_um']:.3f} µm (max {row['loo_max_um']:.3f} µm)")


def format_table(report: dict) -> str:
    """A fixed-width table of the per-region and overall errors (µm) for the console."""
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = f"{'region':>8} {'points':>6} {'µm/px':>8} {'rms µm':>8} {'max µm':>8} {'loo rms':>8} {'loo max':>8}"
    lines = [header, "-" * len(header)]
    for row in report["regions"]:
        lines.append(f"{row['label']:>8} {row['n_keypoints']:>6} {row['um_per_px']:>8.4f} {number(row['rms_um']):>8} "
                     f"{number(row['max_um']):>8} {number(row['loo_rms_um']):>8} {number(row['loo_max_um']):>8}")
    overall = report["overall"]
    lines.append("-" * len(header))
    lines.append(f"{'all':>8} {overall['n_keypoints']:>6} {report['he_um_per_px_fitted']:>8.4f} "
                 f"{number(overall['rms_um']):>8} {number(overall['max_um']):>8} "
                 f"{number(overall['loo_rms_um']):>8} {number(overall['loo_max_um']):>8}")
    return "\n".join(lines)


def write_overlay(path: str | Path, registration: Registration, slide: Any, cells_um: np.ndarray,
                  report: dict | None = None, max_side: int = 2048, max_cells: int = 200_000,
                  magnify: float | None = None, seed: int = 0) -> Path:
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
        axes.scatter(cells_px[:, 0], cells_px[:, 1], s=dot_size, c=colours(region % 10), linewidths=0,
                     alpha=0.8, rasterized=True, label="mapped cell centroid")
    fixed = np.concatenate([r.fixed_um for r in registration.regions])
    moving = np.concatenate([r.moving_px for r in registration.regions])
    if len(fixed):
        mapped = registration.map(fixed) / downsample
        target = moving / downsample
        residual = target - mapped
        longest = float(np.linalg.norm(residual, axis=1).max())
        gain = magnify if magnify is not None else (0.03 * max(width, height) / longest if longest > 0 else 1.0)
        axes.scatter(target[:, 0], target[:, 1], marker="x", s=30, c="black", linewidths=1.2, label="H&E keypoint")
        axes.scatter(mapped[:, 0], mapped[:, 1], marker="o", s=30, facecolors="none", edgecolors="blue",
                     linewidths=1.2, label="mapped Xenium keypoint")
        axes.quiver(mapped[:, 0], mapped[:, 1], residual[:, 0] * gain, residual[:, 1] * gain, angles="xy",
                    scale_units="xy", scale=1, color="red", width=0.002, label=f"residual ×{gain:.0f}")
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
