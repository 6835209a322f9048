"""Train/test splits of cells for the PAST gene-expression settings, from shard metadata.

- ``intra`` (held-out regions of the same slide, intra-patient): each slide is cut into
  ``n_blocks`` stripes of equal cell count along its longer axis (µm) and one stripe per slide
  (chosen with the seed) is the test set; or, with ``intra_by="registration_region"``, one
  registration region per slide. Training cells closer than ``gap_um`` to a test cell are dropped
  so that no training crop overlaps a test crop (default gap: one crop width).
- ``inter`` (held-out patients): whole patients (meta key ``patient``) are held out.
- ``cross`` (held-out cancer type): whole cancer types (meta key ``cancer_type``) are held out.

Held-out groups are ``test_groups`` when given, else groups drawn with the seed until they hold at
least ``test_fraction`` of the cells (never all groups). Every setting returns disjoint index
arrays; a setting the metadata cannot support raises one ``InputError`` naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from common.errors import InputError

log = logging.getLogger(__name__)

SETTINGS = ("intra", "inter", "cross")
GROUP_KEYS = {"inter": "patient", "cross": "cancer_type"}
INTRA_BY = ("blocks", "registration_region")


@dataclass
class Split:
    """Row positions (into the cell table) of the training and test cells, and how they were chosen."""

    train: np.ndarray  # (n_train,) int64
    test: np.ndarray  # (n_test,) int64
    info: dict[str, Any] = field(default_factory=dict)


def split_cells(
    obs: pd.DataFrame,
    setting: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    test_groups: Sequence[str] | None = None,
    intra_by: str = "blocks",
    n_blocks: int = 5,
    gap_um: float = 0.0,
    source: str | Path | None = None,
) -> Split:
    """Split the cells of ``obs`` (columns slide, x_um, y_um and the slide meta) for ``setting``.

    ``source`` names the file the table came from, for error messages.
    """
    if setting not in SETTINGS:
        raise InputError(None, "setting", f"one of {SETTINGS}", setting)
    if not 0.0 < test_fraction < 1.0:
        raise InputError(None, "split.test_fraction", "a fraction strictly between 0 and 1", test_fraction)
    if len(obs) < 2:
        raise InputError(source, "cells", "at least 2 cells to split", len(obs))
    if setting == "intra":
        split = _intra(obs, seed, intra_by, n_blocks, float(gap_um or 0.0), source)
    else:
        split = _by_group(obs, GROUP_KEYS[setting], setting, test_fraction, seed, test_groups, source)
    if len(split.train) == 0 or len(split.test) == 0:
        raise InputError(
            source, "split", "training and test cells", f"{len(split.train)} train, {len(split.test)} test"
        )
    split.info.update(setting=setting, n_train=int(len(split.train)), n_test=int(len(split.test)))
    log.info(
        "%s split: %d training cells, %d test cells (%s)",
        setting,
        len(split.train),
        len(split.test),
        {k: v for k, v in split.info.items() if k not in ("setting", "n_train", "n_test")},
    )
    return split


def _require_column(obs: pd.DataFrame, column: str, purpose: str, source) -> pd.Series:
    if column not in obs.columns:
        raise InputError(
            source, f"sample json / slide meta [{column}]", f"a '{column}' for every cell ({purpose})", "no such field"
        )
    values = obs[column]
    missing = values.isna() | (values.astype(str).str.strip() == "")
    if missing.any():
        raise InputError(
            source,
            f"sample json / slide meta [{column}]",
            f"a '{column}' for every cell ({purpose})",
            f"missing for {int(missing.sum())} of {len(obs)} cells",
        )
    return values.astype(str)


def _by_group(
    obs: pd.DataFrame,
    key: str,
    setting: str,
    test_fraction: float,
    seed: int,
    test_groups: Sequence[str] | None,
    source,
) -> Split:
    purpose = f"the {setting} setting holds out whole {key} groups"
    groups = _require_column(obs, key, purpose, source)
    counts = groups.value_counts()
    if len(counts) < 2:
        raise InputError(
            source,
            f"slide meta [{key}]",
            f"at least 2 distinct values of '{key}' ({purpose})",
            f"only {list(counts.index)}",
        )
    if test_groups:
        held_out = [str(g) for g in test_groups]
        unknown = sorted(set(held_out) - set(counts.index))
        if unknown:
            raise InputError(None, "split.test_groups", f"values of '{key}' among {sorted(counts.index)}", unknown)
        if len(set(held_out)) == len(counts):
            raise InputError(None, "split.test_groups", f"some '{key}' groups left for training", held_out)
    else:
        order = np.random.default_rng(seed).permutation(np.asarray(sorted(counts.index)))
        held_out, n_held = [], 0
        for group in order[:-1]:  # never every group: training needs one
            held_out.append(str(group))
            n_held += int(counts[group])
            if n_held >= test_fraction * len(obs):
                break
    is_test = groups.isin(held_out).to_numpy()
    return Split(np.flatnonzero(~is_test), np.flatnonzero(is_test), {"group_key": key, "test_groups": sorted(held_out)})


def _intra(obs: pd.DataFrame, seed: int, intra_by: str, n_blocks: int, gap_um: float, source) -> Split:
    if intra_by not in INTRA_BY:
        raise InputError(None, "split.intra_by", f"one of {INTRA_BY}", intra_by)
    slides = _require_column(obs, "slide", "cells are held out within each slide", source)
    xy = obs[["x_um", "y_um"]].to_numpy(dtype=float)  # (n, 2) µm
    if not np.isfinite(xy).all():
        raise InputError(source, "sample json [x_um, y_um]", "finite cell coordinates (µm)", "NaN or inf")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(obs), dtype=bool)
    is_train = np.zeros(len(obs), dtype=bool)
    held_out = {}
    for slide in sorted(slides.unique()):
        rows = np.flatnonzero((slides == slide).to_numpy())
        if intra_by == "registration_region":
            regions = _require_column(obs.iloc[rows], "registration_region", "intra_by=registration_region", source)
            names = sorted(regions.unique())
            if len(names) < 2:
                raise InputError(
                    source,
                    f"slide {slide} [registration_region]",
                    "at least 2 registration regions to hold one out",
                    names,
                )
            chosen = names[int(rng.integers(len(names)))]
            test_rows = regions.to_numpy() == chosen
            held_out[slide] = {"registration_region": chosen}
        else:
            if n_blocks < 2:
                raise InputError(None, "split.n_blocks", "at least 2 spatial blocks per slide", n_blocks)
            if len(rows) < n_blocks:
                raise InputError(source, f"slide {slide}", f"at least n_blocks={n_blocks} cells", len(rows))
            extent = np.ptp(xy[rows], axis=0)
            axis = int(np.argmax(extent))  # stripes across the longer side keep each block compact
            coordinate = xy[rows, axis]
            edges = np.quantile(coordinate, np.linspace(0.0, 1.0, n_blocks + 1))
            block = np.clip(np.searchsorted(edges, coordinate, side="right") - 1, 0, n_blocks - 1)
            chosen = int(rng.integers(n_blocks))
            test_rows = block == chosen
            held_out[slide] = {
                "axis": "x_um" if axis == 0 else "y_um",
                "block": chosen,
                "range_um": [float(coordinate[test_rows].min()), float(coordinate[test_rows].max())],
            }
        test_idx, train_idx = rows[test_rows], rows[~test_rows]
        if gap_um > 0 and len(test_idx) and len(train_idx):
            distance, _ = cKDTree(xy[test_idx]).query(xy[train_idx], k=1)
            dropped = int((distance < gap_um).sum())
            train_idx = train_idx[distance >= gap_um]
            held_out[slide]["n_train_dropped_in_gap"] = dropped
        is_test[test_idx] = True
        is_train[train_idx] = True
    info = {"intra_by": intra_by, "gap_um": gap_um, "held_out": held_out}
    if intra_by == "blocks":
        info["n_blocks"] = n_blocks
    return Split(np.flatnonzero(is_train), np.flatnonzero(is_test), info)
