"""Typed settings of ``launch/finetune.py qupath`` (:func:`finetune.qupath.run_qupath`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class XeniumCellsConfig:
    """Xenium cells with the gene head's predictions, on the H&E through the registration."""

    predictions: Optional[str] = None  # predictions.h5ad written by `finetune.py genes` (required)
    manifest: Optional[str] = None  # the shard manifest: each slide's bundle and registration.json (required)
    bundles: dict[str, str] = field(default_factory=dict)  # slide id -> Xenium bundle, when it moved since the shards
    registrations: dict[str, str] = field(default_factory=dict)  # slide id -> registration.json, when it moved
    boundaries: str = "both"  # cell | nucleus | both (cell outline + nucleusGeometry, as QuPath cells have)
    top_genes: int = 5  # predicted and measured expression of this many best-predicted genes as measurements
    classification: str = "auto"  # obs column of predictions.h5ad; auto = measured clusters transferred to the main run


@dataclass
class MIFCellsConfig:
    """The mIF head's test nuclei with predicted marker means and calls."""

    cells: Optional[str] = None  # cells.csv written by `finetune.py mif` (required)
    nuclei: Optional[str] = None  # folder of the tiles' nucleus label masks (<tile>.tif|png) (required)


@dataclass
class QuPathConfig:
    """``launch/finetune.py qupath``: per-cell results as QuPath GeoJSON and Xenium Explorer cell groups."""

    run_dir: Optional[str] = None  # base folder the other paths may interpolate (${run_dir}/...)
    out_dir: Optional[str] = None  # where the .geojson and .csv files go (required)
    cells: Optional[XeniumCellsConfig] = None  # the gene head's cells; null = skip
    mif: Optional[MIFCellsConfig] = None  # the mIF head's nuclei; null = skip


__all__ = ["MIFCellsConfig", "QuPathConfig", "XeniumCellsConfig"]
