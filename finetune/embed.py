"""Embedding extraction: an image encoder over shard crops or over the tissue tiles of a whole slide.

Two inputs, one output format (shared by the survival bags and the gene head):

- :func:`embed_shards`: every sample of a shard manifest (one 224 px H&E crop per cell);
- :func:`embed_slide_tiles`: a whole-slide image cut into a grid of ``tile_px`` tiles at
  ``tile_um_per_px`` µm/pixel, keeping tiles whose tissue fraction (``data_shards.qc.tissue_mask`` on
  a thumbnail) reaches ``min_tissue_fraction``.

Output: one AnnData ``.h5ad`` per slide, ``<out_dir>/<slide>.h5ad`` (written atomically), plus
``<out_dir>/embeddings.json`` listing them (slide → file, number of rows, dimension, encoder):

- ``X``: float32 (n_items, dim) embeddings; ``var_names`` ``f0 … f{dim-1}``;
- ``obs`` (one row per cell or tile, index = cell id / tile id, str):
  ``slide``; ``x_um``, ``y_um`` (centre, µm); ``he_x_px``, ``he_y_px`` (centre, H&E level-0 pixels);
  for cells the shard sample's json (``cell_id``, ``registration_region``, ``crop_um_per_px``, QC
  fields, and the slide's meta such as ``patient``, ``cancer_type``) and ``key`` (shard sample key);
  for tiles ``row``, ``col``, ``tile_x0_px``, ``tile_y0_px`` (top-left, level-0 px),
  ``tile_size_px`` (footprint side in level-0 px) and ``tissue_fraction`` (0–1), plus any ``meta``
  passed in;
- ``uns["embedding"]``: ``kind`` ("cells" or "tiles"), ``which`` ("backbone" = pooled backbone
  features, or "projected" = L2-normalised joint-space embedding), ``dim``, ``encoder`` (its
  description), and for tiles ``tile_um_per_px``, ``tile_px``, ``slide_um_per_px``, ``slide_path``,
  ``n_grid_tiles``.

For cells, x_um/y_um are Xenium µm (the cell centroid); for tiles they are µm in the H&E slide's
own frame (level-0 pixel × µm/pixel). Read a file back with ``anndata.read_h5ad`` or
:func:`read_embeddings`.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import anndata
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data_shards.atomic import atomic_path, write_json
from data_shards.errors import InputError
from data_shards.manifest import load_manifest

from .encoders import ImageEncoder, check_which, resolve_device

log = logging.getLogger(__name__)

INDEX_NAME = "embeddings.json"
_OBS_FIRST = ("slide", "cell_id", "x_um", "y_um", "he_x_px", "he_y_px")


# ---------------------------------------------------------------------------------------------
# Reading shards


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes → uint8 (H, W, 3) RGB (libjpeg-turbo through imagecodecs)."""
    import imagecodecs

    image = imagecodecs.jpeg_decode(data)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def iter_shard_samples(manifest: Mapping[str, Any], shards: Sequence[Mapping[str, Any]] | None = None,
                       progress: bool = True) -> Iterator[tuple[dict, bytes]]:
    """(sample json with ``key`` added, jpeg bytes) for every sample of ``shards`` (default: all)."""
    from pretrain.shard_io import tar_samples

    root = Path(manifest["root"])
    shards = manifest["shards"] if shards is None else shards
    total = sum(int(s["n_samples"]) for s in shards)
    with tqdm(total=total, desc="shard samples", unit="cell", disable=not progress, leave=False) as bar:
        for shard in shards:
            path = root / shard["path"]
            seen = 0
            for sample in tar_samples([{"url": str(path)}]):
                if "jpg" not in sample or "json" not in sample:
                    raise InputError(path, f"sample {sample['__key__']}", "jpg and json members", sorted(sample))
                meta = json.loads(sample["json"])
                meta["key"] = sample["__key__"]
                seen += 1
                bar.update(1)
                yield meta, sample["jpg"]
            if seen != int(shard["n_samples"]):
                raise InputError(path, "samples", f"{shard['n_samples']} (as the manifest says)", seen)


def read_shard_cells(manifest_path: str | Path, progress: bool = True) -> tuple[pd.DataFrame, list[bytes]]:
    """Every shard sample's json as a table (one row per cell, manifest order) and its JPEG crop."""
    manifest = load_manifest(manifest_path)
    rows, jpegs = [], []
    for meta, jpeg in iter_shard_samples(manifest, progress=progress):
        rows.append(meta)
        jpegs.append(jpeg)
    obs = _obs_table(rows, Path(manifest["root"]))
    return obs, jpegs


def _obs_table(rows: list[dict], where: Path) -> pd.DataFrame:
    obs = pd.DataFrame(rows)
    for column in ("cell_id", "slide", "x_um", "y_um"):
        if column not in obs.columns or obs[column].isna().any():
            raise InputError(where, f"sample json [{column}]", "a value in every shard sample", "missing")
    obs["cell_id"] = obs["cell_id"].astype(str)
    obs["slide"] = obs["slide"].astype(str)
    duplicated = obs.duplicated(["slide", "cell_id"])
    if duplicated.any():
        first = obs[duplicated].iloc[0]
        raise InputError(where, "sample json [cell_id]", "each (slide, cell_id) once in the shards",
                         f"{int(duplicated.sum())} repeated, e.g. {first['slide']}/{first['cell_id']}")
    ordered = [c for c in _OBS_FIRST if c in obs.columns] + [c for c in obs.columns if c not in _OBS_FIRST]
    return obs[ordered]


# ---------------------------------------------------------------------------------------------
# Running the encoder


@torch.no_grad()
def embed_images(encoder: ImageEncoder, images: Iterable[np.ndarray | bytes], n_images: int | None = None,
                 batch_size: int = 64, which: str = "backbone", progress: bool = True, desc: str = "embedding") -> np.ndarray:
    """float32 (n_images, dim) embeddings of uint8 (H, W, 3) images (or their JPEG bytes), in order."""
    check_which(which, encoder)
    if batch_size < 1:
        raise InputError(None, "batch_size", "a positive number of images per batch", batch_size)
    encoder.eval()
    chunks: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        x = encoder.preprocess(np.stack(batch))  # (B, 3, h, w)
        chunks.append(encoder(x, which=which).float().cpu().numpy())  # (B, dim)
        batch.clear()

    with tqdm(total=n_images, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for image in images:
            batch.append(decode_jpeg(image) if isinstance(image, (bytes, bytearray, memoryview)) else image)
            if len(batch) == batch_size:
                flush()
                bar.update(batch_size)
        if batch:
            bar.update(len(batch))
            flush()
    if not chunks:
        return np.zeros((0, encoder.output_dim(which)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _write_embeddings(path: Path, embeddings: np.ndarray, obs: pd.DataFrame, info: Mapping[str, Any]) -> Path:
    obs = obs.copy()
    for column in obs.columns:
        if obs[column].dtype == object:
            # h5ad needs one type per column; json fields can mix numbers, strings and None.
            obs[column] = pd.Categorical(obs[column].map(lambda v: "" if v is None else str(v)))
    adata = anndata.AnnData(
        X=embeddings.astype(np.float32, copy=False), obs=obs,
        var=pd.DataFrame(index=[f"f{i}" for i in range(embeddings.shape[1])]),
    )
    adata.uns["embedding"] = json.loads(json.dumps(dict(info), default=str))
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


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


def _encoder_info(encoder: ImageEncoder, which: str) -> dict:
    return {"which": which, "dim": encoder.output_dim(which), "encoder": encoder.description}


def embed_shards(encoder: ImageEncoder, manifest_path: str | Path, out_dir: str | Path, batch_size: int = 64,
                 which: str = "backbone", progress: bool = True) -> dict[str, Path]:
    """Embed every shard sample; write ``<out_dir>/<slide>.h5ad`` per slide; {slide: path}.

    Slides are processed one at a time (a slide's shards are grouped in the manifest), so memory
    holds one slide's embeddings.
    """
    check_which(which, encoder)
    manifest = load_manifest(manifest_path)
    out_dir = Path(out_dir)
    by_slide: dict[str, list[dict]] = defaultdict(list)
    for shard in manifest["shards"]:
        by_slide[str(shard["slide"])].append(shard)
    written: dict[str, Path] = {}
    index = {}
    for slide, shards in by_slide.items():
        rows: list[dict] = []

        def images() -> Iterator[bytes]:
            for meta, jpeg in iter_shard_samples(manifest, shards, progress=False):
                rows.append(meta)
                yield jpeg

        n_cells = sum(int(s["n_samples"]) for s in shards)
        embeddings = embed_images(encoder, images(), n_cells, batch_size, which, progress, desc=f"embed {slide}")
        obs = _obs_table(rows, Path(manifest["root"]))
        obs.index = pd.Index(obs["cell_id"].to_numpy(dtype=str), name="obs_id")
        info = {"kind": "cells", "manifest": str(Path(manifest["root"]) / "manifest.json"), **_encoder_info(encoder, which)}
        written[slide] = _write_embeddings(out_dir / f"{slide}.h5ad", embeddings, obs, info)
        index[slide] = {"file": written[slide].name, "n": len(obs), "dim": int(embeddings.shape[1]), "kind": "cells"}
        log.info("%s: %d cell embeddings (%d-d, %s) → %s", slide, len(obs), embeddings.shape[1], which, written[slide])
    _update_index(out_dir, index, _encoder_info(encoder, which))
    return written


def _update_index(out_dir: Path, entries: Mapping[str, dict], info: Mapping[str, Any]) -> None:
    """Add ``entries`` to ``<out_dir>/embeddings.json`` (slide → file, n, dim, kind)."""
    path = out_dir / INDEX_NAME
    index = json.loads(path.read_text()) if path.is_file() else {"slides": {}}
    index["slides"].update(entries)
    index.update({"which": info["which"], "dim": info["dim"], "encoder": info["encoder"]})
    write_json(path, json.loads(json.dumps(index, default=str)))


# ---------------------------------------------------------------------------------------------
# Whole-slide tiles


def tissue_tile_grid(shape_px: tuple[int, int], tile_size_px: float, mask: np.ndarray, mask_downsample: float,
                     min_tissue_fraction: float) -> pd.DataFrame:
    """Tiles of side ``tile_size_px`` (level-0 px) covering a (height, width) slide, with their tissue fraction.

    ``mask`` is the (h, w) bool tissue mask of a thumbnail at ``mask_downsample`` level-0 px per
    thumbnail px. Only whole tiles inside the slide are listed; those whose tissue fraction is at
    least ``min_tissue_fraction`` are kept. Columns: row, col, tile_x0_px, tile_y0_px (level 0),
    tissue_fraction.
    """
    height, width = shape_px
    n_rows, n_cols = int(height // tile_size_px), int(width // tile_size_px)
    if n_rows == 0 or n_cols == 0:
        return pd.DataFrame(columns=["row", "col", "tile_x0_px", "tile_y0_px", "tissue_fraction"])
    # Summed-area table: tissue pixels in any thumbnail rectangle in O(1).
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x0 = np.round(cols * tile_size_px).astype(np.int64)
    y0 = np.round(rows * tile_size_px).astype(np.int64)

    def thumb(v: np.ndarray, limit: int, up: bool) -> np.ndarray:
        scaled = v / mask_downsample
        return np.clip(np.ceil(scaled) if up else np.floor(scaled), 0, limit).astype(np.int64)

    c0, c1 = thumb(x0, mask.shape[1], False), thumb(x0 + tile_size_px, mask.shape[1], True)
    r0, r1 = thumb(y0, mask.shape[0], False), thumb(y0 + tile_size_px, mask.shape[0], True)
    c1, r1 = np.maximum(c1, c0 + 1).clip(max=mask.shape[1]), np.maximum(r1, r0 + 1).clip(max=mask.shape[0])
    inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    fraction = inside / area
    grid = pd.DataFrame({"row": rows, "col": cols, "tile_x0_px": x0, "tile_y0_px": y0, "tissue_fraction": fraction})
    return grid[grid["tissue_fraction"] >= min_tissue_fraction].reset_index(drop=True)


def _read_tile(slide, x0_px: int, y0_px: int, size_px0: float, level: int, tile_px: int) -> np.ndarray:
    """uint8 (tile_px, tile_px, 3): the level-0 square [x0, x0 + size) read at ``level`` and resized."""
    from PIL import Image

    downsample = slide.downsample(level)
    x, y = int(round(x0_px / downsample)), int(round(y0_px / downsample))
    side = max(1, int(round(size_px0 / downsample)))
    region = slide.read_region(x, y, side, side, level=level)
    if side != tile_px:
        region = np.asarray(Image.fromarray(region).resize((tile_px, tile_px), Image.BILINEAR, reducing_gap=None))
    return region


def embed_slide_tiles(encoder: ImageEncoder, slide_path: str | Path, out_path: str | Path, *,
                      tile_um_per_px: float = 0.5, tile_px: int = 224, min_tissue_fraction: float = 0.5,
                      batch_size: int = 64, which: str = "backbone", slide_um_per_px: float | None = None,
                      slide_id: str | None = None, meta: Mapping[str, Any] | None = None,
                      thumbnail_max_side: int = 2048, progress: bool = True) -> Path:
    """Embed the tissue tiles of a whole slide; write one ``.h5ad`` (see the module docstring).

    Each tile covers ``tile_px × tile_um_per_px`` µm and is read from the coarsest pyramid level
    that still has at least that resolution, then resized to ``tile_px`` pixels.
    ``slide_um_per_px`` overrides the pixel size the file declares.
    """
    from data_shards.qc import tissue_mask
    from data_shards.slide import Slide

    check_which(which, encoder)
    if not tile_um_per_px > 0 or int(tile_px) < 1:
        raise InputError(None, "tiles", "tile_um_per_px > 0 µm/pixel and tile_px ≥ 1 pixel", (tile_um_per_px, tile_px))
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise InputError(None, "min_tissue_fraction", "a fraction between 0 and 1", min_tissue_fraction)
    slide_path, out_path = Path(slide_path), Path(out_path)
    slide_id = slide_id or slide_path.name.split(".")[0]
    with Slide(slide_path, um_per_px=slide_um_per_px) as slide:
        size_px0 = tile_px * tile_um_per_px / slide.um_per_px  # tile side in level-0 px
        if size_px0 < tile_px * 0.99:
            log.warning("%s: tiles at %.3f µm/px are finer than the slide's %.3f µm/px; upsampling", slide_path,
                        tile_um_per_px, slide.um_per_px)
        thumbnail, thumb_downsample = slide.thumbnail(thumbnail_max_side)
        mask = tissue_mask(thumbnail)  # (h, w) bool at thumb_downsample level-0 px per px
        n_grid = int(slide.shape[0] // size_px0) * int(slide.shape[1] // size_px0)
        grid = tissue_tile_grid(slide.shape, size_px0, mask, thumb_downsample, min_tissue_fraction)
        level = slide.best_level(size_px0 / tile_px)
        log.info("%s: %d of %d tiles (%d px at %.3f µm/px, level %d) on tissue", slide_path.name, len(grid), n_grid,
                 tile_px, tile_um_per_px, level)
        tiles = (_read_tile(slide, x0, y0, size_px0, level, int(tile_px))
                 for x0, y0 in zip(grid["tile_x0_px"], grid["tile_y0_px"]))
        embeddings = embed_images(encoder, tiles, len(grid), batch_size, which, progress, desc=f"tiles {slide_id}")
        um_per_px = float(slide.um_per_px)
    centre_x_px = grid["tile_x0_px"].to_numpy(float) + size_px0 / 2
    centre_y_px = grid["tile_y0_px"].to_numpy(float) + size_px0 / 2
    obs = pd.DataFrame({
        "slide": slide_id,
        "x_um": centre_x_px * um_per_px, "y_um": centre_y_px * um_per_px,
        "he_x_px": centre_x_px, "he_y_px": centre_y_px,
        "row": grid["row"].to_numpy(), "col": grid["col"].to_numpy(),
        "tile_x0_px": grid["tile_x0_px"].to_numpy(), "tile_y0_px": grid["tile_y0_px"].to_numpy(),
        "tile_size_px": np.full(len(grid), size_px0), "tissue_fraction": grid["tissue_fraction"].to_numpy(),
    }, index=pd.Index([f"tile_{r}_{c}" for r, c in zip(grid["row"], grid["col"])], name="obs_id"))
    for key, value in (meta or {}).items():
        obs[key] = value
    info = {
        "kind": "tiles", "slide_path": str(slide_path), "slide_um_per_px": um_per_px, "tile_um_per_px": float(tile_um_per_px),
        "tile_px": int(tile_px), "min_tissue_fraction": float(min_tissue_fraction), "n_grid_tiles": n_grid,
        **_encoder_info(encoder, which),
    }
    _write_embeddings(out_path, embeddings, obs, info)
    _update_index(out_path.parent, {slide_id: {"file": out_path.name, "n": len(obs), "dim": int(embeddings.shape[1]),
                                               "kind": "tiles"}}, _encoder_info(encoder, which))
    log.info("%s: %d tile embeddings → %s", slide_id, len(obs), out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# Entry point


EMBED_DEFAULTS: dict[str, Any] = {
    "out_dir": None,
    "seed": 0,
    "device": "auto",  # auto (a CUDA GPU when present) | cpu | cuda | cuda:<index>
    "encoder": {"source": "export", "path": None, "arch": None, "kwargs": {}, "weights": None},
    "which": "backbone",
    "batch_size": 64,
    "progress": True,
    "shards": None,  # a shard manifest (or its folder): embed every cell crop
    "slides": [],  # whole slides: [{path, id, um_per_px (optional), meta {}}]
    "tiles": {"um_per_px": 0.5, "size_px": 224, "min_tissue_fraction": 0.5, "thumbnail_max_side": 2048},
    # The exported PAST cell encoder (export folder) over the cells of `shards`: <out_dir>/cells/<slide>.h5ad
    # (finetune.embed_cells), e.g. the per-patient cell token of PAST-multi survival.
    "cells": {"encoder": None, "which": "projected", "batch_size": 256},
}


def run_embed(cfg) -> dict:
    """``python launch/finetune.py embed --config ...``: embed shards and/or whole slides.

    Returns {"out_dir", "files": {slide: path}, "n": {slide: rows}}; the resolved config is saved as
    ``<out_dir>/embed_config.yaml``.
    """
    from omegaconf import OmegaConf

    from data_shards.config import save_config

    cfg = OmegaConf.merge(OmegaConf.create(EMBED_DEFAULTS), cfg)
    if not cfg.out_dir:
        raise InputError(None, "out_dir", "a folder for the embedding files", cfg.out_dir)
    if not cfg.shards and not cfg.slides:
        raise InputError(None, "shards / slides", "a shard manifest or a list of whole slides to embed", "neither")
    check_which(cfg.which)
    for i, entry in enumerate(cfg.slides):
        if not entry.get("path") or not Path(entry.path).is_file():
            raise InputError(entry.get("path"), f"slides[{i}].path", "an existing whole-slide image", "no such file")
    from .encoders import load_encoder

    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=int(cfg.seed), device=cfg.device)
    check_which(cfg.which, encoder)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if cfg.shards:
        files.update(embed_shards(encoder, cfg.shards, out_dir, int(cfg.batch_size), cfg.which, bool(cfg.progress)))
    for entry in cfg.slides:
        slide_id = entry.get("id") or Path(entry.path).name.split(".")[0]
        files[slide_id] = embed_slide_tiles(
            encoder, entry.path, out_dir / f"{slide_id}.h5ad", tile_um_per_px=float(cfg.tiles.um_per_px),
            tile_px=int(cfg.tiles.size_px), min_tissue_fraction=float(cfg.tiles.min_tissue_fraction),
            batch_size=int(cfg.batch_size), which=cfg.which, slide_um_per_px=entry.get("um_per_px"), slide_id=slide_id,
            meta=OmegaConf.to_container(entry.meta, resolve=True) if entry.get("meta") else None,
            thumbnail_max_side=int(cfg.tiles.thumbnail_max_side), progress=bool(cfg.progress),
        )
    result = {"out_dir": str(out_dir), "files": {k: str(v) for k, v in files.items()}}
    index = json.loads((out_dir / INDEX_NAME).read_text())
    result["n"] = {k: index["slides"][k]["n"] for k in files}
    if cfg.cells.encoder:
        if not cfg.shards:
            raise InputError(None, "shards", "a shard manifest whose cells the cell encoder embeds", None)
        from pretrain.export import load_cell_encoder

        from .embed_cells import embed_cells

        cell_encoder = load_cell_encoder(cfg.cells.encoder, device=resolve_device(cfg.device))
        cell_files = embed_cells(cell_encoder, cfg.shards, out_dir / "cells", int(cfg.cells.batch_size),
                                 str(cfg.cells.which), bool(cfg.progress))
        result["cell_files"] = {k: str(v) for k, v in cell_files.items()}
    save_config(cfg, out_dir / "embed_config.yaml")
    return result
