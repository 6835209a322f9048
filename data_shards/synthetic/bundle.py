"""Synthetic Xenium bundles with a post-Xenium H&E whose registration and biology are known.

``make_bundle(out_dir, mode="real")`` (the demo default) takes the real H&E slide CMU-1-Small-Region
(skin, 0.499 µm/px), finds its nuclei by colour deconvolution and puts one cell on each, typed by
what the image shows (:mod:`data_shards.synthetic.tissue`), with expression drawn from per-type
programs modulated by the nucleus stain, nucleus area and eosin context
(:mod:`data_shards.synthetic.panel`): image and expression share real signal.
``mode="procedural"`` draws tissue of any size and renders the H&E tile by tile (scale tests).

Both write the agreed bundle layout (see ``/work/shared`` bundle layout / DESIGN.md):
Xenium files in XOA v3 format (with the DAPI morphology focus image, ``cells.zarr.zip``,
``gene_panel.json`` and ``metrics_summary.csv``, so ``spatialdata_io.xenium()`` opens it),
``he/post_xenium_he.ome.tif``, Xenium Explorer's keypoint and
alignment exports, ``ground_truth.json`` and ``ground_truth_cells.parquet``.

The planted Xenium µm → H&E px map (rotation, scale = 1 / H&E µm per px, translation, optional
smooth RBF deformation) is recovered from the truth by :func:`planted_map`. Same seed and
arguments give an identical bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.spatial import cKDTree
from tqdm import tqdm

from common.atomic import atomic_dir, write_json
from common.errors import InputError
from common.logs import setup_logging

from ..ome_tiff import tiles_from_array, write_pyramidal_ome_tiff
from ..slide import Slide
from . import morphology as morph
from . import xenium_writer as xw
from .cell_types import CELL_TYPES, LOOKS
from .geometry import (
    XENIUM_UM_PER_MORPHOLOGY_PX,
    PlantedMap,
    explorer_alignment_matrix,
    plant_map,
    spread_indices,
)
from .panel import COVARIATES, make_panel, sample_counts, standardize
from .tissue import (
    ProceduralRenderer,
    detect_nuclei,
    procedural_cells,
    procedural_layout,
)

log = logging.getLogger(__name__)

DEFAULT_SLIDE = Path(__file__).resolve().parents[2] / ".cache" / "he" / "cmu_small_region.svs"
TRANSCRIPTS_AUTO_MAX_CELLS = 200_000
# Largest DAPI morphology image (pixels at 0.2125 µm) written by default: the demo's is ~60 M px; a
# 100k-cell procedural bundle's would be ~1 G px (GBs of masks and image), so scale bundles skip it.
MORPHOLOGY_AUTO_MAX_PX = 250_000_000
CELL_VERTICES = 16
NUCLEUS_VERTICES = 12
SEGMENTATION_METHOD = "Segmented by nucleus expansion of 5.0µm"
GENERATOR_VERSION = 1
PANEL_NAME = "Synthetic skin panel (data_shards.synthetic)"


def planted_map(truth: dict | str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """The planted map as a callable (n, 2) Xenium µm → (n, 2) H&E level-0 px.

    ``truth`` is the dict :func:`make_bundle` returned, a ``ground_truth.json`` path or a bundle
    folder. The returned :class:`PlantedMap` also has ``.inverse`` and ``.similarity`` (3 × 3).
    """
    if not isinstance(truth, dict):
        path = Path(truth)
        if path.is_dir():
            path = path / "ground_truth.json"
        if not path.is_file():
            raise InputError(path, None, "a synthetic bundle's ground_truth.json", "no such file")
        truth = json.loads(path.read_text(encoding="utf-8"))
    for key in ("rotation_deg", "scale", "translation"):
        if key not in truth:
            raise InputError(None, f"ground truth [{key}]", "a planted-map parameter", "missing")
    return PlantedMap.from_dict(truth)


def make_bundle(
    out_dir: str | Path,
    mode: str = "real",
    *,
    n_cells: int = 5000,
    seed: int = 0,
    slide_path: str | Path | None = None,
    he_um_per_px: float = 0.5,
    n_genes: int = 300,
    mean_transcripts_per_cell: float = 180.0,
    rotation_deg_range: tuple[float, float] = (3.0, 20.0),
    deformation_um: float = 8.0,
    n_keypoints: int = 40,
    keypoint_noise_um: float = 0.3,
    write_transcripts: bool | None = None,
    write_morphology: bool | None = None,
    low_qv_fraction: float = 0.08,
    unassigned_fraction: float = 0.06,
    jpeg_quality: int = 90,
    overwrite: bool = True,
) -> dict:
    """Write a synthetic bundle to ``out_dir`` (atomically) and return the ground truth it planted.

    mode: ``"real"`` (cells on the nuclei of the real H&E at ``slide_path``, default the CMU slide in
        ``.cache/he``; ``n_cells`` and ``he_um_per_px`` are then taken from the slide) or
        ``"procedural"`` (``n_cells`` cells on rendered tissue at ``he_um_per_px`` µm/px).
    deformation_um: largest amplitude (µm) of each of the 4 Gaussian RBF bumps of the smooth
        deformation applied after the similarity; 0 plants a pure similarity.
    keypoint_noise_um: σ of the Gaussian noise on both sides of the keypoint pairs (µm).
    write_transcripts: ``None`` = only when ``n_cells`` ≤ 200,000 (transcripts.parquet holds one row
        per molecule, ~200 per cell, which dominates time and disk at scale).
    write_morphology: the DAPI focus image ``morphology_focus/morphology_focus_0000.ome.tif`` and the
        label masks in ``cells.zarr.zip`` (:mod:`.morphology`); ``None`` = only when the image is at most
        250 M px (the demo: yes; 100k+ procedural cells: no, and ``experiment.xenium`` then names no image;
        ``cells.zarr.zip`` is always written, without masks).
    low_qv_fraction / unassigned_fraction: extra transcripts with qv < 20 (in cells, not counted)
        and transcripts outside any cell (``cell_id`` "UNASSIGNED"), relative to counted ones.
    """
    started = time.perf_counter()
    if mode not in ("real", "procedural"):
        raise InputError(None, "mode", "'real' or 'procedural'", mode)
    if deformation_um < 0:
        raise InputError(None, "deformation_um", "a non-negative amplitude in µm", deformation_um)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    rng_tissue, rng_map, rng_expr, rng_tx, rng_kp, rng_render = streams

    renderer = None
    if mode == "real":
        slide_path = Path(slide_path) if slide_path is not None else DEFAULT_SLIDE
        with Slide(slide_path) as slide:
            he_um_per_px = float(slide.um_per_px)
            he_rgb = slide.read_region(0, 0, slide.shape[1], slide.shape[0])
        he_shape = he_rgb.shape[:2]
        cells = detect_nuclei(he_rgb, he_um_per_px)
        if len(cells) == 0:
            raise InputError(slide_path, "pixels", "an H&E with detectable nuclei", "none found")
    else:
        if n_cells < 1:
            raise InputError(None, "n_cells", "a positive number of cells", n_cells)
        layout = procedural_layout(rng_tissue, n_cells, he_um_per_px)
        cells = procedural_cells(rng_tissue, layout, n_cells)
        he_shape = layout.shape_hw_px
        renderer = ProceduralRenderer(layout, cells, seed=int(rng_render.integers(2**31)))
        he_rgb = None
    n = len(cells)
    log.info(
        "%s mode: %d cells on a %dx%d px H&E at %.4f µm/px (%.1f s)",
        mode,
        n,
        he_shape[1],
        he_shape[0],
        he_um_per_px,
        time.perf_counter() - started,
    )
    if write_transcripts is None:
        write_transcripts = n <= TRANSCRIPTS_AUTO_MAX_CELLS
    # Its own stream (the 7th child of the seed): the six above, hence H&E, cells and expression, stay as they were.
    rng_morph = np.random.default_rng(np.random.SeedSequence(seed).spawn(7)[6])

    # ---- geometry: the planted map and every cell in Xenium µm
    planted = plant_map(rng_map, he_shape, he_um_per_px, rotation_deg_range, deformation_um)
    xenium_xy = planted.inverse(cells.he_xy_px)  # (n, 2) µm
    roundtrip_um = float(np.max(np.abs(planted(xenium_xy) - cells.he_xy_px)) * he_um_per_px) if n else 0.0
    if roundtrip_um >= 1e-3:
        raise RuntimeError(f"planted map inversion error {roundtrip_um:.2e} µm ≥ 1e-3 µm")
    angle_um = cells.nucleus_angle_rad - np.deg2rad(planted.rotation_deg)
    nuc_a_um = cells.nucleus_major_px * he_um_per_px
    nuc_b_um = cells.nucleus_minor_px * he_um_per_px
    expansion = np.array([LOOKS[t].cytoplasm_rim_um for t in CELL_TYPES])[cells.cell_type_index]
    cell_a_um, cell_b_um = nuc_a_um + expansion, nuc_b_um + expansion
    nucleus_poly = xw.ellipse_polygons(xenium_xy, nuc_a_um, nuc_b_um, angle_um, NUCLEUS_VERTICES)
    cell_poly = xw.ellipse_polygons(xenium_xy, cell_a_um, cell_b_um, angle_um, CELL_VERTICES)
    nucleus_area = xw.polygon_areas(nucleus_poly)
    cell_area = xw.polygon_areas(cell_poly)
    morphology_shape = morph.image_shape_px(xenium_xy, np.maximum(cell_a_um, cell_b_um))
    if write_morphology is None:
        write_morphology = morphology_shape[0] * morphology_shape[1] <= MORPHOLOGY_AUTO_MAX_PX

    # ---- expression tied to the image
    panel = make_panel(n_genes, seed)
    covariates = np.stack(
        [
            standardize(np.log(cells.hematoxylin + 1e-3)),
            standardize(np.log(nucleus_area)),
            standardize(cells.context_eosin),
        ],
        axis=1,
    )  # (n, len(COVARIATES))
    counts = sample_counts(
        panel,
        cells.cell_type_index,
        cell_area,
        covariates,
        rng_expr,
        mean_transcripts_per_cell=mean_transcripts_per_cell,
    )  # (n, F) CSR
    kinds = panel.kinds
    per_kind = {
        k: np.asarray(counts[:, np.flatnonzero(kinds == k)].sum(axis=1)).ravel()
        for k in ("gene", "probe", "codeword", "unassigned")
    }

    # ---- keypoints (Xenium Explorer export) from nuclei spread over the tissue
    kp_idx = np.sort(spread_indices(rng_kp, cells.he_xy_px, n_keypoints))
    kp_fixed = xenium_xy[kp_idx] + rng_kp.normal(0.0, keypoint_noise_um, size=(len(kp_idx), 2))
    kp_moving = cells.he_xy_px[kp_idx] + rng_kp.normal(0.0, keypoint_noise_um / he_um_per_px, size=(len(kp_idx), 2))

    ids = xw.xenium_cell_ids(n, first=int(rng_map.integers(2**20, 2**28)))
    ids_arrow = pa.array(ids, type=pa.large_string())
    type_counts = np.bincount(cells.cell_type_index, minlength=len(CELL_TYPES))
    truth = {
        "generator": "data_shards.synthetic",
        "generator_version": GENERATOR_VERSION,
        "mode": mode,
        "seed": int(seed),
        "slide": str(slide_path) if mode == "real" else None,
        "he_um_per_px": he_um_per_px,
        "he_shape_px": [int(he_shape[0]), int(he_shape[1])],
        "xenium_pixel_size_um": XENIUM_UM_PER_MORPHOLOGY_PX,
        **planted.to_dict(he_um_per_px),
        "roundtrip_error_um": roundtrip_um,
        "n_cells": int(n),
        "cell_types": list(CELL_TYPES),
        "cell_type_counts": {t: int(c) for t, c in zip(CELL_TYPES, type_counts)},
        "image_covariates": list(COVARIATES),
        "gene_panel": [str(g) for g in panel.names[: panel.n_genes]],
        "gene_ids": [str(g) for g in panel.ids[: panel.n_genes]],
        "synthetic_gene_note": "SYNG* genes have synthetic ids ENSG9*; marker genes carry real Ensembl ids",
        "mean_transcripts_per_cell": mean_transcripts_per_cell,
        "n_keypoints": int(len(kp_idx)),
        "keypoint_noise_um": keypoint_noise_um,
        "transcripts_written": bool(write_transcripts),
        "jpeg_quality": int(jpeg_quality),
    }

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "he").mkdir()
        if renderer is not None:
            tiles_for_level = renderer.tiles
        else:
            tiles_for_level = _array_pyramid_tiles(he_rgb)
        write_pyramidal_ome_tiff(
            tmp / "he" / "post_xenium_he.ome.tif", he_shape, he_um_per_px, tiles_for_level, quality=jpeg_quality
        )
        _write_keypoints_csv(tmp / "he" / "keypoints.csv", kp_fixed, kp_moving)
        np.savetxt(tmp / "he" / "he_imagealignment.csv", explorer_alignment_matrix(planted), delimiter=",", fmt="%.10g")

        log.info("H&E written (%.1f s); writing Xenium files", time.perf_counter() - started)
        xw.write_experiment(
            tmp / "experiment.xenium",
            _experiment_fields(n, xenium_xy, cell_area, per_kind, counts, seed, morphology=write_morphology),
        )
        xw.write_cells(
            tmp / "cells.parquet",
            {
                "cell_id": ids_arrow,
                "x_centroid": xenium_xy[:, 0],
                "y_centroid": xenium_xy[:, 1],
                "transcript_counts": per_kind["gene"].astype(np.int64),
                "control_probe_counts": per_kind["probe"].astype(np.int64),
                "genomic_control_counts": np.zeros(n, np.int64),
                "control_codeword_counts": per_kind["codeword"].astype(np.int64),
                "unassigned_codeword_counts": per_kind["unassigned"].astype(np.int64),
                "deprecated_codeword_counts": np.zeros(n, np.int64),
                "total_counts": np.asarray(counts.sum(axis=1)).ravel().astype(np.int64),
                "cell_area": cell_area,
                "nucleus_area": nucleus_area,
                "nucleus_count": np.ones(n, np.int64),
                "segmentation_method": pa.array([SEGMENTATION_METHOD] * n, type=pa.large_string()),
            },
        )
        xw.write_feature_matrix(
            tmp / "cell_feature_matrix.h5", counts, ids, panel.ids, panel.names, panel.feature_types
        )
        xw.write_boundaries(tmp / "cell_boundaries.parquet", ids_arrow, cell_poly)
        xw.write_boundaries(tmp / "nucleus_boundaries.parquet", ids_arrow, nucleus_poly)
        masks = None
        if write_morphology:
            hema = np.log(cells.hematoxylin + 1e-3)
            lo, hi = np.quantile(hema, [0.01, 0.99]) if n else (0.0, 1.0)
            *masks, dapi = morph.rasterize_cells(
                morphology_shape,
                xenium_xy,
                (cell_a_um, cell_b_um),
                (nuc_a_um, nuc_b_um),
                angle_um,
                (hema - lo) / max(hi - lo, 1e-9),
                rng_morph,
            )
            morph.write_morphology_focus(tmp, dapi)
            del dapi
        morph.write_cells_zarr(
            tmp / morph.CELLS_ZARR,
            ids,
            {
                "cell_centroid_x": xenium_xy[:, 0],
                "cell_centroid_y": xenium_xy[:, 1],
                "cell_area": cell_area,
                "nucleus_centroid_x": xenium_xy[:, 0],
                "nucleus_centroid_y": xenium_xy[:, 1],
                "nucleus_area": nucleus_area,
                "z_level": np.full(n, 9.0),  # the z-step (3 µm) nearest the transcripts' mean depth
                "nucleus_count": np.ones(n),
            },
            nucleus_poly,
            cell_poly,
            SEGMENTATION_METHOD,
            masks,
        )
        del masks
        xw.write_gene_panel(
            tmp / "gene_panel.json", panel.ids, panel.names, panel.kinds, panel.codeword_index, PANEL_NAME
        )
        xw.write_metrics_summary(
            tmp / "metrics_summary.csv",
            _metrics_summary(
                n, counts, panel, per_kind, cell_area, xenium_xy, seed, low_qv_fraction, unassigned_fraction
            ),
        )
        if write_transcripts:
            log.info("Xenium tables written (%.1f s); writing transcripts", time.perf_counter() - started)
            _write_transcripts(
                tmp / "transcripts.parquet",
                counts,
                panel,
                ids_arrow,
                xenium_xy,
                (cell_a_um, cell_b_um, nuc_a_um, nuc_b_um, angle_um),
                rng_tx,
                low_qv_fraction,
                unassigned_fraction,
            )
        pq.write_table(
            pa.table(
                {
                    "cell_id": ids_arrow,
                    "cell_type": pa.array(np.asarray(CELL_TYPES)[cells.cell_type_index], type=pa.large_string()),
                    "x_um": xenium_xy[:, 0],
                    "y_um": xenium_xy[:, 1],
                    "he_x_px": cells.he_xy_px[:, 0],
                    "he_y_px": cells.he_xy_px[:, 1],
                    "nucleus_hematoxylin": cells.hematoxylin,
                    "context_eosin": cells.context_eosin,
                }
            ),
            tmp / "ground_truth_cells.parquet",
            compression="zstd",
        )
        truth["seconds"] = round(time.perf_counter() - started, 2)
        write_json(tmp / "ground_truth.json", truth)
    log.info("bundle %s written in %.1f s", out_dir, time.perf_counter() - started)
    return truth


def _array_pyramid_tiles(image: np.ndarray) -> Callable[[int, tuple[int, int]], Iterator[np.ndarray]]:
    """Tiles of an in-memory level 0 and its 2×2 box-averaged reductions."""
    levels = [image]

    def tiles(level: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
        while len(levels) <= level:
            prev = levels[-1]
            h, w = prev.shape[0] // 2, prev.shape[1] // 2
            levels.append(prev[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
        return tiles_from_array(levels[level][: shape[0], : shape[1]])

    return tiles


def _write_keypoints_csv(path: Path, fixed_um: np.ndarray, moving_px: np.ndarray) -> None:
    """As Xenium Explorer writes them: fixedX, fixedY in morphology-image px (µm / pixel_size), alignmentX,
    alignmentY in H&E level-0 px."""
    fixed_morph_px = fixed_um / XENIUM_UM_PER_MORPHOLOGY_PX  # (k, 2) µm -> morphology px
    rows = ["fixedX,fixedY,alignmentX,alignmentY"]
    rows += [f"{a:.6f},{b:.6f},{c:.6f},{d:.6f}" for (a, b), (c, d) in zip(fixed_morph_px, moving_px)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def _experiment_fields(
    n: int,
    xy_um: np.ndarray,
    cell_area: np.ndarray,
    per_kind: dict,
    counts: sp.csr_matrix,
    seed: int,
    morphology: bool = True,
) -> dict:
    """experiment.xenium with XOA v3 keys, naming only files the bundle has (the focus image if written).

    No ``morphology.ome.tif`` (XOA's 3D DAPI stack) is written, so none is named.
    """
    span = xy_um.max(axis=0) - xy_um.min(axis=0) if n else np.zeros(2)
    region_area = float(np.prod(span + 100.0))
    genes = int(per_kind["gene"].sum())
    return {
        "major_version": 5,
        "minor_version": 2,
        "patch_version": 0,
        "run_name": "synthetic",
        "run_start_time": "2024-01-01T00:00:00Z",
        "region_name": f"synthetic_seed{seed}",
        "preservation_method": "ffpe",
        "num_cells": int(n),
        "transcripts_per_cell": int(round(genes / max(n, 1))),
        "transcripts_per_100um": genes / region_area * 100.0,
        "region_area": region_area,
        "total_cell_area": float(cell_area.sum()),
        "non_zero_matrix_entries": int(counts.nnz),
        "num_transcripts": int(counts.sum()),
        "panel_type": "predesigned",
        "panel_name": PANEL_NAME,
        "panel_organism": "Human",
        "panel_tissue_type": "Skin",
        "panel_num_targets_predesigned": int(len(per_kind)),
        "panel_num_targets_custom": 0,
        "chemistry_version": "v1",
        "pixel_size": XENIUM_UM_PER_MORPHOLOGY_PX,
        "instrument_sn": "synthetic",
        "instrument_sw_version": "synthetic",
        "analysis_sw_version": "xenium-3.0.0.15",
        "z_step_size": 3.0,
        "images": {"morphology_focus_filepath": f"{morph.FOCUS_DIR}/{morph.FOCUS_FILE}"} if morphology else {},
        "xenium_explorer_files": {"cells_zarr_filepath": morph.CELLS_ZARR},
        "segmentation_stain": "Xenium Multi-Tissue Stain",
    }


def _metrics_summary(
    n: int,
    counts: sp.csr_matrix,
    panel,
    per_kind: dict,
    cell_area: np.ndarray,
    xy_um: np.ndarray,
    seed: int,
    low_qv_fraction: float,
    unassigned_fraction: float,
) -> dict:
    """The metrics_summary.csv values the synthetic run knows (same region area as experiment.xenium)."""
    fields = _experiment_fields(n, xy_um, cell_area, per_kind, counts, seed)
    genes = per_kind["gene"]
    gene_columns = np.flatnonzero(panel.kinds == "gene")
    genes_per_cell = np.diff(counts[:, gene_columns].tocsr().indptr) if n else np.zeros(0)
    n_probes = max(int(np.sum(panel.kinds == "probe")), 1)
    assigned = 1.0 / (1.0 + unassigned_fraction)
    return {
        "run_name": fields["run_name"],
        "cassette_name": "N/A",
        "region_name": fields["region_name"],
        "panel_name": PANEL_NAME,
        "panel_design_id": "N/A",
        "predesigned_panel_id": "N/A",
        "region_area": fields["region_area"],
        "total_cell_area": fields["total_cell_area"],
        "total_high_quality_decoded_transcripts": int(round(genes.sum() / assigned)),
        "fraction_transcripts_decoded_q20": 1.0 / (1.0 + low_qv_fraction),
        "decoded_transcripts_per_100um2": fields["transcripts_per_100um"],
        "negative_control_probe_counts_per_control_per_cell": float(per_kind["probe"].sum()) / n_probes / max(n, 1),
        "num_cells_detected": int(n),
        "fraction_empty_cells": float(np.mean(genes == 0)) if n else 0.0,
        "cells_per_100um2": n / fields["region_area"] * 100.0,
        "fraction_transcripts_assigned": assigned,
        "median_genes_per_cell": float(np.median(genes_per_cell)) if n else 0.0,
        "median_transcripts_per_cell": float(np.median(genes)) if n else 0.0,
        "segmented_cell_stain_frac": 0.0,
        "segmented_cell_boundary_frac": 0.0,
        "segmented_cell_interior_frac": 0.0,
        "segmented_cell_nuc_expansion_frac": 1.0,
        "segmented_cell_boundary_count": 0,
        "segmented_cell_interior_count": 0,
        "segmented_cell_nuc_expansion_count": int(n),
        "segmented_cell_imported_frac": 0.0,
        "segmented_cell_imported_count": 0,
    }


def _points_in_ellipses(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points in ellipses with semi-axes a, b, in the ellipse frame: (u, v)."""
    r = np.sqrt(rng.random(len(a)))
    t = rng.uniform(0.0, 2 * np.pi, len(a))
    return a * r * np.cos(t), b * r * np.sin(t)


def _good_qv(rng: np.random.Generator, n: int) -> np.ndarray:
    """Phred-like quality of accepted decodings: 20–40 in steps of 0.25, skewed toward 40."""
    return 20.0 + np.floor(rng.random(n) ** 0.3 * 81.0) / 4.0


def _write_transcripts(
    path: Path,
    counts: sp.csr_matrix,
    panel,
    ids_arrow: pa.Array,
    xy_um: np.ndarray,
    shapes: tuple,
    rng: np.random.Generator,
    low_qv_fraction: float,
    unassigned_fraction: float,
    chunk_cells: int = 20000,
) -> None:
    """One row per counted molecule (qv ≥ 20, inside its cell), plus low-qv and unassigned ones."""
    cell_a, cell_b, nuc_a, nuc_b, angle = shapes
    n = counts.shape[0]
    names = pa.array(panel.names, type=pa.large_string())
    categories = pa.array(panel.codeword_categories, type=pa.large_string())
    is_gene = panel.kinds == "gene"
    lo, hi = xy_um.min(axis=0) - 20.0, xy_um.max(axis=0) + 20.0
    n_fov_cols, fov_table = xw.fov_table(hi[0] + 50.0, hi[1] + 50.0)
    next_id = np.uint64(2**48)
    n_counted = int(counts.sum())
    bar = tqdm(total=n_counted, desc="transcripts", unit="tx", leave=False, unit_scale=True)

    def table(
        cell: np.ndarray,
        feature: np.ndarray,
        qv: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        in_nucleus: np.ndarray,
        nucleus_distance: np.ndarray,
        fov: np.ndarray,
    ) -> pa.Table:
        nonlocal next_id
        m = len(feature)
        tid = next_id + np.arange(m, dtype=np.uint64) * np.uint64(3)
        next_id = tid[-1] + np.uint64(3) if m else next_id
        unassigned = cell < 0
        cell_col = ids_arrow.take(pa.array(np.where(unassigned, 0, cell)))
        cell_col = pc.if_else(pa.array(unassigned), pa.scalar("UNASSIGNED", pa.large_string()), cell_col)
        return pa.table(
            {
                "transcript_id": tid,
                "cell_id": cell_col,
                "overlaps_nucleus": in_nucleus.astype(np.uint8),
                "feature_name": names.take(pa.array(feature)),
                "x_location": x.astype(np.float32),
                "y_location": y.astype(np.float32),
                "z_location": rng.normal(9.0, 1.5, m).astype(np.float32),
                "qv": qv.astype(np.float32),
                "fov_name": fov_table.take(pa.array(fov)),
                "nucleus_distance": nucleus_distance.astype(np.float32),
                "codeword_index": panel.codeword_index[feature],
                "codeword_category": categories.take(pa.array(feature)),
                "is_gene": is_gene[feature],
            },
            schema=xw.TRANSCRIPTS_SCHEMA,
        )

    # Snappy and dictionaries on the string columns only: about twice as fast to write as zstd.
    with pq.ParquetWriter(
        path,
        xw.TRANSCRIPTS_SCHEMA,
        compression="snappy",
        use_dictionary=["cell_id", "feature_name", "fov_name", "codeword_category"],
    ) as writer:
        for start in range(0, n, chunk_cells):
            block = counts[start : min(start + chunk_cells, n)]
            row_of_nnz = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)) + start
            cell = np.repeat(row_of_nnz, block.data)
            feature = np.repeat(block.indices, block.data)
            good = len(cell)
            # Low-quality decodings: extra molecules in the same cells, never counted in the matrix.
            extra = (
                rng.integers(0, max(good, 1), size=rng.binomial(good, low_qv_fraction)) if good else np.zeros(0, int)
            )
            cell = np.concatenate([cell, cell[extra]])
            feature = np.concatenate([feature, feature[extra]])
            qv = np.concatenate(
                [
                    _good_qv(rng, good),
                    np.round(rng.uniform(5.0, 19.75, len(extra)) * 4) / 4,
                ]
            )
            u, v = _points_in_ellipses(rng, cell_a[cell], cell_b[cell])
            rho = np.sqrt((u / nuc_a[cell]) ** 2 + (v / nuc_b[cell]) ** 2)
            inside = rho <= 1.0
            # Distance to the nucleus outline along the ray from the centre (µm), 0 inside.
            distance = np.where(inside, 0.0, np.hypot(u, v) * (1.0 - 1.0 / np.maximum(rho, 1e-9)))
            c, s = np.cos(angle[cell]), np.sin(angle[cell])
            x = xy_um[cell, 0] + u * c - v * s
            y = xy_um[cell, 1] + u * s + v * c
            order = rng.permutation(len(cell))  # molecules are not grouped by cell in real files
            writer.write_table(
                table(
                    cell[order],
                    feature[order],
                    qv[order],
                    x[order],
                    y[order],
                    inside[order],
                    distance[order],
                    xw.fov_codes(x[order], y[order], n_fov_cols),
                )
            )
            bar.update(good)
        # Molecules outside every cell: genes, drawn like the counted ones, in the gaps between cells.
        n_free = int(round(unassigned_fraction * n_counted))
        if n_free and n:
            tree = cKDTree(xy_um)
            points = np.zeros((0, 2))
            for _ in range(20):
                trial = rng.uniform(lo, hi, size=(2 * n_free, 2))
                dist, nearest = tree.query(trial)
                points = np.concatenate([points, trial[dist > cell_a[nearest] + 0.5]])
                if len(points) >= n_free:
                    break
            points = points[:n_free]
            dist, nearest = tree.query(points)
            gene_pool = np.flatnonzero(is_gene)
            feature = rng.choice(gene_pool, size=len(points))
            qv = _good_qv(rng, len(points))
            writer.write_table(
                table(
                    np.full(len(points), -1),
                    feature,
                    qv,
                    points[:, 0],
                    points[:, 1],
                    np.zeros(len(points), bool),
                    np.maximum(dist - nuc_a[nearest], 0.0),
                    xw.fov_codes(points[:, 0], points[:, 1], n_fov_cols),
                )
            )
    bar.close()


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m data_shards.synthetic OUT_DIR [--mode procedural --n-cells N ...]``."""
    parser = argparse.ArgumentParser(description="Write a synthetic Xenium + post-Xenium H&E bundle.")
    parser.add_argument("out_dir")
    parser.add_argument("--mode", choices=("real", "procedural"), default="real")
    parser.add_argument("--n-cells", type=int, default=5000, help="procedural mode only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slide", default=None, help="real mode: H&E slide (default .cache/he/cmu_small_region.svs)")
    parser.add_argument("--he-um-per-px", type=float, default=0.5, help="procedural mode: H&E µm per pixel")
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--deformation-um", type=float, default=8.0)
    parser.add_argument("--n-keypoints", type=int, default=40)
    parser.add_argument("--keypoint-noise-um", type=float, default=0.3)
    parser.add_argument("--transcripts", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--morphology", choices=("auto", "yes", "no"), default="auto", help="DAPI image + masks")
    args = parser.parse_args(argv)
    setup_logging()
    truth = make_bundle(
        args.out_dir,
        args.mode,
        n_cells=args.n_cells,
        seed=args.seed,
        slide_path=args.slide,
        he_um_per_px=args.he_um_per_px,
        n_genes=args.n_genes,
        deformation_um=args.deformation_um,
        n_keypoints=args.n_keypoints,
        keypoint_noise_um=args.keypoint_noise_um,
        write_transcripts={"auto": None, "yes": True, "no": False}[args.transcripts],
        write_morphology={"auto": None, "yes": True, "no": False}[args.morphology],
    )
    print(json.dumps({k: truth[k] for k in ("mode", "n_cells", "cell_type_counts", "rotation_deg", "seconds")}))
    return truth


if __name__ == "__main__":
    main()
