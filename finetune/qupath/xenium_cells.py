"""QuPath cell objects for Xenium cells: their segmentation mapped onto the H&E, with the gene head's predictions.

Each test cell of ``finetune.genes``'s ``predictions.h5ad`` becomes one cell object on its slide's
H&E: the Xenium cell (and nucleus) boundary polygons of the bundle (µm) mapped to H&E level-0
pixels through the slide's registration (the one its shards were cut with), with measurements
(predicted and measured expression of the best-predicted genes, µm position) and a
classification (a cluster label, by default the measured-expression clusters transferred to the
predicted expression). The registration is checked against the H&E position the shards recorded
for each cell, so a registration file changed since the shards were cut is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.register import Registration
from data_shards.xenium import boundary_polygons

from ..genes.data import resolve_bundle
from .geojson import cell_feature

BOUNDARY_CHOICES = ("cell", "nucleus", "both")
# Largest disagreement (level-0 px) between a cell's centroid mapped now and the position its shard recorded.
MAX_CENTROID_DRIFT_PX = 2.0


@dataclass(frozen=True)
class SlideSources:
    """Where a slide's Xenium bundle and registration are (from the shard manifest)."""

    slide: str
    bundle: Path
    registration: Path


def slide_sources(
    manifest_path: str | Path,
    bundles: Mapping[str, str] | None = None,
    registrations: Mapping[str, str] | None = None,
) -> dict[str, SlideSources]:
    """slide id -> its bundle and registration.json, as the shard config recorded them (overrides win)."""
    manifest = load_manifest(manifest_path, require_shards=False)
    manifest_file = Path(manifest["root"]) / "manifest.json"
    sources = {}
    for entry in manifest.get("config", {}).get("slides", []) or []:
        slide = str(entry["id"])
        recorded = (registrations or {}).get(slide) or entry.get("registration")
        if not recorded:
            continue  # registered by identity: no keypoint map to put the polygons on the H&E with
        registration = _existing_file(Path(recorded), Path(manifest["root"]))
        if registration is None:
            raise InputError(
                manifest_file, f"config.slides[{slide}].registration", "an existing registration.json", str(recorded)
            )
        sources[slide] = SlideSources(slide, resolve_bundle(slide, manifest, bundles), registration)
    return sources


def _existing_file(recorded: Path, root: Path) -> Path | None:
    """``recorded`` as given, or relative to the shard folder and its parents (the shards may have moved)."""
    if recorded.is_absolute():
        return recorded if recorded.is_file() else None
    for base in [Path("."), root.resolve(), *root.resolve().parents][:5]:
        if (base / recorded).is_file():
            return base / recorded
    return None


def main_run(adata: anndata.AnnData, path: Path) -> str:
    """The name the gene head gave its main run (e.g. ``pretrained_linear_probe``)."""
    info = adata.uns.get("gene_prediction", {})
    main = info.get("main_run")
    if not main:
        raise InputError(path, "uns['gene_prediction']['main_run']", "a predictions.h5ad of finetune.genes", "missing")
    return str(main).replace("/", "_")


def best_genes(adata: anndata.AnnData, main: str, n: int) -> list[str]:
    """The ``n`` genes the main run predicts best (Pearson r on the test cells), best first."""
    column = f"pearson_{main}"
    if column not in adata.var.columns:
        return list(adata.var_names[:n])
    return list(adata.var[column].astype(float).sort_values(ascending=False, na_position="last").index[:n])


def classification_of(adata: anndata.AnnData, column: str, main: str, path: Path) -> pd.Series:
    """Each cell's class: obs[column], or for ``auto`` the measured clusters transferred to the main run."""
    name = f"transferred_{main}" if column == "auto" else column
    if name not in adata.obs.columns:
        choices = [c for c in adata.obs.columns if c.startswith(("leiden", "transferred"))]
        raise InputError(path, f"obs[{name!r}]", f"a classification column, e.g. one of {choices}", "missing")
    return adata.obs[name].astype(str).map(lambda v: f"cluster {v}" if v.isdigit() else v)


def polygons_px(bundle: Path, registration: Registration, cell_ids: Sequence[str], kind: str) -> dict[str, np.ndarray]:
    """cell id -> (n, 2) boundary vertices in H&E level-0 px (pixel-centre convention), for ``cell_ids``."""
    return {cell: registration.map(xy_um) for cell, xy_um in boundary_polygons(bundle, kind, cell_ids).items()}


def check_positions(
    registration: Registration, cells: pd.DataFrame, where: Path, max_drift_px: float = MAX_CENTROID_DRIFT_PX
) -> float:
    """Largest px distance between the registration's map of each cell's µm centre and its shard's H&E position."""
    mapped = registration.map(cells[["x_um", "y_um"]].to_numpy(np.float64))
    recorded = cells[["he_x_px", "he_y_px"]].to_numpy(np.float64)
    drift = float(np.abs(mapped - recorded).max()) if len(cells) else 0.0
    if drift > max_drift_px:
        raise InputError(
            where,
            None,
            f"the registration the shards were cut with (cells within {max_drift_px} px of their shard positions)",
            f"cells land up to {drift:.1f} px away: the file changed since the shards were made",
        )
    return drift


def slide_features(
    adata: anndata.AnnData,
    sources: SlideSources,
    *,
    main: str,
    genes: Sequence[str],
    classes: pd.Series,
    colours: Mapping[str, list[int]],
    boundaries: str,
) -> tuple[list[dict], dict]:
    """The QuPath features of one slide's cells, and a summary (cells, without polygon, centroid drift px)."""
    registration = Registration.from_json(sources.registration)
    cells = adata.obs
    drift = check_positions(registration, cells, sources.registration)
    cell_ids = cells["cell_id"].astype(str).tolist()
    outlines = polygons_px(sources.bundle, registration, cell_ids, "nucleus" if boundaries == "nucleus" else "cell")
    nuclei = polygons_px(sources.bundle, registration, cell_ids, "nucleus") if boundaries == "both" else {}
    gene_index = [adata.var_names.get_loc(g) for g in genes]
    predicted = np.asarray(adata.layers.get(f"pred_{main}", adata.X))[:, gene_index]
    measured = np.asarray(adata.layers["measured"])[:, gene_index] if "measured" in adata.layers else None
    features, missing = [], 0
    for i, cell_id in enumerate(cell_ids):
        if cell_id not in outlines:
            missing += 1
            continue
        values = {f"pred {g}": predicted[i, j] for j, g in enumerate(genes)}
        if measured is not None:
            values.update({f"measured {g}": measured[i, j] for j, g in enumerate(genes)})
        values.update({"x_um": cells["x_um"].iat[i], "y_um": cells["y_um"].iat[i]})
        name = classes.iat[i]
        features.append(
            cell_feature(
                cell_id,
                outlines[cell_id],
                nucleus_px=nuclei.get(cell_id),
                classification=name,
                colour=colours[name],
                measurements=values,
                object_type="cell",
            )
        )
    return features, {"n_cells": len(features), "n_without_boundary": missing, "max_centroid_drift_px": drift}
