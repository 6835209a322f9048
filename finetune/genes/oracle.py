"""The oracle of the gene head: each cell's planted truth (its state or type), not its image.

``controls.oracle`` says where the truth comes from:

- ``auto``: the bundles' ``ground_truth_cells.parquet`` (column ``cell_type``; simulated bundles carry
  it) when every slide's bundle has one, else a sample-json column named ``t`` / ``cell_type`` /
  ``cell_state`` when present, else no oracle;
- a column of the shard samples' json (e.g. an annotation carried in the slide meta);
- a CSV file with ``cell_id``, ``label`` (and ``slide`` when cell ids repeat across slides), e.g.
  pathologist or reference-mapping annotations of real cells;
- ``none``: no oracle (and then no controls gate).

A numeric truth becomes the features (t, t², t³) (standardised by the ridge), a categorical one its
one-hot code; the oracle head is the same ridge probe the encoders get.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import InputError
from data_shards.manifest import load_manifest

from .data import CellData, resolve_bundle

PLANTED_FILE = "ground_truth_cells.parquet"
PLANTED_COLUMN = "cell_type"
AUTO_COLUMNS = ("t", "cell_type", "cell_state")


@dataclass
class Oracle:
    """The planted truth of every cell (row-aligned with the cell table) and where it came from."""

    values: np.ndarray  # (n_cells,) numbers or labels
    numeric: bool
    source: str

    def features(self, values: np.ndarray | None = None) -> np.ndarray:
        """(n_cells, d) float32 features of ``values`` (default: the truth itself)."""
        values = self.values if values is None else values
        if self.numeric:
            t = values.astype(np.float64)
            return np.column_stack([t, t**2, t**3]).astype(np.float32)
        categories = np.unique(self.values.astype(str))
        return (values.astype(str)[:, None] == categories[None, :]).astype(np.float32)

    def shuffled(self, seed: int) -> np.ndarray:
        """The truth permuted between cells: a control that must carry no signal."""
        return self.values[np.random.default_rng(seed).permutation(len(self.values))]


def _from_planted_files(data: CellData, bundles) -> Oracle | None:
    manifest = load_manifest(data.manifest_path, require_shards=False)
    slides = data.obs["slide"].astype(str).to_numpy()
    values = np.empty(len(slides), dtype=object)
    for slide in pd.unique(slides):
        path = resolve_bundle(slide, manifest, bundles) / PLANTED_FILE
        if not path.is_file():
            return None
        truth = pd.read_parquet(path, columns=["cell_id", PLANTED_COLUMN]).set_index("cell_id")[PLANTED_COLUMN]
        rows = np.flatnonzero(slides == slide)
        found = truth.reindex(data.obs["cell_id"].astype(str).to_numpy()[rows])
        if found.isna().any():
            raise InputError(path, "cell_id", "every shard cell of the slide", f"{int(found.isna().sum())} missing")
        values[rows] = found.to_numpy()
    return Oracle(values, False, f"{PLANTED_FILE} [{PLANTED_COLUMN}] of the bundles")


def _from_column(data: CellData, column: str) -> Oracle:
    values = data.obs[column]
    if values.isna().any():
        raise InputError(data.manifest_path, f"sample json [{column}]", "a value for every cell", "missing values")
    numeric = pd.api.types.is_numeric_dtype(values) and values.nunique() > 20
    return Oracle(values.to_numpy(), bool(numeric), f"sample json [{column}]")


def _from_csv(data: CellData, path: Path) -> Oracle:
    table = pd.read_csv(path)
    if not {"cell_id", "label"} <= set(table.columns):
        raise InputError(
            path, "columns", "cell_id, label (and slide when cell ids repeat across slides)", list(table.columns)
        )
    keys = ["slide", "cell_id"] if "slide" in table.columns else ["cell_id"]
    table[keys] = table[keys].astype(str)
    lookup = table.set_index(keys)["label"]
    index = pd.MultiIndex.from_frame(data.obs[keys].astype(str)) if len(keys) == 2 else data.obs["cell_id"].astype(str)
    found = lookup.reindex(index)
    if found.isna().any():
        raise InputError(path, "cell_id", "a label for every cell of the shards", f"{int(found.isna().sum())} missing")
    values = found.to_numpy()
    numeric = pd.api.types.is_numeric_dtype(found) and found.nunique() > 20
    return Oracle(values, bool(numeric), str(path))


def load_oracle(data: CellData, spec: str | None, bundles=None) -> Oracle | None:
    """The planted truth named by ``controls.oracle`` (module docstring), or None."""
    if spec in (None, "none"):
        return None
    if spec == "auto":
        planted = _from_planted_files(data, bundles)
        if planted is not None:
            return planted
        column = next((c for c in AUTO_COLUMNS if c in data.obs.columns), None)
        return _from_column(data, column) if column else None
    if spec in data.obs.columns:
        return _from_column(data, spec)
    path = Path(spec)
    if path.suffix == ".csv":
        if not path.is_file():
            raise InputError(path, "controls.oracle", "an annotation CSV (cell_id, label)", "no such file")
        return _from_csv(data, path)
    raise InputError(
        None, "controls.oracle", "auto, none, a sample-json column or an annotation .csv", f"{spec!r} (no such column)"
    )


__all__ = ["Oracle", "load_oracle"]
