"""Least-squares point-set registration: Kabsch (rigid) and Umeyama (similarity) fits, 3x3 transforms.

Conventions: every 3x3 matrix here is homogeneous and acts on column vectors ``(x, y, 1)``;
x points right and y down on both images. Point sets are float64 (n, 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError

# A point set counts as collinear when its smaller singular value (centred) is below this
# fraction of the larger one: the rotation is then decided by noise across the line.
COLLINEAR_RTOL = 1e-3


# x -> -x: a mirrored H&E (scanned face down) is fitted as the mirror image of the Xenium frame, so each
# transform stays a proper similarity after this reflection (register.he_mirrored).
MIRROR_X = np.diag([-1.0, 1.0, 1.0])


class RegistrationError(InputError):
    """The keypoints cannot give a trustworthy registration (too few, collinear, too inaccurate)."""


def as_points(xy: Any, source: str | Path | None, name: str) -> np.ndarray:
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


def check_spread(xy: np.ndarray, source: str | Path | None, name: str) -> None:
    """Refuse collinear (or coincident) points: the fit would be decided by noise."""
    centred = xy - xy.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    if singular[0] == 0 or singular[1] <= COLLINEAR_RTOL * singular[0]:
        ratio = 0.0 if singular[0] == 0 else singular[1] / singular[0]
        raise RegistrationError(
            source,
            name,
            f"points spread in 2-D (singular value ratio > {COLLINEAR_RTOL:g})",
            f"collinear points (ratio {ratio:.2e})",
        )


def check_pairs(
    src_xy: Any, dst_xy: Any, source: str | Path | None = None, names: tuple[str, str] = ("src", "dst")
) -> tuple[np.ndarray, np.ndarray]:
    """Validate matched point pairs: (n, 2) each, same n, n >= 3, finite, not collinear."""
    src = as_points(src_xy, source, names[0])
    dst = as_points(dst_xy, source, names[1])
    if len(src) != len(dst):
        raise InputError(
            source, f"{names[0]}/{names[1]}", "the same number of points in both sets", f"{len(src)} and {len(dst)}"
        )
    if len(src) < 3:
        raise RegistrationError(source, f"{names[0]}/{names[1]}", "at least 3 keypoint pairs", f"{len(src)}")
    check_spread(src, source, names[0])
    check_spread(dst, source, names[1])
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


def fit_um_to_px(
    fixed_um: np.ndarray,
    moving_px: np.ndarray,
    scale: bool,
    rigid_um_per_px: float | None,
    source: str | Path | None = None,
) -> np.ndarray:
    """(3, 3) µm -> px. A rigid fit first converts µm to px with ``rigid_um_per_px`` (units must match)."""
    if scale:
        return fit_transform(fixed_um, moving_px, scale=True, source=source)
    um_to_px = np.diag([1.0 / rigid_um_per_px, 1.0 / rigid_um_per_px, 1.0])
    return fit_transform(apply_transform(um_to_px, fixed_um), moving_px, scale=False, source=source) @ um_to_px


def fit_um_to_px_mirrored(
    fixed_um: np.ndarray,
    moving_px: np.ndarray,
    scale: bool,
    rigid_um_per_px: float | None,
    mirror_x: bool,
    source: str | Path | None = None,
) -> np.ndarray:
    """:func:`fit_um_to_px`, after x -> -x on the fixed side when ``mirror_x`` (the result then reflects)."""
    if not mirror_x:
        return fit_um_to_px(fixed_um, moving_px, scale, rigid_um_per_px, source)
    flipped = apply_transform(MIRROR_X, fixed_um)
    return fit_um_to_px(flipped, moving_px, scale, rigid_um_per_px, source) @ MIRROR_X


def apply_transform(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(n, 2) points through a homogeneous (3, 3) matrix."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def linear_scale(matrix: np.ndarray) -> float:
    """Isotropic scale of a (3, 3) map: sqrt|det| of its linear part (output units per input unit)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


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
