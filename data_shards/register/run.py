"""The registration step of a bundle: fit (or import), check, report and save; ``make_shards.py register``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_json
from common.config import apply_schema, save_config
from common.errors import InputError

from ..schema import RegisterConfig
from ..slide import Slide
from ..xenium import EXPERIMENT_FILE, read_centroids_um, read_experiment
from .auto import (
    AUTO,
    AUTO_KEYPOINTS_FILE,
    AutoKeypoints,
    find_keypoints,
    find_morphology_image,
    write_explorer_keypoints,
)
from .checks import check_on_tissue, check_um_per_px, on_tissue_fraction, similarity_um_per_px
from .explorer import KEYPOINT_FIXED_UNITS, XENIUM_PIXEL_SIZE_UM, read_explorer_alignment, read_explorer_keypoints
from .fit import MIRROR_X, RegistrationError, apply_transform
from .identity import bundle_identity
from .registration import Registration, check_report
from .report import format_table, write_overlay

log = logging.getLogger(__name__)


def read_cell_centroids_um(bundle_dir: str | Path) -> np.ndarray:
    """(n_cells, 2) finite x_centroid, y_centroid in µm from the bundle's cells table.

    Read by :func:`data_shards.xenium.read_centroids_um`, the one reader of the cells table
    (cells.parquet, else cells.csv.gz / cells.csv), so a damaged file gives the same error here
    as in ``read_xenium``.
    """
    xy = read_centroids_um(bundle_dir)
    return xy[np.isfinite(xy).all(axis=1)]


def xenium_pixel_size_um(bundle_dir: Path, configured: float | None) -> float:
    """Morphology-image µm/px: the config's, else experiment.xenium's ``pixel_size``, else Xenium's 0.2125."""
    if configured is not None:
        if not np.isfinite(configured) or configured <= 0:
            raise InputError(None, "register.xenium_pixel_size_um", "a positive µm/px or null", configured)
        return float(configured)
    if (bundle_dir / EXPERIMENT_FILE).is_file():
        return float(read_experiment(bundle_dir)["pixel_size"])
    log.info("%s has no %s: morphology pixel size %.4g µm", bundle_dir, EXPERIMENT_FILE, XENIUM_PIXEL_SIZE_UM)
    return XENIUM_PIXEL_SIZE_UM


def register_bundle(bundle_dir: str | Path, out_dir: str | Path, cfg: Any = None) -> dict:
    """Fit, check, report and save the registration of one bundle; returns the quality report.

    Writes ``registration.json`` (load with ``Registration.from_json``; it records the bundle's
    identity), ``registration_report.json``, ``registration_overlay.png`` and ``register_config.yaml``
    into ``out_dir``. Raises InputError / RegistrationError before writing anything when inputs are
    bad or the registration is probably wrong: keypoint errors above ``max_rms_um`` / ``max_loo_um``,
    a fitted H&E µm/px off the slide's metadata by more than ``max_um_per_px_error`` (keypoints in
    the wrong unit, swapped columns), fewer than ``min_on_tissue_fraction`` of the mapped cells on
    tissue (keypoints or matrix from another slide).

    ``keypoints: auto`` finds the keypoints between the bundle's DAPI morphology image and the H&E
    (:mod:`.auto`), refuses images that do not match and a mirrored H&E that ``he_mirrored`` does not
    declare, writes them as ``auto_keypoints.csv`` (Explorer's format) and fits them as hand-picked ones.
    """
    cfg = apply_schema(RegisterConfig, cfg)
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if cfg.keypoints_fixed_unit not in KEYPOINT_FIXED_UNITS:
        raise InputError(
            None,
            "register.keypoints_fixed_unit",
            " or ".join(repr(u) for u in KEYPOINT_FIXED_UNITS),
            cfg.keypoints_fixed_unit,
        )
    auto_route = cfg.keypoints == AUTO
    keypoints_path = (
        out_dir / AUTO_KEYPOINTS_FILE if auto_route else bundle_dir / cfg.keypoints if cfg.keypoints else None
    )
    morphology_path = find_morphology_image(bundle_dir, cfg.morphology_image) if auto_route else None
    alignment_path = bundle_dir / cfg.alignment if cfg.alignment else None
    pixel_size_um = xenium_pixel_size_um(bundle_dir, cfg.xenium_pixel_size_um)

    with Slide(bundle_dir / cfg.he_slide, um_per_px=cfg.he_um_per_px) as slide:
        fixed = moving = None
        fits: dict[str, tuple[float, Path]] = {}  # kind -> (fitted H&E µm/px, file)
        auto = None
        if auto_route:
            auto = find_auto_keypoints(morphology_path, slide, pixel_size_um, cfg)
            fixed, moving = auto.fixed_um, auto.moving_px
        elif keypoints_path is not None and (alignment_path is None or keypoints_path.is_file()):
            fixed, moving = read_explorer_keypoints(keypoints_path, pixel_size_um, cfg.keypoints_fixed_unit)
        if fixed is not None:
            proper = apply_transform(MIRROR_X, fixed) if cfg.he_mirrored else fixed
            fits["keypoints"] = (similarity_um_per_px(proper, moving, keypoints_path), keypoints_path)
        if alignment_path is not None:
            registration = Registration.from_alignment(
                read_explorer_alignment(alignment_path),
                pixel_size_um,
                fixed_um=fixed,
                moving_px=moving,
                source=alignment_path,
            )
            fits["alignment"] = (registration.he_um_per_px, alignment_path)
        else:
            if fixed is None:
                raise InputError(None, "keypoints", "a keypoints CSV path or an alignment CSV path in the config", None)
            registration = Registration.from_keypoints(
                fixed,
                moving,
                regions=int(cfg.n_regions),
                blend=bool(cfg.blend),
                blend_sigma_um=cfg.blend_sigma_um,
                scale=bool(cfg.scale),
                he_um_per_px=slide.um_per_px,
                min_points_per_region=int(cfg.min_points_per_region),
                source=keypoints_path,
                random_state=int(cfg.random_state),
                mirror_x=bool(cfg.he_mirrored),
            )
        # Units first: a wrong unit also inflates the RMS, but the µm/px ratio says which file and why.
        check_um_per_px(
            fits,
            slide.um_per_px,
            cfg.max_um_per_px_error,
            slide_path=bundle_dir / cfg.he_slide,
            pixel_size_um=pixel_size_um,
            fixed_unit=cfg.keypoints_fixed_unit,
        )
        report = registration.report(slide_um_per_px=slide.um_per_px)
        check_report(report, cfg.max_rms_um, cfg.max_loo_um, registration.source)
        cells_um = read_cell_centroids_um(bundle_dir)
        fraction, tissue_share = on_tissue_fraction(registration, slide, cells_um, cfg.tissue_thumbnail_px)
        check_on_tissue(
            fraction,
            tissue_share,
            cfg.min_on_tissue_fraction,
            cfg.min_on_tissue_excess,
            len(cells_um),
            registration.source,
        )
        report["xenium_pixel_size_um"] = pixel_size_um
        report["he_um_per_px_keypoints"] = fits["keypoints"][0] if "keypoints" in fits else None
        report["he_um_per_px_alignment"] = fits["alignment"][0] if "alignment" in fits else None
        report["on_tissue_fraction"] = fraction
        report["tissue_share_of_slide"] = tissue_share
        report["he_mirrored"] = bool(cfg.he_mirrored)
        report["auto_keypoints"] = auto.to_report() if auto is not None else None
        inputs = {"morphology_image": morphology_path} if auto_route else {"keypoints": keypoints_path}
        registration.identity = bundle_identity(bundle_dir, {**inputs, "alignment": alignment_path})
        table = format_table(report)
        print(table)
        log.info(
            "registration of %s: RMS %.3f µm over %d keypoints, %d region(s), %.1f %% of cells on tissue",
            bundle_dir,
            report["overall"]["rms_um"] or float("nan"),
            report["overall"]["n_keypoints"],
            registration.n_regions,
            100.0 * fraction,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        if auto is not None:
            write_explorer_keypoints(keypoints_path, fixed, moving, pixel_size_um)
        write_overlay(out_dir / "registration_overlay.png", registration, slide, cells_um, report)
    registration.to_json(out_dir / "registration.json")
    write_json(out_dir / "registration_report.json", report)
    save_config(cfg, out_dir / "register_config.yaml")
    return report


def find_auto_keypoints(morphology_path: Path, slide: Slide, pixel_size_um: float, cfg: Any) -> AutoKeypoints:
    """:func:`.auto.find_keypoints` with the config's settings; refuses a handedness ``he_mirrored`` does not state."""
    auto = find_keypoints(
        morphology_path,
        slide,
        pixel_size_um,
        max_keypoints=int(cfg.auto_max_keypoints),
        min_keypoints=int(cfg.auto_min_keypoints),
        min_correlation=float(cfg.auto_min_correlation),
        max_um_per_px_error=cfg.max_um_per_px_error,
        seed=int(cfg.random_state),
    )
    if auto.mirrored != bool(cfg.he_mirrored):
        scores = (
            f"best placement correlation {auto.coarse_correlation:.2f} "
            f"{'mirrored' if auto.mirrored else 'as is'} vs {auto.coarse_correlation_other_hand:.2f} "
            f"{'as is' if auto.mirrored else 'mirrored'}"
        )
        if auto.mirrored:
            found = (
                f"the H&E is the mirror image of the DAPI image ({scores}): scanned face down or flipped on "
                "export? set register.he_mirrored=true to register it mirrored"
            )
        else:
            found = f"the H&E is not mirrored ({scores}) but register.he_mirrored is true: set it to false"
        raise RegistrationError(
            f"{morphology_path} and {slide.path}",
            "register.he_mirrored",
            f"the handedness register.he_mirrored states ({bool(cfg.he_mirrored)})",
            found,
        )
    return auto
