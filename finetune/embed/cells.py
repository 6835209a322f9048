"""Cell embeddings: the exported PAST cell encoder over the cells of a shard manifest.

Each shard sample already holds what the cell tower reads (the cell's rank tokens, its spatial
neighbours' tokens and their offsets in µm), so embedding is a pass over the shards without
decoding the crops. The shards must have been tokenised with the encoder's own vocabulary: the
manifest's vocabulary sha256 is checked against the export's before anything runs.

Output: the format of :mod:`finetune.embed.io` (one ``<out_dir>/<slide>.h5ad`` per slide, ``X`` =
embeddings, ``obs`` = the sample json with ``slide``, ``cell_id``, ``x_um``, ``y_um`` …, and
``uns["embedding"]`` with ``kind`` "cells", ``which`` and the encoder), so
:func:`finetune.survival.data.read_cell_embeddings` can average a patient's cells for PAST-multi.

``which``: ``projected`` (default) = the L2-normalised joint-space embedding
(``PASTModel.encode_cell``); ``cell`` = the transformer's pooled cell feature; ``fused`` = the
cell feature fused with the neighbourhood graph, before the projection.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.reader import tar_samples
from data_shards.sample import decode_cell_arrays

from .io import obs_table, update_index, write_embeddings

log = logging.getLogger(__name__)

WHICH_CELL = ("projected", "cell")


def check_vocabulary(manifest: Mapping[str, Any], manifest_path: str | Path, cell_encoder) -> None:
    """The shards' tokens mean the same genes as the encoder's vocabulary, or an InputError."""
    shard_sha = (manifest.get("vocabulary") or {}).get("sha256")
    encoder_sha = cell_encoder.tokenizer.get("vocabulary_sha256")
    if shard_sha is None:
        raise InputError(manifest_path, "vocabulary.sha256", "the vocabulary the shards were tokenised with", None)
    if shard_sha != encoder_sha:
        raise InputError(
            manifest_path,
            "vocabulary.sha256",
            f"the cell encoder's vocabulary {encoder_sha} (re-tokenise the cells with its vocab.tsv)",
            shard_sha,
        )
    shard_length = int((manifest.get("config") or {}).get("tokens", {}).get("context_length", -1))
    if shard_length not in (-1, int(cell_encoder.tokenizer["context_length"])):
        raise InputError(
            manifest_path,
            "config.tokens.context_length",
            f"the cell encoder's context length {cell_encoder.tokenizer['context_length']}",
            shard_length,
        )


def iter_cell_batches(
    manifest: Mapping[str, Any], shards: Sequence[Mapping[str, Any]], batch_size: int
) -> Iterator[tuple[list[dict], dict[str, torch.Tensor]]]:
    """(sample jsons, cell-tower inputs) per batch of up to ``batch_size`` cells, manifest order.

    Inputs: ``tokens`` int64 (B, L), ``nbr_tokens`` int64 (N, L), ``nbr_offsets_um`` float32
    (N, 2), ``nbr_batch`` int64 (N,) — the layout of ``pretrain.collate``, without augmentation.
    """

    root = Path(manifest["root"])
    metas: list[dict] = []
    tokens: list[np.ndarray] = []
    nbr_tokens: list[np.ndarray] = []
    nbr_offsets: list[np.ndarray] = []

    def batch() -> dict[str, torch.Tensor]:
        counts = [len(n) for n in nbr_tokens]
        return {
            "tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),  # (B, L)
            "nbr_tokens": torch.from_numpy(np.concatenate(nbr_tokens).astype(np.int64)),  # (N, L)
            "nbr_offsets_um": torch.from_numpy(np.concatenate(nbr_offsets).astype(np.float32)),  # (N, 2)
            "nbr_batch": torch.from_numpy(np.repeat(np.arange(len(tokens), dtype=np.int64), counts)),  # (N,)
        }

    for shard in shards:
        for raw in tar_samples([{"url": str(root / shard["path"])}]):
            cell = decode_cell_arrays(raw)
            meta = dict(cell.meta, key=raw["__key__"])
            metas.append(meta)
            tokens.append(cell.tokens)
            nbr_tokens.append(cell.nbr_tokens)
            nbr_offsets.append(cell.nbr_offsets_um)
            if len(tokens) == batch_size:
                yield metas, batch()
                metas, tokens, nbr_tokens, nbr_offsets = [], [], [], []
    if tokens:
        yield metas, batch()


@torch.no_grad()
def embed_cells(
    cell_encoder,
    manifest_path: str | Path,
    out_dir: str | Path,
    batch_size: int = 256,
    which: str = "projected",
    progress: bool = True,
) -> dict[str, Path]:
    """Embed every cell of the shards with ``cell_encoder`` (``pretrain.export.load_cell_encoder``).

    Writes ``<out_dir>/<slide>.h5ad`` per slide (see the module docstring) and updates
    ``<out_dir>/embeddings.json``; returns {slide: path}.
    """
    if which not in WHICH_CELL:
        raise InputError(None, "which", f"one of {WHICH_CELL}", which)
    if int(batch_size) < 1:
        raise InputError(None, "batch_size", "a positive number of cells", batch_size)
    manifest = load_manifest(manifest_path)
    check_vocabulary(manifest, manifest_path, cell_encoder)
    device = next(cell_encoder.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_slide: dict[str, list[dict]] = defaultdict(list)
    for shard in manifest["shards"]:
        by_slide[str(shard["slide"])].append(shard)
    info = {
        "which": which,
        "dim": None,
        "encoder": {"source": "past-cell-encoder", "config": cell_encoder.config.get("model", {})},
    }
    written, index = {}, {}
    cell_encoder.eval()
    for slide, shards in by_slide.items():
        rows: list[dict] = []
        chunks: list[np.ndarray] = []
        n_cells = sum(int(s["n_samples"]) for s in shards)
        with tqdm(total=n_cells, desc=f"cells {slide}", unit="cell", disable=not progress, leave=False) as bar:
            for metas, inputs in iter_cell_batches(manifest, shards, int(batch_size)):
                inputs = {k: v.to(device) for k, v in inputs.items()}
                if which == "projected":
                    out = cell_encoder(**inputs)  # (B, proj_dim), unit norm
                else:
                    out = cell_encoder.features(**inputs)["cell_feat"]  # (B, D)
                chunks.append(out.float().cpu().numpy())
                rows.extend(metas)
                bar.update(len(metas))
        if len(rows) != n_cells:
            raise InputError(
                Path(manifest["root"]), f"slide {slide}", f"{n_cells} samples (as the manifest says)", len(rows)
            )
        embeddings = np.concatenate(chunks).astype(np.float32)  # (n_cells, dim)
        obs = obs_table(rows, Path(manifest["root"]))
        obs.index = pd.Index(obs["cell_id"].to_numpy(dtype=str), name="obs_id")
        info["dim"] = int(embeddings.shape[1])
        slide_info = {"kind": "cells", "manifest": str(Path(manifest["root"]) / "manifest.json"), **info}
        written[slide] = write_embeddings(out_dir / f"{slide}.h5ad", embeddings, obs, slide_info)
        index[slide] = {"file": written[slide].name, "n": len(obs), "dim": info["dim"], "kind": "cells"}
        log.info("%s: %d cell-encoder embeddings (%d-d, %s) → %s", slide, len(obs), info["dim"], which, written[slide])
    update_index(out_dir, index, info)
    return written


__all__ = ["WHICH_CELL", "check_vocabulary", "iter_cell_batches", "embed_cells"]
