"""The data stages as called by the entry scripts in ``launch/`` (which only parse the config).

Every function here checks its config against :class:`data_shards.schema.DataConfig` first
(``common.config.apply_schema``), so a misspelled key is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from common.config import apply_schema
from common.errors import InputError

from . import pipeline
from .manifest import verify_shards
from .register import Registration, register_bundle
from .schema import DataConfig, slide_register_config
from .spatialdata_export import write_spatialdata
from .synthetic import make_bundle

log = logging.getLogger(__name__)

SHARD_COMMANDS = ("build", "register", "prepare", "merge", "verify", "spatialdata")


def run_make_bundle(cfg: DictConfig) -> dict:
    """``bundle`` section -> ``synthetic.make_bundle(out_dir, mode, **rest)``; prints what it planted."""
    cfg = apply_schema(DataConfig, cfg)
    section = OmegaConf.to_container(cfg.bundle, resolve=True)
    out_dir = section.pop("out_dir")
    if not out_dir:
        raise InputError(None, "bundle.out_dir", "the folder to write the bundle to", out_dir)
    pipeline.check_output_folder(out_dir, "bundle.out_dir")
    mode = section.pop("mode")
    truth = make_bundle(out_dir, mode, **section)
    print(f"[bundle] {mode} bundle with {truth['n_cells']:,} cells written to {out_dir}")
    print(
        f"[bundle] planted Xenium µm -> H&E px map: rotation {truth.get('rotation_deg', float('nan')):.2f}°, "
        f"H&E {truth.get('he_um_per_px', float('nan')):.4f} µm/px, {len(truth.get('deformation', {}).get('centers_px', []))} local deformation bumps"
    )
    return truth


def registration_folder(cfg: DictConfig, slide: Any) -> Path:
    """Where a slide's registration.json is: beside the file the config names, else ``<out_dir>/registration/<id>``."""
    return (
        Path(slide.registration).parent
        if slide.get("registration")
        else Path(cfg.out_dir) / "registration" / str(slide.id)
    )


def run_spatialdata(cfg: DictConfig) -> dict:
    """Every slide as a SpatialData store ``<out_dir>/spatialdata/<slide id>.zarr`` (H&E pyramid, cells, counts)."""
    cfg = apply_schema(DataConfig, cfg)
    written = {}
    for slide in cfg.slides:
        registration = registration_folder(cfg, slide) / "registration.json"
        if not registration.is_file():
            raise InputError(
                registration, f"slides[{slide.id}]", "a registration (run `make_shards.py register`)", "missing"
            )
        settings = slide_register_config(cfg.register, slide)
        out = Path(cfg.out_dir) / "spatialdata" / f"{slide.id}.zarr"
        info = write_spatialdata(
            slide.bundle, settings["he_slide"], registration, out, he_um_per_px=slide.get("he_um_per_px")
        )
        written[str(slide.id)] = info
        print(
            f"[spatialdata] {slide.id}: {info['n_cells']:,} cells × {info['n_genes']} genes, H&E "
            f"{info['he_shape_px'][1]}×{info['he_shape_px'][0]} px in {info['pyramid_levels']} levels -> {out} "
            f"(cells placed by the global fit: {info['global_fit_rms_px']:.2f} px RMS from the per-region map)"
        )
    return written


def run_register(cfg: DictConfig) -> dict:
    """Fit, check and save every slide's registration under ``registration_dir/<slide id>/``."""
    cfg = apply_schema(DataConfig, cfg)
    reports = {}
    for slide in cfg.slides:
        out = registration_folder(cfg, slide)
        pipeline.check_output_folder(
            out, f"slides[{slide.id}].registration" if slide.get("registration") else "out_dir"
        )
        reports[str(slide.id)] = register_bundle(slide.bundle, out, slide_register_config(cfg.register, slide))
        print(f"[register] {slide.id}: registration, report and overlay in {out}")
        truth = Path(slide.bundle) / "ground_truth_cells.parquet"
        if truth.is_file():
            _print_truth_error(truth, Registration.from_json(out / "registration.json"), slide.id)
    return reports


def _print_truth_error(truth_path: Path, registration: Registration, slide_id: str) -> None:
    """For simulated bundles: cell-level error against the planted map, and against one global fit."""
    truth = pd.read_parquet(truth_path)
    xy_um = truth[["x_um", "y_um"]].to_numpy()
    true_px = truth[["he_x_px", "he_y_px"]].to_numpy()
    um_per_px = registration.he_um_per_px

    def rms_um(mapped_px: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.sum((mapped_px - true_px) ** 2, axis=1))) * um_per_px)

    fitted = rms_um(registration.map(xy_um))
    line = f"[register] {slide_id}: error at the {len(truth):,} cells vs the planted map: RMS {fitted:.2f} µm"
    if registration.n_regions > 1:
        fixed = np.vstack([r.fixed_um for r in registration.regions])
        moving = np.vstack([r.moving_px for r in registration.regions])
        global_rms = rms_um(Registration.global_fit(fixed, moving, mirror_x=registration.mirror_x).map(xy_um))
        line += f" with {registration.n_regions} regions, {global_rms:.2f} µm with one global transform"
    print(line)


def run_make_shards(command: str, cfg: DictConfig) -> dict | None:
    """One ``make_shards.py`` command (one of :data:`SHARD_COMMANDS`) on a checked data config."""
    if command not in SHARD_COMMANDS:
        raise InputError(None, "command", "one of " + ", ".join(SHARD_COMMANDS), command)
    cfg = apply_schema(DataConfig, cfg)
    if command == "register":
        return run_register(cfg)
    if command == "prepare":
        return pipeline.prepare(cfg)
    if command == "spatialdata":
        return run_spatialdata(cfg)
    if command == "verify":
        result = verify_shards(cfg.out_dir)
        print(
            f"[verify] all {result['n_shards']} shards read back with tar and webdataset: {result['n_samples']:,} samples, keys and shapes as documented"
        )
        return result
    if command == "merge":
        manifest = pipeline.merge(cfg)
        print(f"[shards] manifest: {manifest['n_samples']:,} samples in {manifest['n_shards']} shards")
        return manifest
    manifest = pipeline.build_shards(cfg)
    if manifest is not None:
        print_shard_summary(manifest, Path(cfg.out_dir))
    return manifest


def print_shard_summary(manifest: dict, shard_dir: Path) -> None:
    print(f"[shards] {manifest['n_samples']:,} samples in {manifest['n_shards']} shards -> {shard_dir}/manifest.json")
    for slide_id, info in manifest["slides"].items():
        qc = info["qc"]
        crops = info["crops"]
        timings = info.get("timings_s", {})
        total = sum(timings.values())
        print(
            f"[shards]   {slide_id}: QC kept {qc['n_kept']:,}/{qc['n_input']:,} cells "
            f"(removed {json.dumps(qc['removed'])}); crops padded {crops['n_padded']}, "
            f"skipped {crops['n_skipped']}; {info['n_samples'] / max(total, 1e-9):,.0f} cells/s"
        )
        tok = info["tokenize"]
        print(
            f"[shards]   {slide_id}: {tok['n_genes_matched']}/{tok['n_genes']} genes in the vocabulary, "
            f"{tok['n_cells_without_counts']} cells without in-vocabulary counts"
        )
