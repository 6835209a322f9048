"""Image embeddings of shard crops: an image encoder over every cell crop of a shard manifest.

- :func:`embed_images`: any iterable of uint8 (H, W, 3) images (or their JPEG bytes) → (n, dim);
- :func:`iter_shard_samples` / :func:`read_shard_cells`: the shard samples' json and JPEG crops;
- :func:`embed_shards`: every sample of a manifest, one ``<out_dir>/<slide>.h5ad`` per slide in the
  format of :mod:`finetune.embed.io`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.reader import tar_samples
from data_shards.sample import decode_jpeg

from ..encoders import ImageEncoder, check_which
from .io import encoder_info, obs_table, update_index, write_embeddings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Reading shards


def iter_shard_samples(
    manifest: Mapping[str, Any], shards: Sequence[Mapping[str, Any]] | None = None, progress: bool = True
) -> Iterator[tuple[dict, bytes]]:
    """(sample json with ``key`` added, jpeg bytes) for every sample of ``shards`` (default: all)."""

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
    obs = obs_table(rows, Path(manifest["root"]))
    return obs, jpegs


# ---------------------------------------------------------------------------------------------
# Running the encoder


@torch.no_grad()
def embed_images(
    encoder: ImageEncoder,
    images: Iterable[np.ndarray | bytes],
    n_images: int | None = None,
    batch_size: int = 64,
    which: str = "backbone",
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
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


def _crops_recording_meta(
    manifest: Mapping[str, Any], shards: Sequence[Mapping[str, Any]], rows: list[dict]
) -> Iterator[bytes]:
    """The JPEG crops of ``shards``, appending each sample's json to ``rows`` as it goes (one pass)."""
    for meta, jpeg in iter_shard_samples(manifest, shards, progress=False):
        rows.append(meta)
        yield jpeg


def embed_shards(
    encoder: ImageEncoder,
    manifest_path: str | Path,
    out_dir: str | Path,
    batch_size: int = 64,
    which: str = "backbone",
    progress: bool = True,
) -> dict[str, Path]:
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
        rows: list[dict] = []  # filled with each sample's json as its crop is read
        n_cells = sum(int(s["n_samples"]) for s in shards)
        embeddings = embed_images(
            encoder,
            _crops_recording_meta(manifest, shards, rows),
            n_cells,
            batch_size,
            which,
            progress,
            desc=f"embed {slide}",
        )
        obs = obs_table(rows, Path(manifest["root"]))
        obs.index = pd.Index(obs["cell_id"].to_numpy(dtype=str), name="obs_id")
        info = {
            "kind": "cells",
            "manifest": str(Path(manifest["root"]) / "manifest.json"),
            **encoder_info(encoder, which),
        }
        written[slide] = write_embeddings(out_dir / f"{slide}.h5ad", embeddings, obs, info)
        index[slide] = {"file": written[slide].name, "n": len(obs), "dim": int(embeddings.shape[1]), "kind": "cells"}
        log.info("%s: %d cell embeddings (%d-d, %s) → %s", slide, len(obs), embeddings.shape[1], which, written[slide])
    update_index(out_dir, index, encoder_info(encoder, which))
    return written


__all__ = ["iter_shard_samples", "read_shard_cells", "embed_images", "embed_shards"]
