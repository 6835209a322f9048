"""Register Xenium coordinates (µm) to the post-Xenium H&E slide (level-0 pixels), as in PAST.

Keypoints are picked on both images (Xenium Explorer exports them as ``keypoints.csv``). A rigid
(Kabsch) or similarity (Umeyama) transform is fitted per keypoint set; several sets from distinct
regions of the slide follow local tissue deformation that one global transform cannot. A single
global fit and an imported Xenium Explorer ``imagealignment.csv`` are the one-region cases of the
same :class:`Registration` object.

Conventions: every 3x3 matrix here is homogeneous and acts on column vectors ``(x, y, 1)``;
x points right and y down on both images. A ``Registration`` maps Xenium µm -> H&E level-0 px.
Quality numbers, the residual table and the overlay picture live in ``register_report.py``.
"""
from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import write_json
from .errors import InputError, read_json_file

log = logging.getLogger(__name__)

XENIUM_PIXEL_SIZE_UM = 0.2125  # µm per Xenium morphology-image pixel (experiment.xenium pixel_size)
KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
# A point set counts as collinear when its smaller singular value (centred) is below this
# fraction of the larger one: the rotation is then decided by noise across the line.
COLLINEAR_RTOL = 1e-3
JSON_FORMAT = "data_shards.registration"
JSON_VERSION = 1


class RegistrationError(InputError):
    """The keypoints cannot give a trustworthy registration (too few, collinear, too inaccurate)."""


# --------------------------------------------------------------------------------------------
# Point-set checks and the least-squares fit
# --------------------------------------------------------------------------------------------

def _as_points(xy: Any, source: str | Path | None, name: str) -> np.ndarray:
    """float64 (n, 2) or one clear error naming the source and which array is wrong."""
    try:
        arr = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(source, name, "numeric (n, 2) coordinates", f"{type(exc).__name__}: {exc}") from exc
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(source, name, "an (n, 2) array of x, y coordinates", f"shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise InputError(source, name, "finite coordinates (no NaN or inf)", f"{int(bad.sum())} bad rows, first {rows}")
    return arr


def _check_spread(xy: np.ndarray, source: str | Path | None, name: str) -> None:
    """Refuse collinear (or coincident) points: the fit would be decided by noise."""
    centred = xy - xy.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    if singular[0] == 0 or singular[1] <= COLLINEAR_RTOL * singular[0]:
        ratio = 0.0 if singular[0] == 0 else singular[1] / singular[0]
        raise RegistrationError(
            source, name, f"points spread in 2-D (singular value ratio > {COLLINEAR_RTOL:g})",
            f"collinear points (ratio {ratio:.2e})",
        )


def check_pairs(src_xy: Any, dst_xy: Any, source: str | Path | None = None,
                names: tuple[str, str] = ("src", "dst")) -> tuple[np.ndarray, np.ndarray]:
    """Validate matched point pairs: (n, 2) each, same n, n >= 3, finite, not collinear."""
    src = _as_points(src_xy, source, names[0])
    dst = _as_points(dst_xy, source, names[1])
    if len(src) != len(dst):
        raise InputError(source, f"{names[0]}/{names[1]}", "the same number of points in both sets",
                         f"{len(src)} and {len(dst)}")
    if len(src) < 3:
        raise RegistrationError(source, f"{names[0]}/{names[1]}", "at least 3 keypoint pairs", f"{len(src)}")
    _check_spread(src, source, names[0])
    _check_spread(dst, source, names[1])
    return src, dst


def fit_transform(src_xy: Any, dst_xy: Any, scale: bool = True, *, source: str | Path | None = None) -> np.ndarray:
    """Least-squares map src -> dst as a homogeneous (3, 3) matrix, never a reflection.

    ``scale=False``: rigid (Kabsch: rotation + translation). ``scale=True``: similarity
    (Umeyama 1991: isotropic scale too). When the points are mirrored the best proper rotation
    is returned. ``source`` (a file name) only makes error messages name where the points came from.
    """
    src, dst = check_pairs(src_xy, dst_xy, source)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)  # (2, 2)
    u, singular, vt = np.linalg.svd(covariance)
    # Flip the weakest axis when the best orthogonal map would be a reflection.
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    factor = float((singular * sign).sum() / (src_c**2).sum(axis=1).mean()) if scale else 1.0
    matrix = np.eye(3)
    matrix[:2, :2] = factor * rotation
    matrix[:2, 2] = dst_mean - factor * rotation @ src_mean
    return matrix


def fit_um_to_px(fixed_um: np.ndarray, moving_px: np.ndarray, scale: bool, rigid_um_per_px: float | None,
                 source: str | Path | None = None) -> np.ndarray:
    """(3, 3) µm -> px. A rigid fit first converts µm to px with ``rigid_um_per_px`` (units must match)."""
    if scale:
        return fit_transform(fixed_um, moving_px, scale=True, source=source)
    um_to_px = np.diag([1.0 / rigid_um_per_px, 1.0 / rigid_um_per_px, 1.0])
    return fit_transform(apply_transform(um_to_px, fixed_um), moving_px, scale=False, source=source) @ um_to_px


def apply_transform(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(n, 2) points through a homogeneous (3, 3) matrix."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def linear_scale(matrix: np.ndarray) -> float:
    """Isotropic scale of a (3, 3) map: sqrt|det| of its linear part (output units per input unit)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


# --------------------------------------------------------------------------------------------
# Xenium Explorer exports
# --------------------------------------------------------------------------------------------

def read_explorer_keypoints(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Xenium Explorer keypoints CSV -> (fixed_xy, moving_xy), each float64 (n, 2).

    fixed = ``fixedX, fixedY`` (Xenium µm); moving = ``alignmentX, alignmentY`` (H&E level-0 px).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "an existing keypoints CSV", "no such file")
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for empty / malformed CSV
        raise InputError(path, None, "a CSV with columns " + ",".join(KEYPOINT_COLUMNS),
                         f"{type(exc).__name__}: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in KEYPOINT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, "columns", "columns " + ",".join(KEYPOINT_COLUMNS),
                         f"missing {','.join(missing)}; found {','.join(frame.columns)}")
    values = {}
    for column in KEYPOINT_COLUMNS:
        numeric = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numeric)
        if bad.any():
            rows = (np.flatnonzero(bad)[:5] + 2).tolist()  # +2: header line, 1-based lines
            raise InputError(path, column, "finite numbers in every row",
                             f"{int(bad.sum())} empty/NaN/non-numeric values, first at lines {rows}")
        values[column] = numeric
    fixed = np.column_stack([values["fixedX"], values["fixedY"]])
    moving = np.column_stack([values["alignmentX"], values["alignmentY"]])
    if len(fixed) < 3:
        raise RegistrationError(path, "rows", "at least 3 keypoint pairs", f"{len(fixed)}")
    return fixed, moving


def read_explorer_alignment(path: str | Path) -> np.ndarray:
    """Xenium Explorer image alignment CSV -> (3, 3) float64: H&E level-0 px -> morphology px.

    Comma-separated 3x3 with no header, as exported; a header row is skipped when present.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "an existing alignment CSV", "no such file")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if any(c.strip() for c in row)]
    if rows and not _is_numeric_row(rows[0]):
        rows = rows[1:]  # a header row
    try:
        matrix = np.array([[float(cell) for cell in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputError(path, None, "a comma-separated 3x3 matrix of numbers", str(exc)) from exc
    return check_alignment_matrix(matrix, path)


def _is_numeric_row(row: Sequence[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def check_alignment_matrix(matrix: Any, source: str | Path | None = None) -> np.ndarray:
    """A 3x3 finite affine matrix with last row [0, 0, 1] and an invertible linear part."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise InputError(source, "matrix", "a 3x3 matrix (3 rows of 3 numbers)", f"shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise InputError(source, "matrix", "finite numbers", "NaN or inf")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise InputError(source, "matrix last row", "0,0,1 (an affine map)", matrix[2].tolist())
    linear = matrix[:2, :2]
    if abs(np.linalg.det(linear)) <= 1e-12 * max(np.abs(linear).max(), 1e-300) ** 2:
        raise InputError(source, "matrix", "an invertible matrix", f"determinant {np.linalg.det(linear):.3g}")
    return matrix


# --------------------------------------------------------------------------------------------
# The registration object
# --------------------------------------------------------------------------------------------

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

    def __init__(self, regions: list[Region], global_transform: np.ndarray, *, scale: bool = True,
                 blend: bool = False, blend_sigma_um: float | None = None, source: str | None = None,
                 rigid_um_per_px: float | None = None):
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

    # ---- constructors -----------------------------------------------------------------------

    @classmethod
    def from_keypoints(cls, fixed_um: Any, moving_px: Any, regions: None | int | Sequence[int] = None, *,
                       blend: bool = False, blend_sigma_um: float | None = None, scale: bool = True,
                       he_um_per_px: float | None = None, min_points_per_region: int = 4,
                       source: str | Path | None = None, random_state: int = 0) -> "Registration":
        """Fit from keypoint pairs: fixed (Xenium µm) -> moving (H&E level-0 px).

        ``regions``: None (one global region), an int (spatial k-means on the fixed coordinates)
        or one integer label per keypoint. A region with fewer than ``min_points_per_region``
        points, or collinear ones, is merged into the nearest region (logged). ``scale=False``
        fits a rigid map on fixed coordinates converted to px with ``he_um_per_px`` (required
        then: a rigid map cannot change units).
        """
        fixed, moving = check_pairs(fixed_um, moving_px, source, names=("fixed (µm)", "moving (px)"))
        if min_points_per_region < 3:
            raise ValueError("min_points_per_region must be >= 3")
        rigid_um_per_px = None
        if not scale:
            if not he_um_per_px or not np.isfinite(he_um_per_px) or he_um_per_px <= 0:
                raise InputError(source, "he_um_per_px", "a positive H&E µm/pixel for a rigid (scale=False) fit",
                                 he_um_per_px)
            rigid_um_per_px = float(he_um_per_px)

        def fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
            return fit_um_to_px(src, dst, scale, rigid_um_per_px, source)

        labels = _initial_labels(fixed, regions, source, random_state)
        labels = _merge_small_regions(fixed, moving, labels, min_points_per_region, source)
        fitted = []
        for label in np.unique(labels):
            member = labels == label
            fitted.append(Region(label=int(label), transform=fit(fixed[member], moving[member]),
                                 fixed_um=fixed[member], moving_px=moving[member],
                                 centroid_um=fixed[member].mean(axis=0)))
        return cls(fitted, fit(fixed, moving), scale=scale, blend=blend, blend_sigma_um=blend_sigma_um,
                   source=source, rigid_um_per_px=rigid_um_per_px)

    @classmethod
    def global_fit(cls, fixed_um: Any, moving_px: Any, **kwargs: Any) -> "Registration":
        """One transform for the whole slide (``from_keypoints`` with a single region)."""
        kwargs.pop("regions", None)
        return cls.from_keypoints(fixed_um, moving_px, regions=None, **kwargs)

    @classmethod
    def from_alignment(cls, matrix_he_px_to_morph_px: Any, xenium_pixel_size_um: float = XENIUM_PIXEL_SIZE_UM,
                       *, fixed_um: Any = None, moving_px: Any = None,
                       source: str | Path | None = None) -> "Registration":
        """From Xenium Explorer's alignment (H&E px -> morphology px): inverted, composed with µm -> morph px.

        Optional keypoints (``fixed_um``, ``moving_px``) are kept to evaluate the imported map.
        """
        matrix = check_alignment_matrix(matrix_he_px_to_morph_px, source)
        um_to_morph_px = np.diag([1.0 / xenium_pixel_size_um, 1.0 / xenium_pixel_size_um, 1.0])
        um_to_he_px = np.linalg.inv(matrix) @ um_to_morph_px
        region = Region(label=0, transform=um_to_he_px, fitted=False)
        if fixed_um is not None and moving_px is not None:
            region.fixed_um, region.moving_px = check_pairs(fixed_um, moving_px, source,
                                                            names=("fixed (µm)", "moving (px)"))
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
        """Residuals and leave-one-out errors in µm, per region and overall (see register_report)."""
        from .register_report import quality_report

        return quality_report(self, slide_um_per_px=slide_um_per_px)

    def check(self, max_rms_um: float | None = None, max_loo_um: float | None = None) -> dict:
        """Raise RegistrationError when a region's RMS or leave-one-out error passes its bound."""
        from .register_report import check_report

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
            "he_um_per_px": self.he_um_per_px,
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
    def from_dict(cls, data: dict, source: str | Path | None = None) -> "Registration":
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise InputError(source, "format", f'"{JSON_FORMAT}"', data.get("format") if isinstance(data, dict) else type(data).__name__)
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
            raise InputError(source, "regions", "a saved registration (regions with transforms and keypoints)",
                             f"{type(exc).__name__}: {exc}") from exc
        return cls(regions, global_transform, scale=bool(data.get("scale", True)), blend=bool(data.get("blend")),
                   blend_sigma_um=data.get("blend_sigma_um"), source=data.get("source"),
                   rigid_um_per_px=data.get("rigid_um_per_px"))

    @classmethod
    def from_json(cls, path: str | Path) -> "Registration":
        path = Path(path)
        return cls.from_dict(read_json_file(path, "an existing registration.json"), source=path)


def _initial_labels(fixed: np.ndarray, regions: None | int | Sequence[int], source: str | Path | None,
                    random_state: int) -> np.ndarray:
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
        raise InputError(source, "regions", f"one integer region label per keypoint ({len(fixed)})",
                         f"shape {labels.shape}, dtype {labels.dtype}")
    return labels.astype(np.int64)


def _region_is_usable(fixed: np.ndarray, moving: np.ndarray, min_points: int) -> bool:
    if len(fixed) < min_points:
        return False
    try:
        _check_spread(fixed, None, "fixed")
        _check_spread(moving, None, "moving")
    except RegistrationError:
        return False
    return True


def _merge_small_regions(fixed: np.ndarray, moving: np.ndarray, labels: np.ndarray, min_points: int,
                         source: str | Path | None) -> np.ndarray:
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
        log.info("%s: region %d (%d keypoints) is too small or collinear to fit; merged into region %d",
                 source or "keypoints", worst, int((labels == worst).sum()), nearest)
        labels[labels == worst] = nearest


# --------------------------------------------------------------------------------------------
# Bundle step
# --------------------------------------------------------------------------------------------

# Config keys of the registration step (OmegaConf; paths are relative to the bundle folder):
DEFAULT_CONFIG: dict[str, Any] = {
    "keypoints": "he/keypoints.csv",  # Xenium Explorer keypoints: fixedX,fixedY (µm), alignmentX,alignmentY (px)
    "alignment": None,  # optional Xenium Explorer alignment CSV; when set it is used instead of fitting
    "n_regions": 1,  # keypoint regions by spatial k-means; 1 = one global transform
    "blend": False,  # smooth Gaussian mix of neighbouring regions instead of the nearest region
    "blend_sigma_um": None,  # Gaussian width in µm; None = half the median centroid spacing
    "scale": True,  # similarity (Umeyama); False = rigid (Kabsch) after µm -> px with the slide's µm/px
    "min_points_per_region": 4,  # smaller (or collinear) regions are merged into their nearest neighbour
    "max_rms_um": 10.0,  # refuse when a region's keypoint RMS residual passes this (µm); null = no bound
    "max_loo_um": 20.0,  # refuse when a region's leave-one-out RMS error passes this (µm); null = no bound
    "he_slide": "he/post_xenium_he.ome.tif",  # pyramidal H&E, for the overlay and its µm/px
    "he_um_per_px": None,  # override the slide's metadata (µm per level-0 pixel)
    "xenium_pixel_size_um": 0.2125,  # morphology-image pixel size, for the alignment CSV
    "random_state": 0,  # k-means seed
}


def _read_cell_centroids_um(bundle_dir: Path) -> np.ndarray:
    """(n_cells, 2) x_centroid, y_centroid in µm from cells.parquet."""
    import pyarrow.parquet as pq

    path = bundle_dir / "cells.parquet"
    if not path.is_file():
        raise InputError(path, None, "an existing cells.parquet", "no such file")
    columns = pq.read_schema(path).names
    missing = [c for c in ("x_centroid", "y_centroid") if c not in columns]
    if missing:
        raise InputError(path, "columns", "x_centroid, y_centroid", f"missing {','.join(missing)}; found {','.join(columns)}")
    table = pq.read_table(path, columns=["x_centroid", "y_centroid"])
    xy = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in ("x_centroid", "y_centroid")])
    return xy[np.isfinite(xy).all(axis=1)]


def register_bundle(bundle_dir: str | Path, out_dir: str | Path, cfg: Any = None) -> dict:
    """Fit, check, report and save the registration of one bundle; returns the quality report.

    Writes ``registration.json`` (load with ``Registration.from_json``), ``registration_report.json``,
    ``registration_overlay.png`` and ``register_config.yaml`` into ``out_dir``. Raises
    InputError / RegistrationError before writing anything when inputs or accuracy are bad.
    """
    from omegaconf import OmegaConf

    from .config import save_config
    from .register_report import check_report, format_table, write_overlay
    from .slide import Slide

    cfg = OmegaConf.merge(OmegaConf.create(DEFAULT_CONFIG), OmegaConf.create(cfg or {}))
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    keypoints_path = bundle_dir / cfg.keypoints if cfg.keypoints else None

    with Slide(bundle_dir / cfg.he_slide, um_per_px=cfg.he_um_per_px) as slide:
        if cfg.alignment:
            alignment_path = bundle_dir / cfg.alignment
            fixed = moving = None
            if keypoints_path is not None and keypoints_path.is_file():
                fixed, moving = read_explorer_keypoints(keypoints_path)
            registration = Registration.from_alignment(
                read_explorer_alignment(alignment_path), cfg.xenium_pixel_size_um,
                fixed_um=fixed, moving_px=moving, source=alignment_path)
        else:
            if keypoints_path is None:
                raise InputError(None, "keypoints", "a keypoints CSV path or an alignment CSV path in the config", None)
            fixed, moving = read_explorer_keypoints(keypoints_path)
            registration = Registration.from_keypoints(
                fixed, moving, regions=int(cfg.n_regions), blend=bool(cfg.blend), blend_sigma_um=cfg.blend_sigma_um,
                scale=bool(cfg.scale), he_um_per_px=slide.um_per_px,
                min_points_per_region=int(cfg.min_points_per_region), source=keypoints_path,
                random_state=int(cfg.random_state))
        report = registration.report(slide_um_per_px=slide.um_per_px)
        check_report(report, cfg.max_rms_um, cfg.max_loo_um, registration.source)
        cells_um = _read_cell_centroids_um(bundle_dir)
        table = format_table(report)
        print(table)
        log.info("registration of %s: RMS %.3f µm over %d keypoints, %d region(s)", bundle_dir,
                 report["overall"]["rms_um"] or float("nan"), report["overall"]["n_keypoints"], registration.n_regions)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_overlay(out_dir / "registration_overlay.png", registration, slide, cells_um, report)
    registration.to_json(out_dir / "registration.json")
    write_json(out_dir / "registration_report.json", report)
    save_config(cfg, out_dir / "register_config.yaml")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m data_shards.register BUNDLE OUT [--config c.yaml] [key=value ...]``."""
    from .config import load_config
    from .logs import setup_logging

    parser = argparse.ArgumentParser(description="Register a Xenium bundle to its H&E slide.")
    parser.add_argument("bundle_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--config", default=None, help="YAML with the keys of DEFAULT_CONFIG")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides, defaults=DEFAULT_CONFIG)
    return register_bundle(args.bundle_dir, args.out_dir, cfg)


if __name__ == "__main__":
    main()
