"""``launch/finetune.py embed``: embed the shard crops and/or the tissue tiles of whole slides (and the cells).

Settings: :class:`finetune.embed.config.EmbedConfig`. Outputs: the format of :mod:`finetune.embed.io`
in ``out_dir`` (cell-encoder embeddings under ``out_dir/cells``) and the resolved config as
``embed_config.yaml``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from common.config import apply_schema, save_config
from common.errors import InputError
from pretrain.export import load_cell_encoder

from ..encoders import check_which, load_encoder, resolve_device
from .cells import embed_cells
from .config import EmbedConfig
from .images import embed_shards
from .io import INDEX_NAME, is_finished
from .tiles import embed_slide_tiles, tile_settings

log = logging.getLogger(__name__)


def run_embed(cfg) -> dict:
    """``python launch/finetune.py embed --config ...``: embed shards and/or whole slides.

    Returns {"out_dir", "files": {slide: path}, "n": {slide: rows}, "skipped": [slide ids]} (and
    "cell_files" with ``cells.encoder``); the resolved config is saved as ``<out_dir>/embed_config.yaml``.

    Many slides: a slide whose ``.h5ad`` already holds embeddings made with the same encoder and tile
    settings is skipped (``skip_finished``), so a cohort run that stopped continues where it was;
    ``part: i/n`` splits the slides over n processes (one per GPU: ``CUDA_VISIBLE_DEVICES=i``), which
    share one ``embeddings.json``. The shard crops and cells are embedded by part 0.
    """
    cfg = apply_schema(EmbedConfig, cfg)
    if not cfg.out_dir:
        raise InputError(None, "out_dir", "a folder for the embedding files", cfg.out_dir)
    if not cfg.shards and not cfg.slides:
        raise InputError(None, "shards / slides", "a shard manifest or a list of whole slides to embed", "neither")
    if cfg.cells.encoder and not cfg.shards:
        raise InputError(None, "shards", "a shard manifest whose cells the cell encoder embeds", None)
    check_which(cfg.which)
    for i, entry in enumerate(cfg.slides):
        if not entry.get("path") or not Path(entry.path).is_file():
            raise InputError(entry.get("path"), f"slides[{i}].path", "an existing whole-slide image", "no such file")

    part, n_parts = parse_part(cfg.part)
    slides = [entry for i, entry in enumerate(cfg.slides) if i % n_parts == part]
    ids = [entry.get("id") or Path(entry.path).name.split(".")[0] for entry in cfg.slides]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(None, "slides[].id", "one id per slide (outputs are named by it)", f"repeated: {repeated}")

    encoder = load_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), seed=int(cfg.seed), device=cfg.device)
    check_which(cfg.which, encoder)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    skipped: list[str] = []
    if cfg.shards and part == 0:
        files.update(embed_shards(encoder, cfg.shards, out_dir, int(cfg.batch_size), cfg.which, bool(cfg.progress)))
    for entry in slides:
        slide_id = entry.get("id") or Path(entry.path).name.split(".")[0]
        settings = tile_settings(
            encoder,
            cfg.which,
            entry.path,
            float(cfg.tiles.um_per_px),
            int(cfg.tiles.size_px),
            float(cfg.tiles.min_tissue_fraction),
        )
        if cfg.skip_finished and is_finished(out_dir / f"{slide_id}.h5ad", settings):
            files[slide_id] = out_dir / f"{slide_id}.h5ad"
            skipped.append(slide_id)
            continue
        files[slide_id] = embed_slide_tiles(
            encoder,
            entry.path,
            out_dir / f"{slide_id}.h5ad",
            tile_um_per_px=float(cfg.tiles.um_per_px),
            tile_px=int(cfg.tiles.size_px),
            min_tissue_fraction=float(cfg.tiles.min_tissue_fraction),
            batch_size=int(cfg.batch_size),
            which=cfg.which,
            slide_um_per_px=entry.get("um_per_px"),
            slide_id=slide_id,
            meta=OmegaConf.to_container(entry.meta, resolve=True) if entry.get("meta") else None,
            thumbnail_max_side=int(cfg.tiles.thumbnail_max_side),
            progress=bool(cfg.progress),
        )
    if skipped:
        log.info("%d slide(s) already embedded with these settings, skipped: %s", len(skipped), ", ".join(skipped))
    result = {"out_dir": str(out_dir), "files": {k: str(v) for k, v in files.items()}, "skipped": skipped}
    index = json.loads((out_dir / INDEX_NAME).read_text()) if files else {"slides": {}}
    result["n"] = {k: index["slides"][k]["n"] for k in files}
    if cfg.cells.encoder and part == 0:
        cell_encoder = load_cell_encoder(cfg.cells.encoder, device=resolve_device(cfg.device))
        cell_files = embed_cells(
            cell_encoder,
            cfg.shards,
            out_dir / "cells",
            int(cfg.cells.batch_size),
            str(cfg.cells.which),
            bool(cfg.progress),
        )
        result["cell_files"] = {k: str(v) for k, v in cell_files.items()}
    save_config(cfg, out_dir / ("embed_config.yaml" if n_parts == 1 else f"embed_config.part{part}of{n_parts}.yaml"))
    return result


def parse_part(part: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if part is None:
        return 0, 1
    try:
        i, n = (int(v) for v in str(part).split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise InputError(None, "part", '"i/n" with 0 <= i < n, e.g. "0/4" for the first of 4 processes', repr(part))
    return i, n


__all__ = ["parse_part", "run_embed"]
