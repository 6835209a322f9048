"""H&E → multiplex immunofluorescence with the MIPHEI-ViT head (Balezo et al. 2025) on a PAST image encoder.

    python launch/finetune.py mif --config configs/finetune/mif_demo.yaml [key=value ...]

- :mod:`.config`: the settings (:class:`MIFConfig`);
- :mod:`.data`: the ORION-like reader, MIPHEI's preprocessing, the tile Dataset;
- :mod:`.model`: the generator (ViT + ViTMatte detail stream or UNETR pyramid + U-Net decoder, LoRA);
- :mod:`.train`: MIPHEI's optimisation on the shared loop;
- :mod:`.evaluate`: predictions, pixel and cell-level metrics (Cell AUC), the table and figures;
- :mod:`.controls`: oracle / shuffled oracle / random encoders, tile-bootstrap intervals, the gate and verdict;
- :mod:`.checkpoint`: the ``model/`` folder (LoRA merged) and :func:`load_mif_checkpoint`;
- :mod:`.run`: :func:`run_mif`, the task.

The synthetic demo set is painted by :mod:`finetune.synthetic.mif`.
"""

from .checkpoint import MODEL_FORMAT, build_from_config, load_mif_checkpoint, save_checkpoint
from .config import MIFConfig
from .controls import compare_runs
from .evaluate import evaluate_run, mean_predictor, model_predictor, predict_tiles, score_split
from .run import BASELINES, fit_from_config, prepare_data, run_mif
from .train import total_steps, train_model

__all__ = [
    "MIFConfig",
    "MODEL_FORMAT",
    "BASELINES",
    "run_mif",
    "prepare_data",
    "fit_from_config",
    "build_from_config",
    "train_model",
    "total_steps",
    "model_predictor",
    "mean_predictor",
    "predict_tiles",
    "score_split",
    "evaluate_run",
    "compare_runs",
    "save_checkpoint",
    "load_mif_checkpoint",
]
