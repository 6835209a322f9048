"""The planted Xenium → H&E map of a synthetic bundle, its inverse, and Explorer-style exports.

Map (Xenium µm → H&E level-0 pixels, x right, y down in both):

    y = s · R(θ) · p + t                         global similarity, s = 1 / (H&E µm/pixel)
    q = y + Σ_k a_k · exp(-|y - c_k|² / (2 σ_k²))  smooth local deformation (Gaussian RBFs, in H&E px)

The deformation is a small perturbation (its Jacobian stays near identity), so the inverse is
found by fixed-point iteration y ← q - D(y), which converges geometrically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

XENIUM_UM_PER_MORPHOLOGY_PX = 0.2125


def similarity_matrix(rotation_deg: float, scale: float, translation_xy: tuple[float, float]) -> np.ndarray:
    """(3, 3) homogeneous ``scale · R(rotation) · p + translation``."""
    theta = np.deg2rad(rotation_deg)
    c, s = np.cos(theta), np.sin(theta)
    return np.array(
        [[scale * c, -scale * s, translation_xy[0]], [scale * s, scale * c, translation_xy[1]], [0.0, 0.0, 1.0]]
    )


def apply_homogeneous(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(n, 2) points through a (3, 3) affine map."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


@dataclass
class PlantedMap:
    """Xenium µm → H&E level-0 px. Deformation fields are stored in H&E pixels."""

    rotation_deg: float
    scale_px_per_um: float
    translation_px: tuple[float, float]
    rbf_centers_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (k, 2)
    rbf_amplitudes_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (k, 2)
    rbf_sigmas_px: np.ndarray = field(default_factory=lambda: np.zeros((0,)))  # (k,)

    def __post_init__(self) -> None:
        self.rbf_centers_px = np.asarray(self.rbf_centers_px, dtype=np.float64).reshape(-1, 2)
        self.rbf_amplitudes_px = np.asarray(self.rbf_amplitudes_px, dtype=np.float64).reshape(-1, 2)
        self.rbf_sigmas_px = np.asarray(self.rbf_sigmas_px, dtype=np.float64).reshape(-1)
        # Fixed-point inversion needs the displacement field to be a contraction.
        if len(self.rbf_sigmas_px):
            lipschitz = np.sum(np.linalg.norm(self.rbf_amplitudes_px, axis=1) / self.rbf_sigmas_px) * np.exp(-0.5)
            if lipschitz >= 0.5:
                raise ValueError(f"deformation too strong to invert reliably (Lipschitz bound {lipschitz:.2f} ≥ 0.5)")

    @property
    def similarity(self) -> np.ndarray:
        """(3, 3) global similarity Xenium µm → H&E px (deformation excluded)."""
        return similarity_matrix(self.rotation_deg, self.scale_px_per_um, self.translation_px)

    def displacement(self, y_px: np.ndarray) -> np.ndarray:
        """(n, 2) deformation D(y) in H&E px at (n, 2) H&E px positions."""
        y_px = np.asarray(y_px, dtype=np.float64).reshape(-1, 2)
        out = np.zeros_like(y_px)
        for center, amplitude, sigma in zip(self.rbf_centers_px, self.rbf_amplitudes_px, self.rbf_sigmas_px):
            d2 = np.sum((y_px - center) ** 2, axis=1)
            out += np.exp(-d2 / (2.0 * sigma**2))[:, None] * amplitude
        return out

    def __call__(self, xenium_um: np.ndarray) -> np.ndarray:
        """(n, 2) Xenium µm → (n, 2) H&E level-0 px."""
        y = apply_homogeneous(self.similarity, xenium_um)
        return y + self.displacement(y)

    def inverse(self, he_px: np.ndarray, tol_px: float = 1e-9, max_iter: int = 200) -> np.ndarray:
        """(n, 2) H&E level-0 px → (n, 2) Xenium µm."""
        q = np.asarray(he_px, dtype=np.float64).reshape(-1, 2)
        y = q.copy()
        for _ in range(max_iter if len(self.rbf_sigmas_px) else 0):
            y_next = q - self.displacement(y)
            step = np.max(np.abs(y_next - y)) if len(y) else 0.0
            y = y_next
            if step < tol_px:
                break
        return apply_homogeneous(np.linalg.inv(self.similarity), y)

    def to_dict(self, he_um_per_px: float) -> dict:
        return {
            "rotation_deg": float(self.rotation_deg),
            "scale": float(self.scale_px_per_um),
            "scale_units": "H&E level-0 px per Xenium µm",
            "translation": [float(v) for v in self.translation_px],
            "translation_units": "H&E level-0 px",
            "xenium_um_to_he_px": self.similarity.tolist(),
            "deformation": {
                "kind": "sum of Gaussian RBF displacements applied after the similarity, in H&E px",
                "centers_px": self.rbf_centers_px.tolist(),
                "amplitudes_px": self.rbf_amplitudes_px.tolist(),
                "amplitudes_um": (self.rbf_amplitudes_px * he_um_per_px).tolist(),
                "sigmas_px": self.rbf_sigmas_px.tolist(),
            },
        }

    @classmethod
    def from_dict(cls, truth: dict) -> PlantedMap:
        deformation = truth.get("deformation") or {}
        return cls(
            rotation_deg=truth["rotation_deg"],
            scale_px_per_um=truth["scale"],
            translation_px=tuple(truth["translation"]),
            rbf_centers_px=np.asarray(deformation.get("centers_px", []), dtype=np.float64),
            rbf_amplitudes_px=np.asarray(deformation.get("amplitudes_px", []), dtype=np.float64),
            rbf_sigmas_px=np.asarray(deformation.get("sigmas_px", []), dtype=np.float64),
        )


def plant_map(
    rng: np.random.Generator,
    he_shape_hw: tuple[int, int],
    he_um_per_px: float,
    rotation_deg_range: tuple[float, float] = (3.0, 20.0),
    deformation_um: float = 8.0,
    n_rbf: int = 4,
    margin_um: float = 100.0,
) -> PlantedMap:
    """Draw a map whose inverse puts the whole H&E image at Xenium x, y ≥ ``margin_um``.

    ``deformation_um`` is the largest RBF displacement amplitude in µm (0 = no deformation).
    """
    h, w = he_shape_hw
    rotation = float(rng.uniform(*rotation_deg_range)) * float(rng.choice([-1.0, 1.0]))
    scale = 1.0 / he_um_per_px
    corners_px = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64)
    linear = similarity_matrix(rotation, scale, (0.0, 0.0))
    corners_um = apply_homogeneous(np.linalg.inv(linear), corners_px)
    # Choose t so the H&E image's Xenium footprint starts at the margin (plus a random offset).
    origin_um = corners_um.min(axis=0) - margin_um - rng.uniform(0.0, margin_um, size=2)
    translation = linear[:2, :2] @ origin_um
    centers = np.zeros((0, 2))
    amplitudes = np.zeros((0, 2))
    sigmas = np.zeros((0,))
    if deformation_um > 0 and n_rbf > 0:
        centers = rng.uniform([0, 0], [w, h], size=(n_rbf, 2))
        directions = rng.normal(size=(n_rbf, 2))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        amplitudes = directions * rng.uniform(0.5, 1.0, size=(n_rbf, 1)) * (deformation_um / he_um_per_px)
        # Wide bumps (a fifth to a half of the slide) keep the field smooth and invertible.
        sigmas = rng.uniform(0.2, 0.5, size=n_rbf) * max(h, w)
        min_sigma = 4.0 * n_rbf * np.linalg.norm(amplitudes, axis=1).max()
        sigmas = np.maximum(sigmas, min_sigma)
    return PlantedMap(rotation, scale, (float(translation[0]), float(translation[1])), centers, amplitudes, sigmas)


def spread_indices(rng: np.random.Generator, xy: np.ndarray, n: int, pool: int = 20000) -> np.ndarray:
    """Indices of ``n`` points spread over ``xy`` (farthest-point sampling on a random pool)."""
    n_points = len(xy)
    n = min(n, n_points)
    candidates = rng.choice(n_points, size=min(pool, n_points), replace=False)
    pts = xy[candidates]
    chosen = [int(rng.integers(len(pts)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    return candidates[np.asarray(chosen)]


def explorer_alignment_matrix(planted: PlantedMap, pixel_size_um: float = XENIUM_UM_PER_MORPHOLOGY_PX) -> np.ndarray:
    """(3, 3) H&E level-0 px → Xenium morphology px (µm / pixel_size), the global similarity's inverse."""
    um_to_morph = np.diag([1.0 / pixel_size_um, 1.0 / pixel_size_um, 1.0])
    return um_to_morph @ np.linalg.inv(planted.similarity)
