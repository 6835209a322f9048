"""Embeddings: an encoder over shard crops, whole-slide tissue tiles or shard cells, in one file format.

- :mod:`.images`: :func:`embed_images` (any images) and :func:`embed_shards` (every crop of a manifest);
- :mod:`.tiles`: :func:`embed_slide_tiles` (the tissue tiles of a whole slide);
- :mod:`.cells`: :func:`embed_cells` (the exported PAST cell encoder over the shards' cells);
- :mod:`.io`: the output format (one ``.h5ad`` per slide + ``embeddings.json``), written and read;
- :mod:`.config` / :mod:`.run`: ``launch/finetune.py embed`` (:class:`EmbedConfig`, :func:`run_embed`).
"""

from ..encoders import EncoderConfig
from .cells import WHICH_CELL, check_vocabulary, embed_cells, iter_cell_batches
from .config import EmbedConfig
from .images import embed_images, embed_shards, iter_shard_samples, read_shard_cells
from .io import (
    EMBEDDING_SUFFIXES,
    INDEX_NAME,
    find_embedding_file,
    load_embedding_file,
    read_embeddings,
    update_index,
    write_embeddings,
)
from .run import run_embed
from .tiles import embed_slide_tiles, tissue_tile_grid

__all__ = [
    "EMBEDDING_SUFFIXES",
    "INDEX_NAME",
    "WHICH_CELL",
    "EmbedConfig",
    "EncoderConfig",
    "check_vocabulary",
    "embed_cells",
    "embed_images",
    "embed_shards",
    "embed_slide_tiles",
    "find_embedding_file",
    "iter_cell_batches",
    "iter_shard_samples",
    "load_embedding_file",
    "read_embeddings",
    "read_shard_cells",
    "run_embed",
    "tissue_tile_grid",
    "update_index",
    "write_embeddings",
]
