"""The embedding file format: one AnnData ``.h5ad`` per slide plus an index, written and read here.

Written by :mod:`finetune.embed` (image crops of shards, tissue tiles of whole slides, cells through
the PAST cell encoder), read by the survival bags and the synthetic cohort. One file per slide,
``<out_dir>/<slide>.h5ad`` (written atomically), plus ``<out_dir>/embeddings.json`` listing them
(slide → file, number of rows, dimension, encoder):

- ``X``: float32 (n_items, dim) embeddings; ``var_names`` ``f0 … f{dim-1}``;
- ``obs`` (one row per cell or tile, index = cell id / tile id, str):
  ``slide``; ``x_um``, ``y_um`` (centre, µm); ``he_x_px``, ``he_y_px`` (centre, H&E level-0 pixels);
  for cells the shard sample's json (``cell_id``, ``registration_region``, ``crop_um_per_px``, QC
  fields, and the slide's meta such as ``patient``, ``cancer_type``) and ``key`` (shard sample key);
  for tiles ``row``, ``col``, ``tile_x0_px``, ``tile_y0_px`` (top-left, level-0 px),
  ``tile_size_px`` (footprint side in level-0 px) and ``tissue_fraction`` (0–1), plus any ``meta``
  passed in;
- ``obsm["spatial"]``: float64 (n_items, 2) ``x_um``, ``y_um`` (where scanpy's ``sc.pl.spatial`` /
  ``sc.pl.embedding(basis="spatial")`` and squidpy look), ``obsm["X_emb"]``: the embeddings again
  (for ``sc.pp.neighbors(adata, use_rep="X_emb")``);
- ``uns["embedding"]``: ``kind`` ("cells" or "tiles"), ``which`` ("backbone" = pooled backbone
  features, or "projected" = L2-normalised joint-space embedding), ``dim``, ``encoder`` (its
  description), and for tiles ``tile_um_per_px``, ``tile_px``, ``slide_um_per_px``, ``slide_path``,
  ``n_grid_tiles``.

For cells, x_um/y_um are Xenium µm (the cell centroid); for tiles they are µm in the H&E slide's
own frame (level-0 pixel × µm/pixel). Read a file back with ``anndata.read_h5ad`` or
:func:`read_embeddings` (checked), or just its matrix with :func:`load_embedding_file`, which also
accepts ``.npz`` (array ``embeddings``) and ``.npy`` files made elsewhere.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd

from common.atomic import atomic_path, write_json
from common.errors import InputError

from ..encoders import ImageEncoder

INDEX_NAME = "embeddings.json"
EMBEDDING_SUFFIXES = (".h5ad", ".npz", ".npy")
OBS_FIRST = ("slide", "cell_id", "x_um", "y_um", "he_x_px", "he_y_px")


# ---------------------------------------------------------------------------------------------
# Writing


def obs_table(rows: list[dict], where: Path) -> pd.DataFrame:
    """Shard sample jsons as an obs table (slide, cell_id, x_um, y_um … first), each (slide, cell_id) once."""
    obs = pd.DataFrame(rows)
    for column in ("cell_id", "slide", "x_um", "y_um"):
        if column not in obs.columns or obs[column].isna().any():
            raise InputError(where, f"sample json [{column}]", "a value in every shard sample", "missing")
    obs["cell_id"] = obs["cell_id"].astype(str)
    obs["slide"] = obs["slide"].astype(str)
    duplicated = obs.duplicated(["slide", "cell_id"])
    if duplicated.any():
        first = obs[duplicated].iloc[0]
        raise InputError(
            where,
            "sample json [cell_id]",
            "each (slide, cell_id) once in the shards",
            f"{int(duplicated.sum())} repeated, e.g. {first['slide']}/{first['cell_id']}",
        )
    ordered = [c for c in OBS_FIRST if c in obs.columns] + [c for c in obs.columns if c not in OBS_FIRST]
    return obs[ordered]


def write_embeddings(path: Path, embeddings: np.ndarray, obs: pd.DataFrame, info: Mapping[str, Any]) -> Path:
    """One slide's ``.h5ad`` (X = embeddings, obs, ``uns["embedding"]`` = info), written atomically."""
    obs = obs.copy()
    for column in obs.columns:
        if obs[column].dtype == object:
            # h5ad needs one type per column; json fields can mix numbers, strings and None.
            obs[column] = pd.Categorical(obs[column].map(lambda v: "" if v is None else str(v)))
    adata = anndata.AnnData(
        X=embeddings.astype(np.float32, copy=False),
        obs=obs,
        var=pd.DataFrame(index=[f"f{i}" for i in range(embeddings.shape[1])]),
    )
    adata.obsm["spatial"] = obs[["x_um", "y_um"]].to_numpy(np.float64)  # (n_items, 2) µm
    adata.obsm["X_emb"] = adata.X
    adata.uns["embedding"] = json.loads(json.dumps(dict(info), default=str))
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def encoder_info(encoder: ImageEncoder, which: str) -> dict:
    """What ``uns["embedding"]`` and the index record about an image encoder's output."""
    return {"which": which, "dim": encoder.output_dim(which), "encoder": encoder.description}


def update_index(out_dir: Path, entries: Mapping[str, dict], info: Mapping[str, Any]) -> None:
    """Add ``entries`` to ``<out_dir>/embeddings.json`` (slide → file, n, dim, kind).

    Several processes (one per GPU, ``part: i/n``) may finish slides at the same time: the
    read-modify-write holds an exclusive lock on ``embeddings.json.lock``.
    """
    path = out_dir / INDEX_NAME
    with open(out_dir / f"{INDEX_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads(path.read_text()) if path.is_file() else {"slides": {}}
        index["slides"].update(entries)
        index.update({"which": info["which"], "dim": info["dim"], "encoder": info["encoder"]})
        write_json(path, json.loads(json.dumps(index, default=str)))


def is_finished(path: Path, settings: Mapping[str, Any]) -> bool:
    """Whether ``path`` is an embedding file written with these settings (``uns["embedding"]`` agrees on each)."""
    if not path.is_file():
        return False
    try:
        recorded = anndata.read_h5ad(path, backed="r").uns.get("embedding", {})
    except (OSError, KeyError, ValueError):
        return False  # unreadable or cut short: embed again
    expected = json.loads(json.dumps(dict(settings), default=str))
    return all(recorded.get(key) == value for key, value in expected.items())


# ---------------------------------------------------------------------------------------------
# Reading


def read_embeddings(path: str | Path) -> anndata.AnnData:
    """One slide's embedding file (see the module docstring), checked to carry coordinates."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "an embedding .h5ad written by finetune.embed", "no such file")
    adata = anndata.read_h5ad(path)
    missing = [c for c in ("slide", "x_um", "y_um") if c not in adata.obs.columns]
    if missing or "embedding" not in adata.uns:
        raise InputError(path, "obs / uns", "obs slide, x_um, y_um and uns['embedding']", f"missing {missing or 'uns'}")
    return adata


def load_embedding_file(path: str | Path) -> np.ndarray:
    """One slide's embeddings (n, D) float32 from `.h5ad` (obsm["X_emb"] or X), `.npz` or `.npy`."""
    path = Path(path)
    if path.suffix == ".h5ad":
        adata = anndata.read_h5ad(path)
        array = adata.obsm["X_emb"] if "X_emb" in adata.obsm else adata.X
        if array is None:
            raise InputError(path, 'obsm["X_emb"]', "patch embeddings in obsm['X_emb'] or X", "neither")
        if hasattr(array, "toarray"):
            array = array.toarray()
        field = 'obsm["X_emb"]' if "X_emb" in adata.obsm else "X"
    elif path.suffix == ".npz":
        with np.load(path) as data:
            if "embeddings" not in data:
                raise InputError(path, "embeddings", "an (n_patches, D) array named 'embeddings'", list(data.keys()))
            array = data["embeddings"]
        field = "embeddings"
    elif path.suffix == ".npy":
        array, field = np.load(path), "array"
    else:
        raise InputError(path, None, "an embedding file (" + ", ".join(EMBEDDING_SUFFIXES) + ")", path.suffix)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise InputError(path, field, "a non-empty (n, D) matrix", f"shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(path, field, "finite values", "NaN/inf")
    return array


def find_embedding_file(folder: str | Path, slide_id: str) -> Path:
    """``<folder>/<slide_id>`` with the first of :data:`EMBEDDING_SUFFIXES` that exists."""
    folder = Path(folder)
    for suffix in EMBEDDING_SUFFIXES:
        candidate = folder / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(
        folder, f"slide {slide_id}", "an embedding file <slide_id>" + "|".join(EMBEDDING_SUFFIXES), "no such file"
    )


__all__ = [
    "INDEX_NAME",
    "EMBEDDING_SUFFIXES",
    "OBS_FIRST",
    "obs_table",
    "write_embeddings",
    "encoder_info",
    "update_index",
    "is_finished",
    "read_embeddings",
    "load_embedding_file",
    "find_embedding_file",
]
