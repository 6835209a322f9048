"""Keypoints found automatically between the Xenium DAPI morphology image and the H&E (``keypoints: auto``).

The signal both images share is the nuclei: bright in DAPI, dark in the H&E's hematoxylin channel
(``skimage.color.rgb2hed``, channel 0, optical density). Three steps, each in µm so that the scale
comes from both images' µm/px and never has to be searched:

1. **Coarse global search** (:func:`coarse_search`): both images resampled to a few µm/px; the DAPI
   image, cropped to its tissue, is rotated through every angle (and mirrored) and placed on the
   hematoxylin image by masked normalised cross-correlation (Padfield 2012, computed with FFTs).
   The best placement gives a first map, its rotation, and whether the H&E is mirrored.
2. **Tiles, two passes** (:func:`match_tiles`): square DAPI tiles spread over the tissue are matched
   against the hematoxylin image warped into the Xenium frame by the current map
   (normalised cross-correlation as ``skimage.feature.match_template``, sub-pixel peak), first at 2 µm/px over large tiles, then at
   about the H&E's µm/px over small ones. Each tile gives one keypoint pair (its centre in µm, where
   the H&E shows it), so the pairs follow local deformation.
3. **Robust fit** (:func:`robust_keypoints`): ``skimage.measure.ransac`` with a similarity rejects
   gross mismatches; each remaining pair must agree with a similarity fitted to its nearest
   neighbours (a local leave-one-out), which keeps smooth deformation and drops wrong peaks.

The pairs are written as ``auto_keypoints.csv`` in Xenium Explorer's keypoint format (fixedX, fixedY
in morphology pixels; alignmentX, alignmentY in H&E level-0 px; :func:`write_explorer_keypoints`) and
then go through the same per-region fit and QC as hand-picked keypoints (:mod:`.run`).

When the images do not match (a DAPI image of another section, too few matching tiles, an
implausible scale) one :class:`~.fit.RegistrationError` names both files and what was found.
Conventions: Xenium µm at morphology pixel centres are ``(index + 0.5) · pixel_size``; H&E level-0
px are index coordinates (pixel centre at the integer); every 3x3 matrix acts on ``(x, y, 1)``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import zarr
from scipy import fft as sfft
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import ransac
from skimage.transform import ProjectiveTransform, SimilarityTransform, warp

from common.atomic import atomic_path
from common.errors import InputError

from ..slide import Slide
from .fit import MIRROR_X, RegistrationError, apply_transform, fit_transform, linear_scale

log = logging.getLogger(__name__)

AUTO = "auto"  # the value of register.keypoints that selects this route
AUTO_KEYPOINTS_FILE = "auto_keypoints.csv"
# Where XOA puts the DAPI image, newest layout first (relative to the bundle); morphology.ome.tif is a Z-stack.
MORPHOLOGY_CANDIDATES = (
    "morphology_focus/morphology_focus_0000.ome.tif",
    "morphology_focus.ome.tif",
    "morphology_mip.ome.tif",
    "morphology.ome.tif",
)

# Coarse search: resolution (µm/px) at least this, and the DAPI tissue's longer side at most this many px.
COARSE_MIN_UM_PER_PX = 4.0
COARSE_MAX_SIDE_PX = 320
COARSE_STEP_DEG = 4.0  # angle sweep step; then refined around the best angle
MIN_OVERLAP = 0.8  # a coarse placement must keep this share of the DAPI template on the H&E image
# Tile passes: (µm/px, tile side µm); the fine pass's µm/px is at least the H&E's.
PASS1_UM_PER_PX, PASS1_TILE_UM, PASS1_MAX_TILES = 2.0, 320.0, 25
PASS2_UM_PER_PX, PASS2_TILE_UM, PASS2_MARGIN_UM = 0.5, 96.0, 16.0
TILE_MIN_TISSUE = 0.5  # a tile is matched when at least this share of it is DAPI tissue (coarse mask)
RANSAC_UM = 25.0  # RANSAC inlier bound (µm): gross mismatches, not deformation, are rejected
LOCAL_NEIGHBOURS = 8  # neighbours of the local leave-one-out check
LOCAL_MAX_UM = 4.0  # a pair farther than this from its neighbours' local similarity is dropped (µm)


@dataclass
class AutoKeypoints:
    """What the automatic route found: pairs (Xenium µm -> H&E level-0 px) and how they were found."""

    fixed_um: np.ndarray  # (n, 2) Xenium µm (tile centres)
    moving_px: np.ndarray  # (n, 2) H&E level-0 px
    mirrored: bool  # the H&E is the mirror image (x flipped) of the Xenium frame
    rotation_deg: float  # rotation of the global similarity Xenium -> H&E
    he_um_per_px_fitted: float  # H&E µm/px of the global similarity fit (RANSAC inliers)
    coarse_correlation: float  # masked NCC of the best coarse placement
    coarse_correlation_other_hand: float  # ... of the best placement with the other handedness
    n_tiles: int  # fine tiles matched
    n_matched: int  # tiles whose correlation passed the bound
    n_kept: int  # pairs kept after RANSAC and the local check
    median_tile_correlation: float
    seconds: float
    morphology_image: str = ""
    he_slide: str = ""
    timings_s: dict = field(default_factory=dict)

    def to_report(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("fixed_um", "moving_px")}
        return json.loads(json.dumps(out, default=float))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def find_morphology_image(bundle_dir: str | Path, configured: str | None = None) -> Path:
    """The bundle's DAPI image: ``configured`` (relative to the bundle), else the one experiment.xenium
    names, else XOA's usual names (:data:`MORPHOLOGY_CANDIDATES`)."""
    bundle_dir = Path(bundle_dir)
    if configured:
        path = bundle_dir / configured
        if not path.is_file():
            raise InputError(path, "register.morphology_image", "an existing DAPI morphology OME-TIFF", "no such file")
        return path
    candidates = []
    experiment = bundle_dir / "experiment.xenium"
    if experiment.is_file():
        try:
            images = json.loads(experiment.read_text(encoding="utf-8")).get("images") or {}
        except (json.JSONDecodeError, AttributeError):
            images = {}
        candidates += [images[k] for k in ("morphology_focus_filepath", "morphology_mip_filepath") if images.get(k)]
    candidates += list(MORPHOLOGY_CANDIDATES)
    for name in candidates:
        if (bundle_dir / name).is_file():
            return bundle_dir / name
    raise InputError(
        bundle_dir,
        "register.keypoints: auto",
        "a Xenium DAPI morphology image (" + ", ".join(MORPHOLOGY_CANDIDATES) + ") or register.morphology_image",
        "none found",
    )


def write_explorer_keypoints(
    path: str | Path, fixed_um: np.ndarray, moving_px: np.ndarray, pixel_size_um: float
) -> Path:
    """Keypoints as Xenium Explorer writes them (atomically): fixedX, fixedY in morphology px (µm / pixel
    size), alignmentX, alignmentY in H&E level-0 px; :func:`.explorer.read_explorer_keypoints` reads them back."""
    fixed_px = np.asarray(fixed_um, np.float64) / float(pixel_size_um)  # (n, 2) µm -> morphology px
    rows = ["fixedX,fixedY,alignmentX,alignmentY"]
    rows += [f"{a:.6f},{b:.6f},{c:.6f},{d:.6f}" for (a, b), (c, d) in zip(fixed_px, np.asarray(moving_px))]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return Path(path)


class MorphologyImage:
    """A Xenium morphology OME-TIFF (DAPI channel 0; a Z-stack is max-projected) read by pyramid level."""

    def __init__(self, path: str | Path, pixel_size_um: float):
        self.path = Path(path)
        self.pixel_size_um = float(pixel_size_um)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._axes = series.axes
            levels = series.levels
        except Exception as exc:  # tifffile raises several types for damaged files
            raise InputError(self.path, None, "a readable OME-TIFF", f"{type(exc).__name__}: {exc}") from exc
        if "Y" not in self._axes or "X" not in self._axes or "S" in self._axes:
            raise InputError(self.path, "axes", "a grey (one channel per plane) image with Y and X axes", self._axes)
        y, x = self._axes.index("Y"), self._axes.index("X")
        self.shapes = [(int(lv.shape[y]), int(lv.shape[x])) for lv in levels]
        self._arrays: dict[int, zarr.Array] = {}

    def close(self) -> None:
        self._tif.close()

    def downsample(self, level: int) -> float:
        return self.shapes[0][1] / self.shapes[level][1]

    def level_for(self, um_per_px: float) -> int:
        """The coarsest level whose pixels are not larger than ``um_per_px``."""
        best = 0
        for level in range(len(self.shapes)):
            if self.pixel_size_um * self.downsample(level) <= um_per_px * 1.0001:
                best = level
        return best

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """float32 (y1 - y0, x1 - x0) of channel 0; Z planes max-projected."""
        if level not in self._arrays:
            self._arrays[level] = zarr.open(self._tif.aszarr(series=0, level=level), mode="r")
        index = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == "Z" else 0
            for a in self._axes
        )
        try:
            block = np.asarray(self._arrays[level][index], dtype=np.float32)
        except Exception as exc:
            raise InputError(
                self.path, f"level {level}", "decodable image tiles", f"{type(exc).__name__}: {exc}"
            ) from exc
        if block.ndim == 3:  # Z, Y, X
            block = block.max(axis=0)
        return block


# --------------------------------------------------------------------------------------------
# Resampling into a grid whose pixels have a known position (Xenium µm or H&E px)
# --------------------------------------------------------------------------------------------


def _sample(read, level_shape, grid_to_level: np.ndarray, shape_hw: tuple[int, int], cval: float) -> np.ndarray:
    """Bilinear samples of a level at grid pixels; ``grid_to_level`` maps grid (x, y) -> level index (x, y)."""
    h, w = shape_hw
    corners = apply_transform(grid_to_level, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
    step = float(np.sqrt(abs(np.linalg.det(grid_to_level[:2, :2]))))  # level px per grid px
    pad = 3 + int(np.ceil(2 * step))
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - pad
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + pad + 1
    lh, lw = level_shape
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
    if xa >= xb or ya >= yb:
        return np.full(shape_hw, cval, np.float32)
    block = read(ya, yb, xa, xb)
    if step > 1.5:  # anti-aliasing before taking every step-th pixel
        block = ndi.gaussian_filter(block, 0.4 * step)
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    xy = apply_transform(grid_to_level, np.stack([cols.ravel(), rows.ravel()], axis=1))
    coords = np.stack([xy[:, 1] - ya, xy[:, 0] - xa])
    out = ndi.map_coordinates(block, coords, order=1, mode="constant", cval=cval)
    return out.reshape(h, w).astype(np.float32)


def sample_dapi(image: MorphologyImage, grid_to_um: np.ndarray, shape_hw, um_per_px: float, cval: float) -> np.ndarray:
    """DAPI at grid pixels placed in Xenium µm by ``grid_to_um`` (µm per grid px ``um_per_px``)."""
    level = image.level_for(um_per_px)
    size = image.pixel_size_um * image.downsample(level)  # µm per level px
    um_to_level = np.array([[1 / size, 0, -0.5], [0, 1 / size, -0.5], [0, 0, 1]])  # centre of px j at (j+.5)·size
    return _sample(lambda *box: image.read(level, *box), image.shapes[level], um_to_level @ grid_to_um, shape_hw, cval)


def sample_hematoxylin(slide: Slide, grid_to_he_px: np.ndarray, shape_hw, he_px_per_grid_px: float) -> np.ndarray:
    """Hematoxylin optical density (rgb2hed channel 0) at grid pixels placed in H&E level-0 px."""
    level = slide.best_level(max(he_px_per_grid_px, 1.0))
    d = slide.downsample(level)
    to_level = np.array([[1 / d, 0, 0.5 / d - 0.5], [0, 1 / d, 0.5 / d - 0.5], [0, 0, 1]])

    def read(y0, y1, x0, x1):
        rgb = slide.read_region(x0, y0, x1 - x0, y1 - y0, level=level)
        return np.maximum(rgb2hed(rgb)[..., 0], 0).astype(np.float32)

    return _sample(read, slide.levels[level], to_level @ grid_to_he_px, shape_hw, 0.0)


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], float)


def _scale(s: float) -> np.ndarray:
    return np.diag([s, s, 1.0])


def _rotate(deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# --------------------------------------------------------------------------------------------
# Coarse global search
# --------------------------------------------------------------------------------------------


class _MaskedNCC:
    """Masked normalised cross-correlation of templates against one image (Padfield 2012), via FFTs.

    ``score(template, mask)`` -> (ncc, overlap) over every placement of the template's top-left
    corner at image (y, x) = index - (template side - 1); the image's FFTs are computed once.
    """

    def __init__(self, image: np.ndarray, max_template_hw: tuple[int, int]):
        self.hw = image.shape
        self.full = (image.shape[0] + max_template_hw[0] - 1, image.shape[1] + max_template_hw[1] - 1)
        self.fft_shape = tuple(sfft.next_fast_len(n, real=True) for n in self.full)
        f = ((image - image.mean()) / (image.std() + 1e-12)).astype(np.float32)  # float32 FFTs: twice as fast
        ones = np.ones_like(f)
        self._F = [sfft.rfft2(a, self.fft_shape, workers=-1) for a in (f, f * f, ones)]

    def score(self, template: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.where(mask, template, 0.0)
        valid = g[mask]
        g = np.where(mask, (g - valid.mean()) / (valid.std() + 1e-12), 0.0).astype(np.float32)
        flipped = [sfft.rfft2(a[::-1, ::-1], self.fft_shape, workers=-1) for a in (g, g * g, mask.astype(np.float32))]
        h, w = template.shape
        out_hw = (self.hw[0] + h - 1, self.hw[1] + w - 1)

        def corr(a, b):
            return sfft.irfft2(a * b, self.fft_shape, workers=-1)[: out_hw[0], : out_hw[1]].astype(np.float64)

        Ff, Fff, F1 = self._F
        Gg, Ggg, Gm = flipped
        n = np.maximum(corr(F1, Gm), 1.0)
        sf, sff = corr(Ff, Gm), corr(Fff, Gm)
        sg, sgg, sfg = corr(F1, Gg), corr(F1, Ggg), corr(Ff, Gg)
        num = sfg - sf * sg / n
        den = np.sqrt(np.maximum(sff - sf * sf / n, 0) * np.maximum(sgg - sg * sg / n, 0))
        ncc = np.where(den > 1e-6 * n, num / np.maximum(den, 1e-12), 0.0)
        return ncc, n


def _peak_subpixel(values: np.ndarray) -> tuple[float, float, float]:
    """(y, x, value) of the maximum, refined by a parabola through its neighbours on each axis."""
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    best = float(values[y, x])

    def vertex(a, b, c):
        denom = a - 2 * b + c
        return 0.0 if denom >= 0 else float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))

    dy = vertex(values[y - 1, x], best, values[y + 1, x]) if 0 < y < values.shape[0] - 1 else 0.0
    dx = vertex(values[y, x - 1], best, values[y, x + 1]) if 0 < x < values.shape[1] - 1 else 0.0
    return y + dy, x + dx, best


def ncc_valid(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation at every placement of ``template`` inside ``image``, (H - h + 1, W - w + 1).

    What ``skimage.feature.match_template`` computes, with an FFT of the image's size (a circular
    correlation does not wrap into the valid placements) and window sums from integral images.
    """
    image = image.astype(np.float64)
    h, w = template.shape
    t = template.astype(np.float64) - template.mean()
    shape = tuple(sfft.next_fast_len(n, real=True) for n in image.shape)
    corr = sfft.irfft2(sfft.rfft2(image, shape) * sfft.rfft2(t[::-1, ::-1], shape), shape)
    num = corr[h - 1 : image.shape[0], w - 1 : image.shape[1]]

    def window_sums(a: np.ndarray) -> np.ndarray:
        c = np.pad(a.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
        return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]

    s1, s2 = window_sums(image), window_sums(image * image)
    var = np.maximum(s2 - s1 * s1 / (h * w), 0.0)
    den = np.sqrt(var) * np.sqrt((t * t).sum())
    return np.where(den > 1e-12, num / np.maximum(den, 1e-12), 0.0)


def _tissue_mask(dapi: np.ndarray) -> np.ndarray:
    """DAPI tissue at coarse resolution: smoothed log intensity above Otsu's threshold."""
    log_dapi = np.log1p(np.maximum(ndi.gaussian_filter(dapi, 1.0), 0))
    if np.ptp(log_dapi) < 1e-6:
        return np.zeros(dapi.shape, bool)
    return ndi.binary_opening(log_dapi > threshold_otsu(log_dapi), iterations=1)


@dataclass
class Coarse:
    """The coarse search's answer."""

    um_to_he_px: np.ndarray  # (3, 3) Xenium µm -> H&E level-0 px (a reflection when mirrored)
    mirrored: bool
    rotation_deg: float
    correlation: float
    correlation_other_hand: float
    tissue_um: np.ndarray  # (k, 2) µm of the coarse DAPI tissue pixels (tile placement)
    coarse_um_per_px: float


class _CoarseLevel:
    """The cropped DAPI tissue and the whole hematoxylin image at one coarse µm/px, ready for placements."""

    def __init__(self, image: MorphologyImage, slide: Slide, lo_um: np.ndarray, hi_um: np.ndarray, um_per_px: float):
        r0 = um_per_px
        self.shape = tuple(int(np.ceil(v)) for v in ((hi_um - lo_um) / r0)[::-1])
        self.q_to_um = _translate(*lo_um) @ _scale(r0) @ _translate(0.5, 0.5)  # cropped coarse DAPI px -> µm
        dapi = sample_dapi(image, self.q_to_um, self.shape, r0, 0.0)
        self.tissue = _tissue_mask(dapi)
        background = float(np.percentile(dapi, 5))
        self.dapi = np.log1p(np.maximum(dapi - background, 0))
        s = r0 / slide.um_per_px  # level-0 px per coarse H&E px
        # centre of coarse px c at level-0 index (c + 0.5)·s - 0.5
        self.hc_to_he = _translate(-0.5, -0.5) @ _scale(s) @ _translate(0.5, 0.5)
        he_shape = tuple(int(np.ceil(n / s)) for n in slide.shape)
        hema = ndi.gaussian_filter(sample_hematoxylin(slide, self.hc_to_he, he_shape, s), 0.5)
        diag = int(np.ceil(np.hypot(*self.shape))) + 2
        self.ncc = _MaskedNCC(hema, (diag, diag))
        self.centre_q = (np.array(self.shape[::-1], float) - 1) / 2

    def placement(self, mirror: bool, angle: float) -> tuple[float, np.ndarray]:
        """(score, µm -> H&E px) of the best offset for this rotation (about the crop's centre)."""
        h, w = self.shape
        q_to_rot = _rotate(angle) @ (MIRROR_X if mirror else np.eye(3)) @ _translate(*-self.centre_q)
        corners = apply_transform(q_to_rot, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
        q_to_t = _translate(*-np.floor(corners.min(axis=0))) @ q_to_rot
        t_hw = tuple(int(v) for v in np.ceil(corners.max(axis=0) - np.floor(corners.min(axis=0)))[::-1] + 1)
        inverse = ProjectiveTransform(matrix=np.linalg.inv(q_to_t))
        template = warp(self.dapi, inverse, output_shape=t_hw, order=1, cval=0.0, preserve_range=True)
        mask = warp(np.ones(self.shape), inverse, output_shape=t_hw, order=0, cval=0.0, preserve_range=True) > 0.5
        scores, overlap = self.ncc.score(template, mask)
        scores = np.where(overlap >= MIN_OVERLAP * mask.sum(), scores, -1.0)
        y, x, best = _peak_subpixel(scores)
        offset = np.array([x - (t_hw[1] - 1), y - (t_hw[0] - 1)])  # template top-left on the coarse H&E
        return best, self.hc_to_he @ _translate(*offset) @ q_to_t @ np.linalg.inv(self.q_to_um)


def coarse_search(image: MorphologyImage, slide: Slide) -> Coarse:
    """Place the whole DAPI tissue on the H&E: every angle, both handedness, masked NCC.

    The angle sweep runs at twice the coarse µm/px; the best angle of each handedness is refined at
    the coarse µm/px (a parabola through the best score and its neighbours).
    """
    p = image.pixel_size_um
    extent_um = np.array(image.shapes[0][::-1], float) * p  # (width, height) µm
    # A first look at 4× the final coarse size finds the tissue; the coarse resolution is set from it.
    look = max(COARSE_MIN_UM_PER_PX, extent_um.max() / (4 * COARSE_MAX_SIDE_PX))
    shape = tuple(int(np.ceil(e / look)) for e in extent_um[::-1])
    overview = sample_dapi(image, _scale(look) @ _translate(0.5, 0.5), shape, look, 0.0)
    tissue = _tissue_mask(overview)
    if not tissue.any():
        raise RegistrationError(image.path, "pixels", "a DAPI image with nuclei", "no tissue above the background")
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    lo_um = np.array([cols[0], rows[0]], float) * look
    hi_um = np.array([cols[-1] + 1, rows[-1] + 1], float) * look
    r0 = max(COARSE_MIN_UM_PER_PX, float((hi_um - lo_um).max()) / COARSE_MAX_SIDE_PX)
    lo_um, hi_um = lo_um - 3 * r0, hi_um + 3 * r0
    sweep = _CoarseLevel(image, slide, lo_um, hi_um, 2 * r0)
    level = _CoarseLevel(image, slide, lo_um, hi_um, r0)
    tissue_um = apply_transform(level.q_to_um, np.argwhere(level.tissue)[:, ::-1].astype(float))

    answers = {}
    angles = np.arange(0.0, 360.0, COARSE_STEP_DEG)
    for mirror in (False, True):
        scores = [sweep.placement(mirror, a)[0] for a in angles]
        best = float(angles[int(np.argmax(scores))])
        step = COARSE_STEP_DEG / 4
        fine = best + np.arange(-COARSE_STEP_DEG, COARSE_STEP_DEG + 1e-9, step)
        fine_scores = [level.placement(mirror, a)[0] for a in fine]
        i = int(np.argmax(fine_scores))
        angle = float(fine[i])
        if 0 < i < len(fine) - 1:
            a, b, c = fine_scores[i - 1 : i + 2]
            if a - 2 * b + c < 0:
                angle += float(np.clip(0.5 * (a - c) / (a - 2 * b + c), -0.5, 0.5)) * step
        score, matrix = level.placement(mirror, angle)
        answers[mirror] = (max(score, max(fine_scores)), matrix, angle)
    mirrored = answers[True][0] > answers[False][0]
    score, matrix, angle = answers[mirrored]
    return Coarse(matrix, mirrored, angle % 360.0, score, answers[not mirrored][0], tissue_um, r0)


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


def tile_centres(tissue_um: np.ndarray, tile_um: float, max_tiles: int, coarse_um: float) -> np.ndarray:
    """(k, 2) µm: centres of a square grid over the tissue, at most ``max_tiles`` of them, each
    with at least :data:`TILE_MIN_TISSUE` of its area on tissue."""
    if len(tissue_um) == 0:
        return np.zeros((0, 2))
    area = len(tissue_um) * coarse_um**2
    spacing = max(np.sqrt(area / max_tiles), tile_um / 2)
    lo, hi = tissue_um.min(axis=0), tissue_um.max(axis=0)
    index = np.floor((tissue_um - lo) / coarse_um).astype(int)
    occupied = np.zeros(index.max(axis=0) + 1, bool)
    occupied[index[:, 0], index[:, 1]] = True
    coverage = ndi.uniform_filter(occupied.astype(float), size=max(int(round(tile_um / coarse_um)), 1))
    while True:
        xs = np.arange(lo[0] + spacing / 2, hi[0] + 1e-9, spacing)
        ys = np.arange(lo[1] + spacing / 2, hi[1] + 1e-9, spacing)
        grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        cell = np.clip(np.floor((grid - lo) / coarse_um).astype(int), 0, np.array(occupied.shape) - 1)
        grid = grid[coverage[cell[:, 0], cell[:, 1]] >= TILE_MIN_TISSUE]
        if len(grid) <= max_tiles:
            return grid
        spacing *= 1.1


def local_affine(matrix: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """``matrix`` followed by a translation in H&E px."""
    return _translate(*shift_px) @ matrix


def match_tiles(
    image: MorphologyImage,
    slide: Slide,
    centres_um: np.ndarray,
    maps: list[np.ndarray],
    tile_um: float,
    margin_um: float,
    um_per_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match a DAPI tile at each centre against the hematoxylin image warped by that tile's map.

    ``maps[i]`` (3, 3) µm -> H&E px is the current estimate near centre i. Returns (fixed_um (k, 2),
    moving_px (k, 2), correlation (k,)): the tile centre and where the H&E shows it.
    """
    n = int(round(tile_um / um_per_px))
    m = int(round(margin_um / um_per_px))
    half = (n - 1) / 2
    he_px_per_px = um_per_px / slide.um_per_px
    background = 0.0
    fixed, moving, corr = [], [], []
    for centre, matrix in zip(centres_um, maps):
        t_to_um = _translate(*centre) @ _scale(um_per_px) @ _translate(-half, -half)
        s_to_um = t_to_um @ _translate(-m, -m)
        template = sample_dapi(image, t_to_um, (n, n), um_per_px, background)
        search = sample_hematoxylin(slide, matrix @ s_to_um, (n + 2 * m, n + 2 * m), he_px_per_px)
        template = ndi.gaussian_filter(template, 1.0)
        search = ndi.gaussian_filter(search, 1.0)
        if template.std() < 1e-3 * max(float(template.mean()), 1.0) or search.std() < 1e-6:
            continue
        scores = ncc_valid(search, template)  # (2m + 1, 2m + 1): template top-left at (y, x)
        y, x, best = _peak_subpixel(scores)
        shift_um = np.array([x - m, y - m]) * um_per_px
        fixed.append(centre)
        moving.append(apply_transform(matrix, centre + shift_um)[0])
        corr.append(best)
    if not fixed:
        return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)
    return np.array(fixed), np.array(moving), np.array(corr)


# --------------------------------------------------------------------------------------------
# Robust fit
# --------------------------------------------------------------------------------------------


def _proper(fixed_um: np.ndarray, mirrored: bool) -> np.ndarray:
    """Fixed points in the frame where the map is a proper similarity (x flipped when mirrored)."""
    return apply_transform(MIRROR_X, fixed_um) if mirrored else fixed_um


def ransac_similarity(
    fixed_um: np.ndarray, moving_px: np.ndarray, mirrored: bool, he_um_per_px: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(µm -> H&E px (3, 3), inlier mask) of a RANSAC similarity (inlier bound :data:`RANSAC_UM`)."""
    src = _proper(fixed_um, mirrored)
    if len(src) < 3:
        return np.eye(3), np.zeros(len(src), bool)
    model, inliers = ransac(
        (src, moving_px),
        SimilarityTransform,
        min_samples=3,
        residual_threshold=RANSAC_UM / he_um_per_px,
        max_trials=500,
        rng=seed,
    )
    if model is None or inliers is None or inliers.sum() < 3:
        return np.eye(3), np.zeros(len(src), bool)
    matrix = fit_transform(src[inliers], moving_px[inliers], scale=True)
    return (matrix @ MIRROR_X if mirrored else matrix), inliers


def local_consistency(fixed_um: np.ndarray, moving_px: np.ndarray, mirrored: bool, he_um_per_px: float) -> np.ndarray:
    """bool (k,): pairs within :data:`LOCAL_MAX_UM` of a similarity fitted to their nearest neighbours."""
    src = _proper(fixed_um, mirrored)
    k = len(src)
    keep = np.ones(k, bool)
    if k < LOCAL_NEIGHBOURS + 1:
        return keep
    d2 = ((src[:, None] - src[None]) ** 2).sum(axis=2)
    errors = np.zeros(k)
    for i in range(k):
        near = np.argsort(d2[i])[1 : LOCAL_NEIGHBOURS + 1]
        try:
            matrix = fit_transform(src[near], moving_px[near], scale=True)
        except InputError:
            continue
        errors[i] = np.linalg.norm(apply_transform(matrix, src[i : i + 1])[0] - moving_px[i]) * he_um_per_px
    # A wrong pair also spoils its neighbours' fits: drop the worst first, then re-judge the rest.
    while keep.sum() > LOCAL_NEIGHBOURS and errors[keep].max() > LOCAL_MAX_UM:
        worst = np.flatnonzero(keep)[np.argmax(errors[keep])]
        keep[worst] = False
        idx = np.flatnonzero(keep)
        for i in idx:
            near = idx[np.argsort(d2[i, idx])[1 : LOCAL_NEIGHBOURS + 1]]
            try:
                matrix = fit_transform(src[near], moving_px[near], scale=True)
            except InputError:
                continue
            errors[i] = np.linalg.norm(apply_transform(matrix, src[i : i + 1])[0] - moving_px[i]) * he_um_per_px
    return keep


def _shift_field(fixed_um: np.ndarray, residual_px: np.ndarray, sigma_um: float):
    """Gaussian-weighted mean of residuals (H&E px) at any µm position: the local deformation estimate."""

    def at(xy_um: np.ndarray) -> np.ndarray:
        if len(fixed_um) == 0:
            return np.zeros((len(xy_um), 2))
        d2 = ((xy_um[:, None] - fixed_um[None]) ** 2).sum(axis=2)
        w = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / (2 * sigma_um**2))
        return (w[:, :, None] * residual_px[None]).sum(axis=1) / w.sum(axis=1, keepdims=True)

    return at


# --------------------------------------------------------------------------------------------
# The route
# --------------------------------------------------------------------------------------------


def find_keypoints(
    morphology_path: str | Path,
    slide: Slide,
    pixel_size_um: float,
    *,
    max_keypoints: int = 100,
    min_keypoints: int = 8,
    min_correlation: float = 0.3,
    max_um_per_px_error: float | None = 0.15,
    seed: int = 0,
) -> AutoKeypoints:
    """Keypoint pairs (Xenium µm -> H&E level-0 px) between a bundle's DAPI image and its H&E.

    Raises :class:`~.fit.RegistrationError` naming both files when the images do not match: the
    fitted H&E µm/px off the slide's by more than ``max_um_per_px_error``, or fewer than
    ``min_keypoints`` tiles matching with a correlation of at least ``min_correlation``.
    """
    started = time.perf_counter()
    timings = {}
    image = MorphologyImage(morphology_path, pixel_size_um)
    both = f"{image.path} and {slide.path}"
    try:
        coarse = coarse_search(image, slide)
        timings["coarse"] = time.perf_counter() - started
        log.info(
            "auto keypoints: coarse placement at %.4g µm/px: rotation %.2f°, %s, correlation %.3f (other hand %.3f)",
            coarse.coarse_um_per_px,
            coarse.rotation_deg,
            "mirrored" if coarse.mirrored else "not mirrored",
            coarse.correlation,
            coarse.correlation_other_hand,
        )
        mirrored = coarse.mirrored
        # Pass 1: large tiles at 2 µm/px, searched as far as the coarse angle and offset can be off.
        extent = float(np.ptp(coarse.tissue_um, axis=0).max()) if len(coarse.tissue_um) else 0.0
        margin1 = 2 * coarse.coarse_um_per_px + 0.01 * extent + 10.0
        res1 = max(PASS1_UM_PER_PX, slide.um_per_px, pixel_size_um)
        centres1 = tile_centres(coarse.tissue_um, PASS1_TILE_UM, PASS1_MAX_TILES, coarse.coarse_um_per_px)
        f1, m1, c1 = match_tiles(
            image, slide, centres1, [coarse.um_to_he_px] * len(centres1), PASS1_TILE_UM, margin1, res1
        )
        good = c1 >= min_correlation
        global_map, inliers = ransac_similarity(f1[good], m1[good], mirrored, slide.um_per_px, seed)
        timings["pass1"] = time.perf_counter() - started - timings["coarse"]
        if inliers.sum() < 3:
            raise RegistrationError(
                both,
                "automatic keypoints",
                f"DAPI and H&E tiles that match (correlation >= {min_correlation:g}, consistent placement)",
                f"{int(inliers.sum())} of {len(centres1)} large tiles consistent (correlations "
                f"{_summary(c1)}; best coarse placement correlation {coarse.correlation:.2f}): "
                "is the DAPI image of this section, and the slide's µm/px right?",
            )
        fitted_um_per_px = 1.0 / linear_scale(global_map)
        if max_um_per_px_error is not None and abs(fitted_um_per_px / slide.um_per_px - 1) > max_um_per_px_error:
            raise RegistrationError(
                both,
                "automatic keypoints",
                f"a fitted H&E µm/px within ±{max_um_per_px_error:.0%} of the slide's metadata ({slide.um_per_px:.4g})",
                f"{fitted_um_per_px:.4g} µm/px from {int(inliers.sum())} matching tiles: an implausible scale, "
                "is the slide's or the DAPI image's µm/px wrong (register.he_um_per_px, register.xenium_pixel_size_um)?",
            )
        # Pass 2: small tiles at about the H&E's µm/px, each from the map plus the local shift pass 1 saw.
        f1, m1 = f1[good][inliers], m1[good][inliers]
        residual1 = m1 - apply_transform(global_map, f1)
        shift = _shift_field(f1, residual1, sigma_um=PASS1_TILE_UM)
        res2 = max(PASS2_UM_PER_PX, slide.um_per_px, 2 * pixel_size_um)
        centres2 = tile_centres(coarse.tissue_um, PASS2_TILE_UM, max_keypoints, coarse.coarse_um_per_px)
        local_shift = shift(centres2)
        maps2 = [local_affine(global_map, s) for s in local_shift]
        f2, m2, c2 = match_tiles(image, slide, centres2, maps2, PASS2_TILE_UM, PASS2_MARGIN_UM, res2)
        good2 = c2 >= min_correlation
        _, inliers2 = ransac_similarity(f2[good2], m2[good2], mirrored, slide.um_per_px, seed)
        f2, m2 = f2[good2][inliers2], m2[good2][inliers2]
        keep = local_consistency(f2, m2, mirrored, slide.um_per_px)
        f2, m2 = f2[keep], m2[keep]
        timings["pass2"] = time.perf_counter() - started - timings["coarse"] - timings["pass1"]
        if len(f2) < min_keypoints:
            raise RegistrationError(
                both,
                "automatic keypoints",
                f"at least {min_keypoints} DAPI/H&E tiles that match (correlation >= {min_correlation:g}, "
                "consistent with their neighbours)",
                f"{len(f2)} of {len(centres2)} tiles (correlations {_summary(c2)}): is the DAPI image of this section, "
                "and are both images' µm/px right (register.he_um_per_px, register.xenium_pixel_size_um)?",
            )
        result = AutoKeypoints(
            fixed_um=f2,
            moving_px=m2,
            mirrored=mirrored,
            rotation_deg=float(np.rad2deg(np.arctan2(global_map[1, 0], global_map[0, 0]))),
            he_um_per_px_fitted=fitted_um_per_px,
            coarse_correlation=coarse.correlation,
            coarse_correlation_other_hand=coarse.correlation_other_hand,
            n_tiles=int(len(c2)),
            n_matched=int(good2.sum()),
            n_kept=int(len(f2)),
            median_tile_correlation=float(np.median(c2)) if len(c2) else float("nan"),
            seconds=time.perf_counter() - started,
            morphology_image=str(image.path),
            he_slide=str(slide.path),
            timings_s=timings,
        )
    finally:
        image.close()
    log.info(
        "auto keypoints: %d pairs from %d tiles (%d matched) in %.1f s; %s",
        result.n_kept,
        result.n_tiles,
        result.n_matched,
        result.seconds,
        "H&E mirrored" if mirrored else "H&E not mirrored",
    )
    return result


def _summary(values: np.ndarray) -> str:
    if len(values) == 0:
        return "none measured"
    q = np.percentile(values, [10, 50, 90])
    return f"p10 {q[0]:.2f}, median {q[1]:.2f}, p90 {q[2]:.2f}"
