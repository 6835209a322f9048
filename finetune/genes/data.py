"""The cells the gene head learns from: shard crops joined to their measured expression, and the genes to predict.

Data: the cells of a shard manifest (crop + sample json) joined by (slide, cell_id) to the counts of
each slide's Xenium bundle (the manifest's ``slides[...].bundle``, or ``data.bundles`` in the
config), log-normalised over the whole panel (``normalize_total`` to 10,000 counts per cell, then
``log1p``), restricted to the genes every slide measured.

Genes (``genes.<setting>``): an explicit list (or a file of one gene per line); when null, the
``genes.n_top`` most highly variable genes of the training cells (scanpy, Seurat flavour).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.xenium import read_xenium

from ..embed import read_shard_cells

log = logging.getLogger(__name__)


@dataclass
class CellData:
    """Cells of the shards, their crops and measured expression, row-aligned."""

    obs: pd.DataFrame  # (n_cells, ...) sample json: slide, cell_id, x_um, y_um, he_x_px, he_y_px, meta
    jpegs: list[bytes]  # (n_cells,) the 224 px H&E crops as JPEG
    expression: anndata.AnnData  # (n_cells, n_genes) log-normalised, genes shared by every slide
    manifest_path: Path


def log_normalise(adata: anndata.AnnData, target_sum: float = 1e4) -> anndata.AnnData:
    """Counts → log1p(counts / cell total × ``target_sum``) (scanpy), as float32; a new AnnData."""
    out = anndata.AnnData(
        X=sp.csr_matrix(adata.X, dtype=np.float32),
        obs=pd.DataFrame(index=adata.obs_names),
        var=pd.DataFrame(index=adata.var_names),
    )
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def resolve_bundle(slide: str, manifest: Mapping[str, Any], overrides: Mapping[str, str] | None = None) -> Path:
    """The slide's Xenium bundle: ``overrides[slide]``, else the manifest's path (absolute, relative to
    the working folder, or relative to the shard folder and its parents)."""
    manifest_file = Path(manifest["root"]) / "manifest.json"
    if overrides and slide in overrides:
        path = Path(overrides[slide])
        if not path.is_dir():
            raise InputError(path, f"data.bundles.{slide}", "an existing Xenium bundle folder", "no such folder")
        return path
    entry = (manifest.get("slides") or {}).get(slide) or {}
    recorded = entry.get("bundle")
    if not recorded:
        raise InputError(
            manifest_file,
            f"slides.{slide}.bundle",
            "the slide's Xenium bundle (or data.bundles in the config)",
            "missing",
        )
    recorded = Path(recorded)
    root = Path(manifest["root"]).resolve()
    candidates = (
        [recorded] if recorded.is_absolute() else [recorded, *(base / recorded for base in [root, *root.parents][:4])]
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InputError(
        manifest_file,
        f"slides.{slide}.bundle",
        f"an existing Xenium bundle folder (set data.bundles.{slide} if it moved)",
        str(recorded),
    )


def load_cell_data(
    manifest_path: str | Path, bundles: Mapping[str, str] | None = None, progress: bool = True
) -> CellData:
    """Shard cells joined by (slide, cell_id) to the log-normalised expression of their bundles."""
    manifest = load_manifest(manifest_path)
    manifest_file = Path(manifest["root"]) / "manifest.json"
    matrix = (manifest.get("config") or {}).get("matrix", "auto")
    min_qv = float((manifest.get("config") or {}).get("min_qv", 20.0))
    obs, jpegs = read_shard_cells(manifest_file, progress=progress)
    per_slide: list[anndata.AnnData] = []
    rows: list[np.ndarray] = []
    for slide in pd.unique(obs["slide"]):
        bundle = resolve_bundle(slide, manifest, bundles)
        expression = log_normalise(read_xenium(bundle, matrix=matrix, min_qv=min_qv))
        slide_rows = np.flatnonzero((obs["slide"] == slide).to_numpy())
        cell_ids = obs["cell_id"].to_numpy()[slide_rows]
        missing = ~pd.Index(cell_ids).isin(expression.obs_names)
        if missing.any():
            raise InputError(
                bundle,
                "cell_id",
                f"every shard cell of slide '{slide}' among the bundle's cells",
                f"{int(missing.sum())} missing, e.g. {cell_ids[missing][0]!r}",
            )
        per_slide.append(expression[cell_ids])
        rows.append(slide_rows)
    shared = list(per_slide[0].var_names)
    for expression in per_slide[1:]:
        present = set(expression.var_names)
        shared = [g for g in shared if g in present]
    if not shared:
        raise InputError(manifest_file, "slides", "bundles sharing at least one gene", "no gene common to all slides")
    order = np.concatenate(rows)
    matrix_rows = sp.vstack([e[:, shared].X for e in per_slide]).tocsr()
    # Put expression rows back in the cell table's order.
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    expression = anndata.AnnData(
        X=matrix_rows[inverse], obs=pd.DataFrame(index=obs.index.astype(str)), var=pd.DataFrame(index=shared)
    )
    log.info("%d cells from %d slides, %d genes shared by every bundle", len(obs), len(per_slide), len(shared))
    return CellData(obs=obs, jpegs=jpegs, expression=expression, manifest_path=manifest_file)


def select_genes(
    train_expression: anndata.AnnData, setting: str, genes_cfg: Mapping[str, Any]
) -> tuple[list[str], str]:
    """The genes to predict for ``setting``: the configured list, or the top-N HVGs of the training cells."""
    chosen = genes_cfg.get(setting)
    available = list(train_expression.var_names)
    if chosen:
        if isinstance(chosen, str):
            path = Path(chosen)
            if not path.is_file():
                raise InputError(
                    path, f"genes.{setting}", "a list of genes or a file with one gene per line", "no such file"
                )
            chosen = [
                line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
            ]
        chosen = [str(g) for g in chosen]
        missing = [g for g in chosen if g not in set(available)]
        if missing:
            raise InputError(
                None,
                f"genes.{setting}",
                "genes measured in every slide's bundle",
                f"{len(missing)} unknown, e.g. {missing[:5]}",
            )
        return list(dict.fromkeys(chosen)), "configured list"
    n_top = int(genes_cfg.get("n_top") or 50)
    if n_top < 1:
        raise InputError(None, "genes.n_top", "a positive number of genes", n_top)
    variable = (
        np.asarray(
            train_expression.X.toarray().std(axis=0)
            if sp.issparse(train_expression.X)
            else train_expression.X.std(axis=0)
        )
        > 0
    )
    candidates = train_expression[:, variable].copy()
    if candidates.n_vars == 0:
        raise InputError(None, "genes", "genes that vary across training cells", "every gene is constant")
    if candidates.n_vars <= n_top:
        return list(candidates.var_names), f"all {candidates.n_vars} variable genes (fewer than n_top={n_top})"
    sc.pp.highly_variable_genes(candidates, n_top_genes=n_top, flavor="seurat")
    table = candidates.var.sort_values("dispersions_norm", ascending=False)
    selected = [g for g in table.index[table["highly_variable"]]][:n_top]
    return selected, f"top {n_top} highly variable genes of the training cells (scanpy, seurat flavour)"


__all__ = ["CellData", "log_normalise", "resolve_bundle", "load_cell_data", "select_genes"]
