"""The registration object: one transform per keypoint region, Xenium µm -> H&E level-0 px, as in PAST.

Keypoints are picked on both images (Xenium Explorer exports them as ``keypoints.csv``, its fixed
side in morphology pixels, which :func:`.explorer.read_explorer_keypoints` converts to µm). A rigid
(Kabsch) or similarity (Umeyama) transform is fitted per keypoint set; several sets from distinct
regions of the slide follow local tissue deformation that one global transform cannot. A single
global fit and an imported Xenium Explorer ``imagealignment.csv`` are the one-region cases of the
same :class:`Registration` object.

Conventions: every 3x3 matrix here is homogeneous and acts on column vectors ``(x, y, 1)``;
x points right and y down on both images. A ``Registration`` maps Xenium µm -> H&E level-0 px.
Quality numbers (below the class): residuals are measured where the registration actually sends
each keypoint (``Registration.map``, so blending is included), in H&E px, and converted to µm with
the µm/px of the keypoint's region transform (the same as mapping back for a similarity).
Leave-one-out refits a keypoint's own region without it and predicts it with that region's
transform alone. The console table and the overlay picture live in :mod:`.report`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_json
from common.errors import InputError, read_json_file

from .explorer import XENIUM_PIXEL_SIZE_UM
from .fit import (
    RegistrationError,
    apply_transform,
    check_alignment_matrix,
    check_pairs,
    check_spread,
    fit_um_to_px_mirrored,
    linear_scale,
)

log = logging.getLogger(__name__)

JSON_FORMAT = "data_shards.registration"
JSON_VERSION = 1


@dataclass
class Region:
    """One keypoint set: its points and the transform fitted on them (µm -> px)."""

    label: int
    transform: np.ndarray  # (3, 3), Xenium µm -> H&E level-0 px
    fixed_um: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (k, 2) µm
    moving_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (k, 2) H&E px
    centroid_um: np.ndarray = field(default_factory=lambda: np.zeros(2))  # (2,) µm
    fitted: bool = True  # False for an imported matrix: its keypoints only evaluate it


class Registration:
    """Maps Xenium µm (n, 2) -> H&E level-0 px (n, 2) with one transform per keypoint region.

    ``map`` uses the region whose keypoint centroid is nearest (a Voronoi of centroids), or with
    ``blend`` a Gaussian-weighted mix (weights by distance to the centroids, normalised) of every
    region's mapped point, so the map is smooth across region borders.
    """

    def __init__(
        self,
        regions: list[Region],
        global_transform: np.ndarray,
        *,
        scale: bool = True,
        blend: bool = False,
        blend_sigma_um: float | None = None,
        source: str | None = None,
        rigid_um_per_px: float | None = None,
        identity: dict | None = None,
        mirror_x: bool = False,
    ):
        if not regions:
            raise ValueError("a Registration needs at least one region")
        self.regions = regions
        self.global_transform = np.asarray(global_transform, dtype=np.float64)
        self.scale = bool(scale)
        self.blend = bool(blend)
        self.source = None if source is None else str(source)
        # Rigid fits run in H&E px (fixed µm divided by this µm/px); None for similarity fits.
        self.rigid_um_per_px = None if rigid_um_per_px is None else float(rigid_um_per_px)
        self.blend_sigma_um = float(blend_sigma_um) if blend_sigma_um else self._default_sigma_um()
        # The bundle it was fitted for (folder, run/region, sha256 of cells and inputs): see .identity.
        self.identity = identity
        # The H&E is the mirror image of the Xenium frame: every transform includes x -> -x (det < 0).
        self.mirror_x = bool(mirror_x)

    # ---- constructors -----------------------------------------------------------------------

    @classmethod
    def from_keypoints(
        cls,
        fixed_um: Any,
        moving_px: Any,
        regions: None | int | Sequence[int] = None,
        *,
        blend: bool = False,
        blend_sigma_um: float | None = None,
        scale: bool = True,
        he_um_per_px: float | None = None,
        min_points_per_region: int = 4,
        source: str | Path | None = None,
        random_state: int = 0,
        mirror_x: bool = False,
    ) -> Registration:
        """Fit from keypoint pairs: fixed (Xenium µm) -> moving (H&E level-0 px).

        ``regions``: None (one global region), an int (spatial k-means on the fixed coordinates)
        or one integer label per keypoint. A region with fewer than ``min_points_per_region``
        points, or collinear ones, is merged into the nearest region (logged). ``scale=False``
        fits a rigid map on fixed coordinates converted to px with ``he_um_per_px`` (required
        then: a rigid map cannot change units). ``mirror_x``: the H&E is a mirror image; the fits
        run on x -> -x of the fixed points and the transforms include that reflection.
        """
        fixed, moving = check_pairs(fixed_um, moving_px, source, names=("fixed (µm)", "moving (px)"))
        if min_points_per_region < 3:
            raise ValueError("min_points_per_region must be >= 3")
        rigid_um_per_px = None
        if not scale:
            if not he_um_per_px or not np.isfinite(he_um_per_px) or he_um_per_px <= 0:
                raise InputError(
                    source, "he_um_per_px", "a positive H&E µm/pixel for a rigid (scale=False) fit", he_um_per_px
                )
            rigid_um_per_px = float(he_um_per_px)

        def fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
            return fit_um_to_px_mirrored(src, dst, scale, rigid_um_per_px, mirror_x, source)

        labels = _initial_labels(fixed, regions, source, random_state)
        labels = _merge_small_regions(fixed, moving, labels, min_points_per_region, source)
        fitted = []
        for label in np.unique(labels):
            member = labels == label
            fitted.append(
                Region(
                    label=int(label),
                    transform=fit(fixed[member], moving[member]),
                    fixed_um=fixed[member],
                    moving_px=moving[member],
                    centroid_um=fixed[member].mean(axis=0),
                )
            )
        return cls(
            fitted,
            fit(fixed, moving),
            scale=scale,
            blend=blend,
            blend_sigma_um=blend_sigma_um,
            source=source,
            rigid_um_per_px=rigid_um_per_px,
            mirror_x=mirror_x,
        )

    @classmethod
    def global_fit(cls, fixed_um: Any, moving_px: Any, **kwargs: Any) -> Registration:
        """One transform for the whole slide (``from_keypoints`` with a single region)."""
        kwargs.pop("regions", None)
        return cls.from_keypoints(fixed_um, moving_px, regions=None, **kwargs)

    @classmethod
    def from_alignment(
        cls,
        matrix_he_px_to_morph_px: Any,
        xenium_pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
        *,
        fixed_um: Any = None,
        moving_px: Any = None,
        source: str | Path | None = None,
    ) -> Registration:
        """From Xenium Explorer's alignment (H&E px -> morphology px): inverted, composed with µm -> morph px.

        Optional keypoints (``fixed_um``, ``moving_px``) are kept to evaluate the imported map.
        """
        matrix = check_alignment_matrix(matrix_he_px_to_morph_px, source)
        um_to_morph_px = np.diag([1.0 / xenium_pixel_size_um, 1.0 / xenium_pixel_size_um, 1.0])
        um_to_he_px = np.linalg.inv(matrix) @ um_to_morph_px
        region = Region(label=0, transform=um_to_he_px, fitted=False)
        if fixed_um is not None and moving_px is not None:
            region.fixed_um, region.moving_px = check_pairs(
                fixed_um, moving_px, source, names=("fixed (µm)", "moving (px)")
            )
            region.centroid_um = region.fixed_um.mean(axis=0)
        return cls([region], um_to_he_px, scale=True, source=source)

    # ---- mapping ----------------------------------------------------------------------------

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def centroids_um(self) -> np.ndarray:
        """(n_regions, 2) keypoint centroids in µm."""
        return np.stack([r.centroid_um for r in self.regions])

    @property
    def he_um_per_px(self) -> float:
        """H&E µm per level-0 pixel implied by the global fitted transform."""
        return 1.0 / linear_scale(self.global_transform)

    def region_of(self, xy_um: Any) -> np.ndarray:
        """int (n,) index of the region whose keypoint centroid is nearest to each point."""
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        if self.n_regions == 1:
            return np.zeros(len(xy), dtype=np.int64)
        d2 = ((xy[:, None, :] - self.centroids_um[None, :, :]) ** 2).sum(axis=2)  # (n, n_regions)
        return d2.argmin(axis=1)

    def blend_weights(self, xy_um: np.ndarray) -> np.ndarray:
        """(n, n_regions) Gaussian weights by distance to region centroids, rows sum to 1."""
        d2 = ((xy_um[:, None, :] - self.centroids_um[None, :, :]) ** 2).sum(axis=2)
        # Subtracting the row minimum keeps far-away points from underflowing to 0/0.
        logits = -(d2 - d2.min(axis=1, keepdims=True)) / (2.0 * self.blend_sigma_um**2)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def map(self, xy_um: Any) -> np.ndarray:
        """Xenium µm (n, 2) -> H&E level-0 px (n, 2)."""
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        if self.n_regions == 1:
            return apply_transform(self.regions[0].transform, xy)
        per_region = np.stack([apply_transform(r.transform, xy) for r in self.regions], axis=1)  # (n, R, 2)
        if self.blend:
            return (self.blend_weights(xy)[:, :, None] * per_region).sum(axis=1)
        return per_region[np.arange(len(xy)), self.region_of(xy)]

    def inverse_map(self, xy_px: Any, iterations: int = 30) -> np.ndarray:
        """H&E level-0 px (n, 2) -> Xenium µm (n, 2).

        Nearest mode: each point takes the inverse of the region whose Voronoi cell its pre-image
        falls in. Blend mode: fixed-point iterations started from the global inverse (converges
        because the blend differs from the global map by a small, smooth deformation).
        """
        px = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
        global_inverse = np.linalg.inv(self.global_transform)
        guess = apply_transform(global_inverse, px)
        if self.n_regions == 1:
            return apply_transform(np.linalg.inv(self.regions[0].transform), px)
        if self.blend:
            step = global_inverse[:2, :2]
            for _ in range(iterations):
                update = (px - self.map(guess)) @ step.T
                guess = guess + update
                if np.abs(update).max() < 1e-9:
                    break
            return guess
        candidates = np.stack([apply_transform(np.linalg.inv(r.transform), px) for r in self.regions], axis=1)
        # A region is consistent for a point when the pre-image it gives lies in its own Voronoi cell.
        consistent = np.stack([self.region_of(candidates[:, r]) == r for r in range(self.n_regions)], axis=1)
        rows = np.arange(len(px))
        chosen = self.region_of(guess)
        fallback = consistent.any(axis=1) & ~consistent[rows, chosen]
        chosen = np.where(fallback, consistent.argmax(axis=1), chosen)
        return candidates[rows, chosen]

    def _default_sigma_um(self) -> float:
        """Half the median distance from each region centroid to its nearest neighbour (µm)."""
        if self.n_regions == 1:
            return 1.0
        c = self.centroids_um
        d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(axis=2))
        np.fill_diagonal(d, np.inf)
        return float(np.median(d.min(axis=1)) / 2.0)

    # ---- quality ----------------------------------------------------------------------------

    def report(self, slide_um_per_px: float | None = None) -> dict:
        """Residuals and leave-one-out errors in µm, per region and overall (see :mod:`.report`)."""
        return quality_report(self, slide_um_per_px=slide_um_per_px)

    def check(self, max_rms_um: float | None = None, max_loo_um: float | None = None) -> dict:
        """Raise RegistrationError when a region's RMS or leave-one-out error passes its bound."""
        report = self.report()
        check_report(report, max_rms_um, max_loo_um, self.source)
        return report

    # ---- save / load ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "maps": "Xenium µm -> H&E level-0 px, homogeneous 3x3 on column vectors (x, y, 1)",
            "source": self.source,
            "scale": self.scale,
            "rigid_um_per_px": self.rigid_um_per_px,
            "blend": self.blend,
            "blend_sigma_um": self.blend_sigma_um,
            "mirror_x": self.mirror_x,
            "he_um_per_px": self.he_um_per_px,
            "bundle": self.identity,
            "global_transform": self.global_transform.tolist(),
            "regions": [
                {
                    "label": r.label,
                    "fitted": r.fitted,
                    "centroid_um": r.centroid_um.tolist(),
                    "transform": r.transform.tolist(),
                    "fixed_um": r.fixed_um.tolist(),
                    "moving_px": r.moving_px.tolist(),
                }
                for r in self.regions
            ],
        }

    def to_json(self, path: str | Path) -> Path:
        """Save atomically (write a temporary file, then rename)."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> Registration:
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise InputError(
                source,
                "format",
                f'"{JSON_FORMAT}"',
                data.get("format") if isinstance(data, dict) else type(data).__name__,
            )
        if data.get("version") != JSON_VERSION:
            raise InputError(source, "version", str(JSON_VERSION), data.get("version"))
        try:
            regions = [
                Region(
                    label=int(r["label"]),
                    transform=check_alignment_matrix(r["transform"], source),
                    fixed_um=np.asarray(r["fixed_um"], dtype=np.float64).reshape(-1, 2),
                    moving_px=np.asarray(r["moving_px"], dtype=np.float64).reshape(-1, 2),
                    centroid_um=np.asarray(r["centroid_um"], dtype=np.float64).reshape(2),
                    fitted=bool(r["fitted"]),
                )
                for r in data["regions"]
            ]
            global_transform = check_alignment_matrix(data["global_transform"], source)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                source,
                "regions",
                "a saved registration (regions with transforms and keypoints)",
                f"{type(exc).__name__}: {exc}",
            ) from exc
        return cls(
            regions,
            global_transform,
            scale=bool(data.get("scale", True)),
            blend=bool(data.get("blend")),
            blend_sigma_um=data.get("blend_sigma_um"),
            source=data.get("source"),
            rigid_um_per_px=data.get("rigid_um_per_px"),
            identity=data.get("bundle") if isinstance(data.get("bundle"), dict) else None,
            mirror_x=bool(data.get("mirror_x", False)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> Registration:
        path = Path(path)
        return cls.from_dict(read_json_file(path, "an existing registration.json"), source=path)


def _initial_labels(
    fixed: np.ndarray, regions: None | int | Sequence[int], source: str | Path | None, random_state: int
) -> np.ndarray:
    if regions is None:
        return np.zeros(len(fixed), dtype=np.int64)
    if isinstance(regions, (int, np.integer)):
        n_regions = int(regions)
        if n_regions < 1:
            raise InputError(source, "n_regions", "an integer >= 1", n_regions)
        if n_regions == 1:
            return np.zeros(len(fixed), dtype=np.int64)
        from sklearn.cluster import KMeans

        n_regions = min(n_regions, len(fixed))
        return KMeans(n_clusters=n_regions, n_init=10, random_state=random_state).fit_predict(fixed).astype(np.int64)
    labels = np.asarray(regions)
    if labels.shape != (len(fixed),) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            source,
            "regions",
            f"one integer region label per keypoint ({len(fixed)})",
            f"shape {labels.shape}, dtype {labels.dtype}",
        )
    return labels.astype(np.int64)


def _region_is_usable(fixed: np.ndarray, moving: np.ndarray, min_points: int) -> bool:
    if len(fixed) < min_points:
        return False
    try:
        check_spread(fixed, None, "fixed")
        check_spread(moving, None, "moving")
    except RegistrationError:
        return False
    return True


def _merge_small_regions(
    fixed: np.ndarray, moving: np.ndarray, labels: np.ndarray, min_points: int, source: str | Path | None
) -> np.ndarray:
    """Merge every region too small or collinear to fit into the region with the nearest centroid."""
    labels = labels.copy()
    while True:
        names = np.unique(labels)
        if len(names) == 1:
            return labels
        unusable = [n for n in names if not _region_is_usable(fixed[labels == n], moving[labels == n], min_points)]
        if not unusable:
            return labels
        # Smallest first: it is the one most likely to be unusable only for lack of points.
        worst = min(unusable, key=lambda n: int((labels == n).sum()))
        centroids = {n: fixed[labels == n].mean(axis=0) for n in names}
        others = [n for n in names if n != worst]
        nearest = min(others, key=lambda n: float(((centroids[n] - centroids[worst]) ** 2).sum()))
        log.info(
            "%s: region %d (%d keypoints) is too small or collinear to fit; merged into region %d",
            source or "keypoints",
            worst,
            int((labels == worst).sum()),
            nearest,
        )
        labels[labels == worst] = nearest


# --------------------------------------------------------------------------------------------
# Quality numbers
# --------------------------------------------------------------------------------------------


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
            transform = fit_um_to_px_mirrored(
                region.fixed_um[keep],
                region.moving_px[keep],
                registration.scale,
                registration.rigid_um_per_px,
                registration.mirror_x,
            )
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
        region_rows.append(
            {
                "label": region.label,
                "fitted": region.fitted,
                "n_keypoints": int(len(region.fixed_um)),
                "centroid_um": region.centroid_um.tolist(),
                "um_per_px": um_per_px,
                "rms_um": _rms(residual_um),
                "max_um": _max(residual_um),
                "loo_rms_um": _rms(loo_um),
                "loo_max_um": _max(loo_um),
            }
        )
        for j in range(len(region.fixed_um)):
            keypoints.append(
                {
                    "region": region.label,
                    "fixed_x_um": float(region.fixed_um[j, 0]),
                    "fixed_y_um": float(region.fixed_um[j, 1]),
                    "moving_x_px": float(region.moving_px[j, 0]),
                    "moving_y_px": float(region.moving_px[j, 1]),
                    "residual_um": float(residual_um[j]),
                    "loo_error_um": float(loo_um[j]) if np.isfinite(loo_um[j]) else None,
                }
            )
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
            raise RegistrationError(
                source,
                where,
                f"keypoint RMS residual <= {max_rms_um:g} µm",
                f"{row['rms_um']:.3f} µm (max {row['max_um']:.3f} µm over {row['n_keypoints']} keypoints)",
            )
        if max_loo_um is not None and row["loo_rms_um"] is not None and row["loo_rms_um"] > max_loo_um:
            raise RegistrationError(
                source,
                where,
                f"leave-one-out RMS error <= {max_loo_um:g} µm",
                f"{row['loo_rms_um']:.3f} µm (max {row['loo_max_um']:.3f} µm)",
            )
