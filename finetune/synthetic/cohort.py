"""A synthetic survival cohort in which the image, the genes and the cells each carry signal.

Every patient has three independent latent risk factors, z_image, z_genomic, z_cell ~ N(0, 1),
and a log-hazard η = image_effect·z_image + genomic_effect·z_genomic + cell_effect·z_cell.
Survival times are exponential with that hazard (baseline median `baseline_median_months`),
censored at the end of the study (`follow_up_months`) or earlier by an independent exponential
censoring time whose rate is tuned to censor about `censoring_fraction` of the patients. So a model that reads only one modality can recover only
part of η, and each modality adds signal.

Planting:
* image: each slide's bag of patch embeddings; a random fraction (20–60 %) of "tumour" patches
  is shifted along one hidden unit direction u by image_shift·z_image (in units of the base
  embeddings' spread along u). The base patches are N(0, I) in `embedding_dim`, or, with
  `base_embeddings` (a folder of per-slide embedding files or one such file, e.g. the demo
  export's tile embeddings from `finetune.embed`), real patch embeddings resampled from that
  pool: the planted direction then sits on top of real morphology.
* genes: six MCAT signature groups of real gene symbols, one `<gene>_rnaseq` column each
  (plus `<gene>_cnv` for the tumour suppressors); z_genomic loads negatively on the tumour
  suppressors and positively on the oncogenes, the other four groups are noise.
* cells: the per-patient mean cell embedding (PAST-multi's extra token) is noise plus
  z_cell along another hidden direction v; with `base_cell_embeddings` the noise part is the
  mean of real cell embeddings resampled from that pool.

`make_cohort` writes, atomically under `out_dir`: `clinical.csv`, `signatures.csv`
(`group,gene`), `patch_embeddings/<slide_id>.npz` (`embeddings` (n, D), `coords` (n, 2) pixels
on a 224 px grid), `cell_embeddings.csv` (`case_id` + one column per dimension) and
`ground_truth.json` (effects, directions and each patient's latent factors).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import atomic_dir, write_json
from common.errors import InputError

from ..embed.io import EMBEDDING_SUFFIXES, load_embedding_file

log = logging.getLogger(__name__)

# MCAT's six signature categories, with well-known members of each.
SIGNATURE_GROUPS: dict[str, list[str]] = {
    "Tumor Suppression": ["TP53", "PTEN", "RB1", "CDKN2A", "APC", "BRCA1", "BRCA2", "NF1"],
    "Oncogenesis": ["MYC", "KRAS", "ERBB2", "CCND1", "MDM2", "EGFR", "PIK3CA", "BRAF"],
    "Protein Kinases": ["AKT1", "MAPK1", "CDK4", "CDK6", "JAK2", "SRC", "ABL1", "MTOR"],
    "Cellular Differentiation": ["SOX2", "GATA3", "FOXA1", "KRT5", "KRT8", "CDH1", "VIM", "ESR1"],
    "Transcription": ["STAT3", "JUN", "FOS", "E2F1", "TCF7", "NFKB1", "HIF1A", "ETS1"],
    "Cytokines and Growth": ["IL6", "TNF", "TGFB1", "VEGFA", "FGF2", "IGF1", "CXCL8", "PDGFB"],
}
PATCH_PX = 224  # patch side in pixels, for the synthetic coordinates


def _pool_embeddings(source: str | Path) -> np.ndarray:
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in EMBEDDING_SUFFIXES)
        if not files:
            raise InputError(source, None, "per-slide embedding files (" + ", ".join(EMBEDDING_SUFFIXES) + ")", "none")
        return np.concatenate([load_embedding_file(p) for p in files])
    if not source.is_file():
        raise InputError(source, None, "an embedding file or a folder of them", "no such file")
    return load_embedding_file(source)


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def _censoring_rate(event_times: np.ndarray, unit_draws: np.ndarray, fraction: float, follow_up: float) -> float:
    """Rate of exponential censoring times −log(U)/rate that, with the end of follow-up, censors
    `fraction` of the patients (0 when the end of follow-up alone censors that many)."""
    if fraction <= np.mean(event_times > follow_up):
        return 0.0
    low, high = 1e-8, 1e3
    for _ in range(100):  # bisection on log scale; censored fraction increases with the rate
        rate = np.sqrt(low * high)
        censored = np.mean(np.minimum(-np.log(unit_draws) / rate, follow_up) < event_times)
        low, high = (rate, high) if censored < fraction else (low, rate)
    return float(np.sqrt(low * high))


def _survival_times(
    rng: np.random.Generator,
    log_hazard: np.ndarray,
    censoring_fraction: float,
    baseline_median_months: float,
    follow_up_months: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(months, censored) per patient: exponential event times with hazard baseline·exp(log_hazard),
    censored by the end of follow-up or an independent exponential time tuned to `censoring_fraction`."""
    n_patients = len(log_hazard)
    baseline_rate = np.log(2) / baseline_median_months  # per month
    event_months = -np.log(rng.uniform(size=n_patients)) / (baseline_rate * np.exp(log_hazard))
    censor_draws = rng.uniform(size=n_patients)
    rate = _censoring_rate(event_months, censor_draws, censoring_fraction, follow_up_months)
    censor_months = -np.log(censor_draws) / rate if rate > 0 else np.full(n_patients, np.inf)
    censor_months = np.minimum(censor_months, follow_up_months)  # end of the study
    censored = censor_months < event_months
    return np.minimum(event_months, censor_months), censored


def _signature_genes() -> tuple[list[tuple[str, str]], dict[str, float]]:
    """(group, gene) of every signature gene, and the genomic latent's loadings (suppressors −, oncogenes +)."""
    genes = [(group, gene) for group, members in SIGNATURE_GROUPS.items() for gene in members]
    loadings = {g: -0.8 for g in SIGNATURE_GROUPS["Tumor Suppression"]}
    loadings.update({g: 0.8 for g in SIGNATURE_GROUPS["Oncogenesis"]})
    return genes, loadings


def make_cohort(
    out_dir: str | Path,
    n_patients: int = 80,
    embedding_dim: int = 64,
    cell_dim: int = 32,
    seed: int = 0,
    image_effect: float = 1.0,
    genomic_effect: float = 1.0,
    cell_effect: float = 0.5,
    image_shift: float = 2.0,
    censoring_fraction: float = 0.3,
    baseline_median_months: float = 30.0,
    follow_up_months: float = 120.0,
    patches_per_slide: tuple[int, int] = (40, 120),
    max_slides_per_patient: int = 2,
    base_embeddings: str | Path | None = None,
    base_cell_embeddings: str | Path | None = None,
    cells_per_patient: int = 200,
) -> dict:
    """Write a synthetic cohort under `out_dir` (see module docstring); returns its paths and truth.

    With `base_embeddings`, `embedding_dim` is that of the real embeddings; with
    `base_cell_embeddings`, `cell_dim` likewise.
    """
    if n_patients < 10:
        raise InputError(None, "n_patients", "at least 10 patients (5 folds with events in each)", n_patients)
    # Two streams: the clinical table (times, genes, cells, slide layout) does not depend on the
    # patch embeddings, so cohorts made on different encoders' base embeddings share their patients.
    rng = np.random.default_rng([seed, 0])
    image_rng = np.random.default_rng([seed, 1])
    out_dir = Path(out_dir)
    patch_pool = _pool_embeddings(base_embeddings) if base_embeddings is not None else None
    cell_pool = _pool_embeddings(base_cell_embeddings) if base_cell_embeddings is not None else None
    if patch_pool is not None:
        embedding_dim = patch_pool.shape[1]
    if cell_pool is not None:
        cell_dim = cell_pool.shape[1]

    z_image, z_genomic, z_cell = rng.standard_normal((3, n_patients))
    log_hazard = image_effect * z_image + genomic_effect * z_genomic + cell_effect * z_cell
    months, censored = _survival_times(rng, log_hazard, censoring_fraction, baseline_median_months, follow_up_months)

    case_ids = [f"P{i:04d}" for i in range(n_patients)]
    direction_image = _unit(image_rng, embedding_dim)
    direction_cell = _unit(rng, cell_dim)
    image_scale = float(np.std(patch_pool @ direction_image)) if patch_pool is not None else 1.0

    rows, slide_rows = [], {}
    genes, loadings = _signature_genes()
    cell_means = np.zeros((n_patients, cell_dim), np.float32)
    with atomic_dir(out_dir) as tmp:
        (tmp / "patch_embeddings").mkdir()
        for i, case in enumerate(case_ids):
            slide_ids = [f"{case}-S{j}" for j in range(int(rng.integers(1, max_slides_per_patient + 1)))]
            for slide in slide_ids:
                n = int(rng.integers(patches_per_slide[0], patches_per_slide[1] + 1))
                if patch_pool is None:
                    patches = image_rng.standard_normal((n, embedding_dim))
                else:
                    patches = patch_pool[image_rng.choice(len(patch_pool), n, replace=n > len(patch_pool))].astype(
                        float
                    )
                tumour = image_rng.uniform(size=n) < image_rng.uniform(0.2, 0.6)
                patches[tumour] += image_shift * image_scale * z_image[i] * direction_image
                side = int(np.ceil(np.sqrt(n)))
                coords_px = PATCH_PX * np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
                np.savez(
                    tmp / "patch_embeddings" / f"{slide}.npz",
                    embeddings=patches.astype(np.float32),
                    coords=coords_px.astype(np.int64),
                )
                slide_rows[slide] = n
            row = {
                "case_id": case,
                "slide_id": ";".join(slide_ids),
                "survival_months": round(float(months[i]), 4),
                "censorship": int(censored[i]),
            }
            for group, gene in genes:
                value = loadings.get(gene, 0.0) * z_genomic[i] + rng.standard_normal()
                row[f"{gene}_rnaseq"] = round(float(value), 4)
                if group == "Tumor Suppression":  # copy number loosely follows expression
                    row[f"{gene}_cnv"] = int(np.clip(np.round(0.5 * value + 0.5 * rng.standard_normal()), -2, 2))
            rows.append(row)
            if cell_pool is None:
                base = rng.standard_normal(cell_dim) * 0.5
            else:
                base = cell_pool[
                    rng.choice(len(cell_pool), cells_per_patient, replace=cells_per_patient > len(cell_pool))
                ].mean(0)
            cell_scale = 1.0 if cell_pool is None else float(np.std(cell_pool @ direction_cell)) or 1.0
            cell_means[i] = base + cell_scale * z_cell[i] * direction_cell

        pd.DataFrame(rows).to_csv(tmp / "clinical.csv", index=False)
        pd.DataFrame([{"group": g, "gene": gene} for g, gene in genes]).to_csv(tmp / "signatures.csv", index=False)
        cells = pd.DataFrame(cell_means, columns=[f"emb_{k}" for k in range(cell_dim)])
        cells.insert(0, "case_id", case_ids)
        cells.to_csv(tmp / "cell_embeddings.csv", index=False, float_format="%.6g")
        truth = {
            "n_patients": n_patients,
            "seed": seed,
            "censored_fraction": float(censored.mean()),
            "effects": {"image": image_effect, "genomic": genomic_effect, "cell": cell_effect},
            "image_shift": image_shift,
            "image_scale": image_scale,
            "follow_up_months": follow_up_months,
            "base_embeddings": None if base_embeddings is None else str(base_embeddings),
            "base_cell_embeddings": None if base_cell_embeddings is None else str(base_cell_embeddings),
            "genomic_loadings": loadings,
            "direction_image": direction_image,
            "direction_cell": direction_cell,
            "patients": {
                c: {"z_image": float(a), "z_genomic": float(b), "z_cell": float(d), "log_hazard": float(h)}
                for c, a, b, d, h in zip(case_ids, z_image, z_genomic, z_cell, log_hazard)
            },
        }
        write_json(tmp / "ground_truth.json", truth)
    log.info(
        "synthetic cohort: %d patients, %d slides, %.0f%% censored → %s",
        n_patients,
        len(slide_rows),
        100 * censored.mean(),
        out_dir,
    )
    return {
        "out_dir": out_dir,
        "clinical_csv": out_dir / "clinical.csv",
        "signatures_csv": out_dir / "signatures.csv",
        "embeddings_dir": out_dir / "patch_embeddings",
        "cell_embeddings": out_dir / "cell_embeddings.csv",
        "log_hazard": log_hazard,
        "censored": censored,
        "survival_months": months,
    }


def tile_states(tiles: pd.DataFrame, cells_px: np.ndarray, cell_labels: np.ndarray, risk_labels) -> np.ndarray:
    """(n_tiles,) share of each tile's planted cells whose label is in ``risk_labels`` (0 for an empty tile).

    ``tiles``: ``tile_x0_px``, ``tile_y0_px``, ``tile_size_px`` (level-0 px, as ``finetune.embed`` writes
    them); ``cells_px``: (n_cells, 2) planted cell centres in the same pixels.
    """
    index = cells_in_tiles(tiles, cells_px)
    risky = np.isin(np.asarray(cell_labels).astype(str), [str(r) for r in risk_labels])
    counts = np.bincount(index[index >= 0], minlength=len(tiles))
    hits = np.bincount(index[(index >= 0) & risky], minlength=len(tiles))
    return np.where(counts > 0, hits / np.maximum(counts, 1), 0.0)


def cells_in_tiles(tiles: pd.DataFrame, cells_px: np.ndarray) -> np.ndarray:
    """(n_cells,) row of the tile holding each cell centre, -1 outside every tile (tiles do not overlap)."""
    x0, y0 = tiles["tile_x0_px"].to_numpy(float), tiles["tile_y0_px"].to_numpy(float)
    size = tiles["tile_size_px"].to_numpy(float)
    cells_px = np.asarray(cells_px, dtype=np.float64).reshape(-1, 2)
    inside = (
        (cells_px[:, None, 0] >= x0)
        & (cells_px[:, None, 0] < x0 + size)
        & (cells_px[:, None, 1] >= y0)
        & (cells_px[:, None, 1] < y0 + size)
    )  # (n_cells, n_tiles)
    return np.where(inside.any(axis=1), inside.argmax(axis=1), -1)


def make_shared_cohort(
    out_dir: str | Path,
    tile_embeddings: dict[str, np.ndarray],
    tile_state: np.ndarray,
    *,
    tile_cell_embeddings: list[np.ndarray] | None = None,
    tile_sites: np.ndarray | None = None,
    n_patients: int = 160,
    seed: int = 0,
    image_effect: float = 1.0,
    genomic_effect: float = 1.0,
    cell_effect: float = 0.5,
    tilt: float = 1.5,
    censoring_fraction: float = 0.3,
    baseline_median_months: float = 30.0,
    follow_up_months: float = 120.0,
    patches_per_slide: tuple[int, int] = (40, 120),
    cell_dim: int = 32,
) -> dict:
    """One cohort for every encoder: risk planted in *which tissue* each patient's bag holds.

    Each patient's image latent z_image tilts which tiles of the base slide their bag draws
    (probability ∝ exp(tilt · z_image · s), s = the standardised planted ``tile_state``, e.g. the
    share of immune cells), so the bag's real cell-state composition carries the risk. Every encoder
    in ``tile_embeddings`` ({name: (n_tiles, D)}, the same tiles in the same order) gets its own
    embeddings of the *same* drawn tiles: encoders are compared on how well they read the tissue,
    not on a direction planted in their own space. With ``tile_cell_embeddings`` (per tile, the
    cell-encoder embeddings of its cells) a patient's cell token is the mean over the cells of their
    drawn tiles (real cells, no planted direction); otherwise noise plus ``cell_effect`` · z_cell
    along a hidden direction. Genes as in :func:`make_cohort`.

    ``tile_sites`` (n_tiles,) puts each tile in a "site" (e.g. a spatial block of the slide); patient i
    then draws only from site i mod n_sites and clinical.csv gets a ``site`` column, so that
    cross-validation by site (``patient_folds(groups=...)``) tests on tissue no training patient had.
    Without it, any encoder that gives tiles distinct embeddings — even random ones — can learn
    which *tiles* mean risk from the training patients and find them again in the test patients.

    Writes ``clinical.csv``, ``signatures.csv``, ``patch_embeddings/<encoder>/<slide>.npz``,
    ``cell_embeddings.csv``, ``ground_truth.json`` (per patient: latents, drawn tiles, bag state).
    """
    if n_patients < 10:
        raise InputError(None, "n_patients", "at least 10 patients (5 folds with events in each)", n_patients)
    n_tiles = len(tile_state)
    for name, embeddings in tile_embeddings.items():
        if len(embeddings) != n_tiles:
            raise InputError(None, f"tile_embeddings[{name}]", f"{n_tiles} tiles, one per tile state", len(embeddings))
    rng = np.random.default_rng([seed, 2])
    out_dir = Path(out_dir)
    state = np.asarray(tile_state, dtype=np.float64)
    standardised = (state - state.mean()) / (state.std() or 1.0)
    real_cells = tile_cell_embeddings is not None
    sites = None if tile_sites is None else np.asarray(tile_sites)
    site_names = None if sites is None else np.unique(sites)
    z_image, z_genomic, z_cell = rng.standard_normal((3, n_patients))
    log_hazard = image_effect * z_image + genomic_effect * z_genomic + (0.0 if real_cells else cell_effect * z_cell)
    months, censored = _survival_times(rng, log_hazard, censoring_fraction, baseline_median_months, follow_up_months)

    genes, loadings = _signature_genes()
    if real_cells:
        cell_dim = next(len(e[0]) for e in tile_cell_embeddings if len(e))
    direction_cell = _unit(rng, cell_dim)
    case_ids = [f"P{i:04d}" for i in range(n_patients)]
    rows, patients, cell_means = [], {}, np.zeros((n_patients, cell_dim), np.float32)
    with atomic_dir(out_dir) as tmp:
        for name in tile_embeddings:
            (tmp / "patch_embeddings" / name).mkdir(parents=True)
        for i, case in enumerate(case_ids):
            n = int(rng.integers(patches_per_slide[0], patches_per_slide[1] + 1))
            pool = np.arange(n_tiles) if sites is None else np.flatnonzero(sites == site_names[i % len(site_names)])
            weights = np.exp(tilt * z_image[i] * standardised[pool])
            drawn = np.sort(pool[rng.choice(len(pool), n, replace=True, p=weights / weights.sum())])
            slide = f"{case}-S0"
            side = int(np.ceil(np.sqrt(n)))
            coords_px = PATCH_PX * np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
            for name, embeddings in tile_embeddings.items():
                np.savez(
                    tmp / "patch_embeddings" / name / f"{slide}.npz",
                    embeddings=np.asarray(embeddings[drawn], dtype=np.float32),
                    coords=coords_px.astype(np.int64),
                )
            row = {
                "case_id": case,
                **({} if sites is None else {"site": str(site_names[i % len(site_names)])}),
                "slide_id": slide,
                "survival_months": round(float(months[i]), 4),
                "censorship": int(censored[i]),
            }
            for group, gene in genes:
                value = loadings.get(gene, 0.0) * z_genomic[i] + rng.standard_normal()
                row[f"{gene}_rnaseq"] = round(float(value), 4)
                if group == "Tumor Suppression":
                    row[f"{gene}_cnv"] = int(np.clip(np.round(0.5 * value + 0.5 * rng.standard_normal()), -2, 2))
            rows.append(row)
            if real_cells:
                members = [tile_cell_embeddings[t] for t in drawn if len(tile_cell_embeddings[t])]
                cell_means[i] = np.concatenate(members).mean(0) if members else 0.0
            else:
                cell_means[i] = rng.standard_normal(cell_dim) * 0.5 + z_cell[i] * direction_cell
            patients[case] = {
                "z_image": float(z_image[i]),
                "z_genomic": float(z_genomic[i]),
                "z_cell": None if real_cells else float(z_cell[i]),
                "log_hazard": float(log_hazard[i]),
                "bag_state": float(state[drawn].mean()),
                "tiles": drawn.tolist(),
            }
        pd.DataFrame(rows).to_csv(tmp / "clinical.csv", index=False)
        pd.DataFrame([{"group": g, "gene": gene} for g, gene in genes]).to_csv(tmp / "signatures.csv", index=False)
        cells = pd.DataFrame(cell_means, columns=[f"emb_{k}" for k in range(cell_dim)])
        cells.insert(0, "case_id", case_ids)
        cells.to_csv(tmp / "cell_embeddings.csv", index=False, float_format="%.6g")
        write_json(
            tmp / "ground_truth.json",
            {
                "kind": "shared",
                "n_patients": n_patients,
                "seed": seed,
                "tilt": tilt,
                "censored_fraction": float(censored.mean()),
                "effects": {
                    "image": image_effect,
                    "genomic": genomic_effect,
                    "cell": 0.0 if real_cells else cell_effect,
                },
                "tile_state": state.tolist(),
                "genomic_loadings": loadings,
                "patients": patients,
            },
        )
    log.info("shared synthetic cohort: %d patients, %.0f%% censored → %s", n_patients, 100 * censored.mean(), out_dir)
    return {
        "out_dir": out_dir,
        "clinical_csv": out_dir / "clinical.csv",
        "signatures_csv": out_dir / "signatures.csv",
        "embeddings_dirs": {name: out_dir / "patch_embeddings" / name for name in tile_embeddings},
        "cell_embeddings": out_dir / "cell_embeddings.csv",
        "log_hazard": log_hazard,
        "bag_state": np.array([patients[c]["bag_state"] for c in case_ids]),
        "censored": censored,
        "survival_months": months,
    }


__all__ = ["SIGNATURE_GROUPS", "cells_in_tiles", "make_cohort", "make_shared_cohort", "tile_states"]
