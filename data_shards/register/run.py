"""The registration step of a bundle: fit (or import), check, report and save; ``make_shards.py register``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from common.atomic import write_json
from common.config import apply_schema, save_config
from common.errors import InputError

from ..schema import RegisterConfig
from ..slide import Slide
from .explorer import read_explorer_alignment, read_explorer_keypoints
from .registration import Registration, check_report
from .report import format_table, write_overlay

log = logging.getLogger(__name__)


def _read_cell_centroids_um(bundle_dir: Path) -> np.ndarray:
    """(n_cells, 2) x_centroid, y_centroid in µm from cells.parquet."""
    path = bundle_dir / "cells.parquet"
    if not path.is_file():
        raise InputError(path, None, "an existing cells.parquet", "no such file")
    columns = pq.read_schema(path).names
    missing = [c for c in ("x_centroid", "y_centroid") if c not in columns]
    if missing:
        raise InputError(
            path, "columns", "x_centroid, y_centroid", f"missing {','.join(missing)}; found {','.join(columns)}"
        )
    table = pq.read_table(path, columns=["x_centroid", "y_centroid"])
    xy = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in ("x_centroid", "y_centroid")])
    return xy[np.isfinite(xy).all(axis=1)]


def register_bundle(bundle_dir: str | Path, out_dir: str | Path, cfg: Any = None) -> dict:
    """Fit, check, report and save the registration of one bundle; returns the quality report.

    Writes ``registration.json`` (load with ``Registration.from_json``), ``registration_report.json``,
    ``registration_overlay.png`` and ``register_config.yaml`` into ``out_dir``. Raises
    InputError / RegistrationError before writing anything when inputs or accuracy are bad.
    """
    cfg = apply_schema(RegisterConfig, cfg)
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    keypoints_path = bundle_dir / cfg.keypoints if cfg.keypoints else None

    with Slide(bundle_dir / cfg.he_slide, um_per_px=cfg.he_um_per_px) as slide:
        if cfg.alignment:
            alignment_path = bundle_dir / cfg.alignment
            fixed = moving = None
            if keypoints_path is not None and keypoints_path.is_file():
                fixed, moving = read_explorer_keypoints(keypoints_path)
            registration = Registration.from_alignment(
                read_explorer_alignment(alignment_path),
                cfg.xenium_pixel_size_um,
                fixed_um=fixed,
                moving_px=moving,
                source=alignment_path,
            )
        else:
            if keypoints_path is None:
                raise InputError(None, "keypoints", "a keypoints CSV path or an alignment CSV path in the config", None)
            fixed, moving = read_explorer_keypoints(keypoints_path)
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
            )
        report = registration.report(slide_um_per_px=slide.um_per_px)
        check_report(report, cfg.max_rms_um, cfg.max_loo_um, registration.source)
        cells_um = _read_cell_centroids_um(bundle_dir)
        table = format_table(report)
        print(table)
        log.info(
            "registration of %s: RMS %.3f µm over %d keypoints, %d region(s)",
            bundle_dir,
            report["overall"]["rms_um"] or float("nan"),
            report["overall"]["n_keypoints"],
            registration.n_regions,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_overlay(out_dir / "registration_overlay.png", registration, slide, cells_um, report)
    registration.to_json(out_dir / "registration.json")
    write_json(out_dir / "registration_report.json", report)
    save_config(cfg, out_dir / "register_config.yaml")
    return report
