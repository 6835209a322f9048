"""Virtual immunohistochemistry from H&E (PAST paper, "Single-cell virtual immunohistochemistry").

    python launch/finetune.py ihc --config configs/finetune/ihc_demo.yaml [key=value ...]

- :mod:`.config`: the settings (:class:`IHCConfig`);
- :mod:`.data`: the paired-tile reader, tile embeddings, training samples;
- :mod:`.model`: the FiLM U-Net generator, the PatchGAN, saving and loading the generator;
- :mod:`.train`: pix2pix training on the shared loop;
- :mod:`.evaluate`: predictions, per-tile scores (PSNR, SSIM, H-score), the table and figures;
- :mod:`.wsi`: whole-slide prediction;
- :mod:`.run`: :func:`run_ihc`, the task.

The synthetic demo set is painted by :mod:`finetune.synthetic.ihc`.
"""

from .config import IHCConfig
from .data import EmbeddingScaler, PairDataset, embed_tiles, resolve_which, train_crop_px
from .evaluate import (
    evaluate,
    format_table,
    mean_l1,
    plot_examples,
    plot_hscore_scatter,
    predict_ihc,
    summarise,
    tile_nuclei,
    tile_scores,
)
from .model import load_generator, save_generator
from .run import BASELINES, prepare_data, run_ihc
from .train import fit_generator, generator_step, train_step
from .wsi import run_wsi, slide_predictor

__all__ = [
    "IHCConfig",
    "BASELINES",
    "run_ihc",
    "prepare_data",
    "resolve_which",
    "EmbeddingScaler",
    "embed_tiles",
    "train_crop_px",
    "PairDataset",
    "generator_step",
    "train_step",
    "fit_generator",
    "predict_ihc",
    "tile_scores",
    "tile_nuclei",
    "evaluate",
    "summarise",
    "mean_l1",
    "format_table",
    "plot_examples",
    "plot_hscore_scatter",
    "save_generator",
    "load_generator",
    "slide_predictor",
    "run_wsi",
]
