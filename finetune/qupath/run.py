"""``python launch/finetune.py qupath --config configs/finetune/qupath_demo.yaml``: per-cell results for viewers.

Writes into ``out_dir``:

- ``<slide>_cells.geojson``: the gene head's test cells on the slide's H&E (QuPath cell objects with
  cell and nucleus outlines, predicted / measured expression of the best-predicted genes, a cluster
  classification), see :mod:`.xenium_cells`;
- ``<slide>_cell_groups.csv``: the same classification as a Xenium Explorer cell-group file
  (``cell_id,group``), to open beside the Xenium run itself;
- ``mif_cells.geojson`` (tiles placed on their slide) or ``mif_cells/<tile>.geojson``: the mIF
  head's test nuclei with predicted marker means, probabilities and calls, see :mod:`.mif_cells`;
- ``export.json``: what was written and how many cells each file holds.

To see a file in QuPath: open the H&E slide, then drag the ``.geojson`` onto the viewer (or
``File > Import objects from file``); ``Measure > Show detection measurements`` lists the values,
and the classes colour the cells.
"""

from __future__ import annotations

from pathlib import Path

import anndata

from common.atomic import write_json
from common.config import apply_schema
from common.errors import InputError

from .config import QuPathConfig
from .geojson import class_colours, write_cell_groups_csv, write_feature_collection
from .mif_cells import mif_features, read_cells
from .xenium_cells import BOUNDARY_CHOICES, best_genes, classification_of, main_run, slide_features, slide_sources


def export_xenium_cells(cfg, out_dir: Path) -> dict:
    """The gene head's cells: one GeoJSON and one Explorer cell-group CSV per slide; summary per slide."""
    predictions = Path(cfg.predictions or "")
    if not cfg.predictions or not predictions.is_file():
        raise InputError(predictions, "cells.predictions", "predictions.h5ad written by `finetune.py genes`", "missing")
    if cfg.boundaries not in BOUNDARY_CHOICES:
        raise InputError(None, "cells.boundaries", f"one of {BOUNDARY_CHOICES}", repr(cfg.boundaries))
    if not cfg.manifest:
        raise InputError(None, "cells.manifest", "the shard manifest the predictions came from", "missing")
    adata = anndata.read_h5ad(predictions)
    main = main_run(adata, predictions)
    genes = best_genes(adata, main, int(cfg.top_genes))
    classes = classification_of(adata, str(cfg.classification), main, predictions)
    colours = class_colours(classes)
    sources = slide_sources(cfg.manifest, dict(cfg.bundles), dict(cfg.registrations))
    summary = {}
    for slide in sorted(adata.obs["slide"].astype(str).unique()):
        if slide not in sources:
            raise InputError(cfg.manifest, f"config.slides[{slide}].registration", "the slide's registration", "none")
        rows = (adata.obs["slide"].astype(str) == slide).to_numpy()
        features, info = slide_features(
            adata[rows],
            sources[slide],
            main=main,
            genes=genes,
            classes=classes[rows],
            colours=colours,
            boundaries=cfg.boundaries,
        )
        geojson = write_feature_collection(out_dir / f"{slide}_cells.geojson", features)
        groups = write_cell_groups_csv(
            out_dir / f"{slide}_cell_groups.csv", adata.obs["cell_id"][rows].astype(str).tolist(), classes[rows]
        )
        summary[slide] = {**info, "geojson": str(geojson), "cell_groups": str(groups), "genes": genes}
    return summary


def export_mif_cells(cfg, out_dir: Path) -> dict:
    """The mIF head's nuclei: one slide-level GeoJSON when tiles carry their origin, else one per tile."""
    if not cfg.cells or not cfg.nuclei:
        raise InputError(
            None, "mif.cells / mif.nuclei", "cells.csv of `finetune.py mif` and the nuclei folder", "missing"
        )
    nuclei = Path(cfg.nuclei)
    if not nuclei.is_dir():
        raise InputError(nuclei, "mif.nuclei", "a folder of nucleus label masks", "no such folder")
    by_file = mif_features(read_cells(Path(cfg.cells)), nuclei)
    written = {}
    for tile, features in by_file.items():
        path = out_dir / "mif_cells.geojson" if tile is None else out_dir / "mif_cells" / f"{tile}.geojson"
        path.parent.mkdir(parents=True, exist_ok=True)
        written[str(write_feature_collection(path, features))] = len(features)
    return written


def run_qupath(cfg) -> dict:
    """Write the viewer files (module docstring); returns what ``export.json`` records."""
    cfg = apply_schema(QuPathConfig, cfg)
    if not cfg.out_dir:
        raise InputError(None, "out_dir", "a folder for the GeoJSON / CSV files", "missing")
    if cfg.cells is None and cfg.mif is None:
        raise InputError(None, "cells / mif", "at least one of the two sections", "neither")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"out_dir": str(out_dir)}
    if cfg.cells is not None:
        result["cells"] = export_xenium_cells(cfg.cells, out_dir)
        for slide, info in result["cells"].items():
            print(
                f"{slide}: {info['n_cells']} cells -> {info['geojson']} (QuPath) and {info['cell_groups']} "
                f"(Xenium Explorer cell groups); registration agrees with the shards within "
                f"{info['max_centroid_drift_px']:.2g} px"
            )
    if cfg.mif is not None:
        result["mif"] = export_mif_cells(cfg.mif, out_dir)
        for path, n in result["mif"].items():
            print(f"mIF: {n} nuclei -> {path} (QuPath detections)")
    write_json(out_dir / "export.json", result)
    print("QuPath: open the H&E slide, drag a .geojson onto it (File > Import objects from file).")
    return result
