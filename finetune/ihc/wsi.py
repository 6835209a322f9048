"""Virtual IHC of a whole slide: overlapping tiles, each embedded on the fly, blended without seams.

``wsi.slide`` → ``virtual_ihc.ome.tif`` (pyramidal, :func:`finetune.stitch.predict_slide_to_ome_tiff`)
and ``virtual_ihc_preview.png`` (H&E | virtual IHC thumbnails).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.errors import InputError
from data_shards.slide import Slide
from finetune.encoders import ImageEncoder
from finetune.report import save_figure
from finetune.stitch import predict_slide_to_ome_tiff

from .data import EmbeddingScaler, to_model_range
from .model import FiLMUNet


def slide_predictor(
    generator: FiLMUNet, encoder: ImageEncoder | None, which: str, scaler: EmbeddingScaler | None, device: torch.device
):
    """``predict_batch`` for :mod:`finetune.stitch`: uint8 (B, t, t, 3) → float32 (B, t, t, 3) on the 0–255 scale,
    each tile embedded by the encoder on the fly (the slide's tiles were never embedded before)."""

    @torch.no_grad()
    def predict_batch(tiles: np.ndarray) -> np.ndarray:
        embedding = None
        if generator.has_film:
            embedding = scaler(encoder(encoder.preprocess(tiles), which=which).float()).to(device)  # (B, D)
        out = generator(to_model_range(tiles).to(device), embedding)  # (B, 3, t, t) in [-1, 1]
        return ((out.float().clamp(-1, 1) + 1.0) * 127.5).movedim(1, -1).cpu().numpy()

    return predict_batch


def run_wsi(
    cfg: DictConfig,
    folder: Path,
    generator: FiLMUNet,
    encoder: ImageEncoder,
    which: str,
    scaler: EmbeddingScaler,
    tile_px: int,
    device: torch.device,
    progress: bool,
) -> dict:
    """Virtual IHC of a whole slide → ``virtual_ihc.ome.tif`` and ``virtual_ihc_preview.png`` in ``folder``."""
    wsi = cfg.wsi
    tile = int(wsi.tile_px or tile_px)
    if tile % generator.multiple_px:
        raise InputError(None, "wsi.tile_px", f"a multiple of {generator.multiple_px} px", tile)
    summary = predict_slide_to_ome_tiff(
        wsi.slide,
        folder / "virtual_ihc.ome.tif",
        slide_predictor(generator, encoder, which, scaler, device),
        tile_px=tile,
        overlap_px=int(wsi.overlap_px),
        batch_size=int(wsi.batch_size),
        level=int(wsi.level),
        tissue_only=bool(wsi.tissue_only),
        progress=progress,
        description="virtual IHC",
    )
    summary["preview"] = _plot_wsi_preview(
        folder / "virtual_ihc_preview.png", Path(wsi.slide), folder / "virtual_ihc.ome.tif"
    )
    return summary


def _plot_wsi_preview(path: Path, slide_path: Path, ihc_path: Path, max_side: int = 1024) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Slide(slide_path) as slide:
        he, _ = slide.thumbnail(max_side)
    with Slide(ihc_path) as slide:
        ihc, _ = slide.thumbnail(max_side)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * he.shape[0] / he.shape[1] + 0.4))
    for ax, image, title in zip(axes, (he, ihc), ("H&E", "virtual IHC")):
        ax.imshow(image), ax.set_title(title), ax.axis("off")
    return save_figure(fig, path, dpi=110).name


__all__ = ["slide_predictor", "run_wsi"]
